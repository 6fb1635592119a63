"""The recommendation: whether the sweep says to clip, with what, and the evidence for it.

Built on the rules of ``analysis`` (ranking within noise, settings over seeds, the boundary):
``recommend`` applies them per lr, picks the safest of the equally good settings and gathers the
evidence that ``recommendation.json`` and the terminal line show; ``what_to_try`` is the advice
when nothing clipped was stable. Pure functions: no torch, no printing, no files.
See docs/diagnosis.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradcheck_cli.analysis import (
    BASIS_STABILITY,
    UNSTABLE,
    Boundary,
    SettingRanking,
    best_settings,
    boundaries,
    rank_settings,
    setting_status,
    settings_of,
    summed_loss_text,
    sweep_seeds,
)
from gradcheck_cli.detect import is_finite
from gradcheck_cli.results import DIVERGED, ERROR, MODE_NORM, NON_FINITE, STABLE, RunResult, format_norm_type
from gradcheck_cli.settings import SettingOverSeeds
from gradcheck_cli.stats import mean_sd, percentile
from gradcheck_cli.text import describe_setting_at_lr, format_number


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
    if not values or not all(is_finite(v) for v in values):
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
    spread = mean_sd(smoothed).sd if all(is_finite(v) for v in smoothed) else None
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


def training_lr(results: list[RunResult]) -> tuple[float | None, str]:
    """The lr a sweep over several lrs recommends at, and why: the lr of the best stable
    setting of the whole sweep as the verdict names it (the best clipped setting when it is
    meaningfully better than the best unclipped one, else that unclipped one; judged on
    stability alone, the first stable setting of the sweep); when nothing is stable at any lr,
    the smallest lr."""
    seeds = sweep_seeds(results)
    ranking = rank_settings(settings_of(results), seeds)
    clipped, control = best_settings(ranking)
    by = (
        "the lr of the first stable setting (judged on stability only)"
        if ranking.basis == BASIS_STABILITY
        else f"the lr of the best stable setting by {ranking.by}"
    )
    if control is not None and (clipped is None or not ranking.better(clipped, control)):
        return control.cell.lr, f"{by} (unclipped)"
    if clipped is not None:
        return clipped.cell.lr, by
    lrs = [r.cell.lr for r in results if r.cell.lr is not None]
    return (min(lrs) if lrs else None), "no setting was stable at any lr: the smallest lr"


def recommend(results: list[RunResult]) -> Recommendation:
    """The recommendation, by this rule (NaN-safe, deterministic, documented in docs/diagnosis.md):

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
    settings = settings_of(results)
    control = next((g for g in settings if not g.cell.clipped), None)
    clipped = [g for g in settings if g.cell.clipped]
    bounds = {b.norm_type: b for b in boundaries(results)}
    evidence: dict = {"boundaries": [_boundary_evidence(b) for b in bounds.values()]}
    status = setting_status(control, seeds) if control is not None else None
    if control is None or status == ERROR:
        if control is None:
            why = "no control run"
        elif _several(control):
            why = "the unclipped control run did not finish in every seed (it raised, crashed or was not run)"
        else:
            why = "the unclipped control run raised an error"
        return Recommendation(None, reason=f"cannot judge: {why}", evidence=evidence)
    # ranked with the control, so that the basis is the one the verdict line uses
    ranking = rank_settings(settings, seeds).among(clipped)
    evidence["ranked_by"] = ranking.basis + (" (higher is better)" if ranking.higher_is_better else "")
    evidence["noise"] = ranking.noise
    evidence["control"] = _setting_evidence(control, seeds)
    evidence["control"]["onset_step"] = _setting_onset(control)
    if status == STABLE:
        return _control_stable(control, ranking, len(seeds) > 1, evidence)
    if ranking.best is None:
        reason = "no clipped setting was stable" + (" in every seed" if len(seeds) > 1 else "")
        return Recommendation(True, reason=reason, advice=what_to_try(results), evidence=evidence)
    return _suggest(control, status, ranking, seeds, bounds, evidence)


def _boundary_evidence(b: Boundary) -> dict:
    return {
        "norm_type": format_norm_type(b.norm_type),
        "largest_stable": b.largest_stable,
        "smallest_unstable": b.smallest_unstable,
        "factor": _json_num(b.factor),
    }


def _control_stable(
    control: SettingOverSeeds, ranking: SettingRanking, several_seeds: bool, evidence: dict
) -> Recommendation:
    """Rule 2 of ``recommend``: the control is stable, nothing is needed; the reason names a
    clipped setting meaningfully better than the control, if there is one (clipping with it is
    optional), and otherwise what "meaningfully" would have rested on."""
    best = ranking.best
    every = " in every seed" if several_seeds else ""
    reason = f"the unclipped run is stable{every}"
    if best is not None and ranking.better(best, control):
        lower = "lower smoothed loss" if ranking.basis == "smoothed_loss" else "better eval_metric"
        over = " over the seeds" if several_seeds else ""
        reason += (
            f"; clipping is optional: {_name(best)} reaches a meaningfully {lower}{over} "
            f"({format_number(ranking.value(best))} vs {format_number(ranking.value(control))}; "
            f"noise judged by {ranking.noise})"
        )
    elif ranking.basis == BASIS_STABILITY and best is not None:
        reason += f"; judged on stability only, as {summed_loss_text(list(ranking.objectives))}"
    elif best is not None:
        reason += "; no clipped setting is meaningfully better"
        if not _judged(ranking):
            reason += f" (noise judged by {ranking.noise})"
    evidence["control"]["norm_percentiles"] = _percentiles(control, control.cell.norm_type)
    return Recommendation(False, reason=reason, evidence=evidence)


def _judged(ranking: SettingRanking) -> bool:
    """Whether "meaningfully better" can be judged at all: not on stability alone, nor on one
    ``evaluate`` number per setting."""
    return ranking.basis == "smoothed_loss" or (ranking.basis == "eval_metric" and ranking.seeds > 1)


def _margin(g: SettingOverSeeds, bounds: dict[float, Boundary]) -> float:
    """Smallest unstable ``max_norm`` of the setting's norm type over its ``max_norm``; infinite
    when nothing above it was unstable, and for an adaptive rule (no ``max_norm`` to measure from)."""
    b = bounds.get(g.cell.norm_type)
    if g.cell.mode != MODE_NORM or b is None or b.smallest_unstable is None:
        return math.inf
    return b.smallest_unstable / g.cell.max_norm


def _choose(
    ranking: SettingRanking, bounds: dict[float, Boundary]
) -> tuple[SettingOverSeeds, list[SettingOverSeeds], bool, bool]:
    """(the suggested setting, the settings tied with it, whether an adaptive rule won, whether
    any fixed threshold was stable). Fixed thresholds first: of the best and those within noise
    of it, the largest margin to the boundary wins (equal margins: the better ranked). An adaptive
    rule is suggested only when it is meaningfully better than every stable fixed threshold, or
    when no fixed threshold is stable."""
    fixed = ranking.among([g for g in ranking.settings if g.cell.mode == MODE_NORM])
    rules = [g for g in ranking.settings if g.cell.mode != MODE_NORM]
    if fixed.best is not None:
        tied = [fixed.best] + fixed.within_noise_of_best()
    else:
        tied = [rules[0]]
    rule_wins = bool(rules) and (fixed.best is None or all(ranking.better(rules[0], g) for g in fixed.settings))
    order = {id(g): i for i, g in enumerate(ranking.settings)}
    chosen = rules[0] if rule_wins else min(tied, key=lambda g: (-_margin(g, bounds), order[id(g)]))
    if rule_wins:
        tied = [chosen]
    return chosen, tied, rule_wins, fixed.best is not None


def _suggest(
    control: SettingOverSeeds,
    status: str,
    ranking: SettingRanking,
    seeds: list[int | None],
    bounds: dict[float, Boundary],
    evidence: dict,
) -> Recommendation:
    """Rule 3 of ``recommend``: the control is unstable and some clipped setting is stable."""
    chosen, tied, rule_wins, any_fixed = _choose(ranking, bounds)
    m = _margin(chosen, bounds)
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
    by = ranking.basis.replace("_", " ")
    if ranking.basis == BASIS_STABILITY:
        reason = f"the unclipped run {past}; judged on stability only, as {summed_loss_text(list(ranking.objectives))}"
        if len(tied) > 1:
            reason += f"; of {len(tied)} stable settings this one has the largest margin to the boundary"
    elif len(tied) > 1:
        reason = (
            f"the unclipped run {past}; {len(tied)} stable settings are within noise of the best "
            f"by {by} (noise judged by {ranking.noise}), this one has the largest margin to the boundary"
        )
    elif rule_wins and any_fixed:
        reason = (
            f"the unclipped run {past}; this adaptive rule is meaningfully better than every "
            f"stable fixed threshold by {by} (noise judged by {ranking.noise})"
        )
    elif rule_wins:
        reason = f"the unclipped run {past}; no fixed threshold was stable, this adaptive rule was"
    else:
        reason = f"the unclipped run {past}; best stable setting by {by}"
    return Recommendation(True, run=chosen.runs[0], reason=reason, evidence=evidence, setting=chosen)


def what_to_try(results: list[RunResult]) -> str:
    """The advice when no clipped setting was stable: when every run goes non-finite at the same
    step, that clipping cannot help and where to look; otherwise ``max_norm`` values below the
    smallest tried per norm type, or a lower learning rate."""
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
