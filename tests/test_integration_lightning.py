"""GradclipCallback in a real Lightning Trainer.fit, against float64 norms taken by a reference
callback at on_before_optimizer_step (pre-clip, unscaled)."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from gradcheck_cli.integrations.lightning import GradclipCallback  # noqa: E402
from gradcheck_cli.results import STEP_COLUMNS, SUMMARY_COLUMNS  # noqa: E402

NAMES = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


@pytest.fixture(autouse=True)
def quiet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)


class Tiny(L.LightningModule):
    def __init__(self, nan_at: int | None = None, nan_param: str = "net.2.weight") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at = nan_at
        self.nan_param = nan_param
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self):
        # poison the gradient of one parameter in the optimizer step self.nan_at (from 1)
        if self.nan_at is not None and self.trainer.global_step + 1 == self.nan_at:
            dict(self.named_parameters())[self.nan_param].grad.fill_(math.nan)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Reference(L.Callback):
    """Float64 norms of the gradients exactly where Lightning exposes them pre-clip."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().double().flatten() for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads))))


def loader(n=12, batch=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n * batch, 4, generator=g), torch.randn(n * batch, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def fit(module, callbacks, **kw):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(module, loader())
    return trainer


@pytest.mark.parametrize("clip", [None, 0.3])
def test_fit_records_pre_clip_norms_losses_and_coefficients(tmp_path, clip):
    ref, module = Reference(), Tiny()
    fit(module, [ref, GradclipCallback(out=tmp_path)], gradient_clip_val=clip)
    summary, steps = pd.read_csv(tmp_path / "summary.csv"), pd.read_csv(tmp_path / "steps.csv")
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and list(steps.columns) == STEP_COLUMNS
    assert steps["step"].tolist() == list(range(1, 13))
    assert steps["grad_norm"].tolist() == pytest.approx(ref.norms, rel=1e-6)
    assert steps["loss"].tolist() == pytest.approx(module.losses, rel=1e-6)
    expected = [1.0 if clip is None else min(clip / (n + 1e-6), 1.0) for n in ref.norms]
    assert steps["clip_coef"].tolist() == pytest.approx(expected, rel=1e-6)
    if clip is not None:
        assert (steps["clip_coef"] < 1).any()
    assert steps["lr"].eq(0.05).all() and steps["skipped"].eq(0).all()
    assert layers[layers["step"] == 1]["param"].tolist() == NAMES
    row = summary.iloc[0]
    assert row["run"] == "monitor" and row["status"] == "stable" and row["steps"] == 12
    assert pd.isna(row["max_norm"]) if clip is None else row["max_norm"] == clip
    assert torch.nn.utils.clip_grad_norm_ is torch.nn.utils.clip_grad.clip_grad_norm_
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"  # restored


def test_accumulation_measures_the_accumulated_gradient(tmp_path):
    ref, module = Reference(), Tiny()
    fit(module, [ref, GradclipCallback(out=tmp_path)], accumulate_grad_batches=3, gradient_clip_val=0.5)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert len(steps) == 4 and len(ref.norms) == 4
    assert steps["grad_norm"].tolist() == pytest.approx(ref.norms, rel=1e-6)
    means = [sum(module.losses[i : i + 3]) / 3 for i in range(0, 12, 3)]
    assert steps["loss"].tolist() == pytest.approx(means, rel=1e-6)


@pytest.mark.parametrize("stop", [False, True])
def test_nan_at_a_known_step_and_parameter(tmp_path, stop):
    module = Tiny(nan_at=4, nan_param="net.0.bias")
    trainer = fit(module, [GradclipCallback(out=tmp_path, stop_on_non_finite=stop)], gradient_clip_val=1.0)
    summary, steps = pd.read_csv(tmp_path / "summary.csv"), pd.read_csv(tmp_path / "steps.csv")
    row = summary.iloc[0]
    assert row["status"] == "non_finite" and row["nan_step"] == 4
    assert row["nan_source"] == "backward" and row["nan_param"] == "net.0.bias"
    if stop:
        assert trainer.should_stop and len(steps) == 4 and trainer.global_step == 4
    else:
        assert len(steps) == 12


def test_value_clipping_has_no_single_coefficient(tmp_path):
    fit(Tiny(), [GradclipCallback(out=tmp_path)], gradient_clip_val=0.01, gradient_clip_algorithm="value")
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert len(steps) == 12 and steps["clip_coef"].isna().all() and steps["grad_norm"].notna().all()


def test_amp_skipped_steps_and_unscaled_norms(tmp_path):
    """16-mixed on CPU with a scaler whose init_scale overflows the first steps."""
    try:
        from lightning.pytorch.plugins.precision import MixedPrecision
    except ImportError:  # lightning < 2.2 names it MixedPrecisionPlugin
        from lightning.pytorch.plugins.precision import MixedPrecisionPlugin as MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    ref, module = Reference(), Tiny()
    fit(
        module,
        [ref, GradclipCallback(out=tmp_path)],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        gradient_clip_val=0.5,
    )
    steps = pd.read_csv(tmp_path / "steps.csv")
    summary = pd.read_csv(tmp_path / "summary.csv")
    # the scaler skips exactly the steps whose unscaled gradients are not finite
    skipped = [0 if math.isfinite(n) else 1 for n in ref.norms]
    assert sum(skipped) >= 3 and skipped[-1] == 0
    assert steps["skipped"].tolist() == skipped
    taken = steps["skipped"] == 0
    assert steps.loc[taken, "grad_norm"].tolist() == pytest.approx([n for n in ref.norms if math.isfinite(n)], rel=1e-6)
    assert steps.loc[~taken, "clip_coef"].isna().all()
    assert steps["loss"].tolist() == pytest.approx(module.losses, rel=1e-6)  # unscaled
    row = summary.iloc[0]
    assert row["status"] == "stable" and row["skipped_steps"] == sum(skipped) and row["first_skip"] == 1


@pytest.mark.parametrize("clip", ["engine", "torch"])
def test_training_is_that_of_the_chosen_clipper(tmp_path, clip, monkeypatch):
    """With clip="torch" the fit is bit-identical to one without the callback; with the default
    clip="engine" it is bit-identical to one whose clip_grad_norm_ is gradclip's engine."""
    from gradcheck_cli import engine

    monitored = Tiny()
    fit(monitored, [GradclipCallback(out=tmp_path, clip=clip)], gradient_clip_val=0.3)
    steps = pd.read_csv(tmp_path / "steps.csv")
    assert (steps["clip_coef"] < 1).sum() >= 6  # the comparison covers clipped steps
    if clip == "engine":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", engine.clip_grad_norm_)
    bare = Tiny()
    fit(bare, [], gradient_clip_val=0.3)
    for a, b in zip(monitored.parameters(), bare.parameters()):
        assert torch.equal(a, b)


def test_an_unknown_clip_choice_is_refused_at_once():
    with pytest.raises(ValueError, match="clip must be one of 'engine', 'torch'"):
        GradclipCallback(clip="fast")
