"""The engine's path for small models on CPU (``engine.cpu._cpu_small_norms``): L1 and L2 norms of
models with at most ``_SMALL_MODEL`` gradient elements, none float64, reduced once per tensor in
float64. Checked against a float64 reference computed here, against the general CPU path, and
on the edges of when it applies. Also its host form (``host_grad_norms``, Python floats for the
monitor) and the clip coefficient computed on the host (``host_clip_coef``), each bit for bit
against the tensor form they stand in for."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli import engine
from gradcheck_cli.engine import cpu as engine_cpu

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(grads: list[torch.Tensor], p: float) -> tuple[float, list[float]]:
    """Per-tensor and total p-norms from the elements in float64 (exact enough: no float32
    value squared leaves float64's normal range)."""
    norms = [float(g.double().abs().pow(p).sum() ** (1.0 / p)) for g in grads]
    total = sum(n**p for n in norms) ** (1.0 / p)
    return total, norms


@st.composite
def small_models(draw):
    """Lists of short tensors of mixed half/float32 dtypes whose magnitudes span 1e-30 to 1e30
    (float16 ones within its range), subnormal float32 values included."""
    n = draw(st.integers(1, 6))
    grads = []
    for _ in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        size = draw(st.integers(0, 40))
        exponent_range = (-7, 4) if dtype == torch.float16 else (-44, 30)
        exponents = draw(st.lists(st.integers(*exponent_range), min_size=size, max_size=size))
        signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=size, max_size=size))
        values = [s * 1.5 * 10.0**e for s, e in zip(signs, exponents)]
        grads.append(torch.tensor(values, dtype=torch.float32).to(dtype))
    return grads


@settings(max_examples=150, deadline=None)
@given(grads=small_models(), p=st.sampled_from([1.0, 2.0]))
def test_small_model_norms_equal_the_float64_reference(grads, p):
    assert engine_cpu._cpu_small_model(grads, p)
    total, norms = engine_cpu._cpu_small_norms(grads, p)
    want_total, want_norms = reference(grads, p)
    assert norms.dtype == torch.float64 and total.dtype == torch.float64
    assert norms.tolist() == pytest.approx(want_norms, rel=1e-12, abs=0.0)
    assert float(total) == pytest.approx(want_total, rel=1e-12, abs=0.0)


@settings(max_examples=60, deadline=None)
@given(grads=small_models(), p=st.sampled_from([1.0, 2.0]))
def test_small_model_path_agrees_with_the_general_path(grads, p):
    fast = engine.measure_grad_norms(grads_as_params(grads), p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_cpu, "_SMALL_MODEL", -1)  # the general CPU path
        general = engine.measure_grad_norms(grads_as_params(grads), p)
    assert fast.total_norm.dtype == general.total_norm.dtype
    # the general path sums short tensors in float32, a few float32 ulps from the exact value
    # (e.g. 33.600006 for an exact 33.6); the float64 reference test above pins the small path
    assert float(fast.total_norm) == pytest.approx(float(general.total_norm), rel=1e-6, abs=0.0)
    assert fast.norms.tolist() == pytest.approx(general.norms.tolist(), rel=1e-6, abs=0.0)


def grads_as_params(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    params = []
    for g in grads:
        prm = torch.zeros_like(g).requires_grad_()
        prm.grad = g
        params.append(prm)
    return params


def test_the_path_applies_up_to_its_size_and_only_to_l1_l2_without_float64():
    limit = engine_cpu._SMALL_MODEL
    at_limit = [torch.ones(limit - 1), torch.ones(1)]
    over = [torch.ones(limit), torch.ones(1)]
    assert engine_cpu._cpu_small_model(at_limit, 2.0) and engine_cpu._cpu_small_model(at_limit, 1.0)
    assert not engine_cpu._cpu_small_model(over, 2.0)
    assert not engine_cpu._cpu_small_model([torch.ones(3)], 3.0)
    assert not engine_cpu._cpu_small_model([torch.ones(3)], math.inf)
    assert not engine_cpu._cpu_small_model([torch.ones(3), torch.ones(2, dtype=torch.float64)], 2.0)


def test_get_total_norm_and_clip_take_the_small_path(monkeypatch):
    calls = []
    original = engine_cpu._cpu_small_norms

    def spy(grads, p):
        calls.append(p)
        return original(grads, p)

    monkeypatch.setattr(engine_cpu, "_cpu_small_norms", spy)
    g = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    assert float(engine.get_total_norm(g, 2.0)) == 13.0
    prm = torch.zeros(2, requires_grad=True)
    prm.grad = torch.tensor([3.0, 4.0])
    total = engine.clip_grad_norm_([prm], 1.0)
    assert float(total) == 5.0
    assert prm.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-6)
    assert calls == [2.0, 2.0]


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_inf_and_nan_elements_give_inf_and_nan_norms(p):
    grads = [torch.tensor([1.0, math.inf]), torch.tensor([2.0]), torch.tensor([math.nan, 1.0])]
    total, norms = engine_cpu._cpu_small_norms(grads, p)
    assert norms[0] == math.inf and norms[1] == 2.0 and math.isnan(norms[2])
    assert math.isnan(total)
    total, norms = engine_cpu._cpu_small_norms(grads[:2], p)
    assert total == math.inf


def test_float32_values_whose_squares_overflow_float32_are_exact():
    g = [torch.tensor([3e30, 4e30], dtype=torch.float32), torch.tensor([1e-40, 1e-40], dtype=torch.float32)]
    total, norms = engine_cpu._cpu_small_norms(g, 2.0)
    want = math.hypot(float(g[0][0]), float(g[0][1]))
    assert float(norms[0]) == pytest.approx(want, rel=1e-15)
    assert float(norms[1]) == pytest.approx(math.sqrt(2) * float(g[1][0]), rel=1e-15)
    assert float(total) == pytest.approx(want, rel=1e-15)


# ---- the same numbers as Python floats (``host_grad_norms``), and the host clip coefficient ----


@settings(max_examples=150, deadline=None)
@given(grads=small_models(), p=st.sampled_from([1.0, 2.0]), poison=st.sampled_from([None, math.nan, math.inf]))
def test_host_norms_are_measure_grad_norms_bit_for_bit(grads, p, poison):
    """The monitor reads these floats instead of ``measure_grad_norms``' tensors: they must be
    the same float32 numbers, non-finite gradients included."""
    if poison is not None and grads[0].numel():
        grads[0].view(-1)[0] = poison
    host = engine.host_grad_norms(grads, p)
    assert host is not None
    total, norms = host
    gn = engine.measure_grad_norms(grads_as_params(grads), p)
    assert gn.total_norm.dtype == torch.float32 and gn.norms.dtype == torch.float32
    same = lambda a, b: a == b or (math.isnan(a) and math.isnan(b))  # noqa: E731
    assert same(total, gn.total_norm.item()), (total, gn.total_norm.item())
    assert len(norms) == len(grads) and all(same(a, b) for a, b in zip(norms, gn.norms.tolist()))


def test_host_norms_decline_what_the_small_path_does_not_take():
    small = [torch.ones(3)]
    root3 = torch.tensor(math.sqrt(3.0), dtype=torch.float32).item()  # float32 results
    assert engine.host_grad_norms(small, 2.0) == (root3, [root3])
    assert engine.host_grad_norms(small, 1.0) == (3.0, [3.0])
    assert engine.host_grad_norms(small, math.inf) is None  # p other than 1 and 2
    assert engine.host_grad_norms([torch.ones(3, dtype=torch.float64)], 2.0) is None  # float64
    assert engine.host_grad_norms([torch.ones(engine_cpu._SMALL_MODEL + 1)], 2.0) is None  # too big
    assert engine.host_grad_norms([torch.ones(3).to_sparse()], 2.0) is None  # not dense
    assert engine.host_grad_norms([], 2.0) is None


def _torch_coef(max_norm: float, total: float, dtype: torch.dtype) -> float:
    """torch's own arithmetic: ``clamp(max_norm / (total_norm + 1e-6), max=1)`` on a 0-dim tensor."""
    t = torch.tensor(total, dtype=dtype)
    return torch.clamp(max_norm / (t + 1e-6), max=1.0).item()


_EDGES = [0.0, 1e-45, 1e-40, 1e-7, 1e-6, 1.0, 3.4028234663852886e38, 1e39, 1e300, math.inf, math.nan]


@settings(max_examples=400, deadline=None)
@given(
    max_norm=st.one_of(st.floats(0, 1e10), st.sampled_from([0.0, 1e-45, 1e-6, 3.5e38, 1e300, math.inf])),
    total=st.one_of(st.floats(0, 1e39, allow_infinity=False), st.sampled_from(_EDGES), st.floats(0, 5)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_host_clip_coefficient_is_torchs_bit_for_bit(max_norm, total, dtype):
    if dtype == torch.float32:
        total = torch.tensor(total, dtype=torch.float32).item()  # a float32 total, as the engine's
    want = _torch_coef(max_norm, total, dtype)
    got = engine.host_clip_coef(max_norm, total, dtype)
    assert got == want or (math.isnan(got) and math.isnan(want)), (max_norm, total, dtype, got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_host_clip_coefficient_of_other_dtypes_uses_torch(dtype):
    for total in (0.5, 3.0, 70000.0):
        assert engine.host_clip_coef(1.0, total, dtype) == _torch_coef(1.0, total, dtype)


def test_clip_grads_with_host_norm_scales_like_clip_grads_with_norm():
    torch.manual_seed(0)
    grads = [torch.randn(5), torch.randn(3, 2)]
    total = engine.get_total_norm(grads).item()
    for max_norm in (0.1, total * 2, math.inf):
        a = [g.clone() for g in grads]
        b = [g.clone() for g in grads]
        coef = engine.clip_grads_with_host_norm_(a, max_norm, total, torch.float32)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in b]
        for prm, g in zip(params, b):
            prm.grad = g
        engine.clip_grads_with_norm_(params, max_norm, torch.tensor(total))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert coef == (min(engine.host_clip_coef(max_norm, total), 1.0) if math.isfinite(max_norm) else 1.0)


def test_clip_grads_with_host_norm_checks_its_arguments_as_clip_grads_with_norm():
    g = [torch.ones(3)]
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        engine.clip_grads_with_host_norm_(g, -1.0, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="foreach=True was passed, but can't use the foreach API on meta tensors"):
        engine.clip_grads_with_host_norm_([torch.ones(3, device="meta")], 1.0, 1.0, torch.float32, foreach=True)
    assert torch.equal(g[0], torch.ones(3))


@pytest.mark.parametrize("total", [math.inf, math.nan])
def test_raise_if_nonfinite_raises_torchs_error(total):
    prm = torch.nn.Parameter(torch.zeros(2))
    prm.grad = torch.tensor([total, 1.0])
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([prm], 1.0, 2.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        engine.raise_if_nonfinite(total, 2.0)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError):
        engine.raise_if_nonfinite(torch.tensor(total), 2.0)
    engine.raise_if_nonfinite(1.0, 2.0)
    engine.raise_if_nonfinite(torch.tensor(0.5), 2.0)


def test_host_norms_take_exactly_the_small_path_size():
    limit = engine_cpu._SMALL_MODEL
    assert engine.host_grad_norms([torch.ones(limit)], 1.0) == (float(limit), [float(limit)])
    assert engine.host_grad_norms([torch.ones(limit // 2), torch.ones(limit // 2)], 1.0) is not None
    # every tensor counts: two that fit alone do not fit together
    assert engine.host_grad_norms([torch.ones(limit // 2), torch.ones(limit // 2 + 1)], 1.0) is None
    assert engine.host_grad_norms([torch.ones(limit // 2 + 1), torch.ones(3)], 1.0) is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("total", [0.0, 1e-6, 3e-6])
def test_host_clip_coefficient_of_other_dtypes_near_zero(dtype, total):
    """Where the 1e-6 in the denominator matters (it is below these dtypes' resolution at 1)."""
    want = _torch_coef(1e-6, total, dtype)
    assert engine.host_clip_coef(1e-6, total, dtype) == want


def test_clip_grads_with_host_norm_edge_cases():
    g = [torch.tensor([3.0, -4.0])]
    # max_norm inf leaves the gradients alone, even with an inf total (torch would NaN them)
    assert engine.clip_grads_with_host_norm_(g, math.inf, math.inf, torch.float32) == 1.0
    assert torch.equal(g[0], torch.tensor([3.0, -4.0]))
    assert engine.clip_grads_with_host_norm_([], 0.1, 5.0, torch.float32) == 1.0  # nothing to clip
    # the coefficient is computed in the total's dtype, as clip_grads_with_norm_ does
    total = 5.000000123
    for dtype in (torch.float64, torch.float32):
        a = [torch.tensor([3.0, -4.0], dtype=torch.float64)]
        prm = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        prm.grad = a[0].clone()
        coef = engine.clip_grads_with_host_norm_(a, 1.0, total, dtype)
        engine.clip_grads_with_norm_([prm], 1.0, torch.tensor(total, dtype=dtype))
        assert torch.equal(a[0], prm.grad) and coef == engine.host_clip_coef(1.0, total, dtype)
    f64 = engine.host_clip_coef(1.0, total, torch.float64)
    assert f64 != engine.host_clip_coef(1.0, total, torch.float32)  # the dtype matters here
