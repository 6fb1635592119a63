"""A sweep under torchrun: two gloo processes on this machine, in both modes, and ranks that
fail. Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m
gradcheck_cli sweep ...`` (a free port, so concurrent test runs do not collide) under a bound."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from test_parallel import files_without_seconds

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADCLIP_DIST_TIMEOUT": "120", **extra}


def torchrun(*args, timeout=TIMEOUT_S, **extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "gradcheck_cli", "sweep", *map(str, args)]
    return subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def alone(*args):
    command = [sys.executable, "-m", "gradcheck_cli", "sweep", *map(str, args), "--jobs", "0"]
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cells_mode_writes_the_files_of_one_process(tmp_path):
    grid = ("--steps", "5", "--max-norm", "0.1,1", "--norm-type", "2,inf", "--seeds", "0,1")
    # torchrun trains every run (ranks share no steps): the reference too
    ref = alone(SCRIPTS / "with_optimizer.py", *grid, "--out", tmp_path / "ref", "--no-share")
    assert ref.returncode == 0, ref.stderr
    proc = torchrun(SCRIPTS / "with_optimizer.py", *grid, "--out", tmp_path / "ranks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files_without_seconds(tmp_path / "ranks") == files_without_seconds(tmp_path / "ref")
    assert proc.stdout.count("gradclip sweep") == 1  # rank 0 alone prints the table


@pytest.mark.parametrize("script", ["ddp_linear.py", "fsdp_mlp.py"])
def test_model_mode_trains_the_model_of_one_process_on_the_whole_batch(tmp_path, script):
    """DDP replicas or FSDP2 shards, each rank with half of every batch: the global gradient
    norm and the mean loss are those of one process on the whole batch, to float rounding."""
    grid = ("--steps", "4", "--max-norm", "0.1,1", "--norm-type", "2,inf")
    ref = alone(SCRIPTS / script, *grid, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    proc = torchrun(SCRIPTS / script, *grid, "--distributed", "model", "--out", tmp_path / "ranks")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got, want = read(tmp_path / "ranks" / "steps.csv"), read(tmp_path / "ref" / "steps.csv")
    assert [(r["run"], r["step"]) for r in got] == [(r["run"], r["step"]) for r in want]
    for g, w in zip(got, want):
        for column in ("loss", "grad_norm", "clip_coef"):
            assert math.isclose(float(g[column]), float(w[column]), rel_tol=2e-6), (g, w, column)
    statuses = [(r["run"], r["status"]) for r in read(tmp_path / "ranks" / "summary.csv")]
    assert statuses == [(r["run"], r["status"]) for r in read(tmp_path / "ref" / "summary.csv")]
    # clipping changed the training: the runs differ from the control after step 1
    by_run = {}
    for r in got:
        by_run.setdefault(r["run"], []).append(float(r["loss"]))
    assert by_run["clip_0.1_2"][0] == by_run["unclipped"][0]
    assert by_run["clip_0.1_2"][-1] != by_run["unclipped"][-1]


def test_a_rank_that_dies_is_reported_and_nothing_hangs(tmp_path):
    start = time.monotonic()
    proc = torchrun(SCRIPTS / "rank_fails.py", "--steps", "3", "--out", tmp_path, "--jobs", "0", RANK_FAILS="exit")
    assert proc.returncode != 0
    assert time.monotonic() - start < 100  # torchrun stops rank 0 well before any timeout
    output = proc.stdout + proc.stderr
    assert "exitcode  : -9" in output and "local_rank: 1" in output, output


def test_a_rank_that_hangs_fails_the_others_after_the_timeout_with_a_message(tmp_path):
    start = time.monotonic()
    proc = torchrun(
        SCRIPTS / "rank_fails.py",
        "--steps",
        "3",
        "--out",
        tmp_path,
        "--jobs",
        "0",
        RANK_FAILS="hang",
        GRADCLIP_DIST_TIMEOUT="5",
    )
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    output = proc.stdout + proc.stderr
    assert "error: rank 0: gathering results failed" in output, output
    assert "another rank died, raised or took longer than GRADCLIP_DIST_TIMEOUT=5s" in output
