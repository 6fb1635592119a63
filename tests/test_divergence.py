"""The divergence rule (detect.Divergence, docs/diagnosis.md "Divergence") on plain numbers: a loss
against its own early steps whatever its sign and scale, the applied gradient norm against its
running median, evaluate() against the untrained model, and the words that say which one fired."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck_cli.detect import (
    EARLY_MIN,
    EVAL_COLLAPSED,
    Divergence,
    applied_norm,
    early_count,
    eval_collapsed,
    eval_collapsed_warning,
    explain_warning,
    loss_range,
    norm_level,
    step1_warning,
)
from gradcheck_cli.results import DIVERGED, Cell, RunResult, StepRecord
from gradcheck_cli.text import describe_result, eval_before

NAN, INF = math.nan, math.inf


def first_divergence(losses, factor=10.0, norms=None):
    """The 1-based step the rule stops at (loss first, then the applied norm), or None."""
    d = Divergence(factor)
    for i, loss in enumerate(losses):
        if d.loss_diverged(loss):
            return i + 1
        if norms is not None and d.norm_diverged(norms[i]):
            return i + 1
    return None


def test_early_steps_are_every_earlier_one_up_to_three_then_the_first_half():
    assert [early_count(i) for i in range(1, 12)] == [1, 2, 3, 3, 3, 3, 3, 4, 4, 5, 5]
    assert EARLY_MIN == 3


def test_the_exploding_rnn_is_diverged_at_step_2_and_clip_10_2_at_step_4():
    # the bundled recipe's losses (README): 1.789 then 3.457e7; clip_10_2 1.789, 11.62, 0.5827, 26.62
    assert first_divergence([1.789, 3.457e7]) == 2
    assert first_divergence([1.789, 11.62, 0.5827, 26.62]) == 4
    # clip_1_inf: a loss that jumps to 5x its first value and back trains on
    assert first_divergence([1.789, 9.149, 0.4979, 0.3044, 1.139, 0.4918, 0.177, 1.576, 4.4]) is None


def test_a_loss_with_a_level_diverges_above_k_plus_1_times_its_starting_level():
    r = loss_range([2.0, 1.0, 3.0, 0.5], 10.0)
    assert r.has_level and r.level == 2.0 and r.n == 3
    assert r.threshold == 2.0 + 10.0 * 2.0
    assert first_divergence([2.0, 1.0, 3.0, 0.5, 21.9]) is None
    assert first_divergence([2.0, 1.0, 3.0, 0.5, 22.1]) == 5
    # negative losses have a level too: above it by 10x its magnitude
    assert loss_range([-5.0, -4.0, -6.0], 10.0).threshold == -5.0 + 50.0


def test_a_loss_of_both_signs_has_only_its_spread():
    early = [-0.425, 0.587, 2.489, 0.787, -0.945, 1.149, -1.392, -1.991, 0.457, -1.197]
    r = loss_range(early + [0.0] * 10, 10.0)
    assert not r.has_level and r.n == 10
    assert r.threshold == pytest.approx(2.489 + 10 * (2.489 + 1.991))
    # a policy-gradient loss 16x its first value is nowhere near diverged
    assert first_divergence(early + [6.1, -8.0, 30.0]) is None
    assert first_divergence(early + [60.0]) == 11


def test_one_or_two_early_losses_judge_only_a_catastrophe():
    # a policy-gradient loss that starts at 0.004 and then swings by 0.7 (a CartPole trace)
    assert first_divergence([-0.004, 0.705, 0.62, -0.613]) is None
    assert first_divergence([0.0036, 0.705]) is None
    r = loss_range([1.0], 10.0)
    assert (r.margin, r.threshold) == (1000.0, 1001.0)
    assert loss_range([1.0, 2.0, 3.0], 10.0).margin == 10.0


def test_only_a_rise_is_judged_and_non_finite_values_are_not_judged_here():
    assert first_divergence([1.0, 0.5, 0.1, 1e-9, -1e9]) is None
    d = Divergence(10.0)
    assert not d.loss_diverged(1.0)
    assert not d.loss_diverged(NAN) and not d.loss_diverged(INF) and not d.loss_diverged(None)
    assert d.losses == [1.0]  # nothing non-finite was kept


def test_a_diverged_loss_is_not_kept_in_the_reference():
    d = Divergence(10.0)
    for x in (1.0, 1.0, 1.0):
        assert not d.loss_diverged(x)
    assert d.loss_diverged(50.0)
    assert d.losses == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("factor", [INF, NAN, 0.0, -1.0])
def test_an_unusable_factor_judges_nothing(factor):
    d = Divergence(factor)
    assert not d.active
    assert first_divergence([1.0, 1e30, 1e300], factor, norms=[1.0, 1.0, 1.0]) is None


def test_the_applied_norm_diverges_above_k_squared_times_its_running_median():
    assert norm_level([1.0, 2.0]) is None  # fewer than 3 earlier norms
    assert norm_level([1.0, 2.0, 3.0]) == 2.0
    assert norm_level([0.0, 0.0, 0.0]) is None  # a level of 0 has no ratio
    assert first_divergence([1.0] * 5, norms=[1.0, 2.0, 3.0, 200.0, 1.0]) is None
    assert first_divergence([1.0] * 5, norms=[1.0, 2.0, 3.0, 201.0, 1.0]) == 4
    # NaN (no coefficient: value or AGC clipping) is neither judged nor kept
    d = Divergence(10.0)
    assert not d.norm_diverged(NAN)
    assert not d.norms.get("")


def test_clip_sites_have_their_own_running_level():
    d = Divergence(10.0)
    for _ in range(3):
        assert not d.norm_diverged(0.01, "discriminator")
        assert not d.norm_diverged(10.0, "generator")
    assert not d.norm_diverged(50.0, "generator")
    assert d.norm_diverged(50.0, "discriminator")


def test_applied_norm_is_what_clip_grad_norm_leaves():
    assert applied_norm(5.0, None) == 5.0
    assert applied_norm(5.0, 1.0) == pytest.approx(1.0, rel=1e-6)
    assert applied_norm(0.5, 1.0) == 0.5


@given(losses=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30), power=st.integers(-20, 20))
def test_the_rule_is_invariant_to_the_loss_scale(losses, power):
    """Scaling a loss by a positive factor changes no verdict: no scale is assumed (powers of 2
    scale every float exactly, so the comparison is exact)."""
    assert first_divergence(losses) == first_divergence([x * 2.0**power for x in losses])


def test_eval_collapse_is_not_a_number_or_far_worse_than_the_untrained_model():
    assert eval_collapsed(22.0, NAN, True) and eval_collapsed(None, INF, False)
    assert eval_collapsed(22.0, 9.4, True)  # a policy that falls at once: worse by 12.6 > 11
    assert not eval_collapsed(22.0, 12.0, True)
    assert not eval_collapsed(22.0, 500.0, True)
    assert eval_collapsed(2.3, 3.5, False) and not eval_collapsed(2.3, 3.4, False)
    assert not eval_collapsed(None, 1.0, False) and not eval_collapsed(2.3, None, False)
    # an untrained metric of 0 gives no scale: only a metric that is not a number collapses then
    assert not eval_collapsed(0.0, -5.0, True) and not eval_collapsed(-0.0, 5.0, False)
    assert eval_collapsed(0.0, NAN, True)


def test_the_warnings_name_what_they_compared():
    assert step1_warning("unclipped") == "step1_loss_differs:unclipped"
    assert step1_warning("unclipped", "norm") == "step1_norm_differs:unclipped"
    assert "first clip call" in explain_warning(step1_warning("unclipped", "norm"))
    assert eval_collapsed_warning(22.0) == f"{EVAL_COLLAPSED}:22.0"
    assert eval_collapsed_warning(None) == f"{EVAL_COLLAPSED}:unknown"
    assert "(22.0)" in explain_warning(eval_collapsed_warning(22.0))


def run(cell, losses, norms, coefs, **kw):
    steps = [StepRecord(i, x, n, c) for i, (x, n, c) in enumerate(zip(losses, norms, coefs), start=1)]
    return RunResult(cell, DIVERGED, steps, **kw)


def test_describe_says_which_test_stopped_the_run():
    rnn = run(Cell(None), (1.789, 3.457e7), (65.7, NAN), (1.0, NAN), diverged_step=2)
    assert describe_result(rnn) == "diverged at step 2: loss 3.457e7 vs 1.789 at step 1"
    level = run(
        Cell(10.0), (1.789, 11.62, 0.5827, 26.62), (65.7, 925.8, 9.34, NAN), (0.15, 0.01, 1.0, NAN), diverged_step=4
    )
    assert describe_result(level) == "diverged at step 4: loss 26.62 vs 1.789 at the start (steps 1-3)"
    signed = run(Cell(None), (0.5, -1.0, 2.0, -0.5, 80.0), (1.0,) * 4 + (NAN,), (1.0,) * 4 + (NAN,), diverged_step=5)
    assert describe_result(signed) == "diverged at step 5: loss 80 vs -1 to 2 over steps 1-3"
    # the norm test stopped it: a norm recorded, no coefficient applied
    norm = run(Cell(None), (1.0, 1.0, 1.0, 1.0), (1.0, 2.0, 3.0, 600.0), (1.0, 1.0, 1.0, NAN), diverged_step=4)
    assert (
        describe_result(norm) == "diverged at step 4: gradient norm 600 about to be applied, 300x its running median 2"
    )
    clipped = run(Cell(10.0), (1.0,) * 4, (0.01, 0.02, 0.03, 600.0), (1.0, 1.0, 1.0, NAN), diverged_step=4)
    assert describe_result(clipped).startswith("diverged at step 4: gradient norm 10 about to be applied, 500x")


def test_describe_a_collapsed_metric_with_the_untrained_models():
    r = RunResult(
        Cell(None),
        DIVERGED,
        [StepRecord(1, 1.0, 1.0, 1.0)],
        eval_metric=9.4,
        eval_higher_is_better=True,
        warnings=(eval_collapsed_warning(22.0),),
    )
    assert eval_before(r) == 22.0
    assert describe_result(r) == "diverged: evaluate() gave 9.4 at the end, worse than 22 before training"
    r.warnings = (eval_collapsed_warning(None),)
    assert eval_before(r) is None
    assert describe_result(r) == "diverged: evaluate() gave 9.4 at the end"
