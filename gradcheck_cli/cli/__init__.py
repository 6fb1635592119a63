"""The ``gradclip`` command line: the app, its commands and ``main``.

Nothing here measures or decides. Each command is declared here (its help, its arguments, its
options from the table in ``gradcheck_cli/options.py``) and runs in a module of its own, with
``_shell`` for exit codes and signals and ``output`` for what is printed and written. Every
option is described in docs/options.md.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from gradcheck_cli import __version__
from gradcheck_cli.cli._options import with_options
from gradcheck_cli.cli._shell import exit_on_errors
from gradcheck_cli.launch.command import looks_like_command
from gradcheck_cli.rank_exit import exit_rank

app = typer.Typer(
    name="gradclip",
    help=(
        "Does my model need gradient clipping, which max_norm and norm_type, and where does it "
        "blow up? Exit codes: 0 ok, 1 instability found (with --fail-on-*/check), 2 usage or "
        "input error, 3 your script raised, 4 internal error, 5 reports could not be written, "
        "129/130/143 stopped by SIGHUP/Ctrl-C/SIGTERM (finished runs kept), 141 stdout closed early."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"gradclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """gradclip: a training-stability diagnostic for PyTorch."""


def _run(command: str, *arguments, function: str = "run") -> None:
    """Run ``command`` from its module, which is imported only now: it loads torch and the
    training core, and ``gradclip --help`` and ``--version`` answer without them (tested). A
    code the command returns is the exit code; ``None`` is a plain finish."""
    code = getattr(importlib.import_module(f"gradcheck_cli.cli.{command}"), function)(*arguments)
    if code is not None:
        raise typer.Exit(code)


# The commands' functions are named *_command: ``gradcheck_cli.cli.sweep`` is the module that
# runs the sweep.


@app.command("sweep", short_help="Sweep max_norm x norm_type against an unclipped run; report what is stable.")
@exit_on_errors
@with_options("sweep")
def sweep_command(
    script: list[str] | None = typer.Argument(
        None,
        help=(
            "Your model script (defines build_model, batches, loss_fn; optionally build_optimizer, build_scheduler), "
            "or after -- your own training command as it is: -- python train.py ARGS."
        ),
        show_default=False,
        metavar="[SCRIPT | -- python SCRIPT ARGS...]",
    ),
    **given,
) -> None:
    """Run short training bursts unclipped and per max_norm x norm_type cell; report which clipping setting is stable.

    --clip-value, --agc, --autoclip and --zclip add cells for those rules. The default max_norm grid
    runs only when none of --max-norm, --clip-value, --agc, --autoclip, --zclip is given.

    Every run starts from identical weights, optimizer state, RNG state and batch order (per seed with
    --seeds; every cell and the control run again at each --lr). Results go to the terminal and to
    CSV files in --out, written after every finished run.

    After --, your own command runs as it is, once per run, each with the run's clipping in place of
    its own (docs/your-command.md).
    """
    if looks_like_command(script):
        _run("as_is", list(script), given, function="sweep")
    else:
        _run("sweep", Path(script[0]) if script else None, given)


@app.command("report", short_help="Re-render table, verdict and report.html from an --out dir.")
@exit_on_errors
@with_options("report")
def report_command(
    directory: Path = typer.Argument(
        ..., help="An --out directory written by gradclip sweep (or a monitor).", show_default=False
    ),
    **given,
) -> None:
    """Read the CSV files in DIRECTORY (after a resume, or from a CI artifact) and re-render the summary table, the
    verdict, recommendation.json and report.html there; spikes are found again from layers.csv (give the sweep's
    --spike-factor if it was not the default). Exit 2 when DIRECTORY is not a gradclip output."""
    _run("report", directory, given)


@app.command("check", short_help="CI gate: one run; exit 1 on NaN/inf or divergence.")
@exit_on_errors
@with_options("check")
def check_command(
    script: list[str] = typer.Argument(
        ...,
        help="Your model script, or after -- your own training command: -- python train.py ARGS.",
        show_default=False,
        metavar="SCRIPT | -- python SCRIPT ARGS...",
    ),
    **given,
) -> None:
    """CI gate: one training run; exit 0 when stable, 1 on NaN/inf or divergence (naming step and parameter).

    A command after -- runs as written (its own clipping) unless --max-norm is given."""
    if looks_like_command(script):
        _run("as_is", list(script), given, function="check")
    else:
        _run("check", Path(script[0]), given)


@app.command("watch", short_help="One run of your own command as written, recorded: gradclip watch -- python train.py")
@exit_on_errors
@with_options("watch")
def watch_command(
    command: list[str] = typer.Argument(
        ..., help="Your training command, after --: -- python train.py ARGS.", show_default=False
    ),
    **given,
) -> None:
    """Run your command once as it is (its own clipping) and record what GradMonitor records: pre-clip and
    per-layer norms, spikes, the NaN onset and first non-finite parameter, the loss, skipped AMP steps; the
    files and report.html go to --out (docs/your-command.md)."""
    _run("as_is", list(command), given, function="watch")


@app.command("recipes", short_help="List the bundled sweep recipes.")
@exit_on_errors
def recipes_command() -> None:
    """List the bundled sweep recipes (use one with: gradclip sweep --recipe NAME)."""
    _run("recipes")


def main() -> None:
    """Console-script entry point. A torchrun rank ends in ``exit_rank`` (see there)."""
    try:
        app()
    except SystemExit as done:
        code = done.code
        exit_rank(code if isinstance(code, int) else (0 if code is None else 1))
        raise


if __name__ == "__main__":
    main()
