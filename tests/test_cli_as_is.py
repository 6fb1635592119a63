"""``gradclip sweep|watch|check -- python SCRIPT ARGS`` through the real entry point, with the
default options, on unmodified scripts (tests/scripts/as_is/): files, verdicts, exit codes,
logs, and each cell's steps against the script run by itself with that clipping."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

AS_IS = Path(__file__).resolve().parent / "scripts" / "as_is"
LINE = re.compile(r"^step (\d+) loss (\S+) norm (\S+)", re.M)
GRADCLIP = [sys.executable, "-m", "gradcheck_cli"]


def gradclip(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*GRADCLIP, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def printed(script: str, *args: str, cwd: Path) -> list[tuple[int, float, float]]:
    proc = subprocess.run([sys.executable, str(AS_IS / script), *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [(int(s), float(loss), float(norm)) for s, loss, norm in LINE.findall(proc.stdout)]


def test_sweep_of_a_hand_written_update_script_as_it_is(tmp_path):
    proc = gradclip(
        "sweep", "--steps", "5", "--max-norm", "0.05", "--out", "rep",
        "--", "python", str(AS_IS / "word_lm.py"), "--epochs", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert summary["run"].tolist() == ["unclipped", "clip_0.05_2", "clip_0.05_inf"]
    assert summary["status"].eq("stable").all() and summary["warnings"].isna().all()
    steps = pd.read_csv(tmp_path / "rep" / "steps.csv")
    mine = steps[steps["run"] == "clip_0.05_2"]
    ref = printed("word_lm.py", "--epochs", "1", "--clip", "0.05", cwd=tmp_path)[:5]
    assert mine["loss"].tolist() == pytest.approx([r[1] for r in ref], rel=1e-5)
    assert mine["grad_norm"].tolist() == pytest.approx([r[2] for r in ref], rel=1e-5)
    assert (mine["clip_coef"] < 1).all()
    # the script's own output went to its log, not over the terminal
    assert "ppl" not in proc.stdout + proc.stderr
    assert "step 1 loss" in (tmp_path / "rep" / "logs" / "clip_0.05_2.log").read_text()
    assert "as written: max_norm=0.25, L2" in proc.stderr
    assert (tmp_path / "rep" / "report.html").stat().st_size > 0


def test_jobs_2_gives_the_files_of_jobs_1_and_resume_runs_nothing_again(tmp_path):
    args = ["--steps", "4", "--max-norm", "0.5", "--norm-type", "2", "--clip-value", "0.01"]
    cmd = ["--", "python", str(AS_IS / "plain_loop.py"), "--steps", "50"]
    one = gradclip("sweep", *args, "--out", "one", *cmd, cwd=tmp_path)
    two = gradclip("sweep", *args, "--jobs", "2", "--out", "two", *cmd, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    for name in ("steps.csv", "layers.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    a = pd.read_csv(tmp_path / "one" / "summary.csv").drop(columns=["seconds"])
    b = pd.read_csv(tmp_path / "two" / "summary.csv").drop(columns=["seconds"])
    assert a.equals(b)
    again = gradclip("sweep", *args, "--out", "one", "--resume", *cmd, cwd=tmp_path)
    assert again.returncode == 0 and "resuming: 3 of 3 runs already finished" in again.stderr


def test_python_dash_m_runs_the_module_from_the_current_directory(tmp_path):
    package = tmp_path / "proj" / "trainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(AS_IS / "plain_loop.py", package / "train.py")
    proc = gradclip(
        "sweep", "--steps", "3", "--max-norm", "1", "--norm-type", "2", "--out", "rep",
        "--", "python", "-m", "trainer.train", "--steps", "9",
        cwd=tmp_path / "proj",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pd.read_csv(tmp_path / "proj" / "rep" / "summary.csv")["steps"].tolist() == [3, 3]


@pytest.mark.parametrize(
    "command,code,words",
    [
        (["python", "missing.py"], 2, "script not found"),
        (["torchrun", "--nproc_per_node=2", "train.py"], 2, "torchrun starts one process per rank"),
        (["bash", "train.sh"], 2, "python SCRIPT [ARGS...] or python -m MODULE"),
        (["python", "-m", "no_such_module_here"], 2, "no module named 'no_such_module_here'"),
        (["python", str(AS_IS / "no_training.py")], 3, "the following arguments are required: --name"),
        (["python", str(AS_IS / "no_training.py"), "--name", "x"], 3, "no optimizer step or clip call happened"),
    ],
)
def test_bad_commands_get_one_clear_error(tmp_path, command, code, words):
    proc = gradclip("sweep", "--steps", "3", "--out", "rep", "--", *command, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_script_that_fails_midway_is_an_error_run_with_its_message(tmp_path):
    proc = gradclip("sweep", "--steps", "5", "--max-norm", "1", "--out", "rep", "--", "python",
                    str(AS_IS / "fails_at_step.py"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 3
    summary = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert summary["status"].eq("error").all() and summary["steps"].eq(2).all()
    assert summary["error"].str.contains("ValueError: the data file ran out").all()


def test_watch_records_a_skipped_nan_step_with_loader_workers(tmp_path):
    proc = gradclip("watch", "--out", "w", "--", "python", str(AS_IS / "nan_loop.py"), "--steps", "8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "w" / "summary.csv")
    row = summary.iloc[0]
    assert row["run"] == "as_written" and row["status"] == "non_finite"
    assert row["nan_step"] == 4 and row["nan_param"] == "2.weight" and row["nan_source"] == "backward"
    steps = pd.read_csv(tmp_path / "w" / "steps.csv")
    assert steps["step"].tolist() == list(range(1, 9)) and steps["skipped"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    ref = printed("nan_loop.py", "--steps", "8", cwd=tmp_path)
    finite = [i for i in range(8) if i != 3]
    assert [steps["loss"][i] for i in finite] == pytest.approx([ref[i][1] for i in finite], rel=1e-6)
    assert [steps["grad_norm"][i] for i in finite] == pytest.approx([ref[i][2] for i in finite], rel=1e-6)
    assert (tmp_path / "w" / "report.html").exists()
    assert "as written: max_norm=1, L2" in proc.stderr


def test_watch_can_stop_at_the_first_non_finite_step_and_names_an_amp_mistake(tmp_path):
    proc = gradclip("watch", "--stop-on-non-finite", "--out", "w", "--", "python", str(AS_IS / "nan_loop.py"),
                    cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pd.read_csv(tmp_path / "w" / "steps.csv")["step"].max() == 4
    amp = gradclip("watch", "--steps", "3", "--out", "a", "--", "python", str(AS_IS / "amp_accumulate.py"),
                   "--no-unscale", cwd=tmp_path)  # fmt: skip
    assert amp.returncode == 0, amp.stderr[-3000:]
    assert "at step 1 the script clipped while a GradScaler was active" in amp.stdout + amp.stderr


@pytest.mark.parametrize("exit_flag", ["--exit-at", "--sys-exit-at"])
def test_a_script_that_exits_midway_keeps_its_steps(tmp_path, exit_flag):
    proc = gradclip("watch", "--out", "w", "--", "python", str(AS_IS / "nan_loop.py"), "--nan-at", "99",
                    exit_flag, "3", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "w" / "summary.csv")
    assert summary["status"].tolist() == ["stable"]
    assert pd.read_csv(tmp_path / "w" / "steps.csv")["step"].tolist() == [1, 2, 3]


def test_check_gates_on_the_command_as_written_and_with_max_norm(tmp_path):
    bad = gradclip("check", "--steps", "6", "--", "python", str(AS_IS / "nan_loop.py"), cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr[-3000:]
    assert "step 4" in bad.stdout and "2.weight" in bad.stdout
    good = gradclip("check", "--steps", "4", "--max-norm", "0.5", "--", "python", str(AS_IS / "plain_loop.py"),
                    cwd=tmp_path)  # fmt: skip
    assert good.returncode == 0, good.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # check leaves no files behind


def test_a_policy_gradient_command_is_judged_like_a_sweep_not_by_a_ratio_to_step_1(tmp_path):
    """REINFORCE's loss takes both signs and has no scale: no run is called diverged."""
    proc = gradclip("sweep", "--steps", "40", "--out", "rl", "--", "python", str(AS_IS / "reinforce_bandit.py"),
                    cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "rl" / "summary.csv")
    assert summary["status"].eq("stable").all(), summary[["run", "status"]]
    losses = pd.read_csv(tmp_path / "rl" / "steps.csv").query("run == 'unclipped'")["loss"]
    assert (losses < 0).any() and (losses > 0).any()  # a loss no ratio to step 1 can judge
    assert "recommendation: no clipping needed" in proc.stdout


def test_watch_locates_a_spike_and_a_failing_run_shows_the_scripts_traceback(tmp_path):
    proc = gradclip("watch", "--out", "w", "--", "python", str(AS_IS / "spike_loop.py"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = pd.read_csv(tmp_path / "w" / "summary.csv").iloc[0]
    assert row["spike_step"] == 8 and row["spike_param"] == "2.weight"
    failing = gradclip("sweep", "--steps", "5", "--max-norm", "1", "--norm-type", "2", "--out", "rep", "--",
                       "python", str(AS_IS / "fails_at_step.py"), cwd=tmp_path)  # fmt: skip
    assert failing.returncode == 3
    assert 'raise ValueError("the data file ran out")' in failing.stdout + failing.stderr
