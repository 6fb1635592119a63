"""The cost of keeping the report files current during a sweep: after every finished run.

Synthetic results (no training), written into a temporary directory the two ways:

* ``rewrite``: what gradclip 0.1 did after each run: every report rewritten whole
  (``files.write_reports`` over all runs so far, then the manifest);
* ``append``: ``files.ReportWriter.add``: the run's rows appended to ``steps.csv`` and
  ``layers.csv``, the small files rewritten from cached rows, then the manifest.

Both produce byte-identical files (checked at the end). Prints the total time, the mean time
per run over the first and the last 10% of runs (whether the cost per run grows with the runs
before it), and the bytes of steps.csv. The synthetic norms grow with every run, so the shared
histogram bins move after every run: the worst case for ``histograms.csv``.

    python benchmarks/write_path.py                 # 1000 runs x 5 steps, both ways
    python benchmarks/write_path.py --runs 300 --steps 50
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gradcheck_cli.report import files  # noqa: E402
from gradcheck_cli.results import Cell, RunResult, StepRecord, shared_log_bins  # noqa: E402


def synthetic(runs: int, steps: int) -> list[RunResult]:
    out = []
    for i in range(runs):
        cell = Cell(None, 2.0) if i == 0 else Cell(0.001 * i, 2.0 if i % 2 else math.inf)
        records = [
            StepRecord(
                s,
                1.0 / s + 1e-3 * i,
                0.5 * s + 0.01 * i,
                min(1.0, 0.3 * i / s),
                layers=(("0", 0.1 * s), ("2", 0.2 * s)),
            )
            for s in range(1, steps + 1)
        ]
        out.append(RunResult(cell, "stable", records, seconds=0.01))
    return out


def rewrite(out: Path, results: list[RunResult]) -> list[float]:
    times = []
    for i in range(1, len(results) + 1):
        t = time.perf_counter()
        done = results[:i]
        files.write_reports(out, done, shared_log_bins(done))
        files.write_manifest(out, {"bench": 1}, [r.run for r in done])
        times.append(time.perf_counter() - t)
    return times


def append(out: Path, results: list[RunResult]) -> list[float]:
    writer = files.ReportWriter(out, {"bench": 1}, [r.run for r in results])
    times = []
    for r in results:
        t = time.perf_counter()
        writer.add(r)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=["rewrite", "append"])
    args = parser.parse_args()
    results = synthetic(args.runs, args.steps)
    tail = max(1, args.runs // 10)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, fn in (("rewrite", rewrite), ("append", append)):
            if args.only and args.only != name:
                continue
            out = Path(tmp) / name
            out.mkdir()
            times = fn(out, results)
            dirs[name] = out
            print(
                f"{name:8s} {args.runs} runs x {args.steps} steps: total {sum(times):8.2f} s, "
                f"runs 2-{tail + 1} {1e3 * sum(times[1 : tail + 1]) / tail:6.1f} ms/run, "
                f"last {tail} runs {1e3 * sum(times[-tail:]) / tail:6.1f} ms/run, "
                f"steps.csv {(out / files.STEPS_FILE).stat().st_size} bytes",
                flush=True,
            )
        if len(dirs) == 2:
            same = all(
                (dirs["rewrite"] / n).read_bytes() == (dirs["append"] / n).read_bytes()
                for n in (files.SUMMARY_FILE, files.STEPS_FILE, files.LAYERS_FILE, files.HISTOGRAMS_FILE)
            )
            print(f"identical files: {same}")


if __name__ == "__main__":
    main()
