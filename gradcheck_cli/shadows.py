"""Cells that follow the control run step by step without training, and where each one leaves it.

Until a cell's clipping first changes a gradient, the cell trains exactly as the control does:
same weights, same batches, same random numbers. So the control run of a sweep carries a
``Shadow`` of each cell of its lr and seed: at every step the shadow measures the control's
gradients in the cell's norm type, judges them as the cell would (``runner.Run.judge``) and asks
the cell's clipping whether it would change anything (``run_setup.unchanged_clipping``), keeping
the cell's rows. A cell that never leaves is *free*: its result is built from its rows, without
training. A cell that leaves at step k is *forked*: the control captures its state at k
(``forks.ControlState``, within ``FORK_MEMORY_BUDGET``) and the cell starts there. What is shared
and why it is exact: docs/diagnosis.md ("Shared runs"). A ``train_step`` script's cells follow
its control call by call (``TrainStepShadows``): free or trained in full, never forked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gradcheck_cli import engine
from gradcheck_cli.config import SweepConfig, agc_excluded
from gradcheck_cli.detect import Divergence
from gradcheck_cli.forks import ControlState, Fork
from gradcheck_cli.layers import LayerGrouping
from gradcheck_cli.loader import Experiment
from gradcheck_cli.precision import MAX_CONSECUTIVE_SKIPS
from gradcheck_cli.results import DIVERGED, MODE_AGC, NON_FINITE, SOURCE_AMP, STABLE, Cell, RunResult
from gradcheck_cli.run_setup import make_rule, run_lr, unchanged_clipping
from gradcheck_cli.runner import SKIP, Measured, Run, Stop, first_non_finite_param, updated_row, values_on_host
from gradcheck_cli.train_step import Clip, ClippingActs, StopAtClip, measured_norm_type, step_end, stopped_at_clip

# Snapshots of the control held at once for forks, in bytes. A fork point past it reuses the
# latest earlier snapshot (the cell trains the steps in between), else the cell trains in full.
FORK_MEMORY_BUDGET = 2 * 1024**3
CONTROL_NORM_TYPE = measured_norm_type(Cell(None))  # what a train_step script's control measures in


@dataclass
class Free:
    """A cell identical to the control up to its end: its whole result, built without training."""

    result: RunResult


@dataclass
class Forked:
    """A cell that starts from the control's state at ``fork.step``."""

    fork: Fork


@dataclass
class Full:
    """A cell trained from step 1, and why."""

    reason: str


@dataclass
class Shared:
    """What a control run followed by shadows returns: its own result, an outcome per cell
    (by run name), and how many fork points the memory budget left without a snapshot."""

    result: RunResult
    outcomes: dict[str, Free | Forked | Full]
    over_budget: int = 0


def _rule_state(rule: Any) -> dict | None:
    """The state of an AutoClip or ZClip rule (AGC and norm cells keep none between steps)."""
    if rule is None or isinstance(rule, engine.AGC):
        return None
    return rule.state_dict()


@dataclass
class _Saved:
    """A shadow as it was before a step where the control's state was captured."""

    rows: int
    losses: int
    norms: dict[str, int]
    rule_state: dict | None


class Shadow(Run):
    """One cell following the control (module docstring): its rows, divergence test and rule
    state advance on the control's numbers; the model is the control's and is never changed."""

    def __init__(self, control: Run, cell: Cell) -> None:
        super().__init__(control.experiment, control.model, cell, control.config)
        self.params, self.named = control.params, control.named
        self.precision = control.precision
        self.grouping = LayerGrouping(self.config.layer_depth)
        self.rule = make_rule(cell, self.config)
        self.clip_params = self.params
        if cell.mode == MODE_AGC and self.config.agc_exclude:
            self.clip_params = [p for n, p in self.named if not agc_excluded(n, self.config.agc_exclude)]
        self.optimizer_warnings = list(control.optimizer_warnings)
        self.stop: tuple[int, Stop] | None = None  # the step and verdict that end the cell's run
        self.left_at: int | None = None  # the first step whose update differs from the control's
        self.saved: dict[int, _Saved] = {}
        self._before: _Saved | None = None

    @property
    def following(self) -> bool:
        return self.stop is None and self.left_at is None

    def follow(self, step: int, loss: float, measured: Measured, lr: float) -> None:
        """The cell's step on the control's gradients: judged, then its clipping asked whether
        it would change them; the row kept when it would not."""
        divergence = self.divergence
        self._before = _Saved(
            len(self.records),
            len(divergence.losses),
            {site: len(values) for site, values in divergence.norms.items()},
            _rule_state(self.rule),
        )
        verdict = self.judge(step, loss, measured, None, lr)
        if verdict is SKIP:  # the fp16 scaler skips the step: the control's scaler moves for both
            self.skips_in_a_row += 1
            if self.skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                fields = dict(nan_step=step, nan_source=SOURCE_AMP, nan_param=first_non_finite_param(self.model))
                self.stop = (step, Stop(NON_FINITE, fields))
        elif verdict is not None:
            self.stop = (step, verdict)
        else:
            clipping = unchanged_clipping(self.cell, self.rule, self.clip_params, measured.norm, measured.norm_f)
            if clipping is None:
                self.left_at = step
            else:
                self.records.append(updated_row(step, loss, measured, lr, clipping))

    def save(self, step: int) -> None:
        """The control's state was captured at ``step``: keep this shadow's from before it."""
        self.saved[step] = self._before

    def fork_from(self, states: dict[int, ControlState], step: int) -> Fork | None:
        """A fork at the latest captured step up to ``step`` (``None``: none was captured)."""
        points = [t for t in self.saved if t <= step and t in states]
        if not points:
            return None
        at = max(points)
        saved = self.saved[at]
        divergence = Divergence(
            self.divergence.factor,
            self.divergence.losses[: saved.losses],
            {site: self.divergence.norms[site][:n] for site, n in saved.norms.items()},
        )
        return Fork(states[at], self.records[: saved.rows], divergence, saved.rule_state)

    def free_result(self, status: str, fields: dict) -> RunResult:
        result = self.result(status, **fields)
        return replace(result, seconds=0.0, shared_steps=len(result.steps))


@dataclass
class ShadowSet:
    """The observer (``runner.StepObserver``) of a control run followed by ``cells``."""

    experiment: Experiment
    config: SweepConfig
    cells: tuple[Cell, ...]
    budget: int | None = None  # bytes of snapshots it may hold (None: FORK_MEMORY_BUDGET)
    shadows: list[Shadow] = field(default_factory=list)
    states: dict[int, ControlState] = field(default_factory=dict)
    held: int = 0
    over_budget: int = 0
    off: str | None = None  # why nothing is shared in this run

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = FORK_MEMORY_BUDGET

    def start(self, run: Run) -> None:
        if run.sharded:
            self.off = "the model's gradients are sharded (DTensor)"
            return
        self.shadows = [Shadow(run, cell) for cell in self.cells]

    def observe(self, run: Run, step: int, measured: Measured, loss: float, lr: float, verdict: Any) -> None:
        following = [s for s in self.shadows if s.following]
        if not following:
            return
        by_norm_type: dict[float, Measured] = {}
        for shadow in following:
            q = shadow.cell.norm_type
            if q not in by_norm_type:
                by_norm_type[q] = (
                    replace(measured, extra=()) if q == run.cell.norm_type else _measure_in(run, shadow, measured)
                )
            shadow.follow(step, loss, by_norm_type[q], lr)
        if isinstance(verdict, Stop):  # the control stops here: a cell that does not leaves it
            for shadow in following:
                if shadow.following:
                    shadow.left_at = step
        control_diverges_here = isinstance(verdict, Stop) and verdict.status == DIVERGED
        wanted = [
            s
            for s in following
            if s.left_at == step or (s.stop is not None and self._needs_model(s.stop[1], control_diverges_here))
        ]
        if wanted and self._capture(run, step, measured):
            for shadow in following:
                shadow.save(step)

    def _needs_model(self, verdict: Stop, control_diverges_here: bool) -> bool:
        """A cell that diverges here is evaluated on the model as it is now: the control's
        ``evaluate`` gives the same only when the control diverges at this step too."""
        return verdict.status == DIVERGED and self.experiment.evaluate_fn is not None and not control_diverges_here

    def _capture(self, run: Run, step: int, measured: Measured) -> bool:
        if run.precision.scaled:  # the scaler's state mid-step (gradients unscaled) is not restored
            return False
        size = ControlState.size_of(run.model, run.optimizer)
        if self.held + size > self.budget:
            self.over_budget += 1
            return False
        losses = [_host_tensor(x) for x in measured.losses]
        state = ControlState.capture(
            step, run.model, run.optimizer, run.scheduler, run.stream.pulls, losses, run.device
        )
        self.states[step] = state
        self.held += size
        return True

    def outcomes(self, control: RunResult) -> Shared:
        """Once the control has ended: each cell free, forked or trained in full."""
        outcomes: dict[str, Free | Forked | Full] = {}
        evaluated = {k: getattr(control, k) for k in ("eval_metric", "eval_higher_is_better")}
        completed = control.status == STABLE and len(control.steps) == self.config.steps
        for shadow in self.shadows:
            outcomes[shadow.cell.run] = self._outcome(shadow, control, evaluated, completed)
        for cell in self.cells:
            outcomes.setdefault(cell.run, Full(self.off or "the control run shared nothing"))
        self.states = {}
        return Shared(control, outcomes, self.over_budget)

    def _outcome(self, shadow: Shadow, control: RunResult, evaluated: dict, completed: bool):
        if shadow.stop is not None:
            step, verdict = shadow.stop
            if verdict.status == NON_FINITE or self.experiment.evaluate_fn is None:
                return Free(shadow.free_result(verdict.status, verdict.fields))
            if control.status == DIVERGED and control.diverged_step == step:
                return Free(shadow.free_result(verdict.status, {**verdict.fields, **_present(evaluated)}))
            return self._forked(shadow, step)
        if shadow.left_at is not None:
            return self._forked(shadow, shadow.left_at)
        if completed:
            return Free(shadow.free_result(STABLE, _present(evaluated)))
        return Full(f"the control run ended with status {control.status} before this run's end")

    def _forked(self, shadow: Shadow, step: int) -> Forked | Full:
        fork = shadow.fork_from(self.states, step)
        if fork is None:
            return Full("no snapshot of the control: --amp fp16, or none within the memory budget")
        return Forked(fork)


def _present(evaluated: dict) -> dict:
    return {k: v for k, v in evaluated.items() if v is not None}


def _host_tensor(value: float) -> torch.Tensor:
    """A loss as a tensor that reads back as exactly ``value``."""
    return torch.tensor(value, dtype=torch.float64)


def _measure_in(run: Run, shadow: Shadow, control: Measured) -> Measured:
    """The control's step measured as ``shadow``'s cell measures it: its norm type, its layers."""
    q = shadow.cell.norm_type
    measured = engine.measure_grad_norms(run.named, q)
    groups, group_norms = shadow.grouping.combine(measured.names, measured.norms, q)
    values = values_on_host([measured.total_norm], group_norms, run.on_cpu)
    return Measured(
        losses=control.losses,
        norm_f=values[0],
        norm=measured.total_norm,
        layers=tuple(zip(groups, values[1:])),
        skipped=control.skipped,
    )


class _StepShadow:
    """One cell following a ``train_step`` control run: a dry ``Clip`` of its own (per-site
    rules and divergence test), its rows, and how it left."""

    def __init__(self, model: torch.nn.Module, cell: Cell, config: SweepConfig) -> None:
        self.cell = cell
        self.divergence = Divergence(config.divergence_factor)
        self.clip = Clip(model, cell, config, divergence=self.divergence)
        self.records: list = []
        self.stop: tuple[str, dict] | None = None
        self.stopped_at_end = False  # by its loss, once train_step returned (not at a clip call)
        self.acts = False

    @property
    def following(self) -> bool:
        return self.stop is None and not self.acts


@dataclass
class TrainStepShadows:
    """The observer (``train_step.ClipObserver``) of a ``train_step`` control run followed by
    ``cells``: each clip call judged and dry-clipped per cell, each step's end judged. The
    script's update is its own, so there is no state to capture between its clip calls: a cell
    is free or trains from step 1, it never forks."""

    experiment: Experiment
    config: SweepConfig
    cells: tuple[Cell, ...]
    model: torch.nn.Module
    shadows: list[_StepShadow] = field(default_factory=list)
    step: int = 0
    lr: float = math.nan

    def __post_init__(self) -> None:
        self.shadows = [_StepShadow(self.model, cell, self.config) for cell in self.cells]

    def start_step(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr
        for shadow in self.shadows:
            shadow.clip.reset()

    def at_clip(self, site: str, params: list, named: list, measured: Any) -> None:
        by_norm_type: dict[float, Any] = {}
        for shadow in (s for s in self.shadows if s.following):
            q = shadow.clip.norm_type
            if q not in by_norm_type:
                by_norm_type[q] = measured if q == CONTROL_NORM_TYPE else engine.measure_grad_norms(named, q)
            try:
                shadow.clip.judge_and_clip(site, params, named, by_norm_type[q], dry=True)
            except ClippingActs:
                shadow.acts = True
            except StopAtClip as stop:
                record, status, fields = stopped_at_clip(shadow.clip, stop, self.step, self.lr)
                shadow.records.append(record)
                shadow.stop = (status, fields)

    def end_step(self, step: int, loss: float | None, lr: float) -> None:
        for shadow in (s for s in self.shadows if s.following):
            record, status, fields = step_end(shadow.clip, shadow.divergence, step, loss, lr)
            shadow.records.append(record)
            if status is not None:
                shadow.stop, shadow.stopped_at_end = (status, fields), True

    def outcomes(self, control: RunResult) -> Shared:
        evaluated = _present({k: getattr(control, k) for k in ("eval_metric", "eval_higher_is_better")})
        completed = control.status == STABLE and len(control.steps) == self.config.steps
        outcomes: dict[str, Free | Forked | Full] = {}
        for shadow in self.shadows:
            if shadow.acts:
                outcome = Full("its clipping acts; a train_step script's cells do not fork")
            elif shadow.stop is not None:
                status, fields = shadow.stop
                if self.experiment.evaluate_fn is None or status != DIVERGED:
                    outcome = Free(self._result(shadow, status, fields))
                elif shadow.stopped_at_end and _diverged_at_end(control, fields["diverged_step"]):
                    outcome = Free(self._result(shadow, status, {**fields, **evaluated}))  # the same model
                else:
                    outcome = Full("evaluated where it diverges, a point the control did not stop at")
            elif completed:
                outcome = Free(self._result(shadow, STABLE, evaluated))
            else:
                outcome = Full(f"the control run ended with status {control.status} before this run's end")
            outcomes[shadow.cell.run] = outcome
        return Shared(control, outcomes)

    def _result(self, shadow: _StepShadow, status: str, fields: dict) -> RunResult:
        cell, records = shadow.cell, shadow.records
        checked = {"divergence_checked": shadow.divergence.active} if records else {}
        return RunResult(
            cell=cell,
            status=status,
            steps=list(records),
            lr=run_lr(self.experiment, self.config, cell),
            seed=self.config.seed_of(cell),
            shared_steps=len(records),
            **checked,
            **fields,
        )


def _diverged_at_end(control: RunResult, step: int) -> bool:
    """The ``train_step`` control diverged by its loss at ``step``, once ``train_step``
    returned (a stop at a clip call records no loss and its site no coefficient)."""
    if control.status != DIVERGED or control.diverged_step != step or not control.steps:
        return False
    last = control.steps[-1]
    return last.step == step and not math.isnan(last.loss) and not any(math.isnan(c) for _, _, c in last.sites)
