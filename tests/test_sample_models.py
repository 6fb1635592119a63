"""The sample models follow the script contract and do what their docstrings promise, both in a
bare training loop (plain torch, nothing from gradclip) and through gradclip's own sweep."""

import math
import runpy
import time
from pathlib import Path

import pytest
import torch
from reference_loop import reference_training

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.recipes import load_recipe
from gradcheck_cli.results import DIVERGED, NON_FINITE, SOURCE_BACKWARD, STABLE
from gradcheck_cli.sweep import run_sweep

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
NAMES = ["exploding_rnn", "nan_at_step", "tiny_lm"]
RECIPE_VALUES = {
    "script",
    "max_norms",
    "norm_types",
    "steps",
    "seed",
    "seeds",
    "lr",
    "divergence_factor",
    "device",
    "amp",
    "accumulate",
    "amp_init_scale",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine, torch's default of one
    thread per core can be slower by an order of magnitude (threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def experiment(name):
    return load_experiment(SAMPLES / f"{name}.py")


def train(name, steps=100, lr=None, max_norm=None, norm_type=2.0, seed=0):
    """The reference loop (plain torch): per step (loss, pre-clip L2 norm, names of parameters
    with non-finite gradients)."""
    history = reference_training(
        experiment(name), steps, lr=lr, max_norm=max_norm, norm_type=norm_type, seed=seed, track_non_finite=True
    )
    return [(h.loss, h.norm, h.non_finite_params) for h in history]


def recipe_config(name, **overrides) -> SweepConfig:
    values = {k: v for k, v in load_recipe(name).items() if k in RECIPE_VALUES}
    values.update(overrides)
    return SweepConfig.from_values(values)


# --- the contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_follows_the_contract(name):
    exp = experiment(name)  # raises UsageError listing every problem otherwise
    torch.manual_seed(0)
    model = exp.build_model()
    assert isinstance(model, torch.nn.Module)
    first, second = list(exp.batches_fn()), list(exp.batches_fn())
    assert len(first) == len(second) > 0
    for a, b in zip(first[:3], second[:3]):  # deterministic: the same batches on every call
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    loss = exp.loss_fn(model, first[0])
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)


def test_batches_leave_the_global_rng_alone():
    for name in NAMES:
        state = torch.get_rng_state()
        list(experiment(name).batches_fn())
        assert torch.equal(state, torch.get_rng_state()), name


@pytest.mark.parametrize("name", NAMES)
def test_main_block_trains_by_itself(name, capsys):
    runpy.run_path(str(SAMPLES / f"{name}.py"), run_name="__main__")
    assert "step" in capsys.readouterr().out


# --- exploding_rnn ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed, lr", [(0, 0.01), (1, 0.01), (2, 0.01), (0, 0.005), (3, 0.03)])
def test_exploding_rnn_diverges_unclipped_and_trains_clipped(seed, lr):
    unclipped = train("exploding_rnn", steps=2, lr=lr, seed=seed)
    first = unclipped[0][0]
    assert math.isfinite(first) and first > 0
    assert not (unclipped[1][0] <= 10 * first)  # step 2: more than 10x the first loss, or NaN/inf

    clipped = train("exploding_rnn", lr=lr, max_norm=1.0, seed=seed)
    losses = [loss for loss, _, _ in clipped]
    assert all(math.isfinite(x) and x <= 10 * first for x in losses)  # never diverged
    assert sum(losses[-10:]) / 10 < 0.35 * first  # and it learned
    assert max(norm for _, norm, _ in clipped) > 1.0  # clipping was active


def test_exploding_rnn_recipe_through_gradclip():
    config = recipe_config("exploding_rnn")
    start = time.perf_counter()
    results = {r.run: r for r in run_sweep(config, experiment("exploding_rnn"))}
    assert time.perf_counter() - start < 60  # the whole default sweep of 7 runs
    control = results["unclipped"]
    assert (control.status, control.diverged_step) == (DIVERGED, 2)
    for run in ("clip_1_2", "clip_0.1_2"):
        assert results[run].status == STABLE and len(results[run].steps) == 100
        assert results[run].steps[-1].loss < 0.2 * results[run].steps[0].loss
    assert results["clip_10_2"].status == DIVERGED  # max_norm 10 is not enough at this lr


# --- nan_at_step --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [None, 1.0, 1e-3])
def test_nan_at_step_5_in_head_weight(max_norm):
    module = runpy.run_path(str(SAMPLES / "nan_at_step.py"))
    assert (module["NAN_STEP"], module["NAN_PARAM"]) == (5, "head.weight")
    history = train("nan_at_step", steps=5, max_norm=max_norm)
    for loss, norm, bad in history[:4]:
        assert math.isfinite(loss) and math.isfinite(norm) and bad == []
    loss, norm, bad = history[4]
    assert math.isfinite(loss)  # the forward pass is fine: the onset is in the backward pass
    assert math.isnan(norm)
    assert bad == ["head.weight"]


def test_nan_at_step_through_gradclip():
    results = run_sweep(recipe_config("nan_at_step", max_norms=(0.01, 1.0)), experiment("nan_at_step"))
    assert len(results) == 3
    for r in results:
        assert (r.status, r.nan_step, r.nan_source, r.nan_param) == (NON_FINITE, 5, SOURCE_BACKWARD, "head.weight")


# --- tiny_lm ------------------------------------------------------------------------------------


def test_tiny_lm_loss_decreases():
    history = train("tiny_lm", steps=100)
    losses = [loss for loss, _, _ in history]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(29), abs=0.3)  # about uniform over the characters
    assert sum(losses[-10:]) / 10 < losses[0] - 1.0


def test_tiny_lm_recipe_is_stable_everywhere():
    results = run_sweep(recipe_config("tiny_lm"), experiment("tiny_lm"))
    assert [r.run for r in results] == ["unclipped", "clip_0.1_2", "clip_1_2", "clip_5_2"]
    for r in results:
        assert r.status == STABLE and len(r.steps) == 100
        assert r.steps[-1].loss < r.steps[0].loss - 1.0


def test_tiny_lm_grid_recipe_trains_every_lr_and_seed_in_bf16():
    config = recipe_config("tiny_lm_grid", steps=3)
    assert (config.amp, config.accumulate, config.lrs, config.seeds) == ("bf16", 2, (0.003, 0.03), (0, 1, 2))
    results = run_sweep(config, experiment("tiny_lm"))
    assert len(results) == 12 and results[0].run == "unclipped@lr=0.003,seed=0"
    for r in results:
        assert r.status == STABLE
        # the script's warm-up, from the lr the axis set: lr/10, 2 lr/10, 3 lr/10
        assert [s.lr for s in r.steps] == [r.lr * min(1.0, (i + 1) / 10) for i in range(3)]
