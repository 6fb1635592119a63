"""Tests for gradcheck_cli.rules: each rule against a direct float64 reimplementation of its
reference formula (hypothesis draws gradient sequences with spikes, non-finite and skipped steps),
state save/restore mid-sequence, and AGC on 1-, 2- and 4-dim tensors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcheck_cli.engine import AGC, AutoClip, ClipStep, ZClip, adaptive_clip_grad_

NAN = math.nan
INF = math.inf
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = [(5, 3), (3,), (), (2, 2, 3, 3)]  # linear weight, bias, scalar gain, conv kernel


# ------------------------------------------------------------------------------------------
# gradient sequences


@st.composite
def step_kinds(draw, n_min=1, n_max=40):
    """A sequence of steps: ('ok', scale), ('spike', scale), ('nan'|'inf'|'skipped', scale)."""
    n = draw(st.integers(n_min, n_max))
    base = draw(st.sampled_from([1e-3, 0.3, 1.0, 5.0, 100.0]))
    steps = []
    for _ in range(n):
        kind = draw(st.sampled_from(["ok"] * 8 + ["spike", "nan", "inf", "skipped"]))
        jitter = draw(st.floats(0.5, 2.0))
        scale = base * jitter * (draw(st.sampled_from([10.0, 1e3, 1e5])) if kind == "spike" else 1)
        steps.append((kind, scale))
    return steps


def make_params(seed: int, dtype=torch.float64) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def step_grads(seed: int, step: int, kind: str, scale: float) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]
    if kind == "nan":
        grads[0][1, 2] = NAN
    elif kind == "inf":
        grads[3].view(-1)[7] = -INF
    return grads


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)


def ref_norm(grads) -> float:
    """Total L2 norm in float64 (fsum of squares; NaN/inf propagate)."""
    values = [x for g in grads for x in g.flatten().tolist()]
    if any(math.isnan(x) for x in values):
        return NAN
    if any(math.isinf(x) for x in values):
        return INF
    return math.sqrt(math.fsum(x * x for x in values))


def assert_grads(params, expected, rtol=1e-12) -> None:
    for p, e in zip(params, expected):
        expected_grad = e.to(p.grad.dtype)
        torch.testing.assert_close(p.grad, expected_grad, rtol=rtol, atol=1e-300, equal_nan=True)


# ------------------------------------------------------------------------------------------
# reference formulas (float64, written from the papers / reference code, independent of rules.py)


class RefAutoClip:
    """Seetharaman et al.'s autoclip_gradient: append the norm, clip to np.percentile."""

    def __init__(self, percentile):
        self.percentile = percentile
        self.history = []

    def step(self, norm):
        self.history.append(norm)
        threshold = float(np.percentile(self.history, self.percentile))
        return threshold, min(threshold / (norm + 1e-6), 1.0)


class RefZClip:
    """bluorion-com/ZClip, zscore mode, adaptive_scaling, transcribed."""

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25):
        self.alpha, self.z_thresh, self.max_grad_norm = alpha, z_thresh, max_grad_norm
        self.eps, self.warmup_steps = eps, warmup_steps
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def step(self, total_norm):
        """Returns the coefficient the gradients are multiplied by."""
        if not self.initialized:
            self.buffer.append(total_norm)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
                self.buffer = []
            if self.max_grad_norm is None:
                return 1.0
            return min(self.max_grad_norm / (total_norm + 1e-6), 1.0)  # torch clip_grad_norm_
        std = self.var**0.5
        z = (total_norm - self.mean) / (std + self.eps)
        clip_val = None
        if z > self.z_thresh:
            eta = z / self.z_thresh
            clip_val = self.mean + (self.z_thresh * std) / eta
        adaptive = clip_val if clip_val is not None else total_norm
        effective = adaptive if self.max_grad_norm is None else min(adaptive, self.max_grad_norm)
        coef = effective / (total_norm + 1e-6) if total_norm > effective else 1.0
        g = clip_val if clip_val is not None else total_norm
        self.mean = self.alpha * self.mean + (1 - self.alpha) * g
        self.var = self.alpha * self.var + (1 - self.alpha) * (g - self.mean) ** 2
        return coef


def ref_unit_norms(t: np.ndarray) -> np.ndarray:
    if t.ndim <= 1:
        return np.array(math.sqrt(math.fsum(float(x) ** 2 for x in t.reshape(-1))))
    rows = t.reshape(t.shape[0], -1)
    norms = [math.sqrt(math.fsum(float(x) ** 2 for x in r)) for r in rows]
    return np.array(norms).reshape((t.shape[0],) + (1,) * (t.ndim - 1))


def ref_agc(weight: np.ndarray, grad: np.ndarray, clip_factor, eps):
    """(clipped gradient, units, units clipped) per the formula of Brock et al. 2021."""
    max_norm = clip_factor * np.maximum(ref_unit_norms(weight), eps)
    g_norm = ref_unit_norms(grad)
    over = g_norm > max_norm
    out = np.where(over, grad * (max_norm / np.maximum(g_norm, 1e-6)), grad)
    return out, over.size, int(over.sum())


# ------------------------------------------------------------------------------------------
# AutoClip


@SETTINGS
@given(steps=step_kinds(), percentile=st.sampled_from([0, 10, 25, 50, 90, 100, 37.5]), seed=st.integers(0, 10_000))
def test_autoclip_matches_reference(steps, percentile, seed):
    rule, ref = AutoClip(percentile), RefAutoClip(percentile)
    params = make_params(seed)
    for i, (kind, scale) in enumerate(steps):
        grads = step_grads(seed, i, kind, scale)
        set_grads(params, grads)
        norm = ref_norm(grads)
        got = rule.clip(params, skipped=(kind == "skipped"))
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(norm, rel=1e-12, nan_ok=True)
        if kind in ("nan", "inf", "skipped"):
            assert rule.last.skipped and rule.last.threshold is None and rule.last.coef is None
            assert_grads(params, grads, rtol=0)  # untouched
            continue
        threshold, coef = ref.step(norm)
        assert not rule.last.skipped
        assert rule.last.threshold == pytest.approx(threshold, rel=1e-12)
        assert rule.last.coef == pytest.approx(coef, rel=1e-12)
        assert_grads(params, [g * coef for g in grads])
    assert rule.history == pytest.approx(sorted(ref.history), rel=1e-12)


def test_autoclip_percentile_interpolates_like_numpy():
    rule = AutoClip(percentile=10)
    norms = [5.0, 1.0, 3.0, 2.0, 4.0]
    (p,) = make_params(0)[:1]
    for k, n in enumerate(norms, 1):
        p.grad = torch.zeros(5, 3, dtype=torch.float64)
        p.grad[0, 0] = n
        rule.clip([p])
        assert rule.last.threshold == np.percentile(norms[:k], 10)
    # 10th percentile of 1..5: rank 0.4 -> 1.4; the current norm 4 is clipped to 1.4
    assert rule.last.threshold == pytest.approx(1.4, rel=1e-15)
    assert p.grad[0, 0].item() == pytest.approx(1.4, rel=1e-6)


# ------------------------------------------------------------------------------------------
# ZClip


@SETTINGS
@given(
    steps=step_kinds(n_min=1, n_max=60),
    warmup=st.sampled_from([1, 3, 10, 25]),
    z_thresh=st.sampled_from([1.0, 2.5, 4.0]),
    alpha=st.sampled_from([0.5, 0.97]),
    max_grad_norm=st.sampled_from([None, 1.0, 50.0, 1e9]),
    seed=st.integers(0, 10_000),
)
def test_zclip_matches_reference(steps, warmup, z_thresh, alpha, max_grad_norm, seed):
    kw = dict(alpha=alpha, z_thresh=z_thresh, max_grad_norm=max_grad_norm, warmup_steps=warmup)
    rule, ref = ZClip(**kw), RefZClip(**kw)
    params = make_params(seed)
    for i, (kind, scale) in enumerate(steps):
        grads = step_grads(seed, i, kind, scale)
        set_grads(params, grads)
        norm = ref_norm(grads)
        got = rule.clip(params, skipped=(kind == "skipped"))
        assert got.item() == pytest.approx(norm, rel=1e-12, nan_ok=True)
        if kind in ("nan", "inf", "skipped"):
            assert rule.last.skipped
            assert_grads(params, grads, rtol=0)
            continue
        coef = ref.step(norm)
        # torch's clamped coefficient also scales norms within 1e-6 of the threshold
        assert_grads(params, [g * coef for g in grads], rtol=2e-6)
        if rule.last.coef is not None:
            assert rule.last.coef == pytest.approx(coef, rel=2e-6)
        else:
            assert coef == 1.0 and max_grad_norm is None
        assert rule.initialized == ref.initialized
        if ref.initialized:
            assert rule.mean == pytest.approx(ref.mean, rel=1e-12)
            # The norms agree to 1e-12 relative, not bit for bit: a variance that is rounding
            # noise (below 1e-12 of mean^2) may come out 0 on one side.
            assert rule.var == pytest.approx(ref.var, rel=1e-12, abs=1e-12 * ref.mean**2 + 1e-300)


def test_zclip_spike_threshold_formula():
    # warmup of 4 constant-ish norms, then a spike: threshold = mu + z_thresh**2 * sigma / z
    rule = ZClip(warmup_steps=4, max_grad_norm=None, alpha=0.9)
    (p,) = make_params(0)[1:2]  # shape (3,)
    for n in [1.0, 2.0, 1.0, 2.0]:
        p.grad = torch.tensor([n, 0.0, 0.0], dtype=torch.float64)
        rule.clip([p])
        assert rule.last.threshold is None and rule.last.coef is None
    assert (rule.mean, rule.var) == (1.5, 0.25)
    p.grad = torch.tensor([10.0, 0.0, 0.0], dtype=torch.float64)
    rule.clip([p])
    z = (10.0 - 1.5) / (0.5 + 1e-6)
    threshold = 1.5 + 2.5**2 * 0.5 / z
    assert rule.last.threshold == pytest.approx(threshold, rel=1e-15)
    assert p.grad[0].item() == pytest.approx(threshold, rel=1e-6)
    mean = 0.9 * 1.5 + 0.1 * threshold
    assert rule.mean == pytest.approx(mean, rel=1e-15)
    assert rule.var == pytest.approx(0.9 * 0.25 + 0.1 * (threshold - mean) ** 2, rel=1e-15)


def test_zclip_defaults_are_the_reference_defaults():
    rule = ZClip()
    assert (rule.alpha, rule.z_thresh, rule.warmup_steps, rule.max_grad_norm, rule.eps) == (0.97, 2.5, 25, 1.0, 1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(alpha=1.5),
        dict(z_thresh=0),
        dict(warmup_steps=0),
        dict(warmup_steps=2.5),
        dict(max_grad_norm=-1),
        dict(eps=NAN),
    ],
)
def test_zclip_rejects_bad_hyperparameters(kw):
    with pytest.raises(ValueError):
        ZClip(**kw)


@pytest.mark.parametrize("bad", [-1, 101, NAN])
def test_autoclip_rejects_bad_percentile(bad):
    with pytest.raises(ValueError, match="percentile"):
        AutoClip(bad)


# ------------------------------------------------------------------------------------------
# state save and restore


def run(rule, params, seed, steps, start=0):
    out = []
    for i, (kind, scale) in enumerate(steps, start):
        set_grads(params, step_grads(seed, i, kind, scale))
        total = rule.clip(params, skipped=(kind == "skipped"))
        out.append(
            (
                total.item(),
                rule.last.threshold,
                rule.last.coef,
                rule.last.clipped_frac,
                [p.grad.clone() for p in params],
            )
        )
    return out


@settings(max_examples=30, deadline=None)
@given(
    steps=step_kinds(n_min=2, n_max=50),
    cut=st.integers(0, 50),
    seed=st.integers(0, 999),
    make=st.sampled_from(
        [
            lambda: AutoClip(25),
            lambda: ZClip(warmup_steps=5, max_grad_norm=30.0),
            lambda: ZClip(warmup_steps=30, z_thresh=1.5),
            lambda: AGC(0.05),
        ]
    ),
)
def test_restored_rule_continues_identically(steps, cut, seed, make):
    cut = min(cut, len(steps))
    params = make_params(seed)
    whole = make()
    expected = run(whole, params, seed, steps)
    first = make()
    run(first, params, seed, steps[:cut])
    state = json.loads(json.dumps(first.state_dict()))  # plain data, survives JSON
    restored = type(first)()  # default hyperparameters, overwritten by the state
    restored.load_state_dict(state)
    got = run(restored, params, seed, steps[cut:], start=cut)
    assert len(got) == len(expected[cut:])
    for a, b in zip(got, expected[cut:]):
        assert a[:4] == b[:4] or (math.isnan(a[0]) and math.isnan(b[0]) and a[1:4] == b[1:4])
        for x, y in zip(a[4], b[4]):
            assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan())
    assert restored.state_dict() == whole.state_dict()


def test_state_dict_is_a_copy_and_survives_torch_save(tmp_path):
    rule = AutoClip(50)
    params = make_params(1)
    run(rule, params, 1, [("ok", 1.0)] * 3)
    state = rule.state_dict()
    state["history"].append(1e9)
    assert len(rule.history) == 3
    torch.save(rule.state_dict(), tmp_path / "s.pt")
    other = AutoClip()
    other.load_state_dict(torch.load(tmp_path / "s.pt"))
    assert other.state_dict() == rule.state_dict() and other.percentile == 50
    z = ZClip(warmup_steps=2)
    run(z, params, 1, [("ok", 1.0)] * 4)
    z2 = copy.deepcopy(ZClip())
    z2.load_state_dict(z.state_dict())
    assert z2.state_dict() == z.state_dict() and z2.initialized


def test_load_state_dict_rejects_inconsistent_state():
    with pytest.raises(ValueError):
        AutoClip().load_state_dict({"percentile": 10, "history": [1.0, NAN]})
    state = ZClip().state_dict()
    state["mean"] = 1.0
    with pytest.raises(ValueError):
        ZClip().load_state_dict(state)


# ------------------------------------------------------------------------------------------
# non-finite and skipped steps never enter the history


@pytest.mark.parametrize("kind", ["nan", "inf", "skipped"])
def test_nonfinite_and_skipped_steps_are_not_recorded(kind):
    params = make_params(3)
    auto, z = AutoClip(), ZClip(warmup_steps=3)
    for rule in (auto, z):
        run(rule, params, 3, [("ok", 1.0)] * 5)
        before = rule.state_dict()
        grads = step_grads(3, 99, kind, 1e4)
        set_grads(params, grads)
        total = rule.clip(params, skipped=(kind == "skipped"))
        assert rule.state_dict() == before
        assert rule.last.skipped and rule.last.threshold is None and rule.last.coef is None
        assert_grads(params, grads, rtol=0)
        if kind == "nan":
            assert math.isnan(total.item())
        elif kind == "inf":
            assert total.item() == INF
        else:
            assert total.item() == pytest.approx(ref_norm(grads), rel=1e-12)
    # the warmup buffer, too
    z = ZClip(warmup_steps=3)
    run(z, params, 3, [("ok", 1.0), (kind, 1.0), ("ok", 1.0)])
    assert not z.initialized and len(z.state_dict()["buffer"]) == 2


def test_rules_accept_a_model_and_a_generator():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)).double()
    model(torch.randn(8, 3, dtype=torch.float64)).pow(2).sum().mul(1e3).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    rule = AutoClip(0)
    total = rule.clip(model)
    assert total.item() == pytest.approx(ref_norm(grads), rel=1e-12)
    # the first step's threshold is its own norm: coefficient norm / (norm + 1e-6)
    assert rule.last.threshold == total.item()
    z = ZClip()
    z.clip(p for p in model.parameters())
    assert z.last.threshold == 1.0


# ------------------------------------------------------------------------------------------
# AGC


@st.composite
def agc_case(draw):
    seed = draw(st.integers(0, 10_000))
    gen = torch.Generator().manual_seed(seed)
    shapes = draw(
        st.lists(st.sampled_from([(), (1,), (7,), (4, 6), (1, 9), (3, 2, 3, 3), (2, 1, 1, 5)]), min_size=1, max_size=5)
    )
    params, grads = [], []
    for s in shapes:
        w_scale = draw(st.sampled_from([0.0, 1e-5, 0.1, 1.0, 30.0]))
        g_scale = draw(st.sampled_from([1e-8, 1e-4, 1e-2, 1.0, 100.0]))
        w = torch.randn(s, generator=gen, dtype=torch.float64) * w_scale
        g = torch.randn(s, generator=gen, dtype=torch.float64) * g_scale
        if g.ndim >= 2 and draw(st.booleans()):
            g[0] = 0.0  # a unit without gradient
        params.append(torch.nn.Parameter(w))
        grads.append(g)
    return params, grads


@SETTINGS
@given(
    case=agc_case(), clip_factor=st.sampled_from([0.0, 0.001, 0.01, 0.1, 1.0]), eps=st.sampled_from([1e-3, 1e-6, 0.5])
)
def test_agc_matches_reference(case, clip_factor, eps):
    params, grads = case
    set_grads(params, grads)
    rule = AGC(clip_factor, eps)
    total = rule.clip(params)
    assert total.item() == pytest.approx(ref_norm(grads), rel=1e-12)
    units = clipped = 0
    for p, g in zip(params, grads):
        expected, n, k = ref_agc(p.detach().numpy(), g.numpy(), clip_factor, eps)
        units, clipped = units + n, clipped + k
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-12, atol=0)
    assert rule.last.clipped_frac == clipped / units
    assert rule.last.threshold is None and rule.last.coef is None and not rule.last.skipped


def test_agc_per_unit_on_1_2_and_4_dim_tensors():
    bias = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||W|| = 5, max = 0.05
    bias.grad = torch.tensor([0.3, 0.4])  # ||G|| = 0.5 -> scaled by 0.1
    lin = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    lin.grad = torch.tensor([[0.0, 0.01], [1.0, 0.0]])  # row 0 ok; row 1: max = 1e-5
    conv = torch.nn.Parameter(torch.ones(2, 1, 2, 2))  # each channel ||W|| = 2, max = 0.02
    conv.grad = torch.full((2, 1, 2, 2), 0.1)  # channel norms 0.2
    conv.grad[1] = 0.005  # channel norm 0.01 < 0.02: untouched
    rule = AGC()
    total = rule.clip([bias, lin, conv])
    expected_total = math.sqrt(0.25 + 0.01**2 + 1.0 + 4 * 0.01 + 4 * 0.005**2)
    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    torch.testing.assert_close(bias.grad, torch.tensor([0.03, 0.04]))
    torch.testing.assert_close(lin.grad, torch.tensor([[0.0, 0.01], [1e-5, 0.0]]))
    torch.testing.assert_close(conv.grad[0], torch.full((1, 2, 2), 0.01))
    torch.testing.assert_close(conv.grad[1], torch.full((1, 2, 2), 0.005))
    assert rule.last.clipped_frac == 3 / 5  # bias, lin row 1, conv channel 0 of 5 units


def test_adaptive_clip_grad_function_equals_the_object_and_timm_defaults():
    a, b = make_params(5), make_params(5)
    grads = step_grads(5, 0, "ok", 1.0)
    set_grads(a, grads)
    set_grads(b, grads)
    total = adaptive_clip_grad_(a)
    rule = AGC()
    assert (rule.clip_factor, rule.eps) == (0.01, 1e-3)
    assert torch.equal(total, rule.clip(b))
    for x, y in zip(a, b):
        assert torch.equal(x.grad, y.grad)
    assert 0 < rule.last.clipped_frac <= 1


def test_agc_half_precision_and_overflowing_units():
    w = torch.nn.Parameter(torch.ones(2, 4, dtype=torch.float16))
    w.grad = torch.full((2, 4), 1000.0, dtype=torch.float16)  # fp16 squares overflow
    AGC(0.01).clip([w])
    # each row: ||W|| = 2, max = 0.02, ||G|| = 2000: scaled by 1e-5 -> 0.01
    torch.testing.assert_close(w.grad.float(), torch.full((2, 4), 0.01), rtol=1e-3, atol=0)
    big = torch.nn.Parameter(torch.ones(2, 4))
    big.grad = torch.full((2, 4), 1e20)  # float32 squares overflow: the norm is 2e20, not inf
    big.grad[1] = 1.0
    AGC(0.01).clip([big])
    torch.testing.assert_close(big.grad[0], torch.full((4,), 0.01), rtol=1e-6, atol=0)
    torch.testing.assert_close(big.grad[1], torch.full((4,), 0.01), rtol=1e-6, atol=0)


def test_agc_applies_nothing_when_the_total_norm_is_not_finite():
    w = torch.nn.Parameter(torch.ones(2, 2))
    g = torch.tensor([[NAN, 1.0], [5.0, 5.0]])
    w.grad = g.clone()
    rule = AGC()
    assert math.isnan(rule.clip([w]).item())
    assert rule.last.skipped and rule.last.clipped_frac is None
    torch.testing.assert_close(w.grad, g, equal_nan=True)


def test_clip_step_is_frozen():
    step = ClipStep(torch.tensor(1.0), threshold=2.0)
    with pytest.raises(AttributeError):
        step.threshold = 3.0
