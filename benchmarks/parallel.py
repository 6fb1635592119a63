"""``--jobs 2`` against ``--jobs 1`` on a CPU-bound sample, measured side by side.

Each repetition times ``run_sweep`` over the same grid twice, once with one worker holding
``threads_per_job(1)`` torch threads (every core) and once with two workers holding
``threads_per_job(2)`` each, in alternating order so that machine noise hits both alike. The
timings include starting the workers (a fork of the preloaded fork server; the server itself is
started once, before timing). Before timing, both sweeps' results are checked to be identical.
Target: median(jobs 1) / median(jobs 2) >= 1.7 on 2 cores.

    python benchmarks/parallel.py              # 5 repetitions, 9 runs x 60 steps
    python benchmarks/parallel.py --reps 3 --steps 30
    python benchmarks/parallel.py --script sample_models/tiny_lm.py   # a small model: threads barely help
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.config import SweepConfig  # noqa: E402
from gradcheck_cli.loader import load_experiment  # noqa: E402
from gradcheck_cli.parallel import WorkerPool, available_cores, threads_per_job  # noqa: E402
from gradcheck_cli.sweep import run_sweep  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "cpu_bound_mlp.py"


def sweep(config, experiment, jobs: int, threads: int | None = None) -> tuple[float, list]:
    start = time.perf_counter()
    with WorkerPool(jobs, threads) as pool:
        results = run_sweep(config, experiment, executor=pool)
    return time.perf_counter() - start, results


def numbers(results) -> list:
    return [(r.run, r.status, [(s.loss, s.grad_norm, s.clip_coef) for s in r.steps]) for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the model script (default: cpu_bound_mlp.py)")
    args = parser.parse_args()
    config = SweepConfig(
        script=args.script, max_norms=(0.1, 1.0, 10.0, 100.0), norm_types=(2.0, float("inf")), steps=args.steps
    )
    experiment = load_experiment(args.script)
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"cores {cores}, load average {load:.2f}; {len(config.cells())} runs x {args.steps} steps; "
        f"jobs 1 x {threads_per_job(1)} threads vs jobs 2 x {threads_per_job(2)} threads"
    )
    _, one = sweep(config, experiment, 1)  # starts the fork server; checks the numbers
    _, two = sweep(config, experiment, 2)
    assert numbers(one) == numbers(two), "--jobs 2 changed the results"
    # (jobs, threads per job); the third, jobs 1 with one thread, shows what threads alone give
    settings = [(1, None), (2, None), (1, 1)]
    times = {s: [] for s in settings}
    for rep in range(args.reps):
        for setting in settings if rep % 2 == 0 else settings[::-1]:
            seconds, _ = sweep(config, experiment, *setting)
            times[setting].append(seconds)
        t1, t2, t11 = (times[s][-1] for s in settings)
        print(
            f"rep {rep + 1}: jobs 1 {t1:.2f} s, jobs 2 {t2:.2f} s, ratio {t1 / t2:.2f}; jobs 1 x 1 thread {t11:.2f} s"
        )
    m1, m2, m11 = (statistics.median(times[s]) for s in settings)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"median: jobs 1 {m1:.2f} s, jobs 2 {m2:.2f} s, speed-up {m1 / m2:.2f}x (target >= 1.7); "
        f"jobs 1 x 1 thread {m11:.2f} s ({m11 / m2:.2f}x jobs 2); load average now {load:.2f}"
    )


if __name__ == "__main__":
    main()
