"""Runs of the user's command, each in a fresh ``python`` process (``launch.worker``), up to
``jobs`` at a time; the script's output goes to a log file per run. See docs/your-command.md."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gradcheck_cli.launch.command import UserCommand
from gradcheck_cli.launch.outcome import Outcome
from gradcheck_cli.launch.session import AS_WRITTEN_RUN
from gradcheck_cli.results import CRASHED, ERROR, Cell, RunResult


@dataclass(frozen=True)
class RunOptions:
    """What every run of a sweep shares."""

    steps: int | None
    seed: int | None = 0
    norm_types: tuple[float, ...] = (2.0,)
    zclip_max_norm: float | None = None
    divergence_factor: float | None = 10.0
    stop_on_non_finite: bool = False
    stop_on_divergence: bool = False
    layer_depth: Any = "auto"
    threads: int | None = None


@dataclass
class CommandRun:
    """One finished run: its result (always set), how the script ended, its log."""

    cell: Cell
    result: RunResult
    outcome: Outcome | None
    log: Path
    returncode: int | None
    seconds: float

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def run_cell(command: UserCommand, cell: Cell | None, options: RunOptions, log: Path) -> CommandRun:
    """Run the command once under ``cell`` (None: with the script's own clipping, measured);
    never raises for anything the script does."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradclip-run-") as scratch:
        spec_path, result_path = Path(scratch) / "spec.json", Path(scratch) / "result.pickle"
        spec = {
            "cell": asdict(cell) if cell is not None else None,
            "script": str(command.script) if command.script is not None else None,
            "module": command.module,
            "argv0": str(command.script) if command.script is not None else None,
            "args": list(command.args),
            "result": str(result_path),
            "steps": options.steps,
            "seed": options.seed,
            "norm_types": list(options.norm_types),
            "zclip_max_norm": options.zclip_max_norm,
            "divergence_factor": options.divergence_factor,
            "stop_on_non_finite": options.stop_on_non_finite,
            "stop_on_divergence": options.stop_on_divergence,
            "layer_depth": options.layer_depth,
            "threads": options.threads,
        }
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, *command.python_flags, "-m", "gradcheck_cli.launch.worker", str(spec_path)]
        with open(log, "wb") as out:
            proc = subprocess.run(argv, cwd=command.cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        outcome = pickle.loads(result_path.read_bytes()) if result_path.exists() else None
    seconds = time.perf_counter() - start
    return CommandRun(
        cell, _result_of(cell, outcome, proc.returncode, options, seconds), outcome, log, proc.returncode, seconds
    )


def _result_of(
    cell: Cell | None, outcome: Outcome | None, returncode: int, options: RunOptions, seconds: float
) -> RunResult:
    name = None if cell is not None else AS_WRITTEN_RUN
    cell = cell if cell is not None else Cell(None)
    if outcome is None:
        how = f"killed by {_signal_name(returncode)}" if returncode < 0 else f"exited with code {returncode}"
        return RunResult(cell=cell, status=CRASHED, error=f"the script's process {how}", seed=options.seed, name=name)
    result = outcome.result
    if result is None:
        error = outcome.error or "no optimizer step or clip call happened"
        result = RunResult(cell=cell, status=ERROR, error=error, seed=options.seed, name=name)
    if result.status == ERROR and outcome.user_traceback:
        result = replace(result, error_traceback=outcome.user_traceback)  # shown in the error panel
    return replace(result, seconds=seconds)


def run_cells(
    command: UserCommand,
    cells: list[Cell],
    options: Callable[[Cell], RunOptions],
    log_dir: Path,
    *,
    jobs: int = 1,
    on_start: Callable[[Cell], None] | None = None,
) -> Iterator[CommandRun]:
    """Run every cell (with ``options(cell)``), ``jobs`` at a time; yields each run as it
    finishes."""
    jobs = max(1, jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = list(cells)
        running: dict[Future, Cell] = {}
        while pending or running:
            while pending and len(running) < jobs:
                cell = pending.pop(0)
                if on_start is not None:
                    on_start(cell)
                log = log_dir / f"{cell.run}.log"
                running[pool.submit(run_cell, command, cell, options(cell), log)] = cell
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                yield future.result()


def threads_for(jobs: int) -> int:
    """torch threads per run: the cores shared among the runs at once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, jobs))
