"""What a sweep's numbers mean: the explosion's origin, smoothed ranking within noise, the
stability boundary and the recommendation.

Pure functions over ``results.RunResult`` records: no torch, no printing, no files, so every rule
can be tested on constructed results and re-applied by ``gradclip report`` to files on disk.
Every rule is NaN-safe (non-finite numbers never win a comparison) and deterministic (ties go to
the earlier run of the sweep).

The rules, as the README states them:

* **Spike (the explosion's origin).** For every layer (group of parameters, see ``layers.py``)
  the *typical* norm at step t is the median of its finite norms at the steps before t. The
  spike step is the first step where some layer's norm exceeds ``spike_factor`` x its typical
  norm, judged once the layer has at least ``MIN_HISTORY`` earlier finite norms and a typical
  norm above 0; a non-finite norm there counts as a jump of infinite size. The spike parameter
  is the layer with the largest jump ratio at that step (the first one, in the model's order,
  among equals). Without per-layer norms the run's total norm is used and no parameter named.
* **Smoothed loss.** The mean of the last ``SMOOTH_STEPS`` finite losses of the run (the step
  that stopped an unstable run excluded), with their sample standard deviation as its noise.
* **No meaningful difference.** Two smoothed losses differ meaningfully only when they are more
  than ``NOISE_SE`` standard errors apart: ``|m_a - m_b| > 2 * sqrt(sd_a^2/n_a + sd_b^2/n_b)``
  (both need at least 2 losses). A script's ``evaluate`` metric is a single number per run and
  carries no spread, so differences in it are reported as they are.
* **Boundary.** Per norm type, the largest ``max_norm`` found stable and the smallest found
  unstable (``non_finite`` or ``diverged``; runs that raised are neither).
* **Refinement.** ``--refine K`` adds up to K runs per norm type, each at the geometric mean
  (the midpoint in log space) of the largest stable ``max_norm`` below the smallest unstable one
  and that unstable one, rounded to 3 significant digits; it stops early when the bracket cannot
  be split any further at that precision.
* **Recommendation.** See ``recommend``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from gradcheck_cli.results import DIVERGED, ERROR, MODE_NORM, NON_FINITE, STABLE, RunResult, format_norm_type, percentile

DEFAULT_SPIKE_FACTOR = 10.0
MIN_HISTORY = 3  # earlier finite norms a layer needs before a jump can be judged
SMOOTH_STEPS = 10  # the smoothed loss is the mean of this many last losses
NOISE_SE = 2.0  # a difference is meaningful beyond this many standard errors
REFINE_DIGITS = 3  # significant digits of a refined max_norm
UNSTABLE = (NON_FINITE, DIVERGED)


# --------------------------------------------------------------------------------------------
# The explosion's origin


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def find_spike(
    result: RunResult, factor: float = DEFAULT_SPIKE_FACTOR, min_history: int = MIN_HISTORY
) -> tuple[int | None, str | None]:
    """``(spike_step, spike_param)`` of the run by the spike rule (module docstring), or
    ``(None, None)`` when no layer ever jumped. ``spike_param`` is ``None`` when the run has no
    per-layer norms and the total norm was used."""
    use_layers = any(s.layers for s in result.steps)
    history: dict[str | None, list[float]] = {}
    for s in result.steps:
        series = s.layers if use_layers else ((None, s.grad_norm),)
        best_name, best_ratio = None, 0.0
        found = False
        for name, value in series:
            past = history.get(name)
            if past is not None and len(past) >= min_history:
                typical = _median(past)
                if typical > 0 and math.isfinite(typical):
                    ratio = value / typical if math.isfinite(value) else math.inf
                    if ratio > factor and (not found or ratio > best_ratio):
                        best_name, best_ratio, found = name, ratio, True
            if math.isfinite(value):
                bisect.insort(history.setdefault(name, []), value)
        if found:
            return s.step, best_name
    return None, None


def annotate_spike(result: RunResult, factor: float = DEFAULT_SPIKE_FACTOR) -> RunResult:
    """Set ``result.spike_step`` and ``result.spike_param`` by ``find_spike``; returns it."""
    result.spike_step, result.spike_param = find_spike(result, factor)
    return result


# --------------------------------------------------------------------------------------------
# Smoothed figures and noise


@dataclass(frozen=True)
class Smoothed:
    """The mean of a run's last ``n`` finite losses and their sample standard deviation."""

    mean: float
    sd: float
    n: int


def smoothed_loss(result: RunResult, k: int = SMOOTH_STEPS) -> Smoothed | None:
    """``Smoothed`` over the last ``k`` finite losses, the step that stopped the run excluded;
    ``None`` when there is none."""
    stop = result.stop_step()
    losses = [s.loss for s in result.steps if s.step != stop and math.isfinite(s.loss)][-k:]
    if not losses:
        return None
    n = len(losses)
    mean = math.fsum(x / n for x in losses)  # divided first: no overflow for losses near the float limit
    if n < 2:
        return Smoothed(mean, 0.0, n)
    # Centred and scaled by the largest deviation, so nothing overflows unless the spread
    # itself is beyond float range (then it is inf).
    deviations = [x - mean for x in losses]
    scale = max(abs(d) for d in deviations)
    if not math.isfinite(scale):
        return Smoothed(mean, math.inf, n)
    if scale == 0:
        return Smoothed(mean, 0.0, n)
    sd = scale * math.sqrt(math.fsum((d / scale) ** 2 for d in deviations) / (n - 1))
    return Smoothed(mean, sd, n)


def differ_meaningfully(a: Smoothed | None, b: Smoothed | None) -> bool:
    """``True`` when the two means are more than ``NOISE_SE`` standard errors apart. ``False``
    when either is missing, has fewer than 2 losses, or holds a non-finite number."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return False
    if not all(math.isfinite(x) for x in (a.mean, b.mean, a.sd, b.sd)):
        return False
    se = math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)
    return abs(a.mean - b.mean) > NOISE_SE * se


@dataclass(frozen=True)
class Ranking:
    """Stable runs ordered best first, and how: by ``eval_metric`` or by ``smoothed_loss``."""

    runs: list[RunResult]
    basis: str  # "eval_metric" or "smoothed_loss"
    higher_is_better: bool = False

    @property
    def best(self) -> RunResult | None:
        return self.runs[0] if self.runs else None

    def value(self, r: RunResult) -> float | None:
        if self.basis == "eval_metric":
            return r.eval_metric
        s = smoothed_loss(r)
        return s.mean if s else None

    def better(self, a: RunResult, b: RunResult) -> bool:
        """``a`` is meaningfully better than ``b`` (never on noise)."""
        va, vb = self.value(a), self.value(b)
        if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
            return False
        if self.basis == "eval_metric":
            return va > vb if self.higher_is_better else va < vb
        return va < vb and differ_meaningfully(smoothed_loss(a), smoothed_loss(b))

    def within_noise_of_best(self) -> list[RunResult]:
        """The runs after the best that are not meaningfully worse than it."""
        best = self.best
        return [r for r in self.runs[1:] if not self.better(best, r)] if best is not None else []


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def rank(runs: list[RunResult]) -> Ranking:
    """The stable runs among ``runs`` with a finite figure, best first. By ``eval_metric`` when
    every one of them has a finite one (direction from ``eval_higher_is_better``), else by the
    smoothed loss. Ties keep the sweep's order."""
    stable = [r for r in runs if r.status == STABLE]
    if stable and all(_finite(r.eval_metric) for r in stable):
        higher = bool(stable[0].eval_higher_is_better)
        ordered = sorted(stable, key=lambda r: -r.eval_metric if higher else r.eval_metric)
        return Ranking(ordered, "eval_metric", higher)
    scored = [(smoothed_loss(r), i, r) for i, r in enumerate(stable)]
    scored = [(s.mean, i, r) for s, i, r in scored if s is not None and math.isfinite(s.mean)]
    return Ranking([r for _, _, r in sorted(scored, key=lambda t: (t[0], t[1]))], "smoothed_loss")


# --------------------------------------------------------------------------------------------
# The stability boundary and its refinement


@dataclass(frozen=True)
class Boundary:
    """Per norm type: the largest ``max_norm`` found stable and the smallest found unstable."""

    norm_type: float
    largest_stable: float | None
    smallest_unstable: float | None

    @property
    def factor(self) -> float | None:
        """How precisely the boundary is located: smallest unstable / largest stable (when the
        stable one is the smaller, as expected); ``None`` otherwise."""
        a, b = self.largest_stable, self.smallest_unstable
        if a is None or b is None or not a < b:
            return None
        return b / a


def _clipped_by_norm_type(results: list[RunResult]) -> dict[float, list[RunResult]]:
    out: dict[float, list[RunResult]] = {}
    for r in results:
        if r.cell.mode == MODE_NORM:  # the adaptive rules have no max_norm to place on the axis
            out.setdefault(r.cell.norm_type, []).append(r)
    return out


def boundaries(results: list[RunResult]) -> list[Boundary]:
    """One ``Boundary`` per norm type of the clipped runs, in order of first appearance."""
    out = []
    for p, runs in _clipped_by_norm_type(results).items():
        stable = [r.cell.max_norm for r in runs if r.status == STABLE]
        unstable = [r.cell.max_norm for r in runs if r.status in UNSTABLE]
        out.append(Boundary(p, max(stable) if stable else None, min(unstable) if unstable else None))
    return out


def refine_bracket(results: list[RunResult], norm_type: float) -> tuple[float, float] | None:
    """``(a, b)``: ``b`` the smallest unstable ``max_norm`` of ``norm_type`` and ``a`` the
    largest stable one below it; ``None`` when there is no such pair."""
    runs = _clipped_by_norm_type(results).get(norm_type, [])
    unstable = [r.cell.max_norm for r in runs if r.status in UNSTABLE]
    if not unstable:
        return None
    b = min(unstable)
    below = [r.cell.max_norm for r in runs if r.status == STABLE and r.cell.max_norm < b]
    return (max(below), b) if below else None


def _round_sig(x: float, digits: int = REFINE_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def next_refine_max_norm(results: list[RunResult], norm_type: float) -> float | None:
    """The next bisection point for ``norm_type``: the log-space midpoint of
    ``refine_bracket``, rounded to ``REFINE_DIGITS`` significant digits; ``None`` when there is
    no bracket or it cannot be split any further (or that point was already run)."""
    bracket = refine_bracket(results, norm_type)
    if bracket is None:
        return None
    a, b = bracket
    mid = _round_sig(math.sqrt(a) * math.sqrt(b))  # no overflow for huge max_norms
    if not (a < mid < b):
        return None
    if any(r.cell.mode == MODE_NORM and r.cell.norm_type == norm_type and r.cell.max_norm == mid for r in results):
        return None
    return mid


# --------------------------------------------------------------------------------------------
# The recommendation


def onset(result: RunResult) -> int | None:
    """The first sign of trouble: the spike step or the step that stopped the run, if earlier."""
    steps = [s for s in (result.spike_step, result.stop_step()) if s is not None]
    return min(steps) if steps else None


def control_percentiles(control: RunResult, norm_type: float) -> dict:
    """p50, p90, p99 of the control's finite pre-clip norms in ``norm_type`` at the steps before
    its onset (all steps when there is none), and how many steps that is."""
    first_bad = onset(control)
    values = []
    for s in control.steps:
        if first_bad is not None and s.step >= first_bad:
            break
        v = s.grad_norm if norm_type == control.cell.norm_type else dict(s.norms).get(norm_type)
        if v is not None and math.isfinite(v):
            values.append(v)
    values.sort()
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "steps": len(values),
        "before_step": first_bad,
    }


@dataclass
class Recommendation:
    """What to do, with its evidence; ``as_json`` is ``recommendation.json``."""

    needs_clipping: bool | None
    run: RunResult | None = None  # the suggested setting's run
    reason: str = ""
    advice: str | None = None
    evidence: dict = field(default_factory=dict)

    @property
    def max_norm(self) -> float | None:
        return self.run.cell.max_norm if self.run is not None else None

    @property
    def norm_type(self) -> float | None:
        return self.run.cell.norm_type if self.run is not None else None

    def as_json(self) -> dict:
        out: dict = {"needs_clipping": self.needs_clipping}
        if self.run is not None:
            out["max_norm"] = self.max_norm
            out["norm_type"] = format_norm_type(self.norm_type)
            out["clip_mode"] = self.run.cell.mode
            out["clip_param"] = self.run.cell.param
            out["run"] = self.run.run
        out["reason"] = self.reason
        if self.advice:
            out["advice"] = self.advice
        out["evidence"] = self.evidence
        return out

    def line(self) -> str:
        """One line for the terminal, with the evidence."""
        if self.run is not None:
            ev = self.evidence.get("suggested", {})
            control = self.evidence.get("control", {})
            bound = self.evidence.get("boundary") or {}
            nt = format_norm_type(self.norm_type)
            from gradcheck_cli.report import describe_setting

            parts = [f"recommendation: clip with {describe_setting(self.run.cell)} ({self.run.run})"]
            pct = control.get("norm_percentiles", {})
            if pct.get("p50") is not None:
                n = pct["steps"]
                parts.append(
                    f"unclipped pre-clip {nt} norm over {n} step{'s' if n != 1 else ''} before its onset: "
                    f"p50 {_fmt(pct['p50'])}, p90 {_fmt(pct['p90'])}, p99 {_fmt(pct['p99'])}"
                )
            if ev.get("clipped_frac") is not None:
                parts.append(f"clips {100 * ev['clipped_frac']:.0f}% of steps")
            if self.run.cell.mode != MODE_NORM:
                parts.append("an adaptive rule: no max_norm boundary applies")
            elif (bound or {}).get("margin") is not None:
                parts.append(f"{_fmt(bound['margin'])}x below the smallest unstable max_norm ({_fmt(bound['smallest_unstable'])})")
            else:
                parts.append(f"no {nt}-norm max_norm above it was unstable")
            parts.append(f"final loss {_fmt(ev.get('final_loss'))} vs unclipped {_fmt(control.get('final_loss'))}")
            return "; ".join(parts) + f" ({self.reason})"
        if self.needs_clipping is False:
            return f"recommendation: no clipping needed ({self.reason})"
        line = f"recommendation: none ({self.reason})"
        return f"{line}; {self.advice}" if self.advice else line


def _past(status: str) -> str:
    return {DIVERGED: "diverged", NON_FINITE: "went non-finite"}.get(status, f"is {status}")


def _fmt(x) -> str:
    from gradcheck_cli.report import format_number

    return format_number(x)


def _json_num(x):
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _run_evidence(r: RunResult) -> dict:
    row = r.summary_row()
    return {
        "run": r.run,
        "status": r.status,
        "final_loss": _json_num(row["final_loss"]),
        "smoothed_loss": _json_num(row["smoothed_loss"]),
        "smoothed_loss_sd": _json_num(row["smoothed_loss_sd"]),
        "eval_metric": _json_num(r.eval_metric),
        "clipped_frac": _json_num(row["clipped_frac"]),
    }


def recommend(results: list[RunResult]) -> Recommendation:
    """The recommendation, by this rule (NaN-safe, deterministic, documented in the README):

    1. No control run, or it raised: ``needs_clipping`` is ``None`` (cannot be judged).
    2. The control is stable: ``needs_clipping`` is ``False``. (A clipped run meaningfully
       better than the control is named in the reason, but nothing is needed for stability.)
    3. The control is unstable: ``needs_clipping`` is ``True``. Candidates are the stable
       clipped runs, ranked by ``rank``; the best and every run within noise of it form the
       tied set, and of these the one with the largest margin to its norm type's boundary
       (smallest unstable ``max_norm`` / its ``max_norm``; infinite when nothing above it was
       unstable) is suggested; equal margins go to the better ranked. Only a run that was run
       and found stable can be suggested.
    4. Nothing stable: no suggestion; the advice says what to try (a ``max_norm`` below the
       smallest tried, a lower learning rate, or, when every run goes non-finite at the same
       step, the data or the loss at that step).
    """
    control = next((r for r in results if not r.cell.clipped), None)
    clipped = [r for r in results if r.cell.clipped]
    bounds = {b.norm_type: b for b in boundaries(results)}
    evidence: dict = {
        "boundaries": [
            {
                "norm_type": format_norm_type(b.norm_type),
                "largest_stable": b.largest_stable,
                "smallest_unstable": b.smallest_unstable,
                "factor": _json_num(b.factor),
            }
            for b in bounds.values()
        ]
    }
    if control is None or control.status == ERROR:
        why = "no control run" if control is None else "the unclipped control run raised an error"
        return Recommendation(None, reason=f"cannot judge: {why}", evidence=evidence)
    ranking = rank(clipped)
    evidence["ranked_by"] = ranking.basis + (" (higher is better)" if ranking.higher_is_better else "")
    evidence["control"] = _run_evidence(control)
    evidence["control"]["onset_step"] = onset(control)
    if control.status == STABLE:
        best = ranking.best
        if best is not None and ranking.basis == "smoothed_loss" and ranking.better(best, control):
            reason = (
                f"the unclipped run is stable; {best.run} reaches a meaningfully lower smoothed loss "
                f"({_fmt(ranking.value(best))} vs {_fmt(ranking.value(control))})"
            )
        else:
            reason = "the unclipped run is stable"
            if best is not None:
                reason += "; no clipped setting is meaningfully better"
        evidence["control"]["norm_percentiles"] = control_percentiles(control, control.cell.norm_type)
        return Recommendation(False, reason=reason, evidence=evidence)

    if ranking.best is None:
        return Recommendation(True, reason="no clipped setting was stable", advice=_advice(results), evidence=evidence)

    # Fixed thresholds first; an adaptive rule is suggested only when it is meaningfully better
    # than every stable fixed threshold, or when no fixed threshold is stable.
    fixed = rank([r for r in ranking.runs if r.cell.mode == MODE_NORM])
    rules = [r for r in ranking.runs if r.cell.mode != MODE_NORM]
    if fixed.best is not None:
        tied = [fixed.best] + fixed.within_noise_of_best()
    else:
        tied = [rules[0]]
    rule_wins = bool(rules) and (fixed.best is None or all(ranking.better(rules[0], r) for r in fixed.runs))

    def margin(r: RunResult) -> float:
        b = bounds.get(r.cell.norm_type)
        if r.cell.mode != MODE_NORM or b is None or b.smallest_unstable is None:
            return math.inf  # an adaptive rule has no max_norm to measure a margin from
        return b.smallest_unstable / r.cell.max_norm

    order = {id(r): i for i, r in enumerate(ranking.runs)}
    chosen = rules[0] if rule_wins else min(tied, key=lambda r: (-margin(r), order[id(r)]))
    if rule_wins:
        tied = [chosen]
    m = margin(chosen)
    evidence["control"]["norm_percentiles"] = control_percentiles(control, chosen.cell.norm_type)
    evidence["control"]["norm_percentiles"]["norm_type"] = format_norm_type(chosen.cell.norm_type)
    evidence["suggested"] = _run_evidence(chosen)
    b = bounds.get(chosen.cell.norm_type) if chosen.cell.mode == MODE_NORM else None
    evidence["boundary"] = None if b is None else {
        "norm_type": format_norm_type(b.norm_type),
        "largest_stable": b.largest_stable,
        "smallest_unstable": b.smallest_unstable,
        "margin": _json_num(m) if math.isfinite(m) else None,
    }
    evidence["within_noise"] = [r.run for r in tied if r is not chosen]
    if len(tied) > 1:
        reason = (
            f"the unclipped run {_past(control.status)}; {len(tied)} stable settings are within noise of the best "
            f"by {ranking.basis.replace('_', ' ')}, this one has the largest margin to the boundary"
        )
    elif rule_wins and fixed.best is not None:
        reason = (
            f"the unclipped run {_past(control.status)}; this adaptive rule is meaningfully better than every "
            f"stable fixed threshold by {ranking.basis.replace('_', ' ')}"
        )
    elif rule_wins:
        reason = f"the unclipped run {_past(control.status)}; no fixed threshold was stable, this adaptive rule was"
    else:
        reason = f"the unclipped run {_past(control.status)}; best stable setting by {ranking.basis.replace('_', ' ')}"
    return Recommendation(True, run=chosen, reason=reason, evidence=evidence)


def _advice(results: list[RunResult]) -> str:
    onsets = {r.nan_step for r in results if r.status == NON_FINITE}
    if results and all(r.status == NON_FINITE for r in results) and len(onsets) == 1:
        return (
            f"every run goes non-finite at step {onsets.pop()}, clipped or not: clipping cannot help; "
            "look at that step's data, loss or custom ops"
        )
    smallest = {}
    for r in results:
        if r.cell.mode == MODE_NORM:
            p = r.cell.norm_type
            smallest[p] = min(smallest.get(p, math.inf), r.cell.max_norm)
    if not smallest:
        return "run a sweep with some max_norm values, or a lower learning rate"
    tried = ", ".join(f"{m:g} ({format_norm_type(p)})" for p, m in smallest.items())
    m = min(smallest.values())
    return f"try max_norm values below the smallest tried ({tried}), e.g. --max-norm {m / 10:g},{m / 100:g}, or a lower learning rate (--lr)"
