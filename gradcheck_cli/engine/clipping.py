"""The torch-compatible clip family: ``get_total_norm``, ``clip_grads_with_norm_``,
``clip_grad_norm_`` and ``clip_grad_value_`` with torch's signatures and defaults, and the host
form of the clip coefficient (:func:`host_clip_coef`, :func:`clip_grads_with_host_norm_`) for
callers that hold the total norm as a Python float. Norms come from :mod:`.norms`, or from
:mod:`.distributed` for a process group or DTensor gradients. See docs/engine.md.
"""

from __future__ import annotations

import math
import types
import warnings
from array import array
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli.engine import distributed
from gradcheck_cli.engine.norms import (
    as_list,
    check_foreach,
    coalesce_,
    cpu_paths,
    foreach_devices,
    local_total_norm,
    nonfinite_error,
)

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_host_norm_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "host_clip_coef",
    "raise_if_nonfinite",
]

_INF = math.inf


def _check_max_norm(max_norm: float) -> float:
    max_norm = float(max_norm)
    if not max_norm >= 0:  # also rejects NaN
        raise ValueError(
            f"max_norm must be a non-negative number, got {max_norm}: a negative max_norm would "
            "flip the sign of every gradient (use max_norm=0 to zero them)"
        )
    return max_norm


@torch.no_grad()
def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = None,
) -> Tensor:
    r"""Norm of ``tensors`` viewed as one vector.

    The total is the ``norm_type``-norm of the vector of per-tensor norms, which for every
    ``p != 0`` is the norm of all elements concatenated.

    Args:
        tensors: an iterable of tensors (e.g. the gradients themselves) or a single tensor.
        norm_type: any float ``p`` (``inf``, ``-inf``, 0, fractional and negative ``p`` included)
            or the string ``'inf'``. Default: 2.0.
        error_if_nonfinite: raise ``RuntimeError`` if the total norm is NaN or +-inf.
            Default: False.
        foreach: accepted for compatibility with torch; ``True`` raises on devices without
            foreach kernels. Default: None.
        group: a ``torch.distributed`` process group: the norm of every rank's ``tensors``
            together (see :mod:`gradcheck_cli.engine.distributed`). DTensor gradients (FSDP2) need
            no ``group``: their device mesh gives it. Default: None (this process only).

    Returns:
        The total norm, a 0-dim tensor of dtype ``promote(gradient dtypes, float32)`` on the
        first tensor's device (``torch.tensor(0.0)`` for an empty input).

    Differs from torch (see docs/engine.md): no spurious overflow or underflow, fp16/bf16
    accumulated and returned in float32, accurate for very long tensors, zero-element tensors
    accepted for every ``norm_type``, sparse COO tensors measured as their dense equivalent.
    """
    return _total_norm(as_list(tensors), norm_type, error_if_nonfinite, foreach, group)


def _total_norm(
    tensors: list[Tensor],
    norm_type: float | str,
    error_if_nonfinite: bool,
    foreach: bool | None,
    group: Any = None,
) -> Tensor:
    p = float(norm_type)
    if group is not None or not set(map(type, tensors)) <= {Tensor}:
        # a process group or tensor subclasses (DTensor?): the global norm
        if group is not None or distributed.any_dtensor(tensors):
            return distributed.total_norm(tensors, p, error_if_nonfinite, foreach, group)
    check_foreach(foreach, tensors)
    total = local_total_norm(tensors, p, foreach)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise nonfinite_error(p)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    total_norm: Tensor | float,
    foreach: bool | None = None,
) -> None:
    r"""Scale the gradients in place given a precomputed total norm.

    .. math:: grad \leftarrow grad \cdot \min\left(\frac{max\_norm}{total\_norm + 10^{-6}}, 1\right)

    The coefficient is computed in the dtype of ``total_norm``, as in torch. When ``total_norm``
    is a CPU tensor (or a float) the multiply is skipped if the coefficient is 1, since reading
    it is no device sync; otherwise the gradients are always multiplied by the clamped
    coefficient, without a host sync, as in torch.

    Args:
        parameters: an iterable of tensors or a single tensor whose ``.grad`` is scaled;
            parameters without ``.grad`` are skipped.
        max_norm: the largest allowed total norm, ``>= 0``.
        total_norm: the total norm of the gradients (e.g. from :func:`get_total_norm`).
        foreach: accepted for compatibility with torch; ``True`` raises on devices without
            foreach kernels. Default: None.

    Raises:
        ValueError: if ``max_norm`` is negative or NaN (torch flips or NaNs every gradient).

    ``max_norm = inf`` leaves the gradients untouched (torch turns them all into NaN when
    ``total_norm`` is inf). A NaN or inf ``total_norm`` with a finite ``max_norm`` propagates
    as in torch (every gradient becomes NaN, or is zeroed).
    """
    parameters = as_list(parameters)
    max_norm = _check_max_norm(max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    check_foreach(foreach, grads)
    _scale_(grads, max_norm, total_norm, foreach)


def _scale_target(g: Tensor) -> Tensor:
    """The dense real tensor to multiply in place to scale the gradient ``g``: a sparse
    gradient's values, once coalesced (scaled duplicates would each be rounded, and their sum
    can cancel), a complex gradient's real view (as a complex product, ``(inf+0j) * (c+0j)``
    is ``inf+nanj``)."""
    if g.is_sparse:
        g = coalesce_(g)._values()
    return torch.view_as_real(g) if g.is_complex() else g


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even; inf beyond its range)."""
    return array("f", (x,))[0]


_F32_EPS_TERM = _f32(1e-6)


def host_clip_coef(max_norm: float, total: float, dtype: torch.dtype = torch.float32) -> float:
    """``torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)`` for a 0-dim ``total_norm`` of
    ``dtype``, in Python floats, bit for bit: torch adds in ``dtype``, takes the reciprocal and
    multiplies by ``max_norm`` (each a float32 operation for float32, computed here in float64
    and rounded once, which is exact for these operations). Three tensor ops and a read fewer
    per clipping step; NaN stays NaN."""
    if dtype == torch.float64:
        coef = (1.0 / (total + 1e-6)) * max_norm
    elif dtype == torch.float32:
        coef = _f32(_f32(1.0 / _f32(total + _F32_EPS_TERM)) * _f32(max_norm))
    else:
        t = torch.tensor(total, dtype=dtype)
        return torch.clamp(max_norm / (t + 1e-6), max=1.0).item()
    return 1.0 if coef >= 1.0 else coef


def clip_grads_with_host_norm_(
    grads: list[Tensor], max_norm: float, total: float, dtype: torch.dtype, foreach: bool | None = None
) -> float:
    """:func:`clip_grads_with_norm_` for a caller that holds the total norm as a Python float
    (of ``dtype``, the dtype :func:`get_total_norm` would have returned) and the dense gradient
    tensors themselves: the same coefficient, the same in-place multiply, without building a
    tensor for the total. Returns the coefficient applied (1.0 when none; NaN is applied and
    returned, as torch propagates it).

    Raises:
        ValueError: if ``max_norm`` is negative or NaN, as :func:`clip_grads_with_norm_`."""
    max_norm = _check_max_norm(max_norm)
    check_foreach(foreach, grads)
    return _scale_host_(grads, max_norm, total, dtype)


def raise_if_nonfinite(total: Tensor | float, norm_type: float) -> None:
    """The ``error_if_nonfinite`` check of :func:`clip_grad_norm_`, for a caller that measured
    the total itself (reading a device tensor here is a host sync, as in torch)."""
    if not math.isfinite(float(total)):
        raise nonfinite_error(norm_type)


def _scale_host_(grads: list[Tensor], max_norm: float, total: float, dtype: torch.dtype) -> float:
    """Multiply ``grads`` in place by the clip coefficient computed on the host; the
    coefficient applied (1.0 when none)."""
    if not grads or max_norm == _INF:
        return 1.0
    coef = host_clip_coef(max_norm, total, dtype)
    if coef >= 1.0:
        return 1.0
    torch._foreach_mul_(grads, coef)
    return coef


def _scale_(grads: list[Tensor], max_norm: float, total_norm: Tensor | float, foreach: bool | None) -> None:
    if not grads or max_norm == _INF:
        return
    if any(g.is_sparse or g.is_complex() for g in grads):
        grads = [_scale_target(g) for g in grads]
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    if cpu_paths() and total_norm.is_cpu:
        # reading a CPU tensor is not a device sync, whatever device the gradients are on
        _scale_host_(grads, max_norm, total_norm.item(), total_norm.dtype)
        return
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        coef_d = clip_coef.to(device)
        if foreach is not False and device.type in foreach_devices():
            torch._foreach_mul_(group, coef_d)
        else:
            for g in group:
                g.mul_(coef_d)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    group: Any = None,
) -> Tensor:
    r"""Clip the total gradient norm of ``parameters`` in place.

    Equivalent to :func:`get_total_norm` on the gradients followed by
    :func:`clip_grads_with_norm_` with that norm.

    Args:
        parameters: an iterable of tensors (a generator is fine) or a single tensor;
            parameters without ``.grad`` are skipped. An empty generator warns, as in torch.
        max_norm: the largest allowed total norm, ``>= 0``; ``inf`` measures only.
        norm_type: any float ``p`` or ``'inf'``. Default: 2.0.
        error_if_nonfinite: raise ``RuntimeError`` (before touching any gradient) if the total
            norm is NaN or +-inf. Default: False.
        foreach: accepted for compatibility with torch. Default: None.
        group: a process group: clip by the norm of every rank's gradients together, as
            :func:`get_total_norm` (DTensor gradients need none). Default: None.

    Returns:
        The total norm of the gradients before clipping (see :func:`get_total_norm`).

    Raises:
        ValueError: if ``max_norm`` is negative or NaN.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    max_norm = _check_max_norm(max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = _total_norm(grads, norm_type, error_if_nonfinite, foreach, group)
    _scale_(grads, max_norm, total, foreach)
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor],
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    r"""Clamp every gradient element into ``[-clip_value, clip_value]`` in place.

    Args:
        parameters: an iterable of tensors or a single tensor whose ``.grad`` is clamped;
            parameters without ``.grad`` are skipped.
        clip_value: the largest allowed magnitude. As in torch, a negative value sets every
            element to ``clip_value``, and NaN elements stay NaN.
        foreach: accepted for compatibility with torch; ``True`` raises on devices without
            foreach kernels. Default: None.

    Differs from torch in that an input without any gradient is a no-op (torch raises) and
    in that sparse COO gradients are accepted: coalesced in place (duplicates summed), then
    their values clamped; a negative or NaN ``clip_value`` raises ``ValueError`` for them.
    On CPU each gradient is clamped in one pass (torch's foreach path makes two).
    """
    parameters = as_list(parameters)
    clip_value = float(clip_value)
    grads = [p.grad for p in parameters if p.grad is not None]
    check_foreach(foreach, grads)
    if any(g.is_sparse for g in grads):
        if not clip_value >= 0:  # also rejects NaN
            raise ValueError(
                f"clip_value must be a non-negative number for sparse gradients, got {clip_value}: "
                "it would set every element to clip_value, the unstored zeros included, which a "
                "sparse gradient cannot hold (use clip_value=0 to zero them)"
            )
        # duplicate entries are summed before clamping, as in g.to_dense()
        grads = [coalesce_(g)._values() if g.is_sparse else g for g in grads]
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    on_cpu_paths = cpu_paths()
    for g in grads:
        if on_cpu_paths and g.is_cpu:
            g.clamp_(min=-clip_value, max=clip_value)
        else:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        if foreach is not False and device.type in foreach_devices():
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for g in group:
                g.clamp_(min=-clip_value, max=clip_value)
