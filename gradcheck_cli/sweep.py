"""A sweep: the control run and every clipping cell, at every lr and seed, each run from the
starting state of its seed.

``run_sweep`` builds the model and snapshots the starting state once per seed, hands every run
of that seed to an executor (``InProcess`` here; ``parallel.WorkerPool``; ``ranks.RankGroup``)
and judges the results in cell order. ``execute`` is one run from its starting state, with the
loop the script asks for (``runner.run_cell`` or ``train_step.run_train_step_cell``). The order
of events and why every run with the same (lr, seed) starts identical: docs/contract.md
("How a sweep starts every run").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gradcheck_cli import shadows
from gradcheck_cli.analysis import annotate_spike
from gradcheck_cli.config import DEFAULT_LR, SweepConfig, agc_excluded
from gradcheck_cli.detect import eval_collapsed, eval_collapsed_warning, step1_warning
from gradcheck_cli.errors import UsageError
from gradcheck_cli.forks import Fork
from gradcheck_cli.loader import Experiment
from gradcheck_cli.results import DIVERGED, MODE_AGC, STABLE, Cell, RunResult
from gradcheck_cli.run_setup import UserFailure, error_result, evaluate_model, make_optimizer, run_lr
from gradcheck_cli.runner import run_cell
from gradcheck_cli.shadows import Forked, Free, ShadowSet, Shared, TrainStepShadows
from gradcheck_cli.snapshot import Snapshot, seed_everything
from gradcheck_cli.train_step import measured_norm_type, run_train_step_cell

OnRunStart = Callable[[int, int, Cell], None]
OnRunDone = Callable[[int, int, RunResult], None]
OnRunStep = Callable[[int, int], None]


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was given but CUDA is not available", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device} was given but only {torch.cuda.device_count()} CUDA device(s) exist",
                "use --device cuda:0",
            )


def _move_model(model: torch.nn.Module, device: torch.device, script_name: str) -> None:
    """Move the model to ``--device``; a model that cannot be moved is a usage error that says
    what to do, never torch's own message."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        names = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        raise UsageError(
            f"build_model() in {script_name} returned a model on the meta device (no data in {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): there are no weights to train",
            "materialise it before returning it, e.g. model.to_empty(device='cpu') and then initialise its "
            "weights (or build it without the meta device); gradclip moves it to --device itself",
        )
    try:
        model.to(device)
    except Exception as exc:  # e.g. a parameter on a device that does not exist here
        raise UsageError(
            f"build_model() in {script_name} returned a model gradclip cannot move to --device {device}: "
            f"{type(exc).__name__}: {exc}",
            f"build the model on the CPU (gradclip moves it to --device {device}), or choose the --device it is on",
        ) from None
    elsewhere = sorted(
        {str(t.device) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != device.type}
    )
    if elsewhere:
        raise UsageError(
            f"build_model() in {script_name} returned a model that stays on {', '.join(elsewhere)} after model.to({str(device)!r})",
            f"build the model on the CPU and let gradclip move it to --device {device}",
        )


def _check_default_lr(experiment: Experiment, model: torch.nn.Module, lr: float) -> None:
    """The default SGD multiplies by ``-lr`` in each parameter's dtype: an ``--lr`` beyond that
    dtype's range makes torch fail inside ``optimizer.step()``. Say so up front, naming --lr."""
    if experiment.build_optimizer_fn is not None:
        return
    for p in model.parameters():
        if p.is_floating_point() and lr > torch.finfo(p.dtype).max:
            raise UsageError(
                f"--lr {lr!r} is too large for the default SGD: the model has {p.dtype} parameters, whose largest value is "
                f"{torch.finfo(p.dtype).max:.4g}",
                "choose a smaller --lr, or define build_optimizer(model) in the script",
            )


def _step1_probe(result: RunResult) -> tuple[str, float, float | None] | None:
    """What must be identical at step 1 in every run of a seed: the loss before the first
    update, or, for a ``train_step`` script (whose returned loss may include a later update's,
    clipped differently per run), the pre-clip norm at the first clip call, in the norm type it
    was measured in. ``(kind, value, norm type)``; ``None`` without a step 1."""
    if not result.steps or result.steps[0].step != 1:
        return None
    first = result.steps[0]
    if first.sites:
        return "norm", first.sites[0][1], measured_norm_type(result.cell)
    return "loss", first.loss, None


def _step1_reference(results: list[RunResult], result: RunResult) -> RunResult | None:
    """The first run of ``result``'s seed with a step 1 probed the same way (the lr does not
    change step 1's loss, nor the first clip call's norm)."""
    probe = _step1_probe(result)
    if probe is None:
        return None
    same = (probe[0], probe[2])
    return next((r for r in results if r.seed == result.seed and _probed_as(r) == same), None)


def _probed_as(result: RunResult) -> tuple[str, float | None] | None:
    probe = _step1_probe(result)
    return (probe[0], probe[2]) if probe is not None else None


def _with_step1_warning(result: RunResult, reference: RunResult | None) -> RunResult:
    """Every run starts from the same state and the same first batch, so step 1's probe
    (``_step1_probe``) is the same in every run. When it is not, the script carries state
    between runs: say so, naming the run it differs from."""
    if reference is None or reference is result:
        return result
    (kind, a, _), (_, b, _) = _step1_probe(reference), _step1_probe(result)
    if a == b or (a != a and b != b):  # equal, or both NaN
        return result
    result.warnings = result.warnings + (step1_warning(reference.run, kind),)
    return result


def _with_eval_judged(result: RunResult, before: float | None, factor: float) -> RunResult:
    """A stable run whose ``evaluate`` collapsed (``detect.eval_collapsed``: not a number, or far
    worse than the untrained model's ``before``) has diverged; the warning keeps ``before``.
    Not judged when divergence is not (``--divergence-factor inf``)."""
    if result.status != STABLE or result.eval_metric is None or not math.isfinite(factor):
        return result
    if eval_collapsed(before, result.eval_metric, bool(result.eval_higher_is_better)):
        result.status = DIVERGED
        result.warnings = result.warnings + (eval_collapsed_warning(before),)
    return result


def _check_agc_exclude(config: SweepConfig, cells: list[Cell], model: torch.nn.Module) -> None:
    """Every ``--agc-exclude`` pattern must match some parameter: a typo would otherwise
    silently exclude nothing."""
    if not config.agc_exclude or not any(cell.mode == MODE_AGC for cell in cells):
        return
    names = [name for name, _ in model.named_parameters()]
    unmatched = [pat for pat in config.agc_exclude if not any(agc_excluded(n, (pat,)) for n in names)]
    if unmatched:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UsageError(
            f"--agc-exclude {', '.join(unmatched)} matches no parameter of the model",
            f"give parameter or module names or globs; the model's parameters are: {shown}",
        )


def run_sweep(
    config: SweepConfig,
    experiment: Experiment,
    *,
    skip: Mapping[str, RunResult] | None = None,
    on_run_start: OnRunStart | None = None,
    on_run_done: OnRunDone | None = None,
    cells: list[Cell] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_run_step: OnRunStep | None = None,
    executor: Executor | None = None,
    share: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Run every cell of ``config.cells()`` (or of ``cells``, e.g. ``gradclip check``'s single
    cell) and return one ``RunResult`` per cell, in cell order.

    ``skip`` maps run names (``Cell.run``) to results of runs that already finished (resume):
    those cells are not run again; their given result is returned in its place in the order.
    When every cell is skipped the model is not even built.

    ``executor`` runs the cells (``InProcess()`` when not given: here, one after the other;
    ``parallel.WorkerPool``: in supervised worker processes, possibly several at once). The
    starting state of each seed is built here, once, and handed to the executor with every
    cell of that seed: workers receive the snapshot, they never rebuild it.

    ``on_run_start(index, total, cell)`` is called when a run starts and ``on_run_done(index,
    total, result)`` when it ends (not for skipped ones); ``index`` counts from 1 over all cells
    of the sweep, skipped ones included, and ``total`` is the number of cells. Runs start in cell
    order (with ``share``, a seed's control runs first) and with several at once may end in any
    order, but ``on_run_done`` is called in cell order (a run that ends early waits for the ones
    before it). ``on_run_step(index, step)``
    and ``on_step(step)`` are called after every completed training step of a run.

    With ``share`` (``--no-share`` turns it off), a cell whose control run (same lr and seed)
    runs in this sweep is not trained where it would repeat the control: the control carries
    a shadow of it (``shadows.py``), and the cell is then free (built from the control's
    steps), forked (started from the control's state where its clipping first acts) or trained
    in full; the results are the same as without sharing (docs/diagnosis.md, "Shared runs").
    ``on_run_start`` is not called for a free cell. ``on_note(text)`` hears when a cell trains
    from step 1 although it could have forked: the memory budget for snapshots was spent.

    Raises ``UserCodeError`` when ``build_model()`` raises and ``UsageError`` when it returns no
    usable module or the device is unavailable. When ``build_optimizer`` raises, every run gets
    status ``error`` with its message and the sweep still completes. ``KeyboardInterrupt``
    propagates, from a callback or from the user's code alike.
    """
    cells = config.cells() if cells is None else list(cells)
    total = len(cells)
    skip = dict(skip or {})
    if all(cell.run in skip for cell in cells):
        return [skip[cell.run] for cell in cells]

    device = torch.device(config.device)
    _check_device(device)
    executor = executor if executor is not None else InProcess()

    last: list[StartingState] = []  # the latest seed's state, for the global state at the end
    in_order = _InOrder(config, cells, skip, on_run_done)

    def started(task: Task) -> None:
        if on_run_start is not None:
            on_run_start(task.index, total, task.cell)
        if task.fork is not None and on_run_step is not None:
            on_run_step(task.index, task.fork.step - 1)  # the steps taken from the control

    def stepped(task: Task, step: int) -> None:
        if on_run_step is not None:
            on_run_step(task.index, step)
        if on_step is not None:
            on_step(step)

    sharing = _Sharing(config, cells, skip) if share else None
    tasks = _tasks(config, experiment, device, cells, skip, last, in_order.eval_before, sharing)
    for task, result in executor.run(experiment, config, tasks, started, stepped):
        if sharing is not None:
            result = sharing.received(task, result)
        in_order.add(task.index, result)
        _add_free(sharing, in_order)
    _add_free(sharing, in_order)
    if sharing is not None and sharing.over_budget and on_note is not None:
        on_note(
            f"shared runs: {sharing.over_budget} fork point(s) found no room within the {shadows.FORK_MEMORY_BUDGET / 2**30:g} GiB "
            "held for snapshots of the control: those cells started from an earlier snapshot, or trained from step 1"
        )
    if last:
        last[0].snapshot.restore_global_state()  # what the last run changed does not leak into the reports
    return in_order.judged


def _tasks(
    config: SweepConfig,
    experiment: Experiment,
    device: torch.device,
    cells: list[Cell],
    skip: Mapping[str, RunResult],
    last: list[StartingState],
    eval_before: dict[int | None, float | None],
    sharing: _Sharing | None = None,
) -> Iterator[Task | str]:
    """The runs to execute, in cell order, each with its seed's starting state, built when the
    seed's first run is due (cells come seed-major, so one state is held at a time; the previous
    one is freed first). Every later seed starts from the first seed's global torch state.
    ``last`` holds the latest state, ``eval_before`` gets each seed's untrained metric.
    With ``sharing``, a control run carries the shadows of its cells, and each of those cells
    waits (``WAIT``) until the control has ended to know whether it runs, and from where."""
    state: StartingState | None = None
    first_global = None  # global torch state as the first seed's runs start from it
    order = list(enumerate(cells, start=1))
    if sharing is not None:  # a seed's control runs first, so that its cells wait for none
        seeds = list(dict.fromkeys(config.seed_of(c) for c in cells))
        order.sort(key=lambda item: (seeds.index(config.seed_of(item[1])), item[1].clipped))
    for index, cell in order:
        if cell.run in skip:
            continue
        seed = config.seed_of(cell)
        if state is None or state.seed != seed:
            state = None  # free the previous seed's model before building the next
            last.clear()
            if first_global is not None:  # the next seed starts from the first seed's global state
                first_global.restore()
            state = starting_state(config, experiment, device, seed)
            first_global = first_global or state.snapshot.global_state
            _check_agc_exclude(config, cells, state.model)
            last.append(state)
            eval_before[seed] = state.eval_before
        if sharing is None:
            yield Task(index, cell, state)
            continue
        while not sharing.decided(cell):
            yield WAIT
        task = sharing.task(index, cell, state)
        if task is not None:
            yield task


class _InOrder:
    """The sweep's results, judged and handed to ``on_run_done`` in cell order.

    Results arrive as runs end (in any order with several workers). The step-1 check compares
    each run with the first earlier run of its seed, so a result is judged as soon as every
    earlier run has ended: the same warnings, and the same files at every moment, as a sweep in
    one process. Skipped (finished) runs are passed on unjudged and without ``on_run_done``."""

    def __init__(
        self,
        config: SweepConfig,
        cells: list[Cell],
        skip: Mapping[str, RunResult],
        on_run_done: OnRunDone | None,
    ) -> None:
        self.config, self.cells, self.skip, self.on_run_done = config, cells, skip, on_run_done
        self.by_index: dict[int, RunResult] = {i: skip[c.run] for i, c in enumerate(cells, start=1) if c.run in skip}
        self.judged: list[RunResult] = []
        self.eval_before: dict[int | None, float | None] = {}  # per seed: evaluate() before training

    def add(self, index: int, result: RunResult) -> None:
        """The result of the run at ``index`` (from 1); judge every result now in order."""
        self.by_index[index] = result
        judged, total = self.judged, len(self.cells)
        while len(judged) < total and len(judged) + 1 in self.by_index:
            index = len(judged) + 1
            result = self.by_index[index]
            fresh = self.cells[index - 1].run not in self.skip
            if fresh:
                result = _with_step1_warning(result, _step1_reference(judged + [result], result))
                result = _with_eval_judged(result, self.eval_before.get(result.seed), self.config.divergence_factor)
                result = annotate_spike(result, self.config.spike_factor)
            judged.append(result)
            if fresh and self.on_run_done is not None:
                self.on_run_done(index, total, result)


@dataclass
class StartingState:
    """What every run of one seed starts from: the snapshot (weights, optimizer state, RNG), the
    model it was taken from (used by the in-process executor) and, when ``build_optimizer``
    raised, that failure (every run of the seed is then an ``error``)."""

    seed: int
    model: torch.nn.Module | None
    snapshot: Snapshot
    optimizer_failure: UserFailure | None
    eval_before: float | None = None  # evaluate() of the untrained model, when the script has one


@dataclass
class Task:
    """One run to execute: its position in the sweep (from 1), its cell, its starting state;
    a control run may carry the cells it is ``shadows`` for, a cell may start from a ``fork``
    of the control."""

    index: int
    cell: Cell
    state: StartingState
    shadows: tuple[Cell, ...] = ()
    fork: Fork | None = None


# What the task iterator yields when the next run cannot start until a running one has ended
# (a cell waiting for its control run): an executor starts nothing more until a run ends.
WAIT = "wait"


class _Sharing:
    """Which runs of the sweep share the control's steps (``run_sweep``'s ``share``): per (seed,
    lr) whose control runs here, the cells to follow, and once the control has ended, each
    cell's outcome. Free cells' results wait in ``free`` for the sweep's loop to take them."""

    def __init__(self, config: SweepConfig, cells: list[Cell], skip: Mapping) -> None:
        self.config = config
        self.followers: dict[tuple, tuple[Cell, ...]] = {}
        for control in (c for c in cells if not c.clipped and c.run not in skip):
            key = self._key(control)
            self.followers[key] = tuple(c for c in cells if c.clipped and c.run not in skip and self._key(c) == key)
        self.outcomes: dict[str, Any] = {}
        self.ended: set[tuple] = set()
        self.free: list[tuple[int, RunResult]] = []
        self.over_budget = 0

    def _key(self, cell: Cell) -> tuple:
        return (self.config.seed_of(cell), cell.lr)

    def decided(self, cell: Cell) -> bool:
        """A cell can be handed out: it follows no control here, or its control has ended."""
        key = self._key(cell)
        return not cell.clipped or key not in self.followers or key in self.ended

    def task(self, index: int, cell: Cell, state: StartingState) -> Task | None:
        """The cell's task: the control with its shadows, a fork, a full run; ``None`` for a
        free cell (its result goes to ``free``)."""
        key = self._key(cell)
        if not cell.clipped:
            return Task(index, cell, state, shadows=self.followers.get(key, ()))
        outcome = self.outcomes.pop(cell.run, None)  # a fork's snapshot is not held past its run
        if isinstance(outcome, Free):
            self.free.append((index, outcome.result))
            return None
        if isinstance(outcome, Forked):
            return Task(index, cell, state, fork=outcome.fork)
        return Task(index, cell, state)

    def received(self, task: Task, result: Any) -> RunResult:
        """A run's result; a control's outcomes are kept (a control that crashed has none:
        its cells train in full)."""
        if not task.shadows:
            return result
        self.ended.add(self._key(task.cell))
        if isinstance(result, Shared):
            self.outcomes.update(result.outcomes)
            self.over_budget += result.over_budget
            return result.result
        return result


def _add_free(sharing: _Sharing | None, in_order: _InOrder) -> None:
    """Hand the free cells decided so far to the results, in cell order."""
    if sharing is None:
        return
    free, sharing.free = sharing.free, []
    for index, result in free:
        in_order.add(index, result)


def starting_state(config: SweepConfig, experiment: Experiment, device: torch.device, seed: int) -> StartingState:
    """The model built and moved to the device, and the snapshot every run of ``seed`` starts
    from."""
    seed_everything(seed, device)
    model = experiment.build_model()
    _move_model(model, device, experiment.name)
    _check_default_lr(experiment, model, max(config.lrs) if config.lrs else DEFAULT_LR)
    optimizer_failure: UserFailure | None = None
    optimizer = None
    try:
        optimizer = make_optimizer(experiment, model, config.lrs[0] if config.lrs else DEFAULT_LR)
    except UserFailure as failure:
        optimizer_failure = failure
    eval_before = _untrained_metric(experiment, model)  # before the RNG is seeded for the runs
    seed_everything(seed, device)
    snapshot = Snapshot.capture(model, optimizer, device)
    del optimizer  # every run builds its own
    return StartingState(seed, model, snapshot, optimizer_failure, eval_before)


def _untrained_metric(experiment: Experiment, model: torch.nn.Module) -> float | None:
    """``evaluate(model)`` of the starting state: what a collapsed metric is measured against
    (``_with_eval_judged``). ``None`` without ``evaluate``, or when it fails here (each run's own
    call at its end reports that failure)."""
    if experiment.evaluate_fn is None:
        return None
    try:
        return evaluate_model(experiment, model)
    except UserFailure:
        return None


def execute(
    experiment: Experiment,
    model: torch.nn.Module | None,
    cell: Cell,
    config: SweepConfig,
    snapshot: Snapshot,
    optimizer_failure: UserFailure | None,
    on_step: Callable[[int], None] | None = None,
    shadows: tuple[Cell, ...] = (),
    fork: Fork | None = None,
) -> RunResult | Shared:
    """One run from its starting state: what every executor calls, here or in a worker. A
    ``train_step`` script runs its own update (``train_step.py``), a ``loss_fn`` script the
    runner's loop (``runner.py``). A control run with ``shadows`` returns ``Shared`` (its
    result and its cells' outcomes); a ``fork`` starts at the control's state there."""
    if optimizer_failure is not None:
        return error_result(cell, optimizer_failure, lr=run_lr(experiment, config, cell), seed=config.seed_of(cell))
    if experiment.train_step_fn is not None:
        if not shadows:
            return run_train_step_cell(experiment, model, cell, config, snapshot=snapshot, on_step=on_step)
        clips = TrainStepShadows(experiment, config, shadows, model)
        result = run_train_step_cell(
            experiment, model, cell, config, snapshot=snapshot, on_step=on_step, observer=clips
        )
        return clips.outcomes(result)
    if shadows:
        watch = ShadowSet(experiment, config, shadows)
        result = run_cell(experiment, model, cell, config, snapshot=snapshot, on_step=on_step, observer=watch)
        return watch.outcomes(result)
    result = run_cell(experiment, model, cell, config, snapshot=snapshot, on_step=on_step, fork=fork)
    if fork is not None:
        result.shared_steps = fork.step - 1
    return result


class Executor(Protocol):
    """Runs tasks and yields ``(task, result)`` as each run ends; calls ``on_start(task)`` when
    a run starts and ``on_step(task, step)`` after each of its steps."""

    def run(
        self,
        experiment: Experiment,
        config: SweepConfig,
        tasks: Iterator[Task],
        on_start: Callable[[Task], None],
        on_step: Callable[[Task, int], None],
    ) -> Iterator[tuple[Task, RunResult]]: ...


class InProcess:
    """Every run in this process, one after the other, on the model the snapshot came from.
    No isolation: a run that kills its process ends the sweep (``--jobs 0``)."""

    def run(self, experiment, config, tasks, on_start, on_step):
        for task in tasks:
            if task is WAIT:  # never here: each run has ended before the next is asked for
                raise RuntimeError("a run waits for another, but runs here one after the other")
            on_start(task)
            state = task.state
            result = execute(
                experiment,
                state.model,
                task.cell,
                config,
                state.snapshot,
                state.optimizer_failure,
                on_step=lambda step, task=task: on_step(task, step),
                shadows=task.shadows,
                fork=task.fork,
            )
            yield task, result
