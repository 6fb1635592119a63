"""A script whose ``batches()`` is a ``DataLoader`` with worker processes of its own, started by
``fork`` or ``spawn`` (tests/scripts/loader_workers.py): its runs in gradclip's worker processes
(the default options, ``--jobs 2``) and under torchrun give the files of one process
(``--jobs 0``); a run that kills its process while its loader workers are alive is ``crashed``
and leaves no process behind; a supervisor that is killed leaves no worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_parallel import files_without_seconds, gradclip, rows

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "scripts" / "loader_workers.py"
GRID = ("--steps", "3", "--max-norm", "0.5", "--norm-type", "2")
REFERENCES: dict[str, dict] = {}


def reference(tmp_path_factory, context: str) -> dict[str, bytes]:
    """The sweep in one process (``--jobs 0``), once per start method."""
    if context not in REFERENCES:
        out = tmp_path_factory.mktemp(f"ref_{context}")
        proc = gradclip(SCRIPT, *GRID, "--out", out, "--jobs", "0", env={"LOADER_CONTEXT": context})
        assert proc.returncode == 0, proc.stderr
        REFERENCES[context] = {"files": files_without_seconds(out), "out": out}
    return REFERENCES[context]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is dead: it only waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def survivors(folder: Path, within_s: float) -> list[int]:
    """The pids named in ``folder`` still alive after up to ``within_s`` seconds."""
    end = time.monotonic() + within_s
    while True:
        left = [int(p.name) for p in folder.iterdir() if alive(int(p.name))]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_default_options_give_the_numbers_of_one_process(tmp_path_factory, tmp_path, context):
    want = reference(tmp_path_factory, context)["files"]
    proc = gradclip(SCRIPT, *GRID, "--out", tmp_path, env={"LOADER_CONTEXT": context})
    assert proc.returncode == 0, proc.stderr
    assert files_without_seconds(tmp_path) == want


def test_two_jobs_give_the_numbers_of_one_process(tmp_path_factory, tmp_path):
    want = reference(tmp_path_factory, "fork")["files"]
    proc = gradclip(SCRIPT, *GRID, "--out", tmp_path, "--jobs", "2", env={"LOADER_CONTEXT": "fork"})
    assert proc.returncode == 0, proc.stderr
    assert files_without_seconds(tmp_path) == want


def test_torchrun_ranks_give_the_numbers_of_one_process(tmp_path_factory, tmp_path):
    from test_ranks import torchrun

    want = reference(tmp_path_factory, "fork")["files"]
    proc = torchrun(SCRIPT, *GRID, "--out", tmp_path, LOADER_CONTEXT="fork")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files_without_seconds(tmp_path) == want


def test_a_run_killed_with_its_loader_workers_alive_is_crashed_and_leaves_none_behind(tmp_path_factory, tmp_path):
    ref = reference(tmp_path_factory, "fork")["out"]
    pids, marker = tmp_path / "pids", tmp_path / "crash"
    pids.mkdir()
    marker.touch()
    env = {"LOADER_CONTEXT": "fork", "LOADER_PIDS": str(pids), "LOADER_CRASH": str(marker)}
    # the stalled loader workers of the killed run hold the output pipes: if they outlived it,
    # this would wait for them (ten minutes)
    proc = gradclip(SCRIPT, *GRID, "--out", tmp_path / "out", env=env, timeout=150)
    assert proc.returncode == 3, proc.stderr
    assert not marker.exists()
    got = {r["run"]: r for r in rows(tmp_path / "out" / "summary.csv")}
    want = {r["run"]: r for r in rows(ref / "summary.csv")}
    crashed = got.pop("unclipped")  # the first run dies at its second step
    assert crashed["status"] == "crashed", crashed
    assert crashed["error"] == f"worker process killed by signal SIGKILL ({int(signal.SIGKILL)}) during step 2"
    assert got["clip_0.5_2"] == want["clip_0.5_2"]  # the next run, in a fresh worker, is untouched
    assert [r for r in rows(tmp_path / "out" / "steps.csv")] == [
        r for r in rows(ref / "steps.csv") if r["run"] != "unclipped"
    ]
    assert len(list(pids.iterdir())) >= 4  # two workers, each with two loader workers
    assert survivors(pids, within_s=2.0) == []


def test_a_killed_supervisor_leaves_no_worker_and_no_loader_worker_behind(tmp_path):
    pids, marker = tmp_path / "pids", tmp_path / "stall"
    pids.mkdir()
    marker.touch()
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        LOADER_CONTEXT="fork",
        LOADER_PIDS=str(pids),
        LOADER_CRASH=str(marker),
        LOADER_CRASH_HOW="sleep",  # the first run sleeps for ten minutes at its second step
    )
    command = [sys.executable, "-m", "gradcheck_cli", "sweep", str(SCRIPT), *GRID, "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 240
        while marker.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        assert proc.poll() is None and not marker.exists(), proc.stderr.read().decode() if proc.poll() else ""
        time.sleep(0.5)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert len(list(pids.iterdir())) >= 3  # the worker and its two loader workers
    assert survivors(pids, within_s=10.0) == []


SPAWNED = """
import torch
from torch.utils.data import DataLoader

{dataset}

def build_model():
    return torch.nn.Linear(1, 1)

def batches():
    {local}return DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context="spawn")

def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
"""
SQUARES = """
import torch
from torch.utils.data import Dataset

class Squares(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        x = torch.tensor([float(i)])
        return x, 2 * x
"""


def test_a_spawned_loader_imports_a_dataset_from_a_module_beside_the_script(tmp_path):
    # as under `python script.py`, whose folder is on sys.path in the loader's workers too
    (tmp_path / "squares.py").write_text(SQUARES)
    script = tmp_path / "beside.py"
    script.write_text(SPAWNED.format(dataset="from squares import Squares", local=""))
    grid = ("--steps", "2", "--max-norm", "1", "--norm-type", "2")
    ref = gradclip(script, *grid, "--out", tmp_path / "ref", "--jobs", "0")
    assert ref.returncode == 0, ref.stderr
    proc = gradclip(script, *grid, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert files_without_seconds(tmp_path / "out") == files_without_seconds(tmp_path / "ref")


@pytest.mark.parametrize("jobs", [(), ("--jobs", "0")])
def test_a_spawned_loader_with_a_dataset_class_inside_a_function_is_the_scripts_error(tmp_path, jobs):
    local = "".join("    " + line + "\n" for line in SQUARES.splitlines()).lstrip() + "    "
    script = tmp_path / "local_class.py"
    script.write_text(SPAWNED.format(dataset="", local=local))
    proc = gradclip(script, "--steps", "2", "--max-norm", "1", "--norm-type", "2", "--out", tmp_path / "out", *jobs)
    assert proc.returncode == 3, proc.stderr
    [error] = {r["error"] for r in rows(tmp_path / "out" / "summary.csv")}
    assert "batches.<locals>.Squares" in error and "defined inside a function" in error, error
    assert "multiprocessing_context='fork'" in error and "top level of local_class.py" in error, error
