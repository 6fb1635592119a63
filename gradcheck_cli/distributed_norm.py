"""The global gradient norm across a process group and DTensor (FSDP2) gradients.

:func:`engine.get_total_norm` and :func:`engine.clip_grad_norm_` hand over to :func:`total_norm`
when they are given ``group=`` or DTensor gradients; every rank gets the same norm, as a plain
(non-DTensor) 0-dim tensor, and ``clip_grad_norm_`` scales by it (its ``+1e-6`` is added once,
to the global norm).

What is summed:

- **DTensors**: their local pieces. ``Shard`` placements are summed across ranks (uneven and
  empty shards included); along a mesh dimension with a ``Replicate`` placement only the ranks
  at coordinate 0 contribute, so a replicated parameter counts once, not once per rank;
  ``Partial`` placements are reduced first (``redistribute``). The group is the device mesh's
  (a 1-D mesh's group, the default group for a mesh over every rank), or ``group=``.
- **Plain tensors with** ``group=`` **and no DTensor**: each rank's own shard of one vector; the
  norm is that of every rank's tensors concatenated.
- **Plain tensors mixed with DTensors** (parameters left out of ``fully_shard``): replicated, the
  same on every rank; counted once, from rank 0 of the group (torch raises for this mix).

How (each rank computes its local norm with the engine, then all-reduces numbers):

- finite ``p > 0``: the largest local norm ``m`` (all-reduce MAX), then the SUM of
  ``(local / m) ** p``, and ``m * sum ** (1 / p)`` in float64: no overflow, whatever the ranks
  hold. ``p < 0``: the same with the smallest local norm (ranks without gradients are left out).
- ``inf``: MAX; ``-inf``: MIN (ranks without gradients are left out: the identity is ``+inf``;
  no gradients anywhere gives 0, as the engine's empty norm).
- ``p = 0``: torch's meaning, the number of tensors with a nonzero gradient: a DTensor counts once
  if any rank holds a nonzero element of it (MAX over ranks), plain shards add up.
- NaN and inf never travel through MAX or MIN (gloo drops a NaN held by another rank there):
  each rank contributes "I hold a NaN" / "I hold an inf" flags, and any rank's NaN makes the
  result NaN on every rank, so ``error_if_nonfinite`` raises on every rank together.

Every number is reduced in float64 on the group's device (CUDA for NCCL, else CPU), with two
collectives (one for ``inf``, ``-inf``, and for ``p = 0`` without DTensors); no host sync is
added beyond the engine's own local norm, unless ``error_if_nonfinite``. The result dtype is
``promote(dtypes of the tensors passed, float32)`` on each rank (the same on every rank unless
ranks pass plain tensors of different dtypes).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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
    """The ``p``-norm of every rank's gradients viewed as one vector (see the module docstring)."""
    from gradcheck_cli import engine  # engine imports this module lazily; no cycle at import

    plain, pieces, group = _local_pieces(tensors, group)
    local = plain + [t for t in pieces if t.numel() > 0]
    engine._check_foreach(foreach, local)
    device = _comm_device(group)
    out_device = local[0].device if local else (tensors[0].device if tensors else device)
    # the dtypes of every tensor passed (DTensors have the same everywhere), not only those
    # counted here: the ranks agree without a host sync
    dtype = engine._result_dtype({t.dtype for t in tensors}) if tensors else torch.float32
    f64 = {"dtype": torch.float64, "device": device}

    if p == 0:
        # torch's p = 0: tensors with a nonzero gradient. DTensors: nonzero on any rank.
        nonzero = [(torch.count_nonzero(t) > 0) if t.numel() else torch.zeros((), dtype=torch.bool) for t in pieces]
        count = engine.get_total_norm(plain, 0.0).to(**f64) if plain else torch.zeros((), **f64)
        dist.all_reduce(count, dist.ReduceOp.SUM, group=group)
        total = count
        if nonzero:
            maxes = torch.stack([x.to(**f64) for x in nonzero])
            dist.all_reduce(maxes, dist.ReduceOp.MAX, group=group)
            total = total + maxes.sum()
        return _finish(total, dtype, out_device, p, error_if_nonfinite)

    has = bool(local) and any(t.numel() > 0 for t in local)
    n = engine.get_total_norm(local, p).to(**f64) if has else torch.zeros((), **f64)
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
        total = torch.where(any_nan, torch.tensor(math.nan, **f64), total)
        return _finish(total, dtype, out_device, p, error_if_nonfinite)

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
    total = torch.where(any_nan, torch.tensor(math.nan, **f64), total)
    return _finish(total, dtype, out_device, p, error_if_nonfinite)


def _finish(total: Tensor, dtype: torch.dtype, device: torch.device, p: float, check: bool) -> Tensor:
    total = total.to(device=device, dtype=dtype)
    if check and not bool(torch.isfinite(total)):
        from gradcheck_cli import engine

        raise engine._nonfinite_error(p)
    return total
