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
from collections.abc import Callable
from pathlib import Path

import typer

from gradcheck_cli import __version__
from gradcheck_cli.errors import ExitCode, GradclipError, Stopped, UserCodeError

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


def _stderr_console():
    """Progress, hints and errors. When stderr is not a terminal (a CI log, a file) nothing is
    wrapped at 80 columns: every message stays on its one line, so it can be copied."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


# --- stdout closed early (``gradclip sweep s.py | head -1``) -----------------------------------

_stdout_state = {"broken": False}


def _silence_stdout() -> None:
    """Point stdout at the null device: nothing more to write, and no second ``BrokenPipeError``
    when Python flushes stdout at exit."""
    _stdout_state["broken"] = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner)
        pass


def _to_stdout(write: Callable[[], None]) -> None:
    """Run ``write``; if the reader of stdout has gone away, stop writing there and carry on
    (report files and the JUnit file are still written)."""
    if _stdout_state["broken"]:
        return
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _final_code(code: int) -> int:
    """A broken stdout turns an otherwise clean exit into 141 (as a shell reports SIGPIPE);
    a verdict or an error code is kept."""
    if _stdout_state["broken"] and code == int(ExitCode.OK):
        return int(ExitCode.BROKEN_PIPE)
    return code


# --- SIGTERM and SIGHUP stop like Ctrl-C ------------------------------------------------------


def _stop_signals() -> dict:
    import signal

    wanted = {"SIGTERM": ExitCode.TERMINATED, "SIGHUP": ExitCode.HANGUP}
    return {getattr(signal, name): code for name, code in wanted.items() if hasattr(signal, name)}


def _install_stop_handlers() -> dict:
    """SIGTERM (CI cancellation, ``kill``) and SIGHUP (terminal closed) raise ``Stopped``, a
    ``KeyboardInterrupt``: finished runs are kept and the resume command printed, as for
    Ctrl-C. Returns the previous handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum, code in _stop_signals().items():

        def handler(received, frame, code=code):
            raise Stopped(received, code)

        try:
            if signal.getsignal(signum) is signal.SIG_IGN:  # e.g. under nohup: the user asked to ignore it
                continue
            previous[signum] = signal.signal(signum, handler)
        except (OSError, ValueError):
            pass
    return previous


def _restore_handlers(previous: dict) -> None:
    import signal

    for signum, handler in previous.items():
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError, TypeError):
            pass


def _stop_code(exc: KeyboardInterrupt) -> int:
    return int(exc.exit_code) if isinstance(exc, Stopped) else int(ExitCode.INTERRUPTED)


def _stop_word(exc: KeyboardInterrupt) -> str:
    if isinstance(exc, Stopped):
        import signal

        return f"stopped by {signal.Signals(exc.signum).name}"
    return "interrupted"


def _stdout_console():
    """Tables and verdicts. Piped into a file or a CI log there is no terminal width to fit, so
    the table gets 120 columns (all of them) unless COLUMNS says otherwise."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich would raise SystemExit(1), and 1 means "instability found": stop writing
            # to stdout instead and let the command finish (see _final_code)
            self.quiet = True
            _silence_stdout()

    return StdoutConsole(highlight=False, width=width)


def _debug() -> bool:
    return os.environ.get("GRADCLIP_DEBUG", "") not in ("", "0")


def _exit_on_errors(command: Callable) -> Callable:
    """Map typed errors to one line on stderr plus a hint and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _stdout_state["broken"] = False
        previous = _install_stop_handlers()
        try:
            return command(*args, **kwargs)
        except typer.Exit as done:
            raise typer.Exit(_final_code(done.exit_code)) from None
        except typer.Abort:
            raise
        except BrokenPipeError:  # stdout closed while writing outside _to_stdout
            _silence_stdout()
            raise typer.Exit(int(ExitCode.BROKEN_PIPE)) from None
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
            raise typer.Exit(_final_code(int(err.exit_code))) from None
        except KeyboardInterrupt as exc:
            _stderr_console().print(_stop_word(exc), markup=False)
            raise typer.Exit(_stop_code(exc)) from None
        except Exception as err:  # a bug in gradclip, not in the user's input or script
            console = _stderr_console()
            console.print(
                f"internal error: {type(err).__name__}: {err}", style="bold red", markup=False, soft_wrap=True
            )
            if _debug():
                traceback.print_exc()
                if getattr(err, "worker_traceback", None):  # parallel.WorkerError
                    sys.stderr.write(err.worker_traceback)
            else:
                console.print("hint: set GRADCLIP_DEBUG=1 to see the traceback, and report it", markup=False)
            raise typer.Exit(int(ExitCode.INTERNAL)) from None
        finally:
            _restore_handlers(previous)

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
    None,
    "--spike-factor",
    help="A layer's gradient spikes when its norm exceeds this x its running median (default 10).",
)
_DEVICE = typer.Option(None, "--device", help="cpu (default), cuda or cuda:N.")
_JUNIT = typer.Option(None, "--junit", help="Also write a JUnit XML report to this file (one test case per run).")
_JSON = typer.Option(False, "--json", help="Print the summary as JSON on stdout instead of the table.")


def _resolve_config(
    script: Path | None,
    recipe: str | None,
    overrides: dict,
):
    """Merge defaults < recipe < command line into a validated ``SweepConfig`` plus fail flags."""
    from gradcheck_cli.config import SweepConfig
    from gradcheck_cli.recipes import load_recipe

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
        _stderr_console().print(f"note: {note}", markup=False)
    return config, fail_on_nan, fail_on_divergence


def _absolute(path: Path | None) -> Path | None:
    """Paths gradclip owns are fixed before the script runs: an ``os.chdir`` in the script must
    not move the reports."""
    return None if path is None else Path(os.path.abspath(path))


def _prepare_junit(path: Path | None) -> Path | None:
    """Check, before the first run, that the JUnit file can be written: its parent directory
    is created and a probe file created and removed there."""
    if path is None:
        return None
    from gradcheck_cli.errors import UsageError

    path = _absolute(path)
    fix = "choose a --junit path you can write to"
    if path.is_dir():
        raise UsageError(f"--junit {str(path)!r} is a directory", "give a file name, e.g. --junit gradclip-junit.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{os.getpid()}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write --junit {str(path)!r}: {exc.strerror or exc}", fix) from None
    return path


def _write_junit(junit: Path | None, results: list, suite_name: str, code: int) -> int:
    """Write the JUnit file after the verdict is out; a failure is one line on stderr and never
    hides the verdict: its exit code stays, and only a clean exit becomes 5."""
    if junit is None:
        return code
    from gradcheck_cli.report.junit import write_junit

    try:
        write_junit(junit, results, suite_name=suite_name)
    except GradclipError as err:
        err_console = _stderr_console()
        err_console.print(f"error: {err.message}", style="bold red", markup=False, soft_wrap=True)
        if err.hint:
            err_console.print(f"hint: {err.hint}", markup=False, soft_wrap=True)
        return code if code != int(ExitCode.OK) else int(ExitCode.REPORTS_NOT_WRITTEN)
    return code


def _fingerprint(config, threads: int | None = None) -> dict:
    """The sweep's options plus what else decides its numbers on CPU: the script's content,
    torch's version and the torch thread count the runs use (``threads``, a worker's; else this
    process's, read before the script runs)."""
    import torch

    fingerprint = config.fingerprint()
    fingerprint["torch_version"] = torch.__version__
    fingerprint["torch_threads"] = threads if threads is not None else torch.get_num_threads()
    return fingerprint


def _run_progress(enabled: bool = True):
    """Rich progress bars on stderr: one for the runs, one for the steps of each run in progress
    (``enabled=False``: drawn nowhere, for ranks other than 0 under torchrun)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr_console(),
        transient=False,
        disable=not enabled,
    )


def _user_output_to_stderr(active: bool):
    """With --json, stdout carries only the JSON: whatever the user's script prints goes to stderr."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr) if active else contextlib.nullcontext()


def _exit_code(results, fail_on_nan: bool, fail_on_divergence: bool) -> int:
    from gradcheck_cli.results import CRASHED, DIVERGED, ERROR, NON_FINITE

    statuses = {r.status for r in results}
    if ERROR in statuses or CRASHED in statuses:  # a run that killed its worker: the script's doing
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
    script: Path | None = typer.Argument(
        None,
        help="Your model script (defines build_model, batches, loss_fn; optionally build_optimizer, build_scheduler).",
        show_default=False,
    ),
    max_norm: str | None = typer.Option(
        None, "--max-norm", help="Comma-separated positive max_norm values (default 0.1,1,10)."
    ),
    norm_type: str | None = typer.Option(
        None, "--norm-type", help="Comma-separated norm types, numbers or inf (default 2,inf)."
    ),
    clip_value: str | None = typer.Option(
        None, "--clip-value", help="Also run value clipping (clip_grad_value_) at these comma-separated values."
    ),
    agc: str | None = typer.Option(
        None,
        "--agc",
        help="Also run adaptive gradient clipping (AGC) with these comma-separated clip factors, e.g. 0.01.",
    ),
    agc_exclude: str | None = typer.Option(
        None,
        "--agc-exclude",
        help="Parameters AGC leaves alone: comma-separated names, module names or globs (default none).",
    ),
    autoclip: str | None = typer.Option(
        None, "--autoclip", help="Also run AutoClip at these comma-separated percentiles (0-100), e.g. 10."
    ),
    zclip: str | None = typer.Option(
        None, "--zclip", help="Also run ZClip with these comma-separated z thresholds, e.g. 2.5."
    ),
    zclip_max_norm: str | None = typer.Option(
        None, "--zclip-max-norm", help="ZClip's cap on its threshold, max_grad_norm (default 1; none: no cap)."
    ),
    steps: int | None = _STEPS,
    seed: int | None = _SEED,
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds: every run repeated per seed (e.g. 0,1,2); --seed N is the one-seed form.",
    ),
    lr: str | None = typer.Option(
        None,
        "--lr",
        help=(
            "Comma-separated learning rates: every run at each lr (e.g. 0.1,1,20). Without it the default SGD uses "
            "0.01 and a script's build_optimizer keeps its own lr; with it, every param group's lr is set to each value."
        ),
    ),
    divergence_factor: float | None = _DIVERGENCE,
    device: str | None = _DEVICE,
    amp: str | None = _AMP,
    accumulate: int | None = _ACCUMULATE,
    amp_init_scale: float | None = _AMP_INIT_SCALE,
    out: Path = typer.Option(
        Path("gradclip-report"), "--out", help="Directory for summary.csv, steps.csv, histograms.csv."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", help="A recipe TOML file or bundled recipe name; options given here override it."
    ),
    fail_on_nan: bool = typer.Option(False, "--fail-on-nan", help="Exit 1 if any run went NaN/inf."),
    fail_on_divergence: bool = typer.Option(False, "--fail-on-divergence", help="Exit 1 if any run diverged."),
    resume: bool = typer.Option(
        False, "--resume", help="Skip runs already finished in --out by a sweep with the same options."
    ),
    junit: Path | None = _JUNIT,
    json_out: bool = _JSON,
    layer_depth: str | None = _LAYER_DEPTH,
    spike_factor: float | None = _SPIKE_FACTOR,
    refine: int | None = typer.Option(
        None,
        "--refine",
        help="Up to this many extra max_norms per norm type (and lr), each run in every seed, bisecting the "
        "stability boundary (default 0).",
    ),
    jobs: int = typer.Option(
        1,
        "--jobs",
        help="Runs at once, each in its own worker process (default 1; 0: every run in this process, no isolation).",
    ),
    threads_per_job: int | None = typer.Option(
        None, "--threads-per-job", help="torch threads per worker (default: max(1, cores // jobs))."
    ),
    distributed: str = typer.Option(
        "cells",
        "--distributed",
        help="Under torchrun: cells (ranks share out the runs) or model (every rank runs every run on a sharded model).",
    ),
) -> None:
    """Run short training bursts unclipped and per max_norm x norm_type cell; report which clipping setting is stable.

    --clip-value, --agc, --autoclip and --zclip add cells for those rules. The default max_norm grid
    runs only when none of --max-norm, --clip-value, --agc, --autoclip, --zclip is given.

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
            clip_values=clip_value,
            agc_clip_factors=agc,
            agc_exclude=agc_exclude,
            autoclip_percentiles=autoclip,
            zclip_z_thresholds=zclip,
            zclip_max_norm=zclip_max_norm,
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
    _check_jobs(jobs, threads_per_job, distributed)

    from gradcheck_cli import ranks

    group = ranks.from_environment(distributed, config.device)
    if group is None:
        code = _sweep_here(
            config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, None
        )
    else:
        with group:
            code = _sweep_here(
                config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, group
            )
    raise typer.Exit(code)


def _check_jobs(jobs: int, threads_per_job: int | None, distributed: str) -> None:
    from gradcheck_cli.errors import UsageError

    if jobs < 0:
        raise UsageError(
            f"--jobs {jobs} must be 0 or more",
            "e.g. --jobs 2 runs two at once; --jobs 0 runs every run in this process",
        )
    if threads_per_job is not None and threads_per_job < 1:
        raise UsageError(f"--threads-per-job {threads_per_job} must be at least 1", "e.g. --threads-per-job 1")
    if distributed not in ("cells", "model"):
        raise UsageError(
            f"--distributed {distributed!r} is not a mode", "use --distributed cells or --distributed model"
        )


def _sweep_here(
    config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, group
) -> int:
    """The sweep in this process; under torchrun (``group``) every rank runs it, and rank 0
    alone reads and writes ``--out`` and prints."""
    import contextlib
    import dataclasses

    from gradcheck_cli.report import files

    lead = group is None or group.rank == 0
    shown_out = out
    with contextlib.ExitStack() as stack:
        if lead:
            out_dir = files.prepare_out_dir(_absolute(out))
            junit = _prepare_junit(junit)
            stack.enter_context(files.OutDirLock(out_dir))
        else:
            out_dir = _absolute(out)
        executor = stack.enter_context(_executor(jobs, threads_per_job, group))
        # the thread count the runs use: each worker's, or this process's for --jobs 0
        fingerprint = _fingerprint(config, getattr(executor, "threads", None))
        finished = files.load_finished(out_dir, fingerprint) if resume and lead else {}
        if group is not None:
            finished = group.broadcast(finished)  # every rank skips the same runs
        if hasattr(executor, "start"):  # the workers start while the script loads here
            executor.start(
                config.script.resolve(), config if group is None else dataclasses.replace(config, device=group.device)
            )
        return _run_sweep_command(
            config,
            finished,
            fingerprint,
            out_dir,
            shown_out,
            junit,
            json_out,
            fail_on_nan,
            fail_on_divergence,
            executor,
            group,
            stack,
        )


def _executor(jobs: int, threads_per_job: int | None, group):
    """Where the runs execute: ``--jobs 0`` in this process; otherwise in supervised worker
    processes (``parallel.WorkerPool``). Under torchrun in model mode every rank runs in its
    own process (the process group cannot span workers)."""
    import contextlib

    from gradcheck_cli.sweep import InProcess

    if jobs == 0 or (group is not None and not group.cells):
        return contextlib.nullcontext(InProcess())
    from gradcheck_cli.parallel import WorkerPool

    return WorkerPool(jobs, threads_per_job)


def _run_sweep_command(
    config,
    finished,
    fingerprint,
    out_dir,
    shown_out,
    junit,
    json_out,
    fail_on_nan,
    fail_on_divergence,
    executor,
    group,
    stack,
) -> int:
    from gradcheck_cli.errors import ReportWriteError
    from gradcheck_cli.guard import guarded
    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.report import files
    from gradcheck_cli.sweep import run_sweep

    lead = group is None or group.rank == 0
    cells = config.cells()
    writer = files.ReportWriter(out_dir, fingerprint, [c.run for c in cells], finished.values()) if lead else None
    err = _stderr_console()
    with guarded():
        with _user_output_to_stderr(json_out):
            experiment = load_experiment(config.script)
        # refined runs come after the grid: per lr and norm type, each in every seed
        axes = len({c.lr for c in cells}) * len({c.seed for c in cells})
        most = len(cells) + config.refine * len(config.norm_types) * axes
        if finished and lead:
            of = f"{len(cells)}" if not config.refine else f"up to {most}"
            err.print(f"resuming: {len(finished)} of {of} runs already finished in {shown_out}", markup=False)

        with _run_progress(enabled=lead) as progress:
            runs_task = progress.add_task("runs", total=most, completed=len(finished))
            step_tasks: dict = {}  # one steps bar per run in progress

            def on_run_start(index, total, cell):
                step_tasks[index] = progress.add_task(cell.run, total=config.steps)

            def on_run_step(index, step):
                if index in step_tasks:
                    progress.update(step_tasks[index], completed=step)

            unsaved: list = []

            def on_run_done(index, total, result):
                if writer is not None:
                    try:
                        writer.add(result)
                    except ReportWriteError:
                        unsaved.append(result)
                        raise
                if index in step_tasks:
                    progress.remove_task(step_tasks.pop(index))
                progress.advance(runs_task)

            try:
                with _user_output_to_stderr(json_out):
                    run = run_sweep if group is None else group.run_sweep
                    results = run(
                        config,
                        experiment,
                        skip=finished,
                        on_run_start=on_run_start,
                        on_run_done=on_run_done,
                        on_run_step=on_run_step,
                        executor=executor,
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
                            on_step=lambda step: on_run_step(0, step),
                        )
                        progress.update(runs_task, total=len(results), completed=len(results))
                if writer is None:
                    return _exit_code(results, fail_on_nan, fail_on_divergence)
                writer.flush()
            except KeyboardInterrupt as exc:
                stack.close()  # stop the workers before saying anything
                progress.stop()
                err.print(
                    f"{_stop_word(exc)}: {len(writer.results)} of {len(cells)} runs finished and saved in {shown_out}/",
                    markup=False,
                )
                # one line, whatever the terminal's width: it is copied from CI logs
                err.print(f"resume with: {_resume_command(sys.argv[1:])}", markup=False, soft_wrap=True)
                return _stop_code(exc)
            except ReportWriteError as failure:
                progress.stop()
                saved = writer.results
                _print_results(_in_cell_order(cells, saved + unsaved), json_out)
                err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
                err.print(
                    f"stopped after {len(saved) + len(unsaved)} of {len(cells)} runs, {len(saved)} of them saved in {shown_out}/",
                    markup=False,
                    soft_wrap=True,
                )
                err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
                return int(ExitCode.REPORTS_NOT_WRITTEN)

    try:
        recommendation = _write_derived(out_dir, results, title=config.script.name)
    except OSError as exc:
        from gradcheck_cli.report.files import _write_error

        failure = _write_error(Path(out_dir) / "report.html", exc)
        _print_results(results, json_out)
        err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
        err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
        return int(ExitCode.REPORTS_NOT_WRITTEN)
    _print_results(results, json_out, recommendation)
    code = _exit_code(results, fail_on_nan, fail_on_divergence)
    code = _write_junit(junit, results, f"gradclip.{config.script.stem}", code)
    err.print(
        f"reports written to {shown_out}/ (report.html, summary.csv, steps.csv, layers.csv, recommendation.json, ...)",
        markup=False,
    )
    return code


def _in_cell_order(cells: list, results: list) -> list:
    """The grid's runs in cell order, then the others (refined runs) in the order they ran."""
    by_run = {r.run: r for r in results}
    grid = {c.run for c in cells}
    return [by_run[c.run] for c in cells if c.run in by_run] + [r for r in results if r.run not in grid]


def _print_errors(results: list) -> None:
    """The errored runs' tracebacks on stderr: in panels on a terminal, as plain unwrapped text
    otherwise (CI logs)."""
    from gradcheck_cli.report.terminal import error_blocks, error_panels

    err = _stderr_console()
    if err.is_terminal:
        for panel in error_panels(results):
            err.print(panel)
        return
    for title, body in error_blocks(results):
        err.print(f"--- {title} ---\n{body}", markup=False, soft_wrap=True)


def _write_derived(out_dir: Path, results: list, title: str):
    """``recommendation.json`` and ``report.html``, both derived from the results alone."""
    from gradcheck_cli.recommend import recommend
    from gradcheck_cli.report import files
    from gradcheck_cli.report.html import write_html

    recommendation = recommend(results)
    files.write_recommendation(out_dir, recommendation.as_json())
    write_html(Path(out_dir) / files.HTML_FILE, results, recommendation, title=title)
    return recommendation


def _print_results(results: list, json_out: bool, recommendation=None) -> None:
    from gradcheck_cli.report.terminal import stability_map, summary_table, verdict_line, warning_lines
    from gradcheck_cli.results import log_bins_by_norm_type

    err = _stderr_console()
    _print_errors(results)
    lines = [verdict_line(results)] + ([recommendation.line()] if recommendation is not None else [])
    if json_out:
        from gradcheck_cli.report.jsonout import summary_json

        _to_stdout(lambda: sys.stdout.write(summary_json(results) + "\n"))
        for line in warning_lines(results) + lines:
            err.print(line, markup=False, soft_wrap=True)
        return
    out = _stdout_console()

    def write() -> None:
        out.print(summary_table(results, log_bins_by_norm_type(results)))
        grid = stability_map(results)
        if grid is not None:
            out.print(grid)
        for line in warning_lines(results) + lines:  # the note under the table, then the verdict
            out.print(line, markup=False, soft_wrap=True)

    _to_stdout(write)


@app.command(short_help="Re-render table, verdict and report.html from an --out dir.")
@_exit_on_errors
def report(
    directory: Path = typer.Argument(
        ..., help="An --out directory written by gradclip sweep (or a monitor).", show_default=False
    ),
    json_out: bool = _JSON,
    spike_factor: float | None = _SPIKE_FACTOR,
) -> None:
    """Read the CSV files in DIRECTORY (after a resume, or from a CI artifact) and re-render the summary table, the
    verdict, recommendation.json and report.html there; spikes are found again from layers.csv (give the sweep's
    --spike-factor if it was not the default). Exit 2 when DIRECTORY is not a gradclip output."""
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.report import files

    if not directory.is_dir():
        raise UsageError(
            f"{str(directory)!r} is not a directory",
            "give the --out directory of a gradclip sweep, e.g. gradclip report gradclip-report",
        )
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
        raise UsageError(
            f"cannot write the report into {str(directory)!r}: {exc.strerror or exc}",
            "copy the directory somewhere writable first",
        ) from None
    _print_results(results, json_out, recommendation)
    _stderr_console().print(f"report written to {directory / files.HTML_FILE}", markup=False)


@app.command(short_help="CI gate: one run; exit 1 on NaN/inf or divergence.")
@_exit_on_errors
def check(
    script: Path = typer.Argument(..., help="Your model script.", show_default=False),
    max_norm: float | None = typer.Option(
        None, "--max-norm", help="Clip at this max_norm; without it the run is unclipped."
    ),
    norm_type: str | None = typer.Option(
        None, "--norm-type", help="Norm type for clipping, with --max-norm: a number or inf (default 2)."
    ),
    steps: int | None = _STEPS,
    seed: int | None = _SEED,
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Learning rate: of the default SGD (default 0.01), or set on every param group of the script's optimizer.",
    ),
    divergence_factor: float | None = _DIVERGENCE,
    device: str | None = _DEVICE,
    amp: str | None = _AMP,
    accumulate: int | None = _ACCUMULATE,
    amp_init_scale: float | None = _AMP_INIT_SCALE,
    junit: Path | None = _JUNIT,
    json_out: bool = _JSON,
) -> None:
    """CI gate: one training run; exit 0 when stable, 1 on NaN/inf or divergence (naming step and parameter)."""
    from gradcheck_cli import config as cfg
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.results import Cell

    norm_types = cfg.parse_norm_types(norm_type if norm_type is not None else "2")
    if len(norm_types) != 1:
        raise UsageError(
            f"--norm-type {norm_type!r} gives several values; check runs one configuration",
            "use gradclip sweep for a grid",
        )
    if norm_type is not None and max_norm is None:
        raise UsageError(
            f"--norm-type {norm_type} only applies to a clipped run, and check runs unclipped without --max-norm",
            f"add --max-norm, e.g. gradclip check {script} --max-norm 1 --norm-type {norm_type}",
        )
    max_norms = cfg.parse_max_norms([max_norm]) if max_norm is not None else cfg.DEFAULT_MAX_NORMS
    config, _, _ = _resolve_config(
        script,
        None,
        dict(
            max_norms=max_norms,
            norm_types=norm_types,
            steps=steps,
            seed=seed,
            lr=lr,
            divergence_factor=divergence_factor,
            device=device,
            amp=amp,
            accumulate=accumulate,
            amp_init_scale=amp_init_scale,
        ),
    )
    cell = Cell(max_norms[0], norm_types[0]) if max_norm is not None else Cell(None, 2.0)
    junit = _prepare_junit(junit)

    from gradcheck_cli.guard import guarded
    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.sweep import run_sweep

    with guarded():
        with _user_output_to_stderr(json_out):
            experiment = load_experiment(config.script)
        with _run_progress() as progress, _user_output_to_stderr(json_out):
            task = progress.add_task(cell.run, total=config.steps)
            results = run_sweep(
                config, experiment, cells=[cell], on_step=lambda step: progress.update(task, completed=step)
            )
    result = results[0]

    from gradcheck_cli.report.terminal import check_line, warning_lines

    # The verdict first; only then any file.
    _print_errors(results)
    if json_out:
        from gradcheck_cli.report.jsonout import summary_json

        _to_stdout(lambda: sys.stdout.write(summary_json(results) + "\n"))
        for line in warning_lines(results):
            _stderr_console().print(line, markup=False, soft_wrap=True)
    else:
        out = _stdout_console()

        def write() -> None:
            out.print(check_line(result), markup=False, soft_wrap=True)
            for line in warning_lines(results):
                out.print(line, markup=False, soft_wrap=True)

        _to_stdout(write)
    code = _exit_code(results, fail_on_nan=True, fail_on_divergence=True)
    raise typer.Exit(_write_junit(junit, results, f"gradclip.{config.script.stem}", code))


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
    try:
        app()
    except SystemExit as done:
        from gradcheck_cli import ranks

        code = done.code
        ranks.exit_rank(code if isinstance(code, int) else (0 if code is None else 1))
        raise


if __name__ == "__main__":
    main()
