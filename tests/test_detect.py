import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradcheck_cli.detect import (
    can_judge_divergence,
    clip_coefficient,
    first_index,
    is_diverged,
    is_finite,
    is_non_finite,
)

NAN, INF = math.nan, math.inf
finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("x", [NAN, INF, -INF])
def test_non_finite_values(x):
    assert is_non_finite(x)
    assert not is_finite(x)


@pytest.mark.parametrize("x", [0.0, -0.0, 1.0, -3.5, 1e308, -1e308, 5e-324])
def test_finite_values(x):
    assert not is_non_finite(x)
    assert is_finite(x)


def test_none_is_neither_finite_nor_non_finite():
    assert not is_non_finite(None)
    assert not is_finite(None)


def test_diverged_is_strictly_greater_than_factor_times_first():
    assert is_diverged(10.5, 1.0, 10.0)
    assert not is_diverged(10.0, 1.0, 10.0)
    assert not is_diverged(2.0, 1.0, 10.0)


def test_nan_loss_is_not_diverged_but_non_finite():
    # the trap: `nan > k * first` is False, so NaN must be its own verdict
    assert not (NAN > 10.0 * 1.0)
    assert not is_diverged(NAN, 1.0, 10.0)
    assert is_non_finite(NAN)


@pytest.mark.parametrize("loss", [INF, -INF])
def test_infinite_loss_is_non_finite_not_diverged(loss):
    assert not is_diverged(loss, 1.0, 10.0)
    assert is_non_finite(loss)


@pytest.mark.parametrize("first", [0.0, -0.0, -1.0, -1e-12, NAN, INF, -INF, None])
def test_divergence_is_not_judged_without_a_positive_finite_first_loss(first):
    assert not can_judge_divergence(first)
    assert not is_diverged(1e30, first, 10.0)


@pytest.mark.parametrize("factor", [NAN, INF, 0.0, -2.0])
def test_unusable_factor_never_diverges(factor):
    assert not is_diverged(1e30, 1.0, factor)


@given(loss=finite, first=positive, factor=st.floats(min_value=1.0, max_value=1e6))
def test_diverged_matches_plain_comparison_for_finite_numbers(loss, first, factor):
    assert is_diverged(loss, first, factor) == (loss > factor * first)


def test_clip_coefficient_formula():
    assert clip_coefficient(10.0, 1.0) == 1.0 / (10.0 + 1e-6)
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(0.0, 1.0) == 1.0
    assert math.isnan(clip_coefficient(NAN, 1.0))
    assert clip_coefficient(INF, 1.0) == 0.0


@given(norm=st.floats(min_value=0.0, max_value=1e30), max_norm=positive)
def test_clip_coefficient_bounds_the_clipped_norm(norm, max_norm):
    coef = clip_coefficient(norm, max_norm)
    assert 0.0 <= coef <= 1.0
    assert coef * norm <= max_norm * (1 + 1e-12)
    if norm + 1e-6 <= max_norm:
        assert coef == 1.0
    else:
        assert coef == max_norm / (norm + 1e-6)


def test_first_index():
    assert first_index([1.0, 2.0, NAN, INF], is_non_finite) == 2
    assert first_index([1.0, 2.0], is_non_finite) is None
    assert first_index([], is_non_finite) is None
