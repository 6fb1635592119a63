"""The options table is the one description of every option: the commands' typer parameters,
``SweepConfig``, the recipe keys and the other places that name an option agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from gradcheck_cli import analysis, options
from gradcheck_cli.cli import app
from gradcheck_cli.config import PARSERS, SweepConfig
from gradcheck_cli.recipes import ACCEPTS, RECIPE_KEYS, load_recipe
from gradcheck_cli.report import resume

COMMANDS = (options.SWEEP, options.CHECK, options.REPORT, options.WATCH)


def command_options(command: str) -> list:
    """The options of ``gradclip COMMAND`` as typer built them (click parameters)."""
    params = typer.main.get_command(app).commands[command].params
    return [p for p in params if p.param_type_name == "option" and p.name != "help"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_takes_the_tables_options_in_its_order(command):
    rows = options.for_command(command)
    params = command_options(command)
    assert [p.opts for p in params] == [[o.flag] for o in rows]
    for param, row in zip(params, rows):
        assert param.name == row.name
        assert param.help == row.help_for(command)
        assert param.default == row.command_line_default()
        assert param.is_flag == (row.type_for(command) is bool)


METAVARS = {str: "<str>", int: "<int>", float: "<float>", Path: "<path>"}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_option_parses_the_tables_type(command):
    """--help names what each option parses: ``--steps <int>``, ``--out <path>``, a flag alone."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    words = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.lstrip().startswith("--")}
    for row in options.for_command(command):
        kind = row.type_for(command)
        if kind is bool:
            assert not words[row.flag].startswith("<"), row.flag
        else:
            assert words[row.flag] == METAVARS[kind], row.flag


def test_every_option_belongs_to_a_command_and_names_are_unique():
    assert len({o.name for o in options.OPTIONS}) == len(options.OPTIONS)
    assert all(o.commands and set(o.commands) <= set(COMMANDS) for o in options.OPTIONS)
    assert all(o.check is None or options.CHECK in o.commands for o in options.OPTIONS)
    assert all(o.watch is None or options.WATCH in o.commands for o in options.OPTIONS)


def test_sweep_config_fields_and_defaults_are_the_tables():
    fields = {f.name: f for f in dataclasses.fields(SweepConfig)}
    assert set(fields) == {"script"} | {o.config_field for o in options.CONFIG_OPTIONS}
    for option in options.CONFIG_OPTIONS:
        if option.name == "seeds":  # the one-seed --seed gives the default
            continue
        default = fields[option.config_field].default
        assert default == (option.default if option.name != "seed" else (option.default,)), option.name
    assert analysis.DEFAULT_SPIKE_FACTOR == options.default("spike_factor")


def test_every_config_option_has_a_parser_and_every_recipe_option_a_toml_shape():
    assert set(PARSERS) == {o.config_key for o in options.CONFIG_OPTIONS}
    recipe_rows = [o for o in options.OPTIONS if o.recipe is not None]
    assert all(o.recipe.accepts in ACCEPTS for o in recipe_rows)
    assert RECIPE_KEYS == ("description", "script", *(o.name for o in options.recipe_options()))
    # every SweepConfig input can come from a recipe, and so can the two fail flags
    assert {o.name for o in recipe_rows} == {o.name for o in options.CONFIG_OPTIONS} | {
        "fail_on_nan",
        "fail_on_divergence",
    }


def test_every_hints_example_is_a_valid_recipe_value(tmp_path):
    """The example a recipe error suggests (``fix 'steps' in r.toml, e.g. steps = 100``) loads."""
    rows = [o for o in options.recipe_options() if o.recipe.example is not None]
    assert {o.name for o in options.recipe_options()} - {o.name for o in rows} == {"fail_on_nan", "fail_on_divergence"}
    recipe = tmp_path / "r.toml"
    recipe.write_text("".join(f"{o.name} = {o.recipe.example}\n" for o in rows))
    assert set(load_recipe(recipe)) == {o.config_key for o in rows}


def test_the_resume_message_spells_every_option_as_the_command_line_does():
    names = resume._OPTION_NAMES
    for option in options.CONFIG_OPTIONS:
        if option.name != "seed":  # seed and seeds both set the seeds; the message says --seeds
            assert names[option.config_field] == option.flag, option.name


def _words(value) -> str:
    if isinstance(value, tuple):
        return ",".join(_words(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_help_states_each_default():
    for option in options.CONFIG_OPTIONS:
        if option.default in (None, ()):
            continue
        words = _words(option.default)
        assert f"default {words}" in option.help or f"{words} (default" in option.help, option.name


def test_docs_options_md_is_the_tables():
    """docs/options.md is generated: after editing the table, run
    ``python -m gradcheck_cli.options > docs/options.md``."""
    page = Path(__file__).resolve().parent.parent / "docs" / "options.md"
    assert page.read_text(encoding="utf-8") == options.markdown(), "docs/options.md is stale: regenerate it"


def test_the_docs_page_lists_every_option_and_recipe_key():
    page = options.markdown()
    for option in options.OPTIONS:
        assert f"| `{option.flag}` |" in page
        if option.recipe is not None:
            assert f"| `{option.name}` | {option.recipe.words} | `{option.flag}` |" in page
