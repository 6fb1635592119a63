"""Per-step cost of ``GradMonitor`` on the sample models' training loops.

For each sample model the same plain loop (forward, backward, ``record_loss``,
``torch.nn.utils.clip_grad_norm_(max_norm=1)``, step) runs for ``--steps`` steps without and with
the monitor, alternating every repetition so that machine noise hits both alike; the fastest
repetitions are compared (noise only ever adds time; the medians' overhead is printed too), for
wall-clock time and for the process's CPU time (with one intra-op thread the CPU
time is what the loop itself costs; on a shared, busy machine the wall-clock figure mostly
measures the neighbours). Three loops per model:

* ``clip-engine``: the loop clips; the monitor's default ``clip="engine"`` serves that call with
  gradclip's engine, whose measuring pass is also the clip's (one pass over the gradients);
* ``clip-torch``: the same loop with ``clip="torch"``: torch's own function clips after the
  engine has measured (two passes; training bit-identical to the bare loop);
* ``no-clip``: the loop does not clip; the monitor measures in the optimizer's pre-step hook
  (one pass that the bare loop does not make at all).

The monitored timing covers the loop only (``write_every`` is set beyond the run), so the
figure is the per-step cost; the cost of one write of the report files for such a run is timed
separately and printed beside it (it is paid every ``write_every`` steps, default 100, and once
at the first non-finite or diverged step: such a write inside the loop is timed and taken out
of the per-step figure, and counted beside it).
Target: per-step overhead (monitored / bare - 1) of a few percent.

    python benchmarks/monitor_overhead.py             # 15 repetitions of 100 steps
    python benchmarks/monitor_overhead.py --reps 5 --steps 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradcheck_cli.loader import load_experiment  # noqa: E402
from gradcheck_cli.monitor import GradMonitor  # noqa: E402

SAMPLES = ["exploding_rnn", "nan_at_step", "tiny_lm"]


def setup(experiment, seed: int = 0):
    torch.manual_seed(seed)
    model = experiment.build_model_fn()
    if experiment.build_optimizer_fn is not None:
        optimizer = experiment.build_optimizer_fn(model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = []
    it = iter(experiment.batches_fn())
    return model, optimizer, batches, it


LOOPS = {"clip-engine": ("engine", True), "clip-torch": ("torch", True), "no-clip": ("engine", False)}


def loop(experiment, model, optimizer, batches, monitor=None, clip: bool = True) -> None:
    """The user's loop, unchanged apart from the optional ``record_loss``."""
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = experiment.loss_fn(model, batch)
        loss.backward()
        if monitor is not None:
            monitor.record_loss(loss)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def take(experiment, steps: int) -> list:
    out, it = [], iter(experiment.batches_fn())
    while len(out) < steps:
        try:
            out.append(next(it))
        except StopIteration:
            it = iter(experiment.batches_fn())
    return out


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def _median(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _min(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(p[0] for p in pairs), min(p[1] for p in pairs)


def timed_writes(monitor: GradMonitor) -> list[tuple[float, float]]:
    """Time every write the monitor makes during the loop (one at the first non-finite step):
    a cost per event, reported apart from the per-step cost."""
    spent: list[tuple[float, float]] = []
    original = monitor.recorder.write

    def write() -> None:
        t0 = _clock()
        original()
        spent.append(_since(t0))

    monitor.recorder.write = write
    return spent


def measure(sample: str, kind: str, reps: int, steps: int, out_dir: Path):
    """((wall, cpu) bare, (wall, cpu) monitored without its event writes, wall of one write,
    event writes in the loop), each as (fastest, median) over the repetitions, seconds, for the
    loop ``kind`` (a key of ``LOOPS``)."""
    clip_mode, clips = LOOPS[kind]
    experiment = load_experiment(ROOT / "sample_models" / f"{sample}.py")
    batches = take(experiment, steps)
    bare, monitored, writes, events = [], [], [], 0
    for rep in range(reps):
        for with_monitor in (False, True) if rep % 2 == 0 else (True, False):
            model, optimizer, _, _ = setup(experiment)
            if with_monitor:
                monitor = GradMonitor(model, optimizer, out=out_dir / sample, write_every=10**9, clip=clip_mode)
                monitor.start()
                spent = timed_writes(monitor)
                t0 = _clock()
                loop(experiment, model, optimizer, batches, monitor, clips)
                wall, cpu = _since(t0)
                events = len(spent)
                monitored.append((wall - sum(s[0] for s in spent), cpu - sum(s[1] for s in spent)))
                t0 = time.perf_counter()
                monitor.close()  # one write of the four files
                writes.append(time.perf_counter() - t0)
            else:
                t0 = _clock()
                loop(experiment, model, optimizer, batches, clip=clips)
                bare.append(_since(t0))
    return (_min(bare), _median(bare)), (_min(monitored), _median(monitored)), statistics.median(writes), events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loops", default=",".join(LOOPS), help="which loops, comma-separated: " + ", ".join(LOOPS))
    parser.add_argument("--samples", default=",".join(SAMPLES), help="which sample models, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} CPUs; "
        f"fastest of {args.reps} interleaved repetitions of {args.steps} steps"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for sample in args.samples.split(","):
            for kind in args.loops.split(","):
                (bare, bare_med), (mon, mon_med), write, events = measure(
                    sample, kind, args.reps, args.steps, Path(tmp)
                )
                cells = []
                for label, b, m in (("cpu", bare[1], mon[1]), ("wall", bare[0], mon[0])):
                    cells.append(
                        f"{label}: bare {b / args.steps * 1e3:6.3f} monitored {m / args.steps * 1e3:6.3f} ms/step "
                        f"overhead {100 * (m / b - 1):5.1f}% ({(m - b) / args.steps * 1e6:5.0f} us/step)"
                    )
                cells.append(f"medians: {100 * (mon_med[1] / bare_med[1] - 1):5.1f}%")
                print(
                    f"{sample:14s} {kind:13s} "
                    + "  |  ".join(cells)
                    + f"  |  one write {write * 1e3:5.1f} ms"
                    + (f" (+{events} in the loop, at its events)" if events else "")
                )


if __name__ == "__main__":
    main()
