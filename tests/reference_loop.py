"""The reference every gradclip run is compared with: a plain training loop written with torch
alone (torch's own ``clip_grad_norm_``), seeded the way a sweep seeds its runs."""

from __future__ import annotations

import contextlib
import math
import random
from typing import NamedTuple

import numpy as np
import torch


class ReferenceStep(NamedTuple):
    loss: float  # with accumulation, the mean of the micro-batch losses
    norm: float  # pre-clip total norm in the loop's norm_type (after unscaling with fp16)
    non_finite_params: list[str]  # parameters whose gradient holds NaN/inf (when tracked)
    lr: float = math.nan  # first param group's lr used by the step
    skipped: bool = False  # the fp16 gradient scaler skipped the step
    coef: float = math.nan  # clip coefficient min(max_norm / (norm + 1e-6), 1); 1.0 unclipped


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def reference_training(
    experiment,
    steps: int,
    *,
    lr: float | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    seed: int = 0,
    track_non_finite: bool = False,
    amp: str = "off",
    accumulate: int = 1,
    init_scale: float = 2.0**16,
) -> list[ReferenceStep]:
    """Seed, build the model, seed again, build the optimizer (the script's or SGD, with every
    param group's lr set to ``lr`` when given), then the script's scheduler if it has one. Per
    step: zero_grad; per micro-batch: next batch (``batches()`` called again when exhausted),
    the loss under ``torch.autocast`` (``amp`` fp16/bf16), backward of ``loss / accumulate``
    (through ``GradScaler.scale`` with fp16); ``unscale_``; ``torch.nn.utils.clip_grad_norm_``
    when ``max_norm`` is given; ``scaler.step`` + ``scaler.update`` (fp16) or ``optimizer.step``;
    ``scheduler.step()`` unless the scaler skipped the step, which is read off the public
    ``get_scale()`` falling. Never stops early."""
    _seed(seed)
    model = experiment.build_model_fn()
    _seed(seed)
    if experiment.build_optimizer_fn is not None:
        optimizer = experiment.build_optimizer_fn(model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01 if lr is None else lr)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    build_scheduler = getattr(experiment, "build_scheduler_fn", None)
    scheduler = build_scheduler(optimizer) if build_scheduler is not None else None
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if amp == "fp16" else None
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    model.train()
    history: list[ReferenceStep] = []
    batches = iter(experiment.batches_fn())
    for _ in range(steps):
        optimizer.zero_grad()
        losses = []
        for _ in range(accumulate):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(experiment.batches_fn())
                batch = next(batches)
            autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
            with autocast:
                loss = experiment.loss_fn(model, batch)
            losses.append(loss.item())
            part = loss / accumulate
            (scaler.scale(part) if scaler is not None else part).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        bad = []
        if track_non_finite:
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if max_norm is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, norm_type).item()
            coef = 1.0
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type).item()
            coef = min(max_norm / (norm + 1e-6), 1.0)
        step_lr = float(optimizer.param_groups[0]["lr"])
        skipped = False
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped = scaler.get_scale() < before
        else:
            optimizer.step()
        if scheduler is not None and not skipped:
            scheduler.step()
        history.append(ReferenceStep(sum(losses) / len(losses), norm, bad, step_lr, skipped, math.nan if skipped else coef))
    return history
