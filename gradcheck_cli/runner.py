"""One training burst for one cell: the training loop, top to bottom.

Before the first step: the snapshot's weights, RNG state and optimizer state are restored, the
run's lr (the ``--lr`` axis, when given) is set on every param group, a fresh learning-rate
scheduler is built when the script defines ``build_scheduler``, and a fresh fp16 gradient
scaler when ``--amp fp16`` (``precision.Precision``).

Per step (numbered from 1, ``config.steps`` optimizer steps):

1. zero the gradients; then for each of the ``config.accumulate`` micro-batches: take the
   next batch (``batches()`` is called afresh for every run and again whenever it runs out;
   tensors, also inside tuples, lists and dicts, move to ``config.device``),
   ``loss = loss_fn(model, batch)`` under autocast (``--amp``), check it is a scalar tensor,
   and backward ``loss / accumulate`` (times the scale with fp16);
2. with fp16, unscale the gradients; then the pre-clip gradient norms in the cell's norm type
   from one pass (``engine.measure_grad_norms``): the total and each tensor's norm; the
   tensors' norms are combined into per-layer norms on the device (``layers.LayerGrouping``,
   ``--layer-depth``). The control run measures L2 and, besides, the total in every other norm
   type of the grid;
3. **one host sync**: the micro-batch losses, the total, the control's extra totals, the
   scaler's inf flag and the per-layer norms come to the host together (``_to_host``); the
   step's loss is the mean of the micro-batch losses (under torchrun in model mode, also
   averaged over the ranks first: ``run_setup.mean_across_ranks``);
4. judge, from those numbers only:

   * loss non-finite: status ``non_finite``, source ``forward`` (with accumulation,
     ``nan_micro_batch`` says which micro-batch, from 1); stop;
   * loss above ``divergence_factor`` x the first step's loss: status ``diverged``; stop
     (judged only when the first loss is finite and positive, see
     ``detect.can_judge_divergence``);
   * fp16 and the scaler found inf/NaN in the unscaled gradients: the step is *skipped* (no
     clipping, no optimizer step, no scheduler step; the scale backs off) and recorded with
     ``skipped``; ``precision.MAX_CONSECUTIVE_SKIPS`` skips in a row are status
     ``non_finite``, source ``amp`` (the scale collapsed), with the first non-finite
     parameter; stop;
   * norm non-finite: status ``non_finite``, source ``backward``; the first parameter (in
     ``named_parameters()`` order) whose gradient holds a non-finite element is located now,
     at the onset step only, because that elementwise scan is expensive; stop *before*
     clipping (a NaN norm would make the clip coefficient NaN and spread NaN everywhere);

5. the cell's clipping mode acts on the finite gradients (``apply_clipping``): norm cells
   scale them by ``min(max_norm / (norm + 1e-6), 1)`` (``engine.clip_grads_with_norm_``),
   value cells clamp every element (``engine.clip_grad_value_``), AGC, AutoClip and ZClip
   cells apply their rule (``rules.py``) to the measured L2 norm; the control run never clips
   (its coefficient is 1.0);
6. ``optimizer.step()``, the scaler's update (fp16), ``scheduler.step()``, and record
   ``StepRecord(step, loss, grad_norm, clip_coef, clip_threshold, clipped_unit_frac, layers=...,
   lr=..., skipped=..., norms=...)``; ``lr`` is the first param group's learning rate used by
   this step.

Stateful rules (AutoClip's history, ZClip's statistics) are built afresh for every run, so
each run's rule starts empty, as every run starts from the same weights. They see finite
norms of steps that were taken only: a run stops at its first non-finite norm, before anything
is clipped, and a step the fp16 scaler skips is not clipped at all.

After the last step of a stable run, the script's optional ``evaluate(model)`` is called once
(``model.eval()``, ``torch.no_grad()``) and its number kept as ``eval_metric``.

A step that stops the run is recorded too, with its loss; its ``grad_norm`` is NaN when the loss
stopped it, and the non-finite norm when the gradients did; ``clip_coef`` is NaN in both cases.

Backward runs before the loss is judged so that a step needs only one host sync; when the loss
is non-finite or diverged the gradients are simply discarded (no clipping, no step).

Anything the user's code raises (``build_optimizer``, ``build_scheduler``, ``batches``,
``loss_fn``, backward through the user's graph, ``optimizer.step``, ``scheduler.step``) ends the
run with status ``error`` and the traceback trimmed to the user's file; ``KeyboardInterrupt``
always propagates. Failures inside gradclip itself (the engine) are not caught: they are bugs,
not verdicts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from gradcheck_cli import engine
from gradcheck_cli.config import DEFAULT_LR, SweepConfig, agc_excluded
from gradcheck_cli.detect import (
    FOREIGN_PARAMETERS,
    NO_MODEL_PARAMETERS,
    can_judge_divergence,
    degenerate_training,
    first_index,
    is_diverged,
    is_non_finite,
)
from gradcheck_cli.engine.distributed import any_dtensor
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
    make_rule,
    make_scheduler,
    mean_across_ranks,
    run_lr,
    start_run,
    to_device,
)
from gradcheck_cli.snapshot import Snapshot


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


def _first_non_finite_param(model: torch.nn.Module) -> str | None:
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


def evaluate_model(experiment: Experiment, model: torch.nn.Module) -> float:
    """The script's ``evaluate(model)`` as a float, in eval mode without gradients. Raises
    ``UserFailure`` when it raises or returns something that is not a single number."""
    fn = experiment.evaluate_fn
    model.eval()
    try:
        with torch.no_grad():
            value = call_user(experiment, fn, model)
    finally:
        model.train()
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise UserFailure(
            f"evaluate(model) must return a number, got {type_name(value)}", definition_site(fn, "evaluate")
        ) from None


def _to_host(scalars: list[torch.Tensor], vector: torch.Tensor, on_cpu: bool) -> list[float]:
    """``scalars`` then ``vector``'s elements as Python floats (exact: float32 and float64 both
    convert exactly). On an accelerator this is the step's one host sync: everything is stacked
    on the device in float64 and copied over at once. On the CPU there is nothing to
    synchronise, and reading each number directly saves the conversion kernels."""
    if on_cpu:
        return [t.item() for t in scalars] + vector.tolist()
    device = scalars[0].device
    parts = [t.to(device, torch.float64).reshape(1) for t in scalars] + [vector.to(device, torch.float64)]
    return torch.cat(parts).tolist()


def run_cell(
    experiment: Experiment,
    model: torch.nn.Module,
    cell: Cell,
    config: SweepConfig,
    *,
    snapshot: Snapshot | None = None,
    on_step: Callable[[int], None] | None = None,
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

    Returns a ``RunResult`` with status ``stable``, ``non_finite``, ``diverged`` or ``error``;
    never raises for the user's errors. ``KeyboardInterrupt`` propagates. A ``train_step``
    script is run by ``train_step.run_train_step_cell`` (``sweep.execute`` picks the loop);
    given one, this raises ``ValueError``.
    """
    if experiment.train_step_fn is not None:
        raise ValueError(
            f"{experiment.name} defines train_step: run it with train_step.run_train_step_cell (sweep.execute picks the loop)"
        )
    start = time.perf_counter()
    records: list[StepRecord] = []
    device = torch.device(config.device)
    on_cpu = device.type == "cpu"
    lr = config.lr_of(cell)
    reported = dict(lr=run_lr(experiment, config, cell), seed=config.seed_of(cell))

    optimizer_warnings: list[str] = []

    def finish(status: str, **kw: Any) -> RunResult:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        warnings = optimizer_warnings + degenerate_training(
            [r.loss for r in records], [r.grad_norm for r in records], cell.norm_type
        )
        if records:
            kw.setdefault(
                "divergence_checked",
                can_judge_divergence(records[0].loss) and math.isfinite(config.divergence_factor),
            )
        return RunResult(
            cell=cell,
            status=status,
            steps=records,
            seconds=time.perf_counter() - start,
            warnings=tuple(warnings),
            **reported,
            **kw,
        )

    try:
        optimizer = start_run(experiment, model, lr, snapshot)
        scheduler = make_scheduler(experiment, optimizer)
        precision = Precision(config.amp, device, config.amp_init_scale)
        accumulate = config.accumulate

        params = list(model.parameters())
        named = list(model.named_parameters())
        grouping = LayerGrouping(config.layer_depth)
        sharded = any_dtensor(params)
        # The control run also measures the total in every norm type of the grid, so that each
        # clipped cell can be compared with it on its own norm.
        extra_types = [] if cell.clipped else list(dict.fromkeys(config.norm_types))
        rule = make_rule(cell, config)
        clip_params = params
        if cell.mode == MODE_AGC and config.agc_exclude:
            clip_params = [p for n, p in model.named_parameters() if not agc_excluded(n, config.agc_exclude)]
        # Gradients of parameters the optimizer does not hold must not pile up across steps
        # (they would inflate the measured norm); zero them too, but only when there are any.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        zero_model_too = any(id(p) not in held for p in params)
        owned = {id(p) for p in params}
        if held - owned:
            optimizer_warnings.append(FOREIGN_PARAMETERS)
        if not held & owned:
            optimizer_warnings.append(NO_MODEL_PARAMETERS)
        stream = BatchStream(experiment)
        first_loss: float | None = None
        skips_in_a_row = 0

        for step in range(1, config.steps + 1):
            call_user(experiment, optimizer.zero_grad)
            if zero_model_too:
                model.zero_grad(set_to_none=True)

            losses: list[torch.Tensor] = []
            backward_error: UserFailure | None = None
            for _ in range(accumulate):
                batch = stream.next()
                if not on_cpu:
                    batch = to_device(batch, device)
                with precision.autocast():
                    loss = _check_loss(experiment, call_user(experiment, experiment.loss_fn, model, batch))
                losses.append(loss.detach())
                share = loss / accumulate if accumulate > 1 else loss
                try:
                    call_user(experiment, precision.backward_input(share).backward)
                except UserFailure as failure:
                    backward_error = failure
                    break
            step_lr = current_lr(optimizer)

            found_inf = None
            inf_flag = 0.0
            layers: tuple = ()
            extra: tuple = ()
            if backward_error is None:
                try:
                    precision.unscale_(optimizer)
                except (RuntimeError, ValueError) as exc:  # e.g. a model in half precision
                    raise UserFailure(
                        f"--amp fp16 cannot unscale this model's gradients ({describe_exception(exc)}); "
                        "keep the model's parameters in float32: autocast lowers the precision of the forward itself"
                    ) from exc
                if sharded:
                    # DTensor (FSDP2) gradients: the engine's global norm; per-layer norms of
                    # sharded parameters would need a collective per layer, so none are recorded.
                    norm = engine.get_total_norm([p.grad for p in params if p.grad is not None], cell.norm_type)
                    groups, group_norms = (), torch.zeros(0, dtype=torch.float64, device=norm.device)
                else:
                    measured = engine.measure_grad_norms(named, cell.norm_type)
                    norm = measured.total_norm
                    groups, group_norms = grouping.combine(measured.names, measured.norms, cell.norm_type)
                found_inf = precision.found_inf(optimizer)
                losses = mean_across_ranks(losses)  # under torchrun in model mode: every rank's mean
                scalars = [*losses, norm]
                if extra_types:
                    grads = [p.grad for p in params if p.grad is not None]
                    scalars += [norm if q == cell.norm_type else engine.get_total_norm(grads, q) for q in extra_types]
                if found_inf is not None:
                    scalars.append(found_inf)
                # The one host sync of the step: losses, totals, inf flag and per-layer norms together.
                values = _to_host(scalars, group_norms, on_cpu)
                n = len(losses)
                loss_values, norm_f = values[:n], values[n]
                extra = tuple(zip(extra_types, values[n + 1 : n + 1 + len(extra_types)]))
                if found_inf is not None:
                    inf_flag = values[len(scalars) - 1]
                layers = tuple(zip(groups, values[len(scalars) :]))
            else:
                loss_values, norm_f = [float(x) for x in losses], math.nan
            loss_f = loss_values[0] if len(loss_values) == 1 else sum(loss_values) / len(loss_values)

            # The loss is judged first: a NaN or exploding loss explains everything after it.
            if is_non_finite(loss_f):
                records.append(StepRecord(step, loss_f, lr=step_lr))
                micro = first_index(loss_values, is_non_finite)
                return finish(
                    NON_FINITE,
                    nan_step=step,
                    nan_source=SOURCE_FORWARD,
                    nan_micro_batch=micro + 1 if accumulate > 1 and micro is not None else None,
                )
            if step == 1:
                first_loss = loss_f
            elif is_diverged(loss_f, first_loss, config.divergence_factor):
                records.append(StepRecord(step, loss_f, lr=step_lr))
                return finish(DIVERGED, diverged_step=step)
            if backward_error is not None:
                raise backward_error

            if found_inf is not None and inf_flag > 0:
                # The scaler skips this step: no clipping, no optimizer or scheduler step.
                records.append(StepRecord(step, loss_f, norm_f, lr=step_lr, skipped=True))
                precision.update()
                skips_in_a_row += 1
                if skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    return finish(
                        NON_FINITE,
                        nan_step=step,
                        nan_source=SOURCE_AMP,
                        nan_param=_first_non_finite_param(model),
                    )
                if on_step is not None:
                    on_step(step)
                continue
            skips_in_a_row = 0

            if is_non_finite(norm_f):
                records.append(StepRecord(step, loss_f, norm_f, layers=layers, lr=step_lr, norms=extra))
                return finish(
                    NON_FINITE,
                    nan_step=step,
                    nan_source=SOURCE_BACKWARD,
                    nan_param=_first_non_finite_param(model),
                )

            coef, threshold, unit_frac = apply_clipping(cell, rule, clip_params, norm, norm_f)
            _step(experiment, optimizer, lr if lr is not None else DEFAULT_LR)
            precision.update()
            if scheduler is not None:
                call_user(experiment, scheduler.step)
            records.append(
                StepRecord(step, loss_f, norm_f, coef, threshold, unit_frac, layers=layers, lr=step_lr, norms=extra)
            )
            if on_step is not None:
                on_step(step)

        if experiment.evaluate_fn is not None:
            return finish(
                STABLE,
                eval_metric=evaluate_model(experiment, model),
                eval_higher_is_better=experiment.evaluate_higher_is_better,
            )
        return finish(STABLE)
    except UserFailure as failure:
        return finish(ERROR, error=failure.error, error_traceback=failure.user_traceback)
