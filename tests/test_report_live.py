"""``report.live.LiveRunWriter``: the files of a run that keeps growing (a monitored training)
are appended to, never rewritten, and end byte-identical to writing the whole run at once."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from gradcheck_cli.report import files
from gradcheck_cli.report.live import LiveRunWriter
from gradcheck_cli.results import NON_FINITE, STABLE, Cell, RunResult, StepRecord, shared_log_bins


def step(i: int, *, bad: bool = False, sites: bool = False) -> StepRecord:
    norm = math.inf if bad else 0.5 + (i % 7) * 0.75
    return StepRecord(
        i,
        loss=1.0 / i,
        grad_norm=norm,
        clip_coef=min(1.0, 1.0 / norm),
        layers=(("encoder", norm * 0.6), ("head", norm * 0.8)),
        lr=0.1,
        sites=((f"site{i % 2}", norm, 1.0),) if sites else (),
    )


def run(n: int, *, status: str = STABLE, sites_from: int | None = None) -> RunResult:
    steps = [step(i, sites=sites_from is not None and i >= sites_from) for i in range(1, n + 1)]
    return RunResult(Cell(1.0, 2.0), status, steps, name="monitor")


def whole(tmp_path, result: RunResult) -> dict[str, bytes]:
    """The files ``write_reports`` gives for the whole run at once (the reference)."""
    out = tmp_path / "whole"
    out.mkdir(exist_ok=True)
    files.write_reports(out, [result], shared_log_bins([result]))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def written(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_growing_run_ends_byte_identical_to_one_whole_write(tmp_path):
    out = tmp_path / "live"
    out.mkdir()
    writer = LiveRunWriter(out)
    for n in (3, 7, 7, 20, 21):
        writer.write(run(n))
    writer.write(run(25), refresh_histograms=True)
    assert written(out) == whole(tmp_path, run(25))


def test_later_writes_append_only_the_new_rows(tmp_path, monkeypatch):
    out = tmp_path / "live"
    out.mkdir()
    writer = LiveRunWriter(out)
    writer.write(run(10))
    appended: list[tuple[str, int]] = []
    original = files.append_bytes

    def spy(path, data, committed):
        appended.append((path.name, data.count(b"\n")))
        return original(path, data, committed)

    def no_whole(path, frame):  # pragma: no cover - fails the test if reached
        raise AssertionError(f"{path.name} rewritten whole")

    monkeypatch.setattr(files, "append_bytes", spy)
    monkeypatch.setattr(files, "_write_whole", no_whole)
    writer.write(run(14))
    # 4 new steps: 4 rows of steps.csv, 8 of layers.csv (two layers each)
    assert appended == [(files.STEPS_FILE, 4), (files.LAYERS_FILE, 8)]
    steps = pd.read_csv(out / files.STEPS_FILE)
    assert steps["step"].tolist() == list(range(1, 15))


def test_a_file_whose_rows_start_late_is_created_then_appended(tmp_path):
    out = tmp_path / "live"
    out.mkdir()
    writer = LiveRunWriter(out)
    writer.write(run(4, sites_from=6))
    assert not (out / files.SITES_FILE).exists()
    writer.write(run(8, sites_from=6))
    writer.write(run(12, sites_from=6), refresh_histograms=True)
    assert written(out) == whole(tmp_path, run(12, sites_from=6))


def test_a_failed_append_is_retried_without_duplicate_rows(tmp_path, monkeypatch):
    out = tmp_path / "live"
    out.mkdir()
    writer = LiveRunWriter(out)
    writer.write(run(5))
    original = files.append_bytes
    failed = []

    def fail_layers_once(path, data, committed):
        if path.name == files.LAYERS_FILE and not failed:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return original(path, data, committed)

    monkeypatch.setattr(files, "append_bytes", fail_layers_once)
    with pytest.raises(OSError):
        writer.write(run(9))  # steps.csv got its rows, layers.csv did not
    writer.write(run(12), refresh_histograms=True)
    assert written(out) == whole(tmp_path, run(12))


def histogram_total(out) -> int:
    return int(pd.read_csv(out / files.HISTOGRAMS_FILE)["count"].sum())


def test_histograms_refresh_when_the_run_doubles_or_when_asked(tmp_path):
    out = tmp_path / "live"
    out.mkdir()
    writer = LiveRunWriter(out)
    writer.write(run(10))
    assert histogram_total(out) == 10  # the first write
    writer.write(run(19))
    assert histogram_total(out) == 10  # not yet doubled
    writer.write(run(20))
    assert histogram_total(out) == 20
    writer.write(run(23), refresh_histograms=True)
    assert histogram_total(out) == 23
    # the summary is always current
    result = run(24)
    result.status, result.nan_step = NON_FINITE, 24
    writer.write(result)
    summary = pd.read_csv(out / files.SUMMARY_FILE)
    assert summary["status"].tolist() == [NON_FINITE] and summary["nan_step"].tolist() == [24]
