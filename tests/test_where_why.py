"""Where and why a run blows up, end to end through real sweeps and their files: per-layer norms
that combine into the step's total, the spike found where it was injected, the control's norm in
every norm type, evaluate(), divergence that cannot be judged, --refine and its resume."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from reference_loop import reference_training
from typer.testing import CliRunner

from gradcheck_cli.cli import app
from gradcheck_cli.loader import load_experiment

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
SPIKE = SCRIPTS / "spike_at_step.py"

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name, dtype={"norm_type": str})


def _p(text: str) -> float:
    return float(text)


def combine(norms: list[float], p: float) -> float:
    """The p-norm of the layer norms, in float64 (plain torch as the reference)."""
    return float(torch.linalg.vector_norm(torch.tensor(norms, dtype=torch.float64), p))


@pytest.fixture(scope="module")
def spike_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("spike") / "report"
    result = invoke(
        "sweep", SPIKE, "--steps", 12, "--lr", 0.05, "--max-norm", "0.5,5", "--norm-type", "1,2,inf", "--out", out
    )
    assert result.exit_code == 0, result.output
    return result, out


# --- per-layer norms ---------------------------------------------------------------------------


def test_layer_norms_combine_into_the_steps_total_for_l1_l2_and_inf(spike_sweep):
    _, out = spike_sweep
    steps, layers, summary = read(out, "steps.csv"), read(out, "layers.csv"), read(out, "summary.csv")
    norm_type = dict(zip(summary["run"], summary["norm_type"].map(_p)))
    checked = {1.0: 0, 2.0: 0, math.inf: 0}
    for (run, step), rows in layers.groupby(["run", "step"]):
        assert list(rows["param"]) == [
            "body.0.weight",
            "body.0.bias",
            "body.2.weight",
            "body.2.bias",
            "head.weight",
            "head.bias",
        ]
        total = steps[(steps["run"] == run) & (steps["step"] == step)]["grad_norm"].item()
        p = norm_type[run]
        assert combine(list(rows["grad_norm"]), p) == pytest.approx(total, rel=1e-6), (run, step)
        checked[p] += 1
    assert all(n >= 12 for n in checked.values()), checked
    # every step that measured a norm has its layers
    assert len(layers) == 6 * steps["grad_norm"].notna().sum()


def test_layer_norms_equal_each_parameters_gradient_norm_at_step_1(spike_sweep):
    _, out = spike_sweep
    layers = read(out, "layers.csv")
    exp = load_experiment(SPIKE)
    torch.manual_seed(0)
    model = exp.build_model_fn()
    batch = next(iter(exp.batches_fn()))
    exp.loss_fn(model, batch).backward()
    for name, prm in model.named_parameters():
        for run, p in (("unclipped", 2.0), ("clip_0.5_1", 1.0), ("clip_5_inf", math.inf)):
            got = layers[(layers["run"] == run) & (layers["step"] == 1) & (layers["param"] == name)]["grad_norm"].item()
            assert got == pytest.approx(float(torch.linalg.vector_norm(prm.grad.double(), p)), rel=1e-6), (run, name)


def test_layer_depth_groups_by_module_and_keeps_the_identity(tmp_path):
    out = tmp_path / "r"
    result = invoke(
        "sweep", SPIKE, "--steps", 4, "--max-norm", "1", "--norm-type", "inf,2", "--layer-depth", "1", "--out", out
    )
    assert result.exit_code == 0, result.output
    steps, layers = read(out, "steps.csv"), read(out, "layers.csv")
    assert list(dict.fromkeys(layers["param"])) == ["body.0", "body.2", "head"]  # an index belongs to its level
    for (run, step), rows in layers.groupby(["run", "step"]):
        total = steps[(steps["run"] == run) & (steps["step"] == step)]["grad_norm"].item()
        p = math.inf if run.endswith("_inf") else 2.0
        assert combine(list(rows["grad_norm"]), p) == pytest.approx(total, rel=1e-6)
    bad = invoke("sweep", SPIKE, "--layer-depth", "0", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--layer-depth" in bad.output


def test_control_records_every_norm_type_of_the_grid(spike_sweep):
    _, out = spike_sweep
    control = read(out, "control_norms.csv")
    assert set(control["run"]) == {"unclipped"}
    exp = load_experiment(SPIKE)
    steps = read(out, "steps.csv")
    n = steps[steps["run"] == "unclipped"]["grad_norm"].notna().sum()
    for p in (1.0, 2.0, math.inf):
        ours = control[control["norm_type"].map(_p) == p]["grad_norm"].tolist()
        reference = [h.norm for h in reference_training(exp, n, lr=0.05, norm_type=p)]
        assert ours == pytest.approx(reference, rel=1e-5), p


# --- the explosion's origin --------------------------------------------------------------------


def test_injected_spike_is_found_at_its_step_and_parameter(spike_sweep):
    result, out = spike_sweep
    summary = read(out, "summary.csv").set_index("run")
    control = summary.loc["unclipped"]
    # the spike multiplies the update 1e4-fold: the norm about to be applied stops the run there
    assert control["status"] == "diverged" and control["diverged_step"] == 6
    assert (control["spike_step"], control["spike_param"]) == (6, "body.2.weight")
    # clipping cannot stop the pre-clip gradient from spiking: every run sees it at step 6
    assert set(summary["spike_step"]) == {6} and set(summary["spike_param"]) == {"body.2.weight"}
    verdict = " ".join(result.stdout.split())
    assert (
        "unclipped: gradients of body.2.weight spike at step 6 and the run diverged at step 6: gradient norm" in verdict
    )


# --- evaluate() and divergence that cannot be judged ---------------------------------------------


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


_EVAL = """
    import torch
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 3, generator=g); Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])
    HX = torch.randn(32, 3, generator=g); HY = HX @ torch.tensor([[1.0], [-2.0], [0.5]])
    EVALUATE_HIGHER_IS_BETTER = True
    calls = []

    def build_model():
        return torch.nn.Linear(3, 1)

    def batches():
        return [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)]

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluate(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return -torch.nn.functional.mse_loss(model(HX), HY)   # a reward: higher is better
"""


def test_evaluate_metric_ranks_the_runs(tmp_path):
    script = write(tmp_path, "evalmodel.py", _EVAL)
    out = tmp_path / "r"
    result = invoke(
        "sweep", script, "--steps", 20, "--lr", 0.05, "--max-norm", "0.01,1", "--norm-type", "2", "--out", out
    )
    assert result.exit_code == 0, result.output
    summary = read(out, "summary.csv")
    assert summary["eval_metric"].notna().all() and (summary["eval_metric"] < 0).all()
    assert summary["eval_higher_is_better"].all()
    best = summary.loc[summary[summary["run"] != "unclipped"]["eval_metric"].idxmax(), "run"]
    text = " ".join(result.stdout.split())
    assert "eval_metric" in text
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["needs_clipping"] is False and rec["evidence"]["ranked_by"] == "eval_metric (higher is better)"
    assert best in text or "clipping not needed" in text


def test_evaluate_that_returns_no_number_is_an_error_run(tmp_path):
    script = write(tmp_path, "badeval.py", _EVAL.replace("return -torch", "return 'x', -torch"))
    result = invoke("sweep", script, "--steps", 2, "--max-norm", "1", "--norm-type", "2", "--out", tmp_path / "r")
    assert result.exit_code == 3
    summary = read(tmp_path / "r", "summary.csv")
    assert (summary["status"] == "error").all()
    assert summary["error"].str.contains("evaluate\\(model\\) must return a number").all()
    flag = write(
        tmp_path, "badflag.py", _EVAL.replace("EVALUATE_HIGHER_IS_BETTER = True", "EVALUATE_HIGHER_IS_BETTER = 'yes'")
    )
    result = invoke("sweep", flag, "--out", tmp_path / "r2")
    assert result.exit_code == 2 and "EVALUATE_HIGHER_IS_BETTER must be True or False" in result.output


_NEGATIVE = """
    import torch
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g)

    def build_model():
        return torch.nn.Linear(4, 1)

    def batches():
        return [X[i:i + 16] for i in range(0, 64, 16)]

    def loss_fn(model, x):
        return -torch.tanh(model(x)).mean() - 1.0   # a negative, reward-like loss
"""


def test_a_negative_loss_is_judged_against_its_own_early_steps(tmp_path):
    script = write(tmp_path, "negative.py", _NEGATIVE)
    out = tmp_path / "r"
    result = invoke("sweep", script, "--steps", 5, "--max-norm", "1", "--norm-type", "2", "--out", out)
    assert result.exit_code == 0, result.output
    summary = read(out, "summary.csv")
    assert summary["divergence_checked"].all() and (summary["status"] == "stable").all()
    assert "divergence not judged" not in " ".join(result.stdout.split())


def test_divergence_factor_inf_turns_the_check_off(tmp_path):
    out = tmp_path / "r"
    result = invoke(
        "sweep",
        SAMPLES / "exploding_rnn.py",
        "--steps",
        3,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--divergence-factor",
        "inf",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    summary = read(out, "summary.csv")
    assert (~summary["divergence_checked"]).all()
    assert "diverged" not in set(summary["status"])  # the exploding control now runs on (or goes non-finite)
    assert "divergence not judged (--divergence-factor inf)" in " ".join(result.stdout.split())
    manifest = json.loads((out / "gradclip-sweep.json").read_text())
    assert manifest["fingerprint"]["divergence_factor"] == "inf"
    resumed = invoke(
        "sweep",
        SAMPLES / "exploding_rnn.py",
        "--steps",
        3,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--divergence-factor",
        "inf",
        "--out",
        out,
        "--resume",
    )
    assert resumed.exit_code == 0, resumed.output


# --- --refine ------------------------------------------------------------------------------------


REFINE_ARGS = ("--steps", 25, "--max-norm", "1,10", "--norm-type", "2", "--refine", 2)


def test_refine_bisects_the_boundary_with_ordinary_runs(tmp_path):
    out = tmp_path / "r"
    junit = tmp_path / "j.xml"
    result = invoke("sweep", SAMPLES / "exploding_rnn.py", *REFINE_ARGS, "--out", out, "--junit", junit)
    assert result.exit_code == 0, result.output
    summary = read(out, "summary.csv")
    # grid: 1 stable, 10 diverged -> 3.16 (sqrt(10)) -> then sqrt(1 x 3.16) or sqrt(3.16 x 10)
    assert list(summary["run"])[:3] == ["unclipped", "clip_1_2", "clip_10_2"]
    refined = summary[summary["refined"]]
    assert list(refined["max_norm"])[0] == 3.16 and len(refined) == 2
    second = list(refined["max_norm"])[1]
    first_ok = refined.iloc[0]["status"] == "stable"
    assert second == (5.62 if first_ok else 1.78)
    # the boundary is bracketed: every stable max_norm lies below every unstable one
    clipped = summary[summary["run"] != "unclipped"]
    assert (
        clipped[clipped["status"] == "stable"]["max_norm"].max()
        < clipped[clipped["status"] == "diverged"]["max_norm"].min()
    )
    steps = read(out, "steps.csv")
    assert set(refined["run"]) <= set(steps["run"])
    assert junit.read_text().count("<testcase") == 5
    rec = json.loads((out / "recommendation.json").read_text())
    bound = rec["evidence"]["boundaries"][0]
    assert bound["largest_stable"] < bound["smallest_unstable"] and bound["factor"] < 3.17

    # resume: refined runs are finished runs too; drop the last one and it runs again, identically
    manifest_path = out / "gradclip-sweep.json"
    before = {name: read(out, name) for name in ("summary.csv", "steps.csv", "layers.csv")}
    manifest = json.loads(manifest_path.read_text())
    manifest["finished_runs"] = manifest["finished_runs"][:-1]
    manifest_path.write_text(json.dumps(manifest))
    again = invoke("sweep", SAMPLES / "exploding_rnn.py", *REFINE_ARGS, "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming: 4 of up to 5 runs already finished" in " ".join(again.output.split())
    after = {name: read(out, name) for name in ("summary.csv", "steps.csv", "layers.csv")}
    pd.testing.assert_frame_equal(before["steps.csv"], after["steps.csv"])
    pd.testing.assert_frame_equal(before["layers.csv"], after["layers.csv"])
    pd.testing.assert_frame_equal(
        before["summary.csv"].drop(columns="seconds"), after["summary.csv"].drop(columns="seconds")
    )
    # the runs kept from before were not run again
    kept = before["summary.csv"]["run"].iloc[:-1]
    b = before["summary.csv"].set_index("run").loc[kept, "seconds"]
    a = after["summary.csv"].set_index("run").loc[kept, "seconds"]
    pd.testing.assert_series_equal(b, a)


def test_refine_option_is_validated_and_in_the_fingerprint(tmp_path):
    bad = invoke("sweep", SPIKE, "--refine", -1, "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "--refine" in bad.output
    out = tmp_path / "r"
    assert invoke("sweep", SPIKE, "--steps", 2, "--max-norm", "1", "--norm-type", "2", "--out", out).exit_code == 0
    differ = invoke(
        "sweep", SPIKE, "--steps", 2, "--max-norm", "1", "--norm-type", "2", "--refine", 1, "--out", out, "--resume"
    )
    assert differ.exit_code == 2 and "--refine 0 (saved) vs 1 (now)" in " ".join(differ.output.split())
