import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import ExitCode, UsageError
from gradcheck_cli.report import files
from gradcheck_cli.report.jsonout import summary_json
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    HISTOGRAM_COLUMNS,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    STEP_COLUMNS,
    SUMMARY_COLUMNS,
    Cell,
    RunResult,
    StepRecord,
    shared_log_bins,
)

NAN = math.nan
REPO = Path(__file__).resolve().parent.parent
REPORTS = (files.SUMMARY_FILE, files.STEPS_FILE, files.LAYERS_FILE, files.CONTROL_NORMS_FILE, files.HISTOGRAMS_FILE)


def sample_results() -> list[RunResult]:
    """Every kind of value the reports must carry: NaN, inf, None, awkward text, zeros."""
    return [
        RunResult(
            Cell(None, 2.0),
            NON_FINITE,
            [
                StepRecord(
                    1,
                    1.7889255285263062,
                    65.70680236816406,
                    1.0,
                    layers=(("rnn.weight_hh_l0", 65.1), ("head", 0.1 + 0.2)),
                ),
                StepRecord(2, 0.1 + 0.2, math.inf, NAN, layers=(("rnn.weight_hh_l0", math.inf), ("head", NAN))),
            ],
            nan_step=2,
            nan_source=SOURCE_BACKWARD,
            nan_param="rnn.weight_hh_l0",
            seconds=0.123456789,
        ),
        RunResult(
            Cell(0.1, 2.0),
            STABLE,
            [StepRecord(i, 1.0 / i, 0.0 if i == 2 else 3.0 * i, 0.1 / 3) for i in range(1, 5)],
            seconds=1.5,
        ),
        RunResult(
            Cell(1.0, math.inf),
            DIVERGED,
            [StepRecord(1, 2.0, 5e-324, 1.0), StepRecord(2, 1.7976931348623157e308, NAN, NAN)],
            diverged_step=2,
        ),
        RunResult(Cell(10.0, 1.5), NON_FINITE, [StepRecord(1, NAN, NAN, NAN)], nan_step=1, nan_source=SOURCE_FORWARD),
        RunResult(
            Cell(100.0, 2.0),
            ERROR,
            [StepRecord(1, 3.0, 1.0, 1.0)],
            error='ValueError: a, "quoted"\nmultiline message; nan',
            error_traceback="Traceback ...",
        ),
    ]


def write(out: Path, results: list[RunResult]) -> None:
    files.write_reports(out, results, shared_log_bins(results))


def read_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in REPORTS}


def _bits(v):
    """Exact identity of a float (sign of zero included); every NaN is "nan" (CSV has a blank)."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else struct.pack("<d", v)
    return v


def same_result(a: RunResult, b: RunResult) -> bool:
    def key(r):
        steps = [
            (
                tuple(_bits(v) for v in (s.step, s.loss, s.grad_norm, s.clip_coef, s.lr)),
                s.skipped,
                tuple((n, _bits(v)) for n, v in s.layers),
                tuple((n, _bits(a), _bits(b)) for n, a, b in s.sites),
            )
            for s in r.steps
        ]
        return (
            r.run,
            r.cell,
            r.status,
            steps,
            r.nan_step,
            r.nan_source,
            r.nan_param,
            r.diverged_step,
            round(r.seconds, 4),
            r.error,
        )

    return key(a) == key(b)


# --- the output directory -----------------------------------------------------------------------


def test_prepare_out_dir_creates_nested_and_accepts_existing(tmp_path):
    out = files.prepare_out_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    assert files.prepare_out_dir(out) == out


def test_prepare_out_dir_removes_only_our_stale_temp_files(tmp_path):
    stale = tmp_path / ".summary.csv.4242.0a1b2c3d.tmp"
    stale.write_text("half")
    other = tmp_path / ".notes.txt.1.2.tmp"
    other.write_text("keep")
    files.prepare_out_dir(tmp_path)
    assert not stale.exists() and other.exists()


def test_prepare_out_dir_rejects_a_file(tmp_path):
    target = tmp_path / "report"
    target.write_text("x")
    with pytest.raises(UsageError) as err:
        files.prepare_out_dir(target)
    assert err.value.exit_code == ExitCode.USAGE
    assert str(target) in err.value.message and "not a directory" in err.value.message
    assert "--out" in err.value.hint


def test_prepare_out_dir_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as err:
        files.prepare_out_dir(tmp_path / "file" / "out")
    assert "file" in err.value.message and "--out" in err.value.hint


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_prepare_out_dir_permission_denied(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UsageError) as err:
            files.prepare_out_dir(locked / "out")
        assert "permission denied" in err.value.message
    finally:
        locked.chmod(0o700)


# --- CSV reports --------------------------------------------------------------------------------


def test_reports_parse_with_the_schema_columns(tmp_path):
    results = sample_results()
    write(tmp_path, results)
    summary = pd.read_csv(tmp_path / files.SUMMARY_FILE)
    steps = pd.read_csv(tmp_path / files.STEPS_FILE)
    hist = pd.read_csv(tmp_path / files.HISTOGRAMS_FILE)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(steps.columns) == STEP_COLUMNS
    assert list(hist.columns) == HISTOGRAM_COLUMNS
    assert list(summary["run"]) == [r.run for r in results]
    assert list(summary["status"]) == [r.status for r in results]  # pandas never reads a status as missing
    assert len(steps) == sum(len(r.steps) for r in results)
    assert len(hist) == len(results) * (len(shared_log_bins(results)) - 1)
    assert hist.groupby("run", sort=False)["count"].sum().tolist() == [len(r.finite_norms()) for r in results]


def test_csv_conventions_blanks_integers_and_inf(tmp_path):
    write(tmp_path, sample_results())
    lines = (tmp_path / files.SUMMARY_FILE).read_text().splitlines()
    control = lines[1].split(",")
    row = dict(zip(SUMMARY_COLUMNS, control))
    assert row["max_norm"] == ""  # the control has no max_norm: blank
    assert row["nan_step"] == "2"  # whole numbers without ".0"
    assert row["diverged_step"] == "" and row["error"] == ""
    assert row["norm_type"] == "2"
    steps_text = (tmp_path / files.STEPS_FILE).read_text()
    assert "unclipped,2,0.30000000000000004,inf,,,,,0,\n" in steps_text  # inf spelled out, NaN blank
    assert "clip_1_inf,1,2.0,5e-324,1.0,,,,0,\n" in steps_text
    assert ",nan," not in steps_text and "<NA>" not in steps_text
    assert "\r" not in steps_text


def test_floats_round_trip_exactly(tmp_path):
    results = sample_results()
    write(tmp_path, results)
    steps = pd.read_csv(tmp_path / files.STEPS_FILE)
    expected = [s for r in results for s in r.steps]
    for column in ("loss", "grad_norm", "clip_coef"):
        for got, record in zip(steps[column], expected):
            want = getattr(record, column)
            assert (math.isnan(got) and math.isnan(want)) or struct.pack("<d", got) == struct.pack("<d", want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=30))
def test_any_float_round_trips(tmp_path, values):
    result = RunResult(Cell(1.0, 2.0), STABLE, [StepRecord(i + 1, v, v, v) for i, v in enumerate(values)])
    write(tmp_path, [result])
    steps = pd.read_csv(tmp_path / files.STEPS_FILE)
    for got, want in zip(steps["loss"], values):
        assert (math.isnan(got) and math.isnan(want)) or struct.pack("<d", got) == struct.pack("<d", want)


def test_empty_sweep_writes_headers_only(tmp_path):
    files.write_reports(tmp_path, [], [])
    assert (tmp_path / files.SUMMARY_FILE).read_text() == ",".join(SUMMARY_COLUMNS) + "\n"
    assert pd.read_csv(tmp_path / files.STEPS_FILE).empty


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    results = sample_results()
    write(tmp_path, results[:2])
    before = read_bytes(tmp_path)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        write(tmp_path, results)
    assert read_bytes(tmp_path) == before  # the old complete files are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REPORTS)  # temp file removed


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_report_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write(tmp_path, sample_results())
    finally:
        os.umask(old)
    for name in REPORTS:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_nothing_is_written_outside_out_dir(tmp_path):
    out = tmp_path / "out"
    files.prepare_out_dir(out)
    results = sample_results()
    write(out, results)
    files.write_manifest(out, {"steps": 1}, [r.run for r in results])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORTS + (files.MANIFEST_FILE,))


_WRITER = textwrap.dedent(
    """
    import math, sys
    from gradcheck_cli.report import files
    from gradcheck_cli.results import Cell, RunResult, StepRecord, shared_log_bins
    out = sys.argv[1]
    results = []
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        steps = [StepRecord(s, 1.0 / s + i, float(s * i), 0.5) for s in range(1, 400)]
        results.append(RunResult(Cell(float(i), 2.0), "stable", steps))
        files.write_reports(out, results, shared_log_bins(results))
        files.write_manifest(out, {"i": i}, [r.run for r in results])
    """
)


def test_kill_9_at_any_moment_leaves_parseable_reports(tmp_path):
    """SIGKILL a process that rewrites the reports in a loop; every file must still parse."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for delay in (0.05, 0.2, 0.45, 0.7):
        out = tmp_path / f"kill_{delay}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        present = [n for n in REPORTS if (out / n).exists()]
        for name in present:
            frame = pd.read_csv(out / name)
            assert (
                len(frame.columns)
                == {
                    files.SUMMARY_FILE: len(SUMMARY_COLUMNS),
                    files.STEPS_FILE: len(STEP_COLUMNS),
                    files.LAYERS_FILE: 4,
                    files.CONTROL_NORMS_FILE: 4,
                    files.HISTOGRAMS_FILE: 5,
                }[name]
            )
            assert not frame.isna().all(axis=1).any()  # no half-written row
        if (out / files.MANIFEST_FILE).exists():
            manifest = json.loads((out / files.MANIFEST_FILE).read_text())
            summary = pd.read_csv(out / files.SUMMARY_FILE)
            assert set(manifest["finished_runs"]) <= set(summary["run"])  # manifest never ahead of the reports
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) <= 1  # at most the one being written when killed


# --- resume -------------------------------------------------------------------------------------


FINGERPRINT = SweepConfig(script=Path("model.py"), steps=4).fingerprint()


def test_no_manifest_means_nothing_finished(tmp_path):
    assert files.load_finished(tmp_path, FINGERPRINT) == {}


def test_load_finished_rebuilds_results_exactly(tmp_path):
    results = sample_results()
    write(tmp_path, results)
    files.write_manifest(tmp_path, FINGERPRINT, [r.run for r in results])
    first = read_bytes(tmp_path)
    loaded = files.load_finished(tmp_path, FINGERPRINT)
    assert list(loaded) == [r.run for r in results]
    for original in results:
        assert same_result(loaded[original.run], original), original.run
    assert loaded["clip_100_2"].error_traceback is None  # not kept in the CSV files
    # Rewriting from the rebuilt results gives the very same bytes.
    write(tmp_path, list(loaded.values()))
    assert read_bytes(tmp_path) == first


def test_resume_after_interruption_is_byte_identical(tmp_path):
    results = sample_results()
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    for i in range(1, len(results) + 1):  # an uninterrupted sweep rewrites after every run
        write(full, results[:i])
        files.write_manifest(full, FINGERPRINT, [r.run for r in results[:i]])
    for i in range(1, 3):  # an interrupted one stops after two runs ...
        write(part, results[:i])
        files.write_manifest(part, FINGERPRINT, [r.run for r in results[:i]])
    loaded = files.load_finished(part, FINGERPRINT)  # ... and resumes
    assert list(loaded) == [r.run for r in results[:2]]
    resumed = [loaded.get(r.run, r) for r in results]
    write(part, resumed)
    files.write_manifest(part, FINGERPRINT, [r.run for r in resumed])
    assert read_bytes(part) == read_bytes(full)
    assert (part / files.MANIFEST_FILE).read_bytes() == (full / files.MANIFEST_FILE).read_bytes()


finite_or_not = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def run_results(draw):
    out = []
    max_norms = draw(
        st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=0, max_size=3, unique_by=lambda x: f"{x:g}")
    )
    cells = [Cell(None, 2.0)] + [Cell(m, draw(st.sampled_from([1.0, 2.0, math.inf]))) for m in max_norms]
    seen = set()
    for cell in cells:
        if cell.run in seen:
            continue
        seen.add(cell.run)
        n = draw(st.integers(min_value=0, max_value=6))
        steps = [
            StepRecord(
                i + 1,
                draw(finite_or_not),
                draw(finite_or_not),
                draw(finite_or_not),
                lr=draw(finite_or_not),
                skipped=draw(st.booleans()),
                sites=tuple(
                    (f"site{j}", draw(finite_or_not), draw(finite_or_not)) for j in range(draw(st.integers(0, 2)))
                ),
            )
            for i in range(n)
        ]
        status = draw(st.sampled_from([STABLE, NON_FINITE, DIVERGED, ERROR]))
        text = st.one_of(
            st.none(),
            st.text(
                alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"),
                min_size=1,
                max_size=20,
            ),
        )
        out.append(
            RunResult(
                cell,
                status,
                steps,
                nan_step=draw(st.one_of(st.none(), st.integers(1, 10**6))),
                nan_source=draw(st.sampled_from([None, SOURCE_FORWARD, SOURCE_BACKWARD])),
                nan_param=draw(text),
                diverged_step=draw(st.one_of(st.none(), st.integers(1, 10**6))),
                seconds=draw(st.floats(min_value=0, max_value=1e4)),
                error=draw(text),
            )
        )
    if draw(st.booleans()):  # a monitored run: named by its producer, not by its cell
        out.append(RunResult(Cell(draw(st.sampled_from([None, 1.0]))), STABLE, [], name="monitor"))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_results())
def test_any_results_survive_write_load_rewrite(tmp_path, results):
    write(tmp_path, results)
    files.write_manifest(tmp_path, FINGERPRINT, [r.run for r in results])
    first = read_bytes(tmp_path)
    loaded = files.load_finished(tmp_path, FINGERPRINT)
    for r in results:
        assert same_result(loaded[r.run], r)
    write(tmp_path, list(loaded.values()))
    assert read_bytes(tmp_path) == first


def test_different_options_refuse_to_resume(tmp_path):
    write(tmp_path, sample_results())
    files.write_manifest(tmp_path, FINGERPRINT, ["unclipped"])
    now = SweepConfig(script=Path("model.py"), steps=50, max_norms=(1.0,)).fingerprint()
    with pytest.raises(UsageError) as err:
        files.load_finished(tmp_path, now)
    message, hint = err.value.message, err.value.hint
    assert err.value.exit_code == ExitCode.USAGE
    assert "--steps 4 (saved) vs 50 (now)" in message
    assert "--max-norm 0.1,1,10 (saved) vs 1 (now)" in message
    assert "--seed" not in message  # only what differs
    assert "same options" in hint and "--out" in hint and "--resume" in hint


def test_resume_rebuilds_lr_seed_and_amp_columns_exactly(tmp_path):
    config = SweepConfig(
        script=Path("model.py"),
        steps=3,
        lrs=(0.1, 1.0),
        seeds=(0, 7),
        max_norms=(1.0,),
        norm_types=(2.0,),
        amp="fp16",
        accumulate=2,
    )
    results = []
    for cell in config.cells():
        steps = [
            StepRecord(1, 2.0, math.inf, NAN, lr=config.lr_of(cell), skipped=True),
            StepRecord(2, 1.5, 0.5, 1.0, lr=config.lr_of(cell) / 2),
        ]
        results.append(RunResult(cell, STABLE, steps, lr=config.lr_of(cell), seed=config.seed_of(cell), seconds=0.5))
    results[-1] = RunResult(
        results[-1].cell,
        NON_FINITE,
        [StepRecord(1, NAN, lr=1.0)],
        nan_step=1,
        nan_source=SOURCE_FORWARD,
        nan_micro_batch=2,
        lr=1.0,
        seed=7,
    )
    write(tmp_path, results)
    files.write_manifest(tmp_path, config.fingerprint(), [r.run for r in results])
    first = read_bytes(tmp_path)
    summary = pd.read_csv(tmp_path / files.SUMMARY_FILE)
    assert list(summary["run"])[:2] == ["unclipped@lr=0.1,seed=0", "clip_1_2@lr=0.1,seed=0"]
    assert list(summary["seed"]) == [0, 0, 0, 0, 7, 7, 7, 7] and list(summary["skipped_steps"][:2]) == [1, 1]
    assert summary["first_skip"].tolist()[:-1] == [1] * 7 and summary["nan_micro_batch"].tolist()[-1] == 2
    loaded = files.load_finished(tmp_path, config.fingerprint())
    for r in results:
        got = loaded[r.run]
        assert got.cell == r.cell and (got.lr, got.seed, got.nan_micro_batch) == (r.lr, r.seed, r.nan_micro_batch)
        assert [(s.lr, s.skipped) for s in got.steps] == [(s.lr, s.skipped) for s in r.steps]
    write(tmp_path, list(loaded.values()))
    assert read_bytes(tmp_path) == first
    # a different lr, seed, amp or accumulation refuses to resume, naming the option
    for change, option in [
        ({"lrs": (0.1,)}, "--lr"),
        ({"seeds": (0,)}, "--seeds"),
        ({"amp": "bf16"}, "--amp"),
        ({"accumulate": 1}, "--accumulate"),
    ]:
        other = SweepConfig(**{**config.__dict__, **change})
        with pytest.raises(UsageError, match=option):
            files.load_finished(tmp_path, other.fingerprint())


def test_unreadable_manifest_or_missing_reports(tmp_path):
    (tmp_path / files.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UsageError, match="manifest is unreadable"):
        files.load_finished(tmp_path, FINGERPRINT)
    files.write_manifest(tmp_path, FINGERPRINT, ["unclipped"])
    with pytest.raises(UsageError, match="summary.csv is missing"):
        files.load_finished(tmp_path, FINGERPRINT)


def test_runs_missing_from_the_reports_simply_run_again(tmp_path):
    results = sample_results()
    write(tmp_path, results[:2])
    files.write_manifest(tmp_path, FINGERPRINT, [r.run for r in results[:3]])
    assert list(files.load_finished(tmp_path, FINGERPRINT)) == [r.run for r in results[:2]]


def test_manifest_is_strict_json(tmp_path):
    files.write_manifest(tmp_path, FINGERPRINT, ["unclipped", "clip_1_2"])
    manifest = json.loads((tmp_path / files.MANIFEST_FILE).read_text(), parse_constant=pytest.fail)
    assert manifest["finished_runs"] == ["unclipped", "clip_1_2"]
    assert manifest["fingerprint"]["norm_types"] == ["2", "inf"]


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine
    yield
    torch.set_num_threads(before)


def test_resume_with_real_runs_reproduces_the_uninterrupted_reports(tmp_path, one_thread):
    """A real (short) sweep: interrupted after 2 runs and resumed, the reports equal an
    uninterrupted sweep's, except the seconds column of the runs that ran again."""
    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.sweep import run_sweep

    config = SweepConfig(
        script=REPO / "sample_models" / "exploding_rnn.py", steps=8, max_norms=(0.1, 1.0), norm_types=(2.0,)
    )
    experiment = load_experiment(config.script)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir()
    part_dir.mkdir()
    full = run_sweep(config, experiment)
    write(full_dir, full)
    partial = full[:2]
    write(part_dir, partial)
    files.write_manifest(part_dir, config.fingerprint(), [r.run for r in partial])
    loaded = files.load_finished(part_dir, config.fingerprint())
    resumed = run_sweep(config, experiment, skip=loaded)
    write(part_dir, resumed)
    a, b = read_bytes(full_dir), read_bytes(part_dir)
    assert a[files.STEPS_FILE] == b[files.STEPS_FILE]
    assert a[files.HISTOGRAMS_FILE] == b[files.HISTOGRAMS_FILE]
    sa = pd.read_csv(full_dir / files.SUMMARY_FILE, dtype=str, keep_default_na=False).drop(columns="seconds")
    sb = pd.read_csv(part_dir / files.SUMMARY_FILE, dtype=str, keep_default_na=False).drop(columns="seconds")
    assert sa.equals(sb)


# --- JSON on stdout -----------------------------------------------------------------------------


def test_summary_json_is_strict_and_documented():
    results = sample_results()
    text = summary_json(results)
    rows = json.loads(text, parse_constant=pytest.fail)  # no NaN / Infinity tokens
    assert [list(row) for row in rows] == [SUMMARY_COLUMNS] * len(results)
    control, stable, diverged, forward_nan, errored = rows
    assert control["max_norm"] is None and control["norm_type"] == "2"
    assert control["nan_step"] == 2 and control["nan_param"] == "rnn.weight_hh_l0"
    assert diverged["norm_type"] == "inf"
    assert forward_nan["final_loss"] is None  # NaN -> null
    assert forward_nan["grad_norm_p50"] is None  # no value -> null
    assert stable["final_loss"] == 0.25 and stable["steps"] == 4
    assert errored["error"].startswith("ValueError")
    assert (
        json.loads(
            summary_json([RunResult(Cell(1.0), DIVERGED, [StepRecord(1, 1.0, 1.0, 1.0), StepRecord(2, math.inf)])])
        )[0]["final_loss"]
        == "inf"
    )
    assert summary_json([]) == "[]"
