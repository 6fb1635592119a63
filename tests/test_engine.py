"""Tests for gradcheck_cli.engine: differential against torch.nn.utils, exact against float64.

Where the engine agrees with torch by design, hypothesis draws random gradient sets and compares
with torch itself. The regimes where the engine deliberately differs (see the engine's module
docstring) are kept out of those comparisons and checked against a float64 reference instead,
each with a test that torch's own behaviour would fail.
"""

from __future__ import annotations

import gc
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_
from torch.nn.utils import get_total_norm as torch_get_total_norm

from gradcheck_cli import engine
from gradcheck_cli.engine import (
    GradNorms,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    measure_grad_norms,
)

INF = math.inf
NAN = math.nan
NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -INF, INF, "inf"]
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# float64 reference


def ref_tensor_norm(t: torch.Tensor, p: float) -> float:
    """Norm of one tensor in float64, scaled so that nothing overflows or underflows."""
    x = t.detach().abs().to(torch.float64).flatten()
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


def assert_close_to_ref(value: float, ref: float, rtol: float, what: str = "") -> None:
    assert rel_err(value, ref) <= rtol, f"{what}: got {value!r}, reference {ref!r}"


def f32_rtol(p: float) -> float:
    """float32 accumulation: relative error of the sum of p-th powers, amplified by 1/p."""
    return 2e-6 * max(1.0, 1.0 / p) if 0 < p < INF else 2e-6


def clone_strided(g: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (non-contiguous gradients stay non-contiguous)."""
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


def rtol_for(tensors, p: float) -> float:
    """float64 rounding if every tensor is float64, else float32 accumulation."""
    if tensors and all(t.dtype == torch.float64 for t in tensors):
        return 1e-12
    return f32_rtol(p)


def grads_of(params):
    return [prm.grad for prm in params if prm.grad is not None]


def torch_accepts(tensors: list[torch.Tensor], p: float) -> bool:
    """torch raises for zero-element tensors with the inf norm and with negative p."""
    return not ((p == INF or p < 0) and any(t.numel() == 0 for t in tensors))


# ------------------------------------------------------------------------------------------
# hypothesis strategies


@st.composite
def gradient(draw, dtypes=(torch.float32, torch.float64), nonfinite=True, scales=None):
    """One gradient tensor: random shape (sometimes empty, sometimes longer than one row of the
    engine's chunked reduction), dtype, scale, zeros, sprinkled NaN/inf, non-contiguity."""
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
    scale = draw(st.sampled_from(scales or [1e-3, 1.0, 30.0]))
    g = torch.randn(shape, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)
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
    return [
        None if draw(st.integers(0, 5)) == 0 else draw(gradient(**kw)) for _ in range(k)
    ]


norm_types = st.sampled_from(NORM_TYPES)


# ------------------------------------------------------------------------------------------
# differential tests against torch (regimes where the engine agrees with torch)


def assert_matches_torch(ours: torch.Tensor, theirs: torch.Tensor, tensors, p: float) -> None:
    """Ours within float rounding of the float64 reference, and of torch up to torch's own error."""
    ref = ref_total(tensors, p)
    rtol = rtol_for(tensors, p)
    assert_close_to_ref(ours.item(), ref, rtol, f"engine p={p}")
    torch_err = rel_err(theirs.item(), ref)
    assert rel_err(ours.item(), theirs.item()) <= rtol + 1.01 * torch_err + 1e-7, (
        f"p={p}: engine {ours.item()!r} vs torch {theirs.item()!r} (reference {ref!r})"
    )


@FAST
@given(grads=gradient_sets(), norm_type=norm_types)
def test_get_total_norm_matches_torch(grads, norm_type):
    tensors = [g for g in grads if g is not None]
    p = float(norm_type)
    assume(torch_accepts(tensors, p))
    theirs = torch_get_total_norm(tensors, norm_type)
    ours = get_total_norm(tensors, norm_type)
    assert ours.dtype == theirs.dtype
    assert ours.shape == ()
    assert_matches_torch(ours, theirs, tensors, p)


@FAST
@given(
    grads=gradient_sets(),
    norm_type=norm_types,
    max_norm=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 7.0, 1e4]),
)
def test_clip_grad_norm_matches_torch(grads, norm_type, max_norm):
    p = float(norm_type)
    assume(torch_accepts([g for g in grads if g is not None], p))
    ours_params = make_params(grads)
    torch_params = make_params(grads)
    theirs = torch_clip_grad_norm_(torch_params, max_norm, norm_type)
    ours = clip_grad_norm_(ours_params, max_norm, norm_type)
    assert_matches_torch(ours, theirs, [g for g in grads if g is not None], p)
    for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-30, equal_nan=True)


@FAST
@given(grads=gradient_sets(), clip_value=st.sampled_from([0.0, 1e-2, 0.7, 5.0, INF, -0.5]))
def test_clip_grad_value_matches_torch(grads, clip_value):
    ours_params = make_params(grads)
    assume(grads_of(ours_params))  # torch raises without gradients (tested separately)
    torch_params = make_params(grads)
    torch_clip_grad_value_(torch_params, clip_value)
    clip_grad_value_(ours_params, clip_value)
    for a, b in zip(grads_of(ours_params), grads_of(torch_params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@FAST
@given(grads=gradient_sets(), norm_type=norm_types)
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
    assert result.norms.dtype == result.total_norm.dtype
    for t, n in zip(tensors, result.norms.tolist()):
        rtol = rtol_for([t], p)
        assert_close_to_ref(n, ref_tensor_norm(t, p), rtol, f"per-tensor p={p}")
        if torch_accepts([t], p):
            theirs = torch.linalg.vector_norm(t, p).item()
            torch_err = rel_err(theirs, ref_tensor_norm(t, p))
            assert rel_err(n, theirs) <= rtol + 1.01 * torch_err + 1e-7
    # the same total as get_total_norm, up to float rounding
    total = get_total_norm(tensors, norm_type)
    assert result.total_norm.dtype == total.dtype
    assert rel_err(result.total_norm.item(), total.item()) <= rtol_for(tensors, p)
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
    torch.testing.assert_close(
        get_total_norm(grads_of(params)), torch.tensor(1.0), rtol=1e-6, atol=0
    )


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
def test_foreach_flag_gives_the_same_result_on_cpu(foreach):
    g = [torch.arange(5.0), torch.ones(3, 3)]
    params = make_params([t.clone() for t in g])
    assert get_total_norm(g, foreach=foreach).item() == pytest.approx(math.sqrt(30 + 9))
    clip_grad_norm_(params, 1.0, foreach=foreach)
    clip_grad_value_(params, 0.1, foreach=foreach)
    assert all(t.abs().max() <= 0.1 for t in grads_of(params))


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
        assert_close_to_ref(
            torch_get_total_norm(grads, p).item(), get_total_norm(grads, p).item(), 1e-5
        )


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


@settings(max_examples=80, deadline=None)
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
    grads = [
        (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype) for n in sizes
    ]
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


@settings(max_examples=40, deadline=None)
@given(
    grads=gradient_sets(dtypes=(torch.float16, torch.bfloat16), scales=[1e-3, 1.0, 300.0]),
    norm_type=st.sampled_from([0.5, 1.0, 2.0, 3.0, INF, -INF, 0.0]),
)
def test_half_precision_against_float64_reference(grads, norm_type):
    tensors = [g for g in grads if g is not None]
    ours = get_total_norm(tensors, norm_type)
    assert ours.dtype == torch.float32
    assert_close_to_ref(ours.item(), ref_total(tensors, norm_type), f32_rtol(norm_type))


# ------------------------------------------------------------------------------------------
# difference 3: accuracy on very long tensors


def test_accuracy_on_1e8_element_tensor():
    n = 10**8
    g = torch.rand(n, generator=torch.Generator().manual_seed(4))
    try:
        ref = math.sqrt(
            math.fsum(torch.dot(c, c).item() for c in g.split(1 << 20) for c in [c.double()])
        )
        ours = get_total_norm([g]).item()
        assert rel_err(ours, ref) <= 1e-6
        assert rel_err(torch.linalg.vector_norm(g).item(), ref) > 1e-4  # torch's own error
        ref_inf = g.max().item()
        assert get_total_norm(g, INF).item() == ref_inf
    finally:
        del g
        gc.collect()


# ------------------------------------------------------------------------------------------
# difference 4: max_norm validated; max_norm = inf never modifies gradients


@pytest.mark.parametrize("max_norm", [-1.0, -1e-9, NAN])
def test_invalid_max_norm_raises(max_norm):
    g = torch.tensor([3.0, 4.0])
    (p,) = make_params([g.clone()])
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([p], max_norm)
    with pytest.raises(ValueError, match="max_norm"):
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
# the path used on devices other than CPU (host-sync free), exercised with CPU tensors


@settings(max_examples=60, deadline=None)
@given(grads=gradient_sets(nonfinite=True), norm_type=norm_types)
def test_device_path_agrees_with_reference(grads, norm_type):
    p = float(norm_type)
    tensors = [g for g in grads if g is not None]
    assume(tensors)
    total, norms = engine._device_norms(tensors, p, None, True)
    assert norms.shape == (len(tensors),)
    assert norms.dtype == total.dtype == torch.float64
    ref = ref_total(tensors, p)
    for t, n in zip(tensors, norms.tolist()):
        r = ref_tensor_norm(t, p)
        if t.numel() == 0:
            assert n == 0.0
        elif math.isnan(r) or math.isinf(r):
            assert rel_err(n, r) == 0.0
    if math.isnan(ref) or math.isinf(ref):
        assert rel_err(total.item(), ref) == 0.0
        return
    # per-tensor norms are float32-accumulated on this path, as in torch
    nonempty = [t for t in tensors if t.numel() > 0]
    torch_err = rel_err(torch_get_total_norm(nonempty, p).item(), ref) if nonempty else 0.0
    assert rel_err(total.item(), ref) <= rtol_for(tensors, p) + 1.01 * torch_err + 1e-7


def test_device_path_half_precision_and_overflow_across_tensors():
    half = [torch.full((10_000,), 1000.0, dtype=torch.float16)]
    total, _ = engine._device_norms(half, 2.0, None, False)
    assert_close_to_ref(total.item(), 1e5, 1e-5)  # torch's float32 accumulation, not rows
    many = [torch.full((1,), 3e38) for _ in range(4)]  # each norm finite, the sum of squares not
    total, _ = engine._device_norms(many, 2.0, None, False)
    assert_close_to_ref(total.item(), 6e38, 1e-6)
