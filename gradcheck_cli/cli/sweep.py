"""``gradclip sweep``: the grid of runs, in this process, in workers or across torchrun ranks,
written to --out after every run (docs/options.md, docs/outputs.md, docs/distributed.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from gradcheck_cli import ranks, refine
from gradcheck_cli import sweep as sweeping
from gradcheck_cli.cli._options import config_values, resolve_config
from gradcheck_cli.cli._shell import exit_code, stderr_console, stop_code, stop_word
from gradcheck_cli.cli.output import (
    absolute,
    prepare_junit,
    print_results,
    run_progress,
    user_output_to_stderr,
    write_derived,
    write_junit_report,
)
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import ExitCode, ReportWriteError, UsageError
from gradcheck_cli.guard import guarded
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.parallel import WorkerPool
from gradcheck_cli.report import files
from gradcheck_cli.report.files import _write_error
from gradcheck_cli.text import sharing_line


@dataclasses.dataclass
class _Sweep:
    """What a ``gradclip sweep`` settled before its first run."""

    config: SweepConfig
    out: Path  # --out as given, for the messages
    junit: Path | None
    json_out: bool
    fail_on_nan: bool
    fail_on_divergence: bool
    group: ranks.RankGroup | None  # under torchrun
    share: bool = True  # cells take the steps they share with the control from it (--no-share)

    @property
    def lead(self) -> bool:
        """Whether this process reads and writes --out and prints: rank 0, or the only one."""
        return self.group is None or self.group.rank == 0


def run(script: Path | None, given: dict) -> int:
    """The sweep the options describe; under torchrun every rank runs this."""
    config, recipe_fail_nan, recipe_fail_div = resolve_config(script, given["recipe"], config_values(given))
    _check_jobs(given["jobs"], given["threads_per_job"], given["distributed"])
    sweep = _Sweep(
        config,
        given["out"],
        given["junit"],
        given["json"],
        fail_on_nan=given["fail_on_nan"] or recipe_fail_nan,
        fail_on_divergence=given["fail_on_divergence"] or recipe_fail_div,
        group=ranks.from_environment(given["distributed"], config.device),
        share=not given["no_share"],
    )
    if sweep.group is None:
        return _sweep_here(sweep, given["resume"], given["jobs"], given["threads_per_job"])
    with sweep.group:
        return _sweep_here(sweep, given["resume"], given["jobs"], given["threads_per_job"])


def _check_jobs(jobs: int, threads_per_job: int | None, distributed: str) -> None:
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


def _sweep_here(sweep: _Sweep, resume: bool, jobs: int, threads_per_job: int | None) -> int:
    """The sweep in this process; under torchrun (``group``) every rank runs it, and rank 0
    alone reads and writes ``--out`` and prints."""
    config, group = sweep.config, sweep.group
    with contextlib.ExitStack() as stack:
        if sweep.lead:
            out_dir = files.prepare_out_dir(absolute(sweep.out))
            sweep.junit = prepare_junit(sweep.junit)
            stack.enter_context(files.OutDirLock(out_dir))
        else:
            out_dir = absolute(sweep.out)
        executor = stack.enter_context(_executor(jobs, threads_per_job, group))
        # the thread count the runs use: each worker's, or this process's for --jobs 0
        fingerprint = _fingerprint(config, getattr(executor, "threads", None))
        finished = files.load_finished(out_dir, fingerprint) if resume and sweep.lead else {}
        if group is not None:
            finished = group.broadcast(finished)  # every rank skips the same runs
        if hasattr(executor, "start"):  # the workers start while the script loads here
            executor.start(
                config.script.resolve(), config if group is None else dataclasses.replace(config, device=group.device)
            )
        runs = [c.run for c in config.cells()]
        writer = files.ReportWriter(out_dir, fingerprint, runs, finished.values()) if sweep.lead else None
        return _run_and_report(sweep, out_dir, finished, writer, executor, stack)


def _executor(jobs: int, threads_per_job: int | None, group):
    """Where the runs execute: ``--jobs 0`` in this process; otherwise in supervised worker
    processes (``parallel.WorkerPool``). Under torchrun in model mode every rank runs in its
    own process (the process group cannot span workers)."""
    if jobs == 0 or (group is not None and not group.cells):
        return contextlib.nullcontext(sweeping.InProcess())
    return WorkerPool(jobs, threads_per_job)


def _fingerprint(config, threads: int | None = None) -> dict:
    """The sweep's options plus what else decides its numbers on CPU: the script's content,
    torch's version and the torch thread count the runs use (``threads``, a worker's; else this
    process's, read before the script runs)."""
    fingerprint = config.fingerprint()
    fingerprint["torch_version"] = torch.__version__
    fingerprint["torch_threads"] = threads if threads is not None else torch.get_num_threads()
    return fingerprint


class _Progress:
    """The progress bars on stderr (the runs, and the steps of each run in progress), and each
    finished run handed to the report writer as it ends."""

    def __init__(self, progress, steps: int, most: int, finished: int, writer) -> None:
        self.progress = progress
        self.steps = steps
        self.runs = progress.add_task("runs", total=most, completed=finished)
        self.writer = writer
        self.step_bars: dict = {}  # one steps bar per run in progress
        self.unsaved: list = []  # finished runs the writer failed to save

    def run_started(self, index, total, cell) -> None:
        self.step_bars[index] = self.progress.add_task(cell.run, total=self.steps)

    def note(self, text: str) -> None:
        """A line for the user above the bars (stderr)."""
        self.progress.console.print(text, markup=False, soft_wrap=True)

    def run_stepped(self, index, step) -> None:
        if index in self.step_bars:
            self.progress.update(self.step_bars[index], completed=step)

    def run_done(self, index, total, result) -> None:
        if self.writer is not None:
            try:
                self.writer.add(result)
            except ReportWriteError:
                self.unsaved.append(result)
                raise
        if index in self.step_bars:
            self.progress.remove_task(self.step_bars.pop(index))
        self.progress.advance(self.runs)


def _run_and_report(sweep: _Sweep, out_dir: Path, finished: dict, writer, executor, stack) -> int:
    """Load the script, run every run not ``finished`` (saving each as it ends), then write
    the derived reports and print. Ctrl-C or a report that cannot be written stops the runs
    and says what was saved."""
    config = sweep.config
    cells = config.cells()
    with guarded():
        with user_output_to_stderr(sweep.json_out):
            experiment = load_experiment(config.script)
        # refined runs come after the grid: per lr and norm type, each in every seed
        axes = len({c.lr for c in cells}) * len({c.seed for c in cells})
        most = len(cells) + config.refine * len(config.norm_types) * axes
        if finished and sweep.lead:
            of = f"{len(cells)}" if not config.refine else f"up to {most}"
            stderr_console().print(
                f"resuming: {len(finished)} of {of} runs already finished in {sweep.out}", markup=False
            )
        with run_progress(enabled=sweep.lead) as progress:
            bars = _Progress(progress, config.steps, most, len(finished), writer)
            try:
                with user_output_to_stderr(sweep.json_out):
                    results = _run_all(sweep, experiment, finished, executor, bars)
                if writer is None:
                    return exit_code(results, sweep.fail_on_nan, sweep.fail_on_divergence)
                writer.flush()
            except KeyboardInterrupt as exc:
                stack.close()  # stop the workers before saying anything
                progress.stop()
                return _stopped(sweep, exc, len(writer.results), len(cells))
            except ReportWriteError as failure:
                progress.stop()
                return _not_saved(sweep, failure, cells, writer.results, bars.unsaved)
    return _finish(sweep, out_dir, results)


def _run_all(sweep: _Sweep, experiment, finished: dict, executor, bars: _Progress) -> list:
    """The grid's runs, then the --refine runs; the runs' results in order."""
    config = sweep.config
    run = sweeping.run_sweep if sweep.group is None else sweep.group.run_sweep
    sharing = {"share": sweep.share, "on_note": bars.note} if sweep.group is None else {}
    results = run(
        config,
        experiment,
        skip=finished,
        on_run_start=bars.run_started,
        on_run_done=bars.run_done,
        on_run_step=bars.run_stepped,
        executor=executor,
        **sharing,
    )
    if config.refine:
        results = refine.run_refinement(
            config,
            experiment,
            results,
            skip=finished,
            on_run_start=lambda cell: bars.run_started(0, 0, cell),
            on_run_done=lambda result: bars.run_done(0, 0, result),
            on_step=lambda step: bars.run_stepped(0, step),
        )
        bars.progress.update(bars.runs, total=len(results), completed=len(results))
    return results


def _stopped(sweep: _Sweep, exc: KeyboardInterrupt, saved: int, runs: int) -> int:
    """Ctrl-C, SIGTERM or SIGHUP during the runs: what was saved, and how to resume."""
    err = stderr_console()
    err.print(f"{stop_word(exc)}: {saved} of {runs} runs finished and saved in {sweep.out}/", markup=False)
    # one line, whatever the terminal's width: it is copied from CI logs
    err.print(f"resume with: {_resume_command(sys.argv[1:])}", markup=False, soft_wrap=True)
    return stop_code(exc)


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["gradclip", *args, "--resume"])


def _not_saved(sweep: _Sweep, failure: ReportWriteError, cells: list, saved: list, unsaved: list) -> int:
    """A run's files could not be written: the runs so far printed, the error, and exit 5."""
    print_results(_in_cell_order(cells, saved + unsaved), sweep.json_out)
    err = stderr_console()
    err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
    err.print(
        f"stopped after {len(saved) + len(unsaved)} of {len(cells)} runs, {len(saved)} of them saved in {sweep.out}/",
        markup=False,
        soft_wrap=True,
    )
    err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
    return int(ExitCode.REPORTS_NOT_WRITTEN)


def _in_cell_order(cells: list, results: list) -> list:
    """The grid's runs in cell order, then the others (refined runs) in the order they ran."""
    by_run = {r.run: r for r in results}
    grid = {c.run for c in cells}
    return [by_run[c.run] for c in cells if c.run in by_run] + [r for r in results if r.run not in grid]


def _finish(sweep: _Sweep, out_dir: Path, results: list) -> int:
    """After the runs: recommendation.json and report.html, the table and verdict, the exit
    code and the JUnit file."""
    config = sweep.config
    err = stderr_console()
    try:
        recommendation = write_derived(out_dir, results, title=config.script.name)
    except OSError as exc:
        failure = _write_error(Path(out_dir) / "report.html", exc)
        print_results(results, sweep.json_out)
        err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
        err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
        return int(ExitCode.REPORTS_NOT_WRITTEN)
    print_results(results, sweep.json_out, recommendation)
    code = exit_code(results, sweep.fail_on_nan, sweep.fail_on_divergence)
    code = write_junit_report(sweep.junit, results, f"gradclip.{config.script.stem}", code)
    err.print(
        f"reports written to {sweep.out}/ (report.html, summary.csv, steps.csv, layers.csv, recommendation.json, ...)",
        markup=False,
    )
    shared = sharing_line(results)
    if shared is not None:
        err.print(shared, markup=False, soft_wrap=True)
    return code
