"""Verdicts over plain numbers: is a value non-finite, has a run diverged.

Pure functions over Python floats, stdlib only, so the runner can judge every step from the
numbers it already gathered (the loss and the pre-clip total norm) without touching tensors.

Every comparison is written with NaN in mind. ``loss > k * first`` is ``False`` when ``loss`` is
NaN, so a plain "greater than" test would call a NaN run healthy; here non-finite values are a
separate verdict (``is_non_finite``) that the runner checks *first*, and ``is_diverged`` says
``False`` for anything it cannot judge rather than guessing.
"""

from __future__ import annotations

import math


def is_non_finite(x: float | None) -> bool:
    """``True`` for NaN, +inf and -inf. ``None`` (no value) is not non-finite."""
    if x is None:
        return False
    return not math.isfinite(x)


def is_finite(x: float | None) -> bool:
    """``True`` for a real, finite number; ``False`` for NaN, +-inf and ``None``."""
    return x is not None and math.isfinite(x)


def can_judge_divergence(first_loss: float | None) -> bool:
    """Divergence is measured as a ratio to the first step's loss, which only means something
    when that loss is finite and strictly positive.

    A first loss of 0 or below (a log-likelihood, a reward, a loss that already sits at its
    minimum) has no meaningful ratio: ``loss > k * first`` would call any small positive loss
    "diverged" when ``first`` is 0 and would invert the test when ``first`` is negative. Such
    runs are never judged diverged; they can still be judged non-finite.
    """
    return is_finite(first_loss) and first_loss > 0.0


def is_diverged(loss: float | None, first_loss: float | None, factor: float) -> bool:
    """``True`` when ``loss > factor * first_loss`` with both numbers finite and the first loss
    positive (see ``can_judge_divergence``).

    A NaN or infinite ``loss`` returns ``False`` here: it is a *non-finite* run, not a diverged
    one, and callers check ``is_non_finite`` before this. A non-finite or non-positive
    ``factor`` also returns ``False`` (nothing sensible to compare against).
    """
    if not is_finite(loss) or not can_judge_divergence(first_loss):
        return False
    if not is_finite(factor) or factor <= 0.0:
        return False
    return loss > factor * first_loss


def clip_coefficient(total_norm: float, max_norm: float, eps: float = 1e-6) -> float:
    """``min(max_norm / (total_norm + eps), 1.0)``: the factor ``clip_grad_norm_`` multiplies
    gradients by. ``1.0`` means nothing was clipped. NaN in gives NaN out."""
    if math.isnan(total_norm):
        return math.nan
    return min(max_norm / (total_norm + eps), 1.0)


def first_index(values, predicate) -> int | None:
    """Index of the first value for which ``predicate`` is true, or ``None``."""
    for i, v in enumerate(values):
        if predicate(v):
            return i
    return None
