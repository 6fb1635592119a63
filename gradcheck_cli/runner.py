"""One run of a ``loss_fn`` script: the training loop, top to bottom.

``run_cell`` restores the seed's starting state, builds the run's optimizer, scheduler and
scaler, then per step: zero the gradients, forward and backward every micro-batch, measure the
pre-clip norms in one pass, bring the step's numbers to the host in one sync, judge them (loss,
fp16 skip, non-finite norm, the norm about to be applied) and only then clip, step and record.
The order, the verdicts and what a failure in the user's code becomes are described in
docs/contract.md ("How a run executes"), divergence in docs/diagnosis.md ("Divergence"); a
``train_step`` script runs in ``train_step.py`` instead.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from gradcheck_cli import engine
from gradcheck_cli.config import DEFAULT_LR, SweepConfig, agc_excluded
from gradcheck_cli.detect import (
    FOREIGN_PARAMETERS,
    NO_MODEL_PARAMETERS,
    Divergence,
    degenerate_training,
    first_index,
    is_non_finite,
)
from gradcheck_cli.engine.distributed import any_dtensor
from gradcheck_cli.forks import Fork
from gradcheck_cli.layers import LayerGrouping
from gradcheck_cli.loader import Experiment, definition_site, describe_exception, type_name
from gradcheck_cli.precision import MAX_CONSECUTIVE_SKIPS, Precision
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_AGC,
    NON_FINITE,
    SOURCE_AMP,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
)
from gradcheck_cli.run_setup import (
    BatchStream,
    UserFailure,
    apply_clipping,
    call_user,
    current_lr,
    evaluation,
    judged_norm,
    make_rule,
    make_scheduler,
    mean_across_ranks,
    run_lr,
    start_run,
    to_device,
)
from gradcheck_cli.snapshot import Snapshot


def run_cell(
    experiment: Experiment,
    model: torch.nn.Module,
    cell: Cell,
    config: SweepConfig,
    *,
    snapshot: Snapshot | None = None,
    on_step: Callable[[int], None] | None = None,
    observer: StepObserver | None = None,
    fork: Fork | None = None,
) -> RunResult:
    """Train ``model`` for ``config.steps`` steps under ``cell``'s clipping and judge the run.

    With ``snapshot``, the model weights and the RNG state are restored first, and the freshly
    built optimizer is loaded with the snapshot's optimizer state, so the run starts exactly
    where every other run of the sweep with the same seed starts. ``model`` must already be on
    ``config.device``.

    The optimizer (and the scheduler, if any) is built per run (``make_optimizer``): a fresh
    object carries no hidden attributes over from an earlier run, and loading the snapshot's
    state makes its starting state identical even if ``build_optimizer`` is itself stateful.

    ``on_step(step)`` is called after each completed step, skipped ones included (progress bars).

    ``observer`` (the control run of a sweep that shares it with its cells,
    ``shadows.ShadowSet``) sees every step once it is judged, before anything is clipped or
    updated. With ``fork`` the run starts at ``fork.step`` from the control's state there
    instead of at step 1 (``snapshot`` still gives the state every run starts from).

    Returns a ``RunResult`` with status ``stable``, ``non_finite``, ``diverged`` or ``error``;
    never raises for the user's errors. ``KeyboardInterrupt`` propagates. A ``train_step``
    script is run by ``train_step.run_train_step_cell`` (``sweep.execute`` picks the loop);
    given one, this raises ``ValueError``.
    """
    if experiment.train_step_fn is not None:
        raise ValueError(
            f"{experiment.name} defines train_step: run it with train_step.run_train_step_cell (sweep.execute picks the loop)"
        )
    run = Run(experiment, model, cell, config, observer)
    try:
        run.prepare(snapshot, fork)
        first = 1 if fork is None else fork.step
        for step in range(first, config.steps + 1):
            stopped = run.step(step) if step != first or fork is None else run.resume(fork)
            if stopped is not None:
                return stopped
            if on_step is not None:
                on_step(step)
        return run.finish_stable()
    except UserFailure as failure:
        return run.finish(ERROR, error=failure.error, error_traceback=failure.user_traceback)


@dataclass
class Measured:
    """A step's numbers on the host: the micro-batches' losses, the pre-clip total (``norm`` on
    the device, ``norm_f`` on the host), the control run's totals in the grid's other norm types,
    the per-layer norms, and whether the fp16 scaler skips the step."""

    losses: list[float]
    norm_f: float = math.nan
    norm: torch.Tensor | None = None
    extra: tuple = ()
    layers: tuple = ()
    skipped: bool = False

    @property
    def loss(self) -> float:
        """The step's loss: the micro-batches' mean."""
        values = self.losses
        return values[0] if len(values) == 1 else sum(values) / len(values)


class StepObserver(Protocol):
    """Sees each step of a run once it is judged: ``verdict`` is ``None`` when the update
    follows, ``SKIP`` for a step the fp16 scaler skips, else the ``Stop`` that ends the run."""

    def start(self, run: Run) -> None: ...

    def observe(self, run: Run, step: int, measured: Measured, loss: float, lr: float, verdict: Any) -> None: ...


@dataclass
class Stop:
    """A verdict that ends the run at this step: its status and the result's fields."""

    status: str
    fields: dict


SKIP = "skip"  # the verdict of a step the fp16 scaler skips


class Run:
    """The state of one run of ``run_cell`` between its steps, and the steps themselves.

    A step is measured (``_measure``), judged (``judge``: a ``Stop``, ``SKIP`` or ``None``),
    shown to the observer, then concluded: the run stops, the scaler skips, or the gradients
    are clipped and the optimizer steps (``_update``). ``shadows.Shadow`` reuses the judging
    and the rows for a cell that follows the control without training."""

    def __init__(
        self,
        experiment: Experiment,
        model: torch.nn.Module,
        cell: Cell,
        config: SweepConfig,
        observer: StepObserver | None = None,
    ) -> None:
        self.observer = observer
        self.start = time.perf_counter()
        self.experiment, self.model, self.cell, self.config = experiment, model, cell, config
        self.records: list[StepRecord] = []
        self.device = torch.device(config.device)
        self.on_cpu = self.device.type == "cpu"
        self.lr = config.lr_of(cell)
        self.reported = dict(lr=run_lr(experiment, config, cell), seed=config.seed_of(cell))
        self.optimizer_warnings: list[str] = []
        self.divergence = Divergence(config.divergence_factor)
        self.skips_in_a_row = 0

    def prepare(self, snapshot: Snapshot | None, fork: Fork | None = None) -> None:
        """Restore the starting state and build what every step uses: the optimizer, scheduler
        and scaler, the parameters measured and clipped, the cell's rule, the batches; then,
        with ``fork``, move all of it to the control's state at the fork's step."""
        experiment, model, cell, config = self.experiment, self.model, self.cell, self.config
        self.optimizer = start_run(experiment, model, self.lr, snapshot)
        self.scheduler = make_scheduler(experiment, self.optimizer)
        self.precision = Precision(config.amp, self.device, config.amp_init_scale)
        self.params = list(model.parameters())
        self.named = list(model.named_parameters())
        self.grouping = LayerGrouping(config.layer_depth)
        self.sharded = any_dtensor(self.params)
        # The control run also measures the total in every norm type of the grid, so that each
        # clipped cell can be compared with it on its own norm.
        self.extra_types = [] if cell.clipped else list(dict.fromkeys(config.norm_types))
        self.rule = make_rule(cell, config)
        self.clip_params = self.params
        if cell.mode == MODE_AGC and config.agc_exclude:
            self.clip_params = [p for n, p in model.named_parameters() if not agc_excluded(n, config.agc_exclude)]
        # Gradients of parameters the optimizer does not hold must not pile up across steps
        # (they would inflate the measured norm); zero them too, but only when there are any.
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        self.zero_model_too = any(id(p) not in held for p in self.params)
        owned = {id(p) for p in self.params}
        if held - owned:
            self.optimizer_warnings.append(FOREIGN_PARAMETERS)
        if not held & owned:
            self.optimizer_warnings.append(NO_MODEL_PARAMETERS)
        self.stream = BatchStream(experiment, record_rng=self.device if self.observer is not None else None)
        if fork is not None:
            self._move_to(fork)
        if self.observer is not None:
            self.observer.start(self)

    def _move_to(self, fork: Fork) -> None:
        """The control's state at ``fork.step`` (its gradients measured, nothing updated), and
        this cell's own rows, divergence test and rule state from before that step."""
        self.stream.fast_forward(fork.state.pulls)
        fork.state.restore(self.model, self.optimizer, self.scheduler)
        self.records = list(fork.records)
        self.divergence = copy.deepcopy(fork.divergence)
        if fork.rule_state is not None:
            self.rule.load_state_dict(copy.deepcopy(fork.rule_state))
        fork.state.restore_rng()

    def resume(self, fork: Fork) -> RunResult | None:
        """``step`` at the fork's step, from the gradients the control measured there."""
        losses = [loss.to(self.device) for loss in fork.state.losses]
        return self.conclude(fork.step, self._measure(losses), None, current_lr(self.optimizer))

    def step(self, step: int) -> RunResult | None:
        """One optimizer step; the run's result when this step ends the run, else ``None``."""
        losses, backward_error = self._forward_backward()
        step_lr = current_lr(self.optimizer)
        if backward_error is None:
            measured = self._measure(losses)
        else:
            measured = Measured([float(x) for x in losses])
        return self.conclude(step, measured, backward_error, step_lr)

    def conclude(
        self, step: int, measured: Measured, backward_error: UserFailure | None, step_lr: float
    ) -> RunResult | None:
        """Judge the measured step, show it to the observer, then stop, skip or update."""
        loss_f = measured.loss
        verdict = self.judge(step, loss_f, measured, backward_error, step_lr)
        if self.observer is not None:
            self.observer.observe(self, step, measured, loss_f, step_lr, verdict)
        if verdict is SKIP:
            return self._skip()
        if verdict is not None:
            return self.finish(verdict.status, **verdict.fields)
        self._update(step, loss_f, measured, step_lr)
        return None

    def judge(
        self, step: int, loss_f: float, measured: Measured, backward_error: UserFailure | None, step_lr: float
    ) -> Stop | str | None:
        """The step's verdict, its row recorded when it ends the run or is skipped. The loss is
        judged first: a NaN or exploding loss explains everything after it."""
        stopped = self._judge_loss(step, loss_f, measured.losses, step_lr)
        if stopped is not None:
            return stopped
        if backward_error is not None:
            raise backward_error
        if measured.skipped:
            self.records.append(StepRecord(step, loss_f, measured.norm_f, lr=step_lr, skipped=True))
            return SKIP
        self.skips_in_a_row = 0
        if is_non_finite(measured.norm_f):
            self.records.append(
                StepRecord(step, loss_f, measured.norm_f, layers=measured.layers, lr=step_lr, norms=measured.extra)
            )
            return Stop(
                NON_FINITE,
                dict(nan_step=step, nan_source=SOURCE_BACKWARD, nan_param=first_non_finite_param(self.model)),
            )
        if self.divergence.norm_diverged(judged_norm(self.cell, measured.norm_f)):
            # stopped before the update: the step's norm is recorded, no coefficient applied
            self.records.append(
                StepRecord(step, loss_f, measured.norm_f, layers=measured.layers, lr=step_lr, norms=measured.extra)
            )
            return Stop(DIVERGED, dict(diverged_step=step))
        return None

    def _forward_backward(self) -> tuple[list[torch.Tensor], UserFailure | None]:
        """Zero the gradients, then forward and backward each micro-batch. Returns the
        micro-batches' losses (detached) and the failure of a backward, if one raised: the
        loss is judged before that failure ends the run."""
        experiment, model, accumulate = self.experiment, self.model, self.config.accumulate
        call_user(experiment, self.optimizer.zero_grad)
        if self.zero_model_too:
            model.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        for _ in range(accumulate):
            batch = self.stream.next()
            if not self.on_cpu:
                batch = to_device(batch, self.device)
            with self.precision.autocast():
                loss = _check_loss(experiment, call_user(experiment, experiment.loss_fn, model, batch))
            losses.append(loss.detach())
            share = loss / accumulate if accumulate > 1 else loss
            try:
                call_user(experiment, self.precision.backward_input(share).backward)
            except UserFailure as failure:
                return losses, failure
        return losses, None

    def _measure(self, losses: list[torch.Tensor]) -> Measured:
        """Unscale (fp16), measure the pre-clip norms in one pass, and bring the losses, the
        totals, the scaler's inf flag and the per-layer norms to the host together: the one
        host sync of the step."""
        cell, params = self.cell, self.params
        try:
            self.precision.unscale_(self.optimizer)
        except (RuntimeError, ValueError) as exc:  # e.g. a model in half precision
            raise UserFailure(
                f"--amp fp16 cannot unscale this model's gradients ({describe_exception(exc)}); "
                "keep the model's parameters in float32: autocast lowers the precision of the forward itself"
            ) from exc
        if self.sharded:
            # DTensor (FSDP2) gradients: the engine's global norm; per-layer norms of
            # sharded parameters would need a collective per layer, so none are recorded.
            norm = engine.get_total_norm([p.grad for p in params if p.grad is not None], cell.norm_type)
            groups, group_norms = (), torch.zeros(0, dtype=torch.float64, device=norm.device)
        else:
            measured = engine.measure_grad_norms(self.named, cell.norm_type)
            norm = measured.total_norm
            groups, group_norms = self.grouping.combine(measured.names, measured.norms, cell.norm_type)
        found_inf = self.precision.found_inf(self.optimizer)
        losses = mean_across_ranks(losses)  # under torchrun in model mode: every rank's mean
        scalars = [*losses, norm]
        extra_types = self.extra_types
        if extra_types:
            grads = [p.grad for p in params if p.grad is not None]
            scalars += [norm if q == cell.norm_type else engine.get_total_norm(grads, q) for q in extra_types]
        if found_inf is not None:
            scalars.append(found_inf)
        values = values_on_host(scalars, group_norms, self.on_cpu)
        n = len(losses)
        return Measured(
            losses=values[:n],
            norm_f=values[n],
            norm=norm,
            extra=tuple(zip(extra_types, values[n + 1 : n + 1 + len(extra_types)])),
            layers=tuple(zip(groups, values[len(scalars) :])),
            skipped=found_inf is not None and values[len(scalars) - 1] > 0,
        )

    def _judge_loss(self, step: int, loss_f: float, loss_values: list[float], step_lr: float) -> Stop | None:
        """The verdict when the step's loss is non-finite or diverged, else ``None``."""
        if is_non_finite(loss_f):
            self.records.append(StepRecord(step, loss_f, lr=step_lr))
            micro = first_index(loss_values, is_non_finite)
            return Stop(
                NON_FINITE,
                dict(
                    nan_step=step,
                    nan_source=SOURCE_FORWARD,
                    nan_micro_batch=micro + 1 if self.config.accumulate > 1 and micro is not None else None,
                ),
            )
        if self.divergence.loss_diverged(loss_f):
            self.records.append(StepRecord(step, loss_f, lr=step_lr))
            return Stop(DIVERGED, dict(diverged_step=step))
        return None

    def _skip(self) -> RunResult | None:
        """After a step the fp16 scaler skips (recorded by ``judge``): no clipping, no
        optimizer or scheduler step. Too many in a row end the run: the scale has collapsed."""
        step = self.records[-1].step
        self.precision.update()
        self.skips_in_a_row += 1
        if self.skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
            return self.finish(
                NON_FINITE,
                nan_step=step,
                nan_source=SOURCE_AMP,
                nan_param=first_non_finite_param(self.model),
            )
        return None

    def _update(self, step: int, loss_f: float, measured: Measured, step_lr: float) -> None:
        """Clip the finite gradients as the cell says, step the optimizer, the scaler and the
        scheduler, and record the step."""
        clipping = apply_clipping(self.cell, self.rule, self.clip_params, measured.norm, measured.norm_f)
        _step(self.experiment, self.optimizer, self.lr if self.lr is not None else DEFAULT_LR)
        self.precision.update()
        if self.scheduler is not None:
            call_user(self.experiment, self.scheduler.step)
        self.records.append(updated_row(step, loss_f, measured, step_lr, clipping))

    def finish_stable(self) -> RunResult:
        """The result of a run that took every step: stable, with the script's ``evaluate``."""
        return self.finish(STABLE)

    def finish(self, status: str, **kw: Any) -> RunResult:
        """The run's result with ``status``: its steps so far, time, warnings and ``kw``; a
        stable or diverged run with the script's ``evaluate`` (``run_setup.evaluation``)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        kw.update(evaluation(self.experiment, self.model, status))
        return self.result(status, **kw)

    def result(self, status: str, **kw: Any) -> RunResult:
        """The run's result with ``status`` and ``kw`` as they stand (``finish`` without
        ``evaluate``)."""
        records = self.records
        warnings = self.optimizer_warnings + degenerate_training(
            [r.loss for r in records], [r.grad_norm for r in records], self.cell.norm_type
        )
        if records:
            kw.setdefault("divergence_checked", self.divergence.active)
        return RunResult(
            cell=self.cell,
            status=status,
            steps=records,
            seconds=time.perf_counter() - self.start,
            warnings=tuple(warnings),
            **self.reported,
            **kw,
        )


def updated_row(
    step: int, loss_f: float, measured: Measured, step_lr: float, clipping: tuple[float, float, float]
) -> StepRecord:
    """The row of a step whose update was made: ``clipping`` is ``apply_clipping``'s
    ``(clip_coef, clip_threshold, clipped_unit_frac)``."""
    coef, threshold, unit_frac = clipping
    return StepRecord(
        step,
        loss_f,
        measured.norm_f,
        coef,
        threshold,
        unit_frac,
        layers=measured.layers,
        lr=step_lr,
        norms=measured.extra,
    )


def _check_loss(experiment: Experiment, loss: Any) -> torch.Tensor:
    """The loss as a 0-dim tensor; ``UserFailure`` when it is not a one-element tensor that can
    be differentiated."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad:
        return loss.reshape(())  # the healthy path: no message to build
    site = definition_site(experiment.loss_fn, "loss_fn")
    if not isinstance(loss, torch.Tensor):
        raise UserFailure(f"loss_fn must return a scalar tensor, got {type_name(loss)}", site)
    if loss.numel() != 1:
        raise UserFailure(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}", site)
    if not loss.requires_grad:
        raise UserFailure(
            "loss_fn returned a tensor that does not require grad: compute it from the model's "
            "output, without .detach(), .item() or torch.no_grad()",
            site,
        )
    return loss.reshape(())


def first_non_finite_param(model: torch.nn.Module) -> str | None:
    """Name of the first parameter, in ``named_parameters()`` order, whose gradient holds a
    NaN or inf. Elementwise over every gradient: call it at the onset step only.

    A sparse gradient is judged by its coalesced values, the ones the engine measures:
    duplicate entries are summed first (two finite entries can sum to inf)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce().values()
            if not bool(torch.isfinite(grad).all()):
                return name
    return None


def _step(experiment: Experiment, optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``optimizer.step()``; a failure of the default SGD is said to come from ``--lr``."""
    if experiment.build_optimizer_fn is not None:
        call_user(experiment, optimizer.step)
        return
    try:
        optimizer.step()
    except Exception as exc:
        raise UserFailure(
            f"the default SGD with --lr {lr!r} failed: {describe_exception(exc)}; "
            "choose a smaller --lr, or define build_optimizer(model) in the script"
        ) from exc


def values_on_host(scalars: list[torch.Tensor], vector: torch.Tensor, on_cpu: bool) -> list[float]:
    """``scalars`` then ``vector``'s elements as Python floats (exact: float32 and float64 both
    convert exactly). On an accelerator this is the step's one host sync: everything is stacked
    on the device in float64 and copied over at once. On the CPU there is nothing to
    synchronise, and reading each number directly saves the conversion kernels."""
    if on_cpu:
        return [t.item() for t in scalars] + vector.tolist()
    device = scalars[0].device
    parts = [t.to(device, torch.float64).reshape(1) for t in scalars] + [vector.to(device, torch.float64)]
    return torch.cat(parts).tolist()
