"""The CPU fast paths of the local norms: long tensors reduced in rows whose results are summed
in float64, short tensors concatenated into one buffer, ``aminmax`` for the inf norm, one float64
reduction per tensor for small models (and its host form, :func:`host_grad_norms`), and the
checks that send a doubtful result to the exact recomputation of :mod:`.exact`. Also the test
seam ``_CPU_PATHS``. See docs/engine.md.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator

import torch
from torch import Tensor

from gradcheck_cli.engine.exact import _combine, _dense_view, _exact_norm, _flat_pieces, _root

_INF = math.inf

# Long tensors are reduced as (rows, _ROW) views and the per-row results are summed in float64
# (difference 3). torch's float32 reduction kernels accumulate each row sequentially in a few
# vector lanes, so their error grows with the row length: on constant data it is 2e-5 for rows
# of 16384 and below 1e-6 for rows of 1024; all row lengths from 512 up read memory equally fast.
_ROW = 1 << 10
# Tensors shorter than _SHORT (and the remainders of row reductions) are concatenated into one
# buffer (CPU): one reduction instead of one dispatch per tensor. A buffer holds at most about
# _BATCH_LIMIT elements.
_SHORT = 1 << 14
_BATCH_LIMIT = 1 << 22
# Models with at most _SMALL_MODEL gradient elements in all, none float64, take one float64
# reduction per tensor (``_cpu_small_model``): below this size the fixed cost of the general
# path's bookkeeping outweighs the upcast copy (measured: 18 vs 65 us for 161 elements, 35 vs
# 124 us for 24,640; the copy wins from about 2^18 elements on).
_SMALL_MODEL = 1 << 16
# Relative weight that underflowed terms may have in a fast result before it is recomputed.
_UNDERFLOW_SLACK = 2.0**26

_HALF = (torch.float16, torch.bfloat16)

# Seam for the tests. The CPU fast paths (and reading a CPU clip coefficient on the host) are
# taken only while this is True. The tests set it to False to run the path that every other
# device takes (torch's kernels, no host syncs) on CPU tensors: the same code, not a copy of it.
# Read at call time (``cpu._CPU_PATHS``; above the local layer, ``norms.cpu_paths()``).
_CPU_PATHS = True


_CPU_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})


_STRIDED = frozenset({torch.strided})


def _cpu_fast(tensors: list[Tensor], dtypes: set[torch.dtype], layouts: set[torch.layout] | None = None) -> bool:
    """True when every tensor is a dense real floating-point CPU tensor (the fast paths)."""
    if layouts is None:
        layouts = {t.layout for t in tensors}
    return dtypes <= _CPU_DTYPES and layouts == _STRIDED and all(t.is_cpu for t in tensors)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# CPU fast paths


def _row_norms(flat: Tensor, p: float, out: list[Tensor]) -> Tensor | None:
    """Append the norms of the full ``_ROW``-element rows of a 1-D contiguous tensor to ``out``
    (accumulated in float32, or float64 for float64 input); return the remainder, if any."""
    n = flat.numel()
    rows = n // _ROW
    body = rows * _ROW
    kw = {"dtype": torch.float32} if flat.dtype in _HALF else {}
    if rows:
        view = flat.view(rows, _ROW) if body == n else flat[:body].view(rows, _ROW)
        out.append(torch.linalg.vector_norm(view, p, 1, **kw))
    return flat[body:] if body < n else None


def _pow_sum_terms(parts: list[Tensor], p: float) -> Tensor:
    """The partial norms as one new float64 vector, raised to the power p."""
    v = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(torch.float64, copy=True)
    if p == 2.0:
        return v.square_()
    if p == 1.0:
        return v
    return v.pow_(p)


def _subnormal(norms: Tensor) -> Tensor:
    """Which partial norms are subnormal (nonzero but below the smallest normal number).

    For ``p < 1`` a partial norm ``s**(1/p)`` can underflow while its sum of powers ``s`` is
    fine, and raising the imprecise result back to the power p magnifies its error."""
    return (norms > 0) & (norms < torch.finfo(norms.dtype).tiny)


def _underflow_floor(dtype: torch.dtype) -> float:
    """Per element: a fast sum of p-th powers below ``numel * floor`` may have lost more than
    2**-26 of its value to underflowed terms (each loses at most the smallest normal number)."""
    if dtype == torch.float64:
        return torch.finfo(torch.float64).tiny * _UNDERFLOW_SLACK
    return torch.finfo(torch.float32).tiny * _UNDERFLOW_SLACK


def _short_batches(grads: list[Tensor], numels: list[int]) -> Iterator[list[Tensor]]:
    """The non-empty tensors shorter than ``_SHORT``, flattened, in batches of at most about
    ``_BATCH_LIMIT`` elements (kept cheap: this runs over every tensor of the model)."""
    short = [g for g, n in zip(grads, numels) if 0 < n < _SHORT]
    if not short:
        return
    if {g.dim() for g in short} != {1}:
        short = [g.reshape(-1) for g in short]
    sizes = [n for n in numels if 0 < n < _SHORT]
    if sum(sizes) <= _BATCH_LIMIT:
        yield short
        return
    start = acc = 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= _BATCH_LIMIT:
            yield short[start : i + 1]
            start, acc = i + 1, 0
    if start < len(short):
        yield short[start:]


def _split_rows(flat: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """A 1-D contiguous tensor as a (rows, _ROW) view and a remainder (either may be None)."""
    n = flat.numel()
    rows = n // _ROW
    body = rows * _ROW
    if not rows:
        return None, flat
    view = flat.view(rows, _ROW) if body == n else flat[:body].view(rows, _ROW)
    return view, (flat[body:] if body < n else None)


def _cpu_total_lp(grads: list[Tensor], p: float) -> float:
    """Fast total norm for finite p > 0; falls back to exact recomputation when in doubt."""
    numels = [g.numel() for g in grads]
    # plan: every reduction is either a (rows, _ROW) view or a remainder shorter than _ROW
    views: list[Tensor] = []
    tails: list[Tensor] = []
    early: list[Tensor] = []  # row norms of copied pieces, reduced at once to free the copies
    for g, n in zip(grads, numels):
        if n < _SHORT:
            continue
        dense = g if g.is_contiguous() else _dense_view(g)
        if dense is not None:
            view, tail = _split_rows(dense.view(-1))
            if view is not None:
                views.append(view)
            if tail is not None:
                tails.append(tail)
            continue
        for piece in _flat_pieces(g, 1 << 62, 1 << 24):  # strided: bounded copies
            tail = _row_norms(piece, p, early)
            if tail is not None:
                tails.append(tail.clone())
    ends: list[Tensor] = []
    batches = list(_short_batches(grads, numels))
    if tails:
        batches.append(tails)
    for batch in batches:
        view, tail = _split_rows(torch.cat(batch) if len(batch) > 1 else batch[0])
        if view is not None:
            views.append(view)
        if tail is not None:
            ends.append(tail)
    if not views and not ends and not early:
        return 0.0
    # reduce: the row norms of each accumulation dtype go straight into one buffer
    total_pow = _pow_sum_terms(early, p).sum().item() if early else 0.0
    lossy = p < 1 and any(bool(_subnormal(t).any()) for t in early)
    for acc in {_acc_dtype(t.dtype) for t in views + ends}:
        mine = [v for v in views if _acc_dtype(v.dtype) == acc]
        rest = [t for t in ends if _acc_dtype(t.dtype) == acc]
        buf = torch.empty(sum(v.shape[0] for v in mine) + len(rest), dtype=acc)
        off = 0
        for v in mine:
            kw = {"dtype": torch.float32} if v.dtype in _HALF else {}
            torch.linalg.vector_norm(v, p, 1, out=buf[off : off + v.shape[0]], **kw)
            off += v.shape[0]
        for t in rest:
            kw = {"dtype": torch.float32} if t.dtype in _HALF else {}
            torch.linalg.vector_norm(t, p, out=buf[off], **kw)
            off += 1
        if p == 2.0:
            v64 = buf.to(torch.float64)
            total_pow += torch.dot(v64, v64).item()
        else:
            total_pow += _pow_sum_terms([buf], p).sum().item()
            lossy = lossy or (p < 1 and bool(_subnormal(buf).any()))
    floor = max(_underflow_floor(d) for d in {g.dtype for g in grads})
    if math.isfinite(total_pow) and total_pow >= floor * sum(numels) and not lossy:
        return _root(total_pow, p)
    if math.isnan(total_pow):
        # a sum of non-negative terms is NaN only if an element is NaN: so is the exact answer
        return math.nan
    if math.isinf(total_pow) or lossy:
        # an inf element, an overflow or a subnormal partial norm somewhere: find out per
        # tensor, recomputing only the tensors concerned
        total, _ = _cpu_per_tensor_lp(grads, p)
        return total.item()
    # so small that underflow may matter (or exactly 0): every tensor is tiny, recompute all
    # (an all-zero tensor costs one aminmax)
    norms = [_exact_norm(g, p) for g, n in zip(grads, numels) if n]
    return _combine(torch.tensor(norms, dtype=torch.float64), p).item()


def _cpu_per_tensor_lp(grads: list[Tensor], p: float) -> tuple[Tensor, Tensor]:
    """(total, per-tensor norms), float64, for finite p > 0; every tensor is reduced once."""
    parts: list[Tensor] = []
    owners: list[int] = []
    counts: list[int] = []
    small: dict[torch.dtype, tuple[list[Tensor], list[int]]] = {}
    for i, g in enumerate(grads):
        n = g.numel()
        if n == 0:
            continue
        if n < _ROW:
            lst = small.setdefault(_acc_dtype(g.dtype), ([], []))
            lst[0].append(g)
            lst[1].append(i)
            continue
        for piece in _flat_pieces(g, 1 << 62, 1 << 24):
            before = len(parts)
            tail = _row_norms(piece, p, parts)
            if len(parts) > before:
                owners.append(i)
                counts.append(parts[-1].numel())
            if tail is not None:
                lst = small.setdefault(_acc_dtype(g.dtype), ([], []))
                lst[0].append(tail.clone())  # do not keep a copied piece alive
                lst[1].append(i)
    for dt, (ts, idx) in small.items():
        # one C++ loop over the short tensors
        norms = torch._foreach_norm(ts, p, dtype=dt)
        parts.append(torch.stack(norms))
        owners.extend(idx)
        counts.extend([1] * len(idx))
    owner, thresholds, all_nonempty = _per_tensor_plan(grads, owners, counts)
    sums = torch.zeros(len(grads), dtype=torch.float64)
    if parts:
        sums.index_add_(0, owner, _pow_sum_terms(parts, p))
    # inf: overflow or an inf element; tiny: underflow may matter (empty tensors have a
    # threshold of -inf); lossy: a partial norm lost precision as a subnormal number. NaN needs
    # no second look.
    suspect = torch.isinf(sums) | (sums < thresholds)
    if parts and p < 1:
        lossy = torch.zeros(len(grads), dtype=torch.float64)
        lossy.index_add_(0, owner, torch.cat([_subnormal(t) for t in parts]).double())
        suspect |= lossy > 0
    norms = sums.pow(1.0 / p)
    if bool(suspect.any()):
        for i in suspect.nonzero().flatten().tolist():
            norms[i] = _exact_norm(grads[i], p)
    else:
        # Every per-tensor sum of powers is trustworthy: their float64 sum is the total's,
        # unless it overflows float64 (then the scaled combination below is needed).
        total = sums.sum().pow_(1.0 / p)
        if not math.isinf(total.item()):
            return total, norms
    if all_nonempty:
        return _combine(norms, p), norms
    return _combine(norms[torch.tensor([g.numel() > 0 for g in grads])], p), norms


# The index tensors of ``_cpu_per_tensor_lp`` depend only on the gradients' shapes and dtypes,
# which repeat every training step: building them costs more than the reduction itself on a
# small model, so they are kept per layout (a handful of entries; cleared when it grows).
_PLANS: dict[tuple, tuple[Tensor, Tensor, bool]] = {}
_MAX_PLANS = 64


def _per_tensor_plan(grads: list[Tensor], owners: list[int], counts: list[int]) -> tuple[Tensor, Tensor, bool]:
    """(owner of each partial norm, per-tensor underflow threshold (-inf when empty), whether
    every tensor is non-empty), cached per layout."""
    key = (tuple(owners), tuple(counts), tuple((g.numel(), g.dtype) for g in grads))
    plan = _PLANS.get(key)
    if plan is None:
        owner = torch.repeat_interleave(torch.tensor(owners, dtype=torch.long), torch.tensor(counts, dtype=torch.long))
        thresholds = torch.tensor(
            [_underflow_floor(g.dtype) * g.numel() if g.numel() else -_INF for g in grads], dtype=torch.float64
        )
        plan = (owner, thresholds, all(g.numel() > 0 for g in grads))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _cpu_total_inf(grads: list[Tensor]) -> float:
    """Largest magnitude via ``aminmax`` (full memory speed, exact, NaN-propagating)."""
    numels = [g.numel() for g in grads]
    pairs = [torch.aminmax(g) for g, n in zip(grads, numels) if n >= _SHORT]
    for batch in _short_batches(grads, numels):
        pairs.append(torch.aminmax(torch.cat(batch) if len(batch) > 1 else batch[0]))
    if not pairs:
        return 0.0
    lows = torch.stack([lo for lo, _ in pairs])
    highs = torch.stack([hi for _, hi in pairs])
    return torch.maximum(lows.neg_(), highs).max().item()  # NaN-propagating


def _cpu_per_tensor_inf(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    mags = []
    for g in grads:
        if g.numel():
            lo, hi = torch.aminmax(g)
            mags.append(torch.maximum(lo.neg(), hi).to(torch.float64))
        else:
            mags.append(torch.zeros((), dtype=torch.float64))
    norms = torch.stack(mags)
    return norms.max(), norms


def _generic_norms(grads: list[Tensor], p: float) -> Tensor:
    """Per-tensor norms (float64) for p = 0, p = -inf and p < 0; exact."""
    out = []
    for g in grads:
        if g.numel() == 0:
            out.append(0.0)
        elif p == 0:
            out.append(float(torch.count_nonzero(g).item()))
        elif p == -_INF:
            out.append(torch.linalg.vector_norm(g, -_INF).item())
        else:
            out.append(_exact_norm(g, p))
    return torch.tensor(out, dtype=torch.float64)


def _cpu_small_model(grads: list[Tensor], p: float, dtypes: set[torch.dtype] | None = None) -> bool:
    """Whether ``_cpu_small_norms`` applies: p of 1 or 2, no float64 tensor, few elements."""
    if dtypes is None:
        dtypes = {g.dtype for g in grads}
    return (p == 2.0 or p == 1.0) and torch.float64 not in dtypes and sum(g.numel() for g in grads) <= _SMALL_MODEL


def _small_norms_f64(grads: list[Tensor], p: float) -> tuple[float, list[float]]:
    """(total, per-tensor norms) as Python floats, each tensor reduced once in float64 (one
    foreach op; each result read directly, which right after a backward pass is cheaper than
    stacking them first), the total summed exactly (``math.fsum``) and rounded once. Exact to
    float64 rounding with neither overflow nor underflow: the squares of float32, float16 and
    bfloat16 values all lie well inside float64's normal range, and so do their sums here."""
    norms = [t.item() for t in torch._foreach_norm(grads, p, dtype=torch.float64)]
    total = math.sqrt(math.fsum([v * v for v in norms])) if p == 2.0 else math.fsum(norms)
    return total, norms


def _cpu_small_norms(grads: list[Tensor], p: float) -> tuple[Tensor, Tensor]:
    """(total, per-tensor norms), float64 tensors, from ``_small_norms_f64``."""
    total, norms = _small_norms_f64(grads, p)
    return torch.tensor(total, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64)


_SMALL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def host_grad_norms(grads: list[Tensor], p: float) -> tuple[float, list[float]] | None:
    """The total and per-tensor norms :func:`measure_grad_norms` gives for ``grads``, as Python
    floats, when the small-model path applies (CPU, dense, no float64, p of 1 or 2, at most
    ``_SMALL_MODEL`` elements); else None.

    For code that reads every step's norms on the host (the monitor): the small-model path's
    numbers (``_small_norms_f64``) without building tensors from them. Right after a backward
    pass each dispatched op costs several microseconds more than in a warm loop, so on a small
    model the op count is the cost. Values are rounded to float32, the result dtype of such
    gradients, exactly as :func:`measure_grad_norms` rounds them."""
    if not _CPU_PATHS or not grads or not (p == 2.0 or p == 1.0):
        return None
    size = 0
    for g in grads:
        if g.dtype not in _SMALL_DTYPES or g.layout != torch.strided or not g.is_cpu:
            return None
        size += g.numel()
    if size > _SMALL_MODEL:
        return None
    total, norms = _small_norms_f64(grads, p)
    rounded = array("f", norms)  # float64 -> float32, round to nearest even, inf beyond range
    rounded.append(total)
    values = rounded.tolist()
    return values.pop(), values


def _cpu_norms(
    grads: list[Tensor], p: float, per_tensor: bool, dtypes: set[torch.dtype] | None = None
) -> tuple[float | Tensor, Tensor | None]:
    if _cpu_small_model(grads, p, dtypes):
        total, norms = _cpu_small_norms(grads, p)
        return total, (norms if per_tensor else None)
    if p == _INF:
        if per_tensor:
            return _cpu_per_tensor_inf(grads)
        return _cpu_total_inf(grads), None
    if p > 0 and math.isfinite(p):
        if per_tensor:
            return _cpu_per_tensor_lp(grads, p)
        return _cpu_total_lp(grads, p), None
    norms = _generic_norms(grads, p)
    nonempty = torch.tensor([g.numel() > 0 for g in grads], dtype=torch.bool)
    return _combine(norms[nonempty], p), (norms if per_tensor else None)
