"""The options table on the command line: each command's typer parameters, and the values given
merged with a recipe into a ``SweepConfig`` (docs/options.md).

typer reads a command's options from its function's signature; ``with_options`` writes that
signature from the table, so an option is declared once, in ``gradcheck_cli/options.py``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from gradcheck_cli.cli._shell import stderr_console
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.options import CONFIG_OPTIONS, Option, for_command
from gradcheck_cli.recipes import load_recipe


def with_options(command: str):
    """Decorator: a command takes its own parameters (its arguments) plus, as keyword
    arguments named after the rows, the table's options for ``command``."""

    def attach(function):
        own = [
            parameter
            for parameter in inspect.signature(function, eval_str=True).parameters.values()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        added = [_parameter(option, command) for option in for_command(command)]
        function.__signature__ = inspect.Signature(own + added, return_annotation=None)
        return function

    return attach


def _parameter(option: Option, command: str) -> inspect.Parameter:
    default = option.command_line_default()
    kind = option.type_for(command)
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(default, option.flag, help=option.help_for(command)),
        annotation=kind if default is not None else kind | None,
    )


def config_values(given: dict) -> dict:
    """The options given to a command that go into its ``SweepConfig``, under the keys
    ``SweepConfig.from_values`` reads; ``None`` where the option was left out."""
    return {option.config_key: given[option.name] for option in CONFIG_OPTIONS if option.name in given}


def resolve_config(
    script: Path | None,
    recipe: str | None,
    overrides: dict,
):
    """Merge defaults < recipe < command line into a validated ``SweepConfig`` plus fail flags."""
    notes: list[str] = []
    values: dict = load_recipe(recipe, notes=notes) if recipe else {}
    if overrides.get("seed") is not None or overrides.get("seeds") is not None:
        # --seed/--seeds on the command line replace the recipe's seed and seeds alike
        values.pop("seed", None)
        values.pop("seeds", None)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if script is not None:
        values["script"] = script
    fail_on_nan = bool(values.pop("fail_on_nan", False))
    fail_on_divergence = bool(values.pop("fail_on_divergence", False))
    config = SweepConfig.from_values(values, notes=notes)
    for note in notes:  # exact duplicates merged in the grid
        stderr_console().print(f"note: {note}", markup=False)
    return config, fail_on_nan, fail_on_divergence
