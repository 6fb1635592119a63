"""Sparse gradients end to end: sweeps of models with ``nn.Embedding(sparse=True)`` /
``nn.EmbeddingBag(sparse=True)``, with the default SGD and with ``SparseAdam``, against plain torch
loops on dense references (torch's own ``clip_grad_norm_`` cannot measure sparse gradients).

The engine-level checks (every norm type, duplicates, foreach, the device path) are in
test_engine.py; these check that a sweep runs such models and clips what the optimizer sees."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from reference_loop import reference_training

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import NON_FINITE, SOURCE_BACKWARD, STABLE
from gradcheck_cli.runner import first_non_finite_param
from gradcheck_cli.snapshot import seed_everything
from gradcheck_cli.sweep import run_sweep

SCRIPTS = Path(__file__).parent / "scripts"
STEPS = 8
GRID = {"max_norms": (0.1, 1.0), "norm_types": (2.0, math.inf)}
# float32 gradients whose norms the engine and torch compute in different orders (about 1e-7
# apart), fed back through 8 optimizer steps: 1e-5 relative leaves room for that and for
# nothing else (a missing clip changes the losses by percents)
RTOL = 1e-5


def sweep(name: str, **kw):
    cfg = SweepConfig(script=SCRIPTS / f"{name}.py", steps=STEPS, **{**GRID, **kw})
    return cfg, run_sweep(cfg, load_experiment(cfg.script))


def densified(experiment):
    """The same script with every sparse embedding switched to dense gradients (the same
    weights: only the backward's layout changes)."""

    def build_model():
        model = experiment.build_model_fn()
        for module in model.modules():
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                module.sparse = False
        return model

    return dataclasses.replace(experiment, build_model_fn=build_model)


def sparse_reference(experiment, steps: int, *, max_norm=None, norm_type=2.0, seed: int = 0):
    """Losses and pre-clip norms of a plain torch loop that keeps the gradients sparse (as
    SparseAdam needs): the norm is torch's ``get_total_norm`` of the gradients' dense copies, and
    clipping multiplies each gradient by torch's coefficient ``clamp(max_norm / (norm + 1e-6),
    max=1)``. Seeded and ordered as ``reference_loop.reference_training``."""
    seed_everything(seed)
    model = experiment.build_model_fn()
    seed_everything(seed)
    optimizer = experiment.build_optimizer_fn(model)
    losses, norms = [], []
    batches = iter(experiment.batches_fn())
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(experiment.batches_fn())
            batch = next(batches)
        optimizer.zero_grad()
        loss = experiment.loss_fn(model, batch)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.is_sparse for g in grads)
        norm = torch.nn.utils.get_total_norm([g.to_dense() for g in grads], norm_type)
        if max_norm is not None:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = p.grad * coef
        optimizer.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


def assert_run_matches(result, losses, norms):
    assert result.status == STABLE, (result.run, result.error)
    assert len(result.steps) == STEPS
    got_losses = [s.loss for s in result.steps]
    got_norms = [s.grad_norm for s in result.steps]
    assert got_losses == pytest.approx(losses, rel=RTOL), result.run
    assert got_norms == pytest.approx(norms, rel=RTOL), result.run


def test_a_real_embedding_gradient_is_sparse_and_uncoalesced():
    """The premise of the tests below: the scripts produce sparse COO gradients with duplicate
    entries (a token twice in a bag), which torch's clip_grad_norm_ rejects."""
    exp = load_experiment(SCRIPTS / "sparse_embedding.py")
    model = exp.build_model_fn()
    batch = next(iter(exp.batches_fn()))
    exp.loss_fn(model, batch).backward()
    grad = model.weight.grad
    assert grad.is_sparse and not grad.is_coalesced()
    assert grad._nnz() > grad.coalesce()._nnz()  # duplicates
    with pytest.raises(NotImplementedError):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


@pytest.mark.parametrize("name", ["sparse_embedding", "sparse_mixed"])
def test_sgd_sweep_matches_the_dense_model_under_torch(name):
    """With SGD a sparse gradient updates exactly what its dense copy would: every run of the
    sweep must follow torch's own loop (torch's clip_grad_norm_) on the same model made dense."""
    cfg, results = sweep(name)
    assert [r.cell for r in results] == cfg.cells()
    dense_experiment = densified(load_experiment(cfg.script))
    for result in results:
        cell = result.cell
        history = reference_training(
            dense_experiment, STEPS, lr=cfg.lr_of(cell), max_norm=cell.max_norm, norm_type=cell.norm_type
        )
        assert_run_matches(result, [h.loss for h in history], [h.norm for h in history])
    # clipping acted: the clipped runs leave the unclipped one after the first step
    unclipped = results[0]
    assert all(r.steps[0].loss == unclipped.steps[0].loss for r in results)
    assert any(r.steps[-1].loss != unclipped.steps[-1].loss for r in results[1:])
    assert any(s.clip_coef < 1.0 for r in results[1:] for s in r.steps)


def test_sparse_adam_sweep_matches_a_plain_torch_loop():
    cfg, results = sweep("sparse_adam")
    experiment = load_experiment(cfg.script)
    assert results[0].run == "unclipped"
    for result in results:
        cell = result.cell
        losses, norms = sparse_reference(experiment, STEPS, max_norm=cell.max_norm, norm_type=cell.norm_type)
        assert_run_matches(result, losses, norms)
    assert any(s.clip_coef < 1.0 for r in results[1:] for s in r.steps)
    # SparseAdam's moments make the unclipped and clipped runs differ
    assert len({r.steps[-1].loss for r in results}) > 1


def test_sparse_nan_onset_names_the_embedding():
    _, results = sweep("sparse_nan")
    for result in results:
        assert result.status == NON_FINITE
        assert result.nan_step == 3
        assert result.nan_source == SOURCE_BACKWARD
        assert result.nan_param == "embedding.weight"  # not "scale", which comes first
        assert math.isfinite(result.steps[-1].loss) and math.isnan(result.steps[-1].grad_norm)


def testfirst_non_finite_param_sums_duplicates_first():
    """Two finite entries for one element can sum to inf: judged on the coalesced values, as
    the engine measures them; the gradient itself is left as it was."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Embedding(4, 1, sparse=True))
    model[0].weight.grad = torch.ones(2, 2)
    overflow = torch.sparse_coo_tensor([[1, 1]], [[3e38], [3e38]], (4, 1), check_invariants=True)
    model[1].weight.grad = overflow
    assert first_non_finite_param(model) == "1.weight"
    assert model[1].weight.grad is overflow and not overflow.is_coalesced()
    model[1].weight.grad = torch.sparse_coo_tensor([[1, 1]], [[3e38], [-3e38]], (4, 1), check_invariants=True)
    assert first_non_finite_param(model) is None
    model[0].weight.grad[0, 0] = math.nan
    assert first_non_finite_param(model) == "0.weight"


def test_cli_sweep_of_a_sparse_adam_script(tmp_path):
    """The command line end to end: exit 0, every run stable, the numbers written."""
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(SCRIPTS / "sparse_adam.py"),
            "--steps",
            "4",
            "--max-norm",
            "0.1",
            "--norm-type",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["run"]) == ["unclipped", "clip_0.1_2"]
    assert (summary["status"] == STABLE).all()
    steps = pd.read_csv(out / "steps.csv")
    clipped = steps[steps["run"] == "clip_0.1_2"]
    assert len(clipped) == 4 and (clipped["clip_coef"] < 1).all()
