"""Interception of torch's clipping family and ``GradScaler.step`` while a monitor is active,
shared by every monitor: the engine measures the monitored model's pre-clip gradients, then the
call is served. See docs/monitor.md."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli.monitor.recorder import CLIP_ENGINE, StepRecorder

_SESSIONS: list[Any] = []  # active sessions: objects with .recorder and .handles(optimizer)
_ORIGINAL_CLIP = torch.nn.utils.clip_grad_norm_
_ORIGINAL_CLIP_VALUE = torch.nn.utils.clip_grad_value_
# torch.amp.GradScaler from torch 2.3; before that the CUDA one is the only one.
_SCALER = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
_ORIGINAL_SCALER_STEP = _SCALER.step
_REBOUND: list[tuple[dict, str, Any]] = []  # (module dict, name, original) rebound to a wrapper


def _clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` while a gradclip monitor is active: the engine
    measures the pre-clip gradients of the monitored model; then the engine clips, reusing that
    pass (``clip="engine"``), or torch's original clips, unchanged (``clip="torch"``). Calls on
    other parameters go straight to the original."""
    was_generator = False
    if isinstance(parameters, Tensor):
        params: list[Tensor] = [parameters]
    else:
        was_generator = isinstance(parameters, types.GeneratorType)
        params = list(parameters)
    grads: list[Tensor] = []
    first = None
    for prm in params:
        g = prm.grad
        if g is not None:
            if first is None:
                first = prm
            grads.append(g)
    recorders = [s.recorder for s in _SESSIONS if s.recorder.owns(first)] if first is not None else []
    if not recorders:
        return _original_clip(parameters, params, was_generator, max_norm, norm_type, error_if_nonfinite, foreach)
    p = float(norm_type)
    measured_now = []
    for rec in recorders:
        rec.note_norm_type(p)
        measured_now.append(rec.measure(p))
    clipper = next((i for i, rec in enumerate(recorders) if rec.clip == CLIP_ENGINE), None)
    if clipper is None:
        total = _original_clip(parameters, params, was_generator, max_norm, norm_type, error_if_nonfinite, foreach)
    else:
        total = recorders[clipper].clip_measured_(
            grads, params, max_norm, p, error_if_nonfinite, foreach, reuse=measured_now[clipper]
        )
    for i, rec in enumerate(recorders):
        if i != clipper:  # the clipper noted the coefficient it applied
            rec.note_clip(max_norm, total)
    return total


def _original_clip(parameters, params, was_generator, max_norm, norm_type, error_if_nonfinite, foreach) -> Tensor:
    """torch's own function on what the caller passed (a generator again when it was one, so
    that torch still warns about an empty one)."""
    passed: Any = parameters if isinstance(parameters, Tensor) else ((q for q in params) if was_generator else params)
    return _ORIGINAL_CLIP(passed, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach)


def _clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """``torch.nn.utils.clip_grad_value_`` while a monitor is active: measure first; value
    clipping has no single coefficient, so the step's ``clip_coef`` is recorded blank."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    first = next((p for p in params if p.grad is not None), None)
    recorders = [s.recorder for s in _SESSIONS if first is not None and s.recorder.owns(first)]
    for rec in recorders:
        rec.measure()
    _ORIGINAL_CLIP_VALUE(params, clip_value, foreach=foreach)
    for rec in recorders:
        rec.note_value_clip(clip_value)


def _scaler_step(self, optimizer, *args, **kwargs):
    """``GradScaler.step`` while a monitor is active: a step whose optimizer did not run was
    skipped (inf/NaN found); the monitor records it after the scaler has unscaled."""
    sessions = [s for s in _SESSIONS if s.handles(optimizer)]
    for s in sessions:
        s.scaler_step_begin()
    try:
        return _ORIGINAL_SCALER_STEP(self, optimizer, *args, **kwargs)
    finally:
        for s in sessions:
            s.scaler_step_end()


def _install(session: Any, extra_namespaces: Iterable[dict] = ()) -> None:
    if not _SESSIONS:
        torch.nn.utils.clip_grad_norm_ = _clip_grad_norm_
        torch.nn.utils.clip_grad.clip_grad_norm_ = _clip_grad_norm_
        torch.nn.utils.clip_grad_value_ = _clip_grad_value_
        torch.nn.utils.clip_grad.clip_grad_value_ = _clip_grad_value_
        _SCALER.step = _scaler_step
    _SESSIONS.append(session)
    main = sys.modules.get("__main__")
    for namespace in [*extra_namespaces, getattr(main, "__dict__", {})]:
        for key, value in list(namespace.items()):
            if value is _ORIGINAL_CLIP or value is _ORIGINAL_CLIP_VALUE:
                namespace[key] = _clip_grad_norm_ if value is _ORIGINAL_CLIP else _clip_grad_value_
                _REBOUND.append((namespace, key, value))


def _uninstall(session: Any) -> None:
    if session in _SESSIONS:
        _SESSIONS.remove(session)
    if not _SESSIONS:
        torch.nn.utils.clip_grad_norm_ = _ORIGINAL_CLIP
        torch.nn.utils.clip_grad.clip_grad_norm_ = _ORIGINAL_CLIP
        torch.nn.utils.clip_grad_value_ = _ORIGINAL_CLIP_VALUE
        torch.nn.utils.clip_grad.clip_grad_value_ = _ORIGINAL_CLIP_VALUE
        _SCALER.step = _ORIGINAL_SCALER_STEP
        for namespace, key, original in _REBOUND:
            if namespace.get(key) in (_clip_grad_norm_, _clip_grad_value_):
                namespace[key] = original
        _REBOUND.clear()


class ClipSession:
    """An interception registration: clip calls on ``recorder``'s parameters are measured.
    Framework callbacks use it as is; ``GradMonitor`` adds the GradScaler handling."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder

    def handles(self, optimizer: Any) -> bool:
        return False

    def scaler_step_begin(self) -> None:  # pragma: no cover - only GradMonitor handles scalers
        pass

    def scaler_step_end(self) -> None:  # pragma: no cover
        pass

    def install(self, extra_namespaces: Iterable[dict] = ()) -> None:
        _install(self, extra_namespaces)

    def uninstall(self) -> None:
        _uninstall(self)
