"""What the run of a user's command changes in its process, installed before the script is
imported: torch's clipping family (both import paths), ``torch.autograd.backward`` (the loss),
every optimizer's step (global hooks), ``GradScaler`` and ``os._exit``. Each wrapper hands the
call to the active ``LaunchSession``. See docs/your-command.md."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from gradcheck_cli.launch import session as sessions
from gradcheck_cli.launch.session import LaunchSession

_CLIP_GRAD = torch.nn.utils.clip_grad
_TORCH = {
    name: getattr(torch.nn.utils, name, None)
    for name in ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
}
_BACKWARD = torch.autograd.backward
_SCALER = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
_SCALER_SCALE = _SCALER.scale
_SCALER_UNSCALE = _SCALER.unscale_
_SCALER_STEP = _SCALER.step
_OS_EXIT = os._exit


def _params(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def _active() -> LaunchSession | None:
    return None if sessions.is_serving() else sessions.current()


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The script's clip: measured, then the run's setting applied instead; returns the pre-clip
    total as torch would."""
    session = _active()
    if session is None:
        return _TORCH["clip_grad_norm_"](parameters, max_norm, norm_type, error_if_nonfinite, foreach)
    params = _params(parameters)
    session.on_clip(params, max_norm, norm_type)
    if session.cell is None:  # the script's own clipping: measured first, then torch's
        session.measure(params, float(norm_type))
        with sessions.serving():
            total = _TORCH["clip_grad_norm_"](params, max_norm, norm_type, error_if_nonfinite, foreach)
        session.recorder.note_clip(max_norm, total)
        return total
    total = session.measure_and_clip(params, float(norm_type))
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the non-finite "
            "norm anyway, set `error_if_nonfinite=False`"
        )
    return total


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The measuring half of torch's split clip: on the trained model's gradients this is the
    step's measurement (and, the scaling half being the script's clip, the run's clip too)."""
    session = _active()
    grads = _params(tensors)
    if session is None or session.recorder is None:
        params = _owners(grads) if session is not None else None
        if not params:
            return _TORCH["get_total_norm"](tensors, norm_type, error_if_nonfinite, foreach)
    else:
        grads = _params(tensors)
        if not any(session.recorder.owns_grad(g) for g in grads[:1]):
            return _TORCH["get_total_norm"](grads, norm_type, error_if_nonfinite, foreach)
        params = [p for p in session.recorder._params if p.grad is not None]
    if session.cell is None:
        session.measure(params, float(norm_type))
        with sessions.serving():
            return _TORCH["get_total_norm"](grads, norm_type, error_if_nonfinite, foreach)
    return session.measure_and_clip(params, float(norm_type))


def _owners(grads: list[Tensor]) -> list[Tensor]:
    """The parameters whose gradients these are (found once, at the first measurement)."""
    wanted = {id(g) for g in grads}
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, torch.nn.Parameter) and obj.grad is not None and id(obj.grad) in wanted
    ]


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """The scaling half: the run's setting was applied at the measurement; the script's own
    scaling is dropped (its threshold noted as the setting as written)."""
    session = _active()
    if session is None or session.recorder is None or not any(session.recorder.owns(p) for p in _params(parameters)):
        return _TORCH["clip_grads_with_norm_"](parameters, max_norm, total_norm, foreach)
    params = _params(parameters)
    session.on_clip(params, max_norm, session.recorder.clip_norm_type or 2.0)
    if session.cell is None:
        with sessions.serving():
            _TORCH["clip_grads_with_norm_"](params, max_norm, total_norm, foreach)
        session.recorder.note_clip(max_norm, total_norm)
        return None
    session.measure_and_clip(params, None)  # clips now if the measuring half did not
    return None


def clip_grad_value_(parameters, clip_value, foreach=None):
    session = _active()
    if session is None:
        return _TORCH["clip_grad_value_"](parameters, clip_value, foreach=foreach)
    params = _params(parameters)
    session.on_clip(params, clip_value, float("inf"), kind="value")
    if session.cell is None:
        session.measure(params, None)
        with sessions.serving():
            _TORCH["clip_grad_value_"](params, clip_value, foreach=foreach)
        session.recorder.note_value_clip(clip_value)
        return None
    session.measure_and_clip(params, None)
    return None


_WRAPPERS = {
    "clip_grad_norm_": clip_grad_norm_,
    "clip_grad_value_": clip_grad_value_,
    "get_total_norm": get_total_norm,
    "clip_grads_with_norm_": clip_grads_with_norm_,
}


def backward(tensors, *args, **kwargs):
    """``torch.autograd.backward`` (``loss.backward()`` comes here too): a scalar loss is the
    step's loss, unscaled when a ``GradScaler`` scaled it."""
    session = _active()
    if session is not None and isinstance(tensors, Tensor) and tensors.numel() == 1 and tensors.requires_grad:
        scale = _SCALED.pop(id(tensors), None)
        loss = tensors.detach().reshape(())
        session.add_loss(loss.double() / scale if scale is not None else loss)
    return _BACKWARD(tensors, *args, **kwargs)


_SCALED: dict[int, float] = {}  # id(scaled loss) -> the scale it was multiplied by


def scaler_scale(self, outputs):
    out = _SCALER_SCALE(self, outputs)
    session = _active()
    if session is not None and isinstance(out, Tensor) and getattr(self, "_enabled", True):
        session._scaled_this_step = self
        scale = getattr(self, "_scale", None)
        if scale is not None:
            _SCALED.clear()
            _SCALED[id(out)] = float(scale)
    return out


def scaler_unscale(self, optimizer):
    session = _active()
    if session is not None:
        session._unscaled_this_step = True
    return _SCALER_UNSCALE(self, optimizer)


def scaler_step(self, optimizer, *args, **kwargs):
    """A step whose optimizer the scaler did not run (inf/NaN found) is recorded as skipped."""
    session = _active()
    if session is None:
        return _SCALER_STEP(self, optimizer, *args, **kwargs)
    session._in_scaler_step, session._stepped_in_scaler = True, False
    session._unscaled_this_step = True  # the scaler unscales before it steps
    try:
        return _SCALER_STEP(self, optimizer, *args, **kwargs)
    finally:
        session._in_scaler_step = False
        if not session._stepped_in_scaler:
            session.scaler_skipped()


def _step_pre_hook(optimizer, args, kwargs):
    session = _active()
    if session is not None:
        return session.before_optimizer_step(optimizer, args, kwargs)
    return None


def _step_post_hook(optimizer, args, kwargs):
    session = _active()
    if session is not None:
        session.after_optimizer_step(optimizer)


_EXIT_HANDLER: Any = None


def os_exit(code):
    """``os._exit`` ends the process at once; the run's result is saved first."""
    if _EXIT_HANDLER is not None:
        _EXIT_HANDLER(code)
    _OS_EXIT(code)


def install(session: LaunchSession, on_exit) -> None:
    """Route everything through ``session`` (in a process that runs one command)."""
    global _EXIT_HANDLER
    sessions.activate(session)
    _EXIT_HANDLER = on_exit
    for name, wrapper in _WRAPPERS.items():
        original = _TORCH[name]
        if original is None:
            continue
        setattr(torch.nn.utils, name, wrapper)
        for attr, value in list(vars(_CLIP_GRAD).items()):
            if value is original:
                setattr(_CLIP_GRAD, attr, wrapper)
    torch.autograd.backward = backward
    _SCALER.scale = scaler_scale
    _SCALER.unscale_ = scaler_unscale
    _SCALER.step = scaler_step
    register_optimizer_step_pre_hook(_step_pre_hook)
    register_optimizer_step_post_hook(_step_post_hook)
    os._exit = os_exit
