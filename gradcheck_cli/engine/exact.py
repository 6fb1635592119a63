"""The exact per-tensor norm and the combination of per-tensor norms: the float64 arithmetic
that the engine's fast paths fall back on. :func:`_exact_norm` divides a tensor by a power of
two near its extreme magnitude and sums in float64, so that no term overflows and no relevant
term underflows; :func:`_combine` takes the p-norm of a vector of per-tensor norms scaled the
same way, on any device and without a host sync. See docs/engine.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

_INF = math.inf
# Exact recomputation works through float64 chunks of this many elements.
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# exact (slow) per-tensor norm, float64, overflow- and underflow-free


def _flat_pieces(g: Tensor, view_size: int, copy_size: int) -> Iterator[Tensor]:
    """1-D pieces covering the elements of ``g``: views of at most ``view_size`` elements when
    ``g`` is dense, otherwise contiguous copies of at most about ``copy_size`` elements."""
    if not g.is_contiguous():
        dense = _dense_view(g)
        if dense is None:
            per_row = max(1, g[0].numel())
            step = max(1, copy_size // per_row)
            for block in torch.split(g, step, dim=0):
                yield from _flat_pieces(block.contiguous(), view_size, copy_size)
            return
        g = dense
    flat = g.view(-1)
    if flat.numel() <= view_size:
        yield flat
        return
    for start in range(0, flat.numel(), view_size):
        yield flat[start : start + view_size]


def _dense_view(g: Tensor) -> Tensor | None:
    """``g`` reordered to a contiguous tensor when it is a permutation of one (e.g. ``w.t()``)."""
    if g.ndim < 2:
        return None
    order = sorted(range(g.ndim), key=lambda d: (g.stride(d), g.size(d)), reverse=True)
    permuted = g.permute(order)
    return permuted if permuted.is_contiguous() else None


def _root(acc: float, p: float, exp: int = 0) -> float:
    """``2**exp * acc**(1/p)`` in float64, inf where it overflows (Python raises instead)."""
    try:
        return math.ldexp(acc ** (1.0 / p), exp)
    except OverflowError:
        return _INF
    except ZeroDivisionError:  # 0 ** negative
        return _INF


def _exact_norm(g: Tensor, p: float) -> float:
    """Norm of one tensor (finite p != 0) in float64 arithmetic, scaled by its extreme magnitude
    so that no term can overflow and no relevant term can underflow."""
    if g.numel() == 0:
        return 0.0
    x = g.abs() if g.is_complex() else g
    if p > 0:
        lo, hi = torch.aminmax(x)  # NaN-propagating; exact
        lo_v, hi_v = lo.item(), hi.item()
        m = math.nan if math.isnan(lo_v) or math.isnan(hi_v) else max(-lo_v, hi_v)
    else:
        m = torch.linalg.vector_norm(x, -_INF).item()  # min |x|, exact
        if math.isnan(m) or m == 0.0:
            return m
        if torch.isnan(x).any():
            return math.nan
    if math.isnan(m) or m == 0.0 or m == _INF:
        return m
    # divide by the power of two just above m: exact, and it puts every term in [0, 1] for
    # p > 0 (the largest one near 1) or in [1, inf] for p < 0 (the smallest near 1)
    _, exp = math.frexp(m)
    # two factors: 2**-exp alone overflows when m is subnormal
    scale_a = math.ldexp(1.0, -exp // 2)
    scale_b = math.ldexp(1.0, -exp - (-exp // 2))
    acc = 0.0
    for piece in _flat_pieces(x, _CHUNK, _CHUNK):
        c = piece.to(torch.float64, copy=True).abs_().mul_(scale_a).mul_(scale_b)
        if p == 2.0:
            acc += torch.dot(c, c).item()
        elif p == 1.0:
            acc += c.sum().item()
        else:
            acc += c.pow_(p).sum().item()
    return _root(acc, p, exp)


# --------------------------------------------------------------------------------------------
# combination of per-tensor norms (no host sync: usable on any device)


def _combine(norms: Tensor, p: float) -> Tensor:
    """p-norm of a 1-D float64 vector of per-tensor norms, scaled so it cannot overflow."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    if p == _INF:
        return norms.max()
    if p == -_INF:
        return norms.min()
    if p == 0:
        return (norms != 0).sum().to(norms.dtype)
    m = norms.max() if p > 0 else norms.min()
    ok = (m > 0) & torch.isfinite(m)
    m = torch.where(ok, m, torch.ones_like(m))
    return m * torch.sum((norms / m) ** p) ** (1.0 / p)
