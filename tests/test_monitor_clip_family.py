"""GradMonitor with every way a loop reaches torch's clipping family (the split
``get_total_norm`` + ``clip_grads_with_norm_`` that accelerate calls, torch's deprecated
``clip_grad_norm``, references taken before the monitor started) and with loops that leave a
step without ``optimizer.step()``. References: float64 norms of the gradients at the clip call,
and the same loop run without a monitor."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from gradcheck_cli import engine
from gradcheck_cli.monitor import GradMonitor

# Taken at import, before any monitor starts: a module the monitor does not rebind holds
# torch's own functions, as a library that imported them at its top would.
TORCH_CLIP = torch.nn.utils.clip_grad_norm_
TORCH_DEPRECATED_CLIP = torch.nn.utils.clip_grad_norm
try:  # names imported at the top of a training module, before any monitor exists
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
except ImportError:  # torch < 2.6
    clip_grads_with_norm_ = get_total_norm = None

needs_split = pytest.mark.skipif(
    not hasattr(torch.nn.utils, "get_total_norm"), reason="torch's split clip API arrived in torch 2.6"
)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def f64_norm(model, p=2.0) -> float:
    return float(torch.linalg.vector_norm(torch.cat([q.grad.double().flatten() for q in model.parameters()]), p))


def split_clip(get_total_norm, clip_grads_with_norm_):
    """accelerate's way: measure the gradients, then scale the parameters by that total."""

    def clip(params, max_norm, norm_type=2.0):
        params = list(params)
        total = get_total_norm([q.grad for q in params], norm_type)
        clip_grads_with_norm_(params, max_norm, total)
        return total

    return clip


def run_loop(model, opt, data, clip, max_norm, norm_type=2.0, monitor=None):
    """A plain loop; returns the float64 pre-clip norm of every step."""
    norms = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.record_loss(loss)
        norms.append(f64_norm(model, norm_type))
        clip(model.parameters(), max_norm, norm_type)
        opt.step()
    return norms


def the_split_functions():
    return split_clip(torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_)


@needs_split
@pytest.mark.parametrize("clip_choice", ["engine", "torch"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_the_split_api_is_measured_before_clipping_and_served_by_the_chosen_clipper(tmp_path, clip_choice, norm_type):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=tmp_path, clip=clip_choice) as monitor:
        # looked up while the monitor runs, as accelerate does inside its clip_grad_norm_
        ref = run_loop(model, opt, batches(8), lambda *a: the_split_functions()(*a), 0.05, norm_type, monitor)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["grad_norm"].tolist() == pytest.approx(ref, rel=1e-6)
    assert (steps["clip_coef"] < 1).all()
    expected = [min(0.05 / (n + 1e-6), 1.0) for n in ref]
    assert steps["clip_coef"].tolist() == pytest.approx(expected, rel=1e-5)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["max_norm"].tolist() == [0.05] and summary["status"].tolist() == ["stable"]
    # The training: torch's split functions (clip="torch"), the engine's (clip="engine").
    bare = make_model()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.05)
    if clip_choice == "torch":
        reference = split_clip(torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_)
    else:
        reference = split_clip(engine.get_total_norm, engine.clip_grads_with_norm_)
    run_loop(bare, bare_opt, batches(8), reference, 0.05, norm_type)
    for a, b in zip(model.parameters(), bare.parameters()):
        assert torch.equal(a, b)
    assert torch.nn.utils.get_total_norm is torch.nn.utils.clip_grad.__dict__.get(
        "get_total_norm", torch.nn.utils.clip_grad.__dict__.get("_get_total_norm")
    )  # restored on exit


@needs_split
def test_names_imported_from_torch_before_the_monitor_are_measured(tmp_path):
    """``from torch.nn.utils import get_total_norm`` at the top of the training module (this
    one: the monitor rebinds names in the module that enters it) and torch's own
    ``clip_grad_norm_`` held by a library the monitor cannot see (it calls the split functions
    through torch's module, which the monitor patches)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    held = {"clip": TORCH_CLIP}  # not a module namespace: never rebound
    with GradMonitor(model, opt, out=tmp_path, clip="torch") as monitor:
        # the module-level names, looked up at each call as a training module's code would
        ref = run_loop(
            model, opt, batches(3), lambda *a: split_clip(get_total_norm, clip_grads_with_norm_)(*a), 0.1, 2.0, monitor
        )
        ref += run_loop(model, opt, batches(3), lambda *a: held["clip"](*a), 0.1, 2.0, monitor)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["grad_norm"].tolist() == pytest.approx(ref, rel=1e-6)
    assert (steps["clip_coef"] < 1).all() and len(steps) == 6


def test_the_deprecated_clip_grad_norm_and_the_module_path_are_measured(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=tmp_path) as monitor:
        with pytest.warns(FutureWarning):
            ref = run_loop(model, opt, batches(2), lambda *a: TORCH_DEPRECATED_CLIP(*a), 0.1, 2.0, monitor)
        ref += run_loop(model, opt, batches(2), lambda *a: torch.nn.utils.clip_grad.clip_grad_norm_(*a), 0.1, 2.0)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["grad_norm"].tolist() == pytest.approx(ref, rel=1e-6)
    assert (steps["clip_coef"] < 1).all()


# ---- loops that leave a step without optimizer.step() -------------------------------------------


def poisoned(model, name, at_step, counter):
    param = dict(model.named_parameters())[name]
    param.register_hook(lambda g: torch.full_like(g, math.nan) if counter[0] == at_step else g)


def skipping_loop(tmp_path, how, *, set_to_none=True, split=False, n=6, bad=3):
    """The common guard: ``n = clip(...); if not torch.isfinite(n): continue`` (or ``break``)."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    counter = [1]
    poisoned(model, "2.weight", bad, counter)
    stepped = []
    with GradMonitor(model, opt, out=tmp_path) as monitor:
        for x, y in batches(n):
            opt.zero_grad(set_to_none=set_to_none)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.record_loss(loss)
            norm = (the_split_functions() if split else torch.nn.utils.clip_grad_norm_)(model.parameters(), 1.0)
            counter[0] += 1
            if not torch.isfinite(norm):
                if how == "break":
                    break
                continue
            opt.step()
            stepped.append(counter[0] - 1)
    return pd.read_csv(tmp_path / "summary.csv"), pd.read_csv(tmp_path / "steps.csv"), stepped


@pytest.mark.parametrize("how", ["continue", "break"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_step_the_loop_skips_on_a_non_finite_norm_is_recorded_and_judged(tmp_path, how, set_to_none):
    summary, steps, stepped = skipping_loop(tmp_path, how, set_to_none=set_to_none)
    row = summary.iloc[0]
    assert row["status"] == "non_finite"
    assert row["nan_step"] == 3 and row["nan_source"] == "backward" and row["nan_param"] == "2.weight"
    expected_steps = 6 if how == "continue" else 3
    assert steps["step"].tolist() == list(range(1, expected_steps + 1))
    assert steps["skipped"].tolist() == [1 if s == 3 else 0 for s in range(1, expected_steps + 1)]
    assert math.isnan(steps.loc[2, "grad_norm"]) and steps.loc[[0, 1], "grad_norm"].notna().all()
    if how == "continue":
        assert stepped == [1, 2, 4, 5, 6] and steps.loc[3:, "grad_norm"].map(math.isfinite).all()
    assert row["skipped_steps"] == 1 and row["first_skip"] == 3


@needs_split
def test_a_skipped_step_is_found_with_the_split_api_too(tmp_path):
    summary, steps, _ = skipping_loop(tmp_path, "continue", split=True)
    assert summary.iloc[0]["status"] == "non_finite" and summary.iloc[0]["nan_step"] == 3
    assert steps["skipped"].tolist() == [0, 0, 1, 0, 0, 0]


def test_two_clip_calls_in_one_step_are_one_step(tmp_path):
    """No false skip: a step that clips twice (and measures once) is one step."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=tmp_path):
        for x, y in batches(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(model[0].parameters(), 0.5)
            opt.step()
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["step"].tolist() == [1, 2, 3, 4] and steps["skipped"].eq(0).all()


def test_accumulation_after_a_skipped_step_measures_the_new_step(tmp_path):
    """A loop that skips a step and then accumulates two micro-batches: the new step's norm is
    of its own gradients, not the abandoned step's."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(5)
    ref = []
    with GradMonitor(model, opt, out=tmp_path):
        opt.zero_grad()
        nn.functional.mse_loss(model(data[0][0]), data[0][1]).backward()
        ref.append(f64_norm(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # then the loop gives up on it
        opt.zero_grad()
        for x, y in data[1:3]:
            (nn.functional.mse_loss(model(x), y) / 2).backward()
        ref.append(f64_norm(model))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert steps["skipped"].tolist() == [1, 0]
    assert steps["grad_norm"].tolist() == pytest.approx(ref, rel=1e-6)
    assert pd.read_csv(tmp_path / "summary.csv").iloc[0]["status"] == "stable"
