"""One table of every option of ``gradclip sweep``, ``check``, ``watch`` and ``report``.

Each row names an option once: its name (the flag is ``--name`` with dashes, the recipe key is
the name), type, default, help and how a recipe writes it. The commands' typer parameters,
``SweepConfig``'s defaults, the keys a recipe may hold and docs/options.md are built from
``OPTIONS``; ``python -m gradcheck_cli.options > docs/options.md`` writes that page.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWEEP, CHECK, REPORT, WATCH = "sweep", "check", "report", "watch"


@dataclass(frozen=True)
class Recipe:
    """How an option is written in a recipe (TOML)."""

    accepts: str  # the TOML shapes it takes, one of recipes.ACCEPTS: "numbers", "int", ...
    words: str  # those shapes in words, for the error message
    example: str | None = None  # a valid TOML value, for the hint ("key = example")


@dataclass(frozen=True)
class Variant:
    """An option that means something narrower in one command: check runs one configuration."""

    type: type
    help: str
    default: Any = None


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # what the command line parses: str (lists, modes), int, float, bool or Path
    default: Any  # the value when the option is given nowhere
    help: str
    commands: tuple[str, ...] = (SWEEP,)
    # A SweepConfig input. On the command line its default is None ("not given"), so that a
    # recipe's value, else ``default``, applies.
    config: bool = False
    key: str | None = None  # its key in SweepConfig.from_values and load_recipe's result, when not `name`
    field: str | None = None  # the SweepConfig field it sets, when not `key`
    recipe: Recipe | None = None  # None: command line only
    check: Variant | None = None
    watch: Variant | None = None  # in ``gradclip watch`` (one run of the user's command as written)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def config_key(self) -> str:
        return self.key or self.name

    @property
    def config_field(self) -> str:
        return self.field or self.config_key

    def variant(self, command: str) -> Variant | None:
        return {CHECK: self.check, WATCH: self.watch}.get(command)

    def type_for(self, command: str) -> type:
        variant = self.variant(command)
        return variant.type if variant else self.type

    def help_for(self, command: str) -> str:
        variant = self.variant(command)
        return variant.help if variant else self.help

    def default_for(self, command: str) -> Any:
        variant = self.variant(command)
        return variant.default if variant else self.default

    def command_line_default(self) -> Any:
        return None if self.config else self.default


def _list_words(what: str, example: str, text: str) -> str:
    return f'{what} or a comma-separated string, e.g. {example} or "{text}"'


_RUN = (SWEEP, CHECK)  # the options of any command that trains

# In the order ``gradclip sweep --help`` lists them; check and report take theirs in this order.
OPTIONS: tuple[Option, ...] = (
    Option(
        "max_norm",
        str,
        (0.1, 1.0, 10.0),
        "Comma-separated positive max_norm values (default 0.1,1,10).",
        _RUN,
        config=True,
        key="max_norms",
        recipe=Recipe("numbers", _list_words("a list of numbers", "[0.1, 1, 10]", "0.1,1,10"), "[0.1, 1, 10]"),
        check=Variant(float, "Clip at this max_norm; without it the run is unclipped."),
    ),
    Option(
        "norm_type",
        str,
        (2.0, math.inf),
        "Comma-separated norm types, numbers or inf (default 2,inf).",
        _RUN,
        config=True,
        key="norm_types",
        recipe=Recipe("norm_types", _list_words('a list of numbers or "inf",', '[2, "inf"]', "2,inf"), '[2, "inf"]'),
        check=Variant(str, "Norm type for clipping, with --max-norm: a number or inf (default 2).", 2.0),
    ),
    Option(
        "clip_value",
        str,
        (),
        "Also run value clipping (clip_grad_value_) at these comma-separated values.",
        config=True,
        key="clip_values",
        recipe=Recipe("numbers", _list_words("a list of numbers", "[0.1, 1]", "0.1,1"), "[0.1, 1]"),
    ),
    Option(
        "agc",
        str,
        (),
        "Also run adaptive gradient clipping (AGC) with these comma-separated clip factors, e.g. 0.01.",
        config=True,
        key="agc_clip_factors",
        recipe=Recipe("numbers", _list_words("a list of numbers", "[0.01, 0.1]", "0.01,0.1"), "[0.01, 0.1]"),
    ),
    Option(
        "agc_exclude",
        str,
        (),
        "Parameters AGC leaves alone: comma-separated names, module names or globs (default none).",
        config=True,
        recipe=Recipe("names", _list_words("a list of strings", '["fc", "head.*"]', "fc,head.*"), '["fc"]'),
    ),
    Option(
        "autoclip",
        str,
        (),
        "Also run AutoClip at these comma-separated percentiles (0-100), e.g. 10.",
        config=True,
        key="autoclip_percentiles",
        recipe=Recipe("numbers", _list_words("a list of numbers from 0 to 100", "[10, 25]", "10,25"), "[10, 25]"),
    ),
    Option(
        "zclip",
        str,
        (),
        "Also run ZClip with these comma-separated z thresholds, e.g. 2.5.",
        config=True,
        key="zclip_z_thresholds",
        recipe=Recipe("numbers", _list_words("a list of numbers", "[2.5, 3]", "2.5,3"), "[2.5]"),
    ),
    Option(
        "zclip_max_norm",
        str,
        1.0,
        "ZClip's cap on its threshold, max_grad_norm (default 1; none: no cap).",
        config=True,
        recipe=Recipe("number_or_none", 'a number, or "none" for no cap', "1.0"),
    ),
    Option(
        "steps",
        int,
        100,
        "Optimizer steps per run (default 100).",
        (*_RUN, WATCH),
        config=True,
        recipe=Recipe("int", "an integer", "100"),
        watch=Variant(int, "Stop after this many optimizer steps (default: run the command to its end).", None),
    ),
    Option(
        "seed",
        int,
        0,
        "Seed for weights, data order and RNG (default 0).",
        (*_RUN, WATCH),
        config=True,
        field="seeds",
        recipe=Recipe("int", "an integer", "0"),
    ),
    Option(
        "seeds",
        str,
        None,
        "Comma-separated seeds: every run repeated per seed (e.g. 0,1,2); --seed N is the one-seed form.",
        config=True,
        recipe=Recipe("ints", _list_words("a list of integers", "[0, 1, 2]", "0,1,2"), "[0, 1, 2]"),
    ),
    Option(
        "lr",
        str,
        None,
        "Comma-separated learning rates: every run at each lr (e.g. 0.1,1,20). Without it the default SGD uses "
        "0.01 and a script's build_optimizer keeps its own lr; with it, every param group's lr is set to each value.",
        _RUN,
        config=True,
        field="lrs",
        recipe=Recipe(
            "lrs", "a number, a list of numbers or a comma-separated string, e.g. 0.01 or [0.1, 1]", "[0.01, 0.1]"
        ),
        check=Variant(
            float,
            "Learning rate: of the default SGD (default 0.01), or set on every param group of the script's optimizer.",
        ),
    ),
    Option(
        "divergence_factor",
        float,
        10.0,
        "Margin k of the divergence test (default 10): a run diverged when a loss rises k early spreads (or k times "
        "its level) above its early steps, or the gradient norm it applies exceeds k^2 times its running median "
        "(docs/diagnosis.md); inf turns the check off.",
        (*_RUN, WATCH),
        config=True,
        recipe=Recipe("number", "a number", "10.0"),
    ),
    Option(
        "device",
        str,
        "cpu",
        "cpu (default), cuda or cuda:N.",
        _RUN,
        config=True,
        recipe=Recipe("string", 'a string, "cpu" or "cuda"', '"cpu"'),
    ),
    Option(
        "amp",
        str,
        "off",
        "Mixed precision: off (default), fp16 (autocast + gradient scaler) or bf16 (autocast).",
        _RUN,
        config=True,
        recipe=Recipe("string", 'a string, "off", "fp16" or "bf16"', '"fp16"'),
    ),
    Option(
        "accumulate",
        int,
        1,
        "Micro-batches per optimizer step (gradient accumulation, default 1).",
        _RUN,
        config=True,
        recipe=Recipe("int", "an integer", "4"),
    ),
    Option(
        "amp_init_scale",
        float,
        2.0**16,
        "Initial scale of the fp16 gradient scaler (default 65536, torch's).",
        _RUN,
        config=True,
        recipe=Recipe("number", "a number", "65536.0"),
    ),
    Option(
        "out",
        Path,
        Path("gradclip-report"),
        "Directory for summary.csv, steps.csv, histograms.csv.",
        (SWEEP, WATCH),
        watch=Variant(
            Path, "Directory for the run's files and report.html (default gradclip-watch).", Path("gradclip-watch")
        ),
    ),
    Option("recipe", str, None, "A recipe TOML file or bundled recipe name; options given here override it."),
    Option(
        "fail_on_nan",
        bool,
        False,
        "Exit 1 if any run went NaN/inf.",
        recipe=Recipe("bool", "a boolean (true or false)"),
    ),
    Option(
        "fail_on_divergence",
        bool,
        False,
        "Exit 1 if any run diverged.",
        recipe=Recipe("bool", "a boolean (true or false)"),
    ),
    Option("resume", bool, False, "Skip runs already finished in --out by a sweep with the same options."),
    Option("junit", Path, None, "Also write a JUnit XML report to this file (one test case per run).", _RUN),
    Option(
        "json", bool, False, "Print the summary as JSON on stdout instead of the table.", (SWEEP, CHECK, REPORT, WATCH)
    ),
    Option(
        "stop_on_non_finite",
        bool,
        False,
        "Stop the command at its first step with a NaN/inf loss or gradient.",
        (WATCH,),
    ),
    Option(
        "layer_depth",
        str,
        "auto",
        "Per-layer norms grouped by module depth: auto (default: per parameter up to 64 tensors, else the deepest "
        "depth with at most 64 groups), param, or N.",
        (SWEEP, WATCH),
        config=True,
        recipe=Recipe("depth", 'a string ("auto" or "param") or an integer', '"auto"'),
    ),
    Option(
        "spike_factor",
        float,
        10.0,
        "A layer's gradient spikes when its norm exceeds this x its running median (default 10).",
        (SWEEP, REPORT),
        config=True,
        recipe=Recipe("number", "a number", "10"),
    ),
    Option(
        "refine",
        int,
        0,
        "Up to this many extra max_norms per norm type (and lr), each run in every seed, bisecting the "
        "stability boundary (default 0).",
        config=True,
        recipe=Recipe("int", "an integer", "3"),
    ),
    Option(
        "jobs",
        int,
        1,
        "Runs at once, each in its own worker process (default 1; 0: every run in this process, no isolation).",
    ),
    Option("threads_per_job", int, None, "torch threads per worker (default: max(1, cores // jobs))."),
    Option(
        "no_share",
        bool,
        False,
        "Train every run from step 1: no run takes its first steps from the control run (the results are "
        "the same; for checking that, and for timing every run).",
    ),
    Option(
        "distributed",
        str,
        "cells",
        "Under torchrun: cells (ranks share out the runs) or model (every rank runs every run on a sharded model).",
    ),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
# The SweepConfig inputs, in table order.
CONFIG_OPTIONS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.config)


def default(name: str) -> Any:
    """The default of option ``name``: what a sweep uses when neither the command line nor a
    recipe gives it."""
    return BY_NAME[name].default


def for_command(command: str) -> tuple[Option, ...]:
    """The options of ``gradclip COMMAND``, in the order its --help lists them."""
    return tuple(option for option in OPTIONS if command in option.commands)


def recipe_options() -> tuple[Option, ...]:
    """The options a recipe may set, in the order its error messages list them (flags last)."""
    return tuple(sorted((o for o in OPTIONS if o.recipe is not None), key=lambda o: o.type is bool))


# --- docs/options.md ---------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """A default as a user writes it: ``0.1,1,10``, ``inf``, ``off``; blank when the option has
    none (its help says what happens without it)."""
    if value is None:
        return ""
    if value == ():
        return "`none`"
    if isinstance(value, bool):
        return "`on`" if value else "`off`"
    if isinstance(value, tuple):
        return "`" + ",".join(_shown(v).strip("`") for v in value) + "`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _table(command: str) -> list[str]:
    recipe = command == SWEEP  # only a sweep reads a recipe
    head = "| option | type | default |" + (" recipe key |" if recipe else "") + " what it does |"
    rows = [head, "|---" * head.count(" |") + "|"]
    for o in for_command(command):
        kind = o.type_for(command)
        cells = [f"`{o.flag}`", "flag" if kind is bool else kind.__name__.lower(), _shown(o.default_for(command))]
        if recipe:
            cells.append(f"`{o.name}`" if o.recipe is not None else "")
        cells.append(o.help_for(command).replace("|", "\\|"))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown() -> str:
    """docs/options.md: every option of every command, and the recipe keys, from ``OPTIONS``."""
    return "\n".join(
        [
            "<!-- Generated from gradcheck_cli/options.py: python -m gradcheck_cli.options > docs/options.md -->",
            "",
            "# Options",
            "",
            "Every option of every `gradclip` command, as `gradclip COMMAND --help` lists it, and the key",
            "that sets it in a recipe. A value given on the command line wins over the recipe's, which",
            "wins over the default; `--seed` or `--seeds` on the command line replace both of the",
            "recipe's seed keys. A value out of range is refused with exit code 2 and one line naming the",
            "option and the fix, in the same words for the command line and a recipe.",
            "",
            "## `gradclip sweep [SCRIPT]` or `gradclip sweep -- python SCRIPT [ARGS]`",
            "",
            "SCRIPT is your model script ([contract.md](contract.md)); a recipe may name it instead. Or,",
            "after `--`, your own training command as it is ([your-command.md](your-command.md)). The",
            "default `max_norm` grid runs only when none of `--max-norm`, `--clip-value`, `--agc`,",
            "`--autoclip`, `--zclip` is given.",
            "",
            *_table(SWEEP),
            "",
            "## `gradclip check SCRIPT` or `gradclip check -- python SCRIPT [ARGS]`",
            "",
            "One run, for CI: unclipped, or clipped with `--max-norm M [--norm-type P]`; exit 1 on NaN/inf",
            "or divergence. A command after `--` runs with its own clipping unless `--max-norm` is given.",
            "",
            *_table(CHECK),
            "",
            "## `gradclip watch -- python SCRIPT [ARGS]`",
            "",
            "One run of your command as written, recorded like `GradMonitor`: the files of a sweep and",
            "`report.html` in `--out` ([your-command.md](your-command.md)).",
            "",
            *_table(WATCH),
            "",
            "## `gradclip report DIR`",
            "",
            "The table, the verdict, `recommendation.json` and `report.html` again from an `--out`",
            "directory ([outputs.md](outputs.md)).",
            "",
            *_table(REPORT),
            "",
            "## Recipes",
            "",
            "A recipe is a TOML file given to `--recipe` as a path, or the name of a bundled recipe",
            "(`gradclip recipes` lists them). Reading it never runs code. Every key is optional; unknown",
            "keys and values of the wrong type are refused, naming the key and what it takes; an example",
            "is in [contract.md](contract.md#recipes).",
            "",
            "| key | TOML value | option |",
            "|---|---|---|",
            "| `description` | a string | shown by `gradclip recipes` |",
            "| `script` | a string: a path relative to the recipe file | the SCRIPT argument |",
            *(f"| `{o.name}` | {o.recipe.words} | `{o.flag}` |" for o in recipe_options()),
            "",
        ]
    )


if __name__ == "__main__":
    sys.stdout.write(markdown())
