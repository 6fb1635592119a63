"""The reference every gradclip run is compared with: a plain training loop written with torch
alone (torch's own ``clip_grad_norm_``), seeded the way a sweep seeds its runs."""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch


class ReferenceStep(NamedTuple):
    loss: float
    norm: float  # pre-clip total norm in the loop's norm_type
    non_finite_params: list[str]  # parameters whose gradient holds NaN/inf (when tracked)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def reference_training(
    experiment,
    steps: int,
    *,
    lr: float = 0.01,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    seed: int = 0,
    track_non_finite: bool = False,
) -> list[ReferenceStep]:
    """Seed, build the model, seed again, build the optimizer (the script's or SGD), then per
    step: next batch (``batches()`` called again when exhausted), zero_grad, loss, backward,
    ``torch.nn.utils.clip_grad_norm_`` when ``max_norm`` is given, step. Never stops early."""
    _seed(seed)
    model = experiment.build_model_fn()
    _seed(seed)
    if experiment.build_optimizer_fn is not None:
        optimizer = experiment.build_optimizer_fn(model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    history: list[ReferenceStep] = []
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
        bad = []
        if track_non_finite:
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if max_norm is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, norm_type)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
        optimizer.step()
        history.append(ReferenceStep(loss.item(), norm.item(), bad))
    return history
