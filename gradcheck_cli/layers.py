"""Per-layer gradient norms: parameters grouped by module-name prefix, their norms combined exactly.

Depth counts module levels (a ``ModuleList`` or ``Sequential`` index belongs to the level before
it); ``"auto"`` keeps one group per parameter up to ``DEFAULT_MAX_GROUPS`` tensors, else the
deepest depth with at most that many groups. Groups are combined from the per-tensor norms of the
measuring pass that gives the total, on the gradients' device without a host sync, so the groups'
norms combine to the total again. See docs/diagnosis.md ("Where and why it blows up").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_MAX_GROUPS = 64
AUTO = "auto"


def _levels(name: str) -> list[str]:
    """The name's module levels: numeric components joined to the level before them."""
    levels: list[str] = []
    for part in name.split("."):
        if part.isdigit() and levels:
            levels[-1] = f"{levels[-1]}.{part}"
        else:
            levels.append(part)
    return levels


def group_name(name: str, depth: int | None) -> str:
    """The group of parameter ``name`` at ``depth`` levels; ``None`` keeps the name whole."""
    if depth is None:
        return name
    return ".".join(_levels(name)[:depth])


def choose_depth(names: Sequence[str], max_groups: int = DEFAULT_MAX_GROUPS) -> int | None:
    """The ``"auto"`` rule: ``None`` (per parameter) when there are at most ``max_groups``
    names, else the deepest depth with at most ``max_groups`` groups, at least 1."""
    if len(set(names)) <= max_groups:
        return None
    deepest = max((len(_levels(n)) for n in names), default=1)
    for depth in range(deepest, 0, -1):
        if len({group_name(n, depth) for n in names}) <= max_groups:
            return depth
    return 1


class LayerGrouping:
    """Maps parameter names to groups; cached per distinct name list, so the per-step cost is
    one index lookup and a few scatter kernels."""

    def __init__(self, depth: int | str | None = AUTO, max_groups: int = DEFAULT_MAX_GROUPS) -> None:
        self.depth = depth
        self.max_groups = max_groups
        self._cache: dict[tuple[tuple[str, ...], torch.device], tuple[tuple[str, ...], Tensor]] = {}
        self._host_cache: dict[tuple[tuple[str, ...], None], tuple[tuple[str, ...], list[int]]] = {}

    def resolve_depth(self, names: Sequence[str]) -> int | None:
        if self.depth == AUTO:
            return choose_depth(names, self.max_groups)
        return self.depth  # type: ignore[return-value]

    def groups(self, names: tuple[str, ...], device: torch.device) -> tuple[tuple[str, ...], Tensor]:
        """(group names in first-appearance order, index of each name's group on ``device``)."""
        key = (names, device)
        hit = self._cache.get(key)
        if hit is None:
            depth = self.resolve_depth(names)
            order: dict[str, int] = {}
            index = [order.setdefault(group_name(n, depth), len(order)) for n in names]
            hit = (tuple(order), torch.tensor(index, dtype=torch.long, device=device))
            self._cache[key] = hit
        return hit

    def host_groups(self, names: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]]:
        """``groups`` with the index as a Python list, for norms read on the host."""
        key = (names, None)
        hit = self._host_cache.get(key)
        if hit is None:
            groups, index = self.groups(names, torch.device("cpu"))
            hit = (groups, index.tolist())
            self._host_cache[key] = hit
        return hit

    def combine_host(
        self, names: tuple[str, ...], norms: list[float], norm_type: float
    ) -> tuple[tuple[str, ...], list[float]]:
        """``combine`` for per-tensor norms already on the host, in Python: the same values."""
        groups, index = self.host_groups(names)
        if len(groups) == len(names) and norm_type != 0:
            return groups, norms
        return groups, combine_grouped_floats(norms, index, len(groups), norm_type)

    def combine(self, names: tuple[str, ...], norms: Tensor, norm_type: float) -> tuple[tuple[str, ...], Tensor]:
        """(group names, group norms) from per-tensor ``norms`` named ``names``: in float64, or
        ``norms`` itself when every group is one parameter."""
        groups, index = self.groups(names, norms.device)
        if len(groups) == len(names) and norm_type != 0:
            # One group per parameter (the default for small models): each group's norm is its
            # tensor's norm, with no scatter kernels to pay per step. (For p = 0 a group counts
            # its nonzero members, which differs from a tensor's own count of nonzero elements.)
            return groups, norms
        return groups, combine_grouped(norms, index, len(groups), norm_type)


def combine_grouped(norms: Tensor, index: Tensor, n_groups: int, p: float) -> Tensor:
    """The ``p``-norm of each group's member norms (``index[i]`` is member i's group), in float64.

    Same arithmetic as the engine's combination of per-tensor norms into the total, group by
    group: scaled by the group's largest member (smallest for ``p < 0``) so that it cannot
    overflow; NaN and inf propagate into their group. No host sync."""
    norms = norms.to(torch.float64)
    out = torch.zeros(n_groups, dtype=torch.float64, device=norms.device)
    if norms.numel() == 0:
        return out
    if p == math.inf or p == -math.inf or p == 0:
        if p == 0:
            return out.scatter_add_(0, index, (norms != 0).to(torch.float64))
        reduce = "amax" if p > 0 else "amin"
        # include_self=False: the zeros in ``out`` are not members; NaN propagates through amax.
        out = out.scatter_reduce(0, index, norms, reduce=reduce, include_self=False)
        return _propagate_nan(out, norms, index)
    scale = out.scatter_reduce(0, index, norms, reduce="amax" if p > 0 else "amin", include_self=False)
    ok = (scale > 0) & torch.isfinite(scale)
    scale = torch.where(ok, scale, torch.ones_like(scale))
    sums = torch.zeros_like(out).scatter_add_(0, index, (norms / scale[index]) ** p)
    return scale * sums ** (1.0 / p)


def combine_grouped_floats(norms: list[float], index: list[int], n_groups: int, p: float) -> list[float]:
    """``combine_grouped`` on Python floats: the same scaling and order of additions, equal to
    float64 rounding (torch's vectorised square root may differ in the last bit). A host that
    reads every step's norms pays no kernel launches for the grouping."""
    if p == 0:
        counts = [0.0] * n_groups
        for v, g in zip(norms, index):
            if v != 0:  # NaN counts, as (norms != 0) does
                counts[g] += 1.0
        return counts
    if p == math.inf or p == -math.inf:
        pick = max if p > 0 else min
        out: list[float | None] = [None] * n_groups
        nan = [False] * n_groups
        for v, g in zip(norms, index):
            if v != v:
                nan[g] = True
            else:
                cur = out[g]
                out[g] = v if cur is None else pick(cur, v)
        return [math.nan if bad else (0.0 if v is None else v) for v, bad in zip(out, nan)]
    pick = max if p > 0 else min
    scale: list[float | None] = [None] * n_groups
    for v, g in zip(norms, index):
        cur = scale[g]
        scale[g] = v if cur is None or v != v else (cur if cur != cur else pick(cur, v))
    scales = [s if s is not None and s > 0 and math.isfinite(s) else 1.0 for s in scale]
    sums = [0.0] * n_groups
    for v, g in zip(norms, index):
        x = v / scales[g]
        sums[g] += x * x if p == 2.0 else (x if p == 1.0 else _pow(x, p))
    if p == 2.0:
        return [s * math.sqrt(t) for s, t in zip(scales, sums)]
    if p == 1.0:
        return [s * t for s, t in zip(scales, sums)]
    return [s * _pow(t, 1.0 / p) for s, t in zip(scales, sums)]


def _pow(x: float, e: float) -> float:
    """``x ** e`` as torch computes it: 0 to a negative power and overflow give inf, not an error."""
    if x == 0 and e < 0:
        return math.inf
    try:
        return x**e
    except OverflowError:
        return math.inf


def _propagate_nan(out: Tensor, norms: Tensor, index: Tensor) -> Tensor:
    """``scatter_reduce`` amax/amin may drop NaN on some builds: a group with a NaN member is NaN."""
    nan_members = torch.zeros_like(out).scatter_add_(0, index, torch.isnan(norms).to(torch.float64))
    return torch.where(nan_members > 0, torch.full_like(out, math.nan), out)
