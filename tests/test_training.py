"""Training as users train: mixed precision, gradient accumulation, LR schedules, and the lr and
seed axes of the grid. Every per-step number is checked against the plain torch loop in
``reference_loop.py``, which does AMP, accumulation and the schedule by hand."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch
from reference_loop import reference_training

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.precision import MAX_CONSECUTIVE_SKIPS
from gradcheck_cli.results import (
    ERROR,
    NON_FINITE,
    SOURCE_AMP,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    histogram_counts,
    shared_log_bins,
)
from gradcheck_cli.sweep import run_sweep

SCRIPTS = Path(__file__).parent / "scripts"
AMP_SCRIPT = SCRIPTS / "amp_schedule.py"
FORCES_SKIPS = 2.0**20  # the first few fp16 steps overflow at this scale, then it backs off enough


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def sweep(script: Path, **kw):
    config = SweepConfig(script=script, **kw)
    return run_sweep(config, load_experiment(script))


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# --- against the plain torch reference loop ------------------------------------------------------


@pytest.mark.parametrize("amp, accumulate", [("fp16", 2), ("fp16", 1), ("bf16", 3), ("off", 2)])
def test_control_run_matches_the_reference_loop_step_for_step(amp, accumulate):
    steps = 10
    [result] = sweep(
        AMP_SCRIPT,
        steps=steps,
        amp=amp,
        accumulate=accumulate,
        amp_init_scale=FORCES_SKIPS,
        max_norms=(1.0,),
        norm_types=(2.0,),
    )[:1]
    ref = reference_training(
        load_experiment(AMP_SCRIPT), steps, amp=amp, accumulate=accumulate, init_scale=FORCES_SKIPS
    )
    assert result.status == STABLE and len(result.steps) == steps
    assert [s.loss for s in result.steps] == [r.loss for r in ref]  # bit for bit
    assert [s.skipped for s in result.steps] == [r.skipped for r in ref]
    assert [s.lr for s in result.steps] == [r.lr for r in ref]
    for got, want in zip(result.steps, ref):
        assert same(got.clip_coef, want.coef)
        if want.skipped:
            assert not math.isfinite(got.grad_norm) and not math.isfinite(want.norm)
        else:
            assert got.grad_norm == pytest.approx(want.norm, rel=1e-6)
    if amp == "fp16":
        assert 1 <= result.skipped_steps < steps  # the scale forced skips, then training resumed
        assert result.first_skip == 1
    else:
        assert result.skipped_steps == 0 and result.first_skip is None


def test_clipped_run_with_amp_accumulation_and_schedule_matches_the_reference():
    steps = 10
    results = sweep(
        AMP_SCRIPT,
        steps=steps,
        amp="fp16",
        accumulate=2,
        amp_init_scale=FORCES_SKIPS,
        max_norms=(0.05,),
        norm_types=(2.0,),
    )
    clipped = results[1]
    ref = reference_training(
        load_experiment(AMP_SCRIPT), steps, amp="fp16", accumulate=2, init_scale=FORCES_SKIPS, max_norm=0.05
    )
    assert clipped.run == "clip_0.05_2" and clipped.status == STABLE
    assert [s.skipped for s in clipped.steps] == [r.skipped for r in ref]
    assert [s.lr for s in clipped.steps] == [r.lr for r in ref]
    taken = [(s, r) for s, r in zip(clipped.steps, ref) if not r.skipped]
    assert any(s.clip_coef < 1 for s, _ in taken)  # it really clips
    for got, want in taken:
        # the engine's norm differs from torch's in the last bits, and clipping feeds that back
        assert got.loss == pytest.approx(want.loss, rel=1e-5)
        assert got.grad_norm == pytest.approx(want.norm, rel=1e-5)
        assert got.clip_coef == pytest.approx(want.coef, rel=1e-5)


def test_scheduler_steps_only_after_steps_taken():
    # StepLR(step_size=2, gamma=0.5) from lr 0.2: the lr halves after every two *taken* steps
    [control] = sweep(
        AMP_SCRIPT, steps=12, amp="fp16", amp_init_scale=FORCES_SKIPS, max_norms=(1.0,), norm_types=(2.0,)
    )[:1]
    taken = 0
    for s in control.steps:
        assert s.lr == 0.2 * 0.5 ** (taken // 2)
        taken += not s.skipped
    assert control.skipped_steps >= 1


def test_skipped_steps_stay_out_of_norm_statistics_histograms_and_clip_rate():
    results = sweep(AMP_SCRIPT, steps=10, amp="fp16", amp_init_scale=FORCES_SKIPS, max_norms=(1e-3,), norm_types=(2.0,))
    clipped = results[1]
    taken = [s for s in clipped.steps if not s.skipped]
    skipped = [s for s in clipped.steps if s.skipped]
    assert skipped and taken and clipped.status == STABLE
    assert all(math.isnan(s.clip_coef) for s in skipped)
    row = clipped.summary_row()
    assert row["skipped_steps"] == len(skipped) and row["first_skip"] == skipped[0].step
    assert row["grad_norm_max"] == max(s.grad_norm for s in taken)
    assert row["clipped_frac"] == 1.0  # every taken step clipped at 1e-3; skipped ones do not count
    assert row["nan_step"] is None and row["nan_source"] is None and row["diverged_step"] is None
    assert sum(histogram_counts(clipped, shared_log_bins(results))) == len(taken)


ALWAYS_NAN_GRAD = """
import torch

class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(2, 2)
        self.head = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return (self.body(x).float() * NanGrad.apply(self.head)).sum()

def build_model():
    return Net()

def batches():
    return [torch.ones(3, 2)]

def loss_fn(model, batch):
    return model(batch) ** 2
"""


def test_a_collapsing_scale_is_an_amp_instability(tmp_path):
    script = write(tmp_path, "always_nan.py", ALWAYS_NAN_GRAD)
    results = sweep(script, steps=MAX_CONSECUTIVE_SKIPS + 5, amp="fp16", max_norms=(1.0,), norm_types=(2.0,))
    for r in results:
        assert r.status == NON_FINITE and r.nan_source == SOURCE_AMP
        assert r.nan_step == MAX_CONSECUTIVE_SKIPS and len(r.steps) == MAX_CONSECUTIVE_SKIPS
        assert all(s.skipped for s in r.steps) and r.first_skip == 1
        assert r.nan_param == "head"  # body's gradients stay finite: NaN enters at head's backward
    # without a scaler the same NaN is a backward onset at once
    [off] = sweep(script, steps=5, max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert off.status == NON_FINITE and off.nan_source == "backward" and off.nan_step == 1 and off.nan_param == "head"


# --- gradient accumulation ---------------------------------------------------------------------------


def test_accumulation_consumes_n_batches_per_optimizer_step(tmp_path):
    script = write(
        tmp_path,
        "counted.py",
        """
        import torch
        SEEN = []
        def build_model():
            return torch.nn.Linear(1, 1)
        def batches():
            for i in range(5):
                SEEN.append(i)
                yield torch.full((1, 1), float(i))
        def loss_fn(model, batch):
            return model(batch).pow(2).sum()
        """,
    )
    exp = load_experiment(script)
    config = SweepConfig(script=script, steps=4, accumulate=3, max_norms=(1.0,), norm_types=(2.0,))
    results = run_sweep(config, exp, cells=[Cell(None)])
    assert len(results[0].steps) == 4  # steps counts optimizer steps
    assert len(exp.module.SEEN) == 12


def test_a_non_finite_micro_batch_is_located(tmp_path):
    script = write(
        tmp_path,
        "nan_micro.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(2, 1)
        def batches():
            for i in range(1, 9):
                yield torch.full((2, 2), float("nan") if i == 6 else 0.1 * i)
        def loss_fn(model, batch):
            return model(batch).pow(2).mean()
        """,
    )
    # batch 6 is the 2nd micro-batch of step 3 with 2 per step, the 3rd of step 2 with 3
    for accumulate, step, micro in [(2, 3, 2), (3, 2, 3)]:
        [r] = sweep(script, steps=6, accumulate=accumulate, max_norms=(1.0,), norm_types=(2.0,))[:1]
        assert (r.status, r.nan_source, r.nan_step, r.nan_micro_batch) == (NON_FINITE, SOURCE_FORWARD, step, micro)
        assert r.summary_row()["nan_micro_batch"] == micro
    [r] = sweep(script, steps=6, max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert r.nan_step == 6 and r.nan_micro_batch is None  # not accumulating: the step says it all


# --- build_scheduler ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, expected",
    [
        ("return 5", "build_scheduler(optimizer) must return a torch.optim.lr_scheduler.LRScheduler, got int"),
        ("return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)", "ReduceLROnPlateau, which needs a metric"),
        ("raise RuntimeError('no schedule')", "RuntimeError: no schedule"),
    ],
)
def test_bad_schedulers_are_error_runs(tmp_path, body, expected):
    script = write(
        tmp_path,
        "bad_sched.py",
        "import torch\n"
        "def build_model():\n    return torch.nn.Linear(2, 1)\n"
        f"def build_scheduler(optimizer):\n    {body}\n"
        "def batches():\n    return [torch.ones(1, 2)]\n"
        "def loss_fn(model, batch):\n    return model(batch).sum()\n",
    )
    results = sweep(script, steps=2, max_norms=(1.0,), norm_types=(2.0,))
    assert {r.status for r in results} == {ERROR}
    assert all(expected in r.error for r in results)
    assert all("bad_sched.py" in r.error_traceback for r in results)


# --- lr and seed axes ------------------------------------------------------------------------------


def test_lr_axis_overrides_the_scripts_optimizer_and_names_the_runs():
    results = sweep(SCRIPTS / "with_optimizer.py", steps=4, lrs=(0.001, 0.1), max_norms=(1.0,), norm_types=(2.0,))
    assert [r.run for r in results] == [
        "unclipped@lr=0.001",
        "clip_1_2@lr=0.001",
        "unclipped@lr=0.1",
        "clip_1_2@lr=0.1",
    ]
    for r in results:
        assert r.lr == r.cell.lr and all(s.lr == r.cell.lr for s in r.steps)
        assert r.summary_row()["lr"] == r.cell.lr
    ref = reference_training(load_experiment(SCRIPTS / "with_optimizer.py"), 4, lr=0.1)
    assert [s.loss for s in results[2].steps] == [h.loss for h in ref]


def test_without_lr_the_scripts_optimizer_keeps_its_own():
    [r] = sweep(SCRIPTS / "with_optimizer.py", steps=2, max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert r.lr is None and r.summary_row()["lr"] is None
    assert [s.lr for s in r.steps] == [0.05, 0.05]  # Adam(lr=0.05) in the script
    [r] = sweep(SCRIPTS / "stable_linear.py", steps=2, max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert r.lr == 0.01 and [s.lr for s in r.steps] == [0.01, 0.01]  # the default SGD


def test_lr_axis_sets_initial_lr_for_a_scheduler():
    results = sweep(AMP_SCRIPT, steps=5, lrs=(0.4, 0.04), max_norms=(1.0,), norm_types=(2.0,))
    for r in results:
        assert [s.lr for s in r.steps] == [r.cell.lr * 0.5 ** (i // 2) for i in range(5)]


def test_seed_grid_names_are_unique_and_fair_per_lr_and_seed():
    seeds, lrs = (0, 1, 2), (0.01, 0.05)
    results = sweep(
        SCRIPTS / "with_optimizer.py", steps=3, seeds=seeds, lrs=lrs, max_norms=(0.1, 1.0), norm_types=(2.0,)
    )
    names = [r.run for r in results]
    assert len(names) == len(set(names)) == len(seeds) * len(lrs) * 3
    assert "clip_1_2@lr=0.05,seed=1" in names and "unclipped@lr=0.01,seed=2" in names
    first = {}
    for r in results:
        assert (r.lr, r.seed) == (r.cell.lr, r.cell.seed)
        first.setdefault((r.lr, r.seed), set()).add(r.steps[0].loss)
    assert all(len(losses) == 1 for losses in first.values())  # fairness per (lr, seed)
    assert len({next(iter(first[(0.01, s)])) for s in seeds}) == 3  # seeds really differ


def test_a_seed_of_a_multi_seed_sweep_equals_a_single_seed_sweep():
    grid = sweep(SCRIPTS / "with_optimizer.py", steps=4, seeds=(0, 1), max_norms=(1.0,), norm_types=(2.0,))
    alone = sweep(SCRIPTS / "with_optimizer.py", steps=4, seeds=(1,), max_norms=(1.0,), norm_types=(2.0,))
    by_name = {r.run: r for r in grid}
    for r in alone:
        twin = by_name[f"{r.run}@seed=1"]
        assert [(s.loss, s.grad_norm, s.clip_coef) for s in twin.steps] == [
            (s.loss, s.grad_norm, s.clip_coef) for s in r.steps
        ]


# --- the command line ------------------------------------------------------------------------------


def invoke(*args):
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


GRID_ARGS = [
    AMP_SCRIPT,
    "--steps",
    4,
    "--lr",
    "0.1,0.4",
    "--seeds",
    "0,1",
    "--max-norm",
    "0.05",
    "--norm-type",
    "2",
    "--amp",
    "fp16",
    "--amp-init-scale",
    FORCES_SKIPS,
    "--accumulate",
    2,
]


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "r"
    junit = out.parent / "junit.xml"
    result = invoke("sweep", *GRID_ARGS, "--out", out, "--junit", junit)
    return result, out, junit


def test_grid_sweep_writes_every_axis_to_the_reports(grid_sweep):
    import pandas as pd

    result, out, junit = grid_sweep
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["run"]) == [
        f"{base}@lr={lr},seed={seed}"
        for seed in (0, 1)
        for lr in ("0.1", "0.4")
        for base in ("unclipped", "clip_0.05_2")
    ]
    assert list(summary["lr"]) == [0.1, 0.1, 0.4, 0.4] * 2 and list(summary["seed"]) == [0] * 4 + [1] * 4
    assert (summary["skipped_steps"] >= 1).all() and (summary["first_skip"] == 1).all()
    steps = pd.read_csv(out / "steps.csv")
    assert set(steps.columns) >= {"lr", "skipped", "seed"} and set(steps["skipped"]) == {0, 1}
    # fairness per (lr, seed): step 1 is identical across the runs sharing them
    first = steps[steps["step"] == 1].merge(summary[["run", "lr", "seed"]], on="run", suffixes=("_step", ""))
    assert (first.groupby(["lr", "seed"])["loss"].nunique() == 1).all()
    assert "stable 2/2" in result.stdout and "stability: lr x max_norm" in result.stdout
    # the verdict is the last line before the recommendation
    verdict = [line for line in result.stdout.strip().splitlines() if not line.startswith("recommendation:")][-1]
    assert "lr=" in verdict and ("in every seed" in verdict or "in all 2 seeds" in verdict)

    from junitparser import JUnitXml

    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert [case.name for case in suite] == list(summary["run"])


def test_grid_sweep_resumes_with_its_axes(grid_sweep, tmp_path):
    import json
    import shutil

    _, out, _ = grid_sweep
    part = tmp_path / "part"
    shutil.copytree(out, part)
    manifest = json.loads((part / "gradclip-sweep.json").read_text())
    manifest["finished_runs"] = manifest["finished_runs"][:3]  # as if interrupted after 3 runs
    (part / "gradclip-sweep.json").write_text(json.dumps(manifest))
    resumed = invoke("sweep", *GRID_ARGS, "--out", part, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 3 of 8 runs" in resumed.stderr
    for name in ("steps.csv", "histograms.csv"):
        assert (part / name).read_bytes() == (out / name).read_bytes()
    refused = invoke("sweep", *GRID_ARGS[:-2], "--accumulate", 1, "--out", part, "--resume")
    assert refused.exit_code == 2 and "--accumulate 2 (saved) vs 1 (now)" in refused.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seed", "1", "--seeds", "0,1"], "--seed 1 and --seeds 0,1 disagree"),
        (["--seeds", "0,x"], "'x'"),
        (["--amp", "fp8"], "--amp 'fp8' is not a precision mode"),
        (["--accumulate", "0"], "--accumulate 0"),
        (["--lr", "0.1,-1"], "--lr '-1'"),
    ],
)
def test_bad_axis_options_exit_2(tmp_path, args, needle):
    result = invoke(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", 1, "--norm-type", "2", *args, "--out", tmp_path / "r"
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_seed_and_seeds_that_agree_are_one_seed(tmp_path):
    import pandas as pd

    result = invoke(
        "sweep",
        SCRIPTS / "stable_linear.py",
        "--steps",
        2,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--seed",
        3,
        "--seeds",
        "3",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert list(summary["run"]) == ["unclipped", "clip_1_2"] and list(summary["seed"]) == [3, 3]


def test_check_trains_with_amp_and_accumulation(tmp_path):
    result = invoke(
        "check",
        AMP_SCRIPT,
        "--steps",
        6,
        "--amp",
        "fp16",
        "--amp-init-scale",
        FORCES_SKIPS,
        "--accumulate",
        2,
        "--lr",
        0.05,
        "--json",
    )
    assert result.exit_code == 0, result.output
    import json

    [row] = json.loads(result.stdout)
    assert row["status"] == "stable" and row["lr"] == 0.05 and row["skipped_steps"] >= 1


def test_under_fp16_a_non_finite_loss_is_still_a_forward_onset():
    [r] = sweep(
        SCRIPTS / "nan_forward.py", steps=8, amp="fp16", amp_init_scale=1.0, max_norms=(1.0,), norm_types=(2.0,)
    )[:1]
    assert (r.status, r.nan_step, r.nan_source, r.skipped_steps) == (NON_FINITE, 5, SOURCE_FORWARD, 0)
    assert math.isnan(r.steps[-1].loss) and not r.steps[-1].skipped


def test_a_half_precision_model_under_fp16_is_an_error_run_that_says_why(tmp_path):
    script = write(
        tmp_path,
        "half.py",
        """
        import torch
        def build_model():
            return torch.nn.Linear(2, 1).half()
        def batches():
            return [torch.ones(1, 2, dtype=torch.half)]
        def loss_fn(model, batch):
            return model(batch).float().sum()
        """,
    )
    [r] = sweep(script, steps=2, amp="fp16", max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert r.status == ERROR and "--amp fp16 cannot unscale" in r.error and "float32" in r.error


def test_fp16_with_an_optimizer_holding_no_gradient_keeps_training(tmp_path):
    # the optimizer holds only a parameter the loss does not use: the scaler checks nothing
    script = write(
        tmp_path,
        "unused.py",
        """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.used = torch.nn.Linear(2, 1)
                self.unused = torch.nn.Parameter(torch.ones(1))
            def forward(self, x):
                return self.used(x)
        def build_model():
            return Net()
        def build_optimizer(model):
            return torch.optim.SGD([model.unused], lr=0.1)
        def batches():
            return [torch.ones(2, 2)]
        def loss_fn(model, batch):
            return model(batch).pow(2).mean()
        """,
    )
    [r] = sweep(script, steps=3, amp="fp16", amp_init_scale=1.0, max_norms=(1.0,), norm_types=(2.0,))[:1]
    assert r.status == STABLE and len(r.steps) == 3 and r.skipped_steps == 0
