"""What a sweep's numbers mean: the explosion's origin (spike), the noise rule and what it rests
on, the ranking of runs and of settings over seeds (by ``evaluate``, the smoothed loss, or
stability alone), the stability boundary and the bracket ``--refine`` bisects.

Pure functions over ``results.RunResult`` records: no torch, no printing, no files, so every rule
can be tested on constructed results and re-applied by ``gradclip report`` to files on disk.
Every rule is NaN-safe (non-finite numbers never win a comparison) and deterministic (ties go to
the earlier run of the sweep). The recommendation built on them is ``recommend.py``.
See docs/diagnosis.md.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from gradcheck_cli.detect import is_finite
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_NORM,
    NON_FINITE,
    STABLE,
    RunResult,
    smoothed_loss,
)
from gradcheck_cli.settings import SettingOverSeeds, over_seeds, seeds_vary
from gradcheck_cli.stats import SMOOTH_STEPS, Smoothed, mean_sd, median

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

BASIS_EVAL = "eval_metric"  # the script's evaluate(model), one number per run
BASIS_LOSS = "smoothed_loss"  # the mean of the last SMOOTH_STEPS losses
BASIS_STABILITY = "stability"  # no figure: the loss measures nothing (several objectives summed)


def differ_meaningfully(a: Smoothed | None, b: Smoothed | None) -> bool:
    """``True`` when the two means are more than ``NOISE_SE`` standard errors apart. ``False``
    when either is missing, has fewer than 2 losses, or holds a non-finite number."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return False
    if not all(math.isfinite(x) for x in (a.mean, b.mean, a.sd, b.sd)):
        return False
    se = math.sqrt(a.sd**2 / a.n + b.sd**2 / b.n)
    return abs(a.mean - b.mean) > NOISE_SE * se


def clip_sites(r: RunResult) -> list[str]:
    """The names of a ``train_step`` run's clip call sites, in order of first call."""
    return list(dict.fromkeys(name for s in r.steps for name, _, _ in s.sites))


def summed_objectives(runs: list[RunResult]) -> list[str]:
    """The clip sites of a ``train_step`` script that clips at more than one (a GAN's
    discriminator and generator): its returned loss sums several objectives, each trained by its
    own update, and measures no quality. ``[]`` for every other script."""
    for r in runs:
        sites = clip_sites(r)
        if len(sites) > 1:
            return sites
    return []


def ranking_basis(stable: list[RunResult]) -> tuple[str, bool]:
    """(basis, higher is better) for ranking the ``stable`` runs: ``evaluate``'s metric when
    every one has a finite one, else the smoothed loss, unless the loss sums several objectives
    (``summed_objectives``): then there is nothing to rank by, only stability."""
    if stable and all(is_finite(r.eval_metric) for r in stable):
        return BASIS_EVAL, bool(stable[0].eval_higher_is_better)
    if summed_objectives(stable):
        return BASIS_STABILITY, False
    return BASIS_LOSS, False


def summed_loss_text(objectives: list[str]) -> str:
    """Why a ``train_step`` script's loss ranks nothing (``summed_objectives``), in words."""
    return (
        f"the loss sums the objectives of {len(objectives)} clip sites ({', '.join(objectives)}) and "
        "measures no quality (define evaluate() to rank runs)"
    )


def noise_text(basis: str, seeds: int, objectives: list[str]) -> str:
    """What a judgement of "meaningfully better" rests on, completing "noise judged by ...": the
    spread over the seeds, the spread of the last losses, or nothing (and why)."""
    if basis == BASIS_STABILITY:
        return f"nothing, as {summed_loss_text(objectives)}: judged on stability only"
    figure = "evaluate() numbers" if basis == BASIS_EVAL else "smoothed losses"
    if seeds > 1:
        return f"the spread of the {seeds} seeds' {figure}"
    if basis == BASIS_EVAL:
        return "nothing, as one evaluate() number per run has no spread; run several --seeds to judge differences"
    return f"the spread of each run's last {SMOOTH_STEPS} losses"


@dataclass(frozen=True)
class Ranking:
    """Stable runs ordered best first, and how: by ``eval_metric``, by ``smoothed_loss`` or, when
    the loss measures nothing, by stability alone (sweep order, nothing better than anything)."""

    runs: list[RunResult]
    basis: str  # BASIS_EVAL, BASIS_LOSS or BASIS_STABILITY
    higher_is_better: bool = False
    objectives: tuple[str, ...] = ()  # the clip sites whose objectives the loss sums

    @property
    def best(self) -> RunResult | None:
        return self.runs[0] if self.runs else None

    @property
    def noise(self) -> str:
        return noise_text(self.basis, 1, list(self.objectives))

    def value(self, r: RunResult) -> float | None:
        if self.basis == BASIS_EVAL:
            return r.eval_metric
        if self.basis == BASIS_STABILITY:
            return None
        s = smoothed_loss(r)
        return s.mean if s else None

    def better(self, a: RunResult, b: RunResult) -> bool:
        """``a`` is meaningfully better than ``b`` (never on noise): by the smoothed loss beyond
        ``differ_meaningfully``; never by one ``evaluate`` number per run (it has no spread) nor
        by stability alone."""
        if self.basis != BASIS_LOSS:
            return False
        va, vb = self.value(a), self.value(b)
        if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
            return False
        return va < vb and differ_meaningfully(smoothed_loss(a), smoothed_loss(b))

    def within_noise_of_best(self) -> list[RunResult]:
        """The runs after the best that are not meaningfully worse than it."""
        best = self.best
        return [r for r in self.runs[1:] if not self.better(best, r)] if best is not None else []


def rank(runs: list[RunResult]) -> Ranking:
    """The stable runs among ``runs`` with a finite figure, best first, on ``ranking_basis``
    (by stability alone: every stable run, in sweep order). Ties keep the sweep's order."""
    stable = [r for r in runs if r.status == STABLE]
    basis, higher = ranking_basis(stable)
    objectives = tuple(summed_objectives(stable))
    if basis == BASIS_EVAL:
        ordered = sorted(stable, key=lambda r: -r.eval_metric if higher else r.eval_metric)
        return Ranking(ordered, basis, higher, objectives)
    if basis == BASIS_STABILITY:
        return Ranking(stable, basis, False, objectives)
    scored = [(smoothed_loss(r), i, r) for i, r in enumerate(stable)]
    scored = [(s.mean, i, r) for s, i, r in scored if s is not None and math.isfinite(s.mean)]
    return Ranking([r for _, _, r in sorted(scored, key=lambda t: (t[0], t[1]))], basis, False, objectives)


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
    if basis == BASIS_EVAL:
        return r.eval_metric
    if basis == BASIS_STABILITY:
        return None
    s = smoothed_loss(r)
    return s.mean if s else None


@dataclass(frozen=True)
class SettingRanking:
    """Settings stable in every seed, best first, and how they were ranked (``rank_settings``).

    A setting's figure is the mean over its seeds of each run's figure (``eval_metric``, or the
    smoothed loss), and its noise the spread of those per-seed figures; with one seed the noise
    is the single run's (``Ranking``). On the stability basis there is no figure."""

    settings: list[SettingOverSeeds]
    basis: str  # BASIS_EVAL, BASIS_LOSS or BASIS_STABILITY
    higher_is_better: bool = False
    objectives: tuple[str, ...] = ()
    seeds: int = 1  # the sweep's number of seeds

    @property
    def best(self) -> SettingOverSeeds | None:
        return self.settings[0] if self.settings else None

    @property
    def noise(self) -> str:
        """What a "meaningfully better" of this ranking rests on (``noise_text``)."""
        return noise_text(self.basis, self.seeds, list(self.objectives))

    @property
    def by(self) -> str:
        """The basis in words for reasons: ``smoothed loss``, ``eval_metric (higher is better)``."""
        return self.basis.replace("_", " ") + (" (higher is better)" if self.higher_is_better else "")

    def figure(self, setting: SettingOverSeeds) -> Smoothed | None:
        """Mean, sd and number of the per-seed figures; one run on the smoothed-loss basis: its
        ``smoothed_loss``. ``None`` when some seed has no finite figure, and on the stability
        basis."""
        values = [_run_figure(r, self.basis) for r in setting.runs]
        if not values or not all(is_finite(v) for v in values):
            return None
        if len(values) == 1 and self.basis == BASIS_LOSS:
            return smoothed_loss(setting.runs[0])
        return mean_sd(values)

    def value(self, setting: SettingOverSeeds) -> float | None:
        f = self.figure(setting)
        return f.mean if f is not None else None

    def better(self, a: SettingOverSeeds, b: SettingOverSeeds) -> bool:
        """``a`` is meaningfully better than ``b`` (never on noise): ahead by the figure, and
        more than ``NOISE_SE`` standard errors apart by ``differ_meaningfully`` (over the seeds'
        figures, or over the last losses with one seed). One ``evaluate`` number per setting
        (one seed) has no spread and is never meaningfully better; nor is anything on the
        stability basis."""
        if self.basis == BASIS_STABILITY:
            return False
        if self.basis == BASIS_EVAL and (len(a.runs) < 2 or len(b.runs) < 2):
            return False
        fa, fb = self.figure(a), self.figure(b)
        if fa is None or fb is None or not (math.isfinite(fa.mean) and math.isfinite(fb.mean)):
            return False
        ahead = fa.mean > fb.mean if self.basis == BASIS_EVAL and self.higher_is_better else fa.mean < fb.mean
        return ahead and differ_meaningfully(fa, fb)

    def within_noise_of_best(self) -> list[SettingOverSeeds]:
        """The settings after the best that are not meaningfully worse than it."""
        best = self.best
        return [g for g in self.settings[1:] if not self.better(best, g)] if best is not None else []

    def among(self, settings: list[SettingOverSeeds]) -> SettingRanking:
        """This ranking restricted to ``settings`` (its order and basis kept), so that a subset
        (the clipped settings, the fixed thresholds) is judged exactly as the whole."""
        keep = {id(g) for g in settings}
        return replace(self, settings=[g for g in self.settings if id(g) in keep])


def rank_settings(settings: list[SettingOverSeeds], seeds: list[int | None]) -> SettingRanking:
    """The settings stable in every seed of ``seeds`` with a finite figure, best first, on
    ``ranking_basis`` of their runs (by stability alone: every stable setting, in sweep order).
    Ties keep the sweep's order. For one-run settings this is ``rank`` exactly."""
    stable = [g for g in settings if setting_status(g, seeds) == STABLE]
    runs = [r for g in stable for r in g.runs]
    basis, higher = ranking_basis(runs)
    ranking = SettingRanking([], basis, higher, tuple(summed_objectives(runs)), len(seeds))
    if basis == BASIS_STABILITY:
        return replace(ranking, settings=stable)
    scored = [(ranking.value(g), i, g) for i, g in enumerate(stable)]
    scored = [(v, i, g) for v, i, g in scored if is_finite(v)]
    sign = -1.0 if higher else 1.0
    return replace(ranking, settings=[g for _, _, g in sorted(scored, key=lambda t: (sign * t[0], t[1]))])


def best_settings(ranking: SettingRanking) -> tuple[SettingOverSeeds | None, SettingOverSeeds | None]:
    """(the best clipped setting, the best unclipped one) of ``ranking``; ``None`` for none."""
    clipped = next((g for g in ranking.settings if g.cell.clipped), None)
    control = next((g for g in ranking.settings if not g.cell.clipped), None)
    return clipped, control


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
