"""The real entry point under hostile conditions: signals, a closed stdout, a full disk (a
file-size limit), a concurrent sweep, a script that calls ``os._exit`` or segfaults, a script that
changes directory, spawned DataLoader workers. Subprocesses throughout: exit codes and signals
are only real there."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from gradcheck_cli.report import files

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"
SLOW = SCRIPTS / "slow_linear.py"
SLOW_GRID = ["--steps", "12", "--max-norm", "0.5,1,2", "--norm-type", "2"]


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    e.pop("GRADCLIP_DEBUG", None)
    e.update(extra)
    return e


def command(*args) -> list[str]:
    return [sys.executable, "-m", "gradcheck_cli", *map(str, args)]


def gradclip(*args, cwd=None, preexec_fn=None, timeout=300, **extra_env):
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env(**extra_env),
        preexec_fn=preexec_fn,
        timeout=timeout,
    )


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def no_traceback(text: str) -> bool:
    return "Traceback" not in text


# --- SIGTERM and SIGHUP stop like Ctrl-C ----------------------------------------------------------


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_sigterm_and_sighup_keep_finished_runs_and_print_the_resume_command(tmp_path, signum, code, word):
    # a long --out path: the resume command is longer than 80 columns and must stay on one line
    out = tmp_path / ("a-rather-long-directory-name-for-the-reports-" * 2) / "out"
    proc = subprocess.Popen(
        command("sweep", SLOW, *SLOW_GRID, "--out", out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert wait_for(lambda: (out / files.MANIFEST_FILE).exists()), "no run finished"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert no_traceback(stderr)
    assert f"stopped by {word}:" in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("resume with: ")]
    assert len(lines) == 1
    assert lines[0].endswith(f"--out {out} --resume") and len(lines[0]) > 80
    finished = json.loads((out / files.MANIFEST_FILE).read_text())["finished_runs"]
    assert 1 <= len(finished) < 4
    assert not (out / files.LOCK_FILE).exists()

    resumed = gradclip("sweep", SLOW, *SLOW_GRID, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(finished)} of 4 runs" in resumed.stderr
    fresh = gradclip("sweep", SLOW, *SLOW_GRID, "--out", tmp_path / "fresh")
    assert fresh.returncode == 0
    for name in (files.STEPS_FILE, files.HISTOGRAMS_FILE):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
    assert (
        pd.read_csv(out / files.SUMMARY_FILE)
        .drop(columns="seconds")
        .equals(pd.read_csv(tmp_path / "fresh" / files.SUMMARY_FILE).drop(columns="seconds"))
    )


# --- a broken pipe on stdout ------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["sweep", "check"])
def test_closed_stdout_exits_141_without_traceback_and_keeps_the_reports(tmp_path, cmd):
    args = (
        [
            "sweep",
            SCRIPTS / "stable_linear.py",
            "--steps",
            "3",
            "--max-norm",
            "1",
            "--norm-type",
            "2",
            "--out",
            tmp_path / "out",
            "--junit",
            tmp_path / "j.xml",
        ]
        if cmd == "sweep"
        else ["check", SCRIPTS / "stable_linear.py", "--steps", "3", "--junit", tmp_path / "j.xml"]
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as with `| head -0`
    try:
        proc = subprocess.run(
            command(*args), stdout=write_end, stderr=subprocess.PIPE, text=True, env=env(), timeout=300
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert no_traceback(proc.stderr) and "internal error" not in proc.stderr
    assert (tmp_path / "j.xml").exists()  # reports are still written
    if cmd == "sweep":
        assert len(pd.read_csv(tmp_path / "out" / files.SUMMARY_FILE)) == 2


def test_head_in_a_shell_pipeline_is_not_instability(tmp_path):
    script = f"{sys.executable} -m gradcheck_cli sweep {SCRIPTS / 'stable_linear.py'} --steps 2 --out {tmp_path / 'o'} | head -1"
    proc = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + script], capture_output=True, text=True, env=env(), timeout=300
    )
    assert proc.returncode in (0, 141), proc.stderr  # 0 when head read before gradclip finished writing
    assert proc.returncode != 1 and no_traceback(proc.stderr)


# --- writing reports fails mid-sweep --------------------------------------------------------------


def _file_size_limit(nbytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def test_disk_full_mid_sweep_names_the_file_prints_the_finished_runs_and_exits_5(tmp_path):
    out = tmp_path / "out"
    # steps.csv grows by about 1.9 kB per 40-step run: the third run's append passes 5000 bytes
    proc = gradclip(
        "sweep",
        SCRIPTS / "stable_linear.py",
        "--steps",
        "40",
        "--max-norm",
        "0.5,1,2,4",
        "--norm-type",
        "2",
        "--out",
        out,
        preexec_fn=_file_size_limit(5000),
    )
    assert proc.returncode == 5, proc.stderr
    assert no_traceback(proc.stderr)
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error == [f"error: cannot write {out / files.STEPS_FILE}: File too large"]
    finished = json.loads((out / files.MANIFEST_FILE).read_text())["finished_runs"]
    assert 1 <= len(finished) < 5
    for run in finished:  # the finished runs' table is printed
        assert run in proc.stdout
    assert f"stopped after {len(finished) + 1} of 5 runs, {len(finished)} of them saved in {out}/" in proc.stderr
    assert len(pd.read_csv(out / files.SUMMARY_FILE)) == len(finished)  # the files agree with the manifest
    # what was written is consistent and resumes once there is space again
    resumed = gradclip(
        "sweep",
        SCRIPTS / "stable_linear.py",
        "--steps",
        "40",
        "--max-norm",
        "0.5,1,2,4",
        "--norm-type",
        "2",
        "--out",
        out,
        "--resume",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert len(pd.read_csv(out / files.SUMMARY_FILE)) == 5


def test_unwritable_out_is_refused_before_the_first_run(tmp_path):
    # a file-size limit of 0 makes the first write into --out (the lock) fail, as a read-only file system would
    marker = tmp_path / "ran"
    script = write_script(
        tmp_path,
        "s.py",
        f"""
        import torch
        def build_model():
            open({str(marker)!r}, "w").close()
            return torch.nn.Linear(1, 1)
        def batches():
            return [torch.ones(1, 1)]
        def loss_fn(model, b):
            return model(b).sum()
        """,
    )
    proc = gradclip("sweep", script, "--steps", "2", "--out", tmp_path / "out", preexec_fn=_file_size_limit(0))
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write in --out {str(tmp_path / 'out')!r}: File too large" in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("cmd", ["sweep", "check"])
def test_unwritable_junit_is_refused_before_the_first_run(tmp_path, cmd):
    (tmp_path / "file").write_text("x")
    junit = tmp_path / "file" / "j.xml"
    args = ["--out", tmp_path / "out"] if cmd == "sweep" else []
    proc = gradclip(cmd, SCRIPTS / "stable_linear.py", "--steps", "2", *args, "--junit", junit)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write --junit {str(junit)!r}" in proc.stderr
    assert not (tmp_path / "out" / files.SUMMARY_FILE).exists()


@pytest.mark.parametrize(
    "script, lr, verdict, code", [("stable_linear.py", "0.01", "PASS", 5), ("diverge.py", "1.5", "FAIL", 1)]
)
def test_check_prints_its_verdict_before_a_failing_junit_write(tmp_path, script, lr, verdict, code):
    junit = tmp_path / "j.xml"  # the probe (an empty file) passes; the XML itself exceeds the limit
    proc = gradclip(
        "check", SCRIPTS / script, "--steps", "5", "--lr", lr, "--junit", junit, preexec_fn=_file_size_limit(100)
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith(verdict + " unclipped")
    assert f"error: cannot write --junit {str(junit)!r}: File too large" in proc.stderr


# --- one sweep per --out --------------------------------------------------------------------------


def test_a_second_sweep_on_the_same_out_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        command("sweep", SLOW, *SLOW_GRID, "--out", out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
    )
    try:
        assert wait_for(lambda: (out / files.LOCK_FILE).exists())
        second = gradclip("sweep", SCRIPTS / "stable_linear.py", "--steps", "2", "--out", out)
        assert second.returncode == 2
        assert f"is in use by another gradclip sweep (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (out / files.LOCK_FILE).read_text().strip() == str(first.pid)  # left behind by kill -9
    third = gradclip(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", "2", "--max-norm", "1", "--norm-type", "2", "--out", out
    )
    assert third.returncode == 0, third.stderr
    assert not (out / files.LOCK_FILE).exists()
    assert len(pd.read_csv(out / files.SUMMARY_FILE)) == 2


# --- a process that disappears ---------------------------------------------------------------------


def test_os_exit_in_a_run_is_a_run_error_not_a_silent_pass(tmp_path):
    script = write_script(
        tmp_path,
        "exits.py",
        """
        import os, torch
        def build_model():
            return torch.nn.Linear(1, 1)
        def batches():
            return [torch.ones(1, 1)]
        def loss_fn(model, b):
            os._exit(0)
        """,
    )
    proc = gradclip("check", script, "--steps", "2")
    assert proc.returncode == 3, proc.stderr
    assert "os._exit(0) was called" in proc.stdout
    assert "FAIL unclipped" in proc.stdout
    sweep = gradclip("sweep", script, "--steps", "2", "--max-norm", "1", "--norm-type", "2", "--out", tmp_path / "o")
    assert sweep.returncode == 3
    assert list(pd.read_csv(tmp_path / "o" / files.SUMMARY_FILE)["status"]) == ["error", "error"]


def test_os_exit_at_import_exits_3(tmp_path):
    script = write_script(tmp_path, "exits.py", "import os\nos._exit(0)\n")
    proc = gradclip("check", script)
    assert proc.returncode == 3
    assert "os._exit(0) was called" in proc.stderr


def test_a_segfault_is_visible_and_never_exit_0(tmp_path):
    script = write_script(
        tmp_path,
        "crash.py",
        """
        import ctypes, torch
        def build_model():
            return torch.nn.Linear(1, 1)
        def batches():
            return [torch.ones(1, 1)]
        def loss_fn(model, b):
            ctypes.string_at(0)
        """,
    )
    proc = gradclip("check", script, "--steps", "2")
    assert proc.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "crash.py" in proc.stderr  # the Python stack names the user's line


# --- the script changes directory --------------------------------------------------------------------


def test_chdir_in_the_script_does_not_move_reports_and_resume_finds_them(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = write_script(
        tmp_path / "elsewhere",
        "wanders.py",
        f"""
        import os, torch
        os.chdir(os.path.dirname(os.path.abspath(__file__)))
        def build_model():
            return torch.nn.Linear(1, 1)
        def batches():
            os.chdir({str(tmp_path)!r})
            return [torch.ones(1, 1)]
        def loss_fn(model, b):
            return (model(b) ** 2).sum()
        """,
    )
    work = tmp_path / "work"
    work.mkdir()
    args = ("sweep", script, "--steps", "2", "--max-norm", "1", "--norm-type", "2", "--out", "rep", "--junit", "j.xml")
    proc = gradclip(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (work / "rep").iterdir()) == sorted(
        [
            *(set(files.APPENDED_FILES) - files.ONLY_WITH_ROWS),
            files.SUMMARY_FILE,
            files.HISTOGRAMS_FILE,
            files.MANIFEST_FILE,
            files.RECOMMENDATION_FILE,
            files.HTML_FILE,
        ]
    )
    assert (work / "j.xml").exists() and not (elsewhere / "rep").exists() and not (tmp_path / "rep").exists()
    resumed = gradclip(*args, "--resume", cwd=work)
    assert resumed.returncode == 0 and "resuming: 2 of 2 runs" in resumed.stderr


# --- DataLoader workers started with spawn ---------------------------------------------------------


def test_spawned_dataloader_workers_import_a_dataset_defined_in_the_script(tmp_path):
    script = write_script(
        tmp_path,
        "spawned.py",
        """
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Squares(Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                x = torch.tensor([float(i)])
                return x, 2 * x

        def build_model():
            return torch.nn.Linear(1, 1)

        def batches():
            return DataLoader(Squares(), batch_size=4, num_workers=1, multiprocessing_context="spawn")

        def loss_fn(model, batch):
            x, y = batch
            return torch.nn.functional.mse_loss(model(x), y)
        """,
    )
    proc = gradclip("check", script, "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PASS unclipped")


# --- messages on stderr are not hard-wrapped when it is not a terminal --------------------------------


def test_long_errors_stay_on_one_line_in_a_log(tmp_path):
    long_dir = tmp_path / ("x" * 90)
    proc = gradclip("sweep", long_dir / "missing.py")
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and str(long_dir / "missing.py") in error[0]
