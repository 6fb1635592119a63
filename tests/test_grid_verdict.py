"""Verdicts across seeds and learning rates: settings judged over every seed, ranked by the
mean of their seeds' figures within run-to-run noise, the boundary and the recommendation per
lr. Constructed results first (references: ``statistics``, numpy), then real sweeps of
``tests/scripts/seed_kick.py`` checked against plain-torch training (``reference_loop``)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_loop import reference_training
from typer.testing import CliRunner

from gradcheck_cli.analysis import (
    Boundary,
    boundaries,
    next_refine_max_norm,
    rank,
    rank_settings,
    refine_bracket,
    setting_status,
    settings_of,
)
from gradcheck_cli.cli import app
from gradcheck_cli.detect import Divergence, applied_norm
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.recommend import recommend
from gradcheck_cli.report.terminal import verdict_line
from gradcheck_cli.results import CRASHED, DIVERGED, ERROR, NON_FINITE, STABLE, Cell, RunResult, StepRecord
from gradcheck_cli.settings import over_seeds
from gradcheck_cli.text import format_number

NAN, INF = math.nan, math.inf
SEEDS = [0, 1, 2]
KICK_SCRIPT = Path(__file__).resolve().parent / "scripts" / "seed_kick.py"


def seeded(max_norm, seed, losses=(1.0, 0.5, 0.4, 0.3), status=STABLE, lr=None, p=2.0, norms=None, **kw) -> RunResult:
    """A run of a sweep over seeds (``seed`` set) and, when ``lr`` is given, lrs."""
    norms = norms or [5.0] * len(losses)
    steps = [
        StepRecord(i, loss, norm, 1.0 if max_norm is None else min(max_norm / (norm + 1e-6), 1.0))
        for i, (loss, norm) in enumerate(zip(losses, norms), start=1)
    ]
    return RunResult(Cell(max_norm, p, lr=lr, seed=seed), status, steps, lr=lr, seed=seed, **kw)


def level(max_norm, seed, value, status=STABLE, **kw) -> RunResult:
    """A run whose last 4 losses are all ``value``: its smoothed loss is ``value`` exactly, sd 0."""
    return seeded(max_norm, seed, (value,) * 4, status=status, **kw)


def fig(losses) -> float:
    """The reference smoothed loss of a stable run: the mean of its last 10 losses."""
    return statistics.fmean(list(losses)[-10:])


def noise_free_better(a: list[float], b: list[float], higher: bool = False) -> bool:
    """The rule, written out: ``a``'s seeds' figures ahead of ``b``'s by more than 2 standard
    errors, ``|m_a - m_b| > 2 * sqrt(s_a^2/n_a + s_b^2/n_b)``."""
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    ahead = ma > mb if higher else ma < mb
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return ahead and abs(ma - mb) > 2 * se


# --- a setting over its seeds -------------------------------------------------------------------


def test_a_setting_is_stable_only_when_stable_in_every_seed_and_unstable_when_in_any():
    def status(*statuses, seeds=SEEDS):
        return setting_status(over_seeds([seeded(1.0, s, status=st) for s, st in zip(seeds, statuses)])[0], SEEDS)

    assert status(STABLE, STABLE, STABLE) == STABLE
    assert status(STABLE, DIVERGED, STABLE) == DIVERGED
    assert status(ERROR, NON_FINITE, DIVERGED) == NON_FINITE  # the first unstable seed's word
    assert status(STABLE, ERROR, STABLE) == ERROR  # raised in one seed: not judged, never stable
    assert status(STABLE, CRASHED, STABLE) == ERROR
    assert status(STABLE, STABLE, seeds=[0, 1]) == ERROR  # seed 2 never ran: not stable in every seed
    # one seed: the run's own status, word for word
    one = RunResult(Cell(1.0), CRASHED, [])
    assert setting_status(settings_of([one])[0], [None]) == CRASHED


@settings(max_examples=200, deadline=None)
@given(
    a=st.lists(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=12), min_size=2, max_size=4),
    shift=st.floats(-3.0, 3.0),
    scale=st.floats(0.0, 2.0),
)
def test_setting_figure_is_the_mean_of_the_seeds_figures_and_its_noise_their_spread(a, shift, scale):
    """Two settings over the same seeds; b's per-seed losses are a's scaled about 1 and shifted."""
    b = [[1.0 + scale * (x - 1.0) + shift for x in losses] for losses in a]
    assume(all(x > 0 for losses in b for x in losses))
    runs = [seeded(0.1, s, tuple(losses)) for s, losses in enumerate(a)]
    runs += [seeded(1.0, s, tuple(losses)) for s, losses in enumerate(b)]
    seeds = list(range(len(a)))
    ranking = rank_settings(over_seeds(runs), seeds)
    ga, gb = sorted(ranking.settings, key=lambda g: g.cell.max_norm)
    fa, fb = [fig(x) for x in a], [fig(x) for x in b]
    figure = ranking.figure(ga)
    assert figure.n == len(a)
    assert figure.mean == pytest.approx(statistics.fmean(fa), rel=1e-12)
    assert figure.sd == pytest.approx(statistics.stdev(fa), rel=1e-9, abs=1e-12)
    # away from the 2-standard-error edge (float rounding), better() is the rule written out
    ma, mb = statistics.fmean(fa), statistics.fmean(fb)
    se = math.sqrt(statistics.variance(fa) / len(fa) + statistics.variance(fb) / len(fb))
    assume(abs(abs(ma - mb) - 2 * se) > 1e-9 * max(1.0, abs(ma), abs(mb)))
    assume(abs(ma - mb) > 1e-12)
    assert ranking.better(ga, gb) == noise_free_better(fa, fb)
    assert ranking.better(gb, ga) == noise_free_better(fb, fa)
    assert not (ranking.better(ga, gb) and ranking.better(gb, ga))


_STATUS = st.sampled_from([STABLE, STABLE, STABLE, DIVERGED, NON_FINITE, ERROR])
_LOSS = st.one_of(st.floats(-10, 10), st.sampled_from([NAN, INF]))


@settings(max_examples=150, deadline=None)
@given(
    cells=st.lists(
        st.tuples(
            st.sampled_from([None, 0.01, 0.1, 1.0, 10.0]),
            _STATUS,
            st.lists(_LOSS, min_size=1, max_size=12),
            st.one_of(st.none(), st.floats(-5, 5), st.just(NAN)),
        ),
        max_size=6,
        unique_by=lambda c: c[0],
    ),
    higher=st.booleans(),
)
def test_with_one_seed_settings_rank_exactly_as_runs(cells, higher):
    runs = [
        RunResult(
            Cell(m),
            status,
            [StepRecord(i, x, 1.0, 1.0) for i, x in enumerate(losses, start=1)],
            eval_metric=metric,
            eval_higher_is_better=higher if metric is not None else None,
        )
        for m, status, losses, metric in cells
    ]
    by_runs = rank(runs)
    by_settings = rank_settings(settings_of(runs), [None])
    assert [g.runs[0] for g in by_settings.settings] == by_runs.runs
    assert (by_settings.basis, by_settings.higher_is_better) == (by_runs.basis, by_runs.higher_is_better)
    for a in by_settings.settings:
        for b in by_settings.settings:
            assert by_settings.better(a, b) == by_runs.better(a.runs[0], b.runs[0])


# --- the verdict --------------------------------------------------------------------------------


def noisy_sweep(clip_1_levels=(1.1, 1.4, 1.7)):
    """Offsets of 0, 0.3, 0.6 per seed spread every setting's figures (sd 0.3); clip_10_2 has the
    lowest losses of all but diverges in seed 2, as the control does."""
    out = []
    for seed, offset in zip(SEEDS, (0.0, 0.3, 0.6)):
        unstable = seed == 2
        out.append(
            level(
                None, seed, 3.0 + offset, status=DIVERGED if unstable else STABLE, diverged_step=4 if unstable else None
            )
        )
        out.append(level(0.1, seed, 1.0 + offset))
        out.append(level(1.0, seed, clip_1_levels[seed]))
        out.append(
            level(10.0, seed, 0.2, status=DIVERGED if unstable else STABLE, diverged_step=4 if unstable else None)
        )
    return out


def test_grouped_verdict_says_no_meaningful_difference_within_the_seeds_spread():
    # clip_0.1_2: 1, 1.3, 1.6; clip_1_2: 1.1, 1.4, 1.7. 0.1 apart, 2 SE = 2 * sqrt(2 * 0.09 / 3) = 0.49
    assert not noise_free_better([1.0, 1.3, 1.6], [1.1, 1.4, 1.7])
    assert verdict_line(noisy_sweep()) == (
        "best: max_norm=0.1 norm_type=2 (stable in all 3 seeds, mean smoothed loss 1.3); "
        "no meaningful difference from clip_1_2 (noise judged by the spread of the 3 seeds' smoothed losses); unclipped: stable 2/3 seeds"
    )
    # 1.1 apart: beyond the noise, and no longer named
    assert noise_free_better([1.0, 1.3, 1.6], [2.1, 2.4, 2.7])
    assert verdict_line(noisy_sweep((2.1, 2.4, 2.7))) == (
        "best: max_norm=0.1 norm_type=2 (stable in all 3 seeds, mean smoothed loss 1.3); unclipped: stable 2/3 seeds"
    )


def test_grouped_verdict_never_calls_the_control_beaten_on_noise():
    results = [r for r in noisy_sweep() if r.cell.clipped]
    results += [level(None, s, 1.2 + 0.3 * s) for s in SEEDS]  # 1.2, 1.5, 1.8: within noise of clip_0.1_2
    assert verdict_line(results) == (
        "clipping not needed: unclipped is stable in every seed, mean smoothed loss 1.5; no clipped setting is "
        "meaningfully better (best: max_norm=0.1 norm_type=2, mean smoothed loss 1.3; noise judged by the spread of the 3 seeds' smoothed losses)"
    )


def eval_sweep(higher: bool):
    """clip_0.1_2 eval 0.5, 0.52, 0.48; clip_1_2 0.53, 0.49, 0.51 (0.01 apart, within noise);
    clip_10_2 0.6, 0.62, 0.58. Smoothed losses rank them the other way round."""
    metrics = {0.1: (0.5, 0.52, 0.48), 1.0: (0.53, 0.49, 0.51), 10.0: (0.6, 0.62, 0.58)}
    losses = {0.1: 3.0, 1.0: 2.0, 10.0: 1.0}
    out = [level(None, s, 5.0, status=DIVERGED, diverged_step=4) for s in SEEDS]
    for m, values in metrics.items():
        out += [level(m, s, losses[m], eval_metric=v, eval_higher_is_better=higher) for s, v in zip(SEEDS, values)]
    return out


def test_grouped_verdict_ranks_by_the_mean_eval_metric_with_its_spread_over_seeds():
    assert noise_free_better([0.6, 0.62, 0.58], [0.53, 0.49, 0.51], higher=True)
    assert verdict_line(eval_sweep(higher=True)) == (
        "best: max_norm=10 norm_type=2 (stable in all 3 seeds, mean eval_metric 0.6); unclipped: stable 0/3 seeds"
    )
    # lower is better: clip_0.1_2 leads clip_1_2 by 0.01, less than 2 SE (0.033): no meaningful difference
    assert not noise_free_better([0.5, 0.52, 0.48], [0.53, 0.49, 0.51])
    assert verdict_line(eval_sweep(higher=False)) == (
        "best: max_norm=0.1 norm_type=2 (stable in all 3 seeds, mean eval_metric 0.5); "
        "no meaningful difference from clip_1_2 (noise judged by the spread of the 3 seeds' evaluate() numbers); "
        "unclipped: stable 0/3 seeds"
    )


def test_grouped_verdict_with_one_seed_and_several_lrs_uses_the_within_run_noise():
    quiet = (1.0, 0.51, 0.5, 0.49, 0.5, 0.5)
    runs = [
        seeded(None, None, (1.0, 2.0, 40.0), status=DIVERGED, lr=0.1, diverged_step=3),
        seeded(1.0, None, quiet, lr=0.1),
        seeded(None, None, (1.0, 2.0, 40.0), status=DIVERGED, lr=1.0, diverged_step=3),
        seeded(1.0, None, tuple(x + 0.002 for x in quiet), lr=1.0),
    ]
    # within one run: 0.002 apart, 2 SE of the last losses = 2 * sqrt(2 * var / 6) = 0.013
    assert 0.002 < 2 * math.sqrt(2 * statistics.variance(quiet) / len(quiet))
    assert verdict_line(runs) == (
        f"best: max_norm=1 norm_type=2 lr=0.1 (stable, smoothed loss {format_number(fig(quiet))}); "
        "no meaningful difference from clip_1_2@lr=1 (noise judged by the spread of each run's last 10 losses); "
        "unclipped: lr=0.1 diverged at step 3, lr=1 diverged at step 3"
    )


# --- the boundary and --refine over seeds and lrs -------------------------------------------------


def test_boundary_counts_a_max_norm_stable_in_every_seed_and_unstable_in_any_per_lr():
    outcomes = {  # (lr, max_norm): status per seed
        (0.1, 0.1): (STABLE, STABLE, STABLE),
        (0.1, 1.0): (STABLE, STABLE, DIVERGED),  # stable in 2 of 3: unstable
        (0.1, 10.0): (ERROR, STABLE, STABLE),  # raised in one seed: neither
        (0.1, 100.0): (NON_FINITE, NON_FINITE, NON_FINITE),
        (1.0, 0.1): (STABLE, STABLE, STABLE),
        (1.0, 1.0): (STABLE, STABLE, STABLE),
        (1.0, 10.0): (DIVERGED, STABLE, STABLE),
    }
    results = [seeded(m, s, status=statuses[s], lr=lr) for (lr, m), statuses in outcomes.items() for s in SEEDS]
    assert boundaries(results) == [Boundary(2.0, 0.1, 1.0, lr=0.1), Boundary(2.0, 1.0, 10.0, lr=1.0)]
    assert refine_bracket(results, 2.0, 0.1) == (0.1, 1.0)
    assert refine_bracket(results, 2.0, 1.0) == (1.0, 10.0)
    assert next_refine_max_norm(results, 2.0, 0.1) == 0.316  # sqrt(0.1 * 1), 3 significant digits
    assert next_refine_max_norm(results, 2.0, 1.0) == 3.16
    # the point already run in one seed at that lr is not asked for again
    assert next_refine_max_norm(results + [seeded(3.16, 0, lr=1.0)], 2.0, 1.0) is None
    assert next_refine_max_norm(results + [seeded(3.16, 0, lr=0.1)], 2.0, 1.0) == 3.16


# --- the recommendation -------------------------------------------------------------------------


def test_recommendation_over_seeds_is_stable_in_every_seed_with_pooled_control_evidence():
    results = noisy_sweep()
    norms = {0: [4.0, 5.0, 6.0, 7.0], 1: [3.0, 3.5, 4.0, 4.5], 2: [2.0, 9.0, 8.0, 50.0]}
    for r in results:
        if not r.cell.clipped:
            r.steps = [StepRecord(s.step, s.loss, n, 1.0) for s, n in zip(r.steps, norms[r.cell.seed])]
    results[-4].spike_step = 2  # the control of seed 2 spikes at step 2, before it diverges at 4
    rec = recommend(results)
    out = rec.as_json()
    # clip_10_2 has the lowest losses but diverged in seed 2: never recommended
    assert {k: out[k] for k in ("needs_clipping", "max_norm", "norm_type", "run", "runs")} == {
        "needs_clipping": True,
        "max_norm": 0.1,
        "norm_type": "2",
        "run": "clip_0.1_2",
        "runs": ["clip_0.1_2@seed=0", "clip_0.1_2@seed=1", "clip_0.1_2@seed=2"],
    }
    assert all(r.status == STABLE for r in rec.setting.runs) and rec.run is rec.setting.runs[0]
    ev = out["evidence"]
    assert ev["boundaries"] == [{"norm_type": "2", "largest_stable": 1.0, "smallest_unstable": 10.0, "factor": 10.0}]
    assert ev["boundary"]["margin"] == 100.0 and ev["within_noise"] == ["clip_1_2"]
    suggested = ev["suggested"]
    assert (suggested["status"], suggested["stable_seeds"], suggested["seeds"]) == (STABLE, 3, 3)
    assert suggested["smoothed_loss"] == pytest.approx(statistics.fmean([1.0, 1.3, 1.6]), rel=1e-15)
    assert suggested["smoothed_loss_sd_over_seeds"] == pytest.approx(statistics.stdev([1.0, 1.3, 1.6]), rel=1e-12)
    assert [row["run"] for row in suggested["per_seed"]] == out["runs"]
    # the seeds' controls pooled, each before its own onset (seed 2: its spike at step 2)
    pooled = norms[0] + norms[1] + norms[2][:1]
    pct = ev["control"]["norm_percentiles"]
    assert [pct["p50"], pct["p90"], pct["p99"]] == pytest.approx(list(np.percentile(pooled, [50, 90, 99])), rel=1e-12)
    assert (pct["steps"], pct["before_step"], pct["seeds"], ev["control"]["onset_step"]) == (9, 2, 3, 2)
    assert ev["control"]["status"] == DIVERGED and ev["control"]["stable_seeds"] == 2
    assert out["reason"] == (
        "the unclipped run diverged in 1 of 3 seeds; 2 stable settings are within noise of the best by smoothed "
        "loss (noise judged by the spread of the 3 seeds' smoothed losses), this one has the largest margin to the boundary"
    )
    p = [format_number(x) for x in np.percentile(pooled, [50, 90, 99])]
    assert rec.line() == (
        "recommendation: clip with max_norm=0.1 norm_type=2 (clip_0.1_2, stable in all 3 seeds); unclipped pre-clip "
        f"2 norm over 9 steps of 3 seeds before their onsets: p50 {p[0]}, p90 {p[1]}, p99 {p[2]}; clips 100% of steps "
        "(mean over the seeds); 100x below the smallest unstable max_norm (10); final loss 1.3 vs unclipped 3.3 "
        f"(means over the seeds) ({out['reason']})"
    )
    json.dumps(out, allow_nan=False)


def test_recommendation_when_a_control_seed_raised_cannot_judge():
    results = noisy_sweep()
    results[-4].status, results[-4].diverged_step = ERROR, None  # seed 2's control raised; the others stable
    out = recommend(results).as_json()
    assert out["needs_clipping"] is None and "did not finish in every seed" in out["reason"]


def lr_sweep():
    """At lr 0.1 the control is stable (2 in every seed); at lr 1 it diverges and clip_1_2 reaches
    0.5, meaningfully below every stable setting at lr 0.1."""
    out = []
    for s in SEEDS:
        out += [
            level(None, s, 2.0 + 0.01 * s, lr=0.1),
            level(1.0, s, 2.1 + 0.01 * s, lr=0.1),
            level(None, s, 9.0, status=DIVERGED, diverged_step=4, lr=1.0),
            level(1.0, s, 0.5 + 0.01 * s, lr=1.0),
        ]
    return out


def test_recommendation_over_lrs_is_given_at_the_lr_of_the_best_stable_setting_with_every_lr_judged():
    out = recommend(lr_sweep()).as_json()
    assert (out["needs_clipping"], out["lr"], out["max_norm"], out["run"]) == (True, 1.0, 1.0, "clip_1_2@lr=1")
    assert out["lr_choice"] == "the lr of the best stable setting by smoothed loss"
    assert [(e["lr"], e["needs_clipping"], e.get("run")) for e in out["per_lr"]] == [
        (0.1, False, None),
        (1.0, True, "clip_1_2@lr=1"),
    ]
    assert (
        out["per_lr"][0]["reason"]
        == "the unclipped run is stable in every seed; no clipped setting is meaningfully better"
    )
    assert recommend(lr_sweep()).line().endswith("; at lr=1: the lr of the best stable setting by smoothed loss")
    assert verdict_line(lr_sweep()).startswith(
        "best: max_norm=1 norm_type=2 lr=1 (stable in all 3 seeds, mean smoothed loss 0.51); "
        "meaningfully better than unclipped at lr=0.1: stable in every seed, mean smoothed loss 2.01"
    )
    # the clipped setting at lr 1 within noise of the control at lr 0.1: no clipping, at lr 0.1
    close = [r for r in lr_sweep() if not (r.cell.clipped and r.cell.lr == 1.0)]
    close += [level(1.0, s, 1.6 + 0.8 * s, lr=1.0) for s in SEEDS]
    rec = recommend(close)
    assert (rec.needs_clipping, rec.lr, rec.lr_choice) == (
        False,
        0.1,
        "the lr of the best stable setting by smoothed loss (unclipped)",
    )
    # nothing stable at any lr: the smallest lr, with what to try
    broken = [
        seeded(m, s, status=DIVERGED, diverged_step=3, lr=lr) for lr in (1.0, 0.1) for m in (None, 1.0) for s in SEEDS
    ]
    rec = recommend(broken)
    assert (rec.needs_clipping, rec.lr, rec.run) == (True, 0.1, None)
    assert (
        rec.lr_choice == "no setting was stable at any lr: the smallest lr" and "below the smallest tried" in rec.advice
    )


@settings(max_examples=150, deadline=None)
@given(
    control=st.lists(_STATUS, min_size=3, max_size=3),
    cells=st.lists(
        st.tuples(
            st.sampled_from([0.01, 0.1, 1.0, 10.0]),
            st.lists(_STATUS, min_size=3, max_size=3),
            st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3),
        ),
        max_size=5,
        unique_by=lambda c: c[0],
    ),
)
def test_recommendation_over_seeds_is_a_setting_stable_in_every_seed(control, cells):
    results = [level(None, s, 1.0, status=st) for s, st in zip(SEEDS, control)]
    for m, statuses, levels in cells:
        results += [level(m, s, x, status=st) for s, st, x in zip(SEEDS, statuses, levels)]
    rec = recommend(results)
    assert json.dumps(rec.as_json(), allow_nan=False) == json.dumps(recommend(results).as_json(), allow_nan=False)
    if rec.setting is not None:
        assert [r.cell.seed for r in rec.setting.runs] == SEEDS and all(r.status == STABLE for r in rec.setting.runs)
        assert any(st in (DIVERGED, NON_FINITE) for st in control)
    if all(st == STABLE for st in control):
        assert rec.needs_clipping is False
    elif ERROR in control and not any(st in (DIVERGED, NON_FINITE) for st in control):
        assert rec.needs_clipping is None


# --- real sweeps over seeds ---------------------------------------------------------------------


runner = CliRunner()
STEPS = 20


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def without_evaluate(tmp_path: Path) -> Path:
    text = KICK_SCRIPT.read_text().split("\n\ndef evaluate")[0].replace("EVALUATE_HIGHER_IS_BETTER = True\n", "")
    path = tmp_path / "seed_kick_loss.py"
    path.write_text(text + "\n")
    return path


def reference(script: Path, max_norm, seed: int, lr: float | None = None) -> dict:
    """The run in plain torch: its losses up to where gradclip stops it, status and final model."""
    exp = load_experiment(script)
    built = []
    build = exp.build_model_fn
    exp.build_model_fn = lambda: built.append(build()) or built[-1]
    steps = reference_training(exp, STEPS, max_norm=max_norm, seed=seed, lr=lr)
    losses = [s.loss for s in steps]
    # the divergence rule (written out and tested on numbers in test_divergence.py) on the plain loop's numbers
    divergence = Divergence(10.0)
    stop = next(
        (
            i
            for i, s in enumerate(steps)
            if divergence.loss_diverged(s.loss) or divergence.norm_diverged(applied_norm(s.norm, max_norm))
        ),
        None,
    )
    return {
        "status": STABLE if stop is None else DIVERGED,
        "losses": losses if stop is None else losses[:stop],  # the stopping step is left out
        "norms": [s.norm for s in steps][: None if stop is None else stop],
        "onset": None if stop is None else stop + 1,
        "metric": exp.evaluate_fn(built[-1]) if exp.evaluate_fn is not None and stop is None else None,
    }


def lines(result) -> list[str]:
    return [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("best:", "clipping not needed", "recommendation:"))
    ]


@pytest.fixture(scope="module")
def loss_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    script = without_evaluate(tmp)
    out = tmp / "r"
    result = invoke(
        "sweep",
        script,
        "--steps",
        STEPS,
        "--seeds",
        "0,1,2",
        "--max-norm",
        "1,10,1000",
        "--norm-type",
        "2",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    refs = {(m, s): reference(script, m, s) for m in (None, 1.0, 10.0, 1000.0) for s in SEEDS}
    return result, out, refs


def test_seeds_sweep_verdict_and_recommendation_match_the_reference_and_report_renders_them_again(loss_sweep):
    result, out, refs = loss_sweep
    status = {m: [refs[m, s]["status"] for s in SEEDS] for m in (None, 1.0, 10.0, 1000.0)}
    # the kick diverges seed 2 unclipped and at max_norm 1000 (which never binds); 1 and 10 absorb it
    assert status[None] == status[1000.0] == [STABLE, STABLE, DIVERGED]
    assert status[1.0] == status[10.0] == [STABLE] * 3
    figures = {m: [fig(refs[m, s]["losses"]) for s in SEEDS] for m in (1.0, 10.0, 1000.0)}
    mean = {m: statistics.fmean(v) for m, v in figures.items()}
    # clip_1000_2 diverged in one seed: it is never the best, whatever its figure
    assert mean[10.0] < mean[1.0]
    assert not noise_free_better(figures[10.0], figures[1.0])  # the seeds' offsets (sd 1) drown the difference
    verdict, recommendation = lines(result)
    assert verdict == (
        f"best: max_norm=10 norm_type=2 (stable in all 3 seeds, mean smoothed loss {format_number(mean[10.0])}); "
        "no meaningful difference from clip_1_2 (noise judged by the spread of the 3 seeds' smoothed losses); unclipped: stable 2/3 seeds"
    )
    rec = json.loads((out / "recommendation.json").read_text())
    # within noise, the largest margin to the boundary (1000 / 1) wins
    assert {k: rec[k] for k in ("needs_clipping", "max_norm", "norm_type", "clip_mode", "run", "runs", "reason")} == {
        "needs_clipping": True,
        "max_norm": 1.0,
        "norm_type": "2",
        "clip_mode": "norm",
        "run": "clip_1_2",
        "runs": ["clip_1_2@seed=0", "clip_1_2@seed=1", "clip_1_2@seed=2"],
        "reason": "the unclipped run diverged in 1 of 3 seeds; 2 stable settings are within noise of the best by "
        "smoothed loss (noise judged by the spread of the 3 seeds' smoothed losses), this one has the largest margin to the boundary",
    }
    ev = rec["evidence"]
    assert ev["boundaries"] == [
        {"norm_type": "2", "largest_stable": 10.0, "smallest_unstable": 1000.0, "factor": 100.0}
    ]
    assert ev["boundary"]["margin"] == 1000.0 and ev["within_noise"] == ["clip_10_2"]
    assert ev["suggested"]["smoothed_loss"] == pytest.approx(mean[1.0], rel=1e-12)
    assert ev["suggested"]["smoothed_loss_sd_over_seeds"] == pytest.approx(statistics.stdev(figures[1.0]), rel=1e-9)
    pooled = [n for s in SEEDS for n in refs[None, s]["norms"][: (refs[None, s]["onset"] or STEPS + 1) - 1]]
    pct = ev["control"]["norm_percentiles"]
    assert (pct["steps"], pct["before_step"], pct["seeds"]) == (2 * STEPS + 3, 4, 3)
    assert [pct["p50"], pct["p90"], pct["p99"]] == pytest.approx(list(np.percentile(pooled, [50, 90, 99])), rel=1e-6)
    assert recommendation.startswith(
        "recommendation: clip with max_norm=1 norm_type=2 (clip_1_2, stable in all 3 seeds)"
    )
    # gradclip report renders the same verdict and recommendation from the files
    again = invoke("report", out)
    assert again.exit_code == 0, again.output
    assert lines(again) == [verdict, recommendation]
    assert json.loads((out / "recommendation.json").read_text()) == rec


def test_evaluate_over_seeds_ranks_by_the_metric_and_refine_runs_every_seed(tmp_path):
    out = tmp_path / "r"
    result = invoke(
        "sweep",
        KICK_SCRIPT,
        "--steps",
        STEPS,
        "--seeds",
        "0,1,2",
        "--max-norm",
        "1,10,1000",
        "--norm-type",
        "2",
        "--refine",
        1,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    metrics = {m: [reference(KICK_SCRIPT, m, s)["metric"] for s in SEEDS] for m in (1.0, 10.0)}
    # by the loss clip_10_2 leads (test above); by evaluate() = -w (higher is better) clip_1_2 does, in every seed alike
    assert noise_free_better(metrics[1.0], metrics[10.0], higher=True)
    verdict, recommendation = lines(result)
    assert verdict == (
        f"best: max_norm=1 norm_type=2 (stable in all 3 seeds, mean eval_metric {format_number(statistics.fmean(metrics[1.0]))}); "
        "unclipped: stable 2/3 seeds"
    )
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["evidence"]["ranked_by"] == "eval_metric (higher is better)" and rec["run"] == "clip_1_2"
    assert rec["evidence"]["suggested"]["eval_metric"] == pytest.approx(statistics.fmean(metrics[1.0]), rel=1e-6)
    # --refine bisects the bracket over the seeds, (10, 1000), once: max_norm 100, run in every seed
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    refined = summary[summary["refined"]]
    assert list(refined["run"]) == ["clip_100_2@seed=0", "clip_100_2@seed=1", "clip_100_2@seed=2"]
    assert (refined["status"] == STABLE).all()
    assert rec["evidence"]["boundaries"][0]["largest_stable"] == 100.0
    again = invoke("report", out)
    assert again.exit_code == 0 and lines(again) == [verdict, recommendation]


def test_lrs_and_seeds_sweep_recommends_at_the_lr_of_the_best_stable_setting(tmp_path):
    script = without_evaluate(tmp_path)
    out = tmp_path / "r"
    result = invoke(
        "sweep",
        script,
        "--steps",
        STEPS,
        "--seeds",
        "0,1,2",
        "--lr",
        "0.01,0.001",
        "--max-norm",
        "1,10,1000",
        "--norm-type",
        "2",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    refs = {
        (m, lr, s): reference(script, m, s, lr)
        for m in (None, 1.0, 10.0, 1000.0)
        for lr in (0.01, 0.001)
        for s in SEEDS
    }
    # at lr 0.01 the kick diverges seed 2 unclipped; at lr 0.001 it moves w ten times less: nothing diverges
    assert [refs[None, 0.01, s]["status"] for s in SEEDS] == [STABLE, STABLE, DIVERGED]
    assert all(r["status"] == STABLE for (m, lr, s), r in refs.items() if lr == 0.001)
    figures = {
        (m, lr): [fig(refs[m, lr, s]["losses"]) for s in SEEDS]
        for m in (None, 1.0, 10.0, 1000.0)
        for lr in (0.01, 0.001)
    }
    stable_everywhere = [k for k in figures if all(refs[k[0], k[1], s]["status"] == STABLE for s in SEEDS)]
    best = min(stable_everywhere, key=lambda k: (statistics.fmean(figures[k]), k[0] is not None))
    # the best stable setting is the unclipped one at lr 0.001 (max_norm 1000 never binds there: a tie)
    assert best == (None, 0.001) and figures[1000.0, 0.001] == figures[None, 0.001]
    verdict, recommendation = lines(result)
    m = format_number(statistics.fmean(figures[None, 0.001]))
    assert verdict == (
        f"clipping not needed: unclipped is stable at lr=0.001 in every seed, mean smoothed loss {m}; no clipped setting "
        f"is meaningfully better (best: max_norm=1000 norm_type=2 lr=0.001, mean smoothed loss {m}; noise judged by "
        "the spread of the 3 seeds' smoothed losses)"
    )
    rec = json.loads((out / "recommendation.json").read_text())
    assert (rec["needs_clipping"], rec["lr"], rec["lr_choice"]) == (
        False,
        0.001,
        "the lr of the best stable setting by smoothed loss (unclipped)",
    )
    assert [(e["lr"], e["needs_clipping"], e.get("run")) for e in rec["per_lr"]] == [
        (0.01, True, "clip_1_2@lr=0.01"),
        (0.001, False, None),
    ]
    assert rec["per_lr"][0]["boundaries"] == [
        {"norm_type": "2", "largest_stable": 10.0, "smallest_unstable": 1000.0, "factor": 100.0}
    ]
    assert recommendation == (
        "recommendation: no clipping needed (the unclipped run is stable in every seed; no clipped setting is "
        "meaningfully better); at lr=0.001: the lr of the best stable setting by smoothed loss (unclipped)"
    )
    again = invoke("report", out)
    assert again.exit_code == 0 and lines(again) == [verdict, recommendation]
    assert json.loads((out / "recommendation.json").read_text()) == rec
