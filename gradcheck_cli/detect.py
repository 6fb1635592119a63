"""Verdicts over plain numbers: is a value non-finite, has a run diverged, is training degenerate.

Pure functions over Python floats, stdlib only, so the runner can judge every step from the
numbers it already gathered (the loss and the pre-clip total norm) without touching tensors.
Non-finite is a verdict of its own, checked first; divergence is judged against the run's own
early losses and its own running gradient norm (``Divergence``), whatever the loss's sign and
scale, and, with ``evaluate()``, against the untrained model's metric (``eval_collapsed``).
See docs/diagnosis.md ("Divergence").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def is_non_finite(x: float | None) -> bool:
    """``True`` for NaN, +inf and -inf. ``None`` (no value) is not non-finite."""
    if x is None:
        return False
    return not math.isfinite(x)


def is_finite(x: float | None) -> bool:
    """``True`` for a real, finite number; ``False`` for NaN, +-inf and ``None``."""
    return x is not None and math.isfinite(x)


def can_judge_divergence(first_loss: float | None) -> bool:
    """Whether ``is_diverged``'s ratio test means anything: the first loss is finite and
    strictly positive. (The sweep's own rule, ``Divergence``, needs no such condition.)"""
    return is_finite(first_loss) and first_loss > 0.0


def is_diverged(loss: float | None, first_loss: float | None, factor: float) -> bool:
    """The ratio test ``loss > factor * first_loss`` (both finite, the first loss positive), as
    ``GradMonitor`` applies it to a loop it does not own. ``False`` for a non-finite ``loss``
    (non-finite is its own verdict) and for a non-finite or non-positive ``factor``."""
    if not is_finite(loss) or not can_judge_divergence(first_loss):
        return False
    if not is_finite(factor) or factor <= 0.0:
        return False
    return loss > factor * first_loss


# --------------------------------------------------------------------------------------------
# Divergence: a run judged against its own early losses and its own gradient norm

EARLY_MIN = 3  # the early steps are at least the first 3 (all earlier ones before step 4) ...
EARLY_SHARE = 2  # ... and otherwise the first half of the steps before the judged one
NORM_HISTORY = 3  # earlier applied norms the norm test needs
EVAL_COLLAPSE = 0.5  # evaluate() worse than the untrained model by half its magnitude: collapsed


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n, mid = len(ordered), len(ordered) // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def early_count(step_index: int) -> int:
    """How many of the earliest finite losses are the reference for the ``step_index``-th one
    (counted from 0): all earlier ones up to ``EARLY_MIN``, then the first half."""
    return max(min(step_index, EARLY_MIN), step_index // EARLY_SHARE)


@dataclass(frozen=True)
class LossRange:
    """The reference a loss is judged against: the early losses' range and count, the run's
    starting level (the median of its first ``EARLY_MIN`` losses), and the threshold above which
    a loss has diverged with margin ``factor``."""

    low: float
    high: float
    level: float
    n: int
    factor: float

    @property
    def has_level(self) -> bool:
        """Every early loss has the same sign: the loss sits away from zero (cross-entropy,
        MSE, a negative log-likelihood), and its starting level is its scale. A loss whose early
        values take both signs (a policy gradient with normalised returns) has only its spread."""
        return (self.low > 0.0) or (self.high < 0.0)

    @property
    def margin(self) -> float:
        """``factor``; ``factor**3`` while fewer than ``EARLY_MIN`` early losses give the scale,
        which one or two numbers can underestimate a thousandfold (a policy-gradient loss that
        happens to start at 0.004): then only a catastrophe counts."""
        return self.factor if self.n >= EARLY_MIN else self.factor**3

    @property
    def threshold(self) -> float:
        """Above the starting level by ``margin`` times its magnitude (a loss with a level), or
        above the highest early loss by ``margin`` times the early range (a loss without one)."""
        if self.has_level:
            return self.level + self.margin * abs(self.level)
        return self.high + self.margin * (self.high - self.low)


def loss_range(earlier: list[float], factor: float) -> LossRange | None:
    """The reference for the next loss after the finite losses ``earlier`` (in step order);
    ``None`` before the first."""
    if not earlier:
        return None
    early = earlier[: early_count(len(earlier))]
    return LossRange(min(early), max(early), _median(early[:EARLY_MIN]), len(early), factor)


def norm_level(earlier: list[float]) -> float | None:
    """The running level of a run's applied gradient norm: the median of the earlier finite
    ones; ``None`` with fewer than ``NORM_HISTORY`` of them or a level of 0."""
    values = [v for v in earlier if math.isfinite(v)]
    if len(values) < NORM_HISTORY:
        return None
    level = _median(values)
    return level if level > 0.0 else None


@dataclass
class Divergence:
    """One run's divergence test, fed step by step (docs/diagnosis.md, "Divergence").

    ``factor`` is ``--divergence-factor`` (k): a loss diverges when it rises above its early
    range by more than k spreads (``LossRange``), an applied gradient norm when it exceeds k**2
    times its running median (``norm_level``). A non-finite or non-positive ``factor`` judges
    nothing (``active`` is ``False``). Non-finite values are not judged here: they are a verdict
    of their own, checked first."""

    factor: float
    losses: list[float] = field(default_factory=list)
    norms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return is_finite(self.factor) and self.factor > 0.0

    def loss_diverged(self, loss: float | None) -> bool:
        """Judge ``loss`` against the earlier losses, then keep it. ``None`` (a ``train_step``
        that returned no loss) and non-finite values are neither judged nor kept."""
        if not is_finite(loss):
            return False
        reference = loss_range(self.losses, self.factor) if self.active else None
        if reference is not None and loss > reference.threshold:
            return True
        self.losses.append(loss)
        return False

    def norm_diverged(self, applied: float, site: str = "") -> bool:
        """Judge the norm about to be applied (the pre-clip norm times the coefficient clipping
        applies) against the earlier ones of the same clip ``site``, then keep it. NaN (no
        coefficient: value and AGC clipping bound elements and units, not the total) is
        neither judged nor kept."""
        if not math.isfinite(applied):
            return False
        history = self.norms.setdefault(site, [])
        level = norm_level(history) if self.active else None
        if level is not None and applied > self.factor**2 * level:
            return True
        history.append(applied)
        return False


def applied_norm(norm: float, max_norm: float | None) -> float:
    """The total norm an update applies for a pre-clip ``norm``: all of it unclipped
    (``max_norm`` ``None``), else ``norm`` times ``clip_grad_norm_``'s coefficient."""
    return norm if max_norm is None else norm * clip_coefficient(norm, max_norm)


def eval_collapsed(before: float | None, after: float | None, higher_is_better: bool) -> bool:
    """``evaluate()`` at the end of a run has collapsed: it is not a finite number, or it is
    worse than the untrained model's ``before`` by more than ``EVAL_COLLAPSE`` times the
    magnitude of ``before`` (a policy's mean return falling from 22 to 9, a held-out loss
    doubling). The untrained model's value is the only scale there is: when it is unknown, not
    finite or exactly 0, only a metric that is not a number has collapsed."""
    if after is None:
        return False
    if not math.isfinite(after):
        return True
    if not is_finite(before) or before == 0.0:
        return False
    worse = before - after if higher_is_better else after - before
    return worse > EVAL_COLLAPSE * abs(before)


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
# train_step scripts: the pre-clip norm at the first clip call of step 1 (their loss may differ)
STEP1_NORM_DIFFERS = "step1_norm_differs"
EVAL_COLLAPSED = "eval_collapsed"  # written as "eval_collapsed:<the untrained model's metric>"

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
    STEP1_NORM_DIFFERS: (
        "the pre-clip gradient norm at step 1's first clip call differs from that of run {ref}, "
        "although every run starts identical: the script carries state from one run into the next "
        "(a global, a counter, a cache)"
    ),
    EVAL_COLLAPSED: (
        "evaluate() at the end is not a number or far worse than the untrained model's ({ref}): "
        "the metric collapsed, so the run counts as diverged"
    ),
}


def clip_on_scaled_gradients_warning(step: int) -> str:
    return f"{CLIP_ON_SCALED_GRADIENTS}:{step}"


def command_start_warning(reference_run: str) -> str:
    return f"{COMMAND_START_DIFFERS}:{reference_run}"


def step1_warning(reference_run: str, probe: str = "loss") -> str:
    """The fairness warning naming the run it differs from; ``probe`` is what was compared:
    step 1's ``loss``, or (``train_step`` scripts) the ``norm`` at step 1's first clip call."""
    return f"{STEP1_NORM_DIFFERS if probe == 'norm' else STEP1_LOSS_DIFFERS}:{reference_run}"


def eval_collapsed_warning(before: float | None) -> str:
    """The collapse warning, keeping the untrained model's metric (``unknown`` when it failed)."""
    return f"{EVAL_COLLAPSED}:{before!r}" if before is not None else f"{EVAL_COLLAPSED}:unknown"


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
