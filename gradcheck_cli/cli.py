"""The ``gradclip`` command line: parse, validate, wire the modules together, print, exit.

Nothing here measures or decides. torch, pandas and the training core are imported inside the
commands, so ``gradclip --help`` and ``gradclip --version`` answer without loading torch.
Every known failure is a ``GradclipError`` mapped to its exit code in ``_exit_on_errors``.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from gradcheck_cli import __version__
from gradcheck_cli.errors import ExitCode, GradclipError, UserCodeError

app = typer.Typer(
    name="gradclip",
    help=(
        "Does my model need gradient clipping, which max_norm and norm_type, and where does it "
        "blow up? Exit codes: 0 ok, 1 instability found (with --fail-on-*/check), 2 usage or "
        "input error, 3 your script raised, 4 internal error, 130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    """Tables and verdicts. Piped into a file or a CI log there is no terminal width to fit, so
    the table gets 120 columns (all of them) unless COLUMNS says otherwise."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(highlight=False, width=width)


def _debug() -> bool:
    return os.environ.get("GRADCLIP_DEBUG", "") not in ("", "0")


def _exit_on_errors(command: Callable) -> Callable:
    """Map typed errors to one line on stderr plus a hint and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except GradclipError as err:
            console = _stderr_console()
            if isinstance(err, UserCodeError) and err.user_traceback:
                console.print(err.user_traceback.rstrip(), markup=False, soft_wrap=True)
            # soft_wrap: a one-line error stays one line, whatever the terminal width
            console.print(f"error: {err.message}", style="bold red", markup=False, soft_wrap=True)
            if err.hint:
                console.print(f"hint: {err.hint}", markup=False, soft_wrap=True)
            if _debug():
                traceback.print_exc()
            raise typer.Exit(int(err.exit_code)) from None
        except KeyboardInterrupt:
            _stderr_console().print("interrupted", markup=False)
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
        except Exception as err:  # a bug in gradclip, not in the user's input or script
            console = _stderr_console()
            console.print(f"internal error: {type(err).__name__}: {err}", style="bold red", markup=False, soft_wrap=True)
            if _debug():
                traceback.print_exc()
            else:
                console.print("hint: set GRADCLIP_DEBUG=1 to see the traceback, and report it", markup=False)
            raise typer.Exit(int(ExitCode.INTERNAL)) from None

    return wrapper


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


# --- option declarations shared by sweep and check -------------------------------------------
# Defaults are None so that a recipe's value applies unless the option is given explicitly.

_STEPS = typer.Option(None, "--steps", help="Optimizer steps per run (default 100).")
_SEED = typer.Option(None, "--seed", help="Seed for weights, data order and RNG (default 0).")
_AMP = typer.Option(
    None, "--amp", help="Mixed precision: off (default), fp16 (autocast + gradient scaler) or bf16 (autocast)."
)
_ACCUMULATE = typer.Option(
    None, "--accumulate", help="Micro-batches per optimizer step (gradient accumulation, default 1)."
)
_AMP_INIT_SCALE = typer.Option(
    None, "--amp-init-scale", help="Initial scale of the fp16 gradient scaler (default 65536, torch's)."
)
_DIVERGENCE = typer.Option(
    None,
    "--divergence-factor",
    help="A run diverged when a finite loss exceeds this x the first step's loss (default 10; inf turns the check off).",
)
_LAYER_DEPTH = typer.Option(
    None,
    "--layer-depth",
    help="Per-layer norms grouped by module depth: auto (default: per parameter up to 64 tensors, else the deepest depth with at most 64 groups), param, or N.",
)
_SPIKE_FACTOR = typer.Option(
    None, "--spike-factor", help="A layer's gradient spikes when its norm exceeds this x its running median (default 10)."
)
_DEVICE = typer.Option(None, "--device", help="cpu (default) or cuda.")
_JUNIT = typer.Option(None, "--junit", help="Also write a JUnit XML report to this file (one test case per run).")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON on stdout instead of the table.")


def _resolve_config(
    script: Optional[Path],
    recipe: Optional[str],
    overrides: dict,
):
    """Merge defaults < recipe < command line into a validated ``SweepConfig`` plus fail flags."""
    from gradcheck_cli.config import SweepConfig
    from gradcheck_cli.recipes import load_recipe

    values: dict = load_recipe(recipe) if recipe else {}
    if overrides.get("seed") is not None or overrides.get("seeds") is not None:
        # --seed/--seeds on the command line replace the recipe's seed and seeds alike
        values.pop("seed", None)
        values.pop("seeds", None)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if script is not None:
        values["script"] = script
    fail_on_nan = bool(values.pop("fail_on_nan", False))
    fail_on_divergence = bool(values.pop("fail_on_divergence", False))
    return SweepConfig.from_values(values), fail_on_nan, fail_on_divergence


def _run_progress():
    """Rich progress bars on stderr: one for the runs, one for the steps of the current run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr_console(),
        transient=False,
    )


def _user_output_to_stderr(active: bool):
    """With --json, stdout carries only the JSON: whatever the user's script prints goes to stderr."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr) if active else contextlib.nullcontext()


def _exit_code(results, fail_on_nan: bool, fail_on_divergence: bool) -> int:
    from gradcheck_cli.results import DIVERGED, ERROR, NON_FINITE

    statuses = {r.status for r in results}
    if ERROR in statuses:
        return int(ExitCode.USER_CODE)
    if (fail_on_nan and NON_FINITE in statuses) or (fail_on_divergence and DIVERGED in statuses):
        return int(ExitCode.INSTABILITY)
    return int(ExitCode.OK)


def _resume_command(argv: list[str]) -> str:
    import shlex

    args = [a for a in argv if a != "--resume"]
    return shlex.join(["gradclip", *args, "--resume"])


@app.command(short_help="Sweep max_norm x norm_type against an unclipped run; report what is stable.")
@_exit_on_errors
def sweep(
    script: Optional[Path] = typer.Argument(
        None, help="Your model script (defines build_model, batches, loss_fn; optionally build_optimizer, build_scheduler).", show_default=False
    ),
    max_norm: Optional[str] = typer.Option(None, "--max-norm", help="Comma-separated positive max_norm values (default 0.1,1,10)."),
    norm_type: Optional[str] = typer.Option(None, "--norm-type", help="Comma-separated norm types, numbers or inf (default 2,inf)."),
    steps: Optional[int] = _STEPS,
    seed: Optional[int] = _SEED,
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Comma-separated seeds: every run repeated per seed (e.g. 0,1,2); --seed N is the one-seed form."
    ),
    lr: Optional[str] = typer.Option(
        None,
        "--lr",
        help=(
            "Comma-separated learning rates: every run at each lr (e.g. 0.1,1,20). Without it the default SGD uses "
            "0.01 and a script's build_optimizer keeps its own lr; with it, every param group's lr is set to each value."
        ),
    ),
    divergence_factor: Optional[float] = _DIVERGENCE,
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
    accumulate: Optional[int] = _ACCUMULATE,
    amp_init_scale: Optional[float] = _AMP_INIT_SCALE,
    out: Path = typer.Option(Path("gradclip-report"), "--out", help="Directory for summary.csv, steps.csv, histograms.csv."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A recipe TOML file or bundled recipe name; options given here override it."),
    fail_on_nan: bool = typer.Option(False, "--fail-on-nan", help="Exit 1 if any run went NaN/inf."),
    fail_on_divergence: bool = typer.Option(False, "--fail-on-divergence", help="Exit 1 if any run diverged."),
    resume: bool = typer.Option(False, "--resume", help="Skip runs already finished in --out by a sweep with the same options."),
    junit: Optional[Path] = _JUNIT,
    json_out: bool = _JSON,
    layer_depth: Optional[str] = _LAYER_DEPTH,
    spike_factor: Optional[float] = _SPIKE_FACTOR,
    refine: Optional[int] = typer.Option(
        None, "--refine", help="Up to this many extra runs per norm type, bisecting the stability boundary (default 0)."
    ),
) -> None:
    """Run short training bursts unclipped and per max_norm x norm_type cell; report which clipping setting is stable.

    Every run starts from identical weights, optimizer state, RNG state and batch order (per seed with
    --seeds; every cell and the control run again at each --lr). Results go to the terminal and to
    CSV files in --out, written after every finished run.
    """
    config, recipe_fail_nan, recipe_fail_div = _resolve_config(
        script,
        recipe,
        dict(
            max_norms=max_norm,
            norm_types=norm_type,
            steps=steps,
            seed=seed,
            seeds=seeds,
            lr=lr,
            divergence_factor=divergence_factor,
            device=device,
            amp=amp,
            accumulate=accumulate,
            amp_init_scale=amp_init_scale,
            layer_depth=layer_depth,
            spike_factor=spike_factor,
            refine=refine,
        ),
    )
    fail_on_nan = fail_on_nan or recipe_fail_nan
    fail_on_divergence = fail_on_divergence or recipe_fail_div

    from gradcheck_cli.report import files

    out_dir = files.prepare_out_dir(out)
    fingerprint = config.fingerprint()
    finished = files.load_finished(out_dir, fingerprint) if resume else {}

    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.sweep import run_sweep

    with _user_output_to_stderr(json_out):
        experiment = load_experiment(config.script)
    cells = config.cells()
    err = _stderr_console()
    if finished:
        of = f"{len(cells)}" if not config.refine else f"up to {len(cells) + config.refine * len(config.norm_types)}"
        err.print(f"resuming: {len(finished)} of {of} runs already finished in {out_dir}", markup=False)

    done: list = list(finished.values())
    with _run_progress() as progress:
        most = len(cells) + config.refine * len(config.norm_types)
        runs_task = progress.add_task("runs", total=most, completed=len(finished))
        steps_task = progress.add_task("steps", total=config.steps)

        def on_run_start(index, total, cell):
            progress.update(steps_task, description=f"{cell.run}", completed=0)

        def on_step(step):
            progress.update(steps_task, completed=step)

        def on_run_done(index, total, result):
            done.append(result)
            _save(out_dir, fingerprint, _in_cell_order(cells, done))
            progress.advance(runs_task)

        try:
            with _user_output_to_stderr(json_out):
                results = run_sweep(
                    config, experiment, skip=finished, on_run_start=on_run_start, on_run_done=on_run_done, on_step=on_step
                )
                if config.refine:
                    from gradcheck_cli.refine import run_refinement

                    results = run_refinement(
                        config,
                        experiment,
                        results,
                        skip=finished,
                        on_run_start=lambda cell: on_run_start(0, 0, cell),
                        on_run_done=lambda result: on_run_done(0, 0, result),
                        on_step=on_step,
                    )
                    progress.update(runs_task, total=len(results), completed=len(results))
        except KeyboardInterrupt:
            progress.stop()
            err.print(
                f"interrupted: {len(done)} of {len(cells)} runs finished and saved in {out_dir}/\n"
                f"resume with: {_resume_command(sys.argv[1:])}",
                markup=False,
            )
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    _save(out_dir, fingerprint, results)
    recommendation = _write_derived(out_dir, results, title=config.script.name)
    _print_results(results, json_out, recommendation)
    if junit is not None:
        from gradcheck_cli.report.junit import write_junit

        write_junit(junit, results, suite_name=f"gradclip.{config.script.stem}")
    err.print(
        f"reports written to {out_dir}/ (report.html, summary.csv, steps.csv, layers.csv, recommendation.json, ...)",
        markup=False,
    )
    raise typer.Exit(_exit_code(results, fail_on_nan, fail_on_divergence))


def _in_cell_order(cells: list, results: list) -> list:
    """The grid's runs in cell order, then the others (refined runs) in the order they ran."""
    by_run = {r.run: r for r in results}
    grid = {c.run for c in cells}
    return [by_run[c.run] for c in cells if c.run in by_run] + [r for r in results if r.run not in grid]


def _save(out_dir: Path, fingerprint: dict, results: list) -> None:
    from gradcheck_cli.report import files
    from gradcheck_cli.results import log_bins_by_norm_type

    files.write_reports(out_dir, results, log_bins_by_norm_type(results))
    files.write_manifest(out_dir, fingerprint, [r.run for r in results])


def _write_derived(out_dir: Path, results: list, title: str):
    """``recommendation.json`` and ``report.html``, both derived from the results alone."""
    from gradcheck_cli.analysis import recommend
    from gradcheck_cli.report import files
    from gradcheck_cli.report.html import write_html

    recommendation = recommend(results)
    files.write_recommendation(out_dir, recommendation.as_json())
    write_html(Path(out_dir) / files.HTML_FILE, results, recommendation, title=title)
    return recommendation


def _print_results(results: list, json_out: bool, recommendation=None) -> None:
    from gradcheck_cli.report.terminal import error_panels, stability_map, summary_table, verdict_line
    from gradcheck_cli.results import log_bins_by_norm_type

    err = _stderr_console()
    for panel in error_panels(results):
        err.print(panel)
    lines = [verdict_line(results)] + ([recommendation.line()] if recommendation is not None else [])
    if json_out:
        from gradcheck_cli.report.jsonout import summary_json

        sys.stdout.write(summary_json(results) + "\n")
        for line in lines:
            err.print(line, markup=False, soft_wrap=True)
        return
    out = _stdout_console()
    out.print(summary_table(results, log_bins_by_norm_type(results)))
    grid = stability_map(results)
    if grid is not None:
        out.print(grid)
    for line in lines:
        out.print(line, markup=False, soft_wrap=True)


@app.command(short_help="Re-render table, verdict and report.html from an --out dir.")
@_exit_on_errors
def report(
    directory: Path = typer.Argument(..., help="An --out directory written by gradclip sweep (or a monitor).", show_default=False),
    json_out: bool = _JSON,
    spike_factor: Optional[float] = _SPIKE_FACTOR,
) -> None:
    """Read the CSV files in DIRECTORY (after a resume, or from a CI artifact) and re-render the summary table, the
    verdict, recommendation.json and report.html there; spikes are found again from layers.csv (give the sweep's
    --spike-factor if it was not the default). Exit 2 when DIRECTORY is not a gradclip output."""
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.report import files

    if not directory.is_dir():
        raise UsageError(f"{str(directory)!r} is not a directory", "give the --out directory of a gradclip sweep, e.g. gradclip report gradclip-report")
    if not (directory / files.SUMMARY_FILE).is_file():
        raise UsageError(
            f"{str(directory)!r} is not a gradclip output: it has no {files.SUMMARY_FILE}",
            "give the --out directory of a gradclip sweep, e.g. gradclip report gradclip-report",
        )
    from gradcheck_cli.analysis import DEFAULT_SPIKE_FACTOR, annotate_spike
    from gradcheck_cli.config import check_spike_factor

    factor = check_spike_factor(spike_factor) if spike_factor is not None else DEFAULT_SPIKE_FACTOR
    results = files.read_results(directory)
    if not results:
        raise UsageError(f"{directory / files.SUMMARY_FILE} holds no runs", "run gradclip sweep (or --resume it) first")
    for r in results:  # the spike is re-derived from layers.csv (a monitor does not judge it)
        if any(s.layers for s in r.steps):
            annotate_spike(r, factor)
    try:
        recommendation = _write_derived(directory, results, title=directory.resolve().name)
    except OSError as exc:
        raise UsageError(f"cannot write the report into {str(directory)!r}: {exc.strerror or exc}", "copy the directory somewhere writable first") from None
    _print_results(results, json_out, recommendation)
    _stderr_console().print(f"report written to {directory / files.HTML_FILE}", markup=False)


@app.command(short_help="CI gate: one run; exit 1 on NaN/inf or divergence.")
@_exit_on_errors
def check(
    script: Path = typer.Argument(..., help="Your model script.", show_default=False),
    max_norm: Optional[float] = typer.Option(None, "--max-norm", help="Clip at this max_norm; without it the run is unclipped."),
    norm_type: str = typer.Option("2", "--norm-type", help="Norm type for clipping: a number or inf (default 2)."),
    steps: Optional[int] = _STEPS,
    seed: Optional[int] = _SEED,
    lr: Optional[float] = typer.Option(
        None, "--lr", help="Learning rate: of the default SGD (default 0.01), or set on every param group of the script's optimizer."
    ),
    divergence_factor: Optional[float] = _DIVERGENCE,
    device: Optional[str] = _DEVICE,
    amp: Optional[str] = _AMP,
    accumulate: Optional[int] = _ACCUMULATE,
    amp_init_scale: Optional[float] = _AMP_INIT_SCALE,
    junit: Optional[Path] = _JUNIT,
    json_out: bool = _JSON,
) -> None:
    """CI gate: one training run; exit 0 when stable, 1 on NaN/inf or divergence (naming step and parameter)."""
    from gradcheck_cli import config as cfg
    from gradcheck_cli.results import Cell

    norm_types = cfg.parse_norm_types(norm_type)
    if len(norm_types) != 1:
        from gradcheck_cli.errors import UsageError

        raise UsageError(f"--norm-type {norm_type!r} gives several values; check runs one configuration", "use gradclip sweep for a grid")
    max_norms = cfg.parse_max_norms([max_norm]) if max_norm is not None else cfg.DEFAULT_MAX_NORMS
    config, _, _ = _resolve_config(
        script,
        None,
        dict(max_norms=max_norms, norm_types=norm_types, steps=steps, seed=seed, lr=lr,
             divergence_factor=divergence_factor, device=device, amp=amp, accumulate=accumulate,
             amp_init_scale=amp_init_scale),
    )
    cell = Cell(max_norms[0], norm_types[0]) if max_norm is not None else Cell(None, 2.0)

    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.sweep import run_sweep

    with _user_output_to_stderr(json_out):
        experiment = load_experiment(config.script)
    with _run_progress() as progress, _user_output_to_stderr(json_out):
        task = progress.add_task(cell.run, total=config.steps)
        results = run_sweep(
            config, experiment, cells=[cell], on_step=lambda step: progress.update(task, completed=step)
        )
    result = results[0]

    from gradcheck_cli.report.terminal import check_line

    if junit is not None:
        from gradcheck_cli.report.junit import write_junit

        write_junit(junit, results, suite_name=f"gradclip.{config.script.stem}")
    if json_out:
        from gradcheck_cli.report.jsonout import summary_json

        sys.stdout.write(summary_json(results) + "\n")
    else:
        from gradcheck_cli.report.terminal import error_panels

        for panel in error_panels(results):
            _stderr_console().print(panel)
        _stdout_console().print(check_line(result), markup=False, soft_wrap=True)
    raise typer.Exit(_exit_code(results, fail_on_nan=True, fail_on_divergence=True))


@app.command("recipes", short_help="List the bundled sweep recipes.")
@_exit_on_errors
def recipes_command() -> None:
    """List the bundled sweep recipes (use one with: gradclip sweep --recipe NAME)."""
    from rich.table import Table

    from gradcheck_cli.recipes import list_bundled_recipes

    table = Table(title="bundled recipes")
    table.add_column("name")
    table.add_column("description")
    table.add_column("file")
    for name, description, path in list_bundled_recipes():
        table.add_row(name, description, str(path))
    _stdout_console().print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
