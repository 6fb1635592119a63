"""The per-step recorder behind ``GradMonitor`` and the framework callbacks: measure the
pre-clip gradients once per step, judge the step, keep its record, write the files.
See docs/monitor.md."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli import engine
from gradcheck_cli.detect import Divergence, is_diverged
from gradcheck_cli.layers import AUTO, LayerGrouping
from gradcheck_cli.report.files import prepare_out_dir
from gradcheck_cli.report.live import LiveRunWriter
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_VALUE,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
)

DEFAULT_RUN = "monitor"
DEFAULT_OUT = "gradclip-monitor"
# Who clips when the training calls torch.nn.utils.clip_grad_norm_ on the monitored model:
# gradclip's engine, reusing the measuring pass (one pass), or torch's own function after the
# engine has measured (two passes, training bit-identical to an unmonitored run).
CLIP_ENGINE = "engine"
CLIP_TORCH = "torch"
CLIP_CHOICES = (CLIP_ENGINE, CLIP_TORCH)

__all__ = [
    "CLIP_CHOICES",
    "CLIP_ENGINE",
    "CLIP_TORCH",
    "DEFAULT_OUT",
    "DEFAULT_RUN",
    "NonFiniteError",
    "StepRecorder",
    "first_param_lr",
]


class NonFiniteError(RuntimeError):
    """Training reached a non-finite loss or gradient. ``GradMonitor(stop_on_non_finite=True)``
    raises it from ``optimizer.step()`` before the update; the framework callbacks log it."""

    def __init__(self, step: int, source: str, param: str | None, value: float) -> None:
        what = "loss" if source == SOURCE_FORWARD else "pre-clip gradient norm"
        where = f"; first non-finite gradient: {param}" if param else ""
        super().__init__(f"non-finite {what} ({value}) at optimizer step {step} ({source}){where}")
        self.step = step
        self.source = source
        self.param = param


def _describe(exc: BaseException) -> str:
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


class StepRecorder:
    """Per-step measurement and bookkeeping shared by ``GradMonitor`` and the framework callbacks.

    The producer calls, per optimizer step: ``add_loss`` (any number of times), ``measure``
    (at the pre-clip moment; later calls in the same step do nothing), ``note_clip`` (after each
    clip call), then ``finish_step``, which syncs once, judges, records and returns the step's
    event (``None``, or the ``NonFiniteError`` describing the first non-finite step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        out: str | Path = DEFAULT_OUT,
        *,
        run: str = DEFAULT_RUN,
        layer_depth: int | str | None = AUTO,
        write_every: int = 100,
        divergence_factor: float | None = 10.0,
        norm_type: float = 2.0,
        clip: str = CLIP_ENGINE,
    ) -> None:
        if write_every < 1:
            raise ValueError(f"write_every must be a whole number >= 1, got {write_every}")
        if clip not in CLIP_CHOICES:
            raise ValueError(f"clip must be one of {', '.join(map(repr, CLIP_CHOICES))}, got {clip!r}")
        self.clip = clip
        self.model = model
        self.out = Path(out)
        self.run = run
        self.write_every = int(write_every)
        self.divergence_factor = divergence_factor
        self.norm_type = float(norm_type)
        self.grouping = LayerGrouping(layer_depth)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._names = tuple(n for n, _ in self.named)
        self._params = [p for _, p in self.named]
        self._owned = {id(p) for _, p in self.named}
        self._records: list[StepRecord] = []
        # Steps closed since ``steps`` was last read, as plain tuples: building the records is
        # left to the reader (a write, the result), not paid inside the training step.
        self._rows: list[tuple] = []
        self._count = 0
        self.status = STABLE
        self.nan_step: int | None = None
        self.nan_source: str | None = None
        self.nan_param: str | None = None
        self.diverged_step: int | None = None
        self.error: str | None = None
        self.max_norm: float | None = None  # first finite max_norm seen in a clip call
        self.clip_value: float | None = None  # first finite clip_value of a clip_grad_value_ call
        self.clip_norm_type: float | None = None
        self._first_loss: float | None = None
        # The monitor's rule is a ratio to the first loss (docs/monitor.md); a run of a sweep
        # (``launch``) sets ``divergence`` to judge as every sweep does (docs/diagnosis.md).
        self.divergence: Divergence | None = None
        self._start = time.perf_counter()
        self._written = 0
        self._writer: Any = None
        # Where a step's learning rate comes from when the recorder closes a step by itself (a
        # step the loop abandoned): the owner sets it (``GradMonitor``: its optimizer).
        self.lr_source: Callable[[], Any] | None = None
        # A step's loss: the mean of the losses given (``record_loss`` per micro-batch) or their
        # sum (``"sum"``: the losses a script backpropagates, already divided for accumulation).
        self.loss_reduction = "mean"
        # Backward passes seen so far (a post-accumulate hook on the first trainable parameter,
        # between ``prepare`` and ``close``): a measured step that a new backward follows
        # before it was closed is a step the loop abandoned (``measure`` closes it as skipped).
        self._backwards = 0
        self._watch: Any = None
        self._reset_step()

    # ---- per step -------------------------------------------------------------------------

    def _reset_step(self) -> None:
        self._losses: list[Any] = []
        self._measured_grads: list[Tensor] = []
        # (norm_type, total, per-tensor norms, names): tensors, or Python floats (a float total
        # and a list of norms) when the engine gave them on the host
        self._measured: tuple | None = None
        self._measured_at = 0  # self._backwards at the measurement
        self._measured_first: tuple[Tensor, Tensor] | None = None  # (parameter, its gradient) then
        self._coef: Tensor | float | None = None

    @property
    def steps(self) -> list[StepRecord]:
        """One ``StepRecord`` per optimizer step recorded so far."""
        if self._rows:
            self._records.extend(
                StepRecord(step, loss, norm, coef, layers=tuple(zip(groups, values)), lr=lr, skipped=skipped)
                for step, loss, norm, coef, groups, values, lr, skipped in self._rows
            )
            self._rows.clear()
        return self._records

    @property
    def measured_total(self) -> Tensor | float:
        """The pre-clip total of the measurement this step holds (a tensor, or a float when
        the engine gave it on the host)."""
        return self._measured[1]

    @property
    def measured_grads(self) -> list[Tensor]:
        """The gradients that measurement read."""
        return self._measured_grads

    @property
    def pending(self) -> bool:
        """True when this step has measured gradients that ``finish_step`` has not recorded."""
        return self._measured is not None

    def owns(self, param: Tensor) -> bool:
        return id(param) in self._owned

    def owns_grad(self, grad: Tensor) -> bool:
        """True when ``grad`` is the gradient of one of the model's parameters (torch's
        ``get_total_norm`` receives gradients, not parameters)."""
        return any(prm.grad is grad for prm in self._params)

    def add_loss(self, loss: Tensor | float) -> None:
        """Add one (micro-batch) loss to the current step; the step records their mean."""
        if self._measured is not None and self._abandoned():
            self._close_abandoned()  # the loss of a new step: the measured one was left
        if not isinstance(loss, Tensor):
            self._losses.append(float(loss))
        elif loss.is_cpu and not self.gather_on_device:
            self._losses.append(loss.item())  # on the host reading a value is no sync
        else:
            self._losses.append(loss.detach().reshape(()))

    def measure(self, norm_type: float | None = None) -> bool:
        """Measure every gradient of the model now (once per step): total, per-tensor norms.
        True when it measured now, False when the step was already measured."""
        if self._measured is not None:
            if not self._abandoned():
                return False
            self._close_abandoned()
        return self._measure_now(norm_type)

    def _measure_now(self, norm_type: float | None) -> bool:
        if norm_type is None:
            norm_type = self.clip_norm_type if self.clip_norm_type is not None else self.norm_type
        p = float(norm_type)
        names, grads = self._grads()
        self._measured_grads = grads
        self._measured_at = self._backwards
        self._measured_first = next(((prm, prm.grad) for prm in self._params if prm.grad is not None), None)
        if not self.gather_on_device:
            on_host = engine.host_grad_norms(grads, p)
            if on_host is not None:
                self._measured = (p, on_host[0], on_host[1], names)
                return True
        gn = engine.measure_grad_norms(self.named, p)
        self._measured = (p, gn.total_norm, gn.norms, tuple(gn.names or ()))
        return True

    def _abandoned(self) -> bool:
        """The measured step was left without an optimizer step and a new one has begun: a
        backward pass since the measurement, or the gradient measured first was replaced
        (``zero_grad()`` sets gradients to None; the next backward makes new ones)."""
        if self._backwards != self._measured_at:
            return True
        first = self._measured_first
        return first is not None and first[0].grad is not first[1]

    def _on_backward(self, _param: Tensor) -> None:
        self._backwards += 1
        if self._measured is not None:
            self._close_abandoned()

    def _close_abandoned(self) -> None:
        self.finish_step(skipped=True, lr=self.lr_source() if self.lr_source else None, abandoned=True)

    def _grads(self) -> tuple[tuple[str, ...], list[Tensor]]:
        """(names, gradients) of the parameters that have a gradient now."""
        grads = [prm.grad for prm in self._params]
        if any(g is None for g in grads):
            kept = [(n, g) for n, g in zip(self._names, grads) if g is not None]
            return tuple(n for n, _ in kept), [g for _, g in kept]
        return self._names, grads

    def clip_measured_(
        self,
        grads: list[Tensor],
        params: list[Tensor],
        max_norm: float,
        norm_type: float,
        error_if_nonfinite: bool,
        foreach: bool | None,
        *,
        reuse: bool,
    ) -> Tensor:
        """Clip with gradclip's engine. With ``reuse`` (the step was measured just now, in
        this call) and the same gradients in the same norm type, the measurement is the clip's
        norm: one pass over the gradients instead of two. Otherwise (e.g. a framework measured
        earlier in the step, and something may have changed the gradients since)
        ``engine.clip_grad_norm_`` measures for itself. Either way the result is
        ``engine.clip_grad_norm_``'s, bit for bit: the same total, the same coefficient."""
        measured = self._measured
        same = (
            reuse
            and measured is not None
            and measured[0] == norm_type
            and len(grads) == len(self._measured_grads)
            and all(a is b for a, b in zip(grads, self._measured_grads))
        )
        if not same:
            total = engine.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
            self.note_clip(max_norm, total)
            return total
        total = measured[1]
        if error_if_nonfinite:
            engine.raise_if_nonfinite(total, norm_type)
        if isinstance(total, Tensor):
            engine.clip_grads_with_norm_(params, max_norm, total, foreach)
            self.note_clip(max_norm, total)
            return total
        # The norms came to the host as floats (a small CPU model; float32 results): scale
        # from the float, as clip_grads_with_norm_ would from the same total as a tensor.
        coef = engine.clip_grads_with_host_norm_(grads, max_norm, total, torch.float32, foreach)
        self.note_coef(max_norm, coef)
        return torch.tensor(total, dtype=torch.float32)

    def total_norm(
        self, tensors: list[Tensor], norm_type: float, error_if_nonfinite: bool, foreach: bool | None, *, reuse: bool
    ) -> Tensor:
        """``get_total_norm`` with gradclip's engine: the step's measurement itself when it was
        taken in this call, of exactly these gradients, in this norm type (one pass); otherwise
        the engine measures them."""
        measured = self._measured
        same = (
            reuse
            and measured is not None
            and measured[0] == norm_type
            and len(tensors) == len(self._measured_grads)
            and all(a is b for a, b in zip(tensors, self._measured_grads))
        )
        if not same:
            return engine.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
        total = measured[1]
        if error_if_nonfinite:
            engine.raise_if_nonfinite(total, norm_type)
        return total if isinstance(total, Tensor) else torch.tensor(total, dtype=torch.float32)

    def note_clip(self, max_norm: float, total: Tensor | float) -> None:
        """Record the coefficient a ``clip_grad_norm_`` call applied, from the total it returned
        (computed in the total's dtype, as torch computes it). Several calls: the smallest."""
        max_norm = float(max_norm)
        if not isinstance(total, Tensor) or (total.is_cpu and not self.gather_on_device):
            # On the host reading the total is no sync, and Python arithmetic is cheaper than
            # three tensor ops: torch's coefficient, bit for bit, in the total's dtype.
            dtype = total.dtype if isinstance(total, Tensor) else torch.float64
            self.note_coef(max_norm, engine.host_clip_coef(max_norm, float(total), dtype))
            return
        if math.isfinite(max_norm) and self.max_norm is None:
            self.max_norm = max_norm
        coef = torch.clamp(max_norm / (total.detach() + 1e-6), max=1.0).to(torch.float64)
        previous = self._coef
        if previous is not None and not isinstance(previous, Tensor):
            previous = torch.tensor(previous, dtype=torch.float64, device=coef.device)
        self._coef = coef if previous is None else torch.minimum(previous, coef.to(previous.device))

    def note_coef(self, max_norm: float, coef: float) -> None:
        """Record a clip call's coefficient known on the host (NaN stays NaN; several calls in a
        step: the smallest)."""
        if math.isfinite(max_norm) and self.max_norm is None:
            self.max_norm = float(max_norm)
        previous = self._coef
        if isinstance(previous, Tensor):
            previous = float(previous)
        self._coef = coef if previous is None or math.isnan(coef) else min(previous, coef)

    def note_value_clip(self, clip_value: float) -> None:
        """A ``clip_grad_value_`` call clipped: no single coefficient, so the step's is blank;
        the run is a value-clipping run (its first finite ``clip_value``) unless norm clipping
        was seen too."""
        clip_value = float(clip_value)
        if math.isfinite(clip_value) and self.clip_value is None:
            self.clip_value = clip_value
        self._coef = math.nan

    def note_norm_type(self, norm_type: float) -> None:
        self.clip_norm_type = float(norm_type)

    def finish_step(self, *, skipped: bool = False, lr: Any = None, abandoned: bool = False) -> NonFiniteError | None:
        """Close the step: one host transfer, the verdict, the record, maybe a write.

        ``skipped``: the optimizer did not run. An AMP scaler's skip (inf/NaN found) is routine
        and not judged non-finite; an ``abandoned`` step (the loop measured or clipped, then
        left the step without ``optimizer.step()``, e.g. ``if not torch.isfinite(norm):
        continue``) is skipped too, and judged like any measured step."""
        if self._measured is not None and not abandoned and self._abandoned():
            self._close_abandoned()
        if self._measured is None:
            self._measure_now(None)
        p, total, norms, names = self._measured
        has_loss = bool(self._losses)
        if isinstance(total, Tensor) and (self.gather_on_device or not total.is_cpu):
            loss_f, norm_f, coef_f, bad_f, groups, layer_values, lr_value = self._gather_on_device(
                p, total, norms, names, skipped, lr
            )
        else:
            if isinstance(total, Tensor):  # CPU tensors: reading them is no sync
                total, norms = float(total), norms.tolist()
            loss_f, norm_f, coef_f, bad_f, groups, layer_values, lr_value = self._gather_on_host(
                p, total, norms, names, skipped, lr
            )
        self._count = step = self._count + 1
        self._rows.append((step, loss_f, norm_f, coef_f, groups, layer_values, lr_value, bool(skipped)))
        self._reset_step()
        event = self._judge(step, loss_f if has_loss else None, norm_f, bad_f, names, skipped and not abandoned, coef_f)
        if event is not None or self.status == DIVERGED and self.diverged_step == step:
            self.write()
        elif step - self._written >= self.write_every:
            self.write(refresh_histograms=False)
        return event

    # Two ways to the same numbers. On the host (CPU tensors) reading a value is no device sync,
    # so plain Python is cheapest: right after a backward pass every tensor op costs several
    # microseconds, so the host path uses none. Elsewhere every number is computed on the device
    # and comes over in one ``.tolist()``. ``gather_on_device`` forces the second way (tests use
    # it on CPU).
    gather_on_device = False

    def _coef_value(self, skipped: bool) -> Tensor | float:
        if skipped:
            return math.nan  # the scaler applied nothing
        if self._coef is None:
            return 1.0  # nothing clipped
        return self._coef

    def _gather_on_host(self, p, total, norms, names, skipped, lr):
        """Everything from Python floats (``total``, the list ``norms``): no tensor ops."""
        losses = self._losses
        if not losses:
            loss_f = math.nan
        else:
            loss_f = float(sum(losses)) if self.loss_reduction == "sum" else float(sum(losses) / len(losses))
        coef = self._coef
        coef_f = math.nan if skipped else (1.0 if coef is None else float(coef))
        bad_f = math.nan
        if not math.isfinite(total):
            bad_f = float(next((i for i, v in enumerate(norms) if not math.isfinite(v)), math.nan))
        groups, layer_values = self.grouping.combine_host(names, norms, p) if names else ((), [])
        return loss_f, total, coef_f, bad_f, groups, layer_values, (math.nan if lr is None else float(lr))

    def _gather_on_device(self, p, total, norms, names, skipped, lr):
        device, f64 = total.device, torch.float64
        nan = torch.full((1,), math.nan, dtype=f64, device=device)
        if self._losses:
            stacked = torch.stack([torch.as_tensor(x).to(device, f64) for x in self._losses])
            loss = (stacked.sum() if self.loss_reduction == "sum" else stacked.mean()).reshape(1)
        else:
            loss = nan
        coef = self._coef_value(skipped)
        coef_t = (
            coef.to(device, f64).reshape(1)
            if isinstance(coef, Tensor)
            else torch.full((1,), coef, dtype=f64, device=device)
        )
        if norms.numel():
            first_bad = torch.argmax((~torch.isfinite(norms)).to(torch.uint8)).to(f64).reshape(1)
        else:
            first_bad = nan
        groups, group_norms = self._groups(names, norms, p)
        group_norms = norms if group_norms is None else group_norms
        parts = [loss, total.to(f64).reshape(1), coef_t, first_bad, group_norms.to(f64)]
        if isinstance(lr, Tensor):
            parts.append(lr.detach().to(device, f64).reshape(1))
        values = torch.cat(parts).tolist()  # the one host sync of the step
        lr_value = values[-1] if isinstance(lr, Tensor) else (math.nan if lr is None else float(lr))
        return (*values[:4], groups, values[4 : 4 + len(groups)], lr_value)

    def _groups(self, names, norms, p) -> tuple[tuple[str, ...], Tensor | None]:
        """Layer groups and their norms; ``None`` norms when every group is one parameter (the
        group norm of a single member is that member's norm: no arithmetic needed)."""
        if not names:
            return (), None
        groups, _ = self.grouping.groups(names, norms.device)
        if len(groups) == len(names) and p != 0:  # for p = 0 a group counts its nonzero members
            return groups, None
        return self.grouping.combine(names, norms, p)

    def _judge_against_the_run(self, step: int, loss: float | None, norm: float, coef: float, skipped: bool) -> None:
        """A sweep's divergence rule (``detect.Divergence``): the loss against the run's early
        losses, the norm about to be applied against its running median."""
        if self.status != STABLE:
            return
        applied = norm * coef if not skipped and math.isfinite(coef) else math.nan
        if self.divergence.loss_diverged(loss) or self.divergence.norm_diverged(applied):
            self.status = DIVERGED
            self.diverged_step = step

    def _judge(
        self, step: int, loss: float | None, norm: float, bad: float, names, skipped: bool, coef: float = math.nan
    ) -> NonFiniteError | None:
        """``loss`` is None when the step recorded none. Runs every step: plain comparisons."""
        if loss is not None and not math.isfinite(loss):
            event = NonFiniteError(step, SOURCE_FORWARD, None, loss)
        elif not skipped and not math.isfinite(norm):
            param = names[int(bad)] if names and math.isfinite(bad) else None
            event = NonFiniteError(step, SOURCE_BACKWARD, param, norm)
        else:
            if self.divergence is not None:
                self._judge_against_the_run(step, loss, norm, coef, skipped)
            elif loss is not None:
                if self._first_loss is None:
                    self._first_loss = loss
                elif (
                    self.status == STABLE
                    and self.divergence_factor is not None
                    and is_diverged(loss, self._first_loss, self.divergence_factor)
                ):
                    self.status = DIVERGED
                    self.diverged_step = step
            return None
        if self.status == STABLE:
            self.status = NON_FINITE
            self.nan_step, self.nan_source, self.nan_param = step, event.source, event.param
            return event
        return None  # only the first non-finite step is an event

    # ---- the run ----------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """The training raised: status ``error`` unless a verdict came first; keep the message."""
        self.error = _describe(exc)
        if self.status == STABLE:
            self.status = ERROR

    def result(self) -> RunResult:
        norm_type = self.clip_norm_type if self.clip_norm_type is not None else self.norm_type
        if self.max_norm is None and self.clip_value is not None:
            cell = Cell(None, norm_type, mode=MODE_VALUE, param=self.clip_value)
        else:
            cell = Cell(self.max_norm, norm_type)
        return RunResult(
            cell=cell,
            status=self.status,
            steps=list(self.steps),
            nan_step=self.nan_step,
            nan_source=self.nan_source,
            nan_param=self.nan_param,
            diverged_step=self.diverged_step,
            seconds=time.perf_counter() - self._start,
            error=self.error,
            name=self.run,
        )

    def prepare(self) -> None:
        """Prepare the output directory and start counting backward passes."""
        prepare_out_dir(self.out)
        self.watch_backwards()

    def watch_backwards(self) -> None:
        """Count backward passes from now on (a hook on the first trainable parameter)."""
        first = self._params[0] if self._params else None
        if first is not None and self._watch is None and hasattr(first, "register_post_accumulate_grad_hook"):
            self._watch = first.register_post_accumulate_grad_hook(self._on_backward)

    def close(self, exc: BaseException | None = None) -> None:
        """The training ended: a step measured but never closed (the loop left it, e.g. with
        ``break`` after a non-finite norm) is recorded as skipped; a failure is noted; the files
        are written."""
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        if self._measured is not None:
            self._close_abandoned()
        if exc is not None and not isinstance(exc, NonFiniteError):
            self.fail(exc)
        self.write()

    def write(self, *, refresh_histograms: bool = True) -> None:
        """Bring the report files up to every step recorded so far: the new steps' rows are
        appended, the summary replaced (``report.live.LiveRunWriter``); the histograms are
        refreshed when asked (events, the end) or when the run has doubled since."""
        if self._writer is None:
            self._writer = LiveRunWriter(self.out)
        self._writer.write(self.result(), refresh_histograms=refresh_histograms)
        self._written = self._count


def first_param_lr(optimizer: torch.optim.Optimizer) -> Any:
    groups = getattr(optimizer, "param_groups", None)
    return groups[0].get("lr") if groups else None
