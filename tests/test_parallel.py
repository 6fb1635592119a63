"""Runs in worker processes: crashes isolated to their run, and files identical to a sweep in
one process (``--jobs 0``) whatever ``--jobs`` says."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck_cli.parallel import crash_message, threads_per_job

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPORTS = ("summary.csv", "steps.csv", "histograms.csv", "layers.csv")
TIMEOUT_S = 240


def gradclip(*args, env=None, timeout=TIMEOUT_S):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "sweep", *map(str, args)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rows(path: Path) -> list[dict]:
    """The file's rows, ``seconds`` (a timing) left out."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def files_without_seconds(out: Path) -> dict[str, bytes]:
    """Every report byte for byte, except summary.csv's seconds column."""
    got = {}
    for name in REPORTS:
        data = (out / name).read_bytes()
        if name == "summary.csv":
            lines = data.decode().splitlines()
            col = lines[0].split(",").index("seconds")
            data = "\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != col) for line in lines).encode()
        got[name] = data
    return got


GRID = ("--steps", "6", "--max-norm", "0.1,1", "--norm-type", "2,inf")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    proc = gradclip(SCRIPTS / "with_optimizer.py", *GRID, "--seeds", "0,1", "--out", out, "--jobs", "0")
    assert proc.returncode == 0, proc.stderr
    return files_without_seconds(out)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_jobs_give_the_files_of_one_process(in_process, tmp_path, jobs):
    # dropout, Adam, batches shuffled with three RNGs, two seeds (two snapshots per worker)
    proc = gradclip(SCRIPTS / "with_optimizer.py", *GRID, "--seeds", "0,1", "--out", tmp_path, "--jobs", jobs)
    assert proc.returncode == 0, proc.stderr
    assert files_without_seconds(tmp_path) == in_process


def test_prints_of_the_script_in_a_worker_reach_this_process(tmp_path):
    import json

    args = (SCRIPTS / "chatty.py", "--steps", "2", "--max-norm", "1", "--norm-type", "2", "--json", "--no-share")
    proc = gradclip(*args, "--out", tmp_path / "w")
    assert proc.returncode == 0, proc.stderr
    assert [r["run"] for r in json.loads(proc.stdout)] == ["unclipped", "clip_1_2"]  # JSON only
    # loss_fn prints "step" at each of the 2 steps of both runs, in the worker: all reach stderr
    assert proc.stderr.splitlines().count("step") == 4


# every run trains (the plan counts build_optimizer calls, one per run that trains)
CRASH_GRID = ("--steps", "4", "--max-norm", "0.1,1,10,100", "--norm-type", "2", "--no-share")


@pytest.fixture(scope="module")
def crash_reference(tmp_path_factory):
    """The crash script's sweep in one process, where it does not crash."""
    out = tmp_path_factory.mktemp("crash_ref")
    proc = gradclip(SCRIPTS / "crash_once.py", *CRASH_GRID, "--out", out, "--jobs", "0")
    assert proc.returncode == 0, proc.stderr
    return out


def test_runs_that_kill_their_worker_are_crashed_and_the_sweep_goes_on(crash_reference, tmp_path):
    # call 1 builds the snapshot's optimizer, call 2 is the control run's; then three runs die
    # in a row, each in a fresh worker, by os._exit(7), SIGKILL and SIGSEGV; the last one lives
    env = {"CRASH_COUNTER": str(tmp_path / "calls"), "CRASH_PLAN": "3:exit,4:kill,5:segv"}
    proc = gradclip(SCRIPTS / "crash_once.py", *CRASH_GRID, "--out", tmp_path / "out", env=env)
    assert proc.returncode == 3, proc.stderr
    got = {r["run"]: r for r in rows(tmp_path / "out" / "summary.csv")}
    want = {r["run"]: r for r in rows(crash_reference / "summary.csv")}
    assert list(got) == ["unclipped", "clip_0.1_2", "clip_1_2", "clip_10_2", "clip_100_2"]
    expected = {
        "clip_0.1_2": "worker process exited with code 7 during step 2",
        "clip_1_2": f"worker process killed by signal SIGKILL ({int(signal.SIGKILL)}) during step 2",
        "clip_10_2": f"worker process killed by signal SIGSEGV ({int(signal.SIGSEGV)}) during step 2",
    }
    for run, how in expected.items():
        crashed = got.pop(run)
        assert crashed["status"] == "crashed" and crashed["error"] == how and crashed["steps"] == "0"
        assert f"{run}: crashed" in proc.stderr and how in proc.stderr
        want.pop(run)
    assert got == want  # the runs before and after the crashes are untouched
    ref_steps = [r for r in rows(crash_reference / "steps.csv") if r["run"] not in expected]
    assert rows(tmp_path / "out" / "steps.csv") == ref_steps
    assert (tmp_path / "calls").read_text() == "x" * 6  # snapshot + five runs, no retries


def test_crash_with_two_jobs_keeps_every_other_run(crash_reference, tmp_path):
    env = {"CRASH_COUNTER": str(tmp_path / "calls"), "CRASH_PLAN": "3:kill"}
    proc = gradclip(SCRIPTS / "crash_once.py", *CRASH_GRID, "--out", tmp_path / "out", "--jobs", "2", env=env)
    assert proc.returncode == 3, proc.stderr
    got = rows(tmp_path / "out" / "summary.csv")
    want = rows(crash_reference / "summary.csv")
    assert [r["run"] for r in got] == [r["run"] for r in want]  # cell order, not finishing order
    crashed = [r for r in got if r["status"] == "crashed"]
    assert len(crashed) == 1  # which run drew call 3 depends on timing with two workers
    assert [r for r in got if r["status"] != "crashed"] == [r for r in want if r["run"] != crashed[0]["run"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--jobs", "-1"), "--jobs -1 must be 0 or more"),
        (("--threads-per-job", "0"), "--threads-per-job 0 must be at least 1"),
        (("--distributed", "rows"), "--distributed 'rows' is not a mode"),
    ],
)
def test_bad_parallel_options_are_usage_errors(tmp_path, args, message):
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    result = CliRunner().invoke(app, ["sweep", str(SCRIPTS / "stable_linear.py"), *args, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output


@given(cores=st.integers(1, 512), jobs=st.integers(1, 512))
def test_threads_never_oversubscribe_and_never_drop_to_zero(cores, jobs):
    threads = threads_per_job(jobs, cores)
    assert threads >= 1
    assert threads * jobs <= max(cores, jobs)  # more jobs than cores: one thread each
    assert threads == max(1, cores // jobs)


def test_crash_message_names_the_signal_or_the_code():
    assert crash_message(-9, 3) == "worker process killed by signal SIGKILL (9) during step 3"
    assert crash_message(1, 1) == "worker process exited with code 1 during step 1"
    assert crash_message(None, 2) == "worker process stopped answering during step 2"


def test_a_script_raising_keyboard_interrupt_in_a_worker_interrupts_the_sweep(tmp_path):
    proc = gradclip(SCRIPTS / "interrupt.py", "--steps", "4", "--max-norm", "1", "--norm-type", "2", "--out", tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr


def test_reports_name_a_crashed_run_and_junit_counts_it_as_an_error():
    from gradcheck_cli.report.junit import junit_tree
    from gradcheck_cli.report.terminal import error_panels
    from gradcheck_cli.results import CRASHED, STABLE, Cell, RunResult, StepRecord
    from gradcheck_cli.text import describe_result

    how = crash_message(-int(signal.SIGSEGV), 2)
    crashed = RunResult(Cell(1.0, 2.0), CRASHED, error=how)
    stable = RunResult(Cell(None, 2.0), STABLE, steps=[StepRecord(1, 0.5, 1.0, 1.0)])
    assert describe_result(crashed) == f"crashed: {how}"
    suite = junit_tree([stable, crashed]).getroot()
    assert suite.get("errors") == "1" and suite.get("failures") == "0"
    error = suite.find("testsuite/testcase[@name='clip_1_2']/error")
    assert error.get("type") == "crashed" and error.get("message") == how
    [panel] = error_panels([stable, crashed])
    assert panel.title.plain == "clip_1_2: crashed" and panel.renderable.plain == how
