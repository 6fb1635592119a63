"""Shared runs: a cell identical to its control run is not trained, a cell whose clipping first
acts at step k starts from the control's state there, and the results are exactly those of
training every run from step 1 (``--no-share``)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcheck_cli import engine, shadows
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.forks import ControlState
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import Cell
from gradcheck_cli.run_setup import apply_clipping, make_rule, unchanged_clipping
from gradcheck_cli.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SCRIPTS = Path(__file__).parent / "scripts"
MLP = SCRIPTS / "shared_mlp.py"
RULES = dict(
    clip_values=(0.05, 10.0),
    agc_clip_factors=(0.01, 10.0),
    autoclip_percentiles=(10.0, 100.0),
    zclip_z_thresholds=(2.5,),
)


def _comparable(result):
    """A result as text, without what sharing is allowed to change: its time and its count of
    shared steps (``repr``: NaN equals NaN)."""
    return repr(dataclasses.replace(result, seconds=0.0, shared_steps=0))


def _both(config: SweepConfig, **kw):
    experiment = load_experiment(config.script)
    shared = run_sweep(config, experiment, share=True, **kw)
    every = run_sweep(config, experiment, share=False, **kw)
    assert [r.run for r in shared] == [r.run for r in every]
    for a, b in zip(shared, every):
        assert _comparable(a) == _comparable(b), a.run
        assert b.shared_steps == 0
    return shared


def _kinds(results):
    free = [r.run for r in results if r.shared_steps and r.shared_steps == len(r.steps)]
    forked = [r.run for r in results if 0 < r.shared_steps < len(r.steps)]
    return free, forked


@pytest.mark.parametrize("name", ["tiny_lm", "exploding_rnn", "nan_at_step", "tiny_gan"])
def test_every_sample_model_and_rule_gives_the_results_of_training_every_run(name):
    config = SweepConfig(script=SAMPLES / f"{name}.py", steps=40, max_norms=(0.1, 1.0, 10.0), **RULES)
    results = _both(config)
    free, forked = _kinds(results)
    assert free, "some cell never clips on these models"
    if name == "tiny_gan":  # a train_step script: free cells, no forks (docs/diagnosis.md)
        assert not forked
    if name == "tiny_lm":
        assert {"clip_1_2", "clip_10_2", "clip_10_inf", "value_10", "agc_10"} <= set(free)


def test_free_cells_and_forks_on_a_script_with_dropout_a_shuffling_loader_a_schedule_and_evaluate():
    config = SweepConfig(
        script=MLP, steps=20, max_norms=(1.0, 3.0, 10.0, 100.0), norm_types=(2.0, math.inf, 1.0), **RULES
    )
    results = _both(config)
    free, forked = _kinds(results)
    assert "clip_100_2" in free and "clip_10_inf" in free
    assert "clip_3_inf" in forked and "clip_10_2" in forked
    by_run = {r.run: r for r in results}
    control = by_run["unclipped"]
    fork = by_run["clip_10_2"]
    # the shared steps are the control's, in the cell's norm type; the fork's first step is where
    # the control's L2 norm first exceeds 10
    k = next(s.step for s in control.steps if s.grad_norm > 10.0)
    assert fork.shared_steps == k - 1
    assert [s.loss for s in fork.steps[: k - 1]] == [s.loss for s in control.steps[: k - 1]]
    assert fork.steps[k - 1].clip_coef < 1.0
    inf_norms = [v for s in control.steps for q, v in s.norms if q == math.inf]
    assert [s.grad_norm for s in by_run["clip_10_inf"].steps] == inf_norms
    assert by_run["clip_100_2"].eval_metric == control.eval_metric


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_norms=st.lists(st.sampled_from([0.5, 2.0, 4.0, 6.0, 9.0, 50.0]), min_size=1, max_size=3, unique=True),
    norm_types=st.lists(st.sampled_from([2.0, math.inf, 1.0, 3.0]), min_size=1, max_size=2, unique=True),
    seeds=st.lists(st.integers(0, 5), min_size=1, max_size=2, unique=True),
    lrs=st.sampled_from([None, (0.01,), (0.02, 0.2)]),
    accumulate=st.sampled_from([1, 2]),
)
def test_any_grid_seeds_lrs_and_accumulation_give_the_results_of_training_every_run(
    max_norms, norm_types, seeds, lrs, accumulate
):
    config = SweepConfig(
        script=MLP,
        steps=12,
        max_norms=tuple(max_norms),
        norm_types=tuple(norm_types),
        seeds=tuple(seeds),
        lrs=lrs,
        accumulate=accumulate,
        autoclip_percentiles=(50.0,),
    )
    _both(config)


def test_bf16_autocast_runs_share_exactly():
    config = SweepConfig(script=SAMPLES / "tiny_lm.py", steps=15, amp="bf16", max_norms=(0.1, 10.0))
    free, _ = _kinds(_both(config))
    assert free


@pytest.mark.parametrize("init_scale, status", [(2.0**20, "stable"), (2.0**40, "non_finite")])
def test_fp16_runs_whose_scaler_skips_steps_share_their_free_cells(init_scale, status):
    """The scaler skips the first steps (and, at 2**40, every step until the scale has
    collapsed): a free cell's skipped rows and verdict are the control's; no cell forks."""
    config = SweepConfig(
        script=SCRIPTS / "amp_schedule.py",
        steps=20,
        amp="fp16",
        amp_init_scale=init_scale,
        accumulate=2,
        max_norms=(0.1, 10.0, 1000.0),
        clip_values=(100.0,),
    )
    results = _both(config)
    free, forked = _kinds(results)
    assert results[0].status == status and results[0].skipped_steps > 0
    assert "clip_1000_2" in free and "value_100" in free and not forked


def test_a_memory_budget_too_small_for_a_snapshot_trains_forked_cells_from_step_1(monkeypatch):
    monkeypatch.setattr(shadows, "FORK_MEMORY_BUDGET", 0)
    config = SweepConfig(script=MLP, steps=20, max_norms=(3.0, 10.0, 100.0), norm_types=(2.0, math.inf))
    notes: list[str] = []
    free, forked = _kinds(_both(config, on_note=notes.append))
    assert free and not forked
    assert len(notes) == 1 and "fork point(s) found no room within the 0 GiB" in notes[0]


def test_beyond_the_budget_a_fork_starts_from_the_latest_earlier_snapshot(monkeypatch):
    """Room for one snapshot: the first fork point gets it, a cell forking later starts there
    too and trains the steps in between."""
    config = SweepConfig(script=MLP, steps=20, max_norms=(4.5, 8.0), norm_types=(2.0,))
    unlimited = {r.run: r.shared_steps for r in _both(config) if 0 < r.shared_steps < len(r.steps)}
    first = min(unlimited.values())
    later = [run for run, n in unlimited.items() if n > first]
    assert later, unlimited  # at least two fork points
    experiment = load_experiment(MLP)
    model = experiment.build_model_fn()
    optimizer = experiment.build_optimizer_fn(model)
    model(torch.ones(2, 6)).sum().backward()
    optimizer.step()
    one = ControlState.size_of(model, optimizer)
    monkeypatch.setattr(shadows, "FORK_MEMORY_BUDGET", one + one // 2)
    limited = {r.run: r.shared_steps for r in _both(config)}
    assert all(limited[run] == first for run in unlimited)


def test_resumed_sweeps_share_only_with_a_control_that_runs_again():
    config = SweepConfig(script=MLP, steps=20, max_norms=(3.0, 10.0, 100.0), norm_types=(2.0, math.inf))
    experiment = load_experiment(MLP)
    every = {r.run: r for r in run_sweep(config, experiment, share=False)}
    # the control finished before: the cells left have no control to follow and train in full
    resumed = run_sweep(config, experiment, skip={"unclipped": every["unclipped"], "clip_3_2": every["clip_3_2"]})
    assert all(r.shared_steps == 0 for r in resumed)
    assert [_comparable(r) for r in resumed] == [_comparable(every[r.run]) for r in resumed]
    # the control runs again: it follows the cells still to run
    resumed = run_sweep(config, experiment, skip={"clip_100_2": every["clip_100_2"]})
    assert [_comparable(r) for r in resumed] == [_comparable(every[r.run]) for r in resumed]
    assert resumed[-1].shared_steps == 20  # clip_100_inf: never clips


def _rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _same_files_but_time(a: Path, b: Path) -> dict[str, int]:
    """Two sweeps' files are byte-equal but for summary.csv's time and shared steps; the runs'
    shared steps in ``a`` (``b`` shared none)."""
    for name in ("steps.csv", "layers.csv", "control_norms.csv", "histograms.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    drop = ("seconds", "shared_steps")
    assert _rows(a / "summary.csv", drop) == _rows(b / "summary.csv", drop)
    assert all(int(row["shared_steps"]) == 0 for row in _rows(b / "summary.csv"))
    return {row["run"]: int(row["shared_steps"]) for row in _rows(a / "summary.csv")}


def test_workers_write_the_same_files_as_training_every_run(tmp_path):
    """--jobs 2 (cells wait for their control in the worker pool), the files of both sweeps
    equal but for the time and the shared steps; the terminal says what was shared."""
    env = {**os.environ, "SHARED_MLP_SAMPLES": "40"}
    args = [sys.executable, "-m", "gradcheck_cli", "sweep", str(MLP), "--steps", "20", "--jobs", "2"]
    args += ["--max-norm", "3,10,100", "--norm-type", "2,inf", "--seeds", "0,1"]
    shared = subprocess.run(args + ["--out", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    every = subprocess.run(args + ["--out", str(tmp_path / "b"), "--no-share"], env=env, capture_output=True, text=True)
    assert shared.returncode == every.returncode == 0, shared.stderr + every.stderr
    counts = _same_files_but_time(tmp_path / "a", tmp_path / "b")
    assert counts["clip_100_2@seed=0"] == counts["clip_100_inf@seed=1"] == 20
    assert any(0 < n < 20 for n in counts.values())  # a fork, sent to a worker
    assert "shared runs: " in shared.stderr and "--no-share" in shared.stderr
    assert "shared runs: " not in every.stderr


def _grads(seed: int, scale: float, sparse_free: bool = True) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(4, 3), (3,), (2, 2, 2)]:
        p = torch.nn.Parameter(torch.randn(shape, generator=g))
        p.grad = torch.randn(shape, generator=g) * scale
        params.append(p)
    return params


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-3, 0.1, 0.5, 1.0, 3.0, 100.0]),
    mode=st.sampled_from(["norm", "value", "agc", "autoclip", "zclip"]),
    param=st.sampled_from([0.01, 0.5, 1.0, 2.0, 10.0, 1e4]),
    norm_type=st.sampled_from([2.0, math.inf, 1.0]),
    history=st.integers(0, 30),
)
def test_unchanged_clipping_says_so_only_when_clipping_changes_nothing(seed, scale, mode, param, norm_type, history):
    """Where ``unchanged_clipping`` gives a row, ``apply_clipping`` leaves every gradient bit
    for bit and gives the same row, and a rule's state advances the same way."""
    cell = Cell(param, norm_type) if mode == "norm" else Cell(None, mode=mode, param=param)
    if mode == "autoclip":
        cell = Cell(None, mode=mode, param=min(param * 10, 100.0))
    config = SweepConfig(script=MLP)
    dry_rule, real_rule = make_rule(cell, config), make_rule(cell, config)
    for i in range(history):  # the rules' state before this step
        for rule in (dry_rule, real_rule):
            if hasattr(rule, "observe"):
                rule.observe(0.5 + (i % 7) * scale / 3)
    params = _grads(seed, scale)
    q = cell.norm_type
    norm = engine.get_total_norm([p.grad for p in params], q)
    before = [p.grad.clone() for p in params]
    row = unchanged_clipping(cell, dry_rule, params, norm, norm.item())
    real = apply_clipping(cell, real_rule, params, norm, norm.item())
    changed = any(not torch.equal(a, p.grad) for a, p in zip(before, params))
    if row is not None:
        assert not changed
        assert repr(row) == repr(real)
    if hasattr(real_rule, "state_dict") and mode in ("autoclip", "zclip"):
        assert dry_rule.state_dict() == real_rule.state_dict()


def test_sparse_gradients_are_never_judged_unchanged():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.sparse_coo_tensor([[0, 0]], torch.ones(2, 2) * 1e-3, (4, 2))
    norm = torch.tensor(1e-3)
    assert unchanged_clipping(Cell(100.0), None, [p], norm, 1e-3) is None


def test_a_fork_state_restores_a_copy_never_the_snapshot_itself():
    """Two cells forking from one captured state each get their own copy: training one never
    changes what the other starts from."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = ControlState.capture(1, model, optimizer, None, [], [torch.tensor(1.0)], torch.device("cpu"))
    kept = copy.deepcopy(state)
    for _ in range(2):
        state.restore(model, optimizer, None)
        optimizer.step()
        with torch.no_grad():
            model.weight.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(state.model.values(), kept.model.values()))
    assert all(torch.equal(a, b) for a, b in zip(state.grads, kept.grads))
    assert repr(state.optimizer) == repr(kept.optimizer)


def test_a_command_run_as_it_is_shares_its_free_cells_and_writes_the_same_files(tmp_path):
    """``gradclip sweep -- python train.py``: a cell the control's rows show identical to it is
    not run; the files equal --no-share's but for the time and the shared steps."""
    script = SCRIPTS / "as_is" / "plain_loop.py"
    args = [sys.executable, "-m", "gradcheck_cli", "sweep", "--steps", "12", "--max-norm", "0.1,1000"]
    args += ["--norm-type", "2", "--clip-value", "1000"]
    shared = subprocess.run(
        args + ["--out", str(tmp_path / "a"), "--", "python", str(script)], capture_output=True, text=True
    )
    every = subprocess.run(
        args + ["--out", str(tmp_path / "b"), "--no-share", "--", "python", str(script)], capture_output=True, text=True
    )
    assert shared.returncode == every.returncode == 0, shared.stderr + every.stderr
    counts = _same_files_but_time(tmp_path / "a", tmp_path / "b")
    # value clipping needs the control's inf norm, measured only when inf is a norm type of the grid
    assert counts == {"unclipped": 0, "clip_0.1_2": 0, "clip_1000_2": 12, "value_1000": 0}
    assert not (tmp_path / "a" / "logs" / "clip_1000_2.log").exists()  # never run
    assert (tmp_path / "b" / "logs" / "clip_1000_2.log").exists()


def test_a_fork_resumes_under_the_global_torch_state_the_control_had_there(tmp_path):
    """A script that changes torch's default dtype as it trains: a fork starts under the dtype
    the control had at the fork point, as the cell trained from step 1 would have."""
    source = MLP.read_text().split("def loss_fn")[0]
    script = tmp_path / "careless.py"
    script.write_text(
        source
        + """
def loss_fn(model, batch):
    x, y = batch
    target = torch.tensor(y.tolist())  # in the default dtype, which this script changes
    loss = ((model(x).to(target.dtype) - target) ** 2).mean()
    torch.set_default_dtype(torch.float64)
    return loss
"""
    )
    try:
        config = SweepConfig(script=script, steps=20, max_norms=(3.0, 10.0, 100.0), norm_types=(2.0, math.inf))
        _, forked = _kinds(_both(config))
    finally:
        torch.set_default_dtype(torch.float32)
    assert forked


EXPLODING_TRAIN_STEP = """
import torch

def build_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))

def build_optimizer(model):
    return [torch.optim.SGD(model[0].parameters(), lr=LR), torch.optim.SGD(model[1].parameters(), lr=LR)]

def batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return [(x[i : i + 8], x[i : i + 8].sum(1, keepdim=True) * 3) for i in range(0, 64, 8)]

def train_step(model, batch, optimizers, clip):
    x, y = batch
    loss = ((model(x) - y) ** 2).mean()
    for o in optimizers:
        o.zero_grad()
    loss.backward()
    clip(model[0].parameters(), name="body")
    clip(model[1].parameters(), name="head")
    for o in optimizers:
        o.step()
    return loss

def evaluate(model):
    return float(model(torch.ones(2, 3)).abs().mean())
"""


@pytest.mark.parametrize(
    "lr, factor, status", [(0.001, 10.0, "stable"), (0.2, 10.0, "diverged"), (50.0, math.inf, "non_finite")]
)
def test_train_step_scripts_that_stay_stable_diverge_or_go_non_finite_share_exactly(tmp_path, lr, factor, status):
    """Two clip sites, two optimizers, an evaluate: stable, diverging, and (divergence not
    judged) overflowing to inf: free cells equal their trained selves at every verdict."""
    script = tmp_path / "two_sites.py"
    script.write_text(f"LR = {lr}\n" + EXPLODING_TRAIN_STEP)
    config = SweepConfig(
        script=script,
        steps=30,
        max_norms=(0.5, 50.0, 1e30),
        norm_types=(2.0, math.inf),
        divergence_factor=factor,
        **RULES,
    )
    results = _both(config)
    free, forked = _kinds(results)
    assert free and not forked
    assert results[0].status == status


def test_a_command_that_skips_its_non_finite_step_shares_a_cell_up_to_that_verdict(tmp_path):
    """A loop with DataLoader workers that skips the update when the norm is not finite: the
    skipped step is the control's verdict, and a cell that never clipped before it shares it."""
    script = SCRIPTS / "as_is" / "nan_loop.py"
    args = [sys.executable, "-m", "gradcheck_cli", "sweep", "--steps", "10", "--max-norm", "10", "--norm-type", "2"]
    runs = [args + ["--out", str(tmp_path / "a"), "--", "python", str(script)]]
    runs.append(args + ["--out", str(tmp_path / "b"), "--no-share", "--", "python", str(script)])
    shared, every = (subprocess.run(a, capture_output=True, text=True) for a in runs)
    assert shared.returncode == every.returncode == 0, shared.stderr + every.stderr
    counts = _same_files_but_time(tmp_path / "a", tmp_path / "b")
    summary = {row["run"]: row for row in _rows(tmp_path / "a" / "summary.csv")}
    assert summary["clip_10_2"]["status"] == "non_finite" and summary["clip_10_2"]["nan_step"] == "4"
    assert counts == {"unclipped": 0, "clip_10_2": 4}
