"""The global gradient norm across a process group and of DTensor (FSDP2) gradients.

:func:`gradcheck_cli.engine.get_total_norm` and :func:`gradcheck_cli.engine.clip_grad_norm_`
hand over to :func:`total_norm` when they are given ``group=`` or DTensor gradients. Each rank
measures its local norm with :mod:`.norms` (its public functions only), then the ranks
all-reduce a few float64 numbers, scaled so that nothing overflows and NaN or inf reach every
rank; every rank gets the same norm as a plain 0-dim tensor. What is summed, how, and at what
cost: docs/distributed.md (Distributed norms).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradcheck_cli.engine.norms import check_foreach, local_total_norm, nonfinite_error, result_dtype

__all__ = ["any_dtensor", "total_norm"]

_INF = math.inf


def any_dtensor(tensors: list[Tensor]) -> bool:
    """True if some tensor is a DTensor (checked only once ``torch.distributed.tensor`` has been
    imported: before that no DTensor can exist)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    return any(isinstance(t, module.DTensor) for t in tensors)


def _local_pieces(tensors: list[Tensor], group: Any) -> tuple[list[Tensor], list[Tensor], Any]:
    """(plain local tensors counted on this rank, DTensors' local pieces in input order, group);
    every DTensor contributes one entry to the second list (empty if not counted here)."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensors = [t for t in tensors if module is not None and isinstance(t, module.DTensor)]
    plain = [t for t in tensors if module is None or not isinstance(t, module.DTensor)]
    if dtensors and group is None:
        group = _mesh_group(dtensors)
    pieces: list[Tensor] = []
    for t in dtensors:
        if any(pl.is_partial() for pl in t.placements):
            replicate = module.Replicate()
            t = t.redistribute(t.device_mesh, [replicate if pl.is_partial() else pl for pl in t.placements])
        local = t.to_local()
        coord = t.device_mesh.get_coordinate()
        counted = coord is not None and all(c == 0 for c, pl in zip(coord, t.placements) if pl.is_replicate())
        pieces.append(local if counted else local.new_empty(0))
    if dtensors and plain and dist.get_rank(group) != 0:
        plain = []  # replicated beside DTensors: counted once, on rank 0
    return plain, pieces, group


def _mesh_group(dtensors: list[Tensor]) -> Any:
    meshes = {id(t.device_mesh): t.device_mesh for t in dtensors}
    ranks = {tuple(m.mesh.flatten().tolist()) for m in meshes.values()}
    if len(ranks) > 1:
        raise ValueError(
            "the gradients are DTensors on device meshes over different ranks; pass group= "
            "with the process group that spans them all"
        )
    mesh = next(iter(meshes.values()))
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return None  # the default group spans the mesh
    raise ValueError(
        f"the gradients are DTensors on a {mesh.ndim}-D device mesh that does not span every "
        "rank; pass group= with the process group of its ranks"
    )


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def total_norm(
    tensors: list[Tensor],
    p: float,
    error_if_nonfinite: bool,
    foreach: bool | None,
    group: Any,
) -> Tensor:
    """The ``p``-norm of every rank's gradients viewed as one vector (docs/distributed.md)."""
    plain, pieces, group = _local_pieces(tensors, group)
    local = plain + [t for t in pieces if t.numel() > 0]
    check_foreach(foreach, local)
    device = _comm_device(group)
    out_device = local[0].device if local else (tensors[0].device if tensors else device)
    # the dtypes of every tensor passed (DTensors have the same everywhere), not only those
    # counted here: the ranks agree without a host sync
    dtype = result_dtype({t.dtype for t in tensors}) if tensors else torch.float32
    if p == 0:
        total = _count_nonzero(plain, pieces, group, device)
    else:
        total = _global_norm(local, p, group, device)
    total = total.to(device=out_device, dtype=dtype)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise nonfinite_error(p)
    return total


def _count_nonzero(plain: list[Tensor], pieces: list[Tensor], group: Any, device: torch.device) -> Tensor:
    """torch's p = 0, the number of tensors with a nonzero gradient, in float64 on ``device``:
    plain shards add up, a DTensor counts once if any rank holds a nonzero element of it."""
    f64 = {"dtype": torch.float64, "device": device}
    nonzero = [(torch.count_nonzero(t) > 0) if t.numel() else torch.zeros((), dtype=torch.bool) for t in pieces]
    count = local_total_norm(plain, 0.0).to(**f64) if plain else torch.zeros((), **f64)
    dist.all_reduce(count, dist.ReduceOp.SUM, group=group)
    total = count
    if nonzero:
        maxes = torch.stack([x.to(**f64) for x in nonzero])
        dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
        total = total + maxes.sum()
    return total


def _global_norm(local: list[Tensor], p: float, group: Any, device: torch.device) -> Tensor:
    """The ``p``-norm (``p != 0``) of every rank's ``local`` tensors together, in float64 on
    ``device``: one MAX of the extreme local norm and the NaN / inf / "holds gradients" flags,
    then (finite ``p``) one SUM of the local norms' scaled powers."""
    f64 = {"dtype": torch.float64, "device": device}
    has = bool(local) and any(t.numel() > 0 for t in local)
    n = local_total_norm(local, p).to(**f64) if has else torch.zeros((), **f64)
    is_nan = torch.isnan(n)
    is_inf = torch.isinf(n)
    counted = torch.tensor(has, device=device) & ~is_nan
    flags = [is_nan.to(**f64), is_inf.to(**f64), torch.tensor(float(has), **f64)]
    finite = torch.where(is_nan | is_inf, torch.zeros_like(n), n)
    none = torch.tensor(-_INF, **f64)  # "no norm here" in a MAX of negated norms

    if p == _INF or p == -_INF:
        # inf: MAX of local maxima (0 for none); -inf: MIN as MAX of negated local minima,
        # with +inf for ranks holding no gradients; NaN travels as a flag
        key = finite if p == _INF else torch.where(counted, -n, none)
        maxes = torch.stack([key, *flags])
        dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
        any_nan, any_inf, anyone = maxes[1] > 0, maxes[2] > 0, maxes[3] > 0
        if p == _INF:
            total = torch.where(any_inf, torch.tensor(_INF, **f64), maxes[0])
        else:
            total = torch.where(anyone, -maxes[0], torch.zeros((), **f64))
        return torch.where(any_nan, torch.tensor(math.nan, **f64), total)

    # finite p != 0: scale by the extreme local norm, then sum scaled powers
    if p > 0:
        key = finite  # MAX of local norms; 0 for none
    else:
        # MIN of the local norms of ranks holding gradients (inf local norms count: all their
        # elements are inf), as a MAX of negated values; -inf stands for "no gradients here"
        key = torch.where(counted, -n, none)
    maxes = torch.stack([key, *flags])
    dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
    m = maxes[0] if p > 0 else -maxes[0]
    usable = (m > 0) & torch.isfinite(m)
    safe_m = torch.where(usable, m, torch.ones_like(m))
    if p > 0:
        term = (finite / safe_m) ** p
    else:
        # (n / m) ** p with n >= m > 0; an inf local norm contributes 0, a rank without
        # gradients nothing
        term = torch.where(counted, (n / safe_m) ** p, torch.zeros_like(n))
    term = torch.where(usable, term, torch.zeros_like(term))
    dist.all_reduce(term, dist.ReduceOp.SUM, group=group)
    any_nan, any_inf, anyone = maxes[1] > 0, maxes[2] > 0, maxes[3] > 0
    total = torch.where(usable, safe_m * term ** (1.0 / p), m)
    if p > 0:
        total = torch.where(any_inf, torch.tensor(_INF, **f64), total)
    else:
        # m == 0: some element is 0, the norm is 0; m == inf: every element is inf
        total = torch.where(anyone, total, torch.zeros((), **f64))
    return torch.where(any_nan, torch.tensor(math.nan, **f64), total)
