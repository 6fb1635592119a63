"""Verdicts over plain numbers: is a value non-finite, has a run diverged, is training degenerate.

Pure functions over Python floats, stdlib only, so the runner can judge every step from the
numbers it already gathered (the loss and the pre-clip total norm) without touching tensors.
Non-finite is a verdict of its own, checked first, and ``is_diverged`` says ``False`` for
anything it cannot judge. See docs/diagnosis.md.
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


# --------------------------------------------------------------------------------------------
# Degenerate training: not an error, almost surely a mistake
# --------------------------------------------------------------------------------------------

ZERO_GRADIENTS = "zero_gradients"
CONSTANT_LOSS = "constant_loss"
FOREIGN_PARAMETERS = "foreign_parameters"
NO_MODEL_PARAMETERS = "no_model_parameters"
STEP1_LOSS_DIFFERS = "step1_loss_differs"  # written as "step1_loss_differs:<reference run>"

CLIP_ON_SCALED_GRADIENTS = "clip_on_scaled_gradients"  # written as "clip_on_scaled_gradients:<step>"
COMMAND_START_DIFFERS = "command_start_differs"  # written as "command_start_differs:<reference run>"
WARNING_TEXT = {
    ZERO_GRADIENTS: "every gradient was zero at every step: the loss does not depend on the trained parameters",
    CONSTANT_LOSS: "the loss never changed: nothing was learned",
    FOREIGN_PARAMETERS: "the optimizer holds parameters the model does not own (built from another model?)",
    NO_MODEL_PARAMETERS: "the optimizer holds none of the model's parameters: the model is never updated",
    CLIP_ON_SCALED_GRADIENTS: (
        "at step {ref} the script clipped while a GradScaler was active without unscaling first "
        "(scaler.unscale_(optimizer) before clipping): the clip acted on gradients multiplied by "
        "the loss scale, so it clipped far more than its max_norm says"
    ),
    COMMAND_START_DIFFERS: (
        "step 1 differs from run {ref}, although every run starts the command afresh with the same seed: "
        "the script reads something that changes from run to run (the clock, an unseeded source such as "
        "os.urandom, files an earlier run wrote), so the runs are not comparable step for step"
    ),
    STEP1_LOSS_DIFFERS: (
        "step 1's loss differs from that of run {ref}, although every run starts identical: "
        "the script carries state from one run into the next (a global, a counter, a cache)"
    ),
}


def clip_on_scaled_gradients_warning(step: int) -> str:
    return f"{CLIP_ON_SCALED_GRADIENTS}:{step}"


def command_start_warning(reference_run: str) -> str:
    return f"{COMMAND_START_DIFFERS}:{reference_run}"


def step1_warning(reference_run: str) -> str:
    return f"{STEP1_LOSS_DIFFERS}:{reference_run}"


def explain_warning(code: str) -> str:
    """The sentence for a warning code (``step1_loss_differs:unclipped`` names its run)."""
    name, _, ref = code.partition(":")
    text = WARNING_TEXT.get(name)
    if text is None:
        return code
    return text.format(ref=ref) if ref else text


def degenerate_training(losses: list[float], norms: list[float], norm_type: float) -> list[str]:
    """Warning codes for a run's numbers (losses and pre-clip norms of its recorded steps).

    ``zero_gradients``: every step's norm is exactly 0 (judged only for norm types >= 0, whose
    norm is 0 only when every gradient element is). ``constant_loss``: at least two steps and
    every loss identical. Runs that stopped on a non-finite value are judged on what they
    recorded; nothing is said about a run without steps."""
    found: list[str] = []
    finite_norms = [n for n in norms if not math.isnan(n)]
    if finite_norms and norm_type >= 0 and all(n == 0 for n in finite_norms):
        found.append(ZERO_GRADIENTS)
    if len(losses) >= 2 and all(is_finite(x) for x in losses) and all(x == losses[0] for x in losses):
        found.append(CONSTANT_LOSS)
    return found
