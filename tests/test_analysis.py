"""The rules of analysis.py on constructed results: spike origin, smoothing and noise, ranking,
the boundary and its bisection, and the recommendation (NaN and all-unstable cases included)."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli.analysis import (
    MIN_HISTORY,
    Smoothed,
    boundaries,
    differ_meaningfully,
    find_spike,
    next_refine_max_norm,
    rank,
    refine_bracket,
    smoothed_loss,
)
from gradcheck_cli.recommend import recommend
from gradcheck_cli.results import DIVERGED, ERROR, NON_FINITE, SOURCE_BACKWARD, STABLE, Cell, RunResult, StepRecord
from gradcheck_cli.stats import SMOOTH_STEPS

NAN, INF = math.nan, math.inf


def layered(series: dict[str, list[float]], status=STABLE, max_norm=None, **kw) -> RunResult:
    """A run whose per-layer norms are ``series`` (one list per layer, one value per step)."""
    n = len(next(iter(series.values())))
    steps = [
        StepRecord(i + 1, 1.0, 1.0, 1.0, layers=tuple((name, values[i]) for name, values in series.items()))
        for i in range(n)
    ]
    return RunResult(Cell(max_norm), status, steps, **kw)


def run(max_norm, p=2.0, status=STABLE, losses=(1.0, 0.5, 0.4, 0.3), norms=None, **kw) -> RunResult:
    norms = norms or [5.0] * len(losses)
    steps = []
    for i, loss in enumerate(losses, start=1):
        norm = norms[i - 1] if i <= len(norms) else NAN
        coef = 1.0 if max_norm is None else min(max_norm / (norm + 1e-6), 1.0)
        steps.append(StepRecord(i, loss, norm, coef))
    return RunResult(Cell(max_norm, p), status, steps, **kw)


# --- the spike rule ----------------------------------------------------------------------------


def test_spike_found_at_the_jump_in_the_layer_that_jumped():
    r = layered({"a": [1.0, 1.1, 0.9, 1.0, 1.2, 1.0], "b": [2.0, 2.2, 1.8, 2.1, 60.0, 2.0]})
    assert find_spike(r) == (5, "b")  # 60 > 10 x median(2.0, 2.2, 1.8, 2.1) = 20.5


def test_spike_needs_min_history_earlier_steps():
    assert MIN_HISTORY == 3
    early = layered({"a": [1.0, 1.0, 500.0, 1.0]})
    assert find_spike(early) == (None, None)  # step 3 has only 2 earlier norms
    late = layered({"a": [1.0, 1.0, 1.0, 500.0]})
    assert find_spike(late) == (4, "a")


def test_spike_factor_is_strict_and_configurable():
    r = layered({"a": [1.0, 1.0, 1.0, 10.0, 10.0 + 1e-9]})
    assert find_spike(r) == (5, "a")  # exactly 10x is not above 10x; the next one is
    assert find_spike(r, factor=20.0) == (None, None)
    assert find_spike(r, factor=5.0) == (4, "a")


def test_spike_param_is_the_largest_jump_and_the_first_among_equals():
    r = layered({"a": [1.0, 1.0, 1.0, 50.0], "b": [1.0, 1.0, 1.0, 80.0], "c": [2.0, 2.0, 2.0, 160.0]})
    assert find_spike(r) == (4, "b")  # ratios 50, 80, 80: b and c tie, b comes first


def test_non_finite_norm_counts_as_an_infinite_jump():
    assert find_spike(layered({"a": [1.0, 1.0, 1.0, 30.0], "b": [1.0, 1.0, 1.0, NAN]})) == (4, "b")
    assert find_spike(layered({"a": [1.0, 1.0, 1.0, INF], "b": [1.0, 1.0, 1.0, NAN]})) == (4, "a")


def test_median_is_robust_to_an_earlier_outlier_and_zero_typical_is_not_judged():
    # the outlier 20 at step 4 is below 30x; the later jump to 40 is judged against the median
    # of the earlier norms (1), not their mean (4.2, against which it would be only 9.6x)
    r = layered({"a": [1.0, 1.0, 1.0, 20.0, 1.0, 1.0, 40.0]})
    assert find_spike(r, factor=1000.0) == (None, None)
    assert find_spike(r, factor=30.0) == (7, "a")
    zero = layered({"a": [0.0, 0.0, 0.0, 5.0]})
    assert find_spike(zero) == (None, None)


def test_without_layers_the_total_norm_is_used():
    r = run(None, losses=[1.0] * 5, norms=[1.0, 1.0, 1.0, 1.0, 12.0])
    assert find_spike(r) == (5, None)


def _reference_spike(series: dict[str, list[float]], factor: float):
    """Brute force with statistics.median over each layer's finite earlier values."""
    n = len(next(iter(series.values())))
    for t in range(n):
        best = None
        for name, values in series.items():
            past = [v for v in values[:t] if math.isfinite(v)]
            if len(past) < MIN_HISTORY:
                continue
            typical = statistics.median(past)
            if typical <= 0:
                continue
            v = values[t]
            ratio = v / typical if math.isfinite(v) else INF
            if ratio > factor and (best is None or ratio > best[0]):
                best = (ratio, name)
        if best is not None:
            return t + 1, best[1]
    return None, None


_NORM = st.one_of(st.floats(0.0, 1e6), st.sampled_from([NAN, INF, 0.0]))


@settings(max_examples=200, deadline=None)
@given(
    series=st.lists(st.lists(_NORM, min_size=8, max_size=8), min_size=1, max_size=4),
    factor=st.sampled_from([2.0, 10.0, 100.0]),
)
def test_spike_rule_matches_a_brute_force_reference(series, factor):
    named = {f"layer{i}": values for i, values in enumerate(series)}
    assert find_spike(layered(named), factor) == _reference_spike(named, factor)


# --- smoothing, noise and ranking ---------------------------------------------------------------


def test_smoothed_loss_is_the_mean_and_sd_of_the_last_k_losses():
    assert SMOOTH_STEPS == 10
    losses = [float(x) for x in range(1, 16)]
    s = smoothed_loss(run(1.0, losses=losses))
    assert (s.mean, s.n) == (statistics.fmean(losses[-10:]), 10)
    assert s.sd == pytest.approx(statistics.stdev(losses[-10:]), rel=1e-15)


def test_smoothed_loss_leaves_out_the_stopping_step_and_non_finite_losses():
    r = run(None, losses=(2.0, NAN, 4.0, 1e9), status=DIVERGED, diverged_step=4)
    assert smoothed_loss(r) == Smoothed(3.0, statistics.stdev([2.0, 4.0]), 2)
    assert smoothed_loss(run(None, losses=())) is None
    assert smoothed_loss(run(None, losses=(3.0,))) == Smoothed(3.0, 0.0, 1)


def test_smoothed_loss_does_not_overflow_near_the_float_limit():
    s = smoothed_loss(run(None, losses=(1e308, 1.5e308, 1.7e308)))
    assert s.mean == pytest.approx(statistics.fmean([1.0, 1.5, 1.7]) * 1e308)
    assert math.isfinite(s.sd)


def test_meaningful_difference_is_two_standard_errors():
    a, b = Smoothed(1.0, 0.1, 4), Smoothed(1.0 + 2 * math.sqrt(0.01 / 4 + 0.01 / 4), 0.1, 4)
    assert not differ_meaningfully(a, b)  # exactly 2 SE apart: not beyond
    assert differ_meaningfully(a, Smoothed(b.mean + 1e-9, 0.1, 4))
    assert not differ_meaningfully(a, Smoothed(5.0, 0.1, 1))  # one loss: no spread to judge by
    assert not differ_meaningfully(a, Smoothed(NAN, 0.1, 4))
    assert not differ_meaningfully(a, None)


def test_rank_by_eval_metric_when_every_stable_run_has_one():
    a = run(0.1, losses=(1.0, 0.2, 0.2), eval_metric=0.5, eval_higher_is_better=False)
    b = run(1.0, losses=(1.0, 0.9, 0.9), eval_metric=0.3, eval_higher_is_better=False)
    assert [r.run for r in rank([a, b]).runs] == ["clip_1_2", "clip_0.1_2"]
    a.eval_higher_is_better = b.eval_higher_is_better = True
    ranking = rank([a, b])
    assert ranking.basis == "eval_metric" and ranking.best is a
    b.eval_metric = NAN  # one run without a finite metric: all are ranked by smoothed loss
    ranking = rank([a, b])
    assert ranking.basis == "smoothed_loss" and ranking.best is a


def test_rank_leaves_out_unstable_runs_and_keeps_sweep_order_on_ties():
    runs = [run(0.1, losses=(1.0, 0.5)), run(1.0, losses=(1.0, 0.5)), run(10.0, status=DIVERGED, losses=(1.0, 0.1))]
    assert [r.run for r in rank(runs).runs] == ["clip_0.1_2", "clip_1_2"]


# --- the boundary and its bisection -------------------------------------------------------------


def test_boundary_per_norm_type():
    results = [
        run(None, status=DIVERGED),
        run(0.1),
        run(0.1, INF),
        run(1.0),
        run(1.0, INF, status=NON_FINITE),
        run(10.0, status=DIVERGED),
        run(10.0, INF, status=DIVERGED),
        run(100.0, status=ERROR),  # neither stable nor unstable
    ]
    b2, binf = boundaries(results)
    assert (b2.norm_type, b2.largest_stable, b2.smallest_unstable, b2.factor) == (2.0, 1.0, 10.0, 10.0)
    assert (binf.norm_type, binf.largest_stable, binf.smallest_unstable, binf.factor) == (INF, 0.1, 1.0, 10.0)
    assert refine_bracket(results, 2.0) == (1.0, 10.0)
    assert next_refine_max_norm(results, 2.0) == 3.16  # sqrt(10), 3 significant digits
    assert refine_bracket([run(0.1), run(1.0)], 2.0) is None  # nothing unstable
    assert refine_bracket([run(0.1, status=DIVERGED)], 2.0) is None  # nothing stable below


@settings(max_examples=150, deadline=None)
@given(threshold=st.floats(0.1001, 10.0), k=st.integers(1, 8))
def test_bisection_keeps_the_boundary_bracketed_and_halves_it_in_log_space(threshold, k):
    """A model stable exactly below ``threshold``: every refined bracket holds the threshold,
    and after k steps the bracket's factor is at most 10^(1/2^k) (up to 3-digit rounding)."""

    def outcome(m):
        return run(m, status=STABLE if m < threshold else DIVERGED)

    results = [outcome(m) for m in (0.1, 1.0, 10.0)]
    a0, b0 = refine_bracket(results, 2.0)
    steps = 0
    for _ in range(k):
        m = next_refine_max_norm(results, 2.0)
        if m is None:
            break
        a, b = refine_bracket(results, 2.0)
        assert a < m < b
        results.append(outcome(m))
        steps += 1
        a, b = refine_bracket(results, 2.0)
        assert a < threshold <= b
    a, b = refine_bracket(results, 2.0)
    if steps == k:
        assert b / a <= (b0 / a0) ** (1 / 2**k) * 1.01**k
    else:  # stopped early: the bracket cannot be split at 3 significant digits
        assert float(f"{math.sqrt(a * b):.3g}") in (a, b)


# --- the recommendation -------------------------------------------------------------------------


def exploding_sweep():
    control = run(
        None,
        status=DIVERGED,
        diverged_step=6,
        losses=(2.0, 1.9, 1.8, 1.7, 1.6, 99.0),
        norms=(4.0, 5.0, 6.0, 7.0, 8.0),
        spike_step=5,
        spike_param="rnn.weight_hh_l0",
    )
    for s, extra in zip(control.steps, (1.0, 1.5, 2.0, 2.5, 3.0)):
        object.__setattr__(s, "norms", ((2.0, s.grad_norm), (INF, extra)))
    quiet = (1.0, 0.51, 0.5, 0.49, 0.5, 0.5)
    return [
        control,
        run(0.1, losses=quiet, norms=[5.0] * 6),
        run(0.1, INF, losses=(1.0, 0.9, 0.9, 0.9, 0.9, 0.9), norms=[2.0] * 6),
        run(1.0, losses=tuple(x + 0.002 for x in quiet), norms=[5.0] * 6),
        run(1.0, INF, status=DIVERGED, diverged_step=3, losses=(1.0, 0.9, 50.0)),
        run(10.0, status=DIVERGED, diverged_step=4, losses=(1.0, 0.9, 0.8, 50.0)),
    ]


def test_recommendation_picks_the_largest_margin_within_noise_of_the_best():
    rec = recommend(exploding_sweep())
    out = rec.as_json()
    # clip_0.1_2 and clip_1_2 are within noise; margins to the L2 boundary (10): 100 and 10
    assert (out["needs_clipping"], out["max_norm"], out["norm_type"], out["run"]) == (True, 0.1, "2", "clip_0.1_2")
    ev = out["evidence"]
    assert ev["within_noise"] == ["clip_1_2"]
    assert ev["boundary"] == {"norm_type": "2", "largest_stable": 1.0, "smallest_unstable": 10.0, "margin": 100.0}
    assert ev["suggested"]["clipped_frac"] == 1.0
    # control percentiles in the suggested norm type, before the onset (the spike at step 5)
    before = [4.0, 5.0, 6.0, 7.0]
    pct = ev["control"]["norm_percentiles"]
    assert [pct["p50"], pct["p90"], pct["p99"]] == pytest.approx(list(np.percentile(before, [50, 90, 99])), rel=1e-12)
    assert (pct["steps"], pct["before_step"], ev["control"]["onset_step"]) == (4, 5, 5)
    json.dumps(out, allow_nan=False)
    assert rec.line() == (
        "recommendation: clip with max_norm=0.1 norm_type=2 (clip_0.1_2); unclipped pre-clip 2 norm over 4 steps "
        "before its onset: p50 5.5, p90 6.7, p99 6.97; clips 100% of steps; 100x below the smallest unstable "
        "max_norm (10); final loss 0.5 vs unclipped 99 (the unclipped run diverged; 2 stable settings are within "
        "noise of the best by smoothed loss (noise judged by the spread of each run's last 10 losses), this one has "
        "the largest margin to the boundary)"
    )


def test_recommendation_evidence_uses_the_control_norm_in_the_suggested_norm_type():
    results = exploding_sweep()
    results[1].status = results[3].status = DIVERGED  # only clip_0.1_inf is left stable
    results[1].diverged_step = results[3].diverged_step = 6
    out = recommend(results).as_json()
    assert (out["max_norm"], out["norm_type"]) == (0.1, "inf")
    pct = out["evidence"]["control"]["norm_percentiles"]
    assert pct["norm_type"] == "inf"
    assert [pct["p50"], pct["p90"], pct["p99"]] == pytest.approx(
        list(np.percentile([1.0, 1.5, 2.0, 2.5], [50, 90, 99]))
    )
    assert out["evidence"]["boundary"]["margin"] == 10.0


def test_recommendation_when_nothing_is_stable_says_what_to_try():
    results = [
        run(None, status=DIVERGED, diverged_step=2, losses=(1.0, 50.0)),
        run(0.5, status=DIVERGED, diverged_step=3, losses=(1.0, 0.9, 50.0)),
        run(0.2, INF, status=NON_FINITE, nan_step=2, losses=(1.0, NAN)),
    ]
    rec = recommend(results)
    out = rec.as_json()
    assert out["needs_clipping"] is True and "max_norm" not in out and "run" not in out
    assert "below the smallest tried (0.5 (2), 0.2 (inf))" in out["advice"] and "--lr" in out["advice"]
    assert "--max-norm 0.02,0.002" in out["advice"]
    assert rec.line().startswith("recommendation: none (no clipped setting was stable); try max_norm values below")
    json.dumps(out, allow_nan=False)


def test_recommendation_when_every_run_goes_non_finite_at_one_step():
    results = [
        run(m, status=NON_FINITE, nan_step=5, nan_source=SOURCE_BACKWARD, losses=(1.0,) * 5) for m in (None, 0.1, 1.0)
    ]
    assert "clipping cannot help" in recommend(results).as_json()["advice"]


def test_recommendation_stable_control_and_unjudgeable_cases():
    stable = recommend([run(None), run(1.0)]).as_json()
    assert stable["needs_clipping"] is False and "max_norm" not in stable
    assert recommend([run(1.0)]).as_json()["needs_clipping"] is None  # no control
    assert recommend([run(None, status=ERROR, losses=()), run(1.0)]).as_json()["needs_clipping"] is None


def test_recommendation_never_picks_a_run_with_nan_figures():
    results = exploding_sweep()
    for r in results[1:4]:  # the three stable runs: losses NaN everywhere
        r.steps = [StepRecord(s.step, NAN, s.grad_norm, s.clip_coef) for s in r.steps]
    rec = recommend(results)
    assert rec.run is None and rec.as_json()["needs_clipping"] is True
    json.dumps(rec.as_json(), allow_nan=False)


_STATUS = st.sampled_from([STABLE, STABLE, DIVERGED, NON_FINITE, ERROR])
_LOSS = st.one_of(st.floats(-10, 10), st.sampled_from([NAN, INF, -INF]))


@settings(max_examples=150, deadline=None)
@given(
    control=_STATUS,
    cells=st.lists(
        st.tuples(
            st.sampled_from([0.01, 0.1, 1.0, 10.0]),
            st.sampled_from([2.0, INF]),
            _STATUS,
            st.lists(_LOSS, min_size=1, max_size=6),
            st.one_of(st.none(), st.floats(allow_nan=True)),
        ),
        max_size=6,
        unique_by=lambda c: (c[0], c[1]),
    ),
)
def test_recommendation_is_a_stable_run_deterministic_and_strict_json(control, cells):
    results = [run(None, status=control)]
    for m, p, status, losses, metric in cells:
        results.append(run(m, p, status=status, losses=tuple(losses), eval_metric=metric))
    rec = recommend(results)
    again = recommend(results)
    assert json.dumps(rec.as_json(), allow_nan=False) == json.dumps(again.as_json(), allow_nan=False)
    if rec.run is not None:
        assert rec.run in results and rec.run.status == STABLE and rec.run.cell.clipped
        assert results[0].status in (DIVERGED, NON_FINITE)
    if control == STABLE:
        assert rec.needs_clipping is False
    assert recommend.__doc__  # the rule is documented where it is implemented
