"""Tests for gradcheck_cli.engine: differential against torch.nn.utils, exact against float64.

Where the engine agrees with torch by design, hypothesis draws random gradient sets and compares
with torch itself. The regimes where the engine deliberately differs (see docs/engine.md) are
kept out of those comparisons and checked against a float64 reference instead,
each with a test that torch's own behaviour would fail.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_
from torch.nn.utils import get_total_norm as torch_get_total_norm
from torch.overrides import TorchFunctionMode

from gradcheck_cli import engine
from gradcheck_cli.engine import (
    GradNorms,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    measure_grad_norms,
)
from gradcheck_cli.engine import cpu as engine_cpu
from gradcheck_cli.engine import exact as engine_exact
from gradcheck_cli.engine import norms as engine_norms

INF = math.inf
NAN = math.nan
NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -INF, INF, "inf"]
# fractional p > 1, large p (whose powers overflow or underflow float32 for ordinary values),
# negative p other than -1
WIDE_NORM_TYPES = NORM_TYPES + [1.5, 2.5, 20.0, 100.0, -0.5, -2.0]


def examples(n: int) -> int:
    """``n`` hypothesis examples, or a quarter of them (at least 8) when mutmut runs the tests
    once per mutant (its workers have MUTANT_UNDER_TEST set; conftest.py then draws the
    examples deterministically): every mutant meets the same examples, in seconds."""
    return max(8, n // 4) if "MUTANT_UNDER_TEST" in os.environ else n


FAST = settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL = (torch.float32, torch.float64)
HALF = (torch.float16, torch.bfloat16)
COMPLEX = (torch.complex64, torch.complex128)
# magnitudes whose squares (or p-th powers) overflow or underflow the dtype (or, for fp16, the
# fp16 range: the engine accumulates fp16 in float32, torch does not)
EXTREME = {
    torch.float32: [1e-30, 1e30],
    torch.float64: [1e-200, 1e200],
    torch.float16: [1e-4, 300.0],
    torch.bfloat16: [1e-30, 1e30],
    torch.complex64: [1e-30, 1e30],
    torch.complex128: [1e-200, 1e200],
}


# ------------------------------------------------------------------------------------------
# float64 reference


def ref_tensor_norm(t: torch.Tensor, p: float) -> float:
    """Norm of one tensor in float64, scaled so that nothing overflows or underflows (a sparse
    tensor is measured as ``to_dense()``, a complex one by its float64 magnitudes)."""
    t = t.detach()
    if t.is_sparse:  # duplicate entries summed in float64
        t = t.to(torch.complex128 if t.is_complex() else torch.float64).to_dense()
    x = (t.to(torch.complex128) if t.is_complex() else t.to(torch.float64)).abs().flatten()
    if x.numel() == 0:
        return 0.0
    if p == INF:
        return x.max().item()
    if p == -INF:
        return x.min().item()
    if p == 0:
        return float(torch.count_nonzero(x).item())
    if torch.isnan(x).any():
        return NAN
    m = (x.max() if p > 0 else x.min()).item()
    if m == 0.0 or m == INF:
        return m
    return m * math.fsum(((x / m) ** p).tolist()) ** (1.0 / p)


def ref_combine(norms: list[float], p: float) -> float:
    if not norms:
        return 0.0
    if any(math.isnan(n) for n in norms):
        return NAN
    if p == INF:
        return max(norms)
    if p == -INF:
        return min(norms)
    if p == 0:
        return float(sum(1 for n in norms if n != 0))
    m = max(norms) if p > 0 else min(norms)
    if m == 0.0 or m == INF:
        return m
    return m * math.fsum((n / m) ** p for n in norms) ** (1.0 / p)


def ref_total(tensors: list[torch.Tensor], p: float) -> float:
    """Norm of the vector of per-tensor norms (zero-element tensors do not take part)."""
    return ref_combine([ref_tensor_norm(t, p) for t in tensors if t.numel() > 0], p)


def rel_err(value: float, ref: float) -> float:
    if math.isnan(ref) or math.isnan(value):
        return 0.0 if math.isnan(ref) and math.isnan(value) else INF
    if math.isinf(ref) or math.isinf(value):
        return 0.0 if value == ref else INF
    if ref == 0.0:
        return 0.0 if value == 0.0 else INF
    return abs(value - ref) / abs(ref)


def assert_close_to_ref(
    value: float, ref: float, rtol: float, what: str = "", dtype: torch.dtype | None = None
) -> None:
    """``value`` within ``rtol`` of ``ref``. With ``dtype`` (the result's), a reference beyond
    that dtype's range may also come out inf, and one in its subnormal range is held to
    absolute precision (its spacing there is ``tiny * eps``)."""
    if dtype is not None and math.isfinite(ref):
        info = torch.finfo(dtype)
        if ref >= info.max * (1 - rtol) and value == INF:
            return
        if 0 < ref < info.tiny:
            assert abs(value - ref) <= ref * rtol + info.tiny * info.eps * 4, (what, value, ref)
            return
    assert rel_err(value, ref) <= rtol, f"{what}: got {value!r}, reference {ref!r}"


def f32_rtol(p: float) -> float:
    """float32 accumulation: relative error of the sum of p-th powers, amplified by 1/p."""
    return 2e-6 * max(1.0, 1.0 / abs(p)) if p != 0 and math.isfinite(p) else 2e-6


def clone_strided(g: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (non-contiguous gradients stay non-contiguous); sparse
    tensors are cloned as they are (uncoalesced ones stay uncoalesced)."""
    if g.is_sparse:
        return g.clone()
    out = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype)
    return out.copy_(g)


def make_params(grads: list[torch.Tensor | None]) -> list[torch.nn.Parameter]:
    """Parameters holding copies of ``grads`` as gradients (None: no gradient)."""
    params = []
    for g in grads:
        if g is None:
            params.append(torch.nn.Parameter(torch.zeros(2)))
        else:
            prm = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
            prm.grad = clone_strided(g)
            params.append(prm)
    return params


def dense(t: torch.Tensor) -> torch.Tensor:
    """The dense equivalent of a sparse tensor, its duplicate entries summed in float64 and
    rounded once to its dtype (``to_dense()`` sums in the tensor's dtype, in some order)."""
    if not t.is_sparse:
        return t
    wide = torch.complex128 if t.is_complex() else torch.float64
    return t.to(wide).to_dense().to(t.dtype)


def torch_kernel_err(t: torch.Tensor, p: float) -> float:
    """Relative error of torch's own ``vector_norm`` of ``t`` (float32-accumulated for fp16 and
    bf16) against the float64 reference."""
    t = dense(t)
    if t.numel() == 0:
        return 0.0
    kw = {"dtype": torch.float32} if t.dtype in HALF else {}
    return rel_err(torch.linalg.vector_norm(t, p, **kw).item(), ref_tensor_norm(t, p))


def tensor_rtol(t: torch.Tensor, p: float) -> float:
    """How far the engine's norm of ``t`` may be from the float64 reference.

    float64 and complex128: rounding only. float32, fp16, bf16 and complex64: float32
    accumulation (``f32_rtol``), also after the exact recomputation of overflowing or
    underflowing tensors; a complex64 magnitude adds one float32 rounding per element, which
    ``f32_rtol`` covers."""
    if t.dtype in (torch.float64, torch.complex128):
        return 1e-12
    return f32_rtol(p)


def rtol_for(tensors, p: float) -> float:
    """The total's tolerance: a p-norm of per-tensor norms is off by at most the largest
    relative error of its terms (for every p, negative ones included)."""
    return max((tensor_rtol(t, p) for t in tensors if t.numel() > 0), default=1e-12)


def result_dtype(tensors) -> torch.dtype:
    """The engine's documented result dtype: promote(real gradient dtypes, float32)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.real.dtype if t.is_complex() else t.dtype)
    return dt


def grads_of(params):
    return [prm.grad for prm in params if prm.grad is not None]


def torch_accepts(tensors: list[torch.Tensor], p: float) -> bool:
    """torch raises for zero-element tensors with the inf norm and with negative p."""
    return not ((p == INF or p < 0) and any(t.numel() == 0 for t in tensors))


@contextlib.contextmanager
def device_path():
    """Run the engine's path for non-CPU devices (torch's kernels, foreach multiplies, no host
    reads) on CPU tensors, through the engine's own seam: the same code a GPU runs."""
    assert engine_cpu._CPU_PATHS
    engine_cpu._CPU_PATHS = False
    try:
        yield
    finally:
        engine_cpu._CPU_PATHS = True


# ------------------------------------------------------------------------------------------
# hypothesis strategies


@st.composite
def gradient(draw, dtypes=REAL, nonfinite=True, scales=None, extreme=False):
    """One gradient tensor: random shape (sometimes empty, sometimes longer than one row of the
    engine's chunked reduction), dtype, scale, zeros, sprinkled NaN/inf, non-contiguity.

    ``extreme``: the tensor may also get a magnitude whose powers overflow or underflow (see
    ``EXTREME``)."""
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["small", "small", "small", "long", "matrix"]))
    if kind == "long":
        shape: tuple[int, ...] = (draw(st.integers(16_000, 40_000)),)
    elif kind == "matrix":
        shape = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    else:
        shape = tuple(draw(st.integers(0, 9)) for _ in range(draw(st.integers(0, 3))))
    choices = list(scales or [1e-3, 1.0, 30.0])
    if extreme and dtype in EXTREME:
        choices += EXTREME[dtype]
    scale = draw(st.sampled_from(choices))
    base = torch.complex128 if dtype.is_complex else torch.float64
    g = torch.randn(shape, generator=gen, dtype=base).mul_(scale).to(dtype)
    n = g.numel()
    if n and draw(st.integers(0, 9)) == 0:
        g.zero_()
    if n and nonfinite and draw(st.integers(0, 5)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            g.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    if g.ndim == 2 and draw(st.booleans()):
        g = g.t().contiguous().t()  # same values, transposed strides
    elif g.ndim == 1 and n >= 4 and draw(st.booleans()):
        g = torch.stack([g, g], dim=1)[:, 0]  # a strided 1-D view (stride 2)
    return g


@st.composite
def gradient_sets(draw, **kw):
    """Gradients of 0-6 parameters; about one parameter in six has no gradient."""
    k = draw(st.integers(0, 6))
    return [None if draw(st.integers(0, 5)) == 0 else draw(gradient(**kw)) for _ in range(k)]


norm_types = st.sampled_from(NORM_TYPES)
wide_norm_types = st.sampled_from(WIDE_NORM_TYPES)
# every dtype in one set: float32 with fp16/bf16, float64, complex; huge and tiny magnitudes
wide_sets = gradient_sets(dtypes=REAL + HALF + COMPLEX, extreme=True)
# the same without complex, for clip_grad_value_ (clamp is undefined for complex numbers)
wide_real_sets = gradient_sets(dtypes=REAL + HALF, extreme=True)


# ------------------------------------------------------------------------------------------
# differential tests against torch (regimes where the engine agrees with torch)


def torch_is_accurate(theirs: float, ref: float) -> bool:
    """Where torch is inaccurate (overflow, underflow, fp16 rounding, long float32 sums), only
    the float64 reference counts: 1e-3 is far above the engine's own tolerances, far below a
    spurious inf or 0."""
    return rel_err(theirs, ref) <= 1e-3


def assert_matches_torch(ours: torch.Tensor, theirs: torch.Tensor, tensors, p: float) -> None:
    """Ours within float rounding of the float64 reference, and of torch up to torch's own error."""
    ref = ref_total(tensors, p)
    rtol = rtol_for(tensors, p)
    assert_close_to_ref(ours.item(), ref, rtol, f"engine p={p}", ours.dtype)
    if not torch_is_accurate(theirs.item(), ref):
        return
    torch_err = rel_err(theirs.item(), ref)
    assert rel_err(ours.item(), theirs.item()) <= rtol + 1.01 * torch_err + 1e-7, (
        f"p={p}: engine {ours.item()!r} vs torch {theirs.item()!r} (reference {ref!r})"
    )


def reference_clip(g: torch.Tensor, max_norm: float, ref_norm: float) -> torch.Tensor:
    """``g * clamp(max_norm / (norm + 1e-6), max=1)`` in float64 arithmetic (a complex number
    is scaled as its two real parts: as a complex product, ``(inf+0j) * 1`` is ``inf+nanj``)."""
    coef = torch.clamp(max_norm / (torch.tensor(ref_norm, dtype=torch.float64) + 1e-6), max=1.0)
    g = dense(g)
    if g.is_complex():
        return torch.view_as_complex(torch.view_as_real(g.to(torch.complex128)) * coef)
    return g.to(torch.float64) * coef


def assert_clipped_like_reference(
    clipped, originals, max_norm: float, ref_norm: float, rtol: float, coef_dtype: torch.dtype
):
    """Each clipped gradient against the float64 clip of its original. Tolerance: the engine's
    coefficient is computed in ``coef_dtype`` (the total's) from a total within ``rtol`` of the
    reference (so it is off by ``rtol`` plus two roundings, and by the subnormal spacing
    relative to itself when it is subnormal there), and the product is rounded once to the
    gradient's dtype; below the dtype's smallest normal number only absolute precision is left."""
    cinfo = torch.finfo(coef_dtype)
    coef = min(max_norm / (ref_norm + 1e-6), 1.0) if not math.isnan(ref_norm) else NAN
    tol = rtol + 2 * cinfo.eps
    if 0 < coef < cinfo.tiny:
        tol += cinfo.tiny * cinfo.eps / coef
    for out, g in zip(clipped, originals):
        expected = reference_clip(g, max_norm, ref_norm)
        info = torch.finfo(g.dtype)
        tol_g = tol + info.eps
        got = dense(out).to(expected.dtype)
        if g.is_sparse:
            # unstored elements stay 0, also when a NaN coefficient makes a dense tensor all NaN
            stored = (
                torch.sparse_coo_tensor(
                    g._indices(),
                    torch.ones(g._indices().shape[1], *g.shape[g.sparse_dim() :]),
                    g.shape,
                    check_invariants=True,
                ).to_dense()
                > 0
            )
            assert (got[~stored] == 0).all()
            got, expected = got[stored], expected[stored]
        torch.testing.assert_close(got, expected, rtol=tol_g, atol=info.tiny, equal_nan=True)


@FAST
@given(grads=wide_sets, norm_type=wide_norm_types)
def test_get_total_norm_matches_torch(grads, norm_type):
    tensors = [g for g in grads if g is not None]
    p = float(norm_type)
    ours = get_total_norm(tensors, norm_type)
    assert ours.dtype == result_dtype(tensors)
    assert ours.shape == ()
    if not torch_accepts(tensors, p):
        assert_close_to_ref(ours.item(), ref_total(tensors, p), rtol_for(tensors, p), "", ours.dtype)
        return
    theirs = torch_get_total_norm(tensors, norm_type)
    if not any(t.dtype in HALF for t in tensors):
        assert ours.dtype == theirs.dtype  # torch returns fp16/bf16 norms (difference 2)
    assert_matches_torch(ours, theirs, tensors, p)


@FAST
@given(
    grads=wide_sets,
    norm_type=wide_norm_types,
    max_norm=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0, 1e4]),
)
def test_clip_grad_norm_matches_torch(grads, norm_type, max_norm):
    p = float(norm_type)
    tensors = [g for g in grads if g is not None]
    ours_params = make_params(grads)
    ours = clip_grad_norm_(ours_params, max_norm, norm_type)
    ref = ref_total(tensors, p)
    rtol = rtol_for(tensors, p)
    assert_close_to_ref(ours.item(), ref, rtol, f"engine p={p}", ours.dtype)
    # each gradient times the coefficient of that (validated) total, in float64
    assert_clipped_like_reference(grads_of(ours_params), tensors, max_norm, ours.item(), 0.0, ours.dtype)
    if not torch_accepts(tensors, p) or any(t.dtype in HALF for t in tensors):
        return  # torch raises, or clips by an fp16/bf16 norm (difference 2)
    torch_params = make_params(grads)
    theirs = torch_clip_grad_norm_(torch_params, max_norm, norm_type)
    if not torch_is_accurate(theirs.item(), ref):
        return  # torch clips by a wrong norm; the float64 reference above is the one that counts
    assert_matches_torch(ours, theirs, tensors, p)
    if any(t.is_complex() and not bool(torch.isfinite(t).all()) for t in tensors):
        return  # torch's complex product turns inf+0j into inf+nanj, even for a coefficient of 1
    for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-30, equal_nan=True)


@FAST
@given(grads=wide_real_sets, clip_value=st.sampled_from([0.0, 1e-2, 0.7, 5.0, INF, -0.5]))
def test_clip_grad_value_matches_torch(grads, clip_value):
    ours_params = make_params(grads)
    assume(grads_of(ours_params))  # torch raises without gradients (tested separately)
    torch_params = make_params(grads)
    torch_clip_grad_value_(torch_params, clip_value)
    clip_grad_value_(ours_params, clip_value)
    for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_clip_grad_value_rejects_complex_like_torch():
    g = torch.tensor([1 + 2j, -3j], dtype=torch.complex64)
    for clip in (clip_grad_value_, torch_clip_grad_value_):
        with pytest.raises(NotImplementedError, match="complex"):
            clip(make_params([g]), 1.0)


@FAST
@given(grads=wide_sets, norm_type=wide_norm_types)
def test_measure_grad_norms_matches_torch_per_tensor(grads, norm_type):
    p = float(norm_type)
    params = make_params(grads)
    tensors = grads_of(params)
    before = [t.clone() for t in tensors]
    result = measure_grad_norms(params, norm_type)
    # never touches the gradients
    for a, b in zip(tensors, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert result.names is None
    assert result.norms.shape == (len(tensors),)
    assert result.norms.dtype == result.total_norm.dtype == result_dtype(tensors)
    for t, n in zip(tensors, result.norms.tolist()):
        rtol = tensor_rtol(t, p)
        ref = ref_tensor_norm(t, p)
        assert_close_to_ref(n, ref, rtol, f"per-tensor p={p}", result.norms.dtype)
        if torch_accepts([t], p) and t.dtype not in HALF:
            theirs = torch.linalg.vector_norm(t, p).item()
            if torch_is_accurate(theirs, ref):
                assert rel_err(n, theirs) <= rtol + 1.01 * rel_err(theirs, ref) + 1e-7
    # the same total as get_total_norm, up to float rounding
    total = get_total_norm(tensors, norm_type)
    assert result.total_norm.dtype == total.dtype
    assert rel_err(result.total_norm.item(), total.item()) <= rtol_for(tensors, p)
    assert_close_to_ref(result.total_norm.item(), ref_total(tensors, p), rtol_for(tensors, p), "", total.dtype)
    if torch_accepts(tensors, p):
        theirs_total = torch_get_total_norm(tensors, norm_type)
        assert_matches_torch(result.total_norm, theirs_total, tensors, p)


# ------------------------------------------------------------------------------------------
# properties


@FAST
@given(
    grads=gradient_sets(nonfinite=False),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, INF]),
    max_norm=st.sampled_from([1e-3, 0.3, 1.0, 10.0]),
)
def test_clipping_bounds_the_norm_and_is_stable(grads, norm_type, max_norm):
    params = make_params(grads)
    before = clip_grad_norm_(params, max_norm, norm_type)
    after = get_total_norm(grads_of(params), norm_type)
    tol = 1e-5
    assert after.item() <= max_norm * (1 + tol)
    # after clipping the norm is max_norm * T / (T + 1e-6): a second clip scales once more by
    # about 1 - 1e-6 / max_norm (torch's formula), nothing more
    tol += 2e-6 / max_norm
    if before.item() <= max_norm:
        assert rel_err(after.item(), before.item()) <= 1e-6
    snapshot = [g.clone() for g in grads_of(params)]
    again = clip_grad_norm_(params, max_norm, norm_type)
    assert rel_err(again.item(), after.item()) <= 1e-6
    for a, b in zip(grads_of(params), snapshot):
        torch.testing.assert_close(a, b, rtol=tol, atol=0)


def test_clip_grads_with_norm_equals_clip_grad_norm():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(30, 20, generator=gen), torch.randn(20_000, generator=gen)]
    a = make_params([g.clone() for g in grads])
    b = make_params([g.clone() for g in grads])
    total = clip_grad_norm_(a, 1.0)
    assert torch.equal(total, get_total_norm(grads))
    clip_grads_with_norm_(b, 1.0, total)
    for x, y in zip(grads_of(a), grads_of(b)):
        assert torch.equal(x, y)
    expected = grads[0] * torch.clamp(1.0 / (total + 1e-6), max=1.0)
    torch.testing.assert_close(grads_of(a)[0], expected, rtol=0, atol=0)


def test_clip_coefficient_formula_and_no_amplification():
    g = torch.tensor([3.0, 4.0])
    (p,) = make_params([g.clone()])
    assert clip_grad_norm_([p], 1.0).item() == 5.0
    coef = torch.tensor(1.0) / (torch.tensor(5.0) + 1e-6)
    assert torch.equal(p.grad, g * coef)
    (q,) = make_params([g.clone()])
    clip_grad_norm_(q, 100.0)  # a single tensor is accepted; coef clamped to 1
    assert torch.equal(q.grad, g)
    (r,) = make_params([g.clone()])
    clip_grad_norm_([r], 0.0)
    assert torch.equal(r.grad, torch.zeros(2))


# ------------------------------------------------------------------------------------------
# torch behaviours kept


def test_empty_inputs():
    assert torch.equal(get_total_norm([]), torch.tensor(0.0))
    assert torch.equal(get_total_norm([], "inf"), torch.tensor(0.0))
    params = make_params([None, None])
    assert torch.equal(clip_grad_norm_(params, 1.0), torch.tensor(0.0))
    assert clip_grads_with_norm_(params, 1.0, torch.tensor(3.0)) is None
    result = measure_grad_norms(params)
    assert result.total_norm.item() == 0.0 and result.norms.shape == (0,)
    assert result.first_non_finite() is None


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator") as record:
        total = clip_grad_norm_((p for p in []), 1.0)
    assert total.item() == 0.0
    assert record[0].filename == __file__  # attributed to the caller, as torch does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_grad_norm_([], 1.0)  # an empty list is not a generator: no warning


def test_generator_of_parameters_is_consumed_once():
    params = make_params([torch.tensor([3.0, 4.0]), None, torch.tensor([12.0])])
    total = clip_grad_norm_((p for p in params), 1.0)
    assert total.item() == 13.0
    torch.testing.assert_close(get_total_norm(grads_of(params)), torch.tensor(1.0), rtol=1e-6, atol=0)


def test_parameters_without_grad_are_skipped():
    params = make_params([torch.tensor([3.0]), None, torch.tensor([4.0])])
    assert clip_grad_norm_(params, 10.0).item() == 5.0
    result = measure_grad_norms(params)
    assert result.norms.tolist() == [3.0, 4.0]


def test_string_inf_norm_type():
    g = [torch.tensor([1.0, -7.0]), torch.tensor([5.0])]
    assert get_total_norm(g, "inf").item() == 7.0
    assert get_total_norm(g, INF).item() == 7.0
    assert get_total_norm(g, -INF).item() == 1.0


def test_p0_counts_tensors_with_a_nonzero_gradient_like_torch():
    g = [torch.tensor([1.0, 0.0, 2.0]), torch.zeros(4), torch.tensor([NAN])]
    assert get_total_norm(g, 0).item() == torch_get_total_norm(g, 0).item() == 2.0
    assert measure_grad_norms(make_params(g), 0).norms.tolist() == [2.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_error_if_nonfinite(bad):
    g = torch.tensor([1.0, bad, 2.0])
    (p,) = make_params([g.clone()])
    with pytest.raises(RuntimeError, match="error_if_nonfinite=False") as ours:
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert torch.equal(p.grad, g) or (bad != bad and torch.isnan(p.grad).sum() == 1)
    with pytest.raises(RuntimeError) as theirs:
        torch_clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="non-finite"):
        get_total_norm([g], error_if_nonfinite=True)


def test_error_if_nonfinite_accepts_a_finite_total():
    g = torch.tensor([3.0, -4.0])
    assert get_total_norm([g], error_if_nonfinite=True).item() == 5.0
    (p,) = make_params([g])
    assert clip_grad_norm_([p], 1.0, error_if_nonfinite=True).item() == 5.0
    assert torch.equal(p.grad, g * (torch.tensor(1.0) / (torch.tensor(5.0) + 1e-6)))


def test_nonfinite_propagates_when_not_checked():
    (p,) = make_params([torch.tensor([1.0, NAN, 2.0])])
    assert math.isnan(clip_grad_norm_([p], 1.0).item())
    assert torch.isnan(p.grad).all()  # as in torch: the NaN coefficient spreads
    (q,) = make_params([torch.tensor([1.0, INF, 2.0])])
    assert clip_grad_norm_([q], 1.0).item() == INF
    expected = torch.tensor([1.0, INF, 2.0]) * 0.0
    torch.testing.assert_close(q.grad, expected, equal_nan=True)


def test_foreach_true_on_unsupported_device_raises_like_torch():
    g = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError) as theirs:
        torch_get_total_norm([g], foreach=True)
    with pytest.raises(RuntimeError) as ours:
        get_total_norm([g], foreach=True)
    assert str(ours.value) == str(theirs.value)
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    for call in (
        lambda: clip_grad_norm_([p], 1.0, foreach=True),
        lambda: clip_grads_with_norm_([p], 1.0, torch.tensor(1.0), foreach=True),
        lambda: clip_grad_value_([p], 1.0, foreach=True),
    ):
        with pytest.raises(RuntimeError, match="can't use the foreach API on meta tensors"):
            call()


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_flag_gives_torchs_result_on_cpu(foreach):
    gen = torch.Generator().manual_seed(6)
    g = [
        torch.arange(5.0),
        torch.ones(3, 3),
        torch.randn(20_000, generator=gen),
        torch.randn(7, dtype=torch.float64, generator=gen),
    ]
    for p in (2.0, 1.0, INF, 0.5):
        ref = ref_total(g, p)
        expected = torch_get_total_norm(g, p, foreach=foreach)
        ours = get_total_norm(g, p, foreach=foreach)
        assert ours.dtype == expected.dtype == torch.float64
        assert_close_to_ref(ours.item(), ref, rtol_for(g, p))
        # torch's float32 sums are off by about 1e-7 here: ours may differ from torch by that
        tol = rtol_for(g, p) + 1.01 * rel_err(expected.item(), ref)
        assert rel_err(ours.item(), expected.item()) <= tol
        for max_norm in (1.0, 1e12):  # clipped, and left alone
            ours_params = make_params(g)
            torch_params = make_params(g)
            ours_total = clip_grad_norm_(ours_params, max_norm, p, foreach=foreach)
            torch_total = torch_clip_grad_norm_(torch_params, max_norm, p, foreach=foreach)
            assert rel_err(ours_total.item(), torch_total.item()) <= tol
            for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
                torch.testing.assert_close(a, b, rtol=tol + 2 * torch.finfo(torch.float32).eps, atol=0)
            if max_norm == 1e12:
                assert all(torch.equal(a, b) for a, b in zip(grads_of(ours_params), g))
    for clip_value in (0.1, 2.0):
        ours_params = make_params(g)
        torch_params = make_params(g)
        clip_grad_value_(ours_params, clip_value, foreach=foreach)
        torch_clip_grad_value_(torch_params, clip_value, foreach=foreach)
        for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
            assert torch.equal(a, b)


def test_mixed_dtypes_promote_like_torch():
    g = [torch.ones(3, dtype=torch.float32), torch.ones(2, dtype=torch.float64)]
    assert get_total_norm(g).dtype == torch_get_total_norm(g).dtype == torch.float64
    assert get_total_norm(g).item() == pytest.approx(math.sqrt(5), rel=1e-15)
    h = [torch.ones(3, dtype=torch.float16), torch.ones(2, dtype=torch.float32)]
    assert get_total_norm(h).dtype == torch.float32


def test_non_contiguous_gradients():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(300, 200, generator=gen)
    cases = [
        base.t(),  # dense, permuted
        base[:, ::3],  # strided, not dense (> one row of the chunked reduction)
        base[::2, :7],  # short and strided
        torch.randn(40, 50, 60, generator=gen).permute(2, 0, 1),
        base.t()[5],  # 1-D, stride 200
    ]
    for p in [1.0, 2.0, 3.0, INF, 0.5]:
        ref = ref_total(cases, p)
        assert_close_to_ref(get_total_norm(cases, p).item(), ref, f32_rtol(p), f"p={p}")
        per = measure_grad_norms(make_params([c.clone() for c in cases]), p).norms
        for c, n in zip(cases, per.tolist()):
            assert_close_to_ref(n, ref_tensor_norm(c, p), f32_rtol(p))
    params = make_params(cases)
    clip_grad_norm_(params, 1.0)
    assert get_total_norm(grads_of(params)).item() <= 1.0 + 1e-5
    assert not grads_of(params)[1].is_contiguous()


def test_many_short_tensors_and_long_tails():
    # more short tensors than fit one concatenation batch, plus long tensors with remainders
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(15_000, generator=gen) for _ in range(300)]
    grads += [torch.randn(100_003, generator=gen), torch.randn(7, 3, generator=gen)]
    for p in [1.0, 2.0, INF]:
        assert_close_to_ref(get_total_norm(grads, p).item(), ref_total(grads, p), 2e-6)
        assert_close_to_ref(torch_get_total_norm(grads, p).item(), get_total_norm(grads, p).item(), 1e-5)


# ------------------------------------------------------------------------------------------
# measure_grad_norms


def test_measure_grad_norms_names_and_first_non_finite():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    model[0].bias.grad = None
    model[2].weight.grad[1, 1] = NAN
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    result = measure_grad_norms(model.named_parameters())
    assert isinstance(result, GradNorms)
    assert result.names == ("0.weight", "2.weight", "2.bias")
    assert result.first_non_finite() == "2.weight"
    assert math.isnan(result.total_norm.item())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, before[n]) or n == "2.weight"
    assert torch.isnan(model[2].weight.grad).sum() == 1
    plain = measure_grad_norms(list(model.parameters()))
    assert plain.names is None and plain.first_non_finite() == 1
    ok = measure_grad_norms([model[2].bias])
    assert ok.first_non_finite() is None
    assert ok.norms.tolist() == [ok.total_norm.item()]
    with pytest.raises(AttributeError):
        result.total_norm = torch.tensor(0.0)  # frozen


def test_measure_grad_norms_single_tensor_and_inf_element():
    (p,) = make_params([torch.tensor([1.0, -INF])])
    result = measure_grad_norms(p)
    assert result.total_norm.item() == INF
    assert result.first_non_finite() == 0


# ------------------------------------------------------------------------------------------
# difference 1: no spurious overflow or underflow


def test_no_overflow_for_large_finite_gradients():
    g = torch.full((10,), 1e20)
    expected = math.sqrt(10) * 1e20
    assert torch_get_total_norm([g]).item() == INF  # torch overflows
    assert_close_to_ref(get_total_norm([g]).item(), expected, 1e-7)
    (p,) = make_params([g.clone()])
    clip_grad_norm_([p], 1.0)
    assert (p.grad > 0).all()  # torch would zero every gradient here
    assert_close_to_ref(get_total_norm([p.grad]).item(), 1.0, 1e-6)
    # the same across tensors and for float64 beyond the float64 square range
    many = [torch.full((3,), 3e19) for _ in range(50)]
    assert_close_to_ref(get_total_norm(many).item(), math.sqrt(150) * 3e19, 1e-6)
    big64 = torch.full((4,), 1e200, dtype=torch.float64)
    assert torch_get_total_norm([big64]).item() == INF
    assert_close_to_ref(get_total_norm([big64]).item(), 2e200, 1e-14)
    assert measure_grad_norms(make_params([g.clone()])).norms.isfinite().all()


def test_no_underflow_for_tiny_nonzero_gradients():
    g = torch.full((10,), 1e-30)
    assert torch_get_total_norm([g]).item() == 0.0  # torch underflows
    assert_close_to_ref(get_total_norm([g]).item(), math.sqrt(10) * 1e-30, 1e-6)
    assert_close_to_ref(get_total_norm([g], 3).item(), 10 ** (1 / 3) * 1e-30, 1e-6)
    long = torch.full((50_000,), 1e-22)  # squares are subnormal in float32
    assert_close_to_ref(get_total_norm([long]).item(), math.sqrt(50_000) * 1e-22, 1e-6)
    (p,) = make_params([g.clone()])
    assert_close_to_ref(measure_grad_norms([p]).norms.item(), math.sqrt(10) * 1e-30, 1e-6)
    # p < 1: a row's partial norm s**(1/p) can be subnormal although s is not
    sub = torch.full((20_000,), 1e-44)  # subnormal float32 elements
    expected = ref_tensor_norm(sub, 0.5)
    assert torch.finfo(torch.float32).tiny < expected < 1e-30
    assert_close_to_ref(get_total_norm([sub], 0.5).item(), expected, 1e-6)
    assert_close_to_ref(measure_grad_norms(make_params([sub]), 0.5).norms.item(), expected, 1e-6)
    # a norm below float32's range is still 0, and a true inf stays inf
    assert get_total_norm([torch.full((4,), 1e-45)]).item() == pytest.approx(2.8e-45, rel=0.5)
    assert get_total_norm([torch.tensor([3e38, 3e38])]).item() == INF


@settings(max_examples=examples(80), deadline=None)
@given(
    exponent=st.integers(-44, 37),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, INF, -1.0, -INF]),
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.sampled_from([1, 5, 300, 20_000]), min_size=1, max_size=4),
)
def test_extreme_scales_against_float64_reference(exponent, dtype, norm_type, seed, sizes):
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (exponent * (8 if dtype == torch.float64 else 1))
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype) for n in sizes]
    ref = ref_total(grads, norm_type)
    got = get_total_norm(grads, norm_type).item()
    info = torch.finfo(dtype)
    if ref > info.max:
        assert got == INF
    elif abs(ref) < info.tiny:  # subnormal result: absolute precision only
        assert abs(got - ref) <= info.tiny * info.eps * 4
    else:
        assert_close_to_ref(got, ref, f32_rtol(norm_type) if dtype == torch.float32 else 1e-12)
    per = measure_grad_norms(make_params(grads), norm_type).norms.tolist()
    for g, n in zip(grads, per):
        r = ref_tensor_norm(g, norm_type)
        if info.tiny <= r <= info.max:
            assert_close_to_ref(n, r, f32_rtol(norm_type) if dtype == torch.float32 else 1e-12)


# ------------------------------------------------------------------------------------------
# difference 2: half precision accumulated and returned in float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norm_is_float32(dtype):
    g = torch.full((10_000,), 1000.0, dtype=dtype)  # norm 1e5 > 65504
    if dtype == torch.float16:
        assert torch_get_total_norm([g]).item() == INF
    ours = get_total_norm([g])
    assert ours.dtype == torch.float32
    assert_close_to_ref(ours.item(), 1e5, 1e-6)
    (p,) = make_params([g.clone()])
    clip_grad_norm_([p], 1.0)
    assert (p.grad > 0).all()  # torch zeroes fp16 gradients here
    assert get_total_norm([p.grad]).item() <= 1.0 * (1 + 1e-2)
    per = measure_grad_norms([p]).norms
    assert per.dtype == torch.float32


@settings(max_examples=examples(40), deadline=None)
@given(
    grads=gradient_sets(dtypes=(torch.float16, torch.bfloat16), scales=[1e-3, 1.0, 300.0]),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, INF, -INF, 0.0]),
)
def test_half_precision_against_float64_reference(grads, norm_type):
    tensors = [g for g in grads if g is not None]
    ours = get_total_norm(tensors, norm_type)
    assert ours.dtype == torch.float32
    assert_close_to_ref(ours.item(), ref_total(tensors, norm_type), half_rtol(norm_type))


def half_rtol(p: float) -> float:
    """The proven bound for half-precision sets. Short fp16/bf16 tensors are joined into one
    buffer and reduced in float32 rows of 1024 elements, so a row can hold values of 300 and of
    1e-3 together; float32 recursive summation of n non-negative terms is then off by at most
    (n - 1) * 2**-24 of the row's sum (about 6.1e-5), and the p-th root divides that by p.
    Random data stays near 2e-6 (``f32_rtol``), but hypothesis finds the mixed rows."""
    bound = 1023 * 2.0**-24
    return bound * max(1.0, 1.0 / abs(p)) if p != 0 and math.isfinite(p) else bound


# ------------------------------------------------------------------------------------------
# difference 3: accuracy on very long tensors


@pytest.mark.slow  # a 400 MB float32 tensor
def test_accuracy_on_1e8_element_tensor():
    n = 10**8
    g = torch.rand(n, generator=torch.Generator().manual_seed(4))
    try:
        ref = math.sqrt(math.fsum(torch.dot(c, c).item() for c in g.split(1 << 20) for c in [c.double()]))
        ours = get_total_norm([g]).item()
        assert rel_err(ours, ref) <= 1e-6
        # the per-tensor norm comes from the same row reductions (no copies: a broadcast
        # parameter holding g itself as its gradient)
        prm = torch.nn.Parameter(torch.zeros(1).expand(n))
        prm.grad = g
        assert rel_err(measure_grad_norms(prm).norms.item(), ref) <= 1e-6
        del prm
        ref_inf = g.max().item()
        assert get_total_norm(g, INF).item() == ref_inf
        # constant data, the worst case of float32 accumulation (every partial sum grows
        # alike); the exact answer is sqrt(n) * c, with c = float32(0.3)
        g.fill_(0.3)
        exact = math.sqrt(n) * g[0].item()
        assert rel_err(get_total_norm([g]).item(), exact) <= 1e-6
        assert rel_err(get_total_norm([g], 1.0).item(), n * g[0].item()) <= 1e-6
    finally:
        del g
        gc.collect()


# ------------------------------------------------------------------------------------------
# difference 4: max_norm validated; max_norm = inf never modifies gradients


@pytest.mark.parametrize("max_norm", [-1.0, -1e-9, NAN])
def test_invalid_max_norm_raises(max_norm):
    g = torch.tensor([3.0, 4.0])
    (p,) = make_params([g.clone()])
    message = (
        f"^max_norm must be a non-negative number, got {max_norm}: a negative max_norm would flip "
        r"the sign of every gradient \(use max_norm=0 to zero them\)$"
    )
    with pytest.raises(ValueError, match=message):
        clip_grad_norm_([p], max_norm)
    with pytest.raises(ValueError, match=message):
        clip_grads_with_norm_([p], max_norm, torch.tensor(5.0))
    assert torch.equal(p.grad, g)
    if max_norm < 0:
        (q,) = make_params([g.clone()])
        torch_clip_grad_norm_([q], max_norm)
        assert (q.grad < 0).all()  # torch flips the sign


def test_infinite_max_norm_never_modifies_gradients():
    g = torch.tensor([1.0, INF, -2.0])
    (p,) = make_params([g.clone()])
    assert clip_grad_norm_([p], INF).item() == INF
    assert torch.equal(p.grad, g)
    clip_grads_with_norm_([p], INF, torch.tensor(INF))
    assert torch.equal(p.grad, g)
    (q,) = make_params([g.clone()])
    torch_clip_grad_norm_([q], INF)
    assert torch.isnan(q.grad).all()  # torch: inf / inf


# ------------------------------------------------------------------------------------------
# difference 5: degenerate inputs


def test_clip_grad_value_without_gradients_is_a_noop():
    params = make_params([None, None])
    with pytest.raises(RuntimeError):
        torch_clip_grad_value_(params, 1.0)
    assert clip_grad_value_(params, 1.0) is None
    assert clip_grad_value_([], 1.0) is None


@pytest.mark.parametrize("norm_type", [INF, -INF, -1.0, "inf"])
def test_zero_element_gradient_is_accepted(norm_type):
    empty = torch.empty(0, 3)
    with pytest.raises(RuntimeError):
        torch_get_total_norm([empty], norm_type)
    assert get_total_norm([empty], norm_type).item() == 0.0
    other = torch.tensor([2.0, -4.0])
    expected = ref_total([other], float(norm_type))
    assert get_total_norm([empty, other], norm_type).item() == pytest.approx(expected)
    params = make_params([empty.clone(), other.clone()])
    assert clip_grad_norm_(params, 1.0, norm_type).item() == pytest.approx(expected)
    assert measure_grad_norms(params, norm_type).norms[0].item() == 0.0


# ------------------------------------------------------------------------------------------
# sparse COO gradients (nn.Embedding(sparse=True)): measured and clipped as their dense
# equivalent g.to_dense(), with duplicate entries summed first; torch cannot measure them


@st.composite
def sparse_gradient(draw, dtypes=REAL + HALF, extreme=True):
    """A sparse COO gradient: rows of a matrix (one sparse and one dense dimension, as an
    embedding's gradient) or every dimension sparse; indices drawn with repetition, so duplicate
    entries are common; sometimes coalesced, sometimes without entries, sometimes with every
    element stored (no unstored zeros); any scale, sometimes NaN/inf."""
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rows, cols = draw(st.integers(0, 12)), draw(st.integers(1, 5))
    hybrid = draw(st.booleans())
    full = rows > 0 and draw(st.integers(0, 3)) == 0
    extra = draw(st.integers(0, 20)) if rows else 0
    if hybrid:
        idx = torch.randint(0, max(rows, 1), (1, extra), generator=gen)
        if full:
            idx = torch.cat([torch.arange(rows).view(1, -1), idx], dim=1)
        value_shape: tuple[int, ...] = (idx.shape[1], cols)
    else:
        idx = torch.stack(
            [torch.randint(0, max(rows, 1), (extra,), generator=gen), torch.randint(0, cols, (extra,), generator=gen)]
        )
        if full:
            every = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).t()
            idx = torch.cat([every, idx], dim=1)
        value_shape = (idx.shape[1],)
    scales = [1e-3, 1.0, 30.0] + (EXTREME[dtype] if extreme else [])
    values = torch.randn(value_shape, generator=gen, dtype=torch.float64)
    values = values.mul_(draw(st.sampled_from(scales))).to(dtype)
    if dtype == torch.float64:
        # float64 duplicates are summed by torch's float64 coalesce, in its order, and the
        # reference's order differs; cancelling terms would make that last-bit difference large
        # relative to the sum (a property of float64, not of the engine). Lower precisions are
        # summed exactly in float64 on both sides and may cancel freely.
        values = values.abs_()
    n = values.numel()
    if n and draw(st.integers(0, 5)) == 0:
        values.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    g = torch.sparse_coo_tensor(idx, values, (rows, cols), check_invariants=True)
    return g.coalesce() if draw(st.booleans()) else g


@st.composite
def mixed_sparse_sets(draw, extreme=True):
    """1-5 gradients, sparse and dense mixed (dense ones of every real dtype and size)."""
    k = draw(st.integers(1, 5))
    out = []
    for _ in range(k):
        kind = draw(st.sampled_from(["sparse", "sparse", "dense", "none"]))
        if kind == "sparse":
            out.append(draw(sparse_gradient(extreme=extreme)))
        elif kind == "dense":
            out.append(draw(gradient(dtypes=REAL + HALF, extreme=extreme)))
        else:
            out.append(None)
    return out


# On the device path a sparse gradient's stored values are reduced by torch's float32 kernel
# (float64 for float64): at most 61 nonzero terms here; two summation orders of them differ by
# at most 2 * 61 * 2**-24 relative in the sum of p-th powers, which the p-th root scales by
# 1/|p|: below 1.5e-5 for every |p| >= 0.5 used here, and far below it in practice.
SPARSE_DEVICE_RTOL = 1.5e-5


def sparse_set_paths():
    return pytest.mark.parametrize(
        "path, foreach",
        [("cpu", None), ("cpu", True), ("cpu", False), ("device", None), ("device", True), ("device", False)],
    )


@contextlib.contextmanager
def engine_path(path: str):
    if path == "device":
        with device_path():
            yield
    else:
        yield


@sparse_set_paths()
@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), norm_type=wide_norm_types)
def test_sparse_norms_match_the_dense_reference(path, foreach, data, norm_type):
    p = float(norm_type)
    grads = data.draw(mixed_sparse_sets(extreme=path == "cpu"))
    params = make_params(grads)
    tensors = grads_of(params)
    before = [(t.is_coalesced(), t._indices().clone(), t._values().clone()) if t.is_sparse else None for t in tensors]
    with engine_path(path):
        total = get_total_norm(tensors, norm_type, foreach=foreach)
        measured = measure_grad_norms(params, norm_type)
    # measuring changes nothing, not even the representation (uncoalesced stays uncoalesced)
    for t, b in zip(tensors, before):
        if b is not None:
            assert t.is_coalesced() == b[0]
            assert torch.equal(t._indices(), b[1])
            torch.testing.assert_close(t._values(), b[2], rtol=0, atol=0, equal_nan=True)
    assert total.dtype == measured.total_norm.dtype == result_dtype(tensors)
    per = measured.norms.tolist()
    for t, n in zip(tensors, per):
        ref = ref_tensor_norm(t, p)  # of t.to_dense(), in float64
        if path == "cpu":
            assert_close_to_ref(n, ref, tensor_rtol(t, p), f"per-tensor p={p}", total.dtype)
        elif t.is_sparse:
            # torch's kernels on the dense equivalent or on its stored values (in float32 for
            # fp16/bf16, whose summed duplicates the engine keeps in float32): the same nonzero
            # terms in another order (torch's kernels treat one element specially, so both)
            op_dtype = torch.float32 if t.dtype in HALF else t.dtype
            wide = t.to(torch.float64)
            candidates = torch_kernel_norms(wide.to_dense().to(op_dtype), p)
            candidates += torch_kernel_norms(wide.coalesce().values().to(op_dtype), p)
            assert min(rel_err(n, c) for c in candidates) <= SPARSE_DEVICE_RTOL, (n, candidates)
        else:
            assert min(rel_err(n, c) for c in torch_kernel_norms(t, p)) <= DEVICE_PER_TENSOR_RTOL
        if torch_accepts([dense(t)], p) and t.dtype not in HALF and t.is_sparse:
            theirs = torch.linalg.vector_norm(dense(t), p).item()  # torch on the dense copy
            if torch_is_accurate(theirs, ref):
                assert rel_err(n, theirs) <= max(SPARSE_DEVICE_RTOL, tensor_rtol(t, p)) + 1.01 * rel_err(theirs, ref)
    if path == "cpu":
        ref = ref_total(tensors, p)  # of the dense equivalents, in float64
        rtol = rtol_for(tensors, p)
        assert_close_to_ref(total.item(), ref, rtol, f"total p={p}", total.dtype)
        assert_close_to_ref(measured.total_norm.item(), ref, rtol, f"total p={p}", total.dtype)
    else:
        combined = ref_combine([n for t, n in zip(tensors, per) if t.numel() > 0], p)
        dt = total.dtype  # a combination beyond its range comes out inf
        assert_close_to_ref(measured.total_norm.item(), combined, DEVICE_TOTAL_RTOL, "total", dt)
        assert_close_to_ref(total.item(), combined, DEVICE_TOTAL_RTOL + DEVICE_PER_TENSOR_RTOL, "total", dt)


@sparse_set_paths()
@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), norm_type=wide_norm_types, max_norm=st.sampled_from([0.0, 1e-3, 0.5, 7.0, 1e4]))
def test_sparse_clip_grad_norm_matches_torch_on_dense_copies(path, foreach, data, norm_type, max_norm):
    p = float(norm_type)
    grads = data.draw(mixed_sparse_sets(extreme=path == "cpu"))
    params = make_params(grads)
    tensors = [g for g in grads if g is not None]
    objects = [prm.grad for prm in params]
    with engine_path(path):
        ours = clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)
        again = make_params(grads)  # clip_grads_with_norm_ with that total does the same
        clip_grads_with_norm_(again, max_norm, ours, foreach=foreach)
    # in place: the very tensors the optimizer holds, still sparse
    assert all(prm.grad is obj for prm, obj in zip(params, objects))
    assert [t.is_sparse for t in grads_of(params)] == [t.is_sparse for t in tensors]
    for a, b in zip(grads_of(params), grads_of(again)):
        torch.testing.assert_close(dense(a), dense(b), rtol=0, atol=0, equal_nan=True)
    # float64 reference: the dense copies' norm, and each dense copy times its coefficient
    ref = ref_total(tensors, p)  # of the dense equivalents, in float64
    if path == "cpu":
        assert_close_to_ref(ours.item(), ref, rtol_for(tensors, p), f"p={p}", ours.dtype)
    assert_clipped_like_reference(grads_of(params), tensors, max_norm, ours.item(), 0.0, ours.dtype)
    # torch itself, on the dense copies
    dense_set = [dense(t) for t in tensors]
    if not torch_accepts(dense_set, p) or any(t.dtype in HALF for t in dense_set):
        return  # torch raises, or clips by an fp16/bf16 norm (difference 2)
    torch_params = make_params(dense_set)
    theirs = torch_clip_grad_norm_(torch_params, max_norm, norm_type, foreach=foreach)
    if not torch_is_accurate(theirs.item(), ref):
        return  # torch is off (overflow, underflow): the float64 reference above counts
    torch_err = rel_err(theirs.item(), ref)
    tol = max(SPARSE_DEVICE_RTOL, rtol_for(tensors, p)) + 1.01 * torch_err
    assert rel_err(ours.item(), theirs.item()) <= tol + 1e-7
    if math.isnan(ref):
        return  # torch's NaN coefficient also fills the unstored zeros (compared above)
    for a, b in zip(grads_of(params), grads_of(torch_params)):
        torch.testing.assert_close(dense(a), b, rtol=tol + 2e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("path", ["cpu", "device"])
@settings(max_examples=examples(40), deadline=None)
@given(
    grads=mixed_sparse_sets(),
    clip_value=st.sampled_from([0.0, 1e-2, 0.7, 5.0, INF]),
    foreach=st.sampled_from([None, True, False]),
)
def test_sparse_clip_grad_value_matches_torch_on_dense_copies(path, grads, clip_value, foreach):
    params = make_params(grads)
    assume(grads_of(params))
    objects = grads_of(params)
    torch_params = make_params([dense(g) if g is not None else None for g in grads])
    torch_clip_grad_value_(torch_params, clip_value, foreach=foreach)
    with engine_path(path):
        clip_grad_value_(params, clip_value, foreach=foreach)
    assert all(a is b for a, b in zip(grads_of(params), objects))  # in place
    for a, b in zip(grads_of(params), grads_of(torch_params)):
        # float32 and half sums of duplicates are exact in float64 and rounded once, on both
        # sides; float64 sums may differ in the last bit (another summation order)
        rtol = 1e-12 if a.dtype == torch.float64 else 0.0
        if a.is_sparse:
            assert a.is_coalesced()  # duplicates were summed before clamping
        torch.testing.assert_close(dense(a), b, rtol=rtol, atol=0, equal_nan=True)


def embedding_grad() -> torch.Tensor:
    """A real embedding gradient: token 1 twice, token 3 once (uncoalesced, 3 entries)."""
    emb = torch.nn.Embedding(5, 2, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(10.0).view(5, 2))
    (emb(torch.tensor([1, 3, 1])) * torch.tensor([[1.0, -2.0]])).sum().backward()
    return emb.weight.grad


def test_sparse_embedding_gradient_norms_and_clipping():
    g = embedding_grad()
    assert not g.is_coalesced() and g._nnz() == 3
    with pytest.raises(NotImplementedError):
        torch_get_total_norm([g])  # torch cannot measure it
    d = g.to_dense()  # rows 1: [2, -4], 3: [1, -2]
    for p in [2.0, 1.0, INF, 0.0, 0.5, -1.0, -INF]:
        expected = ref_total([d], p)
        assert get_total_norm([g], p).item() == pytest.approx(expected, rel=1e-6, abs=0)
        per = measure_grad_norms(make_params([g]), p).norms.item()
        assert per == pytest.approx(ref_tensor_norm(d, p), rel=1e-6, abs=0)
    assert get_total_norm([g], 1.0).item() == 9.0  # duplicates summed: |2|+|-4|+|1|+|-2|
    assert get_total_norm([g], INF).item() == 4.0  # not 2: the two entries of row 1 add up
    assert get_total_norm([g], -1.0).item() == 0.0  # unstored zeros decide a negative p
    emb_param = torch.nn.Parameter(torch.zeros(5, 2))
    emb_param.grad = g
    total = clip_grad_norm_([emb_param], 1.0)
    assert total.item() == pytest.approx(5.0, rel=1e-7)
    assert emb_param.grad is g and g.is_sparse
    torch.testing.assert_close(g.to_dense(), d / (5.0 + 1e-6), rtol=1e-6, atol=0)


def test_sparse_duplicates_that_cancel_or_overflow():
    cancel = torch.sparse_coo_tensor([[2, 2]], [3.0, -3.0], (4,), check_invariants=True)
    assert get_total_norm([cancel]).item() == 0.0  # not 3 * sqrt(2)
    assert get_total_norm([cancel], 0).item() == 0.0  # no nonzero element
    # each entry finite, their sum inf
    big = torch.sparse_coo_tensor([[0, 0]], [3e38, 3e38], (2,), check_invariants=True)
    assert get_total_norm([big]).item() == INF
    assert measure_grad_norms(make_params([big])).first_non_finite() == 0
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(make_params([big]), 1.0, error_if_nonfinite=True)


def test_sparse_negative_p_with_and_without_unstored_zeros():
    full = torch.sparse_coo_tensor([[0, 1, 1]], [4.0, 1.0, 1.0], (2,), check_invariants=True)  # dense [4, 2]
    assert get_total_norm([full], -1.0).item() == pytest.approx(1 / (1 / 4 + 1 / 2))
    assert get_total_norm([full], -INF).item() == 2.0
    partial = torch.sparse_coo_tensor([[0]], [4.0], (2,), check_invariants=True)  # dense [4, 0]
    assert get_total_norm([partial], -1.0).item() == 0.0
    assert get_total_norm([partial], -INF).item() == 0.0
    no_index = torch.zeros(1, 0, dtype=torch.long)
    nothing_stored = torch.sparse_coo_tensor(no_index, [], (3,), check_invariants=True)
    other = torch.tensor([5.0])
    # a tensor of three zeros takes part: it makes the -inf and negative-p totals 0
    assert get_total_norm([nothing_stored, other], -INF).item() == 0.0
    assert get_total_norm([nothing_stored, other], 2.0).item() == 5.0
    no_elements = torch.sparse_coo_tensor(no_index, [], (0,), check_invariants=True)
    assert get_total_norm([no_elements, other], -INF).item() == 5.0  # like a dense empty one


def test_sparse_clip_grad_value_rejects_a_negative_clip_value():
    g = embedding_grad()
    snapshot = (g._indices().clone(), g._values().clone())
    (prm,) = make_params([torch.zeros(5, 2)])
    prm.grad = g
    for bad in (-0.5, NAN):
        message = (
            f"^clip_value must be a non-negative number for sparse gradients, got {bad}: it would "
            "set every element to clip_value, the unstored zeros included, which a sparse "
            r"gradient cannot hold \(use clip_value=0 to zero them\)$"
        )
        with pytest.raises(ValueError, match=message):
            clip_grad_value_([prm], bad)
    assert not g.is_coalesced()  # untouched
    assert torch.equal(g._indices(), snapshot[0]) and torch.equal(g._values(), snapshot[1])


# ------------------------------------------------------------------------------------------
# the path used on devices other than CPU (host-sync free), exercised with CPU tensors through
# the engine's seam (``device_path()``): per-tensor norms, totals and clipped gradients


def torch_kernel_norms(t: torch.Tensor, p: float) -> list[float]:
    """The norms torch's own kernels give for one dense tensor, as the device path uses them:
    ``vector_norm``, and for p in (1, 2, inf) also ``_foreach_norm`` (the path takes one of
    the two, by ``foreach``); complex tensors by their magnitudes, fp16/bf16 accumulated in
    float32."""
    if t.numel() == 0:
        return [0.0]
    x = t.abs() if t.is_complex() else t
    kw = {"dtype": torch.float32} if x.dtype in HALF else {}
    out = [torch.linalg.vector_norm(x, p, **kw).item()]
    if p in (1.0, 2.0, INF):
        out.append(torch._foreach_norm([x], p, **kw)[0].item())
    return out


# Tolerances on the device path. Per tensor: the value is torch's kernel result, rounded once
# to the result dtype (float32: 2**-24 = 6e-8); two float32 ulps (2.4e-7) leave room for one
# more rounding and nothing else (a norm off by 1e-6 fails). Total: the float64 combination of
# those per-tensor values is exact to 1e-15; the per-tensor values were each rounded once to
# float32 and the total is rounded once more: 4 ulps (4.8e-7).
DEVICE_PER_TENSOR_RTOL = 2.4e-7
DEVICE_TOTAL_RTOL = 4.8e-7


@pytest.mark.parametrize("foreach", [None, True, False])  # each value: its own kernels
@settings(max_examples=examples(50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grads=wide_sets,
    norm_type=wide_norm_types,
    max_norm=st.sampled_from([0.0, 1e-3, 0.5, 7.0]),
)
def test_device_path_matches_torch_kernels_and_reference(foreach, grads, norm_type, max_norm):
    p = float(norm_type)
    tensors = [g for g in grads if g is not None]
    params = make_params(grads)
    with device_path():
        measured = measure_grad_norms(params, norm_type)
        total = get_total_norm(tensors, norm_type, foreach=foreach)
        clipped_total = clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)
    assert total.dtype == measured.total_norm.dtype == measured.norms.dtype == result_dtype(tensors)
    # per-tensor norms: torch's kernel, and within torch's own error of the float64 reference
    per = measured.norms.tolist()
    assert len(per) == len(tensors)
    for t, n in zip(tensors, per):
        candidates = torch_kernel_norms(t, p)
        assert min(rel_err(n, c) for c in candidates) <= DEVICE_PER_TENSOR_RTOL, (n, candidates)
        ref = ref_tensor_norm(t, p)
        kernel_err = max(rel_err(c, ref) for c in candidates)
        assert rel_err(n, ref) <= 1.01 * kernel_err + tensor_rtol(t, p)
    # totals: the p-norm of those per-tensor norms (zero-element tensors left out)
    combined = ref_combine([n for t, n in zip(tensors, per) if t.numel() > 0], p)
    dt = total.dtype  # a combination beyond its range comes out inf
    assert_close_to_ref(measured.total_norm.item(), combined, DEVICE_TOTAL_RTOL, "total", dt)
    assert_close_to_ref(total.item(), combined, DEVICE_TOTAL_RTOL + DEVICE_PER_TENSOR_RTOL, "total", dt)
    assert torch.equal(clipped_total, total) or rel_err(clipped_total.item(), total.item()) == 0
    # clipped gradients: each original times the coefficient of that total, in float64
    assert_clipped_like_reference(grads_of(params), tensors, max_norm, total.item(), 0.0, total.dtype)


@pytest.mark.parametrize("foreach", [None, True, False])  # each value: its own kernels
@settings(max_examples=examples(30), deadline=None)
@given(
    grads=wide_real_sets,
    clip_value=st.sampled_from([0.0, 1e-2, 0.7, 5.0, INF, -0.5]),
)
def test_device_path_clip_grad_value_matches_torch(foreach, grads, clip_value):
    ours = make_params(grads)
    assume(grads_of(ours))
    theirs = make_params(grads)
    torch_clip_grad_value_(theirs, clip_value, foreach=foreach)
    with device_path():
        clip_grad_value_(ours, clip_value, foreach=foreach)
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_device_path_scales_by_a_device_coefficient(foreach):
    """clip_grads_with_norm_ given a total: the multiply by the clamped coefficient, done
    without reading it on the host, also when the coefficient is 1."""
    gen = torch.Generator().manual_seed(9)
    grads = [
        torch.randn(50, generator=gen),
        torch.randn(3, 4, dtype=torch.float64, generator=gen),
        torch.randn(20_000, generator=gen).to(torch.bfloat16),
    ]
    total = torch.tensor(4.0)
    for max_norm in (0.0, 1.0, 3.99999, 100.0):
        ours = make_params(grads)
        theirs = make_params(grads)
        with device_path():
            clip_grads_with_norm_(ours, max_norm, total, foreach=foreach)
        torch.nn.utils.clip_grads_with_norm_(theirs, max_norm, total, foreach=foreach)
        for a, b, g in zip(grads_of(ours), grads_of(theirs), grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            # the coefficient is computed in the total's dtype (float32), as in torch
            coef = min(max_norm / (4.0 + 1e-6), 1.0)
            tol = 2 * torch.finfo(torch.float32).eps + torch.finfo(g.dtype).eps
            torch.testing.assert_close(a.double(), g.double() * coef, rtol=tol, atol=0)


def test_device_path_half_precision_and_overflow_across_tensors():
    half = [torch.full((10_000,), 1000.0, dtype=torch.float16)]
    total, _ = engine_norms._device_norms(half, 2.0, None, False)
    assert_close_to_ref(total.item(), 1e5, 1e-5)  # torch's float32 accumulation, not rows
    many = [torch.full((1,), 3e38) for _ in range(4)]  # each norm finite, the sum of squares not
    total, _ = engine_norms._device_norms(many, 2.0, None, False)
    assert_close_to_ref(total.item(), 6e38, 1e-6)


class KernelLog(TorchFunctionMode):
    """Records the kernels torch is asked for, as ``(name, number of tensors)``: the norms
    (``foreach_norm``, ``vector_norm``), the multiplies (``foreach_mul_``, ``mul_``) and the
    clamps (``foreach_clamp_min_``, ``foreach_clamp_max_``, ``clamp_``)."""

    NAMES = {
        torch._foreach_norm: "foreach_norm",
        torch.linalg.vector_norm: "vector_norm",
        torch._foreach_mul_: "foreach_mul_",
        torch.Tensor.mul_: "mul_",
        torch._foreach_clamp_min_: "foreach_clamp_min_",
        torch._foreach_clamp_max_: "foreach_clamp_max_",
        torch.Tensor.clamp_: "clamp_",
    }

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.NAMES.get(func)
        if name is not None:
            self.calls.append((name, len(args[0]) if name.startswith("foreach") else 1))
        return func(*args, **(kwargs or {}))

    def of(self, *names: str) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[0] in names]


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF, "inf", 3.0, 0.5, -1.0, -INF, 0.0])
def test_device_path_takes_one_foreach_kernel_per_group_for_torchs_fused_norms(foreach, norm_type):
    """On a GPU the kernel choice is the speed of the path: one ``_foreach_norm`` launch per
    (device, dtype) group for p in (1, 2, inf) unless ``foreach=False``, one ``vector_norm``
    per tensor otherwise (and for tensor subclasses, which the foreach kernels refuse). On CPU
    both kernels give the same bits, so only the calls tell them apart."""
    gen = torch.Generator().manual_seed(11)
    grads = [
        torch.randn(5, generator=gen),
        torch.empty(0),
        torch.randn(3, 2, generator=gen),
        torch.randn(4, dtype=torch.float64, generator=gen),
        torch.randn(6, generator=gen).half(),
    ]
    with device_path(), KernelLog() as log:
        total = get_total_norm(grads, norm_type, foreach=foreach)
    fused = foreach is not False and float(norm_type) in (1.0, 2.0, INF)
    norms = log.of("foreach_norm", "vector_norm")
    if fused:  # float32 (two tensors), float64, float16; the empty tensor takes no part
        assert sorted(norms) == [("foreach_norm", 1), ("foreach_norm", 1), ("foreach_norm", 2)]
    else:
        assert norms == [("vector_norm", 1)] * 4
    per = [torch_kernel_norms(g, float(norm_type))[0] for g in grads if g.numel()]
    assert_close_to_ref(total.item(), ref_combine(per, float(norm_type)), DEVICE_TOTAL_RTOL)
    subclassed = [torch.nn.Parameter(g.float()) for g in grads if g.numel()]
    with device_path(), KernelLog() as log:
        get_total_norm(subclassed, norm_type, foreach=foreach)
    assert log.of("foreach_norm", "vector_norm") == [("vector_norm", 1)] * 4


def meta_param(*shape: int) -> torch.nn.Parameter:
    prm = torch.nn.Parameter(torch.empty(shape, device="meta"))
    prm.grad = torch.empty(shape, device="meta")
    return prm


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0, 0.5, -1.0, -INF, 0.0])
def test_gradients_on_several_devices_are_measured_on_the_first_ones(norm_type):
    """Model-parallel gradients: the per-device norms are gathered on the first tensor's
    device, as in torch ("meta" tensors stand in for an accelerator: they carry a device and a
    dtype, no values)."""
    meta, empty_meta = torch.empty(3, device="meta"), torch.empty(0, device="meta")
    cpu = torch.ones(3, dtype=torch.float64)
    for tensors in ([meta, cpu], [meta], [empty_meta], [empty_meta, cpu], [empty_meta, meta]):
        ours = get_total_norm(tensors, norm_type)
        assert ours.device.type == "meta" and ours.shape == ()
        assert ours.dtype == result_dtype(tensors)
        if torch_accepts(tensors, norm_type):
            assert torch_get_total_norm(tensors, norm_type).device == ours.device
    measured = measure_grad_norms([meta_param(0), meta_param(2, 3)], norm_type)
    assert measured.norms.device.type == measured.total_norm.device.type == "meta"
    assert measured.norms.shape == (2,) and measured.norms.dtype == torch.float32


def test_foreach_devices_are_torchs():
    """``foreach=True`` is refused exactly where torch refuses it, and the device path takes the
    foreach kernels exactly where torch has them: torch's list, plus CPU."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

    assert engine_norms.foreach_devices() == set(_get_foreach_kernels_supported_devices()) | {"cpu"}


def test_adaptive_rules_are_reexported_lazily():
    from gradcheck_cli import rules

    for name in ("AGC", "AutoClip", "ClipStep", "ZClip", "adaptive_clip_grad_"):
        assert getattr(engine, name) is getattr(rules, name)
    with pytest.raises(AttributeError, match="^module 'gradcheck_cli.engine' has no attribute 'AGCC'$"):
        engine.AGCC  # noqa: B018
    assert not hasattr(engine, "clip")


# ------------------------------------------------------------------------------------------
# the exact per-tensor norm, the fallback for overflow, underflow and subnormal partial norms:
# reached only in those regimes through the public calls, so tested directly as well


def exact_rtol(t: torch.Tensor) -> float:
    """float64 arithmetic on exact inputs; a complex64 magnitude is rounded once to float32."""
    return 2e-6 if t.dtype == torch.complex64 else 1e-12


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    g=gradient(dtypes=REAL + HALF + COMPLEX, extreme=True, scales=[1e-3, 1.0, 30.0, 1e-300, 1e300, 1e-310]),
    p=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 20.0, -0.5, -1.0, -2.0]),
)
def test_exact_norm_matches_the_float64_reference(g, p):
    got = engine_exact._exact_norm(g, p)
    assert isinstance(got, float)
    assert_close_to_ref(got, ref_tensor_norm(g, p), exact_rtol(g), f"p={p} {g.dtype}")


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, -1.0, -0.5])
def test_exact_norm_special_values(p):
    x = torch.tensor
    assert engine_exact._exact_norm(torch.empty(0), p) == 0.0
    assert engine_exact._exact_norm(torch.empty(0, 3, dtype=torch.complex64), p) == 0.0
    assert engine_exact._exact_norm(x([0.0, 0.0]), p) == 0.0
    assert math.isnan(engine_exact._exact_norm(x([1.0, NAN, 2.0]), p))
    assert math.isnan(engine_exact._exact_norm(x([NAN, 0.0]), p))
    assert math.isnan(engine_exact._exact_norm(x([INF, NAN]), p))
    # a zero element decides a negative p (harmonic-like means), an inf one a positive p
    assert_close_to_ref(engine_exact._exact_norm(x([0.0, 3.0]), p), 0.0 if p < 0 else 3.0, 1e-15)
    assert_close_to_ref(engine_exact._exact_norm(x([-INF, 3.0]), p), 3.0 if p < 0 else INF, 1e-15)
    # the largest magnitude is negative; a range wider than float64's squares
    # the extreme magnitude is exactly 1
    assert_close_to_ref(engine_exact._exact_norm(x([1.0, 2.0]), p), ref_tensor_norm(x([1.0, 2.0]), p), 1e-15)
    assert_close_to_ref(engine_exact._exact_norm(x([1.0, -0.5]), p), ref_tensor_norm(x([1.0, 0.5]), p), 1e-15)
    big = x([-1e300, 1e-300, 0.5], dtype=torch.float64)
    assert_close_to_ref(engine_exact._exact_norm(big, p), ref_tensor_norm(big, p), 1e-12, f"p={p}")
    assert_close_to_ref(engine_exact._exact_norm(-big, p), ref_tensor_norm(big, p), 1e-12, f"p={p}")


# ------------------------------------------------------------------------------------------
# which tensors are recomputed exactly (difference 1): only those concerned, and all of those


@pytest.fixture
def exact_calls(monkeypatch):
    """The element counts of the tensors the engine recomputes exactly, in call order."""
    calls: list[int] = []
    real = engine_exact._exact_norm

    def spy(g, p):
        calls.append(g.numel())
        return real(g, p)

    monkeypatch.setattr(engine_cpu, "_exact_norm", spy)
    return calls


# per element: a float32 sum of p-th powers below tiny * 2**26 may have lost too much to underflow
F32_UNDERFLOW_FLOOR = torch.finfo(torch.float32).tiny * 2.0**26
F64_UNDERFLOW_FLOOR = torch.finfo(torch.float64).tiny * 2.0**26


def ordinary_grads(p: float) -> list[torch.Tensor]:
    """Gradients the fast paths measure well for ``p``: every length around the row (1024) and
    batch (16384) sizes of the CPU reductions, strided and transposed ones, float64 values whose
    float32 squares would underflow, fp16 values whose fp16 sums of squares would overflow,
    constant values whose p-th powers are just above the underflow threshold, an empty tensor."""
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, generator=gen) for n in (1, 5, 1023, 1024, 1025, 2048, 16383, 16384, 16385)]
    grads += [
        torch.randn(600, 90, generator=gen)[:, ::3],  # 18000 elements, not dense
        torch.randn(200, 100, generator=gen).t(),  # dense, transposed
        torch.randn(3000, dtype=torch.float64, generator=gen) * 1e-20,
        (torch.randn(1500, generator=gen) * 100).to(torch.float16),
        torch.randn(2000, generator=gen).to(torch.bfloat16),
        torch.full((3000,), (4 * F32_UNDERFLOW_FLOOR) ** (1 / p) if p >= 1 else 1e-30),
        torch.empty(0),
    ]
    if p == 2:  # float32 row norms whose squares overflow float32 once summed (not in float64)
        grads.append(torch.full((40_000,), 1e17))
    if p >= 1:  # a row whose norm is subnormal (or 0) next to an ordinary row: fine for p >= 1
        grads.append(torch.cat([torch.full((1024,), 1e-44), torch.ones(1024)]))
    return grads


def strided(n_rows: int, value: float) -> torch.Tensor:
    """A tensor of ``n_rows * 30`` copies of ``value`` that is not dense (every third column)."""
    return torch.full((n_rows, 90), value)[:, ::3]


# (gradient, p, whether a total with ordinary gradients recomputes it: True, False, or None
# where that depends on the other values in its row of the CPU reduction)
SUSPECTS = [
    (torch.full((10,), 1e20), 2.0, None),  # its float32 squares overflow
    (torch.full((10,), 1e38), 0.5, None),  # its partial norm (sum of square roots)**2 overflows
    (torch.full((20_000,), 1e20), 2.0, True),  # the same, in rows of its own
    (strided(600, 1e20), 2.0, True),  # in copied rows
    (torch.tensor([1.0, INF]), 2.0, True),  # an inf element: the exact answer is inf
    (torch.tensor([1.0, INF]), 0.5, True),
    (torch.full((3000,), (F32_UNDERFLOW_FLOOR / 4) ** 0.5), 2.0, False),  # squares may have underflowed
    (torch.full((4,), 1e-200, dtype=torch.float64), 2.0, False),  # float64 squares underflow
    (torch.full((3000,), (F64_UNDERFLOW_FLOOR / 4) ** 0.5, dtype=torch.float64), 2.0, False),
    (torch.zeros(20_000), 0.5, False),  # exactly 0: underflow may be why
    (torch.full((3,), 3e-45), 0.5, None),  # a subnormal partial norm (p < 1)
    (torch.tensor([1e-322, 3e-322], dtype=torch.float64), 0.5, None),  # the same in float64
    (torch.full((20_000,), 3e-45), 0.5, True),  # the same, in rows of its own
    (strided(600, 3e-45), 0.5, True),  # in copied rows
]


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_ordinary_gradients_are_never_recomputed(p, exact_calls):
    grads = ordinary_grads(p)
    total = get_total_norm(grads, p)
    measured = measure_grad_norms(make_params(grads), p)
    for g in grads:  # alone, too
        get_total_norm([g], p)
    assert exact_calls == []
    assert_close_to_ref(total.item(), ref_total(grads, p), half_rtol(p), f"p={p}")
    assert_close_to_ref(measured.total_norm.item(), ref_total(grads, p), half_rtol(p), f"p={p}")
    for g, n in zip(grads, measured.norms.tolist()):  # float32 rows of constant values: half_rtol
        assert_close_to_ref(n, ref_tensor_norm(g, p), half_rtol(p), f"p={p} {g.shape} {g.dtype}")


@pytest.mark.parametrize("case", range(len(SUSPECTS)))
def test_exactly_the_tensors_concerned_are_recomputed(case, exact_calls):
    suspect, p, in_total = SUSPECTS[case]
    grads = ordinary_grads(p) + [suspect]
    measured = measure_grad_norms(make_params(grads), p)
    assert exact_calls == [suspect.numel()]
    assert_close_to_ref(
        measured.norms[-1].item(), ref_tensor_norm(suspect, p), tensor_rtol(suspect, p), f"p={p}", measured.norms.dtype
    )
    exact_calls.clear()
    total = get_total_norm(grads, p)
    # in a total, no other tensor is recomputed; this one if the fast total is in doubt
    assert exact_calls in (([], [suspect.numel()]) if in_total is None else ([suspect.numel()] if in_total else [],))
    assert_close_to_ref(total.item(), ref_total(grads, p), half_rtol(p), f"p={p}", total.dtype)
    exact_calls.clear()
    # alone (with an empty tensor), its total is recomputed whatever the reason; the empty tensor
    # is float64 to keep the total off the small-model path (float64 sums, nothing to recompute)
    alone = get_total_norm([torch.empty(0, dtype=torch.float64), suspect], p)
    assert exact_calls == [suspect.numel()]
    assert_close_to_ref(alone.item(), ref_tensor_norm(suspect, p), tensor_rtol(suspect, p), f"p={p}", alone.dtype)


def test_a_total_of_tiny_gradients_is_recomputed_tensor_by_tensor(exact_calls):
    # (the empty float64 tensor keeps the total off the small-model path, which has nothing to
    # recompute)
    grads = [torch.full((7,), 1e-30), torch.empty(0, dtype=torch.float64), torch.full((20_000,), -1e-25)]
    total = get_total_norm(grads, 2.0)
    assert exact_calls == [7, 20_000]
    assert_close_to_ref(total.item(), ref_total(grads, 2.0), 1e-6)


def test_float64_powers_that_overflow_only_across_tensors():
    """Each tensor's sum of squares is a finite float64, their sum is not: the per-tensor
    norms are combined with scaling instead."""
    grads = [torch.full((1,), 1e154, dtype=torch.float64), torch.full((1,), -1.2e154, dtype=torch.float64)]
    expected = math.hypot(1e154, 1.2e154)
    assert_close_to_ref(get_total_norm(grads).item(), expected, 1e-15)
    measured = measure_grad_norms(make_params(grads))
    assert_close_to_ref(measured.total_norm.item(), expected, 1e-15)
    assert measured.norms.tolist() == [1e154, 1.2e154]


@pytest.mark.parametrize("norm_type", [0.5, 1.0, 2.0, INF, -1.0, -INF, 0.0])
def test_only_empty_gradients(norm_type):
    grads = [torch.empty(0), torch.empty(3, 0, dtype=torch.float64)]
    total = get_total_norm(grads, norm_type)
    measured = measure_grad_norms(make_params(grads), norm_type)
    assert total.item() == measured.total_norm.item() == 0.0
    assert total.dtype == measured.norms.dtype == torch.float64
    assert measured.norms.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, INF])
def test_a_lone_tensor_that_is_not_dense(p):
    gen = torch.Generator().manual_seed(14)
    for g in (torch.randn(600, 90, generator=gen)[:, ::3], torch.randn(512, 96, generator=gen)[:, ::3]):
        assert_close_to_ref(get_total_norm([g], p).item(), ref_tensor_norm(g, p), 2e-6)
        assert_close_to_ref(get_total_norm([g, torch.ones(3)], p).item(), ref_total([g, torch.ones(3)], p), 2e-6)


@pytest.mark.parametrize("norm_type", [INF, 2.0, 1.0, 0.5, 3.0])
def test_lengths_at_the_row_and_batch_sizes(norm_type):
    """One large value in a tensor of each length around the reductions' sizes, alone and
    among others: a boundary that drops an element or a remainder shows."""
    p = float(norm_type)
    warnings.simplefilter("error")  # e.g. torch's warning for an output of the wrong size
    for n in (1023, 1024, 1025, 2048, 16383, 16384, 16385, 32768):
        g = torch.ones(n)
        for where in (0, n - 1):
            g2 = g.clone()
            g2[where] = 50.0
            for grads in ([g2], [torch.ones(3), g2, torch.ones(5)]):
                assert_close_to_ref(get_total_norm(grads, p).item(), ref_total(grads, p), 2e-6, f"n={n}")
                per = measure_grad_norms(make_params(grads), p).norms.tolist()
                for t, v in zip(grads, per):
                    assert_close_to_ref(v, ref_tensor_norm(t, p), 2e-6, f"n={n} p={p}")


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_a_tensor_of_more_rows_than_one_row_holds(p):
    """2**21 elements: 2048 rows of 1024, more rows than a row has elements."""
    n = 1 << 21
    g = torch.ones(n)
    g[7] = 50.0
    expected = ((n - 1) + 50.0**p) ** (1 / p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning for an output of the wrong size
        assert_close_to_ref(get_total_norm([g], p).item(), expected, half_rtol(p))
        assert_close_to_ref(measure_grad_norms(make_params([g]), p).norms.item(), expected, half_rtol(p))


def test_per_tensor_plan_is_built_once_per_layout():
    engine_cpu._PLANS.clear()
    grads = [torch.randn(5), torch.randn(3000, dtype=torch.float64), torch.empty(0)]  # not a small model
    measure_grad_norms(make_params(grads))
    ((key, plan),) = engine_cpu._PLANS.items()
    owner, thresholds, all_nonempty = plan
    assert not all_nonempty and thresholds[2].item() == -INF
    measure_grad_norms(make_params([g * 3 for g in grads]), 2.0)  # same shapes and dtypes
    assert len(engine_cpu._PLANS) == 1 and engine_cpu._PLANS[key] is plan


# ------------------------------------------------------------------------------------------
# clipping: what is multiplied, by what


def test_clip_skips_the_multiply_on_cpu_when_nothing_is_clipped():
    """On CPU the coefficient is read on the host (no device sync) and a coefficient of 1
    multiplies nothing; on the device path the multiply always runs."""
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([1.0], dtype=torch.float64)]
    for max_norm, multiplies in ((100.0, False), (5.1, False), (5.09, True), (1.0, True)):
        params = make_params(grads)
        with KernelLog() as log:
            clip_grad_norm_(params, max_norm)
        assert bool(log.of("foreach_mul_", "mul_")) is multiplies
        params = make_params(grads)
        with device_path(), KernelLog() as log:
            clip_grad_norm_(params, max_norm)
        assert log.of("foreach_mul_", "mul_")


@pytest.mark.parametrize("foreach", [None, True, False])
def test_device_path_multiplies_and_clamps_with_foreach_kernels_unless_told_not_to(foreach):
    gen = torch.Generator().manual_seed(13)
    grads = [
        torch.randn(5, generator=gen),
        torch.randn(3, generator=gen),
        torch.randn(4, dtype=torch.float64, generator=gen),
    ]
    fused = foreach is not False
    params = make_params(grads)
    with device_path(), KernelLog() as log:
        clip_grads_with_norm_(params, 1.0, torch.tensor(10.0), foreach=foreach)
    expected = [("foreach_mul_", 2), ("foreach_mul_", 1)] if fused else [("mul_", 1)] * 3
    assert log.of("foreach_mul_", "mul_") == expected
    for g, out in zip(grads, grads_of(params)):
        assert torch.equal(out, g * (torch.tensor(1.0) / (torch.tensor(10.0) + 1e-6)).to(g.dtype))
    params = make_params(grads)
    with device_path(), KernelLog() as log:
        clip_grad_value_(params, 0.5, foreach=foreach)
    expected = (
        [("foreach_clamp_min_", 2), ("foreach_clamp_max_", 2), ("foreach_clamp_min_", 1), ("foreach_clamp_max_", 1)]
        if fused
        else [("clamp_", 1)] * 3
    )
    assert log.of("foreach_clamp_min_", "foreach_clamp_max_", "clamp_") == expected
    for g, out in zip(grads, grads_of(params)):
        assert torch.equal(out, g.clamp(-0.5, 0.5))
    params = make_params(grads)
    with KernelLog() as log:  # on CPU: one clamp per tensor, in one pass
        clip_grad_value_(params, 0.5, foreach=foreach)
    assert log.of("foreach_clamp_min_", "foreach_clamp_max_", "clamp_") == [("clamp_", 1)] * 3


def test_clip_grads_with_norm_accepts_a_float_total():
    g = torch.tensor([3.0, 4.0, -12.0])
    a, b = make_params([g]), make_params([g])
    clip_grads_with_norm_(a, 2.0, 13.0)
    clip_grads_with_norm_(b, 2.0, torch.tensor(13.0))
    assert torch.equal(grads_of(a)[0], grads_of(b)[0])
    assert torch.equal(grads_of(a)[0], g * (2.0 / (torch.tensor(13.0) + 1e-6)))
    c = make_params([g])
    clip_grads_with_norm_(c, 20.0, 13)  # an int, clamped to 1: untouched
    assert torch.equal(grads_of(c)[0], g)


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_complex_inf_gradient_keeps_its_imaginary_part_when_clipped(path):
    """Scaled as pairs of reals: (inf+0j) * 0 is nan+0j, where torch's complex product gives
    nan+nanj; the finite element is zeroed."""
    g = torch.tensor([INF + 0j, 1 + 2j], dtype=torch.complex64)
    params = make_params([g])
    with engine_path(path):
        total = clip_grad_norm_(params, 1.0)
    assert total.item() == INF
    out = torch.view_as_real(grads_of(params)[0])
    assert torch.isnan(out[0, 0]) and out[0, 1].item() == 0.0
    assert out[1].tolist() == [0.0, 0.0]
    theirs = make_params([g])
    torch_clip_grad_norm_(theirs, 1.0)
    assert torch.isnan(torch.view_as_real(grads_of(theirs)[0])[0]).all()


def test_device_path_never_reads_a_device_value():
    """Tensors on the "meta" device have no values: reading one on the host raises. The path
    for devices other than CPU runs through on them, so it syncs with no device."""
    params = [meta_param(3), meta_param(0), meta_param(2, 2)]
    for p in (2.0, 1.0, INF, 0.5, -1.0, -INF, 0.0):
        total = clip_grad_norm_(params, 1.0, p)
        assert total.device.type == "meta"
        clip_grads_with_norm_(params, 1.0, total)
        measured = measure_grad_norms(params, p)
        assert measured.norms.device.type == "meta"
    clip_grad_value_(params, 0.1)
    empty = torch.empty(0, dtype=torch.float64, device="meta")
    for p in (2.0, 0.5, -1.0, INF, 0.0):
        combined = engine_exact._combine(empty, p)
        assert combined.device.type == "meta" and combined.dtype == torch.float64


# ------------------------------------------------------------------------------------------
# building blocks: the scaled combination of per-tensor norms, the pieces of a tensor


finite_norms = st.one_of(
    st.sampled_from([0.0, 5e-324, 2.2e-308, 1.0, 1.7976931348623157e308]),
    st.builds(lambda m, e: m * 10.0**e, st.floats(1.0, 9.99), st.integers(-300, 300)),
)


@settings(max_examples=examples(100), deadline=None)
@given(
    norms=st.lists(st.one_of(finite_norms, finite_norms, st.sampled_from([INF, NAN])), max_size=8),
    p=st.sampled_from([0.5, 1.0, 2.0, 3.0, 20.0, -0.5, -1.0, -2.0, INF, -INF, 0.0]),
)
def test_combine_matches_the_float64_reference(norms, p):
    _check_combine(norms, p)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, -0.5, -1.0, -2.0])
def test_combine_scales_by_the_extreme_norm(p):
    """Scaled by the largest norm for p > 0 and the smallest for p < 0: every term is then at
    most 1 (p > 0) or at least 1 (p < 0), and neither overflows nor underflows."""
    for norms in ([1e-200, 1e200], [1e-200, 3e-200], [1e200, 3e200], [1.0, 2.0], [0.5, 1.0], [5e-324, 1e-320]):
        _check_combine(norms, p)


def _check_combine(norms: list[float], p: float) -> None:
    got = engine_exact._combine(torch.tensor(norms, dtype=torch.float64), p)
    assert got.dtype == torch.float64 and got.shape == ()
    if p == 0:  # a count of the nonzero norms (NaN is nonzero)
        assert got.item() == sum(1 for n in norms if n != 0)
    else:
        assert_close_to_ref(got.item(), ref_combine(norms, p), 1e-12, f"p={p} {norms}")


@settings(max_examples=examples(150), deadline=None)
@given(data=st.data())
def test_flat_pieces_cover_every_element_once(data):
    """Pieces of a dense tensor are views of at most ``view_size`` elements; a tensor that is
    not dense (not a permutation of a contiguous one) is copied a block of whole rows at a time,
    as many rows as fit in ``copy_size`` (at least one)."""
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    base = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    g = base.permute(data.draw(st.permutations(range(len(shape)))))
    if data.draw(st.booleans()):
        g = g[::2]
    if data.draw(st.booleans()):
        g = g[..., ::2]
    view_size, copy_size = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    pieces = list(engine_exact._flat_pieces(g, view_size, copy_size))
    assert all(piece.ndim == 1 and 0 < piece.numel() <= view_size for piece in pieces)
    assert sorted(torch.cat(pieces).tolist()) == sorted(g.flatten().tolist())
    dense = any(g.permute(order).is_contiguous() for order in itertools.permutations(range(g.ndim)))
    if g.ndim >= 2:
        view = engine_exact._dense_view(g)
        assert (view is not None) == dense
        if dense:
            assert view.is_contiguous() and view.data_ptr() == g.data_ptr()
    else:
        assert engine_exact._dense_view(g) is None
    # the pieces of each block (the whole tensor when dense), in order: view_size elements each,
    # the block's remainder last
    if dense:
        blocks = [g.numel()]
    else:
        rows_per_copy = max(1, copy_size // max(1, g[0].numel()))
        blocks = [len(rows) * max(1, g[0].numel()) for rows in torch.arange(g.shape[0]).split(rows_per_copy)]
    sizes = [min(view_size, b - start) for b in blocks for start in range(0, b, view_size)]
    assert [piece.numel() for piece in pieces] == sizes
    if dense:  # views of g's memory
        assert {piece.untyped_storage().data_ptr() for piece in pieces} == {g.untyped_storage().data_ptr()}
    else:  # copies of whole rows, in g's order
        assert torch.equal(torch.cat(pieces), g.flatten())


def test_exact_norm_of_a_tensor_longer_than_its_chunks():
    """The exact recomputation reads float64 chunks of 2**20 elements: an overflowing tensor
    longer than that is recomputed chunk by chunk, every element once."""
    n = (1 << 20) * 2 + 7
    g = torch.full((n,), 1e20)
    g[0] = 3e20
    g[-1] = -2e20
    expected = math.sqrt((n - 2) * 1e40 + 9e40 + 4e40)
    assert_close_to_ref(get_total_norm([g]).item(), expected, 1e-6)
    assert_close_to_ref(
        engine_exact._exact_norm(g, 2.0),
        math.sqrt(
            float(n - 2) * float(torch.tensor(1e20)) ** 2
            + float(torch.tensor(3e20)) ** 2
            + float(torch.tensor(-2e20)) ** 2
        ),
        1e-10,
    )
    assert_close_to_ref(
        engine_exact._exact_norm(g, 1.0),
        (n - 2) * float(torch.tensor(1e20)) + float(torch.tensor(3e20)) + float(torch.tensor(2e20)),
        1e-10,
    )
    assert_close_to_ref(engine_exact._exact_norm(g, 3.0), ref_tensor_norm(g, 3.0), 1e-10)


def test_result_dtype_maps_complex_and_integer_dtypes_to_real_floats():
    """Also used for DTensor gradients (engine.distributed), which reach it unconverted."""
    rd = engine_norms.result_dtype
    assert rd(set()) == torch.float32
    assert rd({torch.complex64}) == torch.float32
    assert rd({torch.complex128}) == torch.float64
    assert rd({torch.complex64, torch.float16}) == torch.float32
    assert rd({torch.int64}) == rd({torch.bool}) == torch.float32
    assert rd({torch.int64, torch.float64}) == torch.float64
    assert rd({torch.bfloat16}) == rd({torch.float16, torch.bfloat16}) == torch.float32


@settings(max_examples=examples(100), deadline=None)
@example(sizes=[1, 3, 1, 3, 2], short=21, limit=4)  # batches that reach the limit exactly
@example(sizes=[2, 2, 1, 2, 3], short=21, limit=4)  # a new batch starts empty
@given(
    sizes=st.lists(st.integers(0, 20), max_size=12),
    short=st.integers(1, 21),
    limit=st.integers(1, 40),
)
def test_short_batches_close_as_soon_as_they_reach_the_limit(sizes, short, limit):
    """The short tensors (0 < n < short), flattened, in order, in consecutive batches; a batch
    ends with the tensor that brings it to at least ``limit`` elements (all in one batch when
    they fit)."""
    grads = [torch.full((n,), float(i)).view(n, 1) for i, n in enumerate(sizes)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_cpu, "_SHORT", short)
        mp.setattr(engine_cpu, "_BATCH_LIMIT", limit)
        batches = list(engine_cpu._short_batches(grads, sizes))
    chosen = [i for i, n in enumerate(sizes) if 0 < n < short]
    expected: list[list[int]] = []
    if sum(sizes[i] for i in chosen) <= limit:
        expected = [chosen] if chosen else []
    else:
        current, acc = [], 0
        for i in chosen:
            current.append(i)
            acc += sizes[i]
            if acc >= limit:
                expected.append(current)
                current, acc = [], 0
        if current:
            expected.append(current)
    got = [[int(t[0]) for t in batch] for batch in batches]
    assert got == expected
    assert all(t.ndim == 1 for batch in batches for t in batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_sparse_real_and_complex_gradients_without_warnings(dtype):
    """Duplicates are summed in float64 (complex128 for complex values) and nothing is cast
    through a complex or real dtype it does not need (torch warns when that drops imaginary
    parts)."""
    values = torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=dtype)
    if dtype.is_complex:
        values = values * torch.tensor([1 + 1j, 1 - 2j, 1j, 1.0], dtype=dtype)
    g = torch.sparse_coo_tensor([[0, 0, 2, 3]], values, (5,), check_invariants=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p in (2.0, 1.0, INF, 0.5, -1.0):
            assert_close_to_ref(get_total_norm([g], p).item(), ref_tensor_norm(g, p), 1e-6, f"p={p}")
        if not dtype.is_complex:
            (prm,) = make_params([torch.zeros(5)])
            prm.grad = g.clone()
            clip_grad_norm_([prm], 1.0)
            expected = dense(g).double() / (ref_tensor_norm(g, 2.0) + 1e-6)
            torch.testing.assert_close(prm.grad.to_dense().double(), expected, rtol=1e-6, atol=0)
