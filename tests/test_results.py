"""The result schema: run names, summary statistics, histogram bins."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli.results import (
    NON_FINITE,
    SOURCE_BACKWARD,
    STABLE,
    SUMMARY_COLUMNS,
    Cell,
    RunResult,
    StepRecord,
    histogram_counts,
    histogram_frame,
    percentile,
    shared_log_bins,
    steps_frame,
    summary_frame,
)

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.sampled_from([0, 5, 50, 95, 100]))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(sorted(values), q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-9)


def test_run_names():
    assert Cell(None).run == "unclipped"
    assert Cell(0.1, 2.0).run == "clip_0.1_2"
    assert Cell(10.0, math.inf).run == "clip_10_inf"
    assert Cell(1.0, 0.5).run == "clip_1_0.5"


def test_summary_row_of_a_run_that_went_nan():
    steps = [StepRecord(1, 2.0, 4.0, 0.25), StepRecord(2, 1.0, 0.5, 1.0), StepRecord(3, 0.5, 2.0, 0.5),
             StepRecord(4, 0.75, math.inf)]
    result = RunResult(Cell(1.0, 2.0), NON_FINITE, steps, nan_step=4, nan_source=SOURCE_BACKWARD,
                       nan_param="fc.weight", seconds=1.23456)
    row = result.summary_row()
    assert list(row) == SUMMARY_COLUMNS
    assert row["final_loss"] == 0.75 and row["min_loss"] == 0.5
    assert row["grad_norm_p50"] == 2.0 and row["grad_norm_max"] == 4.0
    assert row["grad_norm_p95"] == pytest.approx(np.percentile([4.0, 0.5, 2.0], 95))
    assert row["clipped_frac"] == pytest.approx(2 / 3)  # the onset step applied nothing
    assert row["steps"] == 4 and row["seconds"] == 1.2346
    assert row["norm_type"] == "2" and row["nan_param"] == "fc.weight"


def test_summary_of_an_empty_run_is_blank_not_zero():
    row = RunResult(Cell(None), "error", [], error="ValueError: x").summary_row()
    assert row["final_loss"] is None and row["grad_norm_p50"] is None and row["clipped_frac"] is None
    assert row["max_norm"] is None and row["error"] == "ValueError: x"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.one_of(st.floats(min_value=0, max_value=1e30), st.just(math.nan), st.just(math.inf)),
                         max_size=30), min_size=1, max_size=4))
def test_histograms_count_each_finite_norm_once_on_increasing_edges(norm_lists):
    results = [RunResult(Cell(None), STABLE, [StepRecord(i + 1, 1.0, n, 1.0) for i, n in enumerate(norms)])
               for norms in norm_lists]
    edges = shared_log_bins(results)
    for r in results:
        finite_count = sum(math.isfinite(n) for n in r.finite_norms())
        assert sum(histogram_counts(r, edges)) == (finite_count if edges else 0)
    assert all(a < b for a, b in zip(edges, edges[1:]))


def test_frames_have_the_documented_columns():
    results = [RunResult(Cell(None), STABLE, [StepRecord(1, 1.0, 2.0, 1.0), StepRecord(2, 0.5, 1.0, 1.0)])]
    assert list(summary_frame(results).columns) == SUMMARY_COLUMNS
    assert list(steps_frame(results).columns) == ["run", "step", "loss", "grad_norm", "clip_coef", "lr", "skipped", "seed"]
    hist = histogram_frame(results, shared_log_bins(results))
    assert list(hist.columns) == ["run", "norm_type", "bin_left", "bin_right", "count"] and hist["count"].sum() == 2
