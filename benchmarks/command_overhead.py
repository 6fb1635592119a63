"""What one run of ``gradclip sweep -- python SCRIPT`` costs against the script run by itself.

A run of a user's command is a fresh ``python`` process (start-up, imports, data, then the steps)
with gradclip's interception installed; the script by itself is the same process without it.
Both run the nanoGPT-style script ``tests/scripts/as_is/tiny_gpt.py`` for the same number of
steps, alternately, so machine noise hits both alike; the medians are compared, as wall time of
the whole process and as time per step (the difference between a long and a short run, which
removes the start-up both pay). The same for a small MLP loop that never clips
(``plain_loop.py``: the clip is inserted before each optimizer step).

    python benchmarks/command_overhead.py              # 5 repetitions, 40 and 10 steps
    python benchmarks/command_overhead.py --reps 3 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.launch.command import parse_command  # noqa: E402
from gradcheck_cli.launch.runs import RunOptions, run_cell  # noqa: E402
from gradcheck_cli.results import Cell  # noqa: E402

AS_IS = ROOT / "tests" / "scripts" / "as_is"
SCRIPTS = {
    "tiny_gpt": (lambda n: [f"--max_iters={n}", "--grad_clip=1.0"]),
    "plain_loop": (lambda n: ["--steps", str(n), "--clip-norm", "1.0"]),
}


def alone(script: str, steps: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(AS_IS / f"{script}.py"), *SCRIPTS[script](steps)], check=True, capture_output=True
    )
    return time.perf_counter() - start


def under_gradclip(script: str, steps: int, scratch: Path) -> float:
    # The script's own --max_iters stays large: gradclip stops the run after `steps` steps.
    command = parse_command(["python", str(AS_IS / f"{script}.py"), *SCRIPTS[script](10 * steps)])
    start = time.perf_counter()
    run = run_cell(command, Cell(1.0, 2.0), RunOptions(steps=steps, threads=None), scratch / "run.log")
    seconds = time.perf_counter() - start
    assert len(run.result.steps) == steps, run.log_tail()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--short", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for script in SCRIPTS:
            times: dict[str, list[float]] = {k: [] for k in ("alone", "gradclip", "alone_short", "gradclip_short")}
            for _ in range(args.reps):
                times["alone"].append(alone(script, args.steps))
                times["gradclip"].append(under_gradclip(script, args.steps, scratch))
                times["alone_short"].append(alone(script, args.short))
                times["gradclip_short"].append(under_gradclip(script, args.short, scratch))
            med = {k: statistics.median(v) for k, v in times.items()}
            per_step_alone = (med["alone"] - med["alone_short"]) / (args.steps - args.short)
            per_step_gc = (med["gradclip"] - med["gradclip_short"]) / (args.steps - args.short)
            print(
                f"{script}: {args.steps} steps, median of {args.reps}: alone {med['alone']:.2f} s, "
                f"one gradclip run {med['gradclip']:.2f} s, ratio {med['gradclip'] / med['alone']:.3f}; "
                f"per step alone {1e3 * per_step_alone:.2f} ms, under gradclip {1e3 * per_step_gc:.2f} ms "
                f"({100 * (per_step_gc / per_step_alone - 1):+.1f}%)"
            )


if __name__ == "__main__":
    main()
