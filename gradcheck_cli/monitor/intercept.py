"""Interception of torch's clipping family and ``GradScaler.step`` while a monitor is active,
shared by every monitor: the engine measures the monitored model's pre-clip gradients, then the
call is served. See docs/monitor.md."""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli import engine
from gradcheck_cli.monitor.recorder import CLIP_ENGINE, StepRecorder

_SESSIONS: list[Any] = []  # active sessions: objects with .recorder and .handles(optimizer)
_CLIP_GRAD = torch.nn.utils.clip_grad
# torch's clipping family, as ``torch.nn.utils`` exports it. get_total_norm and
# clip_grads_with_norm_ (the split form accelerate and torchtitan call) exist from torch 2.6
# (None before); ``torch.nn.utils.clip_grad`` defines them under these names or, in newer
# releases, as ``_get_total_norm`` and ``_clip_grads_with_norm_``.
_ORIGINAL_CLIP = torch.nn.utils.clip_grad_norm_
_ORIGINAL_CLIP_VALUE = torch.nn.utils.clip_grad_value_
_ORIGINAL_TOTAL_NORM = getattr(torch.nn.utils, "get_total_norm", None)
_ORIGINAL_CLIP_WITH_NORM = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
# torch.amp.GradScaler from torch 2.3; before that the CUDA one is the only one.
_SCALER = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
_ORIGINAL_SCALER_STEP = _SCALER.step
_REBOUND: list[tuple[dict, str, Any]] = []  # (module dict, name, original) rebound to a wrapper
# While a wrapper serves a call with torch's own function, torch's function calls the rest of
# the family through its module's globals, that is through these wrappers: those inner calls
# pass straight through (a measurement per outer call, not one per inner call).
_SERVING = threading.local()


def _serving() -> bool:
    return getattr(_SERVING, "depth", 0) > 0


class _Serve:
    """Context: the wrappers pass calls through while torch's function or the engine runs."""

    def __enter__(self) -> None:
        _SERVING.depth = getattr(_SERVING, "depth", 0) + 1

    def __exit__(self, *exc) -> None:
        _SERVING.depth -= 1


def _recorders_of(first_param: Tensor | None) -> list[StepRecorder]:
    if first_param is None or not _SESSIONS or _serving():
        return []
    return [s.recorder for s in _SESSIONS if s.recorder.owns(first_param)]


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
    recorders = _recorders_of(first)
    if not recorders:
        return _original_clip(parameters, params, was_generator, max_norm, norm_type, error_if_nonfinite, foreach)
    p = float(norm_type)
    measured_now = []
    for rec in recorders:
        rec.note_norm_type(p)
        measured_now.append(rec.measure(p))
    clipper = next((i for i, rec in enumerate(recorders) if rec.clip == CLIP_ENGINE), None)
    with _Serve():
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
    with _Serve():
        return _ORIGINAL_CLIP(passed, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite, foreach=foreach)


def _get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """``torch.nn.utils.get_total_norm``, the measuring half of torch's split clip (accelerate's
    ``clip_grad_norm_`` calls it, then ``clip_grads_with_norm_``): when the tensors are the
    monitored model's gradients, this is the step's pre-clip measurement. The norm returned is
    the engine's (``clip="engine"``: the measurement itself when it covers exactly these
    gradients) or torch's (``clip="torch"``)."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    first = tensors[0] if tensors else None
    recorders = (
        []
        if first is None or not _SESSIONS or _serving()
        else [s.recorder for s in _SESSIONS if s.recorder.owns_grad(first)]
    )
    if not recorders:
        with _Serve():
            return _ORIGINAL_TOTAL_NORM(tensors, norm_type, error_if_nonfinite, foreach)
    p = float(norm_type)
    measured_now = []
    for rec in recorders:
        rec.note_norm_type(p)
        measured_now.append(rec.measure(p))
    clipper = next((i for i, rec in enumerate(recorders) if rec.clip == CLIP_ENGINE), None)
    with _Serve():
        if clipper is None:
            return _ORIGINAL_TOTAL_NORM(tensors, norm_type, error_if_nonfinite, foreach)
        return recorders[clipper].total_norm(tensors, p, error_if_nonfinite, foreach, reuse=measured_now[clipper])


def _clip_grads_with_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
) -> None:
    """``torch.nn.utils.clip_grads_with_norm_``, the scaling half of torch's split clip: on the
    monitored model's parameters the coefficient is recorded and the engine (``clip="engine"``)
    or torch (``clip="torch"``) scales the gradients by it."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    first = next((q for q in params if q.grad is not None), None)
    recorders = _recorders_of(first)
    engine_clips = any(rec.clip == CLIP_ENGINE for rec in recorders)
    with _Serve():
        if engine_clips:
            engine.clip_grads_with_norm_(params, max_norm, total_norm, foreach)
        else:
            _ORIGINAL_CLIP_WITH_NORM(params, max_norm, total_norm, foreach)
    for rec in recorders:
        rec.note_clip(max_norm, total_norm)


def _clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None) -> None:
    """``torch.nn.utils.clip_grad_value_`` while a monitor is active: measure first; value
    clipping has no single coefficient, so the step's ``clip_coef`` is recorded blank."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    first = next((p for p in params if p.grad is not None), None)
    recorders = _recorders_of(first)
    for rec in recorders:
        rec.measure()
    with _Serve():
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


# (name, torch's function, the wrapper): the whole family, under both import paths.
_FAMILY = [
    (name, original, wrapper)
    for name, original, wrapper in (
        ("clip_grad_norm_", _ORIGINAL_CLIP, _clip_grad_norm_),
        ("clip_grad_value_", _ORIGINAL_CLIP_VALUE, _clip_grad_value_),
        ("get_total_norm", _ORIGINAL_TOTAL_NORM, _get_total_norm),
        ("clip_grads_with_norm_", _ORIGINAL_CLIP_WITH_NORM, _clip_grads_with_norm_),
    )
    if original is not None
]
_WRAPPER_OF = {id(original): wrapper for _, original, wrapper in _FAMILY}
_WRAPPERS = tuple(wrapper for _, _, wrapper in _FAMILY)
# Every name under which torch.nn.utils.clip_grad holds a member of the family: torch's own
# clip_grad_norm_ (and the deprecated clip_grad_norm) call the split functions through these
# globals, so even a reference to torch's function that nothing rebound is measured.
_CLIP_GRAD_NAMES = [
    (attr, value, _WRAPPER_OF[id(value)]) for attr, value in list(vars(_CLIP_GRAD).items()) if id(value) in _WRAPPER_OF
]


def _install(session: Any, extra_namespaces: Iterable[dict] = ()) -> None:
    """Route torch's clipping family through the wrappers: ``torch.nn.utils.X``,
    ``torch.nn.utils.clip_grad.X`` (so ``clip_grad_norm``, torch's deprecated name, and
    functions imported later reach them too), and names already bound to torch's functions in
    ``__main__`` and ``extra_namespaces`` (``from torch.nn.utils import clip_grad_norm_``)."""
    if not _SESSIONS:
        for name, _, wrapper in _FAMILY:
            setattr(torch.nn.utils, name, wrapper)
        for attr, _, wrapper in _CLIP_GRAD_NAMES:
            setattr(_CLIP_GRAD, attr, wrapper)
        _SCALER.step = _scaler_step
    _SESSIONS.append(session)
    main = sys.modules.get("__main__")
    for namespace in [*extra_namespaces, getattr(main, "__dict__", {})]:
        for key, value in list(namespace.items()):
            wrapper = _WRAPPER_OF.get(id(value))
            if wrapper is not None:
                namespace[key] = wrapper
                _REBOUND.append((namespace, key, value))


def _uninstall(session: Any) -> None:
    if session in _SESSIONS:
        _SESSIONS.remove(session)
    if not _SESSIONS:
        for name, original, _ in _FAMILY:
            setattr(torch.nn.utils, name, original)
        for attr, original, _ in _CLIP_GRAD_NAMES:
            setattr(_CLIP_GRAD, attr, original)
        _SCALER.step = _ORIGINAL_SCALER_STEP
        for namespace, key, original in _REBOUND:
            if namespace.get(key) in _WRAPPERS:
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
