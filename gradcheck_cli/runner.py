"""One training burst for one cell: the training loop, top to bottom.

Per step (numbered from 1, ``config.steps`` optimizer steps):

1. take the next batch; ``batches()`` is called afresh for every run and again whenever it
   runs out; tensors (also inside tuples, lists and dicts) move to ``config.device``;
2. zero the gradients, ``loss = loss_fn(model, batch)``, check it is a scalar tensor;
3. ``loss.backward()``, then the pre-clip total norm of the gradients in the cell's norm type
   (``engine.get_total_norm``; the control run measures L2);
4. **one host sync**: the loss and the norm come to the host together (``.tolist()`` once);
5. judge, from those two numbers only:

   * loss non-finite: status ``non_finite``, source ``forward``; stop;
   * loss above ``divergence_factor`` x the first step's loss: status ``diverged``; stop
     (judged only when the first loss is finite and positive, see
     ``detect.can_judge_divergence``);
   * norm non-finite: status ``non_finite``, source ``backward``; the first parameter (in
     ``named_parameters()`` order) whose gradient holds a non-finite element is located now,
     at the onset step only, because that elementwise scan is expensive; stop *before*
     clipping (a NaN norm would make the clip coefficient NaN and spread NaN everywhere);

6. clipped cells scale the gradients by ``min(max_norm / (norm + 1e-6), 1)``
   (``engine.clip_grads_with_norm_``); the control run never clips (its coefficient is 1.0);
7. ``optimizer.step()`` and record ``StepRecord(step, loss, grad_norm, clip_coef)``.

A step that stops the run is recorded too, with its loss; its ``grad_norm`` is NaN when the loss
stopped it, and the non-finite norm when the gradients did; ``clip_coef`` is NaN in both cases.

Backward runs before the loss is judged so that a step needs only one host sync; when the loss
is non-finite or diverged the gradients are simply discarded (no clipping, no step).

Anything the user's code raises (``build_optimizer``, ``batches``, ``loss_fn``, backward through
the user's graph, ``optimizer.step``) ends the run with status ``error`` and the traceback trimmed
to the user's file; ``KeyboardInterrupt`` always propagates. Failures inside gradclip itself
(the engine) are not caught: they are bugs, not verdicts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch

from gradcheck_cli import engine
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.detect import clip_coefficient, is_diverged, is_non_finite
from gradcheck_cli.loader import Experiment, definition_site, describe_exception, type_name
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
)
from gradcheck_cli.snapshot import Snapshot


class UserFailure(Exception):
    """The user's code raised, or broke the contract, during a run.

    ``error`` is ``"ExceptionType: message"`` (or the contract message), ``user_traceback`` the
    trimmed traceback (or where the offending function is defined)."""

    def __init__(self, error: str, user_traceback: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.user_traceback = user_traceback or None


def call_user(experiment: Experiment, fn: Callable, *args: Any) -> Any:
    """Call user code; anything it raises becomes ``UserFailure`` (``KeyboardInterrupt`` passes).

    ``SystemExit`` is caught too: a stray ``sys.exit()`` in the user's loss must not end the
    whole sweep without a report."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:
        raise UserFailure(describe_exception(exc), experiment.format_traceback(exc)) from exc


def error_result(cell: Cell, failure: UserFailure, steps: list[StepRecord] | None = None, seconds: float = 0.0) -> RunResult:
    """A ``RunResult`` with status ``error`` for ``failure``."""
    return RunResult(
        cell=cell,
        status=ERROR,
        steps=list(steps or []),
        seconds=seconds,
        error=failure.error,
        error_traceback=failure.user_traceback,
    )


def make_optimizer(experiment: Experiment, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The script's ``build_optimizer(model)`` if it defines one, else ``SGD(lr=lr)``.

    Raises ``UserFailure`` when ``build_optimizer`` raises or returns something that is not a
    ``torch.optim.Optimizer``."""
    fn = experiment.build_optimizer_fn
    if fn is None:
        return torch.optim.SGD(model.parameters(), lr=lr)
    optimizer = call_user(experiment, fn, model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserFailure(
            f"build_optimizer(model) must return a torch.optim.Optimizer, got {type_name(optimizer)}",
            definition_site(fn, "build_optimizer"),
        )
    return optimizer


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``, looking inside tuples (named tuples
    too), lists and dicts; anything else is returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device) for b in batch]
        try:
            return type(batch)(moved)
        except TypeError:
            return moved if isinstance(batch, list) else tuple(moved)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    return batch


class BatchStream:
    """Endless batches from ``batches()``: called on first use and again each time it runs out.

    Raises ``UserFailure`` when ``batches()`` raises, returns something that is not iterable, or
    yields nothing at all (on the first call or after a pass)."""

    def __init__(self, experiment: Experiment) -> None:
        self._experiment = experiment
        self._it = None
        self._passes = 0
        self._in_pass = 0

    def _fresh(self) -> None:
        fn = self._experiment.batches_fn
        iterable = call_user(self._experiment, fn)
        try:
            self._it = iter(iterable)
        except TypeError:
            raise UserFailure(
                f"batches() must return an iterable of batches, got {type_name(iterable)}",
                definition_site(fn, "batches"),
            ) from None
        self._passes += 1
        self._in_pass = 0

    def _pull(self) -> tuple[bool, Any]:
        try:
            return True, next(self._it)
        except StopIteration:
            return False, None
        except (Exception, SystemExit) as exc:  # raised by the user's generator or dataset
            raise UserFailure(describe_exception(exc), self._experiment.format_traceback(exc)) from exc

    def next(self) -> Any:
        if self._it is None:
            self._fresh()
        ok, batch = self._pull()
        if not ok:
            previous = self._in_pass
            self._fresh()
            ok, batch = self._pull()
            if not ok:
                fn = self._experiment.batches_fn
                if self._passes == 1 or previous == 0:
                    msg = "batches() yielded no batches: it must return a non-empty iterable"
                else:
                    msg = (
                        f"batches() yielded no batches when called again after its first pass of "
                        f"{previous} batches ran out; it must return a fresh iterable on every call"
                    )
                raise UserFailure(msg, definition_site(fn, "batches"))
        self._in_pass += 1
        return batch


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
    NaN or inf. Elementwise over every gradient: call it at the onset step only."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return name
    return None


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
    where every other run of the sweep starts. ``model`` must already be on ``config.device``.

    The optimizer is built per run (``make_optimizer``): a fresh object carries no hidden
    attributes over from an earlier run, and loading the snapshot's state makes its starting
    state identical even if ``build_optimizer`` is itself stateful.

    ``on_step(step)`` is called after each completed step (progress bars).

    Returns a ``RunResult`` with status ``stable``, ``non_finite``, ``diverged`` or ``error``;
    never raises for the user's errors. ``KeyboardInterrupt`` propagates.
    """
    start = time.perf_counter()
    records: list[StepRecord] = []
    device = torch.device(config.device)
    on_cpu = device.type == "cpu"

    def finish(status: str, **kw: Any) -> RunResult:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return RunResult(cell=cell, status=status, steps=records, seconds=time.perf_counter() - start, **kw)

    try:
        if snapshot is not None:
            snapshot.restore_model(model)
            snapshot.restore_rng()
        model.train()
        optimizer = make_optimizer(experiment, model, config.lr)
        if snapshot is not None:
            try:
                snapshot.restore_optimizer(optimizer)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise UserFailure(
                    "build_optimizer(model) returned an optimizer that does not match the first "
                    f"one it built ({describe_exception(exc)}); it must build the same optimizer on every call",
                    definition_site(experiment.build_optimizer_fn, "build_optimizer")
                    if experiment.build_optimizer_fn
                    else None,
                ) from exc

        params = list(model.parameters())
        # Gradients of parameters the optimizer does not hold must not pile up across steps
        # (they would inflate the measured norm); zero them too, but only when there are any.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        zero_model_too = any(id(p) not in held for p in params)
        stream = BatchStream(experiment)
        first_loss: float | None = None

        for step in range(1, config.steps + 1):
            batch = stream.next()
            if not on_cpu:
                batch = to_device(batch, device)
            call_user(experiment, optimizer.zero_grad)
            if zero_model_too:
                model.zero_grad(set_to_none=True)

            loss = _check_loss(experiment, call_user(experiment, experiment.loss_fn, model, batch))
            backward_error: UserFailure | None = None
            try:
                call_user(experiment, loss.backward)
            except UserFailure as failure:
                backward_error = failure

            if backward_error is None:
                grads = [p.grad for p in params if p.grad is not None]
                norm = engine.get_total_norm(grads, cell.norm_type)
                # The one host sync of the step: loss and pre-clip norm come over together.
                loss_f, norm_f = torch.stack(
                    [loss.detach().to(torch.float64), norm.detach().to(loss.device, torch.float64)]
                ).tolist()
            else:
                loss_f, norm_f = float(loss.detach()), math.nan

            # The loss is judged first: a NaN or exploding loss explains everything after it.
            if is_non_finite(loss_f):
                records.append(StepRecord(step, loss_f))
                return finish(NON_FINITE, nan_step=step, nan_source=SOURCE_FORWARD)
            if step == 1:
                first_loss = loss_f
            elif is_diverged(loss_f, first_loss, config.divergence_factor):
                records.append(StepRecord(step, loss_f))
                return finish(DIVERGED, diverged_step=step)
            if backward_error is not None:
                raise backward_error
            if is_non_finite(norm_f):
                records.append(StepRecord(step, loss_f, norm_f))
                return finish(
                    NON_FINITE,
                    nan_step=step,
                    nan_source=SOURCE_BACKWARD,
                    nan_param=_first_non_finite_param(model),
                )

            if cell.clipped:
                coef = clip_coefficient(norm_f, cell.max_norm)
                engine.clip_grads_with_norm_(params, cell.max_norm, norm)
            else:
                coef = 1.0  # the control run only measures; it never clips
            call_user(experiment, optimizer.step)
            records.append(StepRecord(step, loss_f, norm_f, coef))
            if on_step is not None:
                on_step(step)

        return finish(STABLE)
    except UserFailure as failure:
        return finish(ERROR, error=failure.error, error_traceback=failure.user_traceback)
