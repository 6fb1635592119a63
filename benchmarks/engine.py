"""Time gradcheck_cli.engine.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_(foreach=True).

Run from the repository root::

    python benchmarks/engine.py              # full run (under a minute on an idle machine)
    python benchmarks/engine.py --quick      # fewer repetitions (about 10 seconds)
    python benchmarks/engine.py --threads 1  # one intra-op thread (default: torch's default)
    python benchmarks/engine.py --case gpt2  # only the cases whose name contains "gpt2"

Both functions run on the same gradients, alternately (torch first on even repetitions, the
engine first on odd ones, so that neither profits more from the other's cache warm-up), and the
medians are compared: ``ratio = engine median / torch median``. Only ratios of interleaved
measurements taken in one process mean anything on a shared machine.

Threads: torch's foreach norm reduces each tensor on one thread while the engine's row
reductions (and both multiplies) use every intra-op thread, so the comparison depends on the
thread count. On a machine where another process holds a core, every OpenMP parallel region
stalls for a scheduler tick and 2-thread timings become noise (hundreds of milliseconds per
call); the header says how many cores other processes kept busy, and warns. ``--threads 1`` gives stable
figures on a busy machine.

"Clipping needed" cases keep every repetition doing the same work without restoring the
gradients: each call gets ``max_norm = 0.999 * (the max_norm of the previous call)``, just below
the norm the previous clip left, so the gradients shrink by 0.1% per call and always need
clipping.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcheck_cli import engine  # noqa: E402


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124M parameters)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),  # ln_1
            (d, 3 * d),
            (3 * d,),  # attn.c_attn
            (d, d),
            (d,),  # attn.c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc
            (4 * d, d),
            (d,),  # mlp.c_proj
        ]
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def make_params(shapes: list[tuple[int, ...]], scale: float = 1e-3) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        # the parameter's own values are never read: a broadcast view saves the memory
        p = torch.nn.Parameter(torch.zeros(1).expand(shape))
        p.grad = torch.randn(shape, generator=gen).mul_(scale)
        params.append(p)
    return params


class Case:
    def __init__(self, name: str, params, norm_type: float, clip: bool, target: float) -> None:
        self.name = name
        self.params = params
        self.norm_type = norm_type
        self.clip = clip
        self.target = target
        norm = engine.get_total_norm([p.grad for p in params], norm_type).item()
        # no clipping: a max_norm far above the norm; clipping: just below the current norm
        self.max_norm = 0.999 * norm if clip else 1e6 * norm

    def call(self, fn: Callable) -> float:
        t0 = time.perf_counter()
        fn(self.params, self.max_norm, self.norm_type)
        dt = time.perf_counter() - t0
        if self.clip:
            self.max_norm *= 0.999
        return dt


def busy_cores(interval: float = 0.5) -> float | None:
    """Cores kept busy by other processes over ``interval`` seconds (Linux; None elsewhere)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def torch_clip(params, max_norm, norm_type):
    return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)


def engine_clip(params, max_norm, norm_type):
    return engine.clip_grad_norm_(params, max_norm, norm_type)


def reference_norm(grads: list[torch.Tensor], norm_type: float) -> float:
    """float64 reference (exact max for the inf norm)."""
    if norm_type == math.inf:
        return max(g.abs().max().item() for g in grads)
    chunks = (c.double() for g in grads for c in g.reshape(-1).split(1 << 20))
    return math.sqrt(math.fsum(torch.dot(c, c).item() for c in chunks))


def check_accuracy(case: Case) -> str:
    """Both results against a float64 reference, before any timing: speed only counts if the
    engine is right."""
    grads = [p.grad for p in case.params]
    ref = reference_norm(grads, case.norm_type)
    ours = engine.get_total_norm(grads, case.norm_type).item()
    theirs = torch.nn.utils.get_total_norm(grads, case.norm_type, foreach=True).item()
    err_ours, err_theirs = abs(ours - ref) / ref, abs(theirs - ref) / ref
    if err_ours > 1e-6:
        raise SystemExit(f"{case.name}: engine norm {ours!r}, float64 reference {ref!r}")
    return f"relative error vs float64: engine {err_ours:.1e}, torch {err_theirs:.1e}"


def run_case(case: Case, reps: int) -> tuple[float, float]:
    for _ in range(2):  # warm-up
        case.call(torch_clip)
        case.call(engine_clip)
    t_torch: list[float] = []
    t_engine: list[float] = []
    for i in range(reps):
        if i % 2 == 0:
            t_torch.append(case.call(torch_clip))
            t_engine.append(case.call(engine_clip))
        else:
            t_engine.append(case.call(engine_clip))
            t_torch.append(case.call(torch_clip))
    return statistics.median(t_engine), statistics.median(t_torch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per case")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: torch's default)")
    parser.add_argument("--case", default="", help="run only cases whose name contains this")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    gpt2_reps = args.reps or (7 if args.quick else 41)
    small_reps = args.reps or (21 if args.quick else 201)
    busy = busy_cores()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), "
        f"{os.cpu_count()} CPUs"
        + (f" ({busy:.1f} busy with other work)" if busy is not None else "")
        + f"; medians of interleaved repetitions ({gpt2_reps} for gpt2, "
        f"{small_reps} for 2000x1000)"
    )
    if torch.get_num_threads() > 1 and busy is not None and busy > 0.3:
        print(
            "# warning: other processes are using the CPUs; multi-threaded timings stall "
            "whenever one of them holds a core (try --threads 1)"
        )

    specs = [
        ("gpt2-small L2 no-clip", "gpt2", 2.0, False, 0.5),
        ("gpt2-small L2 clip", "gpt2", 2.0, True, 0.85),
        ("gpt2-small inf no-clip", "gpt2", math.inf, False, 0.25),
        ("2000x1000 L2 no-clip", "small", 2.0, False, 0.6),
    ]
    cache: dict[str, list] = {}
    notes: list[str] = []
    for name, kind, norm_type, clip, target in specs:
        if args.case and args.case not in name:
            continue
        if kind not in cache:
            cache.clear()
            gc.collect()
            shapes = gpt2_small_shapes() if kind == "gpt2" else [(1000,)] * 2000
            cache[kind] = make_params(shapes)
        case = Case(name, cache[kind], norm_type, clip, target)
        notes.append(f"# {name}: {check_accuracy(case)}")
        reps = gpt2_reps if kind == "gpt2" else small_reps
        t_e, t_t = run_case(case, reps)
        ratio = t_e / t_t
        ok = ratio <= target
        print(
            f"{name:24s} engine {t_e * 1e3:7.2f} ms  torch {t_t * 1e3:7.2f} ms  "
            f"ratio {ratio:4.2f}  (target <= {target})" + ("" if ok else "  MISSED"),
            flush=True,
        )
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
