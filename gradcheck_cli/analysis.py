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
* **Across seeds and lrs (settings).** With several seeds or lrs, a *setting* is a clipping cell
  at one lr over its seeds (``settings_of``). It is stable only when it was run and found stable
  in every seed of the sweep, unstable when it went non-finite or diverged in any, and otherwise
  (a seed raised, crashed or was not run) neither (``setting_status``). Its figure is the mean
  over its seeds of each run's figure (the ``evaluate`` metric when every run ranked has a finite
  one, else the smoothed loss). With 2 or more seeds its noise is the spread of the per-seed
  figures: two settings differ meaningfully only when ``|m_a - m_b| > 2 * sqrt(s_a^2/n_a +
  s_b^2/n_b)``, ``m`` and ``s`` the mean and sample standard deviation of a setting's per-seed
  figures and ``n`` its number of seeds (``differ_meaningfully`` over seeds instead of steps; an
  ``evaluate`` metric has a spread here too). With one seed a setting is one run and the rule
  for runs above applies as it is. A setting is never called better on noise.
* **Boundary.** Per norm type (and lr), the largest ``max_norm`` found stable and the smallest
  found unstable (``non_finite`` or ``diverged``; runs that raised are neither); with several
  seeds a ``max_norm`` is stable only when stable in every seed and unstable when in any.
* **Refinement.** ``--refine K`` adds up to K ``max_norm``s per norm type (and lr; each run in
  every seed), each at the geometric mean (the midpoint in log space) of the largest stable
  ``max_norm`` below the smallest unstable one and that unstable one, rounded to 3 significant
  digits; it stops early when the bracket cannot be split any further at that precision.
* **Recommendation.** See ``recommend``; with several lrs it is judged at each lr and given at
  ``training_lr``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_NORM,
    NON_FINITE,
    STABLE,
    RunResult,
    format_norm_type,
    smoothed_loss,
)
from gradcheck_cli.settings import SettingOverSeeds, over_seeds, seeds_vary
from gradcheck_cli.stats import Smoothed, mean_sd, median, percentile
from gradcheck_cli.text import describe_setting_at_lr, format_number

DEFAULT_SPIKE_FACTOR = 10.0
MIN_HISTORY = 3  # earlier finite norms a layer needs before a jump can be judged
NOISE_SE = 2.0  # a difference is meaningful beyond this many standard errors
REFINE_DIGITS = 3  # significant digits of a refined max_norm
UNSTABLE = (NON_FINITE, DIVERGED)


# --------------------------------------------------------------------------------------------
# The explosion's origin


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
                typical = median(past)
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
# Settings: a clipping cell at an lr, over the seeds of the sweep


def sweep_seeds(results: list[RunResult]) -> list[int | None]:
    """The seeds of the sweep's runs, in order of first appearance (``[None]`` with one seed)."""
    return list(dict.fromkeys(r.cell.seed for r in results))


def settings_of(results: list[RunResult]) -> list[SettingOverSeeds]:
    """The runs grouped into settings: by ``Cell.setting`` when the seed varies, else one
    setting per run (so a one-seed sweep is judged run by run, exactly as always)."""
    if seeds_vary(results):
        return over_seeds(results)
    return [SettingOverSeeds(r.cell, [r]) for r in results]


def setting_status(setting: SettingOverSeeds, seeds: list[int | None]) -> str:
    """A run's own status for a one-run setting. Over several seeds: the first unstable seed's
    status (``non_finite``/``diverged``) when any seed is unstable; ``stable`` when a run of
    every seed in ``seeds`` was run and found stable; otherwise ``error`` (some seed raised,
    crashed or was not run: not judged)."""
    if len(setting.runs) == 1 and len(seeds) == 1:
        return setting.runs[0].status
    unstable = next((r for r in setting.runs if r.status in UNSTABLE), None)
    if unstable is not None:
        return unstable.status
    stable_seeds = {r.cell.seed for r in setting.runs if r.status == STABLE}
    return STABLE if all(seed in stable_seeds for seed in seeds) else ERROR


def _run_figure(r: RunResult, basis: str) -> float | None:
    if basis == "eval_metric":
        return r.eval_metric
    s = smoothed_loss(r)
    return s.mean if s else None


@dataclass(frozen=True)
class SettingRanking:
    """Settings stable in every seed, best first, and how they were ranked (``rank_settings``).

    A setting's figure is the mean over its seeds of each run's figure (``eval_metric``, or the
    smoothed loss), and its noise the spread of those per-seed figures; with one seed the noise
    is the single run's (``Ranking``)."""

    settings: list[SettingOverSeeds]
    basis: str  # "eval_metric" or "smoothed_loss"
    higher_is_better: bool = False

    @property
    def best(self) -> SettingOverSeeds | None:
        return self.settings[0] if self.settings else None

    def figure(self, setting: SettingOverSeeds) -> Smoothed | None:
        """Mean, sd and number of the per-seed figures; one run on the smoothed-loss basis: its
        ``smoothed_loss``. ``None`` when some seed has no finite figure."""
        values = [_run_figure(r, self.basis) for r in setting.runs]
        if not values or not all(_finite(v) for v in values):
            return None
        if len(values) == 1 and self.basis == "smoothed_loss":
            return smoothed_loss(setting.runs[0])
        return mean_sd(values)

    def value(self, setting: SettingOverSeeds) -> float | None:
        f = self.figure(setting)
        return f.mean if f is not None else None

    def better(self, a: SettingOverSeeds, b: SettingOverSeeds) -> bool:
        """``a`` is meaningfully better than ``b`` (never on noise): ahead by the figure, and
        more than ``NOISE_SE`` standard errors apart by ``differ_meaningfully`` (over the seeds'
        figures, or over the last losses with one seed). One seed on the ``evaluate`` metric has
        no spread: ahead is better, as for single runs."""
        fa, fb = self.figure(a), self.figure(b)
        if fa is None or fb is None or not (math.isfinite(fa.mean) and math.isfinite(fb.mean)):
            return False
        ahead = fa.mean > fb.mean if self.basis == "eval_metric" and self.higher_is_better else fa.mean < fb.mean
        if not ahead:
            return False
        if self.basis == "eval_metric" and len(a.runs) == 1 and len(b.runs) == 1:
            return True
        return differ_meaningfully(fa, fb)

    def within_noise_of_best(self) -> list[SettingOverSeeds]:
        """The settings after the best that are not meaningfully worse than it."""
        best = self.best
        return [g for g in self.settings[1:] if not self.better(best, g)] if best is not None else []


def rank_settings(settings: list[SettingOverSeeds], seeds: list[int | None]) -> SettingRanking:
    """The settings stable in every seed of ``seeds`` with a finite figure, best first. By
    ``eval_metric`` when every run of those settings has a finite one (direction from
    ``eval_higher_is_better``), else by the smoothed loss. Ties keep the sweep's order. For
    one-run settings this is ``rank`` exactly."""
    stable = [g for g in settings if setting_status(g, seeds) == STABLE]
    if stable and all(_finite(r.eval_metric) for g in stable for r in g.runs):
        higher = bool(stable[0].runs[0].eval_higher_is_better)
        ranking = SettingRanking([], "eval_metric", higher)
    else:
        ranking = SettingRanking([], "smoothed_loss")
    scored = [(ranking.value(g), i, g) for i, g in enumerate(stable)]
    scored = [(v, i, g) for v, i, g in scored if _finite(v)]
    sign = -1.0 if ranking.higher_is_better else 1.0
    ordered = [g for _, _, g in sorted(scored, key=lambda t: (sign * t[0], t[1]))]
    return SettingRanking(ordered, ranking.basis, ranking.higher_is_better)


# --------------------------------------------------------------------------------------------
# The stability boundary and its refinement


@dataclass(frozen=True)
class Boundary:
    """Per norm type (and lr, when the sweep varies it): the largest ``max_norm`` found stable
    and the smallest found unstable."""

    norm_type: float
    largest_stable: float | None
    smallest_unstable: float | None
    lr: float | None = None  # the lr axis value; None when the sweep has one lr

    @property
    def factor(self) -> float | None:
        """How precisely the boundary is located: smallest unstable / largest stable (when the
        stable one is the smaller, as expected); ``None`` otherwise."""
        a, b = self.largest_stable, self.smallest_unstable
        if a is None or b is None or not a < b:
            return None
        return b / a


def _clipped_by_axis(results: list[RunResult]) -> dict[tuple[float | None, float], list[RunResult]]:
    """The norm-clipped runs by (lr, norm type), in order of first appearance."""
    out: dict[tuple[float | None, float], list[RunResult]] = {}
    for r in results:
        if r.cell.mode == MODE_NORM:  # the adaptive rules have no max_norm to place on the axis
            out.setdefault((r.cell.lr, r.cell.norm_type), []).append(r)
    return out


def _max_norm_outcomes(runs: list[RunResult], seeds: list[int | None]) -> tuple[list[float], list[float]]:
    """(stable, unstable) ``max_norm``s among ``runs`` (one lr and norm type): stable when stable
    in every seed of ``seeds``, unstable when unstable in any; with one seed, each run as it is."""
    by_max_norm: dict[float, list[RunResult]] = {}
    for r in runs:
        by_max_norm.setdefault(r.cell.max_norm, []).append(r)
    stable, unstable = [], []
    for m, group in by_max_norm.items():
        status = setting_status(SettingOverSeeds(group[0].cell.setting, group), seeds)
        if status == STABLE:
            stable.append(m)
        elif status in UNSTABLE:
            unstable.append(m)
    return stable, unstable


def boundaries(results: list[RunResult]) -> list[Boundary]:
    """One ``Boundary`` per (lr, norm type) of the clipped runs, in order of first appearance;
    a ``max_norm`` counts as stable only when stable in every seed, unstable when in any."""
    seeds = sweep_seeds(results)
    out = []
    for (lr, p), runs in _clipped_by_axis(results).items():
        stable, unstable = _max_norm_outcomes(runs, seeds)
        out.append(Boundary(p, max(stable) if stable else None, min(unstable) if unstable else None, lr))
    return out


def refine_bracket(results: list[RunResult], norm_type: float, lr: float | None = None) -> tuple[float, float] | None:
    """``(a, b)`` at ``lr`` (the ``Cell.lr`` axis value, ``None`` with one lr): ``b`` the smallest
    unstable ``max_norm`` of ``norm_type`` and ``a`` the largest stable one below it, over the
    seeds as ``boundaries`` counts them; ``None`` when there is no such pair."""
    runs = _clipped_by_axis(results).get((lr, norm_type), [])
    stable, unstable = _max_norm_outcomes(runs, sweep_seeds([r for r in results if r.cell.lr == lr]))
    if not unstable:
        return None
    b = min(unstable)
    below = [m for m in stable if m < b]
    return (max(below), b) if below else None


def _round_sig(x: float, digits: int = REFINE_DIGITS) -> float:
    return float(f"{x:.{digits}g}")


def next_refine_max_norm(results: list[RunResult], norm_type: float, lr: float | None = None) -> float | None:
    """The next bisection point for ``norm_type`` at ``lr``: the log-space midpoint of
    ``refine_bracket``, rounded to ``REFINE_DIGITS`` significant digits; ``None`` when there is
    no bracket or it cannot be split any further (or that point was already run)."""
    bracket = refine_bracket(results, norm_type, lr)
    if bracket is None:
        return None
    a, b = bracket
    mid = _round_sig(math.sqrt(a) * math.sqrt(b))  # no overflow for huge max_norms
    if not (a < mid < b):
        return None
    if any(
        r.cell.mode == MODE_NORM and r.cell.norm_type == norm_type and r.cell.max_norm == mid and r.cell.lr == lr
        for r in results
    ):
        return None
    return mid


# --------------------------------------------------------------------------------------------
# The recommendation


def onset(result: RunResult) -> int | None:
    """The first sign of trouble: the spike step or the step that stopped the run, if earlier."""
    steps = [s for s in (result.spike_step, result.stop_step()) if s is not None]
    return min(steps) if steps else None


def _norms_before_onset(control: RunResult, norm_type: float) -> list[float]:
    first_bad = onset(control)
    values = []
    for s in control.steps:
        if first_bad is not None and s.step >= first_bad:
            break
        v = s.grad_norm if norm_type == control.cell.norm_type else dict(s.norms).get(norm_type)
        if v is not None and math.isfinite(v):
            values.append(v)
    return values


def control_percentiles(control: RunResult, norm_type: float) -> dict:
    """p50, p90, p99 of the control's finite pre-clip norms in ``norm_type`` at the steps before
    its onset (all steps when there is none), and how many steps that is."""
    values = sorted(_norms_before_onset(control, norm_type))
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "steps": len(values),
        "before_step": onset(control),
    }


def pooled_control_percentiles(controls: list[RunResult], norm_type: float) -> dict:
    """``control_percentiles`` over several seeds' control runs pooled: every seed's finite
    norms before that seed's own onset, together; ``before_step`` is the earliest onset (``None``
    when no seed had one) and ``seeds`` how many control runs were pooled."""
    values = sorted(v for c in controls for v in _norms_before_onset(c, norm_type))
    onsets = [step for step in (onset(c) for c in controls) if step is not None]
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "steps": len(values),
        "before_step": min(onsets) if onsets else None,
        "seeds": len(controls),
    }


def _several(setting: SettingOverSeeds | None) -> bool:
    return setting is not None and len(setting.runs) > 1


def _name(setting: SettingOverSeeds) -> str:
    """A one-run setting's run name; over several seeds, the setting's (``clip_1_2@lr=0.1``)."""
    return setting.cell.run if _several(setting) else setting.runs[0].run


@dataclass
class Recommendation:
    """What to do, with its evidence; ``as_json`` is ``recommendation.json``."""

    needs_clipping: bool | None
    run: RunResult | None = None  # the suggested setting's run (its first seed's with several seeds)
    reason: str = ""
    advice: str | None = None
    evidence: dict = field(default_factory=dict)
    setting: SettingOverSeeds | None = None  # the suggested setting, every seed's run
    lr: float | None = None  # with several lrs: the lr this recommendation is for
    lr_choice: str | None = None  # with several lrs: why that lr
    per_lr: list[dict] = field(default_factory=list)  # with several lrs: the verdict at each

    @property
    def max_norm(self) -> float | None:
        return self.run.cell.max_norm if self.run is not None else None

    @property
    def norm_type(self) -> float | None:
        return self.run.cell.norm_type if self.run is not None else None

    def _head(self) -> dict:
        out: dict = {"needs_clipping": self.needs_clipping}
        if self.lr_choice is not None:
            out["lr"] = self.lr
            out["lr_choice"] = self.lr_choice
        if self.run is not None:
            out["max_norm"] = self.max_norm
            out["norm_type"] = format_norm_type(self.norm_type)
            out["clip_mode"] = self.run.cell.mode
            out["clip_param"] = self.run.cell.param
            if _several(self.setting):
                out["run"] = self.setting.cell.run
                out["runs"] = [r.run for r in self.setting.runs]
            else:
                out["run"] = self.run.run
        out["reason"] = self.reason
        if self.advice:
            out["advice"] = self.advice
        return out

    def as_json(self) -> dict:
        out = self._head()
        out["evidence"] = self.evidence
        if self.per_lr:
            out["per_lr"] = self.per_lr
        return out

    def at_lr(self, lr: float | None) -> dict:
        """This lr's verdict in brief, one entry of ``per_lr``."""
        return {"lr": lr, **self._head(), "boundaries": self.evidence.get("boundaries", [])}

    def line(self) -> str:
        """One line for the terminal, with the evidence."""
        line = self._line()
        if self.lr_choice is not None:
            line += f"; at lr={format_number(self.lr)}: {self.lr_choice}"
        return line

    def _line(self) -> str:
        if self.run is not None:
            ev = self.evidence.get("suggested", {})
            control = self.evidence.get("control", {})
            bound = self.evidence.get("boundary") or {}
            nt = format_norm_type(self.norm_type)
            several = _several(self.setting)
            cell = self.run.cell
            if several:
                name = f"{self.setting.cell.run}, stable in all {len(self.setting.runs)} seeds"
            else:
                name = self.run.run
            parts = [f"recommendation: clip with {describe_setting_at_lr(cell)} ({name})"]
            pct = control.get("norm_percentiles", {})
            if pct.get("p50") is not None:
                n = pct["steps"]
                if pct.get("seeds", 1) > 1:
                    where = f"over {n} step{'s' if n != 1 else ''} of {pct['seeds']} seeds before their onsets"
                else:
                    where = f"over {n} step{'s' if n != 1 else ''} before its onset"
                parts.append(
                    f"unclipped pre-clip {nt} norm {where}: "
                    f"p50 {format_number(pct['p50'])}, p90 {format_number(pct['p90'])}, p99 {format_number(pct['p99'])}"
                )
            if ev.get("clipped_frac") is not None:
                parts.append(
                    f"clips {100 * ev['clipped_frac']:.0f}% of steps" + (" (mean over the seeds)" if several else "")
                )
            if self.run.cell.mode != MODE_NORM:
                parts.append("an adaptive rule: no max_norm boundary applies")
            elif (bound or {}).get("margin") is not None:
                parts.append(
                    f"{format_number(bound['margin'])}x below the smallest unstable max_norm ({format_number(bound['smallest_unstable'])})"
                )
            else:
                parts.append(f"no {nt}-norm max_norm above it was unstable")
            parts.append(
                f"final loss {format_number(ev.get('final_loss'))} vs unclipped {format_number(control.get('final_loss'))}"
                + (" (means over the seeds)" if several else "")
            )
            return "; ".join(parts) + f" ({self.reason})"
        if self.needs_clipping is False:
            return f"recommendation: no clipping needed ({self.reason})"
        line = f"recommendation: none ({self.reason})"
        return f"{line}; {self.advice}" if self.advice else line


def _past(status: str) -> str:
    return {DIVERGED: "diverged", NON_FINITE: "went non-finite"}.get(status, f"is {status}")


def _control_past(control: SettingOverSeeds, status: str) -> str:
    """``diverged``; over several seeds ``diverged in 2 of 3 seeds`` (``went unstable`` when the
    unstable seeds differ in how)."""
    if not _several(control):
        return _past(status)
    unstable = [r.status for r in control.runs if r.status in UNSTABLE]
    how = _past(unstable[0]) if len(set(unstable)) == 1 else "went unstable"
    return f"{how} in {len(unstable)} of {len(control.runs)} seeds"


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


def _mean_over_seeds(values: list) -> float | None:
    """The mean of the seeds' values, ``None`` unless every one is a finite number."""
    if not values or not all(_finite(v) for v in values):
        return None
    return mean_sd(values).mean


def _setting_evidence(setting: SettingOverSeeds, seeds: list[int | None]) -> dict:
    """``_run_evidence`` of a one-run setting; over several seeds, the means of the seeds'
    figures (``null`` unless every seed has a finite one), the spread of their smoothed losses,
    and every seed's own evidence."""
    if not _several(setting):
        return _run_evidence(setting.runs[0])
    rows = [r.summary_row() for r in setting.runs]
    smoothed = [row["smoothed_loss"] for row in rows]
    spread = mean_sd(smoothed).sd if all(_finite(v) for v in smoothed) else None
    return {
        "run": setting.cell.run,
        "status": setting_status(setting, seeds),
        "stable_seeds": setting.n_stable,
        "seeds": len(setting.runs),
        "final_loss": _json_num(_mean_over_seeds([row["final_loss"] for row in rows])),
        "smoothed_loss": _json_num(_mean_over_seeds(smoothed)),
        "smoothed_loss_sd_over_seeds": _json_num(spread),
        "eval_metric": _json_num(_mean_over_seeds([r.eval_metric for r in setting.runs])),
        "clipped_frac": _json_num(_mean_over_seeds([row["clipped_frac"] for row in rows])),
        "per_seed": [_run_evidence(r) for r in setting.runs],
    }


def _setting_onset(setting: SettingOverSeeds) -> int | None:
    onsets = [step for step in (onset(r) for r in setting.runs) if step is not None]
    return min(onsets) if onsets else None


def _percentiles(control: SettingOverSeeds, norm_type: float) -> dict:
    if _several(control):
        return pooled_control_percentiles(control.runs, norm_type)
    return control_percentiles(control.runs[0], norm_type)


def best_settings(ranking: SettingRanking) -> tuple[SettingOverSeeds | None, SettingOverSeeds | None]:
    """(the best clipped setting, the best unclipped one) of ``ranking``; ``None`` for none."""
    clipped = next((g for g in ranking.settings if g.cell.clipped), None)
    control = next((g for g in ranking.settings if not g.cell.clipped), None)
    return clipped, control


def training_lr(results: list[RunResult]) -> tuple[float | None, str]:
    """The lr a sweep over several lrs recommends at, and why: the lr of the best stable
    setting of the whole sweep as the verdict names it (the best clipped setting when it is
    meaningfully better than the best unclipped one, else that unclipped one); when nothing is
    stable at any lr, the smallest lr."""
    seeds = sweep_seeds(results)
    ranking = rank_settings(settings_of(results), seeds)
    clipped, control = best_settings(ranking)
    by = ranking.basis.replace("_", " ") + (" (higher is better)" if ranking.higher_is_better else "")
    if control is not None and (clipped is None or not ranking.better(clipped, control)):
        return control.cell.lr, f"the lr of the best stable setting by {by} (unclipped)"
    if clipped is not None:
        return clipped.cell.lr, f"the lr of the best stable setting by {by}"
    lrs = [r.cell.lr for r in results if r.cell.lr is not None]
    return (min(lrs) if lrs else None), "no setting was stable at any lr: the smallest lr"


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

    With several seeds the same rule holds for settings (``settings_of``): a control or a
    clipped setting is stable only when stable in every seed (``setting_status``), unstable
    when unstable in any, and cannot be judged when some seed raised, crashed or was not run;
    settings are ranked by ``rank_settings`` (noise across the seeds); the boundary is
    ``boundaries``' over the seeds; the control's norm percentiles pool every seed's control
    (``pooled_control_percentiles``). With several lrs the rule is applied at each lr on its own
    runs (``per_lr``) and the recommendation is the one at ``training_lr``.
    """
    lrs = list(dict.fromkeys(r.cell.lr for r in results))
    if len(lrs) <= 1:
        return _recommend_at(results)
    per = {lr: _recommend_at([r for r in results if r.cell.lr == lr]) for lr in lrs}
    per_lr = [rec.at_lr(at) for at, rec in per.items()]
    lr, why = training_lr(results)
    chosen = per[lr]
    chosen.lr, chosen.lr_choice, chosen.per_lr = lr, why, per_lr
    return chosen


def _recommend_at(results: list[RunResult]) -> Recommendation:
    """``recommend``'s rule on the runs of one lr."""
    seeds = sweep_seeds(results)
    several_seeds = len(seeds) > 1
    settings = settings_of(results)
    control = next((g for g in settings if not g.cell.clipped), None)
    clipped = [g for g in settings if g.cell.clipped]
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
    status = setting_status(control, seeds) if control is not None else None
    if control is None or status == ERROR:
        if control is None:
            why = "no control run"
        elif _several(control):
            why = "the unclipped control run did not finish in every seed (it raised, crashed or was not run)"
        else:
            why = "the unclipped control run raised an error"
        return Recommendation(None, reason=f"cannot judge: {why}", evidence=evidence)
    ranking = rank_settings(clipped, seeds)
    evidence["ranked_by"] = ranking.basis + (" (higher is better)" if ranking.higher_is_better else "")
    evidence["control"] = _setting_evidence(control, seeds)
    evidence["control"]["onset_step"] = _setting_onset(control)
    by = ranking.basis.replace("_", " ")
    if status == STABLE:
        best = ranking.best
        every = " in every seed" if several_seeds else ""
        # with one seed an evaluate metric has no spread: only the smoothed loss can be meaningfully better
        judged = ranking.basis == "smoothed_loss" or several_seeds
        if best is not None and judged and ranking.better(best, control):
            lower = "lower smoothed loss" if ranking.basis == "smoothed_loss" else "better eval_metric"
            over = " over the seeds" if several_seeds else ""
            reason = (
                f"the unclipped run is stable{every}; {_name(best)} reaches a meaningfully {lower}{over} "
                f"({format_number(ranking.value(best))} vs {format_number(ranking.value(control))})"
            )
        else:
            reason = f"the unclipped run is stable{every}"
            if best is not None:
                reason += "; no clipped setting is meaningfully better"
        evidence["control"]["norm_percentiles"] = _percentiles(control, control.cell.norm_type)
        return Recommendation(False, reason=reason, evidence=evidence)

    if ranking.best is None:
        reason = "no clipped setting was stable" + (" in every seed" if several_seeds else "")
        return Recommendation(True, reason=reason, advice=_advice(results), evidence=evidence)

    # Fixed thresholds first; an adaptive rule is suggested only when it is meaningfully better
    # than every stable fixed threshold, or when no fixed threshold is stable.
    fixed = rank_settings([g for g in ranking.settings if g.cell.mode == MODE_NORM], seeds)
    rules = [g for g in ranking.settings if g.cell.mode != MODE_NORM]
    if fixed.best is not None:
        tied = [fixed.best] + fixed.within_noise_of_best()
    else:
        tied = [rules[0]]
    rule_wins = bool(rules) and (fixed.best is None or all(ranking.better(rules[0], g) for g in fixed.settings))

    def margin(g: SettingOverSeeds) -> float:
        b = bounds.get(g.cell.norm_type)
        if g.cell.mode != MODE_NORM or b is None or b.smallest_unstable is None:
            return math.inf  # an adaptive rule has no max_norm to measure a margin from
        return b.smallest_unstable / g.cell.max_norm

    order = {id(g): i for i, g in enumerate(ranking.settings)}
    chosen = rules[0] if rule_wins else min(tied, key=lambda g: (-margin(g), order[id(g)]))
    if rule_wins:
        tied = [chosen]
    m = margin(chosen)
    evidence["control"]["norm_percentiles"] = _percentiles(control, chosen.cell.norm_type)
    evidence["control"]["norm_percentiles"]["norm_type"] = format_norm_type(chosen.cell.norm_type)
    evidence["suggested"] = _setting_evidence(chosen, seeds)
    b = bounds.get(chosen.cell.norm_type) if chosen.cell.mode == MODE_NORM else None
    evidence["boundary"] = (
        None
        if b is None
        else {
            "norm_type": format_norm_type(b.norm_type),
            "largest_stable": b.largest_stable,
            "smallest_unstable": b.smallest_unstable,
            "margin": _json_num(m) if math.isfinite(m) else None,
        }
    )
    evidence["within_noise"] = [_name(g) for g in tied if g is not chosen]
    past = _control_past(control, status)
    if len(tied) > 1:
        reason = (
            f"the unclipped run {past}; {len(tied)} stable settings are within noise of the best "
            f"by {by}, this one has the largest margin to the boundary"
        )
    elif rule_wins and fixed.best is not None:
        reason = (
            f"the unclipped run {past}; this adaptive rule is meaningfully better than every "
            f"stable fixed threshold by {by}"
        )
    elif rule_wins:
        reason = f"the unclipped run {past}; no fixed threshold was stable, this adaptive rule was"
    else:
        reason = f"the unclipped run {past}; best stable setting by {by}"
    return Recommendation(True, run=chosen.runs[0], reason=reason, evidence=evidence, setting=chosen)


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
