"""Adaptive gradient-clipping rules: AGC, AutoClip and ZClip.

Each rule is an object whose ``clip(parameters, skipped=False)`` clips a model's (or a parameter
list's) gradients in place and returns the pre-clip total L2 norm, with what it did in
``rule.last`` (:class:`ClipStep`) and its state in ``state_dict()``. A non-finite pre-clip norm
and a step the caller marks as skipped are neither applied nor recorded. The norms come from
:func:`.clipping.get_total_norm`, the total-norm rules scale by :func:`.clipping.clip_grads_with_norm_`.
Formulas, references and departures from them: docs/engine.md (Clipping rules).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradcheck_cli.engine.clipping import clip_grads_with_norm_, get_total_norm
from gradcheck_cli.engine.norms import coalesce_

__all__ = ["AGC", "AutoClip", "ClipStep", "ZClip", "adaptive_clip_grad_"]

Parameters = nn.Module | Tensor | Iterable[Tensor]


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare with
class ClipStep:
    """What a rule did at one call.

    Attributes:
        total_norm: the pre-clip total L2 norm of the gradients (what ``clip`` returned).
        threshold: the largest total norm allowed at this step (AutoClip, ZClip); None for AGC
            (its thresholds are per unit) and when nothing was applied.
        coef: the factor every gradient was multiplied by, ``min(threshold / (total_norm +
            1e-6), 1)`` (1.0: not clipped); None for AGC and when nothing was applied.
        clipped_frac: AGC only: the share of units (rows of a weight, whole 0/1-dim tensors)
            whose gradient was scaled down; None for the total-norm rules.
        skipped: True when nothing was applied or recorded: the caller marked the step as
            skipped, or the pre-clip norm was not finite.
    """

    total_norm: Tensor
    threshold: float | None = None
    coef: float | None = None
    clipped_frac: float | None = None
    skipped: bool = False


def _parameters(parameters: Parameters) -> list[Tensor]:
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


def _grads(params: list[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    return value


class _TotalNormRule:
    """Shared driver of the rules that clip the total norm to a threshold."""

    last: ClipStep | None = None

    @torch.no_grad()
    def clip(self, parameters: Parameters, skipped: bool = False, total_norm: Tensor | None = None) -> Tensor:
        """Clip the gradients of ``parameters`` in place; return their pre-clip total L2 norm.

        Args:
            parameters: a model, a tensor or an iterable of tensors; tensors without ``.grad``
                are skipped.
            skipped: the caller knows this step's update will be skipped (e.g. a loss scaler
                found inf): measure only, apply and record nothing.
            total_norm: the pre-clip total L2 norm of these gradients when the caller has
                measured it already (a training loop that logs it); it is used as given.
        """
        params = _parameters(parameters)
        grads = _grads(params)
        total = get_total_norm(grads, 2.0) if total_norm is None else total_norm
        norm = total.item()
        if skipped or not math.isfinite(norm):
            self.last = ClipStep(total, skipped=True)
            return total
        threshold = self._threshold(norm)
        if threshold is None:
            self.last = ClipStep(total)
            return total
        clip_grads_with_norm_(params, threshold, total)
        # the coefficient exactly as clip_grads_with_norm_ computes it
        coef = torch.clamp(threshold / (total + 1e-6), max=1.0).item()
        self.last = ClipStep(total, threshold=threshold, coef=coef)
        return total

    def observe(self, norm: float) -> float | None:
        """Record a finite pre-clip L2 ``norm`` as :meth:`clip` does, and return the threshold
        ``clip`` would apply (None: none), leaving every gradient alone: what a caller that
        only needs to know whether this rule would clip (and must keep its state in step) calls
        instead of ``clip``."""
        if not math.isfinite(norm):
            raise ValueError(f"observe() takes a finite norm, got {norm}")
        return self._threshold(norm)

    def _threshold(self, norm: float) -> float | None:
        """Record the finite pre-clip ``norm``; return the threshold to apply (None: none)."""
        raise NotImplementedError


class AutoClip(_TotalNormRule):
    r"""AutoClip (Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks", MLSP 2020).

    At step ``t`` the threshold is the ``percentile``-th percentile of every pre-clip L2 total
    norm seen so far, the current one included,

    .. math:: \eta_t = \mathrm{percentile}(\{\lVert g_1\rVert, \ldots, \lVert g_t\rVert\}, p)

    with linear interpolation between order statistics, as ``numpy.percentile`` (rank
    ``(n - 1) * p / 100``), and the gradients are clipped by norm to ``\eta_t``. Default
    ``percentile=10``, as in the paper.

    As the reference: the history holds pre-clip norms. Departures: non-finite norms and
    skipped steps are not recorded (as every rule here). The history is kept sorted
    (``bisect.insort``): each step costs one insertion, the percentile is read in O(1).
    """

    def __init__(self, percentile: float = 10.0) -> None:
        percentile = float(percentile)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
        self.percentile = percentile
        self._history: list[float] = []  # sorted

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile})"

    @property
    def history(self) -> list[float]:
        """The recorded pre-clip norms, sorted (a copy)."""
        return list(self._history)

    def _threshold(self, norm: float) -> float:
        bisect.insort(self._history, norm)
        return _percentile(self._history, self.percentile)

    def state_dict(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        percentile = float(state["percentile"])
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {percentile}")
        history = sorted(float(x) for x in state["history"])
        if not all(math.isfinite(x) for x in history):
            raise ValueError("AutoClip history holds a non-finite norm")
        self.percentile = percentile
        self._history = history


def _percentile(sorted_values: list[float], q: float) -> float:
    """``numpy.percentile(values, q)`` (method 'linear') of a non-empty sorted list."""
    n = len(sorted_values)
    rank = (n - 1) * (q / 100.0)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    t = rank - lo
    a, b = sorted_values[lo], sorted_values[hi]
    # numpy's _lerp: exact at both ends, monotone
    if t >= 0.5:
        return b - (b - a) * (1.0 - t)
    return a + (b - a) * t


class ZClip(_TotalNormRule):
    r"""ZClip (Kumar, Owen, Roy Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training", 2025; reference implementation github.com/bluorion-com/ZClip), z-score mode
    with adaptive scaling.

    Warmup (the first ``warmup_steps`` steps): the pre-clip norms ``g`` are collected and the
    gradients clipped by norm at ``max_grad_norm``. At the end of warmup the mean ``mu`` and
    variance ``var`` are initialised as the mean and population variance of the collected norms.
    After warmup, with ``sigma = sqrt(var)``:

    .. math::

        z = \frac{g - \mu}{\sigma + \epsilon}, \qquad
        \text{threshold} = \begin{cases}
            \mu + z_{thresh}^2\,\sigma / z & z > z_{thresh} \\ \text{none} & \text{otherwise}
        \end{cases}

    the applied threshold is ``min(threshold, max_grad_norm)`` (``max_grad_norm`` alone when there
    is no spike), and the statistics are then updated with ``g' = threshold`` on a spike, ``g' =
    g`` otherwise, in this order (the variance uses the *updated* mean)::

        mu  = alpha * mu  + (1 - alpha) * g'
        var = alpha * var + (1 - alpha) * (g' - mu) ** 2

    Defaults are the reference's: ``alpha=0.97, z_thresh=2.5, warmup_steps=25,
    max_grad_norm=1.0, eps=1e-6``. ``max_grad_norm=None`` applies no cap (and no clipping during
    warmup).

    This is the reference's behaviour, including two details of it: the statistics are updated
    with the z-score threshold, not with the norm after the ``max_grad_norm`` cap, and the warmup
    collects the pre-clip norms. Departures: the norm is the engine's (accurate, overflow-safe;
    the reference sums squares in the parameters' dtype); the coefficient is torch's clamped
    ``min(threshold / (g + 1e-6), 1)``, which also scales (by at most 1e-6 relative) a norm
    within 1e-6 of the threshold that the reference leaves alone; non-finite norms and skipped
    steps are not recorded; ``warmup_steps`` must be at least 1 (the reference treats 0 as 1).
    The reference's other modes (``percentile``, ``clip_option="mean"``) and its later options
    (``clip_factor``, ``skip_update_on_spike``) are not provided.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_grad_norm: float | None = 1.0,
        eps: float = 1e-6,
    ) -> None:
        self._configure(alpha, z_thresh, warmup_steps, max_grad_norm, eps)
        self._buffer: list[float] = []  # warmup norms
        self.mean: float | None = None
        self.var: float | None = None

    def _configure(
        self,
        alpha: float,
        z_thresh: float,
        warmup_steps: int,
        max_grad_norm: float | None,
        eps: float,
    ) -> None:
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
        z_thresh = float(z_thresh)
        if not z_thresh > 0:
            raise ValueError(f"z_thresh must be positive, got {z_thresh}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1, got {warmup_steps}")
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = int(warmup_steps)
        self.max_grad_norm = None if max_grad_norm is None else _check_nonnegative("max_grad_norm", max_grad_norm)
        self.eps = _check_nonnegative("eps", eps)

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, "
            f"warmup_steps={self.warmup_steps}, max_grad_norm={self.max_grad_norm}, "
            f"eps={self.eps})"
        )

    @property
    def initialized(self) -> bool:
        """True once the warmup is over and the statistics exist."""
        return self.mean is not None

    def _threshold(self, norm: float) -> float | None:
        if self.mean is None or self.var is None:
            self._buffer.append(norm)
            if len(self._buffer) >= self.warmup_steps:
                n = len(self._buffer)
                self.mean = sum(self._buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self._buffer) / n
                self._buffer = []
            return self.max_grad_norm
        std = self.var**0.5
        z = (norm - self.mean) / (std + self.eps)
        spike = None
        if z > self.z_thresh:
            spike = self.mean + self.z_thresh * std / (z / self.z_thresh)
        effective = norm if spike is None else spike
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        if spike is None:
            return self.max_grad_norm
        return spike if self.max_grad_norm is None else min(spike, self.max_grad_norm)

    def state_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "eps": self.eps,
            "buffer": list(self._buffer),
            "mean": self.mean,
            "var": self.var,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._configure(
            state["alpha"],
            state["z_thresh"],
            state["warmup_steps"],
            state["max_grad_norm"],
            state["eps"],
        )
        if (state["mean"] is None) != (state["var"] is None):
            raise ValueError("ZClip state: mean and var must both be set or both be None")
        self._buffer = [float(x) for x in state["buffer"]]
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = None if state["var"] is None else float(state["var"])


class AGC:
    r"""Adaptive gradient clipping, unit-wise (Brock, De, Smith, Simonyan, "High-Performance
    Large-Scale Image Recognition Without Normalization", ICML 2021 (NFNets)), as timm's
    ``adaptive_clip_grad``.

    For every parameter ``W`` with gradient ``G``, norms are taken per output unit: over all
    dimensions but the first for tensors of 2+ dimensions (a row of a linear weight, an output
    channel of a convolution), over the whole tensor for 0/1-dim tensors (biases, gains). Then

    .. math::

        \text{max} = \lambda \cdot \max(\lVert W\rVert, \epsilon), \qquad
        G \leftarrow G \cdot \frac{\text{max}}{\max(\lVert G\rVert, 10^{-6})}
        \quad\text{where } \lVert G\rVert > \text{max}

    with ``clip_factor`` ``lambda = 0.01`` and ``eps = 1e-3`` by default (timm's defaults; the
    paper tunes ``lambda`` per batch size). Every parameter takes part (NFNets exclude the final
    classifier: pass the parameters without it).

    Norms are L2, accumulated in float32 for fp16/bf16. DTensor (FSDP2) parameters work: the
    unit norms follow the sharding, the total norm is the global one. Departures from timm: a unit whose
    float32 squares overflow (elements above about 1e19) gets its norm recomputed in float64
    with scaling (CPU only; timm gives it an inf norm and zeroes it); a NaN or inf gradient
    anywhere makes the total norm non-finite, and then, as with every rule here, nothing is
    applied (timm turns a NaN unit into NaN throughout and an inf unit into NaN and zeros); at
    ``||G|| == max`` timm scales by ``max / max(||G||, 1e-6)``, which is 1 unless ``max <
    1e-6``, and AGC here leaves the unit alone, as the formula above says. Stateless:
    ``state_dict()`` holds the hyperparameters only.
    """

    last: ClipStep | None = None

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
        self.clip_factor = _check_nonnegative("clip_factor", clip_factor)
        self.eps = _check_nonnegative("eps", eps)

    def __repr__(self) -> str:
        return f"AGC(clip_factor={self.clip_factor}, eps={self.eps})"

    @torch.no_grad()
    def clip(self, parameters: Parameters, skipped: bool = False, total_norm: Tensor | None = None) -> Tensor:
        """Clip the gradients of ``parameters`` unit-wise in place; return their pre-clip total
        L2 norm. Arguments as :meth:`AutoClip.clip`; ``self.last.clipped_frac`` is the share of
        units scaled. A given ``total_norm`` only decides whether the step is finite and is
        what is returned (it may be the norm over more parameters than are clipped here)."""
        params = [p for p in _parameters(parameters) if p.grad is not None]
        total = get_total_norm([p.grad for p in params], 2.0) if total_norm is None else total_norm
        if skipped or not math.isfinite(total.item()):
            self.last = ClipStep(total, skipped=True)
            return total
        units = 0
        counts: list[Tensor] = []
        for p in params:
            g = p.grad
            if g.numel() == 0:
                continue
            limit = self._limit(p)
            if g.is_sparse:
                units += limit.numel()
                counts.append(_clip_sparse_units_(g, limit).to(total.device))
                continue
            norms = _unit_norms(g)
            over = norms > limit  # False for NaN
            units += over.numel()
            # a DTensor (FSDP2) counts every unit once, wherever it lives
            whole = over.full_tensor() if hasattr(over, "full_tensor") else over
            counts.append(whole.sum().to(total.device))
            if g.is_cpu and not counts[-1]:  # reading a CPU tensor is no device sync
                continue
            coef = torch.where(over, limit / norms.clamp(min=1e-6), torch.ones_like(norms))
            g.mul_(coef.to(g.dtype))
        clipped = int(torch.stack(counts).sum()) if counts else 0  # one read for all parameters
        self.last = ClipStep(total, clipped_frac=(clipped / units) if units else 0.0)
        return total

    def _limit(self, p: Tensor) -> Tensor:
        """The largest gradient norm each unit of ``p`` may keep."""
        return _unit_norms(p.detach()).clamp(min=self.eps) * self.clip_factor

    @torch.no_grad()
    def clipped_units(self, parameters: Parameters) -> int:
        """How many units :meth:`clip` would scale down now, leaving every gradient alone (a
        dense gradient's units, as ``clip`` counts them; a sparse gradient raises ``ValueError``:
        ``clip`` coalesces it in place, so it is never left alone)."""
        counts: list[Tensor] = []
        for p in _parameters(parameters):
            g = p.grad
            if g is None or g.numel() == 0:
                continue
            if g.is_sparse:
                raise ValueError("clipped_units() does not count sparse gradients")
            over = _unit_norms(g) > self._limit(p)
            whole = over.full_tensor() if hasattr(over, "full_tensor") else over
            counts.append(whole.sum())
        return int(sum(int(c) for c in counts))

    def state_dict(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_factor = _check_nonnegative("clip_factor", state["clip_factor"])
        self.eps = _check_nonnegative("eps", state["eps"])


def _clip_sparse_units_(g: Tensor, limit: Tensor) -> Tensor:
    """AGC on a sparse COO gradient ``g`` in place, as on its dense equivalent: ``g`` is
    coalesced (duplicate entries summed, the same object, as ``engine`` clips sparse gradients),
    each unit's norm is taken over its stored values (in float64), and the stored values of the
    units above ``limit`` are scaled. Returns the number of units scaled (a 0-dim tensor)."""
    coalesce_(g)
    values = g._values()
    if values.numel() == 0:
        return torch.zeros((), dtype=torch.int64)
    wide = values.to(torch.float64)
    if g.ndim <= 1:  # one unit: the whole tensor
        norm = wide.pow(2).sum().sqrt()
        over = norm > limit.to(torch.float64)
        if bool(over):
            values.mul_((limit / norm.clamp(min=1e-6)).to(values.dtype))
        return over.to(torch.int64)
    rows = g._indices()[0]
    squares = wide.pow(2).reshape(len(rows), -1).sum(dim=1)
    norms = torch.zeros(g.shape[0], dtype=torch.float64, device=values.device).index_add_(0, rows, squares).sqrt()
    flat_limit = limit.reshape(-1).to(torch.float64)
    over = norms > flat_limit  # False for NaN
    coef = torch.where(over, flat_limit / norms.clamp(min=1e-6), torch.ones_like(norms))
    values.mul_(coef[rows].reshape(-1, *([1] * (values.ndim - 1))).to(values.dtype))
    return over.sum()


def _unit_norms(t: Tensor) -> Tensor:
    """L2 norms per output unit, shaped to broadcast against ``t`` (a 0-dim tensor for 0/1-dim
    ``t``); float32 accumulation for fp16/bf16, float64 recomputation for overflowed units."""
    dims = tuple(range(1, t.ndim)) if t.ndim > 1 else None
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    norms = torch.linalg.vector_norm(t, 2, dim=dims, keepdim=t.ndim > 1, dtype=acc)
    if t.is_cpu and bool(torch.isinf(norms).any()):
        # inf: an inf element, or squares beyond the float range; scaled float64 tells them apart
        x = t.to(torch.float64).abs()
        m = x.amax(dim=dims, keepdim=t.ndim > 1) if dims else x.max()
        m = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
        norms = m * torch.linalg.vector_norm(x / m, 2, dim=dims, keepdim=t.ndim > 1)
    return norms


def adaptive_clip_grad_(parameters: Parameters, clip_factor: float = 0.01, eps: float = 1e-3) -> Tensor:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021) in place, as timm's
    ``adaptive_clip_grad``; returns the pre-clip total L2 norm. See :class:`AGC` for the formula;
    use an :class:`AGC` object to read the share of units clipped (``.last.clipped_frac``)."""
    return AGC(clip_factor, eps).clip(parameters)
