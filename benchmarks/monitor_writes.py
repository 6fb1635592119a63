"""Cost of keeping a monitored run's files current as the run grows.

A monitored training writes its files every ``write_every`` steps (default 100) for hours. This
times every write of a synthetic run (two layer groups per step) of ``--steps`` steps through
``report.live.LiveRunWriter`` (the new steps' rows appended) against the whole-file rewrite of
``report.files.write_reports`` (the reference, measured in the same run), and prints the mean
cost of the first and of the last 10 writes of each: flat for appends, growing with the run for
rewrites.

    python benchmarks/monitor_writes.py                 # 10,000 steps, a write every 100
    python benchmarks/monitor_writes.py --steps 30000
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.report import files  # noqa: E402
from gradcheck_cli.report.live import LiveRunWriter  # noqa: E402
from gradcheck_cli.results import STABLE, Cell, RunResult, StepRecord, shared_log_bins  # noqa: E402


def steps(n: int) -> list[StepRecord]:
    out = []
    for i in range(1, n + 1):
        norm = 1.0 + math.sin(i) ** 2
        out.append(
            StepRecord(
                i, 1.0 / i, norm, min(1.0, 1.0 / norm), layers=(("body", norm * 0.6), ("head", norm * 0.8)), lr=0.1
            )
        )
    return out


def timed_writes(all_steps: list[StepRecord], every: int, write) -> list[float]:
    times = []
    for n in range(every, len(all_steps) + 1, every):
        result = RunResult(Cell(1.0, 2.0), STABLE, all_steps[:n], name="monitor")
        t0 = time.perf_counter()
        write(result)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    all_steps = steps(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        live_dir, whole_dir = Path(tmp) / "live", Path(tmp) / "whole"
        live_dir.mkdir()
        whole_dir.mkdir()
        writer = LiveRunWriter(live_dir)
        live = timed_writes(all_steps, args.every, lambda r: writer.write(r))
        whole = timed_writes(all_steps, args.every, lambda r: files.write_reports(whole_dir, [r], shared_log_bins([r])))
        same = (live_dir / files.STEPS_FILE).read_bytes() == (whole_dir / files.STEPS_FILE).read_bytes()
    print(f"{args.steps} steps, a write every {args.every} ({len(live)} writes); steps.csv identical: {same}")
    for name, times in (("append (LiveRunWriter)", live), ("rewrite (write_reports)", whole)):
        first, last = times[:10], times[-10:]
        print(
            f"{name:24s} first 10 writes {sum(first) / len(first) * 1e3:7.1f} ms/write  "
            f"last 10 {sum(last) / len(last) * 1e3:7.1f} ms/write  total {sum(times):7.2f} s"
        )
    print(f"total time, rewrite / append: {sum(whole) / sum(live):.1f}x")


if __name__ == "__main__":
    main()
