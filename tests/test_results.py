"""The result schema: run names, summary statistics, histogram bins."""

import math
import sys

import numpy as np
import pandas as pd
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
    layers_frame,
    percentile,
    shared_log_bins,
    sites_frame,
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
    # the axes that vary follow an "@", lr first, separated by commas
    assert Cell(1.0, 2.0, lr=0.1, seed=1).run == "clip_1_2@lr=0.1,seed=1"
    assert Cell(None, lr=1e-5).run == "unclipped@lr=1e-05"
    assert Cell(0.5, math.inf, seed=0).run == "clip_0.5_inf@seed=0"


def test_summary_row_of_a_run_that_went_nan():
    steps = [
        StepRecord(1, 2.0, 4.0, 0.25),
        StepRecord(2, 1.0, 0.5, 1.0),
        StepRecord(3, 0.5, 2.0, 0.5),
        StepRecord(4, 0.75, math.inf),
    ]
    result = RunResult(
        Cell(1.0, 2.0),
        NON_FINITE,
        steps,
        nan_step=4,
        nan_source=SOURCE_BACKWARD,
        nan_param="fc.weight",
        seconds=1.23456,
    )
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
@given(
    st.lists(
        st.lists(st.one_of(st.floats(min_value=0, max_value=1e30), st.just(math.nan), st.just(math.inf)), max_size=30),
        min_size=1,
        max_size=4,
    )
)
def test_histograms_count_each_finite_norm_once_on_increasing_edges(norm_lists):
    results = [
        RunResult(Cell(None), STABLE, [StepRecord(i + 1, 1.0, n, 1.0) for i, n in enumerate(norms)])
        for norms in norm_lists
    ]
    edges = shared_log_bins(results)
    for r in results:
        finite_count = sum(math.isfinite(n) for n in r.finite_norms())
        assert sum(histogram_counts(r, edges)) == (finite_count if edges else 0)
    assert all(a < b for a, b in zip(edges, edges[1:]))


def test_frames_have_the_documented_columns():
    results = [RunResult(Cell(None), STABLE, [StepRecord(1, 1.0, 2.0, 1.0), StepRecord(2, 0.5, 1.0, 1.0)])]
    assert list(summary_frame(results).columns) == SUMMARY_COLUMNS
    assert list(steps_frame(results).columns) == [
        "run",
        "step",
        "loss",
        "grad_norm",
        "clip_coef",
        "clip_threshold",
        "clipped_unit_frac",
        "lr",
        "skipped",
        "seed",
    ]
    hist = histogram_frame(results, shared_log_bins(results))
    assert list(hist.columns) == ["run", "norm_type", "bin_left", "bin_right", "count"] and hist["count"].sum() == 2


# --- histogram bins, by hand ---------------------------------------------------------------------
# README: "Histogram bins are log-spaced, shared by all runs, [left, right) with the last bin
# closed; when some norm is exactly 0 the first bin starts at 0. A run's counts sum to its number
# of finite norms." Every expected edge and count below is worked out by hand.


def norms_run(*norms: float, max_norm: float | None = None) -> RunResult:
    return RunResult(Cell(max_norm), STABLE, [StepRecord(i + 1, 1.0, n, 1.0) for i, n in enumerate(norms)])


def test_log_bins_span_the_sweep_decade_by_decade():
    # norms from 1 to 1e8 over 8 bins: one decade per bin
    results = [norms_run(1.0, 50.0), norms_run(1e8, 3e3, max_norm=1.0)]
    edges = shared_log_bins(results)
    assert edges[0] == 1.0 and edges[-1] == 1e8  # the exact extremes, no rounding at the ends
    assert edges == pytest.approx([1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8], rel=1e-12)
    assert histogram_counts(results[0], edges) == [1, 1, 0, 0, 0, 0, 0, 0]
    assert histogram_counts(results[1], edges) == [0, 0, 0, 1, 0, 0, 0, 1]  # 1e8 in the closed last bin


def test_bins_are_left_closed_right_open_and_the_last_is_closed():
    # edges 1, 10, 100: a norm on the inner edge 10 belongs to the bin on its right
    result = norms_run(1.0, 9.999, 10.0, 99.99, 100.0)
    edges = shared_log_bins([result], n_bins=2)
    assert edges == pytest.approx([1.0, 10.0, 100.0], rel=1e-12)
    assert histogram_counts(result, [1.0, 10.0, 100.0]) == [2, 3]


def test_a_zero_norm_makes_the_first_edge_zero():
    # positive norms 1..100 on 2 bins give edges 1, 10, 100; the 0 moves the first edge to 0
    result = norms_run(0.0, 1.0, 5.0, 100.0)
    edges = shared_log_bins([result], n_bins=2)
    assert edges[0] == 0.0
    assert edges[1:] == pytest.approx([10.0, 100.0], rel=1e-12)
    assert histogram_counts(result, edges) == [3, 1]
    # the zero edge is shared: a run without any zero norm gets it too
    assert shared_log_bins([norms_run(3.0, 30.0), norms_run(0.0, 300.0)], n_bins=2)[0] == 0.0
    assert shared_log_bins([norms_run(3.0, 30.0), norms_run(0.5, 300.0)], n_bins=2)[0] == 0.5


def test_only_zero_norms_give_the_single_bin_zero_to_one():
    result = norms_run(0.0, 0.0, math.nan, math.inf)
    assert shared_log_bins([result]) == [0.0, 1.0]
    assert histogram_counts(result, [0.0, 1.0]) == [2]


def test_one_distinct_value_is_centred_in_a_decade():
    result = norms_run(4.0, 4.0, 4.0)
    edges = shared_log_bins([result], n_bins=4)
    # 4 * 10**(i/4 - 1/2) for i = 0..4
    assert edges == pytest.approx([4 / math.sqrt(10), 4 * 10**-0.25, 4.0, 4 * 10**0.25, 4 * math.sqrt(10)], rel=1e-12)
    assert histogram_counts(result, edges) == [0, 0, 3, 0]


def test_non_finite_norms_are_not_counted_and_do_not_move_the_edges():
    result = norms_run(1.0, math.nan, 100.0, math.inf, -math.inf)
    assert shared_log_bins([result], n_bins=2) == pytest.approx([1.0, 10.0, 100.0], rel=1e-12)
    assert histogram_counts(result, shared_log_bins([result], n_bins=2)) == [1, 1]
    assert shared_log_bins([norms_run(math.nan, math.inf)]) == []
    assert histogram_counts(norms_run(1.0), []) == []
    assert histogram_counts(norms_run(1.0), [1.0]) == []


def test_values_outside_the_edges_go_to_the_end_bins():
    # Edges given from elsewhere (another sweep's): out-of-range norms still count, in the
    # nearest end bin, so a run's counts always sum to its finite norms.
    result = norms_run(0.001, 0.5, 1.0, 5.0, 10.0, 10.5, 1e9)
    assert histogram_counts(result, [1.0, 5.0, 10.0]) == [3, 4]


def test_default_is_eight_bins():
    assert len(shared_log_bins([norms_run(1.0, 2.0, 3.0)])) == 9
    assert len(shared_log_bins([norms_run(7.0)])) == 9


def test_extreme_single_norms_give_strictly_increasing_finite_edges():
    # near the largest float the centred decade would overflow: the top decade of the floats
    huge = norms_run(1.7e308)
    edges = shared_log_bins([huge])
    assert edges[-1] == sys.float_info.max and edges[0] == pytest.approx(sys.float_info.max / 10, rel=1e-12)
    assert all(a < b for a, b in zip(edges, edges[1:]))
    assert histogram_counts(huge, edges) == [0, 0, 0, 0, 0, 0, 0, 1]  # 1.7e308 > 1.348e308, the last inner edge
    # just below the overflow point (5.5e307 * sqrt(10) = 1.739e308 < 1.798e308) it is still centred
    near = norms_run(5.5e307)
    edges = shared_log_bins([near], n_bins=2)
    assert edges == pytest.approx([5.5e307 / math.sqrt(10), 5.5e307, 5.5e307 * math.sqrt(10)], rel=1e-12)
    assert histogram_counts(near, edges) == [0, 1]
    # the smallest subnormal: the decade rounds onto a handful of floats; each edge is one step up
    tiny = norms_run(5e-324)
    edges = shared_log_bins([tiny])
    assert edges == [0.0] + [k * 5e-324 for k in range(1, 9)]
    assert histogram_counts(tiny, edges) == [0, 1, 0, 0, 0, 0, 0, 0]
    two = norms_run(5e-324, 1e-323)
    assert shared_log_bins([two], n_bins=2) == [5e-324, 1e-323, 1.5e-323]


def test_histogram_frame_rows_by_hand():
    # positive norms 1..100 on 2 bins: edges 1, 10, 100, the first moved to 0 by the zero norm
    results = [norms_run(0.0, 20.0), norms_run(1.0, 100.0, 50.0, max_norm=1.0)]
    edges = shared_log_bins(results, n_bins=2)
    frame = histogram_frame(results, edges)
    assert frame.to_dict("records") == [
        {"run": "unclipped", "norm_type": "2", "bin_left": 0.0, "bin_right": edges[1], "count": 1},
        {"run": "unclipped", "norm_type": "2", "bin_left": edges[1], "bin_right": 100.0, "count": 1},
        {"run": "clip_1_2", "norm_type": "2", "bin_left": 0.0, "bin_right": edges[1], "count": 1},
        {"run": "clip_1_2", "norm_type": "2", "bin_left": edges[1], "bin_right": 100.0, "count": 2},
    ]
    assert edges[1] == pytest.approx(10.0, rel=1e-12)


def test_frames_hold_the_exact_records():
    control = RunResult(
        Cell(None),
        STABLE,
        [StepRecord(1, 2.0, 4.0, 1.0, lr=0.5), StepRecord(2, 1.0, 3.0, 1.0, lr=0.25)],
        seconds=0.5,
        seed=7,
    )
    clipped = RunResult(
        Cell(0.5, math.inf),
        NON_FINITE,
        [StepRecord(1, 2.0, 4.0, 0.125, lr=0.5), StepRecord(2, math.nan)],
        nan_step=2,
        nan_source="forward",
    )
    steps = steps_frame([control, clipped]).to_dict("records")
    assert list(steps_frame([control]).columns) == [
        "run",
        "step",
        "loss",
        "grad_norm",
        "clip_coef",
        "clip_threshold",
        "clipped_unit_frac",
        "lr",
        "skipped",
        "seed",
    ]
    assert all(math.isnan(row.pop("clip_threshold")) and math.isnan(row.pop("clipped_unit_frac")) for row in steps)
    assert steps[:2] == [
        {
            "run": "unclipped",
            "step": 1,
            "loss": 2.0,
            "grad_norm": 4.0,
            "clip_coef": 1.0,
            "lr": 0.5,
            "skipped": 0,
            "seed": 7,
        },
        {
            "run": "unclipped",
            "step": 2,
            "loss": 1.0,
            "grad_norm": 3.0,
            "clip_coef": 1.0,
            "lr": 0.25,
            "skipped": 0,
            "seed": 7,
        },
    ]
    assert {k: steps[2][k] for k in ("run", "step", "loss", "grad_norm", "clip_coef", "lr", "skipped")} == {
        "run": "clip_0.5_inf",
        "step": 1,
        "loss": 2.0,
        "grad_norm": 4.0,
        "clip_coef": 0.125,
        "lr": 0.5,
        "skipped": 0,
    }
    assert steps[3]["run"] == "clip_0.5_inf" and steps[3]["step"] == 2
    assert all(math.isnan(steps[3][k]) for k in ("loss", "grad_norm", "clip_coef", "lr"))
    assert clipped.step_rows()[0]["clip_coef"] == 0.125 and clipped.step_rows()[0]["seed"] is None
    summary = summary_frame([control, clipped])
    assert list(summary["run"]) == ["unclipped", "clip_0.5_inf"]
    row = summary.loc[0].to_dict()
    expected = {
        "run": "unclipped",
        "max_norm": None,
        "norm_type": "2",
        "clip_mode": "none",
        "clip_param": None,
        "lr": None,
        "seed": 7,
        "status": "stable",
        "nan_step": None,
        "nan_source": None,
        "nan_param": None,
        "nan_micro_batch": None,
        "diverged_step": None,
        "skipped_steps": 0,
        "first_skip": None,
        "divergence_checked": None,
        "spike_step": None,
        "spike_param": None,
        "final_loss": 1.0,
        "min_loss": 1.0,
        # losses 2 and 1: mean 1.5, sample standard deviation sqrt(0.5)
        "smoothed_loss": 1.5,
        "smoothed_loss_sd": pytest.approx(math.sqrt(0.5)),
        "eval_metric": None,
        "eval_higher_is_better": None,
        "grad_norm_p50": 3.5,
        "grad_norm_p95": pytest.approx(3.95),
        "grad_norm_max": 4.0,
        "clipped_frac": 0.0,
        "refined": False,
        "shared_steps": 0,
        "steps": 2,
        "seconds": 0.5,
        "error": None,
        "warnings": None,
    }
    assert list(row) == list(expected)
    for key, value in expected.items():
        assert pd.isna(row[key]) if value is None else row[key] == value, key
    assert summary.loc[1, "norm_type"] == "inf" and summary.loc[1, "clipped_frac"] == 1.0
    assert summary.loc[1, "nan_step"] == 2 and summary.loc[1, "nan_source"] == "forward"


def test_empty_frames_keep_their_columns():
    assert list(summary_frame([]).columns) == SUMMARY_COLUMNS
    assert list(steps_frame([]).columns) == [
        "run",
        "step",
        "loss",
        "grad_norm",
        "clip_coef",
        "clip_threshold",
        "clipped_unit_frac",
        "lr",
        "skipped",
        "seed",
    ]
    assert list(histogram_frame([], []).columns) == ["run", "norm_type", "bin_left", "bin_right", "count"]
    assert histogram_frame([], []).empty


def test_clipped_frac_counts_coefficients_below_one():
    steps = [
        StepRecord(1, 1.0, 5.0, 0.2),
        StepRecord(2, 1.0, 1.0, 1.0),
        StepRecord(3, 1.0, 2.0, 0.5),
        StepRecord(4, 1.0, 0.5, 1.0),
    ]
    assert RunResult(Cell(1.0), STABLE, steps).summary_row()["clipped_frac"] == 0.5


def test_layer_rows_and_frame_by_hand():
    steps = [
        StepRecord(1, 1.0, 5.0, 1.0, layers=(("fc", 3.0), ("head", 4.0))),
        StepRecord(2, 0.5, 1.0, 1.0),
        StepRecord(3, 0.25, 2.0, 1.0, layers=(("fc", 2.0),)),
    ]
    result = RunResult(Cell(1.0), STABLE, steps)
    expected = [
        {"run": "clip_1_2", "step": 1, "param": "fc", "grad_norm": 3.0},
        {"run": "clip_1_2", "step": 1, "param": "head", "grad_norm": 4.0},
        {"run": "clip_1_2", "step": 3, "param": "fc", "grad_norm": 2.0},
    ]
    assert result.layer_rows() == expected
    control = RunResult(Cell(None), STABLE, [StepRecord(1, 1.0, 1.0, 1.0, layers=(("fc", 1.0),))])
    frame = layers_frame([control, result])
    assert list(frame.columns) == ["run", "step", "param", "grad_norm"]
    assert frame.to_dict("records") == [{"run": "unclipped", "step": 1, "param": "fc", "grad_norm": 1.0}] + expected
    assert list(layers_frame([]).columns) == ["run", "step", "param", "grad_norm"]


def test_site_rows_and_frame_by_hand():
    steps = [
        StepRecord(1, 1.0, 5.0, 1.0, sites=(("encoder", 3.0, 1.0), ("decoder", 4.0, 0.25))),
        StepRecord(2, 0.5, 1.0, 1.0),
    ]
    result = RunResult(Cell(None), STABLE, steps, name="monitor")
    assert result.run == "monitor" and result.summary_row()["run"] == "monitor"
    expected = [
        {"run": "monitor", "step": 1, "site": "encoder", "grad_norm": 3.0, "clip_coef": 1.0},
        {"run": "monitor", "step": 1, "site": "decoder", "grad_norm": 4.0, "clip_coef": 0.25},
    ]
    assert result.site_rows() == expected
    assert sites_frame([result]).to_dict("records") == expected
    assert list(sites_frame([]).columns) == ["run", "step", "site", "grad_norm", "clip_coef"]
    assert RunResult(Cell(1.0), STABLE, steps).run == "clip_1_2"  # without a name: the cell's
