"""Inside the process that runs the user's command: torch's clipping family, backward passes,
optimizer steps and ``GradScaler`` calls are routed through one ``LaunchSession``, which
measures each step with the monitor's recorder, applies the run's clipping setting instead of
the script's, and stops the script after ``--steps`` steps. See docs/your-command.md."""

from __future__ import annotations

import dataclasses
import gc
import math
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli import engine
from gradcheck_cli.detect import Divergence, clip_on_scaled_gradients_warning, degenerate_training
from gradcheck_cli.monitor import StepRecorder
from gradcheck_cli.results import DIVERGED, MODE_NONE, MODE_NORM, Cell, RunResult
from gradcheck_cli.run_setup import apply_clipping, make_rule

AS_WRITTEN_RUN = "as_written"  # the run that keeps the script's own clipping (watch, check)


class StopRun(BaseException):
    """The run reached its ``--steps``: unwinds the user's script (a ``BaseException``, so a
    script's ``except Exception`` does not swallow it)."""


class _Params:
    """The trained parameters as the recorder sees a model: named by the smallest module of
    the process that holds them all (``layer.weight``), else ``param.<i>``."""

    def __init__(self, params: list[Tensor]) -> None:
        self.named = _names_for(params)

    def named_parameters(self):
        return iter(self.named)


def _names_for(params: list[Tensor]) -> list[tuple[str, Tensor]]:
    wanted = {id(p) for p in params}
    best = None
    with warnings.catch_warnings():  # isinstance on deprecated module proxies warns
        warnings.simplefilter("ignore")
        modules = [obj for obj in gc.get_objects() if isinstance(obj, torch.nn.Module)]
    for obj in modules:
        try:
            named = list(obj.named_parameters())
        except Exception:  # a half-built module: not a candidate
            continue
        ids = {id(p) for _, p in named}
        if wanted <= ids and (best is None or len(named) < len(best)):
            best = named
    if best is not None:
        return [(n, p) for n, p in best if id(p) in wanted]
    return [(f"param.{i}", p) for i, p in enumerate(params)]


class _Recorder(StepRecorder):
    """The monitor's recorder, with the session deciding what a step left without an optimizer
    step was: a hand-written update (no optimizer ever stepped) is a step like any other."""

    session: LaunchSession

    def prepare(self) -> None:
        self.watch_backwards()  # no files of its own: the sweep writes every run's

    def write(self, *, refresh_histograms: bool = True) -> None:
        pass

    def _close_abandoned(self) -> None:
        session = self.session
        session.close_step(skipped=session.optimizer_steps > 0, lr=_lr(session._stepping_optimizer))


_SESSION: LaunchSession | None = None
_LOCAL = threading.local()


def _serving() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


class _Serve:
    def __enter__(self) -> None:
        _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1

    def __exit__(self, *exc) -> None:
        _LOCAL.depth -= 1


@dataclasses.dataclass
class StepExtras:
    """What a step records beyond the monitor's columns."""

    threshold: float = math.nan
    unit_frac: float = math.nan
    norms: tuple[tuple[float, float], ...] = ()


class LaunchSession:
    """One run of the user's command under one clipping ``cell``.

    ``steps``: stop after this many steps (None: run to the end). ``norm_types``: the grid's
    norm types, measured too on the control run. ``zclip_max_norm``: ZClip's cap."""

    def __init__(
        self,
        cell: Cell | None,
        *,
        steps: int | None,
        norm_types: Iterable[float] = (2.0,),
        zclip_max_norm: float | None = None,
        divergence_factor: float | None = 10.0,
        stop_on_non_finite: bool = False,
        stop_on_divergence: bool = False,
        layer_depth: Any = "auto",
    ) -> None:
        self.cell = cell
        self.steps = steps
        self.norm_types = tuple(float(p) for p in norm_types)
        self.divergence_factor = divergence_factor
        self.stop_on_non_finite = stop_on_non_finite
        self.stop_on_divergence = stop_on_divergence
        self.layer_depth = layer_depth
        self.rule = make_rule(cell, _RuleConfig(zclip_max_norm)) if cell is not None else None
        self.recorder: _Recorder | None = None
        self.optimizer_steps = 0
        self.clip_calls = 0
        self.as_written: tuple[str, float, float] | None = None  # (kind, threshold, norm type)
        self.warnings: list[str] = []
        self.first_clip_norm: float | None = None  # fairness probe: step 1's first pre-clip norm
        self._losses: list[Any] = []  # backward losses before the recorder exists
        self._clipped_this_step = False
        self._scaled_this_step: Any = None  # the GradScaler that scaled a loss this step
        self._unscaled_this_step = False
        self._extras: dict[int, StepExtras] = {}
        self._step_extras = StepExtras()
        self._stepping_optimizer: Any = None
        self._in_scaler_step = False
        self._stepped_in_scaler = False

    # ---- the recorder ---------------------------------------------------------------------

    def _ensure_recorder(self, params: list[Tensor]) -> _Recorder:
        if self.recorder is None:
            params = [p for p in params if p.requires_grad]
            rec = _Recorder(
                _Params(params),
                ".",
                run=self.cell.run if self.cell is not None else AS_WRITTEN_RUN,
                layer_depth=self.layer_depth,
                write_every=10**9,
                divergence_factor=self.divergence_factor,
                norm_type=self.cell.norm_type if self.cell is not None else 2.0,
            )
            rec.session = self
            if self.divergence_factor is not None:  # a sweep's rule, not the monitor's ratio
                rec.divergence = Divergence(self.divergence_factor)
            rec.loss_reduction = "sum"
            rec.prepare()
            for loss in self._losses:
                rec.add_loss(loss)
            self._losses = []
            self.recorder = rec
        return self.recorder

    @property
    def completed(self) -> int:
        return self.recorder._count if self.recorder is not None else 0

    def add_loss(self, loss: Tensor) -> None:
        if self.recorder is None:
            self._losses.append(loss.detach().reshape(()).double().item() if loss.is_cpu else loss.detach())
        else:
            self.recorder.add_loss(loss.detach().reshape(()))

    # ---- one step ---------------------------------------------------------------------------

    def _maybe_stop(self) -> None:
        if self.steps is not None and self.completed >= self.steps:
            raise StopRun()

    def measure(self, params: list[Tensor], norm_type: float | None) -> Tensor | float:
        """Measure the step's pre-clip gradients (once per step): in the cell's norm type (L2
        for the adaptive rules), as written in the script's when the run keeps its clipping."""
        rec = self._ensure_recorder(params)
        cell = self.cell
        if cell is None:
            measure_in = float(norm_type) if norm_type is not None else (rec.clip_norm_type or 2.0)
        else:  # the rules measure L2; the control measures its own, the grid's other types too
            measure_in = cell.norm_type if cell.mode in (MODE_NONE, MODE_NORM) else 2.0
        if rec._measured is None:
            rec.note_norm_type(measure_in)
        fresh = rec.measure(measure_in)
        total = rec.measured_total
        if fresh:
            total_f = float(total)
            self._first_probe(total_f)
            self._control_norms(rec, total_f, measure_in)
        if self._scaled_this_step is not None and not self._unscaled_this_step:
            warning = clip_on_scaled_gradients_warning(self.completed + 1)
            if not any(w.startswith(warning.partition(":")[0]) for w in self.warnings):
                self.warnings.append(warning)
        return total

    def measure_and_clip(self, params: list[Tensor], norm_type: float | None) -> Tensor:
        """Measure the step's pre-clip gradients, then clip them as the run's cell says (the
        control: not at all). Returns the pre-clip total in ``norm_type`` (the script's)."""
        rec = self.recorder if self.recorder is not None else self._ensure_recorder(params)
        total = self.measure(params, norm_type)
        total_f = float(total)
        measured_in = rec._measured[0]
        if self.cell is not None and not self._clipped_this_step and math.isfinite(total_f):
            own = [p for p in params if p.grad is not None and rec.owns(p)] or [p for p in params if p.grad is not None]
            # the total as torch's clip would hold it (float32 for float32 gradients)
            norm_t = total if isinstance(total, Tensor) else torch.tensor(total_f, dtype=torch.float32)
            with _Serve():
                coef, threshold, unit_frac = apply_clipping(self.cell, self.rule, own, norm_t, total_f)
            rec.note_coef(math.inf, coef)
            self._step_extras = dataclasses.replace(self._step_extras, threshold=threshold, unit_frac=unit_frac)
            self._clipped_this_step = True
        if norm_type is None or float(norm_type) == measured_in:
            return total if isinstance(total, Tensor) else torch.tensor(total_f, dtype=torch.float32)
        with _Serve():
            return engine.get_total_norm([p.grad for p in params if p.grad is not None], float(norm_type))

    def _first_probe(self, total: float) -> None:
        if self.first_clip_norm is None and self.completed == 0:
            self.first_clip_norm = total

    def _control_norms(self, rec: _Recorder, total: float, measured_in: float) -> None:
        """The control run measures every norm type of the grid, so that each cell's threshold
        can be read against the control's norms in its own norm type."""
        if self.cell is None or self.cell.mode != MODE_NONE or len(self.norm_types) < 2:
            return
        grads = rec.measured_grads
        norms = []
        for p in self.norm_types:
            if p == measured_in:
                norms.append((p, total))
                continue
            on_host = engine.host_grad_norms(grads, p)
            value = on_host[0] if on_host is not None else float(engine.get_total_norm(grads, p))
            norms.append((p, float(value)))
        self._step_extras = dataclasses.replace(self._step_extras, norms=tuple(norms))

    def close_step(self, *, skipped: bool, lr: Any = None, routine_skip: bool = False) -> None:
        """Close the measured step. ``routine_skip``: an AMP scaler skipped it (not judged
        non-finite); any other step is judged, skipped or not."""
        rec = self.recorder
        if rec is None:
            return
        extras = self._step_extras
        self._step_extras = StepExtras()
        self._clipped_this_step = False
        self._scaled_this_step = None
        self._unscaled_this_step = False
        event = StepRecorder.finish_step(rec, skipped=skipped, lr=lr, abandoned=not routine_skip)
        self._extras[rec._count] = extras
        if event is not None and self.stop_on_non_finite:
            raise StopRun()
        if self.stop_on_divergence and rec.status == DIVERGED:
            raise StopRun()

    # ---- hooks the interception calls -------------------------------------------------------

    def on_clip(self, params: list[Tensor], max_norm: float, norm_type: float, kind: str = "norm") -> None:
        """A clip call of the script's: note its own setting (the first one), stop when the run
        is complete (a hand-written update steps at each clip call)."""
        self.clip_calls += 1
        if self.as_written is None:
            self.as_written = (kind, float(max_norm), float(norm_type))
        if self.optimizer_steps == 0:
            self._maybe_stop()

    def _is_stepping(self, optimizer: Any) -> bool:
        """The optimizer whose steps are the run's steps: the first to step that updates the
        measured parameters (a GAN's other optimizer steps unrecorded)."""
        if self._stepping_optimizer is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if self.recorder is not None and not any(self.recorder.owns(p) for p in params):
                return False
            self._stepping_optimizer = optimizer
        return optimizer is self._stepping_optimizer

    def before_optimizer_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple | None:
        """Just before the update: a step that no clip call measured is measured and clipped
        here (a script that never clips gets the run's clipping). With a closure (Lightning,
        LBFGS) the gradients exist only once it has run: the closure is wrapped."""
        if not self._is_stepping(optimizer):
            return None
        # torch passes the step's own arguments with the optimizer first: (self, closure, ...)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._before_update(optimizer)
            return None

        def measured_closure():
            out = closure()
            self._before_update(optimizer)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measured_closure}
        return (args[0], measured_closure, *args[2:]), kwargs

    def _before_update(self, optimizer: Any) -> None:
        if self.recorder is not None and self.recorder.pending and (self._clipped_this_step or self.cell is None):
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.cell is None:
            self.measure(params, None)  # the script's own (absent) clipping: only measured
        else:
            self.measure_and_clip(params, None)

    def after_optimizer_step(self, optimizer: Any) -> None:
        """The update is done: the step is recorded; the run stops after its last step."""
        if not self._is_stepping(optimizer):
            return
        self.optimizer_steps += 1
        if self._in_scaler_step:
            self._stepped_in_scaler = True
        if self.recorder is not None and self.recorder.pending:
            self.close_step(skipped=False, lr=_lr(optimizer))
        self._maybe_stop()

    def scaler_skipped(self) -> None:
        """The AMP scaler found inf/NaN and did not run the optimizer: a routine skip."""
        if self.recorder is None:
            return
        if not self.recorder.pending:
            self.recorder.measure(self.recorder.clip_norm_type)
        self.close_step(skipped=True, lr=_lr(self._stepping_optimizer), routine_skip=True)
        self._maybe_stop()

    def finish(self) -> RunResult | None:
        """The run ended (``StopRun``, the script's end, its error): the pending step closed,
        the result assembled."""
        rec = self.recorder
        if rec is None:
            return None
        if rec._watch is not None:
            rec._watch.remove()
            rec._watch = None
        if rec.pending:
            self.close_step(skipped=self.optimizer_steps > 0)
        result = rec.result()
        steps = []
        for s in result.steps:
            extras = self._extras.get(s.step, StepExtras())
            steps.append(
                dataclasses.replace(
                    s, clip_threshold=extras.threshold, clipped_unit_frac=extras.unit_frac, norms=extras.norms
                )
            )
        cell, name = (self.cell, None) if self.cell is not None else (result.cell, AS_WRITTEN_RUN)
        warnings = tuple(self.warnings) + tuple(
            degenerate_training([s.loss for s in steps], [s.grad_norm for s in steps], cell.norm_type)
        )
        return dataclasses.replace(result, cell=cell, steps=steps, name=name, warnings=warnings)


@dataclasses.dataclass
class _RuleConfig:
    zclip_max_norm: float | None


def _lr(optimizer: Any) -> Any:
    groups = getattr(optimizer, "param_groups", None)
    return groups[0].get("lr") if groups else None


def current() -> LaunchSession | None:
    return _SESSION


def activate(session: LaunchSession | None) -> None:
    global _SESSION
    _SESSION = session


def serving() -> _Serve:
    return _Serve()


def is_serving() -> bool:
    return _serving()
