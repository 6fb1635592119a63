"""Instrumentation overhead of a sweep against the same training written as a bare loop.

For each sample model, one repetition times ``run_sweep`` over a small grid, and then the same
runs written the plain way (seed, build the model, SGD; per step: forward, backward,
``torch.nn.utils.clip_grad_norm_`` for clipped runs, step) for exactly the steps each sweep run
took. Repetitions alternate between the two so that machine noise hits both alike; the medians
are compared. Target: overhead (sweep / bare - 1) at most 10%.

The sweep runs as ``gradclip sweep`` does: per-layer norms recorded every step (``--layer-depth
auto``), the control run measuring every norm type of the grid, spikes located after each run.

    python benchmarks/sweep_overhead.py            # 5 repetitions
    python benchmarks/sweep_overhead.py --reps 3 --steps 50
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.config import DEFAULT_LR, SweepConfig  # noqa: E402
from gradcheck_cli.loader import load_experiment  # noqa: E402
from gradcheck_cli.sweep import run_sweep  # noqa: E402

SAMPLES = ["exploding_rnn", "nan_at_step", "tiny_lm"]


def bare_runs(experiment, cells, steps_per_run, seed, lr) -> None:
    """The same runs as the sweep, written as a user would without gradclip."""
    for cell, steps in zip(cells, steps_per_run):
        torch.manual_seed(seed)
        model = experiment.build_model_fn()
        if experiment.build_optimizer_fn is not None:
            optimizer = experiment.build_optimizer_fn(model)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        build_scheduler = experiment.build_scheduler_fn
        scheduler = build_scheduler(optimizer) if build_scheduler is not None else None
        torch.manual_seed(seed)
        data = iter(experiment.batches_fn())
        for _ in range(steps):
            try:
                batch = next(data)
            except StopIteration:
                data = iter(experiment.batches_fn())
                batch = next(data)
            optimizer.zero_grad(set_to_none=True)
            loss = experiment.loss_fn(model, batch)
            loss.backward()
            if cell.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cell.max_norm, cell.norm_type)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()


def measure(sample: str, reps: int, steps: int) -> tuple[float, float]:
    script = ROOT / "sample_models" / f"{sample}.py"
    config = SweepConfig(script=script, max_norms=(0.1, 1.0), norm_types=(2.0, math.inf), steps=steps)
    experiment = load_experiment(script)
    cells = config.cells()
    sweep_times, bare_times = [], []
    steps_per_run = None
    for _ in range(reps):
        t0 = time.perf_counter()
        results = run_sweep(config, experiment)
        sweep_times.append(time.perf_counter() - t0)
        steps_per_run = [len(r.steps) for r in results]
        t0 = time.perf_counter()
        bare_runs(experiment, cells, steps_per_run, config.seeds[0], DEFAULT_LR)
        bare_times.append(time.perf_counter() - t0)
    return statistics.median(sweep_times), statistics.median(bare_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", default=",".join(SAMPLES))
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps, {args.steps} steps, "
        "grid 0.1,1 x 2,inf + control, per-layer norms on (layer depth auto)"
    )
    for sample in args.samples.split(","):
        sweep_s, bare_s = measure(sample, args.reps, args.steps)
        overhead = sweep_s / bare_s - 1.0
        verdict = "ok" if overhead <= 0.10 else "OVER TARGET"
        print(
            f"{sample:<14} sweep {sweep_s * 1e3:8.1f} ms  bare {bare_s * 1e3:8.1f} ms  "
            f"overhead {overhead * 100:+6.1f}%  (target <= +10%) {verdict}"
        )


if __name__ == "__main__":
    main()
