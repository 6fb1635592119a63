"""The reference every gradclip run is compared with: a plain training loop written with torch
alone (torch's own ``clip_grad_norm_``), seeded the way a sweep seeds its runs.

The clipping rules are written out here again, straight from their papers' formulas and
reference code (timm's ``adaptive_clip_grad``, AutoClip's percentile of the norm history,
ZClip's z-score EMA), without gradclip's engine, so a sweep's rule cells can be checked
against them step by step."""

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
    threshold: float = math.nan  # total-norm threshold a rule applied (autoclip, zclip)
    clipped_frac: float = math.nan  # share of elements (value) or units (agc) clipped


def _total_norm(grads: list, norm_type: float) -> torch.Tensor:
    """torch's get_total_norm (torch >= 2.6); before it, its arithmetic spelled out."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, norm_type)
    norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else torch.tensor(0.0)


def _l2(model) -> torch.Tensor:
    return _total_norm([p.grad for p in model.parameters() if p.grad is not None], 2.0)


class ValueRule:
    """``torch.nn.utils.clip_grad_value_``; counts the elements above the value first."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = clip_value

    def __call__(self, model) -> tuple[float, float, float]:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        over = sum(int((g.abs() > self.clip_value).sum()) for g in grads)
        norm = _l2(model).item()
        torch.nn.utils.clip_grad_value_(model.parameters(), self.clip_value)
        return norm, math.nan, over / sum(g.numel() for g in grads)


class AGCRule:
    """timm's ``adaptive_clip_grad`` (timm/utils/agc.py), with the units counted; parameters
    whose names start with an ``exclude`` prefix are left alone."""

    def __init__(self, clip_factor: float, eps: float = 1e-3, exclude: tuple[str, ...] = ()) -> None:
        self.clip_factor, self.eps, self.exclude = clip_factor, eps, exclude

    @staticmethod
    def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    def __call__(self, model) -> tuple[float, float, float]:
        norm = _l2(model).item()
        over = units = 0
        for name, p in model.named_parameters():
            if p.grad is None or any(name == e or name.startswith(e + ".") for e in self.exclude):
                continue
            max_norm = self._unitwise_norm(p.detach()).clamp_(min=self.eps).mul_(self.clip_factor)
            grad_norm = self._unitwise_norm(p.grad.detach())
            clipped = p.grad.detach() * (max_norm / grad_norm.clamp(min=1e-6))
            p.grad.detach().copy_(torch.where(grad_norm > max_norm, clipped, p.grad.detach()))
            over += int((grad_norm > max_norm).sum())
            units += grad_norm.numel()
        return norm, math.nan, over / units


class AutoClipRule:
    """AutoClip: clip by norm at ``numpy.percentile`` of every pre-clip norm so far."""

    def __init__(self, percentile: float) -> None:
        self.percentile, self.history = percentile, []

    def __call__(self, model) -> tuple[float, float, float]:
        norm = _l2(model).item()
        self.history.append(norm)
        threshold = float(np.percentile(self.history, self.percentile))
        torch.nn.utils.clip_grad_norm_(model.parameters(), threshold)
        return norm, threshold, math.nan


class ZClipRule:
    """ZClip, z-score mode with adaptive scaling (defaults of github.com/bluorion-com/ZClip):
    warmup norms collected and clipped at ``max_grad_norm``, then an EMA mean and variance;
    on ``z > z_thresh`` the threshold ``mu + z_thresh**2 * sigma / z``, capped at
    ``max_grad_norm``; the EMA is fed the z-score threshold on a spike, the norm otherwise."""

    def __init__(self, z_thresh=2.5, alpha=0.97, warmup_steps=25, max_grad_norm=1.0, eps=1e-6) -> None:
        self.z_thresh, self.alpha, self.warmup_steps = z_thresh, alpha, warmup_steps
        self.max_grad_norm, self.eps = max_grad_norm, eps
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, model) -> tuple[float, float, float]:
        norm = _l2(model).item()
        if self.mean is None:
            self.buffer.append(norm)
            if len(self.buffer) == self.warmup_steps:
                self.mean = float(np.mean(self.buffer))
                self.var = float(np.var(self.buffer))
            threshold = self.max_grad_norm
        else:
            std = math.sqrt(self.var)
            z = (norm - self.mean) / (std + self.eps)
            spike = self.mean + self.z_thresh**2 * std / z if z > self.z_thresh else None
            fed = norm if spike is None else spike
            self.mean = self.alpha * self.mean + (1 - self.alpha) * fed
            self.var = self.alpha * self.var + (1 - self.alpha) * (fed - self.mean) ** 2
            caps = [t for t in (spike, self.max_grad_norm) if t is not None]
            threshold = min(caps) if caps else None
        if threshold is None:
            return norm, math.nan, math.nan
        torch.nn.utils.clip_grad_norm_(model.parameters(), threshold)
        return norm, threshold, math.nan


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
    rule=None,
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
    ``get_scale()`` falling. ``rule(model)`` (one of the rule classes above: it clips and
    returns the pre-clip L2 norm, the threshold and the share clipped) takes the place of
    ``clip_grad_norm_`` when given. Never stops early."""
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
        threshold = frac = math.nan
        if rule is not None:
            norm, threshold, frac = rule(model)
            coef = math.nan
        elif max_norm is None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = _total_norm(grads, norm_type).item()
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
        history.append(
            ReferenceStep(
                sum(losses) / len(losses), norm, bad, step_lr, skipped, math.nan if skipped else coef, threshold, frac
            )
        )
    return history
