"""What sharing saves: the default-grid sweep with shared runs against ``--no-share``.

For each model, one repetition times ``run_sweep`` with sharing (free cells built from the
control's steps, forks started where a cell's clipping first acts), the same sweep with
``share=False`` (every run trained from step 1); one run's time is the longest run of the latter
(a run that took every step). Repetitions alternate so that machine noise hits both alike;
medians are compared. Printed per model:
the sweep's time with and without sharing, their ratio, each as runs-equivalent (sweep time /
one run's time), and how many cells were free or forked. Runs execute in this process (``--jobs
0``), so worker start-up does not blur the ratio. Target on a healthy model where half the cells
never clip: sharing at most 0.6x the ``--no-share`` time.

    python benchmarks/shared_runs.py              # 3 repetitions, 100 steps
    python benchmarks/shared_runs.py --reps 5 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.config import SweepConfig  # noqa: E402
from gradcheck_cli.loader import load_experiment  # noqa: E402
from gradcheck_cli.sweep import run_sweep  # noqa: E402

MODELS = [
    ROOT / "sample_models" / "tiny_lm.py",
    ROOT / "benchmarks" / "tiny_transformer.py",
    ROOT / "sample_models" / "exploding_rnn.py",
    ROOT / "sample_models" / "nan_at_step.py",
    ROOT / "sample_models" / "tiny_gan.py",
    ROOT / "tests" / "scripts" / "shared_mlp.py",  # cells first clip midway: forks
]


def _timed(fn) -> tuple[float, list]:
    start = time.perf_counter()
    results = fn()
    return time.perf_counter() - start, results


def measure(script: Path, steps: int, reps: int) -> dict:
    config = SweepConfig(script=script, steps=steps)
    experiment = load_experiment(script)
    shared, every, one = [], [], []
    results: list = []
    for _ in range(reps):
        t, results = _timed(lambda: run_sweep(config, experiment, share=True))
        shared.append(t)
        t, trained = _timed(lambda: run_sweep(config, experiment, share=False))
        every.append(t)
        one.append(max(r.seconds for r in trained))  # a run that took the most steps
    free = sum(1 for r in results if r.shared_steps and r.shared_steps == len(r.steps))
    forked = sum(1 for r in results if 0 < r.shared_steps < len(r.steps))
    return {
        "shared": statistics.median(shared),
        "every": statistics.median(every),
        "one": statistics.median(one),
        "cells": len(results) - 1,
        "free": free,
        "forked": forked,
        "steps": sum(len(r.steps) for r in results),
        "trained": sum(len(r.steps) - r.shared_steps for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, default grid, --jobs 0")
    header = f"{'model':18s} {'shared s':>9s} {'no-share s':>10s} {'ratio':>6s} {'runs-eq shared':>14s} "
    print(header + f"{'runs-eq no-share':>16s}  cells: free/forked/trained   steps trained")
    for script in MODELS:
        m = measure(script, args.steps, args.reps)
        trained = m["cells"] - m["free"] - m["forked"]
        print(
            f"{script.stem:18s} {m['shared']:9.2f} {m['every']:10.2f} {m['shared'] / m['every']:6.2f} "
            f"{m['shared'] / m['one']:14.2f} {m['every'] / m['one']:16.2f}  "
            f"{m['free']}/{m['forked']}/{trained} of {m['cells']}{'':14s}{m['trained']} of {m['steps']}"
        )


if __name__ == "__main__":
    main()
