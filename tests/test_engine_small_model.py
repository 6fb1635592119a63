"""The engine's path for small models on CPU (``engine._cpu_small_norms``): L1 and L2 norms of
models with at most ``_SMALL_MODEL`` gradient elements, none float64, reduced once per tensor in
float64. Checked against a float64 reference computed here, against the general CPU path, and
on the edges of when it applies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli import engine

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
    assert engine._cpu_small_model(grads, p)
    total, norms = engine._cpu_small_norms(grads, p)
    want_total, want_norms = reference(grads, p)
    assert norms.dtype == torch.float64 and total.dtype == torch.float64
    assert norms.tolist() == pytest.approx(want_norms, rel=1e-12, abs=0.0)
    assert float(total) == pytest.approx(want_total, rel=1e-12, abs=0.0)


@settings(max_examples=60, deadline=None)
@given(grads=small_models(), p=st.sampled_from([1.0, 2.0]))
def test_small_model_path_agrees_with_the_general_path(grads, p):
    fast = engine.measure_grad_norms(grads_as_params(grads), p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_SMALL_MODEL", -1)  # the general CPU path
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
    limit = engine._SMALL_MODEL
    at_limit = [torch.ones(limit - 1), torch.ones(1)]
    over = [torch.ones(limit), torch.ones(1)]
    assert engine._cpu_small_model(at_limit, 2.0) and engine._cpu_small_model(at_limit, 1.0)
    assert not engine._cpu_small_model(over, 2.0)
    assert not engine._cpu_small_model([torch.ones(3)], 3.0)
    assert not engine._cpu_small_model([torch.ones(3)], math.inf)
    assert not engine._cpu_small_model([torch.ones(3), torch.ones(2, dtype=torch.float64)], 2.0)


def test_get_total_norm_and_clip_take_the_small_path(monkeypatch):
    calls = []
    original = engine._cpu_small_norms

    def spy(grads, p):
        calls.append(p)
        return original(grads, p)

    monkeypatch.setattr(engine, "_cpu_small_norms", spy)
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
    total, norms = engine._cpu_small_norms(grads, p)
    assert norms[0] == math.inf and norms[1] == 2.0 and math.isnan(norms[2])
    assert math.isnan(total)
    total, norms = engine._cpu_small_norms(grads[:2], p)
    assert total == math.inf


def test_float32_values_whose_squares_overflow_float32_are_exact():
    g = [torch.tensor([3e30, 4e30], dtype=torch.float32), torch.tensor([1e-40, 1e-40], dtype=torch.float32)]
    total, norms = engine._cpu_small_norms(g, 2.0)
    want = math.hypot(float(g[0][0]), float(g[0][1]))
    assert float(norms[0]) == pytest.approx(want, rel=1e-15)
    assert float(norms[1]) == pytest.approx(math.sqrt(2) * float(g[1][0]), rel=1e-15)
    assert float(total) == pytest.approx(want, rel=1e-15)
