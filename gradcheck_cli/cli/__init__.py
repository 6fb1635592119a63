"""The ``gradclip`` command line: parse, validate, wire the modules together, print, exit.

Nothing here measures or decides: one module per command, ``_shell`` for exit codes and
signals, ``output`` for what is printed and written. torch and the training core are imported
inside the commands, so ``gradclip --help`` and ``--version`` answer without loading torch.
Every option is described in docs/options.md.
"""

from __future__ import annotations

import typer

from gradcheck_cli import __version__
from gradcheck_cli.cli import check, recipes, report, sweep

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


app.command(short_help="Sweep max_norm x norm_type against an unclipped run; report what is stable.")(sweep.sweep)
app.command(short_help="Re-render table, verdict and report.html from an --out dir.")(report.report)
app.command(short_help="CI gate: one run; exit 1 on NaN/inf or divergence.")(check.check)
app.command("recipes", short_help="List the bundled sweep recipes.")(recipes.recipes_command)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as done:
        from gradcheck_cli import rank_exit as ranks  # not ranks itself: it imports torch and the sweep

        code = done.code
        ranks.exit_rank(code if isinstance(code, int) else (0 if code is None else 1))
        raise


if __name__ == "__main__":
    main()
