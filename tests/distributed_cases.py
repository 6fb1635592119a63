"""One rank of the distributed-norm test group (run by tests/test_distributed_norm.py).

Usage: python distributed_cases.py RANK WORLD_SIZE INIT_FILE OUT_FILE

Every rank builds the same full gradients from fixed seeds, keeps its own part, and computes the
global norms with the engine; beside each result it stores the single-process reference (the
engine on all the gradients in one process, and a float64 norm of their concatenation). The
results go to OUT_FILE (torch.save); the test process compares them.
"""

from __future__ import annotations

import datetime
import math
import sys

import torch
import torch.distributed as dist

from gradcheck_cli import engine

INF = math.inf
NORM_TYPES = [0.0, 0.5, 1.0, 2.0, 3.0, -1.0, -0.5, INF, -INF]


def flat64(tensors, p):
    """float64 norm of every element concatenated (p != 0), or torch's p = 0 count."""
    if p == 0:
        return float(sum(1 for t in tensors if t.numel() and torch.count_nonzero(t) > 0))
    cat = torch.cat([t.detach().reshape(-1).double() for t in tensors] or [torch.zeros(0)])
    if cat.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(cat, p).item()


def gen_tensors(seed, shapes, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def norms_case(mine, everything, group=None):
    """Global norm of each rank's ``mine`` for every norm type, with both references."""
    out = {}
    for p in NORM_TYPES:
        got = engine.get_total_norm(mine, p, group=group)
        out[p] = {
            "got": got.item(),
            "dtype": str(got.dtype),
            "single": engine.get_total_norm(everything, p).item(),
            "flat64": flat64(everything, p),
        }
    return out


def split_plain(rank, parts):
    """parts: list per rank of tensor lists; returns (mine, everything in rank order)."""
    everything = [t for part in parts for t in part]
    return parts[rank], everything


def run(rank: int, world: int) -> dict:
    results: dict = {}
    group = dist.group.WORLD
    # uneven plain shards: rank 0 holds three tensors, rank 1 one long one and a scalar
    a = gen_tensors(1, [(30, 20), (7,), (3, 3)])
    b = gen_tensors(2, [(5000,), ()], scale=3.0)
    mine, everything = split_plain(rank, [a, b])
    results["uneven"] = norms_case(mine, everything, group)
    # float64 shards
    a64 = gen_tensors(3, [(40,), (6, 6)], dtype=torch.float64)
    b64 = gen_tensors(4, [(17,)], dtype=torch.float64, scale=1e-3)
    mine, everything = split_plain(rank, [a64, b64])
    results["float64"] = norms_case(mine, everything, group)
    # one element-wise split of a single tensor: rank 0 the first 100 elements, rank 1 the rest
    whole = gen_tensors(5, [(257,)])[0]
    # (for p = 0 the pieces are two tensors, each counted if nonzero)
    mine, everything = split_plain(rank, [[whole[:100]], [whole[100:]]])
    results["split_tensor"] = norms_case(mine, everything, group)
    results["split_tensor_whole"] = {p: flat64([whole], p) for p in NORM_TYPES if p != 0}
    # a rank without gradients (empty list), and zero-element tensors
    mine, everything = split_plain(rank, [gen_tensors(6, [(9,), (0,)]), []])
    results["empty_rank"] = norms_case(mine, everything, group)
    mine, everything = split_plain(rank, [[torch.zeros(0)], [torch.zeros(0, 3)]])
    results["all_empty"] = norms_case(mine, everything, group)
    # values whose squares overflow float32 on both ranks: finite global norm
    mine, everything = split_plain(rank, [[torch.full((10,), 1e20)], [torch.full((5,), 3e19), torch.tensor([1.0])]])
    results["big"] = norms_case(mine, everything, group)
    # a zero element on rank 1 only (negative p gives 0)
    mine, everything = split_plain(rank, [gen_tensors(7, [(4,)]), [torch.tensor([0.0, 2.0])]])
    results["zero_on_rank1"] = norms_case(mine, everything, group)
    # NaN and inf on rank 1 only
    bad = gen_tensors(8, [(50,)])
    for name, value in (("nan_rank1", math.nan), ("inf_rank1", INF), ("ninf_rank1", -INF)):
        b = gen_tensors(9, [(20,), (4,)])
        b[0][13] = value
        mine, everything = split_plain(rank, [bad, b])
        results[name] = norms_case(mine, everything, group)
    # every element of rank 1 inf (its min |x| is inf: matters for p < 0 and -inf)
    mine, everything = split_plain(rank, [bad, [torch.full((3,), INF)]])
    results["all_inf_rank1"] = norms_case(mine, everything, group)
    # error_if_nonfinite raises on every rank when rank 1 alone holds a NaN
    b = gen_tensors(9, [(20,)])
    b[0][3] = math.nan
    mine, _ = split_plain(rank, [bad, b])
    try:
        engine.get_total_norm(mine, 2.0, error_if_nonfinite=True, group=group)
        results["error_if_nonfinite"] = None
    except RuntimeError as exc:
        results["error_if_nonfinite"] = str(exc)
    # clip_grad_norm_ with plain shards: identical to clipping everything in one process
    grads = gen_tensors(10, [(30, 20), (7,), (300,), (2, 2)], scale=0.5)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for prm, g in zip(params, grads):
        prm.grad = g.clone()
    mine_params = params[:2] if rank == 0 else params[2:]
    total = engine.clip_grad_norm_(mine_params, 1.0, group=group)
    results["clip_plain"] = {
        "total": total.item(),
        "grads": [p.grad.clone() for p in mine_params],
        "full": grads,
    }
    results.update(dtensor_cases(world))
    return results


def dtensor_cases(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out: dict = {}
    mesh = init_device_mesh("cpu", (world,))
    full = gen_tensors(11, [(7, 5), (1, 4), (9,), (3, 2)], scale=2.0)
    full[3] = full[3] * 1e20  # overflow-safe across ranks
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()]]  # (1, 4): rank 1 empty
    dts = [distribute_tensor(t, mesh, pl) for t, pl in zip(full, placements)]
    out["dtensor"] = norms_case(dts, full)
    out["dtensor_local_sizes"] = [d.to_local().numel() for d in dts]
    # only replicated parameters: counted once, not twice
    rep = [distribute_tensor(t, mesh, [Replicate()]) for t in full[:3]]
    out["dtensor_replicated"] = norms_case(rep, full[:3])
    # mixed DTensor and plain (replicated) tensors: the plain ones count once
    plain = gen_tensors(12, [(6,), (2, 3)])
    out["dtensor_mixed"] = norms_case(dts + plain, full + plain)
    # NaN in a row that lives on rank 1 only (rows 4..6 of the (7, 5) tensor)
    nan_full = [t.clone() for t in full]
    nan_full[0][5, 2] = math.nan
    nan_dts = [distribute_tensor(t, mesh, pl) for t, pl in zip(nan_full, placements)]
    out["dtensor_nan_rank1"] = norms_case(nan_dts, nan_full)
    out["dtensor_nan_local"] = bool(torch.isnan(nan_dts[0].to_local()).any())
    try:
        engine.get_total_norm(nan_dts, 2.0, error_if_nonfinite=True)
        out["dtensor_error_if_nonfinite"] = None
    except RuntimeError as exc:
        out["dtensor_error_if_nonfinite"] = str(exc)
    # a 2-D mesh (1 x world): Replicate on the first dimension, Shard on the second
    mesh2 = init_device_mesh("cpu", (1, world))
    dts2 = [distribute_tensor(t, mesh2, [Replicate(), Shard(0)]) for t in full[:3]]
    dts2.append(distribute_tensor(full[3], mesh2, [Replicate(), Replicate()]))
    out["dtensor_2d"] = norms_case(dts2, full)
    # clip_grad_norm_ on DTensor parameters: the same clipped gradients as in one process
    grads = gen_tensors(13, [(7, 5), (1, 4), (9,), (3, 2)], scale=0.7)
    params = []
    for g, pl in zip(grads, placements):
        prm = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, pl))
        prm.grad = distribute_tensor(g.clone(), mesh, pl)
        params.append(prm)
    total = engine.clip_grad_norm_(params, 1.0)
    single = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for prm, g in zip(single, grads):
        prm.grad = g.clone()
    single_total = engine.clip_grad_norm_(single, 1.0)
    out["clip_dtensor"] = {
        "total": total.item(),
        "total_is_plain": type(total) is torch.Tensor,
        "single_total": single_total.item(),
        "grads": [p.grad.full_tensor() for p in params],
        "single": [p.grad for p in single],
    }
    out["rules"] = rule_cases(mesh, placements)
    return out


def rule_cases(mesh, placements) -> dict:
    """The adaptive rules on DTensor parameters and on the same parameters in one process:
    (total norm, threshold, coef, clipped_frac) per step and the final gradients, both ways."""
    from torch.distributed.tensor import distribute_tensor

    from gradcheck_cli.rules import AGC, AutoClip, ZClip

    out = {}
    shapes = [(7, 5), (1, 4), (9,), (3, 2)]
    weights = gen_tensors(14, shapes)
    for name, make in (
        ("autoclip", lambda: AutoClip(30)),
        ("zclip", lambda: ZClip(warmup_steps=2, max_grad_norm=20.0)),
        ("agc", lambda: AGC(0.05)),
    ):
        sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, pl)) for w, pl in zip(weights, placements)]
        single = [torch.nn.Parameter(w.clone()) for w in weights]
        rule_d, rule_s = make(), make()
        steps = {"dtensor": [], "single": []}
        for step, scale in enumerate([1.0, 1.2, 0.9, 30.0, 1.1]):
            grads = gen_tensors(100 + step, shapes, scale=scale)
            for prm, g, pl in zip(sharded, grads, placements):
                prm.grad = distribute_tensor(g.clone(), mesh, pl)
            for prm, g in zip(single, grads):
                prm.grad = g.clone()
            for key, rule, prms in (("dtensor", rule_d, sharded), ("single", rule_s, single)):
                total = rule.clip(prms)
                last = rule.last
                steps[key].append((total.item(), last.threshold, last.coef, last.clipped_frac))
        out[name] = {
            "steps": steps,
            "grads": [p.grad.full_tensor() for p in sharded],
            "single_grads": [p.grad for p in single],
        }
    return out


def main() -> None:
    rank, world, init_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = run(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, out_file)


if __name__ == "__main__":
    main()
