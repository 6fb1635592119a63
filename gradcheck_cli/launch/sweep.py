"""A sweep of the user's own command: the control run first (alone: it shows whether the
command trains at all), then every cell of the grid, ``jobs`` at a time, each a fresh run of
the command; results judged in cell order as a contract script's sweep judges them. See
docs/your-command.md."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from gradcheck_cli.analysis import DEFAULT_SPIKE_FACTOR, annotate_spike
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.detect import command_start_warning
from gradcheck_cli.errors import UsageError, UserCodeError
from gradcheck_cli.launch.command import UserCommand
from gradcheck_cli.launch.runs import CommandRun, RunOptions, run_cell, run_cells, threads_for
from gradcheck_cli.launch.shared import free_result
from gradcheck_cli.results import MODE_NONE, MODE_NORM, STABLE, Cell, RunResult

LOG_DIR = "logs"  # under --out: one log per run with everything the script printed


@dataclass
class CommandSweep:
    """The sweep's results in cell order, and what the runs said about the script itself."""

    results: list[RunResult]
    runs: dict[str, CommandRun] = field(default_factory=dict)

    @property
    def as_written(self) -> tuple[str, float, float] | None:
        """The script's own clipping (its first clip call): (kind, threshold, norm type)."""
        for run in self.runs.values():
            if run.outcome is not None and run.outcome.as_written is not None:
                return run.outcome.as_written
        return None


def options_for(config: SweepConfig, jobs: int) -> Callable[[Cell], RunOptions]:
    threads = threads_for(jobs)

    def options(cell: Cell) -> RunOptions:
        return RunOptions(
            steps=config.steps,
            seed=config.seed_of(cell),
            norm_types=tuple(config.norm_types),
            zclip_max_norm=config.zclip_max_norm,
            divergence_factor=config.divergence_factor,
            stop_on_non_finite=True,  # a run ends at its onset, as a contract script's does
            stop_on_divergence=True,
            layer_depth=config.layer_depth,
            threads=threads,
        )

    return options


def check_trains(run: CommandRun, command: UserCommand) -> None:
    """The first run must reach a training step; otherwise the command is not a training
    entry point, or it failed: a ``UserCodeError`` (exit 3) with the script's own words."""
    outcome, result = run.outcome, run.result
    if result.steps:
        return
    tail = run.log_tail()
    shown = f"\n--- last lines of its output ({run.log}) ---\n{tail}" if tail else ""
    if outcome is not None and outcome.ended in ("finished", "exit") and not outcome.error:
        raise UserCodeError(
            f"no optimizer step or clip call happened in {command.name}: is this the training entry point?{shown}",
            "give the command that trains; gradclip counts a step at each optimizer.step() (or clip call)",
        )
    error = result.error or "the script failed"
    raise UserCodeError(
        f"{command.shown()} failed before its first training step: {error}{shown}",
        "run the command by itself to see the problem; gradclip runs it exactly as python does",
        user_traceback=outcome.user_traceback if outcome is not None else "",
    )


def run_command_sweep(
    config: SweepConfig,
    command: UserCommand,
    out: Path,
    *,
    jobs: int = 1,
    cells: list[Cell] | None = None,
    skip: Mapping[str, RunResult] | None = None,
    on_run_start: Callable[[int, int, Cell], None] | None = None,
    on_run_done: Callable[[int, int, RunResult], None] | None = None,
    share: bool = True,
) -> CommandSweep:
    """The control run first, then the other cells ``jobs`` at a time; with ``share``, a cell
    the control's rows show to be identical to it is not run (``launch.shared``)."""
    cells = config.cells() if cells is None else list(cells)
    if any(cell.lr is not None for cell in cells):
        raise UsageError(
            "--lrs cannot vary the learning rate of a command run as it is: the script sets its own",
            "sweep one learning rate per command (change it in the command's arguments)",
        )
    skip = dict(skip or {})
    options = options_for(config, jobs)
    log_dir = out / LOG_DIR
    index_of = {cell.run: i for i, cell in enumerate(cells, start=1)}
    total = len(cells)
    done: dict[int, RunResult] = {i: skip[c.run] for i, c in enumerate(cells, start=1) if c.run in skip}
    runs: dict[str, CommandRun] = {}
    judged: list[RunResult] = []

    def finish(run: CommandRun) -> None:
        runs[run.cell.run] = run
        done[index_of[run.cell.run]] = run.result
        while len(judged) < total and len(judged) + 1 in done:
            i = len(judged) + 1
            result = done[i]
            fresh = cells[i - 1].run not in skip
            if fresh:
                result = annotate_spike(_with_fairness(result, runs, judged), config.spike_factor)
            judged.append(result)
            if fresh and on_run_done is not None:
                on_run_done(i, total, result)

    todo = [c for c in cells if c.run not in skip]
    first = next((c for c in todo if c.mode == MODE_NONE), todo[0] if todo else None)
    if first is not None:
        if on_run_start is not None:
            on_run_start(index_of[first.run], total, first)
        run = run_cell(command, first, options(first), log_dir / f"{first.run}.log")
        check_trains(run, command)
        finish(run)
        todo.remove(first)
        if share and first.mode == MODE_NONE:
            todo = _run_free(todo, run, config, finish)

    def started(cell: Cell) -> None:
        if on_run_start is not None:
            on_run_start(index_of[cell.run], total, cell)

    for run in run_cells(command, todo, options, log_dir, jobs=jobs, on_start=started):
        finish(run)
    return CommandSweep(judged, runs)


def _run_free(todo: list[Cell], control: CommandRun, config: SweepConfig, finish) -> list[Cell]:
    """Hand every free cell's result to ``finish``; the cells that must run."""
    left = []
    for cell in todo:
        same_seed = config.seed_of(cell) == config.seed_of(control.cell)
        result = free_result(cell, control.result, config) if same_seed else None
        if result is None:
            left.append(cell)
        else:
            finish(replace(control, cell=cell, result=result, seconds=0.0))
    return left


def _with_fairness(result: RunResult, runs: Mapping[str, CommandRun], judged: list[RunResult]) -> RunResult:
    """Every run starts the command afresh with the same seed, so step 1 (its loss, and its
    pre-clip norm, both before any update) is the same in every run of a seed. When it is not,
    the command does not start identically: say so, naming the run it differs from. The norm
    is compared in the run's own norm type: the control measures every norm type of the grid."""
    reference = next((r for r in judged if r.seed == result.seed and r.steps), None)
    if reference is None or not result.steps:
        return result
    mine, theirs = result.steps[0], reference.steps[0]
    ref_norm = dict(theirs.norms).get(result.cell.norm_type)
    if ref_norm is None and reference.cell.norm_type == result.cell.norm_type:
        ref_norm = theirs.grad_norm
    probe, ref = [mine.loss], [theirs.loss]
    if ref_norm is not None and result.cell.mode in (MODE_NONE, MODE_NORM):
        probe.append(mine.grad_norm)
        ref.append(ref_norm)
    if all(a == b or (a != a and b != b) for a, b in zip(probe, ref)):
        return result
    return replace(result, warnings=result.warnings + (command_start_warning(reference.run),))


def as_written_line(as_written: tuple[str, float, float] | None, results: list[RunResult]) -> str:
    """The script's own clipping, and where it stands among the sweep's runs of that norm type."""
    if as_written is None:
        return "as written: the script does not clip"
    kind, threshold, norm_type = as_written
    if kind == "value":
        return f"as written: clip_value={threshold:g}"
    shown = "inf" if norm_type == float("inf") else f"L{norm_type:g}"
    line = f"as written: max_norm={threshold:g}, {shown}"
    same = [r for r in results if r.cell.mode == MODE_NORM and r.cell.norm_type == norm_type]
    if not same:
        return line + " (no run of the grid clips in that norm type)"
    unstable = sorted(r.cell.max_norm for r in same if r.status != STABLE)
    stable = sorted(r.cell.max_norm for r in same if r.status == STABLE)
    if unstable and threshold >= unstable[0]:
        return line + f": at or above the smallest unstable max_norm ({unstable[0]:g}) of the grid; clip lower"
    if unstable and stable and threshold * 2 >= unstable[0]:
        return line + f": stable side, but within 2x of the smallest unstable max_norm ({unstable[0]:g})"
    if stable and threshold <= stable[-1]:
        return line + f": within the stable range of the grid (stable up to {stable[-1]:g})"
    return line


def single_run(
    command: UserCommand, cell: Cell | None, options: RunOptions, out: Path, spike_factor: float = DEFAULT_SPIKE_FACTOR
) -> CommandRun:
    """One run (``watch``, ``check``): the command with ``cell`` (None: its own clipping), its
    spikes located as a sweep's are."""
    name = cell.run if cell is not None else "as_written"
    run = run_cell(command, cell, options, out / LOG_DIR / f"{name}.log")
    check_trains(run, command)
    run.result = annotate_spike(run.result, spike_factor)
    return run
