"""The command line end to end: CliRunner for exit codes and files, subprocesses for the real
entry point, signals and ``kill -9``. Exact checks on the CSV files against the sample models'
documented behaviour."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from gradcheck_cli import __version__
from gradcheck_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SCRIPTS = Path(__file__).resolve().parent / "scripts"

runner = CliRunner()


def invoke(*args: str, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def gradclip(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """The real entry point in a fresh interpreter."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


# --- help and version --------------------------------------------------------------------------


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from gradcheck_cli.cli import app; "
        "r = CliRunner().invoke(app, ['--version']); assert r.exit_code == 0, r.output; print(r.output); "
        "r = CliRunner().invoke(app, ['sweep', '--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gradclip {__version__}"


def test_help_lists_commands_and_exit_codes():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("sweep", "check", "recipes", "Exit codes"):
        assert word in result.output


# --- sweep on the bundled NaN sample: exact onset --------------------------------------------------


@pytest.fixture(scope="module")
def nan_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "report"
    result = invoke(
        "sweep",
        SAMPLES / "nan_at_step.py",
        "--steps",
        8,
        "--max-norm",
        "0.5,5",
        "--norm-type",
        "2,inf",
        "--out",
        out,
        "--json",
    )
    return result, out


def test_sweep_nan_at_step_pins_onset_step_and_parameter(nan_sweep):
    result, out = nan_sweep
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["run"]) == ["unclipped", "clip_0.5_2", "clip_0.5_inf", "clip_5_2", "clip_5_inf"]
    assert (summary["status"] == "non_finite").all()
    assert (summary["nan_step"] == 5).all()
    assert (summary["nan_source"] == "backward").all()
    assert (summary["nan_param"] == "head.weight").all()
    assert summary["diverged_step"].isna().all()
    assert (summary["steps"] == 5).all()
    assert summary.loc[0, "max_norm"] != summary.loc[0, "max_norm"]  # blank -> NaN for the control
    assert summary["norm_type"].tolist() == [2.0, 2.0, math.inf, 2.0, math.inf]  # numeric in pandas


def test_sweep_json_matches_summary_csv(nan_sweep):
    result, out = nan_sweep
    records = json.loads(result.stdout)
    summary = pd.read_csv(out / "summary.csv")
    assert [r["run"] for r in records] == list(summary["run"])
    assert [r["nan_step"] for r in records] == list(summary["nan_step"])
    assert [r["nan_param"] for r in records] == list(summary["nan_param"])


def test_sweep_steps_csv_is_exact(nan_sweep):
    _, out = nan_sweep
    steps = pd.read_csv(out / "steps.csv")
    summary = pd.read_csv(out / "summary.csv")
    # Fairness: step 1 is identical across every run of the sweep.
    first = steps[steps["step"] == 1]
    assert first["loss"].nunique() == 1
    assert len(first) == len(summary)
    for run, rows in steps.groupby("run", sort=False):
        assert list(rows["step"]) == list(range(1, len(rows) + 1))
        healthy = rows[rows["step"] < 5]
        onset = rows[rows["step"] == 5].iloc[0]
        assert math.isfinite(onset["loss"]) and math.isnan(onset["grad_norm"]) and math.isnan(onset["clip_coef"])
        cell = summary[summary["run"] == run].iloc[0]
        if run == "unclipped":
            assert (healthy["clip_coef"] == 1.0).all()
        else:
            expected = (cell["max_norm"] / (healthy["grad_norm"] + 1e-6)).clip(upper=1.0)
            assert healthy["clip_coef"].tolist() == pytest.approx(expected.tolist(), rel=1e-12)
        # Summary statistics agree with the per-step rows.
        assert cell["grad_norm_max"] == healthy["grad_norm"].max()
        assert cell["min_loss"] == rows["loss"].min()
        assert cell["clipped_frac"] == pytest.approx((healthy["clip_coef"] < 1).mean())


def test_sweep_histograms_count_every_finite_norm(nan_sweep):
    _, out = nan_sweep
    hist = pd.read_csv(out / "histograms.csv", dtype={"norm_type": str})
    steps = pd.read_csv(out / "steps.csv")
    summary = pd.read_csv(out / "summary.csv", dtype={"norm_type": str})
    control = pd.read_csv(out / "control_norms.csv", dtype={"norm_type": str})
    own = dict(zip(summary["run"], summary["norm_type"]))
    assert set(hist["norm_type"]) == {"2", "inf"}
    for norm_type, per_type in hist.groupby("norm_type"):
        # bins are shared by the runs of one norm type only: L2 and inf never share an axis
        edges = sorted(set(per_type["bin_left"]) | set(per_type["bin_right"]))
        for run, rows in per_type.groupby("run"):
            if own[run] == norm_type:
                expected = steps[steps["run"] == run]["grad_norm"].notna().sum()
            else:  # the control run, in the grid's other norm type
                assert run == "unclipped"
                expected = (
                    control[(control["run"] == run) & (control["norm_type"] == norm_type)]["grad_norm"].notna().sum()
                )
            assert rows["count"].sum() == expected
            assert list(rows["bin_left"]) == edges[:-1] and list(rows["bin_right"]) == edges[1:]
        ratios = [b / a for a, b in zip(edges[:-1], edges[1:]) if a > 0]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)  # log-spaced
    assert set(hist[hist["run"] == "unclipped"]["norm_type"]) == {"2", "inf"}


def test_sweep_fail_on_nan_exits_1(tmp_path):
    result = invoke(
        "sweep",
        SAMPLES / "nan_at_step.py",
        "--steps",
        6,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--out",
        tmp_path / "r",
        "--fail-on-nan",
    )
    assert result.exit_code == 1, result.output
    assert "head.weight" in result.stdout


# The two --fail-on-* flags act independently: each fails only on its own kind of instability.
# nan_at_step goes non-finite (never diverges); exploding_rnn diverges unclipped (never NaN).
FAIL_FLAG_CASES = [
    ("nan_at_step.py", 6, "non_finite", [], 0),
    ("nan_at_step.py", 6, "non_finite", ["--fail-on-nan"], 1),
    ("nan_at_step.py", 6, "non_finite", ["--fail-on-divergence"], 0),
    ("exploding_rnn.py", 4, "diverged", [], 0),
    ("exploding_rnn.py", 4, "diverged", ["--fail-on-divergence"], 1),
    ("exploding_rnn.py", 4, "diverged", ["--fail-on-nan"], 0),
]


@pytest.mark.parametrize("script, steps, control_status, flags, code", FAIL_FLAG_CASES)
def test_fail_flags_act_independently(tmp_path, script, steps, control_status, flags, code):
    out = tmp_path / "r"
    result = invoke(
        "sweep", SAMPLES / script, "--steps", steps, "--max-norm", "1", "--norm-type", "2", "--out", out, *flags
    )
    assert result.exit_code == code, result.output
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "status"] == control_status
    assert not ({"non_finite", "diverged"} <= set(summary["status"]))  # one kind of instability only


def test_sweep_fail_on_divergence_and_best_of_a_grid(tmp_path):
    result = invoke(
        "sweep",
        SAMPLES / "exploding_rnn.py",
        "--steps",
        10,
        "--max-norm",
        "0.1,1,10",
        "--norm-type",
        "2,inf",
        "--out",
        tmp_path / "r",
        "--fail-on-divergence",
    )
    assert result.exit_code == 1, result.output
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert dict(zip(summary["run"], summary["status"])) == {
        "unclipped": "diverged",
        "clip_0.1_2": "stable",
        "clip_0.1_inf": "stable",
        "clip_1_2": "stable",
        "clip_1_inf": "stable",
        "clip_10_2": "diverged",
        "clip_10_inf": "diverged",
    }
    assert summary.loc[0, "diverged_step"] == 2
    # Four stable candidates with different smoothed losses (the mean of the last 10): the verdict
    # must name the lowest one, worked out here from summary.csv alone, and the runs whose
    # difference from it is within noise (2 standard errors of the two means).
    candidates = summary[(summary["status"] == "stable") & summary["max_norm"].notna()]
    assert candidates["smoothed_loss"].nunique() == 4
    best = candidates.loc[candidates["smoothed_loss"].idxmin()]
    assert best["run"] == "clip_1_2"
    verdict = [line for line in result.stdout.splitlines() if line.startswith("best:")]
    assert len(verdict) == 1
    assert verdict[0].startswith(f"best: max_norm=1 norm_type=2 (stable, smoothed loss {best['smoothed_loss']:.4g})")
    n = 10
    within = [
        row["run"]
        for _, row in candidates.iterrows()
        if row["run"] != best["run"]
        and abs(row["smoothed_loss"] - best["smoothed_loss"])
        <= 2 * math.sqrt(row["smoothed_loss_sd"] ** 2 / n + best["smoothed_loss_sd"] ** 2 / n)
    ]
    if within:
        assert f"no meaningful difference from {', '.join(within)}" in verdict[0]
    else:
        assert "no meaningful difference" not in verdict[0]
    assert "unclipped: diverged at step 2" in verdict[0]
    for run in summary["run"]:
        assert run in result.stdout


# --- check ----------------------------------------------------------------------------------------


def test_check_reports_step_and_parameter_and_exits_1(tmp_path):
    junit = tmp_path / "check.xml"
    result = invoke("check", SAMPLES / "nan_at_step.py", "--steps", 10, "--junit", junit)
    assert result.exit_code == 1, result.output
    assert "step 5" in result.stdout and "head.weight" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1  # one greppable verdict line
    from junitparser import Failure, JUnitXml

    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert suite.tests == 1 and suite.failures == 1
    case = next(iter(suite))
    assert case.name == "unclipped"
    assert isinstance(case.result[0], Failure) and "head.weight" in case.result[0].message


def test_check_stable_exits_0(tmp_path):
    result = invoke("check", SCRIPTS / "stable_linear.py", "--steps", 20, "--max-norm", "1", "--norm-type", "inf")
    assert result.exit_code == 0, result.output
    assert "stable" in result.stdout


def test_check_diverged_exits_1():
    result = invoke("check", SAMPLES / "exploding_rnn.py", "--steps", 5)
    assert result.exit_code == 1
    assert "diverged" in result.stdout and "step 2" in result.stdout


@pytest.mark.parametrize("script", ["raises_in_loss.py", "raises_at_import.py", "raises_in_build_model.py"])
def test_check_exits_3_when_the_script_raises(script):
    """README: check "exits ... 3 when your code raised"."""
    result = invoke("check", SCRIPTS / script, "--steps", 6, "--max-norm", "1")
    assert result.exit_code == 3, result.output
    assert "Traceback (most recent call last)" in result.output  # the user's own frames
    assert "gradcheck_cli" not in result.output


# --- JUnit ----------------------------------------------------------------------------------------


def test_junit_report_reads_with_a_junit_parser(tmp_path):
    from junitparser import Error, JUnitXml

    junit = tmp_path / "sweep.xml"
    result = invoke(
        "sweep",
        SCRIPTS / "raises_in_loss.py",
        "--steps",
        3,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--out",
        tmp_path / "a",
        "--junit",
        junit,
    )
    assert result.exit_code == 0, result.output  # 3 steps never reach the failing step 4
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert (suite.tests, suite.failures, suite.errors) == (2, 0, 0)

    result = invoke(
        "sweep",
        SAMPLES / "nan_at_step.py",
        "--steps",
        6,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--out",
        tmp_path / "b",
        "--junit",
        junit,
    )
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert (suite.tests, suite.failures, suite.errors) == (2, 2, 0)
    messages = [case.result[0].message for case in suite]
    assert all("step 5" in m and "head.weight" in m for m in messages)

    result = invoke(
        "sweep",
        SCRIPTS / "raises_in_loss.py",
        "--steps",
        6,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--out",
        tmp_path / "c",
        "--junit",
        junit,
    )
    assert result.exit_code == 3
    suite = next(iter(JUnitXml.fromfile(str(junit))))
    assert (suite.tests, suite.failures, suite.errors) == (2, 0, 2)
    assert all(isinstance(case.result[0], Error) and "bad batch 4" in case.result[0].message for case in suite)


# --- failing user code --------------------------------------------------------------------------


def test_user_error_in_a_run_keeps_going_and_exits_3(tmp_path):
    out = tmp_path / "r"
    result = invoke(
        "sweep", SCRIPTS / "raises_in_loss.py", "--steps", 6, "--max-norm", "1,2", "--norm-type", "2", "--out", out
    )
    assert result.exit_code == 3, result.output
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3  # every run ran
    assert (summary["status"] == "error").all()
    assert (summary["error"] == "RuntimeError: bad batch 4").all()
    assert (summary["steps"] == 3).all()
    assert "raises_in_loss.py" in result.stderr  # trimmed traceback points into the user's file
    assert "gradcheck_cli" not in result.stderr.split("error")[0]


def test_non_scalar_loss_is_explained(tmp_path):
    result = invoke(
        "sweep",
        SCRIPTS / "non_scalar_loss.py",
        "--steps",
        2,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--out",
        tmp_path / "r",
    )
    assert result.exit_code == 3
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert summary["error"].str.contains("loss_fn must return a scalar tensor").all()


@pytest.mark.parametrize(
    "script, needle", [("raises_in_build_model.py", "build_model"), ("raises_at_import.py", "raises_at_import.py")]
)
def test_build_model_or_import_failure_exits_3_with_user_traceback(tmp_path, script, needle):
    proc = gradclip("sweep", SCRIPTS / script, "--steps", 2, "--out", tmp_path / "r")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" in proc.stderr and needle in proc.stderr
    assert "gradcheck_cli" not in proc.stderr  # trimmed to the user's frames
    assert not (tmp_path / "r" / "summary.csv").exists()


# --- bad input: exit 2, one clear line, no traceback -----------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


BAD_INPUTS = {
    "missing script": (["sweep", "no/such/script.py"], "does not exist"),
    "syntax error": (["sweep", SCRIPTS / "syntax_error.py"], "syntax_error.py"),
    "missing functions": (["sweep", SCRIPTS / "missing_functions.py"], "batches"),
    "negative max-norm": (["sweep", SCRIPTS / "stable_linear.py", "--max-norm", "-1"], "'-1'"),
    "zero max-norm": (["sweep", SCRIPTS / "stable_linear.py", "--max-norm", "0,1"], "'0'"),
    "max-norm not a number": (["sweep", SCRIPTS / "stable_linear.py", "--max-norm", "big"], "'big'"),
    "norm-type not a number": (["sweep", SCRIPTS / "stable_linear.py", "--norm-type", "l2"], "'l2'"),
    "steps below 1": (["sweep", SCRIPTS / "stable_linear.py", "--steps", "0"], "--steps"),
    "check steps below 1": (["check", SCRIPTS / "stable_linear.py", "--steps", "0"], "--steps"),
    "check bad norm-type": (["check", SCRIPTS / "stable_linear.py", "--norm-type", "x"], "'x'"),
    "check negative max-norm": (["check", SCRIPTS / "stable_linear.py", "--max-norm", "-2"], "-2"),
    "missing recipe": (["sweep", "--recipe", "no/such/recipe.toml"], "recipe.toml"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_no_traceback(case, tmp_path):
    args, needle = BAD_INPUTS[case]
    result = invoke(*args, "--out", tmp_path / "r") if args[0] == "sweep" else invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert needle in result.output
    assert "error" in result.output.lower()


def test_bad_out_dirs_exit_2(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):
        result = invoke("sweep", SCRIPTS / "stable_linear.py", "--steps", 1, "--out", out)
        assert result.exit_code == 2, result.output
        assert str(a_file) in result.output and "Traceback" not in result.output
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("steps = [", "not valid TOML"),
        ('script = "x.py"\nmax_nrom = [1]\n', "max_nrom"),
        ('steps = "many"\n', "steps"),
        ("max_norm = [-1]\n", "max_norm"),
    ],
)
def test_bad_recipes_exit_2(tmp_path, text, needle):
    result = invoke("sweep", SCRIPTS / "stable_linear.py", "--recipe", _recipe(tmp_path, text), "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_debug_env_shows_the_traceback(tmp_path):
    proc = gradclip("sweep", SCRIPTS / "stable_linear.py", "--max-norm", "-1", env={"GRADCLIP_DEBUG": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    proc = gradclip("sweep", SCRIPTS / "stable_linear.py", "--max-norm", "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


# --- recipes -------------------------------------------------------------------------------------


def test_recipes_command_lists_bundled_recipes():
    result = invoke("recipes")
    assert result.exit_code == 0
    for name in ("exploding_rnn", "nan_at_step", "tiny_lm"):
        assert name in result.stdout


def test_command_line_overrides_recipe(tmp_path):
    recipe = _recipe(
        tmp_path, f'script = "{SAMPLES / "nan_at_step.py"}"\nmax_norm = [1, 2]\nnorm_type = [2]\nsteps = 3\n'
    )
    result = invoke("sweep", "--recipe", recipe, "--max-norm", "7", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert list(summary["run"]) == ["unclipped", "clip_7_2"]
    assert (summary["steps"] == 3).all()


def test_recipe_fail_flags_apply(tmp_path):
    recipe = _recipe(
        tmp_path,
        'script = "../../sample_models/nan_at_step.py"\nsteps = 6\nmax_norm = [1]\nnorm_type = [2]\nfail_on_nan = true\n',
    )
    # the script path resolves relative to the recipe file, not to the working directory
    recipe = recipe.rename(ROOT / "tests" / "scripts" / "_tmp_recipe.toml") if False else recipe
    nested = ROOT / "tests" / "scripts"
    path = nested / "tmp_fail_recipe.toml"
    path.write_text(recipe.read_text())
    try:
        result = invoke("sweep", "--recipe", path, "--out", tmp_path / "r")
    finally:
        path.unlink()
    assert result.exit_code == 1, result.output


# --- determinism, interruption, resume ------------------------------------------------------------

SLOW_ARGS = ["sweep", SCRIPTS / "slow_linear.py", "--steps", 40, "--max-norm", "0.5,1", "--norm-type", "2,inf"]


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    frames = {name: pd.read_csv(out / name) for name in ("summary.csv", "steps.csv", "histograms.csv")}
    frames["summary.csv"] = frames["summary.csv"].drop(columns=["seconds"])
    return frames


def _assert_same_reports(a: Path, b: Path) -> None:
    fa, fb = _frames(a), _frames(b)
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name], check_exact=True)
    for name in ("steps.csv", "histograms.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "r"
    result = invoke(*SLOW_ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_two_identical_sweeps_give_identical_numbers(uninterrupted, tmp_path):
    result = invoke(*SLOW_ARGS, "--out", tmp_path / "again")
    assert result.exit_code == 0
    _assert_same_reports(uninterrupted, tmp_path / "again")


def _start_and_signal(out: Path, sig: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """Start a real sweep, wait until its first run is on disk, then send ``sig``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradcheck_cli", *map(str, SLOW_ARGS), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    summary = out / "summary.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if summary.exists() and len(pd.read_csv(summary)) >= 1:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the sweep never finished its first run")
    time.sleep(0.3)  # now inside the second run
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_ctrl_c_keeps_finished_runs_and_resume_completes(uninterrupted, tmp_path):
    out = tmp_path / "r"
    proc = _start_and_signal(out, signal.SIGINT, tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr
    partial = pd.read_csv(out / "summary.csv")
    assert 1 <= len(partial) < 5
    assert (partial["status"] == "stable").all()

    resumed = invoke(*SLOW_ARGS, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.stderr
    _assert_same_reports(uninterrupted, out)


def test_kill_9_leaves_parseable_files_and_resume_completes(uninterrupted, tmp_path):
    out = tmp_path / "r"
    proc = _start_and_signal(out, signal.SIGKILL, tmp_path)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished: the sweep was mid-run
    finished = pd.read_csv(out / "summary.csv")
    steps = pd.read_csv(out / "steps.csv")
    hist = pd.read_csv(out / "histograms.csv")
    manifest = json.loads((out / "gradclip-sweep.json").read_text())
    # At least one run finished and none is cut short: whole runs only, as the uninterrupted
    # sweep recorded them, and the manifest names exactly those runs.
    full = pd.read_csv(uninterrupted / "summary.csv")
    assert 1 <= len(finished) < len(full)
    assert list(finished["run"]) == list(full["run"][: len(finished)])
    assert (finished["status"] == "stable").all() and (finished["steps"] == 40).all()
    assert manifest["finished_runs"] == list(finished["run"])
    assert steps.groupby("run", sort=False).size().to_dict() == dict.fromkeys(finished["run"], 40)
    assert set(hist["run"]) == set(finished["run"])
    # one histogram per run and norm type it measured (the control run measures every norm type
    # of the grid), each counting all 40 steps
    per_type = hist.groupby(["run", "norm_type"], sort=False)["count"].sum()
    assert (per_type == 40).all() and set(per_type.index.get_level_values(0)) == set(finished["run"])
    full_steps = pd.read_csv(uninterrupted / "steps.csv")
    pd.testing.assert_frame_equal(steps, full_steps[full_steps["run"].isin(finished["run"])], check_exact=True)

    resumed = invoke(*SLOW_ARGS, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    _assert_same_reports(uninterrupted, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_resume_with_different_options_is_refused(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "r"
    shutil.copytree(uninterrupted, out)
    before = (out / "summary.csv").read_bytes()
    result = invoke(*SLOW_ARGS[:-4], "--max-norm", "3", "--norm-type", "2", "--out", out, "--resume")
    assert result.exit_code == 2, result.output
    assert "--max-norm" in result.output
    assert (out / "summary.csv").read_bytes() == before


def test_reusing_out_without_resume_overwrites(tmp_path):
    """README: "Without --resume, a sweep overwrites the reports in --out"."""
    out = tmp_path / "r"
    first = invoke(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", 4, "--max-norm", "0.5,1", "--norm-type", "2,inf", "--out", out
    )
    assert first.exit_code == 0, first.output
    assert len(pd.read_csv(out / "summary.csv")) == 5
    second = invoke(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", 3, "--max-norm", "7", "--norm-type", "2", "--out", out
    )
    assert second.exit_code == 0, second.output
    assert "resuming" not in second.stderr
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["run"]) == ["unclipped", "clip_7_2"] and (summary["steps"] == 3).all()
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps["run"]) == ["unclipped"] * 3 + ["clip_7_2"] * 3
    assert set(pd.read_csv(out / "histograms.csv")["run"]) == {"unclipped", "clip_7_2"}
    manifest = json.loads((out / "gradclip-sweep.json").read_text())
    assert manifest["finished_runs"] == ["unclipped", "clip_7_2"]
    assert manifest["fingerprint"]["steps"] == 3
    # and the overwritten directory now resumes as the second sweep, not the first
    again = invoke(
        "sweep",
        SCRIPTS / "stable_linear.py",
        "--steps",
        3,
        "--max-norm",
        "7",
        "--norm-type",
        "2",
        "--out",
        out,
        "--resume",
    )
    assert again.exit_code == 0 and "resuming: 2 of 2 runs" in again.stderr


def test_default_out_is_gradclip_report_in_the_working_directory(tmp_path):
    proc = gradclip(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", 2, "--max-norm", "1", "--norm-type", "2", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradclip-report"]
    assert list(pd.read_csv(tmp_path / "gradclip-report" / "summary.csv")["run"]) == ["unclipped", "clip_1_2"]
    assert "reports written to gradclip-report/" in proc.stderr


def test_default_lr_is_0_01(tmp_path):
    """Without --lr and without build_optimizer, runs train with SGD at lr 0.01: the losses and
    norms equal a plain torch loop's with torch.optim.SGD(lr=0.01), and differ from lr 0.02."""
    from reference_loop import reference_training

    from gradcheck_cli.loader import load_experiment

    out = tmp_path / "r"
    result = invoke(
        "sweep", SCRIPTS / "stable_linear.py", "--steps", 5, "--max-norm", "1", "--norm-type", "2", "--out", out
    )
    assert result.exit_code == 0, result.output
    steps = pd.read_csv(out / "steps.csv")
    experiment = load_experiment(SCRIPTS / "stable_linear.py")
    for run, max_norm in (("unclipped", None), ("clip_1_2", 1.0)):
        rows = steps[steps["run"] == run]
        ref = reference_training(experiment, 5, lr=0.01, max_norm=max_norm)
        assert rows["loss"].tolist() == [s.loss for s in ref]
        assert rows["grad_norm"].tolist() == pytest.approx([s.norm for s in ref], rel=1e-6)
    other = reference_training(experiment, 5, lr=0.02)
    assert steps[steps["run"] == "unclipped"]["loss"].tolist()[1:] != [s.loss for s in other][1:]


def test_narrow_terminal_table_names_the_columns_it_drops(tmp_path):
    """README: "On a narrower terminal the table drops its least important columns and says which"."""
    args = ["sweep", SCRIPTS / "stable_linear.py", "--steps", 3, "--max-norm", "1", "--norm-type", "2"]
    wide = invoke(*args, "--out", tmp_path / "a", env={"COLUMNS": "160"})
    narrow = invoke(*args, "--out", tmp_path / "b", env={"COLUMNS": "72"})
    assert wide.exit_code == 0 and narrow.exit_code == 0, narrow.output
    assert "left out" not in wide.stdout and "p50" in wide.stdout and "p95" in wide.stdout
    # the verdict and the recommendation after the table are single unwrapped lines
    lines = narrow.stdout.splitlines()
    assert lines[-1].startswith("recommendation:")
    table_lines = lines[:-2]
    assert max(len(line) for line in table_lines) <= 72
    flat = " ".join(narrow.stdout.split())
    named = flat.split("left out to fit the console: ")[1].split(" (see summary.csv)")[0].split(", ")
    assert named[:2] == ["min loss", "norm p50"]  # the least important go first
    header = " ".join(narrow.stdout.split("───")[0].split())
    if "norm p50" in named:
        assert "p50" not in header
    if "norm p95" in named:
        assert "p95" not in header


def test_help_documents_the_defaults():
    result = invoke("sweep", "--help")
    text = " ".join(result.output.split())
    assert "the default SGD uses 0.01" in text and "[default: gradclip-report]" in text


# --- the installed console script on the samples -----------------------------------------------


def test_console_script_runs_a_bundled_recipe(tmp_path):
    proc = gradclip(
        "sweep", "--recipe", "nan_at_step", "--steps", 6, "--out", tmp_path / "r", "--fail-on-nan", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    summary = pd.read_csv(tmp_path / "r" / "summary.csv")
    assert (summary["nan_step"] == 5).all() and (summary["nan_param"] == "head.weight").all()
    assert "head.weight" in proc.stdout


def test_nothing_is_written_outside_out(tmp_path):
    """The user's folder stays as it was: no __pycache__, no stray report files."""
    import shutil

    user = tmp_path / "user"
    user.mkdir()
    for name in ("stable_linear.py", "data_helper.py"):
        shutil.copy(SCRIPTS / name, user / name)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # as on a user's machine
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradcheck_cli",
            "sweep",
            str(user / "stable_linear.py"),
            "--steps",
            "3",
            "--max-norm",
            "1",
            "--norm-type",
            "2",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in user.iterdir()) == ["data_helper.py", "stable_linear.py"]
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "control_norms.csv",
        "gradclip-sweep.json",
        "histograms.csv",
        "layers.csv",
        "recommendation.json",
        "report.html",
        "steps.csv",
        "summary.csv",
    ]


def test_a_bug_in_gradclip_exits_4_without_traceback(tmp_path, monkeypatch):
    import gradcheck_cli.sweep

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gradcheck_cli.sweep, "run_sweep", broken)
    result = invoke("sweep", SCRIPTS / "stable_linear.py", "--steps", 1, "--out", tmp_path / "r")
    assert result.exit_code == 4
    assert "internal error: ZeroDivisionError: a bug" in result.output
    assert "Traceback" not in result.output and "GRADCLIP_DEBUG" in result.output


@pytest.mark.parametrize("command", ["sweep", "check"])
def test_json_stdout_stays_json_when_the_script_prints(tmp_path, command):
    args = [command, SCRIPTS / "chatty.py", "--steps", 2, "--max-norm", "1", "--norm-type", "2", "--json"]
    if command == "sweep":
        args += ["--out", tmp_path / "r"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["status"] for r in records] == ["stable"] * len(records)
    assert "loading data..." in result.stderr and "step" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["sweep", "check"])
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, command):
    args = [command, SCRIPTS / "stable_linear.py", "--device", "cuda"]
    result = invoke(*args, *(["--out", tmp_path / "r"] if command == "sweep" else []))
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output and "--device cpu" in result.output
