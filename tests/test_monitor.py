"""GradMonitor on real plain training loops, against norms computed here in float64 from the
gradients at the moment the loop clips (or steps)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import clip_grad_norm_  # imported by name, as many scripts do

from gradcheck_cli import engine
from gradcheck_cli.monitor import GradMonitor, NonFiniteError
from gradcheck_cli.results import LAYER_COLUMNS, STEP_COLUMNS, SUMMARY_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def f64_norm(model, p: float = 2.0) -> float:
    grads = [q.grad.detach().double().flatten() for q in model.parameters() if q.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads), p))


def f64_param_norms(model) -> dict[str, float]:
    return {n: float(torch.linalg.vector_norm(q.grad.double())) for n, q in model.named_parameters()}


def poison(model, name: str, at_step: int, counter: list[int]):
    """Make ``name``'s gradient NaN in the backward pass of optimizer step ``at_step``."""
    param = dict(model.named_parameters())[name]
    param.register_hook(lambda g: torch.full_like(g, math.nan) if counter[0] == at_step else g)


def read(out: Path):
    """The files as pandas reads them, floats exactly as written (pandas before 3.1 rounds the
    last bits of some values unless asked for round trips)."""
    return tuple(
        pd.read_csv(out / name, float_precision="round_trip")
        for name in ("summary.csv", "steps.csv", "layers.csv", "histograms.csv")
    )


def monitored(tmp_path, max_norm=None, norm_type=2.0, accumulate=1, n=12, **kw):
    model = make_model()
    batches = data(n)
    out = tmp_path / "mon"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=out, **kw) as monitor:
        ref = _train_with(model, opt, batches, monitor, max_norm, norm_type, accumulate)
    return model, ref, out, monitor


def _train_with(model, opt, batches, monitor, max_norm, norm_type, accumulate, nan=None, clip=None):
    """A plain loop; returns, per optimizer step, (mean loss, float64 pre-clip norm in
    ``norm_type``, float64 L2 norm of each parameter's gradient). ``clip``: the clipping
    function (default: this module's name ``clip_grad_norm_``, which the monitor rebinds)."""
    counter = [1]
    if nan is not None:
        poison(model, nan[1], nan[0], counter)
    ref = []
    for i in range(0, len(batches), accumulate):
        opt.zero_grad()
        losses = []
        for x, y in batches[i : i + accumulate]:
            loss = nn.functional.mse_loss(model(x), y)
            (loss / accumulate).backward()
            losses.append(loss.item())
            if monitor is not None:
                monitor.record_loss(loss)
        ref.append((sum(losses) / len(losses), f64_norm(model, norm_type), f64_param_norms(model)))
        if max_norm is not None:
            (clip or clip_grad_norm_)(model.parameters(), max_norm, norm_type)
        opt.step()
        counter[0] += 1
    return ref


@pytest.mark.parametrize("clip", ["engine", "torch"])
@pytest.mark.parametrize("max_norm,norm_type", [(None, 2.0), (0.5, 2.0), (0.3, math.inf), (100.0, 1.0), (0.05, 1.0)])
def test_recorded_pre_clip_norms_match_float64_and_training_is_unchanged(tmp_path, max_norm, norm_type, clip):
    model, ref, out, _ = monitored(tmp_path, max_norm, norm_type, clip=clip)
    # The training is bit-identical to the same loop clipping with the monitor's clipper:
    # torch's function with clip="torch" (the unmonitored loop itself), gradclip's engine with
    # clip="engine" (the default; one pass over the gradients per step).
    bare = make_model()
    bare_opt = torch.optim.SGD(bare.parameters(), lr=0.05)
    reference_clip = engine.clip_grad_norm_ if clip == "engine" else torch.nn.utils.clip_grad_norm_
    _train_with(bare, bare_opt, data(12), None, max_norm, norm_type, 1, clip=reference_clip)
    for a, b in zip(model.parameters(), bare.parameters()):
        assert torch.equal(a, b)

    summary, steps, layers, hist = read(out)
    assert list(summary.columns) == SUMMARY_COLUMNS and list(steps.columns) == STEP_COLUMNS
    assert list(layers.columns) == LAYER_COLUMNS
    assert steps["run"].eq("monitor").all() and steps["step"].tolist() == list(range(1, 13))
    assert steps["loss"].tolist() == pytest.approx([r[0] for r in ref], rel=1e-6)
    assert steps["grad_norm"].tolist() == pytest.approx([r[1] for r in ref], rel=1e-6)
    if max_norm is None:
        assert steps["clip_coef"].eq(1.0).all()
    else:
        expected = [min(max_norm / (r[1] + 1e-6), 1.0) for r in ref]
        assert steps["clip_coef"].tolist() == pytest.approx(expected, rel=1e-6)
    assert steps["lr"].eq(0.05).all() and steps["skipped"].eq(0).all()
    # per-parameter norms (4 tensors: one group each), in the run's norm type
    for step, (_, _, per_param) in enumerate(ref, start=1):
        rows = layers[layers["step"] == step]
        assert rows["param"].tolist() == NAMES
        if norm_type == 2.0:
            assert rows["grad_norm"].tolist() == pytest.approx([per_param[n] for n in NAMES], rel=1e-6)
    row = summary.iloc[0]
    assert row["run"] == "monitor" and row["status"] == "stable" and row["steps"] == 12
    assert pd.isna(row["max_norm"]) if max_norm is None else row["max_norm"] == max_norm
    assert str(row["norm_type"]) == ("inf" if norm_type == math.inf else f"{norm_type:g}")
    assert row["skipped_steps"] == 0 and pd.isna(row["first_skip"])
    assert hist["count"].sum() == 12
    assert torch.nn.utils.clip_grad_norm_ is clip_grad_norm_  # patches undone on exit


def test_accumulation_measures_after_the_last_micro_batch(tmp_path):
    model, ref, out, _ = monitored(tmp_path, max_norm=0.4, accumulate=3, n=12)
    _, steps, _, _ = read(out)
    assert len(steps) == 4  # 12 micro-batches, 4 optimizer steps
    assert steps["grad_norm"].tolist() == pytest.approx([r[1] for r in ref], rel=1e-6)
    assert steps["loss"].tolist() == pytest.approx([r[0] for r in ref], rel=1e-6)  # mean of 3


@pytest.mark.parametrize("clip", [True, False])
def test_nan_injected_is_located_before_clipping(tmp_path, clip):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=tmp_path) as monitor:
        _train_with(model, opt, data(8), monitor, 1.0 if clip else None, 2.0, 1, nan=(5, "2.weight"))
    summary, steps, _, _ = read(tmp_path)
    row = summary.iloc[0]
    assert row["status"] == "non_finite" and row["nan_step"] == 5
    assert row["nan_source"] == "backward" and row["nan_param"] == "2.weight"
    assert len(steps) == 8  # the loop went on; the first event is the verdict
    assert steps["grad_norm"].iloc[:4].map(math.isfinite).all() and pd.isna(steps["grad_norm"].iloc[4])


def test_stop_on_non_finite_raises_before_the_update(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {}
    with pytest.raises(NonFiniteError) as info:
        with GradMonitor(model, opt, out=tmp_path, stop_on_non_finite=True) as monitor:
            counter = [1]
            poison(model, "0.bias", 3, counter)
            for x, y in data(6):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                monitor.record_loss(loss)
                clip_grad_norm_(model.parameters(), 1.0)  # spreads NaN everywhere
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                opt.step()
                counter[0] += 1
    err = info.value
    assert err.step == 3 and err.param == "0.bias" and err.source == "backward"
    assert "step 3" in str(err) and "0.bias" in str(err)
    for n, p in model.named_parameters():  # the NaN update was never applied
        assert torch.equal(p, before[n]) and torch.isfinite(p).all()
    summary, steps, _, _ = read(tmp_path)
    assert summary["status"].tolist() == ["non_finite"] and summary["nan_param"].tolist() == ["0.bias"]
    assert len(steps) == 3


def test_non_finite_loss_is_a_forward_event(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradMonitor(model, opt, out=tmp_path) as monitor:
        for step, (x, y) in enumerate(data(4), start=1):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.record_loss(loss * math.inf if step == 2 else loss)
            opt.step()
    row = read(tmp_path)[0].iloc[0]
    assert row["status"] == "non_finite" and row["nan_step"] == 2 and row["nan_source"] == "forward"
    assert pd.isna(row["nan_param"])


def test_amp_scaler_skips_are_recorded_and_norms_are_unscaled(tmp_path):
    """fp16 autocast on CPU with an init_scale so large that the first steps overflow."""

    def run(monitor_out):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
        ref = []
        mon = GradMonitor(model, opt, out=monitor_out) if monitor_out else None
        if mon:
            mon.start()
        for i, (x, y) in enumerate(data(10)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if mon:
                mon.record_loss(loss)
            scale = scaler.get_scale()
            if i % 2 == 0:  # half of the steps unscale and clip, the other half let step() unscale
                scaler.unscale_(opt)
                ref.append((f64_norm(model), scale))
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            else:
                grads = [p.grad.double() / scale for p in model.parameters()]
                ref.append((float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))), scale))
            scaler.step(opt)
            scaler.update()
        if mon:
            mon.close()
        return model, ref

    model, ref = run(tmp_path)
    bare, _ = run(None)
    for a, b in zip(model.parameters(), bare.parameters()):
        assert torch.equal(a, b)
    summary, steps, _, _ = read(tmp_path)
    scales = [s for _, s in ref]
    skipped = [int(scales[i + 1] < scales[i]) if i + 1 < len(scales) else 0 for i in range(len(scales))]
    assert sum(skipped) >= 3 and skipped[-1] == 0 and skipped[-2] == 0  # forced skips, then steps
    assert steps["skipped"].tolist() == skipped
    taken = [i for i, s in enumerate(skipped) if not s]
    assert steps["grad_norm"].iloc[taken].tolist() == pytest.approx([ref[i][0] for i in taken], rel=1e-5)
    assert steps.loc[steps["skipped"] == 1, "clip_coef"].isna().all()
    row = summary.iloc[0]
    assert row["status"] == "stable"  # a skipped step is not a verdict
    assert row["skipped_steps"] == sum(skipped) and row["first_skip"] == skipped.index(1) + 1


def test_killed_training_leaves_files_up_to_the_last_write(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, torch
        from torch import nn
        from gradcheck_cli.monitor import GradMonitor
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with GradMonitor(model, opt, out={str(tmp_path / "out")!r}, write_every=3) as monitor:
            for step in range(1, 20):
                opt.zero_grad()
                loss = model(torch.ones(2, 3)).pow(2).mean()
                loss.backward()
                monitor.record_loss(loss)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if step == 7:
                    os._exit(9)  # as abrupt as kill -9: no exit handlers, no flush
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 9, proc.stderr
    summary, steps, layers, _ = read(tmp_path / "out")
    assert steps["step"].tolist() == [1, 2, 3, 4, 5, 6] and summary["steps"].tolist() == [6]
    assert sorted(set(layers["step"])) == [1, 2, 3, 4, 5, 6]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_an_exception_in_the_loop_is_an_error_row_and_restores_torch(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError):
        with GradMonitor(model, opt, out=tmp_path):
            _train_with(model, opt, data(2), None, 1.0, 2.0, 1)
            raise ValueError("data loader broke")
    row = read(tmp_path)[0].iloc[0]
    assert row["status"] == "error" and row["error"] == "ValueError: data loader broke" and row["steps"] == 2
    assert torch.nn.utils.clip_grad_norm_ is clip_grad_norm_
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is clip_grad_norm_
    assert globals()["clip_grad_norm_"] is torch.nn.utils.clip_grad.clip_grad_norm_


def test_clip_calls_on_another_model_pass_through(tmp_path):
    model, other = make_model(0), make_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data(1)[0]
    with GradMonitor(model, opt, out=tmp_path):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        nn.functional.mse_loss(other(x), y).backward()
        expected = f64_norm(other)
        got = torch.nn.utils.clip_grad_norm_(other.parameters(), 1e-3)
        assert float(got) == pytest.approx(expected, rel=1e-6)
        opt.step()
    steps = read(tmp_path)[1]
    assert steps["clip_coef"].tolist() == [1.0]  # the monitored model was not clipped


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=4), st.sampled_from([1.0, 2.0, math.inf])
)
def test_any_gradients_give_the_float64_norm_and_coefficient(tmp_path_factory, scales, norm_type):
    out = tmp_path_factory.mktemp("prop")
    params = [nn.Parameter(torch.zeros(3)) for _ in scales]
    model = nn.ParameterList(params)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with GradMonitor(model, opt, out=out, write_every=1000):
        g = torch.Generator().manual_seed(len(scales))
        for p, s in zip(params, scales):
            p.grad = torch.randn(3, generator=g) * s
        expected = f64_norm(model, norm_type)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type)
        opt.step()
    steps = read(out)[1]
    assert steps["grad_norm"].iloc[0] == pytest.approx(expected, rel=1e-6)
    assert steps["clip_coef"].iloc[0] == pytest.approx(min(1.0 / (expected + 1e-6), 1.0), rel=1e-6)


def test_the_core_never_imports_the_frameworks():
    code = (
        "import sys, gradcheck_cli.monitor, gradcheck_cli.cli, gradcheck_cli.runner\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate')]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("depth", [None, 1])
def test_device_gather_gives_the_same_files_as_the_host_path(tmp_path, monkeypatch, depth):
    """The one-transfer path used off the CPU, run here on CPU tensors against the host path."""
    from gradcheck_cli.monitor import StepRecorder

    texts, layer_tables = [], []
    for on_device in (False, True):
        monkeypatch.setattr(StepRecorder, "gather_on_device", on_device)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        out = tmp_path / str(on_device)
        with GradMonitor(model, opt, out=out, layer_depth=depth) as monitor:
            _train_with(model, opt, data(6), monitor, 0.5, 2.0, 2, nan=(2, "0.weight"))
        summary, steps, layers, hist = read(out)
        assert summary["nan_step"].tolist() == [2] and summary["nan_param"].tolist() == ["0.weight"]
        texts.append([(out / f).read_text() for f in ("steps.csv", "histograms.csv")])
        layer_tables.append(layers)
    assert texts[0] == texts[1]
    # Group norms: the host combines floats in Python, the device path in torch; they agree to
    # float64 rounding (torch's vectorised float64 sum may round the last bit differently).
    host, device = layer_tables
    assert host[["run", "step", "param"]].equals(device[["run", "step", "param"]])
    assert device["grad_norm"].tolist() == pytest.approx(host["grad_norm"].tolist(), rel=4e-16, nan_ok=True)


def test_value_clipping_is_measured_first_and_has_no_coefficient(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = []
    with GradMonitor(model, opt, out=tmp_path):
        for x, y in data(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            ref.append(f64_norm(model))
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            assert f64_norm(model) < ref[-1]  # it did clip
            opt.step()
    summary, steps = read(tmp_path)[:2]
    assert steps["grad_norm"].tolist() == pytest.approx(ref, rel=1e-6) and steps["clip_coef"].isna().all()
    # a value-clipping run, not an unclipped one
    row = summary.iloc[0]
    assert (row["clip_mode"], row["clip_param"], pd.isna(row["max_norm"])) == ("value", 1e-3, True)


# ---- clip="engine" (the default): the clip call is served by the engine, in the measuring pass ----


def _grads_of(model):
    return [q.grad.clone() for q in model.parameters()]


def _set_grads(model, grads):
    for q, g in zip(model.parameters(), grads):
        q.grad = g.clone()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_engine_clip_returns_the_engines_total_and_records_the_coefficient_it_applied(tmp_path, norm_type):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin = make_model()  # the same gradients, clipped by engine.clip_grad_norm_ directly
    with GradMonitor(model, opt, out=tmp_path):
        for x, y in data(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            _set_grads(twin, _grads_of(model))
            want = engine.clip_grad_norm_(twin.parameters(), 0.02, norm_type)
            got = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.02, norm_type)
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
            assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))
            opt.step()
    steps = read(tmp_path)[1]
    coefs = steps["clip_coef"].tolist()
    assert all(c < 1 for c in coefs)
    for c, n in zip(coefs, steps["grad_norm"]):
        assert c == engine.host_clip_coef(0.02, float(torch.tensor(n, dtype=torch.float32)))


def test_engine_clip_with_error_if_nonfinite_raises_the_engines_error_before_clipping(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match="non-finite"):
        with GradMonitor(model, opt, out=tmp_path):
            nn.functional.mse_loss(model(x), y).backward()
            model[0].weight.grad[0, 0] = math.inf
            before = _grads_of(model)
            try:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1, error_if_nonfinite=True)
            finally:
                assert all(torch.equal(a, q.grad) for a, q in zip(before, model.parameters()))  # untouched


def test_a_second_clip_call_and_a_clip_of_some_parameters_measure_for_themselves(tmp_path):
    """Only a clip call that took the step's measurement itself reuses it: a second call sees
    the already clipped gradients, a call on some parameters only those; the step records the
    whole model's pre-clip norm and the smallest coefficient."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    twin = make_model()
    refs, coefs = [], []
    with GradMonitor(model, opt, out=tmp_path):
        for x, y in data(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            _set_grads(twin, _grads_of(model))
            refs.append(f64_norm(model))
            a = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            b = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            c = torch.nn.utils.clip_grad_norm_(model[0].parameters(), 0.01)
            want = [
                engine.clip_grad_norm_(twin.parameters(), 0.5),
                engine.clip_grad_norm_(twin.parameters(), 0.1),
                engine.clip_grad_norm_(twin[0].parameters(), 0.01),
            ]
            assert all(torch.equal(u, v) for u, v in zip((a, b, c), want))
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters()))
            coefs.append(min(engine.host_clip_coef(m, float(t)) for m, t in zip((0.5, 0.1, 0.01), want)))
            opt.step()
    steps = read(tmp_path)[1]
    assert steps["grad_norm"].tolist() == pytest.approx(refs, rel=1e-6)
    assert steps["clip_coef"].tolist() == coefs and all(c < 1 for c in coefs)


def test_an_unknown_clip_choice_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="clip must be one of 'engine', 'torch', got 'fast'"):
        GradMonitor(model, torch.optim.SGD(model.parameters(), lr=0.1), clip="fast")
