"""One story: the verdict line, the recommendation line and recommendation.json never contradict
each other. Each contradiction a user met (issue 21) is constructed here and checked not to be
printed, and a property checks that the three agree on any sweep."""

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli.recommend import recommend
from gradcheck_cli.report.terminal import verdict_line
from gradcheck_cli.results import DIVERGED, ERROR, NON_FINITE, STABLE, Cell, RunResult, StepRecord
from gradcheck_cli.text import describe_setting_at_lr

NAN = math.nan
CLAIMS = ("meaningfully better than", "meaningfully lower", "meaningfully better eval_metric", "clipping is optional")


def run(max_norm, losses=(1.0, 0.5, 0.25), status=STABLE, p=2.0, sites=(), seed=None, **kw) -> RunResult:
    steps = []
    for i, loss in enumerate(losses, start=1):
        coef = 1.0 if max_norm is None else min(max_norm / 3.0, 1.0)
        site_rows = tuple((name, 3.0, coef) for name in sites)
        steps.append(StepRecord(i, loss, 3.0, coef, sites=site_rows))
    kw.setdefault("diverged_step", len(losses) if status == DIVERGED else None)
    kw.setdefault("nan_step", len(losses) if status == NON_FINITE else None)
    return RunResult(Cell(max_norm, p, seed=seed), status, steps, seed=seed, **kw)


def story(results: list[RunResult]) -> tuple[str, str, dict]:
    rec = recommend(results)
    out = json.loads(json.dumps(rec.as_json(), allow_nan=False))  # what recommendation.json holds
    return verdict_line(results), rec.line(), out


def check_one_story(results: list[RunResult]) -> tuple[str, str, dict]:
    """The rules every sweep's three outputs obey together (one lr)."""
    verdict, line, rec = story(results)
    reason = rec["reason"]
    beats_control = "meaningfully better than unclipped" in verdict
    # the verdict says a clipped setting beats a stable control exactly when the recommendation does
    assert beats_control == ("clipping is optional" in reason), (verdict, reason)
    if rec["needs_clipping"] is False:
        assert verdict.startswith("clipping not needed") or beats_control or verdict.startswith("unclipped: stable"), (
            verdict,
            reason,
        )
        assert "max_norm" not in rec and line.startswith("recommendation: no clipping needed")
    if "no clipped setting is meaningfully better" in verdict:
        assert not any(c in reason for c in CLAIMS), (verdict, reason)
    if rec["needs_clipping"] is True and rec.get("run") is not None:
        # the suggested setting is the verdict's best or one it found no meaningful difference from
        suggested = next(r for r in results if rec["run"] in (r.run, r.cell.setting.run))
        tied = verdict.split("no meaningful difference from ", 1)[-1].split(" (")[0].split(";")[0].split(", ")
        assert (
            f"best: {describe_setting_at_lr(suggested.cell)} (" in verdict
            or rec["run"] in tied
            or (verdict.startswith("stable") and rec["run"] in verdict)
        ), (verdict, rec)
        assert line.startswith(f"recommendation: clip with {describe_setting_at_lr(suggested.cell)} ")
    noise = rec.get("evidence", {}).get("noise", "")
    if noise.startswith("nothing"):
        # a judgement that rests on nothing is never called meaningful anywhere
        assert not any(c in verdict or c in reason for c in CLAIMS), (verdict, reason)
        if "meaningful" in verdict:
            assert f"noise judged by {noise}" in verdict
    if rec.get("evidence", {}).get("ranked_by") == "stability":
        assert "smoothed loss" not in verdict and "smoothed loss" not in reason
        assert ("judged on stability only" in verdict) == ("judged on stability only" in reason), (verdict, reason)
    return verdict, line, rec


# --- the contradictions met on real scripts ------------------------------------------------------


def test_one_evaluate_number_per_run_is_never_meaningfully_better():
    """word language model, one seed: the best line said "eval_metric 2.73; meaningfully better
    than unclipped: eval_metric 2.731" while the recommendation said no clipped setting was."""
    results = [
        run(None, eval_metric=2.731, eval_higher_is_better=False),
        run(1.0, losses=(1.0, 0.4, 0.2), eval_metric=2.73, eval_higher_is_better=False),
        run(10.0, eval_metric=2.74, eval_higher_is_better=False),
    ]
    verdict, line, rec = check_one_story(results)
    assert verdict == (
        "clipping not needed: unclipped is stable, eval_metric 2.731; no clipped setting is meaningfully better "
        "(best: max_norm=1 norm_type=2, eval_metric 2.73; noise judged by nothing, as one evaluate() number "
        "per run has no spread; run several --seeds to judge differences)"
    )
    assert rec["needs_clipping"] is False and rec["evidence"]["ranked_by"] == "eval_metric"
    assert "no clipped setting is meaningfully better (noise judged by nothing" in rec["reason"]


def test_two_perfect_scores_are_not_meaningfully_different():
    """MNIST: "1.207e-7 ... meaningfully better than ... 3.926e-7" (two perfect scores)."""
    results = [
        run(None, eval_metric=3.926e-7, eval_higher_is_better=False),
        run(1.0, eval_metric=1.207e-7, eval_higher_is_better=False),
    ]
    verdict, _, rec = check_one_story(results)
    assert verdict.startswith("clipping not needed: unclipped is stable, eval_metric 3.926e-7;")
    assert "meaningfully better than" not in verdict and rec["needs_clipping"] is False


def test_with_seeds_an_evaluate_difference_can_be_meaningful():
    """Over seeds the metric has a spread, and a clear difference is called meaningful, in both
    lines alike."""
    results = []
    for seed in (0, 1, 2):
        results.append(run(None, seed=seed, eval_metric=2.0 + 0.01 * seed, eval_higher_is_better=False))
        results.append(run(1.0, seed=seed, eval_metric=1.0 + 0.01 * seed, eval_higher_is_better=False))
    verdict, _, rec = check_one_story(results)
    assert "meaningfully better than unclipped: stable in every seed, mean eval_metric 2.01" in verdict
    assert "noise judged by the spread of the 3 seeds' evaluate() numbers" in verdict
    assert (
        rec["needs_clipping"] is False
        and "clipping is optional: clip_1_2 reaches a meaningfully better" in (rec["reason"])
    )


def test_a_gan_summed_loss_ranks_nothing():
    """GAN with train_step: "no clipping needed (the unclipped run is stable; clip_0.1_inf reaches a
    meaningfully lower smoothed loss (5.252 vs 6.335))"."""
    gan = ("discriminator", "generator")
    results = [
        run(None, losses=(6.3, 6.4, 6.3, 6.35), sites=gan),
        run(0.1, losses=(5.2, 5.3, 5.2, 5.25), p=math.inf, sites=gan),
        run(1.0, losses=(6.3, 6.4, 6.3, 6.35), sites=gan),
    ]
    verdict, line, rec = check_one_story(results)
    assert verdict == (
        "clipping not needed: unclipped is stable; stable too: clip_0.1_inf, clip_1_2; judged on stability only, "
        "as the loss sums the objectives of 2 clip sites (discriminator, generator) and measures no quality "
        "(define evaluate() to rank runs)"
    )
    assert line == (
        "recommendation: no clipping needed (the unclipped run is stable; judged on stability only, as the loss "
        "sums the objectives of 2 clip sites (discriminator, generator) and measures no quality (define "
        "evaluate() to rank runs))"
    )
    assert rec["evidence"]["ranked_by"] == "stability"


def test_a_gan_with_evaluate_is_ranked_by_it_and_an_unstable_one_is_judged_on_stability():
    gan = ("discriminator", "generator")
    ranked = [
        run(None, losses=(6.3, 6.4), sites=gan, eval_metric=0.3, eval_higher_is_better=False),
        run(0.1, losses=(5.2, 5.3), sites=gan, eval_metric=0.2, eval_higher_is_better=False),
    ]
    verdict, _, rec = check_one_story(ranked)
    assert rec["evidence"]["ranked_by"] == "eval_metric" and "eval_metric 0.3" in verdict
    unstable = [
        run(None, losses=(6.3, 900.0), status=DIVERGED, sites=gan),
        run(0.1, losses=(5.2, 5.3), sites=gan),
        run(1.0, losses=(6.2, 6.3), sites=gan),
        run(10.0, losses=(6.3, 900.0), status=DIVERGED, sites=gan),
    ]
    verdict, line, rec = check_one_story(unstable)
    assert verdict.startswith("stable: clip_0.1_2, clip_1_2; unclipped: diverged at step 2")
    assert (rec["needs_clipping"], rec["run"]) == (True, "clip_0.1_2")  # the largest margin to 10
    assert "judged on stability only" in rec["reason"] and "largest margin" in rec["reason"]


def test_a_clipped_run_meaningfully_better_than_a_stable_control_is_one_story():
    results = [run(None, losses=(0.51, 0.5, 0.49, 0.5)), run(1.0, losses=(0.31, 0.3, 0.29, 0.3))]
    verdict, line, rec = check_one_story(results)
    assert verdict.startswith("best: max_norm=1 norm_type=2 (stable, smoothed loss 0.3); meaningfully better than")
    assert rec["needs_clipping"] is False
    assert rec["reason"] == (
        "the unclipped run is stable; clipping is optional: clip_1_2 reaches a meaningfully lower smoothed loss "
        "(0.3 vs 0.5; noise judged by the spread of each run's last 10 losses)"
    )


# --- any sweep ---------------------------------------------------------------------------------

_STATUS = st.sampled_from([STABLE, STABLE, STABLE, DIVERGED, NON_FINITE, ERROR])
_LOSSES = st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    cells=st.lists(
        st.tuples(
            st.sampled_from([None, 0.01, 0.1, 1.0, 10.0]), _STATUS, _LOSSES, st.one_of(st.none(), st.floats(0, 5))
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda c: c[0],
    ),
    sites=st.sampled_from([(), ("step",), ("discriminator", "generator")]),
    evaluate=st.booleans(),
    higher=st.booleans(),
)
def test_every_sweep_tells_one_story(cells, sites, evaluate, higher):
    results = [
        run(
            m,
            losses=tuple(losses),
            status=status,
            sites=sites,
            eval_metric=metric if evaluate else None,
            eval_higher_is_better=higher if evaluate else None,
        )
        for m, status, losses, metric in cells
    ]
    check_one_story(results)


@settings(max_examples=100, deadline=None)
@given(
    cells=st.lists(
        st.tuples(st.sampled_from([None, 0.1, 1.0, 10.0]), st.lists(_STATUS, min_size=3, max_size=3), _LOSSES),
        min_size=1,
        max_size=4,
        unique_by=lambda c: c[0],
    ),
    metrics=st.one_of(st.none(), st.lists(st.floats(0, 5), min_size=12, max_size=12)),
)
def test_every_sweep_over_seeds_tells_one_story(cells, metrics):
    results = []
    for i, (m, statuses, losses) in enumerate(cells):
        for seed, status in enumerate(statuses):
            metric = metrics[3 * i + seed] if metrics is not None else None
            results.append(
                run(m, losses=tuple(losses), status=status, seed=seed, eval_metric=metric, eval_higher_is_better=False)
            )
    check_one_story(results)
