"""The cases of issue 21, end to end through real sweeps, each checked against a plain torch loop
written here: a policy gradient that learns (no false divergence), a GAN through train_step (no
false fairness warning, no ranking by its summed loss), an evaluate() that is near-perfect for
every run (no "meaningfully better" on nothing), a collapsed evaluate() (diverged), evaluate() on
a diverged run, and state carried between train_step runs (named at the first clip call)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from gradcheck_cli.cli import app
from gradcheck_cli.detect import is_diverged
from gradcheck_cli.loader import load_experiment

SCRIPTS = Path(__file__).resolve().parent / "scripts"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def sweep(script, out: Path, *args):
    result = invoke("sweep", script, *args, "--out", out)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index("run")
    rec = json.loads((out / "recommendation.json").read_text())
    return result, summary, rec


def verdict_lines(result) -> tuple[str, str]:
    lines = result.stdout.splitlines()
    verdict = next(line for line in lines if line.startswith(("best:", "clipping not needed", "stable", "no ")))
    return verdict, next(line for line in lines if line.startswith("recommendation:"))


def plain_loop(exp, steps: int, step_fn, seed: int = 0):
    """Seed, build the model, seed again, build the optimizer, then ``step_fn(model, optimizer,
    batch)`` per step, as a sweep's run starts (the RNG of step 1 is the seeded one)."""
    torch.manual_seed(seed)
    model = exp.build_model_fn()
    torch.manual_seed(seed)
    optimizer = exp.build_optimizer_fn(model)
    batches, out = iter(exp.batches_fn()), []
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(exp.batches_fn())
            batch = next(batches)
        out.append(step_fn(model, optimizer, batch))
    return model, out


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- a policy gradient that learns is not diverged ---------------------------------------------

PG = SCRIPTS / "policy_gradient.py"
PG_STEPS = 30


def test_a_policy_gradient_that_learns_is_stable_clipped_or_not(tmp_path):
    exp = load_experiment(PG)

    def step(model, optimizer, batch):
        optimizer.zero_grad()
        loss = exp.loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    torch.manual_seed(0)
    with torch.no_grad():
        untrained = float(exp.evaluate_fn(exp.build_model_fn()))
    model, losses = plain_loop(exp, PG_STEPS, step)
    with torch.no_grad():
        trained = float(exp.evaluate_fn(model))
    # the plain loop learns: greedy episodes from 9 steps to (almost) the whole horizon, all finite
    assert untrained < 10.0 and trained >= 2.5 * untrained
    assert all(math.isfinite(x) for x in losses)
    # ... while a ratio to the first loss would call it diverged at step 3 (0.28, then 2.8)
    assert losses[0] > 0 and is_diverged(losses[2], losses[0], 10.0)

    result, summary, rec = sweep(PG, tmp_path / "r", "--steps", PG_STEPS, "--max-norm", "1,100", "--norm-type", "2")
    assert list(summary["status"]) == ["stable"] * 3
    steps = pd.read_csv(tmp_path / "r" / "steps.csv")
    assert steps[steps["run"] == "unclipped"]["loss"].tolist() == pytest.approx(losses, rel=1e-5)
    assert float(summary.loc["unclipped", "eval_metric"]) == pytest.approx(trained, rel=1e-6)
    verdict, line = verdict_lines(result)
    assert verdict.startswith("clipping not needed: unclipped is stable, eval_metric")
    assert "meaningfully better than" not in verdict and "noise judged by nothing" in verdict
    assert rec["needs_clipping"] is False and rec["evidence"]["ranked_by"] == "eval_metric (higher is better)"
    assert line.startswith("recommendation: no clipping needed (the unclipped run is stable")


# --- a GAN through train_step ------------------------------------------------------------------

GAN = SCRIPTS / "gan_train_step.py"


def test_a_gan_is_judged_on_stability_with_no_false_fairness_warning(tmp_path):
    exp = load_experiment(GAN)
    clip_at = {}

    def clip(params, name=None):
        params = list(params)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if clip_at.get("max_norm") is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_at["max_norm"], norm)
        clip_at.setdefault("norms", []).append(float(norm))
        return norm

    def step(model, optimizers, batch):
        return float(exp.train_step_fn(model, batch, optimizers, clip))

    model, losses = plain_loop(exp, 40, step)
    first_norm = clip_at["norms"][0]
    assert all(math.isfinite(x) for x in losses + clip_at["norms"])  # unclipped, the GAN trains on
    # clipped at 0.1, step 1's loss differs (G's loss follows D's clipped update); D's first norm does not
    clip_at.clear()
    clip_at["max_norm"] = 0.1
    _, clipped = plain_loop(exp, 1, step)
    assert clipped[0] != losses[0] and clip_at["norms"][0] == first_norm

    result, summary, rec = sweep(GAN, tmp_path / "r", "--steps", 40, "--max-norm", "0.1,1", "--norm-type", "2,inf")
    assert set(summary["status"]) == {"stable"} and set(summary["warnings"]) == {""}
    assert "warning:" not in result.stdout
    sites = pd.read_csv(tmp_path / "r" / "clip_sites.csv")
    assert sites[(sites["run"] == "unclipped") & (sites["step"] == 1)]["grad_norm"].iloc[0] == pytest.approx(first_norm)
    verdict, line = verdict_lines(result)
    why = (
        "judged on stability only, as the loss sums the objectives of 2 clip sites (discriminator, generator) "
        "and measures no quality (define evaluate() to rank runs)"
    )
    assert (
        verdict
        == f"clipping not needed: unclipped is stable; stable too: clip_0.1_2, clip_0.1_inf, clip_1_2, clip_1_inf; {why}"
    )
    assert line == f"recommendation: no clipping needed (the unclipped run is stable; {why})"
    assert rec["needs_clipping"] is False and rec["evidence"]["ranked_by"] == "stability"
    again = invoke("report", tmp_path / "r")  # the files read back (clip sites included) tell the same story
    assert again.exit_code == 0 and verdict_lines(again) == (verdict, line)


def test_a_gan_with_evaluate_is_ranked_by_it(tmp_path):
    script = write(tmp_path, "gan_eval.py", GAN.read_text() + "\n\ndef evaluate(model):\n    return distance(model)\n")
    result, summary, rec = sweep(script, tmp_path / "r", "--steps", 20, "--max-norm", "0.1", "--norm-type", "2")
    assert set(summary["status"]) == {"stable"} and (summary["eval_metric"].astype(float) > 0).all()
    assert rec["evidence"]["ranked_by"] == "eval_metric" and rec["needs_clipping"] is False
    verdict, _ = verdict_lines(result)
    assert "eval_metric" in verdict and "smoothed loss" not in verdict and "meaningfully better than" not in verdict


# --- an evaluate() near-perfect for every run ------------------------------------------------------

NEAR = SCRIPTS / "near_perfect.py"


def test_near_perfect_scores_are_not_meaningfully_different(tmp_path):
    exp = load_experiment(NEAR)
    finals = {}
    for max_norm in (None, 10.0):

        def step(model, optimizer, batch, max_norm=max_norm):
            optimizer.zero_grad()
            loss = exp.loss_fn(model, batch)
            loss.backward()
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            return loss.item()

        model, _ = plain_loop(exp, 60, step)
        with torch.no_grad():
            finals[max_norm] = float(exp.evaluate_fn(model))
    # both reach a perfect score: held-out error below 1e-6, the two differing by a factor
    assert max(finals.values()) < 1e-6 and finals[None] != finals[10.0]

    result, summary, rec = sweep(NEAR, tmp_path / "r", "--steps", 60, "--max-norm", "1,10", "--norm-type", "2")
    assert float(summary.loc["unclipped", "eval_metric"]) == pytest.approx(finals[None], rel=1e-3)
    assert float(summary.loc["clip_10_2", "eval_metric"]) == pytest.approx(finals[10.0], rel=1e-3)
    verdict, line = verdict_lines(result)
    assert verdict.startswith("clipping not needed: unclipped is stable, eval_metric")
    assert verdict.endswith(
        "noise judged by nothing, as one evaluate() number per run has no spread; run several --seeds to judge differences)"
    )
    assert "meaningfully better than" not in result.stdout
    assert rec["needs_clipping"] is False and "no clipped setting is meaningfully better" in rec["reason"]


# --- evaluate() collapsing, and evaluate() on a diverged run ----------------------------------------

_PULL = """
import torch

def build_model():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(1.0)
    return m

def batches():
    return [torch.ones(4, 1)]

def loss_fn(model, x):
    return ((model(x) - 10.0 * x) ** 2).mean()   # pulls w from 1 to 10

EVALUATE_HIGHER_IS_BETTER = True

def evaluate(model):
    return -model.weight.pow(2).sum()            # -1 untrained: it prefers w near 0
"""


def test_a_collapsed_evaluate_is_a_divergence(tmp_path):
    script = write(tmp_path, "pull.py", _PULL)
    result, summary, rec = sweep(
        script, tmp_path / "r", "--steps", 20, "--lr", 0.1, "--max-norm", "0.01", "--norm-type", "2"
    )
    control = summary.loc["unclipped"]
    # the loss fell as it should, but evaluate() ends far below the untrained model's -1
    assert control["status"] == "diverged" and control["diverged_step"] == "" and float(control["eval_metric"]) < -50
    assert control["warnings"] == "eval_collapsed:-1.0"
    assert summary.loc["clip_0.01_2", "status"] == "stable"
    verdict, _ = verdict_lines(result)
    assert "unclipped: diverged: evaluate() gave -" in verdict and "worse than -1 before training" in verdict
    assert (rec["needs_clipping"], rec["run"]) == (True, "clip_0.01_2")


def test_evaluate_runs_at_the_end_of_a_diverged_run_and_may_fail_there(tmp_path):
    diverge = (SCRIPTS / "diverge.py").read_text()
    script = write(tmp_path, "div_eval.py", diverge + "\n\ndef evaluate(model):\n    return model.weight.abs().sum()\n")
    _, summary, _ = sweep(script, tmp_path / "r", "--steps", 10, "--lr", 1.5, "--max-norm", "1", "--norm-type", "2")
    assert summary.loc["unclipped", "status"] == "diverged" and int(summary.loc["unclipped", "diverged_step"]) == 4
    assert float(summary.loc["unclipped", "eval_metric"]) == 8.0  # w stopped at -8
    failing = write(
        tmp_path,
        "div_fail.py",
        diverge
        + "\n\ndef evaluate(model):\n    assert model.weight.abs().item() < 2, 'diverged model'\n    return 0.0\n",
    )
    _, summary, _ = sweep(failing, tmp_path / "f", "--steps", 10, "--lr", 1.5, "--max-norm", "1", "--norm-type", "2")
    # the diverged run stays diverged, without a metric; the stable run's evaluate() works
    assert summary.loc["unclipped", "status"] == "diverged" and summary.loc["unclipped", "eval_metric"] == ""
    assert summary.loc["clip_1_2", "status"] == "stable"


# --- state carried between train_step runs is named at the first clip call ----------------------------

_STATEFUL = """
import torch

calls = [0]

def build_model():
    return torch.nn.Linear(2, 1)

def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)

def batches():
    return [torch.ones(4, 2)]

def train_step(model, batch, optimizer, clip):
    calls[0] += 1                                 # a counter that outlives the run
    optimizer.zero_grad()
    loss = calls[0] * model(batch).pow(2).mean()
    loss.backward()
    clip(model.parameters())
    optimizer.step()
    return loss.detach()
"""


def test_state_carried_between_train_step_runs_is_named_at_the_first_clip_call(tmp_path):
    script = write(tmp_path, "stateful.py", _STATEFUL)
    # every run trained (--no-share): a run built from the control's steps carries nothing over
    args = ("--steps", 2, "--max-norm", "1,2", "--norm-type", "2", "--no-share")
    result, summary, _ = sweep(script, tmp_path / "r", *args)
    assert list(summary["warnings"]) == ["", "step1_norm_differs:unclipped", "step1_norm_differs:unclipped"]
    assert "warning: clip_1_2: the pre-clip gradient norm at step 1's first clip call differs" in result.stdout
