"""Scripts that define train_step(model, batch, optimizers, clip): contract, sweep, files."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import UsageError
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import ERROR, NON_FINITE, SITE_COLUMNS, SOURCE_BACKWARD, STABLE, Cell
from gradcheck_cli.sweep import run_sweep
from gradcheck_cli.train_step import combine_site_norms

ROOT = Path(__file__).resolve().parent.parent
GAN = ROOT / "sample_models" / "tiny_gan.py"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def reference_gan(steps: int, max_norm: float | None, norm_type: float = 2.0, seed: int = 0):
    """The GAN trained with torch alone, seeded as a sweep seeds; per step: the loss and the
    float64 pre-clip norm of each network's gradients at its clip call."""
    experiment = load_experiment(GAN)

    def seed_all():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    seed_all()
    model = experiment.build_model_fn()
    optimizers = experiment.build_optimizer_fn(model)
    seed_all()
    out = []
    for batch in list(experiment.batches_fn())[:steps]:
        sites = []

        def clip(params, name=None):
            params = list(params)
            grads = torch.cat([p.grad.double().flatten() for p in params])
            sites.append((name, float(torch.linalg.vector_norm(grads, norm_type))))
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

        loss = experiment.train_step_fn(model, batch, optimizers, clip)
        out.append((float(loss), sites))
    return out


@pytest.mark.parametrize("max_norm,norm_type", [(None, 2.0), (0.3, 2.0), (0.2, math.inf)])
def test_gan_sweep_records_each_network_pre_clip_norm(max_norm, norm_type):
    config = SweepConfig(script=GAN, max_norms=(max_norm,) if max_norm else (), norm_types=(norm_type,), steps=8)
    cell = Cell(max_norm, norm_type)
    (result,) = run_sweep(config, load_experiment(GAN), cells=[cell])
    ref = reference_gan(8, max_norm, norm_type)
    assert result.status == STABLE and len(result.steps) == 8
    for step, (loss, sites) in zip(result.steps, ref):
        assert step.loss == pytest.approx(loss, rel=1e-5)
        assert [s[0] for s in step.sites] == ["discriminator", "generator"]
        norms = [n for _, n in sites]
        assert [s[1] for s in step.sites] == pytest.approx(norms, rel=1e-5)
        coefs = [1.0 if max_norm is None else min(max_norm / (n + 1e-6), 1.0) for n in norms]
        assert [s[2] for s in step.sites] == pytest.approx(coefs, rel=1e-5)
        p = norm_type
        assert step.grad_norm == pytest.approx(
            float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p)), rel=1e-5
        )
        assert step.clip_coef == pytest.approx(min(coefs), rel=1e-5)
        assert {name.split(".")[0] for name, _ in step.layers} == {"discriminator", "generator"}
    if max_norm is not None:
        assert any(s[2] < 1 for st in result.steps for s in st.sites)


def test_every_run_starts_from_the_same_state_of_both_optimizers():
    config = SweepConfig(script=GAN, max_norms=(0.1, 10.0), norm_types=(2.0,), steps=4)
    results = run_sweep(config, load_experiment(GAN))
    # the first measurement of every run (the discriminator's, before any update) is identical
    assert len({r.steps[0].sites[0][1] for r in results}) == 1
    again = run_sweep(config, load_experiment(GAN))
    for a, b in zip(results, again):
        assert [(s.loss, s.grad_norm, s.sites) for s in a.steps] == [(s.loss, s.grad_norm, s.sites) for s in b.steps]


def test_nan_at_a_clip_call_stops_before_clipping(tmp_path):
    script = write(
        tmp_path,
        "nan_step.py",
        """
        import math, torch
        from torch import nn

        def build_model():
            torch.manual_seed(0)
            return nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 1)})

        def build_optimizer(model):
            return [torch.optim.SGD(model["a"].parameters(), lr=0.1), torch.optim.SGD(model["b"].parameters(), lr=0.1)]

        def batches():
            for i in range(1, 11):
                yield torch.ones(2, 3) * i, i

        def train_step(model, batch, optimizers, clip):
            x, i = batch
            for opt in optimizers:
                opt.zero_grad()
            loss = model["b"](torch.tanh(model["a"](x))).pow(2).mean()
            loss.backward()
            if i == 3:
                model["b"].bias.grad.fill_(math.nan)
            clip(model["a"].parameters())
            clip(model["b"].parameters())
            for opt in optimizers:
                opt.step()
            return loss
    """,
    )
    config = SweepConfig(script=script, max_norms=(1.0,), norm_types=(2.0,), steps=10)
    results = run_sweep(config, load_experiment(script))
    for r in results:
        assert r.status == NON_FINITE and r.nan_step == 3 and r.nan_source == SOURCE_BACKWARD
        assert r.nan_param == "b.bias" and len(r.steps) == 3
        last = r.steps[-1]
        assert [s[0] for s in last.sites] == ["call_1", "call_2"]  # named by call order
        assert math.isfinite(last.sites[0][1]) and math.isnan(last.sites[1][1]) and math.isnan(last.sites[1][2])


@pytest.mark.parametrize(
    "body,message",
    [
        ("clip_never", "train_step never called clip(parameters)"),
        ("bad_return", "train_step must return the loss as a scalar tensor, a number or None, got str"),
    ],
)
def test_contract_failures_in_a_run_are_errors(tmp_path, body, message):
    script = write(
        tmp_path,
        "s.py",
        f"""
        import torch

        def build_model():
            return torch.nn.Linear(2, 1)

        def batches():
            return [torch.ones(1, 2)]

        def train_step(model, batch, optimizers, clip):
            optimizers.zero_grad()
            loss = model(batch).sum()
            loss.backward()
            if {body!r} == "bad_return":
                clip(model.parameters())
                return "oops"
            optimizers.step()
            return loss
    """,
    )
    (result,) = run_sweep(
        SweepConfig(script=script, max_norms=(), steps=2), load_experiment(script), cells=[Cell(None)]
    )
    assert result.status == ERROR and message in result.error


def test_loader_accepts_train_step_and_refuses_both_or_neither(tmp_path):
    common = "def build_model():\n    pass\ndef batches():\n    pass\n"
    ok = write(tmp_path, "ok.py", common + "def train_step(model, batch, optimizers, clip):\n    pass\n")
    exp = load_experiment(ok)
    assert exp.train_step_fn is not None and exp.loss_fn is None
    both = write(tmp_path, "both.py", common + "def loss_fn(m, b):\n    pass\ndef train_step(m, b, o, c):\n    pass\n")
    with pytest.raises(UsageError, match="both loss_fn and train_step are defined"):
        load_experiment(both)
    arity = write(tmp_path, "arity.py", common + "def train_step(model, batch):\n    pass\n")
    with pytest.raises(UsageError, match=r"must accept four arguments \(model, batch, optimizers, clip\)"):
        load_experiment(arity)
    neither = write(tmp_path, "neither.py", common)
    with pytest.raises(UsageError, match=r"loss_fn is missing \(or define train_step instead\)"):
        load_experiment(neither)


def test_several_optimizers_only_for_train_step(tmp_path):
    script = write(
        tmp_path,
        "lossfn.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def build_optimizer(model):
            return [torch.optim.SGD(model.parameters(), lr=0.1)]
        def batches():
            return [torch.ones(1, 2)]
        def loss_fn(model, batch):
            return model(batch).sum()
    """,
    )
    (result,) = run_sweep(
        SweepConfig(script=script, max_norms=(), steps=1), load_experiment(script), cells=[Cell(None)]
    )
    assert result.status == ERROR and "must return a torch.optim.Optimizer, got list" in result.error


def test_combine_site_norms_matches_torch():
    norms = [3.0, 4.0, 0.5]
    for p in (1.0, 2.0, 3.0, math.inf):
        assert combine_site_norms(norms, p) == pytest.approx(
            float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p)), rel=1e-12
        )


def test_gan_recipe_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradcheck_cli",
            "sweep",
            "--recipe",
            "tiny_gan",
            "--steps",
            "6",
            "--out",
            str(out),
            "--json",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    summary, sites = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "clip_sites.csv")
    assert summary["status"].tolist() == ["stable"] * 5
    assert list(sites.columns) == SITE_COLUMNS and len(sites) == 5 * 6 * 2
    assert set(sites["site"]) == {"discriminator", "generator"}
    steps = pd.read_csv(out / "steps.csv")
    for run, group in sites.groupby("run"):
        per_step = group.groupby("step")["grad_norm"].apply(
            lambda s: math.sqrt((s**2).sum()) if "_inf" not in run else s.max()
        )
        mine = steps[steps["run"] == run].set_index("step")["grad_norm"]
        assert mine.tolist() == pytest.approx(per_step.tolist(), rel=1e-9)


def test_lr_axis_sets_every_optimizer_and_amp_is_refused():
    config = SweepConfig(script=GAN, max_norms=(1.0,), norm_types=(2.0,), steps=3, lrs=(0.001, 0.005))
    results = run_sweep(config, load_experiment(GAN))
    assert {r.lr for r in results} == {0.001, 0.005}
    for r in results:
        assert r.status == STABLE and [s.lr for s in r.steps] == [r.lr] * 3
    amp = SweepConfig(script=GAN, max_norms=(), steps=2, amp="bf16")
    (result,) = run_sweep(amp, load_experiment(GAN), cells=[Cell(None)])
    assert result.status == ERROR and "--amp and --accumulate do not apply to a train_step script" in result.error
