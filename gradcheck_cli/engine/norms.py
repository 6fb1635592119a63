"""Local gradient norms: the numbers every clipping function of the engine starts from.

The total and per-tensor norms of this process's gradients, for every ``norm_type`` torch
accepts: the driver that picks a path (the CPU fast paths of :mod:`.cpu`, or the path for every
other device here: torch's kernels, no host syncs), sparse and complex gradients as their dense
real equivalents, and :func:`measure_grad_norms`. :mod:`.distributed` and :mod:`.clipping` use
only the public functions below. See docs/engine.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from gradcheck_cli.engine import cpu
from gradcheck_cli.engine.cpu import _HALF, _cpu_fast, _cpu_norms, host_grad_norms
from gradcheck_cli.engine.exact import _combine

__all__ = [
    "GradNorms",
    "as_list",
    "check_foreach",
    "coalesce_",
    "cpu_paths",
    "foreach_devices",
    "host_grad_norms",
    "local_total_norm",
    "measure_grad_norms",
    "nonfinite_error",
    "result_dtype",
]

_INF = math.inf


# --------------------------------------------------------------------------------------------
# argument handling


def foreach_devices() -> set[str]:
    """The device types with torch's foreach kernels (torch's list, plus CPU)."""
    return {"cpu", "cuda", "xpu", "mtia", torch._C._get_privateuse1_backend_name()}


def check_foreach(foreach: bool | None, tensors: list[Tensor]) -> None:
    """torch's check: ``foreach=True`` raises ``RuntimeError`` for tensors on a device without
    foreach kernels."""
    if not foreach:
        return
    ok = foreach_devices()
    for t in tensors:
        if t.device.type not in ok:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {t.device.type} tensors")


_FLOAT32_ONLY = frozenset({torch.float32})


def result_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """``promote(gradient dtypes, float32)``, with complex dtypes mapped to their real dtype."""
    if dtypes == _FLOAT32_ONLY:  # the usual case, without the promotion loop
        return torch.float32
    dt = torch.float32
    for d in dtypes:
        if d.is_complex:
            d = torch.float64 if d == torch.complex128 else torch.float32
        elif not d.is_floating_point:
            d = torch.float32
        dt = torch.promote_types(dt, d)
    return dt


def nonfinite_error(norm_type: float) -> RuntimeError:
    """torch's error for a non-finite total norm under ``error_if_nonfinite=True``."""
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`"
    )


# --------------------------------------------------------------------------------------------
# other devices: close to torch, no host syncs


def _device_norms(
    grads: list[Tensor], p: float, foreach: bool | None, per_tensor: bool
) -> tuple[Tensor, Tensor | None]:
    """(total, per-tensor norms or None), float64 on the first tensor's device, for any device,
    without host syncs: one norm kernel per (device, dtype) group as in torch, fp16/bf16
    accumulated in float32, and the per-tensor norms combined in float64 with scaling."""
    first = grads[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(grads):
        if g.numel() > 0:  # zero-element tensors have norm 0 and stay out of the total
            groups.setdefault((g.device, g.dtype), []).append(i)
    stacks: list[Tensor] = []
    where: dict[int, tuple[int, int]] = {}
    for (device, dtype), idx in groups.items():
        ts = [grads[i] for i in idx]
        acc = torch.float32 if dtype in _HALF else None
        use_foreach = (
            foreach is not False
            and p in (1.0, 2.0, _INF)
            and device.type in foreach_devices()
            and all(type(t) is Tensor for t in ts)
            and not dtype.is_complex
        )
        if use_foreach:
            norms = torch._foreach_norm(ts, p, dtype=acc)
        else:
            norms = [torch.linalg.vector_norm(t, p, dtype=acc) for t in ts]
        for j, i in enumerate(idx):
            where[i] = (len(stacks), j)
        stacks.append(torch.stack(norms).to(device=first, dtype=torch.float64))
    if not stacks:
        total = torch.zeros((), dtype=torch.float64, device=first)
    else:
        total = _combine(torch.cat(stacks) if len(stacks) > 1 else stacks[0], p)
    if not per_tensor:
        return total, None
    zero = torch.zeros((), dtype=torch.float64, device=first)
    per = [stacks[where[i][0]][where[i][1]] if i in where else zero for i in range(len(grads))]
    return total, torch.stack(per)


# --------------------------------------------------------------------------------------------
# shared driver


def _norms(grads: list[Tensor], p: float, per_tensor: bool, foreach: bool | None) -> tuple[Tensor, Tensor | None]:
    """(total norm, per-tensor norms or None), both in the result dtype."""
    if not grads:
        return torch.tensor(0.0), (torch.zeros(0) if per_tensor else None)
    dtypes = {t.dtype for t in grads}
    layouts = {t.layout for t in grads}
    if torch.sparse_coo in layouts or any(d.is_complex for d in dtypes):
        grads = [_norm_operand(t, p) for t in grads]
        dtypes = {t.dtype for t in grads}
        layouts = {t.layout for t in grads}
    out_dtype = result_dtype(dtypes)
    if cpu._CPU_PATHS and _cpu_fast(grads, dtypes, layouts):
        total, norms = _cpu_norms(grads, p, per_tensor, dtypes)
        if isinstance(total, float):
            total_t = torch.tensor(total, dtype=out_dtype)
        else:
            total_t = total.to(out_dtype)
        return total_t, (norms.to(out_dtype) if norms is not None else None)
    total, norms = _device_norms(grads, p, foreach, per_tensor)
    return total.to(out_dtype), (norms.to(out_dtype) if norms is not None else None)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _norm_operand(g: Tensor, p: float) -> Tensor:
    """A dense real tensor with the ``p``-norm of ``g``, for what the reductions above do not
    take. A complex tensor becomes its magnitudes (one real copy, which then gets the
    overflow-free real paths). A sparse COO tensor becomes its coalesced values: duplicate
    entries summed first (in float64, then rounded once to the accumulation dtype, so that
    neither cancellation nor the order of the sum matters), plus one zero when it has unstored
    elements and ``p < 0`` (``-inf`` included), where a zero element decides the norm; zeros
    change no other norm."""
    if g.is_sparse:
        values = g.to(_wide(g.dtype)).coalesce().values()
        if p < 0 and values.numel() < g.numel():
            values = torch.cat([values.reshape(-1), values.new_zeros(1)])
        g = values.to(g.dtype if g.dtype not in _HALF else torch.float32)
    return g.abs() if g.is_complex() else g


def coalesce_(g: Tensor) -> Tensor:
    """The sparse COO tensor ``g``, coalesced in place (the same object, so that the optimizer
    sees the change): duplicate entries summed in float64 and rounded once, so its values are
    the correctly rounded elements of its dense equivalent."""
    if not g.is_coalesced():
        g.copy_(g.to(_wide(g.dtype)).coalesce())
    return g


def as_list(tensors: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """A single tensor or an iterable of tensors as a new list."""
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def cpu_paths() -> bool:
    """Whether the CPU fast paths (and reading a CPU clip coefficient on the host) are on: the
    test seam ``cpu._CPU_PATHS``, read at call time."""
    return cpu._CPU_PATHS


def local_total_norm(tensors: list[Tensor], p: float, foreach: bool | None = None) -> Tensor:
    """The ``p``-norm of this process's ``tensors`` viewed as one vector, in the result dtype
    (as :func:`gradcheck_cli.engine.get_total_norm` computes it without a process group).
    ``foreach=False`` keeps the device path off torch's foreach kernels; the flag is not checked
    here (:func:`check_foreach`)."""
    return _norms(tensors, p, False, foreach)[0]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare with
class GradNorms:
    """Gradient norms from one measuring pass.

    Attributes:
        total_norm: the total norm (as :func:`gradcheck_cli.engine.get_total_norm` computes it).
        norms: 1-D tensor, one norm per parameter that has a gradient, in input order.
        names: the names of those parameters when ``named_parameters()`` was given, else None.
    """

    total_norm: Tensor
    norms: Tensor
    names: tuple[str, ...] | None = None

    def first_non_finite(self) -> str | int | None:
        """Name (or index into ``norms``) of the first tensor whose norm is NaN or inf."""
        bad = (~torch.isfinite(self.norms)).nonzero()
        if bad.numel() == 0:
            return None
        i = int(bad[0, 0])
        return self.names[i] if self.names is not None else i


@torch.no_grad()
def measure_grad_norms(
    parameters: Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    norm_type: float | str = 2.0,
) -> GradNorms:
    """Measure the total and per-tensor gradient norms in one pass; never modifies gradients.

    Args:
        parameters: a tensor, an iterable of tensors, or an iterable of ``(name, tensor)`` pairs
            such as ``model.named_parameters()``. Parameters without ``.grad`` are skipped.
        norm_type: as in :func:`get_total_norm`.

    Returns:
        :class:`GradNorms` with the total norm (equal to :func:`get_total_norm` of the same
        gradients up to float rounding), the per-tensor norms in the same dtype, and the names.
    """
    items = as_list(parameters)  # type: ignore[arg-type]
    names: list[str] | None = None
    grads: list[Tensor] = []
    if items and isinstance(items[0], tuple):
        names = []
        for name, prm in items:  # type: ignore[misc]
            if prm.grad is not None:
                names.append(name)
                grads.append(prm.grad)
    else:
        grads = [prm.grad for prm in items if prm.grad is not None]
    total, norms = _norms(grads, float(norm_type), True, None)
    if norms is None:  # pragma: no cover - _norms always returns them when asked
        raise AssertionError("per-tensor norms missing")
    return GradNorms(total, norms, tuple(names) if names is not None else None)
