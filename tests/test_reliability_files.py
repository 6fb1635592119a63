"""Results are never mixed up, overwritten or lost: the incremental report writer, the resume
files' validation, the ``--out`` lock and temp-file cleanup, exact run names."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcheck_cli import config as cfg
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import ExitCode, ReportWriteError, UsageError
from gradcheck_cli.report import files
from gradcheck_cli.results import (
    ERROR,
    NON_FINITE,
    SOURCE_BACKWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
    format_float,
    shared_log_bins,
)

REPO = Path(__file__).resolve().parent.parent
REPORTS = (files.SUMMARY_FILE, files.STEPS_FILE, files.LAYERS_FILE, files.HISTOGRAMS_FILE, files.SITES_FILE)
FINGERPRINT = {"sweep": "test"}


def run(max_norm, n_steps: int, offset: float = 0.0, status: str = STABLE, **kw) -> RunResult:
    steps = [
        StepRecord(
            s,
            1.0 / s + offset,
            0.5 * s + offset,
            1.0 if max_norm is None else 0.25,
            layers=(("a", 0.1 * s), ("b", 0.2 * s)),
        )
        for s in range(1, n_steps + 1)
    ]
    return RunResult(Cell(max_norm, 2.0), status, steps, seconds=0.01, **kw)


def sweep_results() -> list[RunResult]:
    return [
        run(None, 3),
        run(0.1, 4, 1.0),
        run(1.0, 2, 2.0, NON_FINITE, nan_step=2, nan_source=SOURCE_BACKWARD, nan_param="a"),
        run(10.0, 1, 3.0, ERROR, error='ValueError: "x",\ny'),
        run(100.0, 5, 4.0, warnings=("constant_loss", "step1_loss_differs:unclipped")),
        RunResult(Cell(1000.0, 2.0), STABLE, [StepRecord(1, 1.0, 2.0, 0.5, sites=(("g", 2.0, 0.5), ("d", 1.5, 1.0)))]),
        run(2000.0, 2, 5.0),
    ]


def whole(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in REPORTS if (out / name).exists()}


# --- the incremental writer ------------------------------------------------------------------


def test_writer_files_equal_a_whole_rewrite(tmp_path):
    results = sweep_results()
    inc, ref = tmp_path / "inc", tmp_path / "ref"
    inc.mkdir(), ref.mkdir()
    writer = files.ReportWriter(inc, FINGERPRINT, [r.run for r in results])
    for i, r in enumerate(results, start=1):
        writer.add(r)
        files.write_reports(ref, results[:i], shared_log_bins(results[:i]))
        assert whole(inc) == whole(ref), f"after run {i}"
    manifest = json.loads((inc / files.MANIFEST_FILE).read_text())
    assert manifest["finished_runs"] == [r.run for r in results]
    assert manifest["committed"] == {n: (inc / n).stat().st_size for n in files.APPENDED_FILES if (inc / n).exists()}
    assert files.SITES_FILE in manifest["committed"]  # created when the first run with clip sites finished


def test_writer_appends_instead_of_rewriting_the_per_step_files(tmp_path, monkeypatch):
    """After the first run the per-step files are only appended to: the bytes written per run
    are that run's rows, however many runs came before."""
    results = [run(float(i), 3, float(i)) for i in range(1, 40)]
    writer = files.ReportWriter(tmp_path, FINGERPRINT, [r.run for r in results])
    replaced: list[str] = []
    appended: list[tuple[str, int]] = []
    real_atomic, real_append = files.atomic_write_bytes, files.append_bytes
    monkeypatch.setattr(files, "atomic_write_bytes", lambda p, d: (replaced.append(Path(p).name), real_atomic(p, d))[1])

    def spy_append(p, d, committed):
        appended.append((Path(p).name, len(d)))
        return real_append(p, d, committed)

    monkeypatch.setattr(files, "append_bytes", spy_append)
    writer.add(results[0])
    assert files.STEPS_FILE in replaced  # the first write of a sweep replaces the file
    replaced.clear()
    for r in results[1:]:
        writer.add(r)
    assert files.STEPS_FILE not in replaced and files.LAYERS_FILE not in replaced
    step_sizes = [n for name, n in appended if name == files.STEPS_FILE]
    assert len(step_sizes) == len(results) - 1
    assert max(step_sizes) < 2 * min(step_sizes)  # per run, not growing with the runs before it


def test_a_torn_tail_is_ignored_on_resume_and_cut_by_the_next_append(tmp_path):
    results = sweep_results()
    writer = files.ReportWriter(tmp_path, FINGERPRINT, [r.run for r in results])
    for r in results[:3]:
        writer.add(r)
    committed = (tmp_path / files.STEPS_FILE).read_bytes()
    with open(tmp_path / files.STEPS_FILE, "ab") as f:  # a run cut off by kill -9 before its manifest
        f.write(b"clip_10_2,1,3.5,1.0,0.25\nclip_10_2,2,3.")
    loaded = files.load_finished(tmp_path, FINGERPRINT)
    assert [len(r.steps) for r in loaded.values()] == [3, 4, 2]
    resumed = files.ReportWriter(tmp_path, FINGERPRINT, [r.run for r in results], loaded.values())
    for r in results[3:]:
        resumed.add(r)
    ref = tmp_path / "ref"
    ref.mkdir()
    files.write_reports(ref, results, shared_log_bins(results))
    assert whole(tmp_path) == whole(ref)
    assert (tmp_path / files.STEPS_FILE).read_bytes().startswith(committed)


@st.composite
def run_lists(draw):
    floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
    out = []
    for i, n in enumerate(draw(st.lists(st.integers(0, 4), min_size=1, max_size=5))):
        steps = [
            StepRecord(s, draw(floats), draw(floats), draw(floats), layers=(("w", draw(floats)),))
            for s in range(1, n + 1)
        ]
        out.append(
            RunResult(
                Cell(None if i == 0 else float(i), 2.0),
                draw(st.sampled_from([STABLE, NON_FINITE, ERROR])),
                steps,
                error=draw(st.one_of(st.none(), st.text(max_size=8))),
            )
        )
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(results=run_lists())
def test_any_results_appended_run_by_run_equal_the_whole_files(tmp_path_factory, results):
    inc, ref = tmp_path_factory.mktemp("inc"), tmp_path_factory.mktemp("ref")
    writer = files.ReportWriter(inc, FINGERPRINT, [r.run for r in results])
    for r in results:
        writer.add(r)
    files.write_reports(ref, results, shared_log_bins(results))
    assert whole(inc) == whole(ref)


def test_a_failing_write_names_the_file_and_the_os_error(tmp_path, monkeypatch):
    writer = files.ReportWriter(tmp_path, FINGERPRINT, ["unclipped", "clip_0.1_2"])
    writer.add(run(None, 2))

    def full(path, data, committed):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "append_bytes", full)
    with pytest.raises(ReportWriteError) as err:
        writer.add(run(0.1, 2))
    assert err.value.exit_code == ExitCode.REPORTS_NOT_WRITTEN == 5
    assert err.value.message == f"cannot write {tmp_path / files.STEPS_FILE}: No space left on device"
    assert "--resume" in err.value.hint
    # the manifest still describes the files as they were
    assert json.loads((tmp_path / files.MANIFEST_FILE).read_text())["finished_runs"] == ["unclipped"]


_WRITER_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gradcheck_cli.report import files
    from gradcheck_cli.results import Cell, RunResult, StepRecord
    out = Path(sys.argv[1])
    order = [f"clip_{i}_2" for i in range(1, 100000)]
    writer = files.ReportWriter(out, {"k": 1}, order)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        steps = [StepRecord(s, 1.0 / s + i, float(s * i), 0.5, layers=(("w", float(s)),)) for s in range(1, 300)]
        writer.add(RunResult(Cell(float(i), 2.0), "stable", steps))
    """
)


def test_kill_9_during_appends_leaves_parseable_files_that_resume(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for delay in (0.3, 0.8):
        out = tmp_path / f"k{delay}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER_LOOP, str(out)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        for name in REPORTS:
            if (out / name).exists():
                frame = pd.read_csv(out / name)
                assert not frame.isna().all(axis=1).any()
        if (out / files.MANIFEST_FILE).exists():
            loaded = files.load_finished(out, {"k": 1})
            manifest = json.loads((out / files.MANIFEST_FILE).read_text())
            assert list(loaded) == manifest["finished_runs"]
            assert all(len(r.steps) == 299 for r in loaded.values())


# --- corrupted or hand-edited resume files ----------------------------------------------------


def _finished_dir(tmp_path: Path) -> Path:
    results = sweep_results()[:3]
    writer = files.ReportWriter(tmp_path, FINGERPRINT, [r.run for r in results])
    for r in results:
        writer.add(r)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


CORRUPTIONS = {
    "unparsable number in steps.csv": (
        files.STEPS_FILE,
        lambda p: _edit(p, "unclipped,2,0.5,", "unclipped,2,half,"),
        "line 3: loss 'half' is not a valid number",
    ),
    "unparsable step": (
        files.STEPS_FILE,
        lambda p: _edit(p, "unclipped,2,", "unclipped,two,"),
        "step 'two' is not a valid number",
    ),
    "missing column": (files.SUMMARY_FILE, lambda p: _edit(p, "run,max_norm,", "name,max_norm,"), "missing column run"),
    "unknown status": (files.SUMMARY_FILE, lambda p: _edit(p, ",stable,", ",fine,"), "unknown status 'fine'"),
    "max_norm edited": (
        files.SUMMARY_FILE,
        lambda p: _edit(p, "clip_0.1_2,0.1,", "clip_0.1_2,0.2,"),
        "which name run 'clip_0.2_2'",
    ),
    "manifest not an object": (files.MANIFEST_FILE, lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "finished_runs not a list": (
        files.MANIFEST_FILE,
        lambda p: _edit(p, '"finished_runs": [', '"finished_runs": "x", "y": ['),
        "'finished_runs'",
    ),
    "committed garbage": (
        files.MANIFEST_FILE,
        lambda p: _edit(p, '"committed": {', '"committed": {"x": -1, '),
        "'committed'",
    ),
    "file shorter than committed": (files.STEPS_FILE, lambda p: p.write_bytes(p.read_bytes()[:40]), "manifest records"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_resume_files_exit_2_naming_the_file(tmp_path, case):
    name, corrupt, needle = CORRUPTIONS[case]
    out = _finished_dir(tmp_path)
    corrupt(out / name)
    with pytest.raises(UsageError) as err:
        files.load_finished(out, FINGERPRINT)
    assert err.value.exit_code == ExitCode.USAGE
    assert err.value.message.startswith(f"cannot resume: {out / name}: "), err.value.message
    assert needle in err.value.message
    assert "without --resume" in err.value.hint or "drop --resume" in err.value.hint


def test_changed_script_refuses_to_resume_naming_the_file(tmp_path):
    script = tmp_path / "model.py"
    script.write_text("x = 1\n")
    saved = SweepConfig(script=script).fingerprint()
    files.write_manifest(tmp_path, saved, [])
    script.write_text("x = 2\n")
    with pytest.raises(UsageError) as err:
        files.load_finished(tmp_path, SweepConfig(script=script).fingerprint())
    assert f"the script {script} has changed since the interrupted sweep" in err.value.message


def test_other_thread_count_refuses_to_resume_naming_both(tmp_path):
    files.write_manifest(tmp_path, {"torch_threads": 2, "torch_version": "2.13.0"}, [])
    with pytest.raises(UsageError) as err:
        files.load_finished(tmp_path, {"torch_threads": 1, "torch_version": "2.13.0"})
    assert "torch thread count 2 (saved) vs 1 (now)" in err.value.message
    assert "OMP_NUM_THREADS" in err.value.hint


# --- the lock and temp files -----------------------------------------------------------------


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_held_by_a_live_process_is_refused_with_its_pid(tmp_path, live_pid):
    (tmp_path / files.LOCK_FILE).write_text(f"{live_pid}\n")
    with pytest.raises(UsageError) as err:
        files.OutDirLock(tmp_path).acquire()
    assert f"pid {live_pid}" in err.value.message
    assert (tmp_path / files.LOCK_FILE).read_text() == f"{live_pid}\n"


def test_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    (tmp_path / files.LOCK_FILE).write_text(f"{dead_pid()}\n")
    with files.OutDirLock(tmp_path):
        assert (tmp_path / files.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / files.LOCK_FILE).exists()


def test_temp_cleanup_removes_only_files_of_processes_that_are_gone(tmp_path, live_pid):
    gone = tmp_path / f".steps.csv.{dead_pid()}.0a1b2c3d.tmp"
    alive = tmp_path / f".steps.csv.{live_pid}.0a1b2c3d.tmp"
    gone.write_text("x"), alive.write_text("x")
    files.prepare_out_dir(tmp_path)
    assert not gone.exists() and alive.exists()


# --- run names --------------------------------------------------------------------------------


@given(
    st.lists(st.floats(min_value=1e-300, max_value=1e300), min_size=1, max_size=6),
    st.lists(st.one_of(st.floats(min_value=-1e6, max_value=1e6), st.just(math.inf)), min_size=1, max_size=3),
)
def test_distinct_cells_get_distinct_names_that_round_trip(max_norms, norm_types):
    cells = {Cell(m, p) for m in max_norms for p in norm_types}
    names = {c.run for c in cells}
    assert len(names) == len(cells)
    for c in cells:
        assert float(format_float(c.max_norm)) == c.max_norm
        assert float(format_float(c.norm_type)) == c.norm_type


def test_neighbouring_values_are_two_runs_and_exact_duplicates_one_with_a_note():
    assert [c.run for c in SweepConfig(script=Path("s.py"), max_norms=(1.0, 1.0000001)).cells()][1::2] == [
        "clip_1_2",
        "clip_1.0000001_2",
    ]
    assert Cell(1.0, 2.0000001).run == "clip_1_2.0000001"
    notes: list[str] = []
    assert cfg.parse_max_norms("1,1.0,1e0", notes=notes) == (1.0,)
    assert notes == [
        "--max-norm 1.0 equals 1, already in the grid: one run for both",
        "--max-norm 1e0 equals 1, already in the grid: one run for both",
    ]
    assert cfg.parse_norm_types("2,2.0000001,inf,Inf", notes=notes) == (2.0, 2.0000001, math.inf)
    assert notes[-1] == "--norm-type Inf equals inf, already in the grid: one run for both"


def test_exact_duplicates_in_the_rule_grids_are_one_run_each_with_a_note():
    notes: list[str] = []
    config = SweepConfig.from_values(
        {
            "script": str(REPO / "sample_models" / "exploding_rnn.py"),
            "clip_values": "0.5,0.50",
            "agc_clip_factors": "0.01,1e-2",
            "autoclip_percentiles": "10,10.0",
            "zclip_z_thresholds": "2.5,2.5",
        },
        notes=notes,
    )
    assert [c.run for c in config.cells()] == ["unclipped", "value_0.5", "agc_0.01", "autoclip_p10", "zclip_z2.5"]
    assert notes == [
        "--clip-value 0.50 equals 0.5, already in the grid: one run for both",
        "--agc 1e-2 equals 0.01, already in the grid: one run for both",
        "--autoclip 10.0 equals 10, already in the grid: one run for both",
        "--zclip 2.5 equals 2.5, already in the grid: one run for both",
    ]
