"""GradclipTrainerCallback in a real transformers Trainer.train, against float64 norms of the
gradients the last backward pass left (captured by post-accumulate-grad hooks, i.e. before the
Trainer clips) and against the Trainer's own logged grad_norm."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradcheck_cli.integrations.hf import GradclipTrainerCallback  # noqa: E402
from gradcheck_cli.results import STEP_COLUMNS, SUMMARY_COLUMNS  # noqa: E402

NAMES = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


@pytest.fixture(autouse=True)
def quiet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)


class Tiny(nn.Module):
    """Returns ``{"loss": ...}`` like a transformers model; poisons one gradient on one call."""

    def __init__(self, nan_at: int | None = None, nan_param: str = "net.2.weight") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.nan_at, self.nan_param = nan_at, nan_param
        self.calls = 0
        self.losses: list[float] = []
        self.snapshot: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda p, name=name: self.snapshot.__setitem__(name, p.grad.detach().double().clone())
            )

    def forward(self, x, labels=None):
        self.calls += 1
        param = dict(self.named_parameters())[self.nan_param]
        if self.training and self.calls == self.nan_at:
            param.register_hook(lambda g: torch.full_like(g, math.nan))  # NaN in this backward only
        loss = nn.functional.mse_loss(self.net(x), labels)
        if self.training:
            self.losses.append(loss.item())
        return {"loss": loss}


class Reference(transformers.TrainerCallback):
    """Float64 norm of the gradients as the last backward left them (before clipping), once per
    optimizer step."""

    def __init__(self, model: Tiny) -> None:
        self.model = model
        self.norms: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        # the snapshot is the last backward's gradients (clipping comes later); on_step_end is
        # in every supported transformers (on_pre_optimizer_step only from 4.45)
        flat = torch.cat([self.model.snapshot[n].flatten() for n in NAMES])
        self.norms.append(float(torch.linalg.vector_norm(flat)))


def dataset(n: int = 96):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def train(tmp_path, model, callbacks, *, max_grad_norm, accumulate=1, steps=12):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.3])
def test_train_records_true_pre_clip_norms(tmp_path, max_grad_norm):
    model = Tiny()
    ref = Reference(model)
    out = tmp_path / "mon"
    trainer = train(tmp_path, model, [ref, GradclipTrainerCallback(out=out)], max_grad_norm=max_grad_norm)
    summary, steps = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "steps.csv")
    layers = pd.read_csv(out / "layers.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and list(steps.columns) == STEP_COLUMNS
    assert steps["step"].tolist() == list(range(1, 13)) and len(ref.norms) == 12
    assert steps["grad_norm"].tolist() == pytest.approx(ref.norms, rel=1e-6)
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    if max_grad_norm or logged:  # older transformers log grad_norm only when they clip
        assert steps["grad_norm"].tolist() == pytest.approx(logged, rel=1e-5)  # the Trainer's own number
    expected = [1.0 if max_grad_norm == 0 else min(max_grad_norm / (n + 1e-6), 1.0) for n in ref.norms]
    assert steps["clip_coef"].tolist() == pytest.approx(expected, rel=1e-6)
    if max_grad_norm:
        assert (steps["clip_coef"] < 1).sum() >= 6
    assert steps["loss"].tolist() == pytest.approx(model.losses, rel=1e-6)
    assert steps["lr"].eq(0.05).all() and steps["skipped"].eq(0).all()
    assert layers[layers["step"] == 1]["param"].tolist() == NAMES
    row = summary.iloc[0]
    assert row["run"] == "monitor" and row["status"] == "stable" and row["steps"] == 12
    assert pd.isna(row["max_norm"]) if max_grad_norm == 0 else row["max_norm"] == max_grad_norm
    assert torch.nn.utils.clip_grad_norm_.__module__ == "torch.nn.utils.clip_grad"  # restored


def test_accumulation(tmp_path):
    model = Tiny()
    ref = Reference(model)
    out = tmp_path / "mon"
    train(tmp_path, model, [ref, GradclipTrainerCallback(out=out)], max_grad_norm=0.5, accumulate=3, steps=4)
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 4
    assert steps["grad_norm"].tolist() == pytest.approx(ref.norms, rel=1e-6)
    means = [sum(model.losses[i : i + 3]) / 3 for i in range(0, 12, 3)]
    assert steps["loss"].tolist() == pytest.approx(means, rel=1e-6)


@pytest.mark.parametrize("stop", [False, True])
def test_nan_at_a_known_step_and_parameter(tmp_path, stop):
    model = Tiny(nan_at=5, nan_param="net.0.weight")
    out = tmp_path / "mon"
    trainer = train(tmp_path, model, [GradclipTrainerCallback(out=out, stop_on_non_finite=stop)], max_grad_norm=1.0)
    summary, steps = pd.read_csv(out / "summary.csv"), pd.read_csv(out / "steps.csv")
    row = summary.iloc[0]
    assert row["status"] == "non_finite" and row["nan_step"] == 5
    assert row["nan_source"] == "backward" and row["nan_param"] == "net.0.weight"
    if stop:
        assert len(steps) == 5 and trainer.state.global_step == 5
    else:
        assert len(steps) == 12


@pytest.mark.parametrize("clip", ["engine", "torch"])
def test_training_is_that_of_the_chosen_clipper(tmp_path, clip, monkeypatch):
    """With clip="torch" the Trainer's training is bit-identical to one without the callback;
    with the default clip="engine" (the measuring pass is the clip's) bit-identical to one whose
    clip_grad_norm_ is gradclip's engine."""
    from gradcheck_cli import engine

    monitored = Tiny()
    out = tmp_path / "mon"
    train(tmp_path / "a", monitored, [GradclipTrainerCallback(out=out, clip=clip)], max_grad_norm=0.3)
    steps = pd.read_csv(out / "steps.csv")
    assert (steps["clip_coef"] < 1).sum() >= 6  # the comparison covers clipped steps
    if clip == "engine":
        # accelerate reaches torch's clip either whole or split (get_total_norm, then
        # clip_grads_with_norm_, from accelerate 1.x); the reference clips with the engine both ways
        for name in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"):
            if hasattr(torch.nn.utils, name):
                monkeypatch.setattr(torch.nn.utils, name, getattr(engine, name))
    bare = Tiny()
    train(tmp_path / "b", bare, [], max_grad_norm=0.3)
    for a, b in zip(monitored.parameters(), bare.parameters()):
        assert torch.equal(a, b)
