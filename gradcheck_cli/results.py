"""The one schema of a sweep's results, and its pandas frames.

Everything downstream (terminal tables, CSV files, JSON, JUnit, resume) reads these records;
nothing else defines a column name. Missing values are ``None``/NaN and reach CSV as blanks;
status words are never the bare word ``nan``, so pandas never reads a status as missing.
See docs/outputs.md.
"""

from __future__ import annotations

import bisect
import functools
import math
import sys
from dataclasses import dataclass, field, replace

from gradcheck_cli.stats import SMOOTH_STEPS, Smoothed, mean_sd, percentile

STABLE = "stable"
NON_FINITE = "non_finite"
DIVERGED = "diverged"
ERROR = "error"
# The process running the run died (a segfault, os._exit, the OOM killer): ``error`` says how.
CRASHED = "crashed"
STATUSES = (STABLE, NON_FINITE, DIVERGED, ERROR, CRASHED)

# Where a non-finite value first appeared: the loss itself (forward) or the gradients (backward);
# ``amp``: the fp16 gradient scaler skipped step after step (its scale collapsed).
SOURCE_FORWARD = "forward"
SOURCE_BACKWARD = "backward"
SOURCE_AMP = "amp"

CONTROL_RUN = "unclipped"

# Clipping modes (``Cell.mode``, the ``clip_mode`` column): the control measures only; ``norm``
# is clip_grad_norm_ at max_norm; the others are the rules of ``engine`` / ``rules.py``.
MODE_NONE = "none"
MODE_NORM = "norm"
MODE_VALUE = "value"
MODE_AGC = "agc"
MODE_AUTOCLIP = "autoclip"
MODE_ZCLIP = "zclip"
MODES = (MODE_NONE, MODE_NORM, MODE_VALUE, MODE_AGC, MODE_AUTOCLIP, MODE_ZCLIP)
# Modes whose clipping is not a total-norm threshold: no clip_coef, a clipped_unit_frac instead.
UNIT_MODES = (MODE_VALUE, MODE_AGC)

SUMMARY_COLUMNS = [
    "run",
    "max_norm",
    "norm_type",
    "clip_mode",
    "clip_param",
    "lr",
    "seed",
    "status",
    "nan_step",
    "nan_source",
    "nan_param",
    "nan_micro_batch",
    "diverged_step",
    "skipped_steps",
    "first_skip",
    "divergence_checked",
    "spike_step",
    "spike_param",
    "final_loss",
    "min_loss",
    "smoothed_loss",
    "smoothed_loss_sd",
    "eval_metric",
    "eval_higher_is_better",
    "grad_norm_p50",
    "grad_norm_p95",
    "grad_norm_max",
    "clipped_frac",
    "refined",
    "shared_steps",
    "steps",
    "seconds",
    "error",
    "warnings",
]
# clip_threshold: the total-norm threshold applied at the step (norm, autoclip, zclip);
# clipped_unit_frac: the share of gradient elements (value) or units (agc) clipped at the step.
STEP_COLUMNS = [
    "run",
    "step",
    "loss",
    "grad_norm",
    "clip_coef",
    "clip_threshold",
    "clipped_unit_frac",
    "lr",
    "skipped",
    "seed",
]
# One row per (run, step, layer group): the group's pre-clip gradient norm in the run's norm type
# (``layers.py`` says how parameters are grouped). ``param`` is a parameter or group name.
LAYER_COLUMNS = ["run", "step", "param", "grad_norm"]
# One row per (control run, step, norm type): the control's pre-clip total norm in every norm
# type of the grid, so each clipped cell can be compared with the control on its own norm.
CONTROL_NORM_COLUMNS = ["run", "step", "norm_type", "grad_norm"]
# Bins are per norm type: an L2 norm and an inf norm never share an axis.
HISTOGRAM_COLUMNS = ["run", "norm_type", "bin_left", "bin_right", "count"]
# One row per (run, step, clip call site) of a ``train_step`` script: the pre-clip norm of the
# parameters given to that ``clip(parameters, name=...)`` call and the coefficient applied.
SITE_COLUMNS = ["run", "step", "site", "grad_norm", "clip_coef"]


def format_float(x: float) -> str:
    """The shortest text that reads back as exactly ``x``, without a trailing ``.0``:
    ``2.0 -> '2'``, ``0.1 -> '0.1'``, ``1.0000001 -> '1.0000001'``, ``inf -> 'inf'``. Distinct
    floats always get distinct spellings (``repr`` round-trips), so run names never collide."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def format_norm_type(norm_type: float) -> str:
    """``2.0 -> '2'``, ``inf -> 'inf'``: the spelling used in run names, tables and CSV."""
    return format_float(norm_type)


def format_name_number(x: float) -> str:
    """How a number is spelled inside a run name (``0.1``, ``10``, ``1e-05``, ``1.0000001``):
    the one place. Shortest exact form (``format_float``): distinct values, distinct names."""
    return format_float(x)


@dataclass(frozen=True)
class Cell:
    """One run's configuration: a clipping ``mode`` (``MODES``) with its ``param``, and the lr
    and seed axes.

    ``Cell(max_norm, norm_type)`` is norm clipping (``mode="norm"``, ``param`` = ``max_norm``)
    and ``Cell(None)`` the unclipped control run (``mode="none"``); the rules are
    ``Cell(None, mode="value", param=0.5)`` and so on, with ``param`` the clip value, AGC clip
    factor, AutoClip percentile or ZClip z threshold. ``max_norm`` is set for norm cells only;
    ``norm_type`` is the norm measured (and, for norm cells, clipped); the rules measure L2.

    ``lr`` and ``seed`` are set only when the sweep varies them (several values); ``None``
    means the sweep's single value, which the run name leaves out."""

    max_norm: float | None
    norm_type: float = 2.0
    lr: float | None = None
    seed: int | None = None
    mode: str | None = None  # None: "norm" when max_norm is given, else "none"
    param: float | None = None  # None for "none"; max_norm for "norm"

    def __post_init__(self) -> None:
        mode = self.mode
        if mode is None:
            mode = MODE_NONE if self.max_norm is None else MODE_NORM
        if mode not in MODES:
            raise ValueError(f"unknown clipping mode {mode!r}; one of {', '.join(MODES)}")
        param = self.param
        if mode == MODE_NORM:
            if self.max_norm is None or param not in (None, self.max_norm):
                raise ValueError("a norm cell takes its threshold as max_norm")
            param = self.max_norm
        elif self.max_norm is not None:
            raise ValueError(f"a {mode!r} cell has no max_norm")
        elif mode == MODE_NONE and param is not None:
            raise ValueError("the control run has no clipping parameter")
        elif mode != MODE_NONE and param is None:
            raise ValueError(f"a {mode!r} cell needs its param")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "param", None if param is None else float(param))

    @functools.cached_property  # asked for per row when reports are written
    def run(self) -> str:
        """Stable, human-readable run id (see ``run_name``)."""
        return run_name(self)

    @property
    def clipped(self) -> bool:
        """Every cell but the control clips somehow."""
        return self.mode != MODE_NONE

    @property
    def setting(self) -> Cell:
        """The same cell without its seed: what a multi-seed sweep aggregates over."""
        return replace(self, seed=None)

    @property
    def clipping(self) -> Cell:
        """The clipping alone, without the lr and seed axes (a column of the lr grid)."""
        return replace(self, lr=None, seed=None)


def run_name(cell: Cell) -> str:
    """The base name, then ``@`` and the axes that vary, e.g. ``clip_1_2@lr=0.1,seed=1``.
    Bases: ``unclipped``, ``clip_<max_norm>_<norm_type>``, ``value_<clip_value>``,
    ``agc_<clip_factor>``, ``autoclip_p<percentile>``, ``zclip_z<z_thresh>``. Every part of a
    name is built here."""
    if cell.mode == MODE_NONE:
        base = CONTROL_RUN
    elif cell.mode == MODE_NORM:
        base = f"clip_{format_name_number(cell.max_norm)}_{format_norm_type(cell.norm_type)}"
    else:
        prefix = {MODE_VALUE: "value_", MODE_AGC: "agc_", MODE_AUTOCLIP: "autoclip_p", MODE_ZCLIP: "zclip_z"}[cell.mode]
        base = prefix + format_name_number(cell.param)
    axes = []
    if cell.lr is not None:
        axes.append(f"lr={format_name_number(cell.lr)}")
    if cell.seed is not None:
        axes.append(f"seed={cell.seed}")
    return f"{base}@{','.join(axes)}" if axes else base


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step. ``grad_norm``/``clip_coef`` are NaN when the step never got there
    (the loss itself was non-finite or diverged, so no backward pass was judged).

    With gradient accumulation ``loss`` is the mean of the micro-batches' losses. A step the
    fp16 gradient scaler skipped has ``skipped=True``, its measured (non-finite) norm and a
    NaN ``clip_coef``; it counts in no norm statistic."""

    step: int  # numbered from 1
    loss: float
    grad_norm: float = math.nan  # pre-clip total norm in the run's norm type
    clip_coef: float = math.nan  # coefficient applied; 1.0 when nothing was clipped
    # The total-norm threshold applied at this step (norm, autoclip, zclip); NaN when none.
    clip_threshold: float = math.nan
    # value: share of gradient elements clamped; agc: share of units scaled; NaN otherwise.
    clipped_unit_frac: float = math.nan
    # (layer group, pre-clip norm) pairs from the same measuring pass as ``grad_norm``;
    # empty when per-layer norms were not recorded for this step.
    layers: tuple[tuple[str, float], ...] = ()
    lr: float = math.nan  # learning rate of the first param group at this step
    skipped: bool = False  # the fp16 gradient scaler skipped this step
    # (site, pre-clip norm, clip coefficient) per ``clip`` call of a ``train_step`` script
    sites: tuple[tuple[str, float, float], ...] = ()
    # (norm_type, pre-clip total norm) in every norm type of the grid; the control run only.
    norms: tuple[tuple[float, float], ...] = ()


@dataclass
class RunResult:
    """What one training burst produced, with its verdict."""

    cell: Cell
    status: str
    steps: list[StepRecord] = field(default_factory=list)
    nan_step: int | None = None
    nan_source: str | None = None  # SOURCE_FORWARD, SOURCE_BACKWARD or SOURCE_AMP
    nan_param: str | None = None  # first parameter (named_parameters order) with a non-finite grad
    nan_micro_batch: int | None = None  # with --accumulate: the first micro-batch whose loss was non-finite
    diverged_step: int | None = None
    seconds: float = 0.0
    error: str | None = None  # "ExceptionType: message" when status == ERROR; how it died when CRASHED
    error_traceback: str | None = None  # trimmed to the user's frames; terminal only, not CSV
    lr: float | None = None  # the lr the run started at when gradclip set it; None: the script's own
    seed: int | None = None  # the seed the run started from
    # False when divergence could not be judged (first loss not positive, or the check turned
    # off with --divergence-factor inf); None when no step was recorded.
    divergence_checked: bool | None = None
    spike_step: int | None = None  # analysis.find_spike: first step a layer's norm jumped
    spike_param: str | None = None  # the layer (group) with the largest jump at spike_step
    eval_metric: float | None = None  # the script's evaluate(model) at the end of a stable run
    eval_higher_is_better: bool | None = None  # None when there is no eval_metric
    refined: bool = False  # a --refine bisection run rather than a grid cell
    # Leading steps taken from the control run instead of trained (docs/diagnosis.md, "Shared
    # runs"): all of them for a run identical to the control, k - 1 for one forked at step k.
    shared_steps: int = 0
    name: str | None = None  # run name when it is not the cell's (a monitored run: ``monitor``)
    # Degenerate-training codes (``detect.WARNING_TEXT`` explains each); not errors, not healthy.
    warnings: tuple[str, ...] = ()

    @property
    def run(self) -> str:
        return self.name if self.name is not None else self.cell.run

    def finite_norms(self) -> list[float]:
        """Finite pre-clip norms of the steps that were taken (skipped steps left out)."""
        return [s.grad_norm for s in self.steps if not s.skipped and math.isfinite(s.grad_norm)]

    @property
    def skipped_steps(self) -> int:
        return sum(s.skipped for s in self.steps)

    @property
    def first_skip(self) -> int | None:
        return next((s.step for s in self.steps if s.skipped), None)

    def norm_types(self) -> list[float]:
        """Norm types this run measured: its own, then the control's extra ones."""
        out = [self.cell.norm_type]
        for s in self.steps:
            for p, _ in s.norms:
                if p not in out:
                    out.append(p)
        return out

    def finite_norms_in(self, norm_type: float) -> list[float]:
        """The run's finite pre-clip total norms in ``norm_type``: its own norm, or for the
        control run any norm type of the grid; ``[]`` when the run did not measure it."""
        if norm_type == self.cell.norm_type:
            return self.finite_norms()
        return [v for s in self.steps for p, v in s.norms if p == norm_type and math.isfinite(v)]

    def stop_step(self) -> int | None:
        """The step that stopped the run (non-finite onset or divergence), if any."""
        return self.nan_step if self.nan_step is not None else self.diverged_step

    def summary_row(self) -> dict:
        """One row of ``summary.csv``; keys are exactly ``SUMMARY_COLUMNS``."""
        norms = sorted(self.finite_norms())
        finite_losses = [s.loss for s in self.steps if math.isfinite(s.loss)]
        clipped = [
            was_clipped(s, self.cell.mode)
            for s in self.steps
            if not s.skipped and not (math.isnan(s.clip_coef) and math.isnan(s.clipped_unit_frac))
        ]
        smoothed = smoothed_loss(self)
        return {
            "run": self.run,
            "max_norm": self.cell.max_norm,
            "norm_type": format_norm_type(self.cell.norm_type),
            "clip_mode": self.cell.mode,
            "clip_param": self.cell.param,
            "lr": self.lr,
            "seed": self.seed,
            "status": self.status,
            "nan_step": self.nan_step,
            "nan_source": self.nan_source,
            "nan_param": self.nan_param,
            "nan_micro_batch": self.nan_micro_batch,
            "diverged_step": self.diverged_step,
            "skipped_steps": self.skipped_steps,
            "first_skip": self.first_skip,
            "divergence_checked": self.divergence_checked,
            "spike_step": self.spike_step,
            "spike_param": self.spike_param,
            "final_loss": self.steps[-1].loss if self.steps else None,
            "min_loss": min(finite_losses) if finite_losses else None,
            "smoothed_loss": smoothed.mean if smoothed else None,
            "smoothed_loss_sd": smoothed.sd if smoothed else None,
            "eval_metric": self.eval_metric,
            "eval_higher_is_better": self.eval_higher_is_better if self.eval_metric is not None else None,
            "grad_norm_p50": percentile(norms, 50),
            "grad_norm_p95": percentile(norms, 95),
            "grad_norm_max": norms[-1] if norms else None,
            "clipped_frac": (sum(clipped) / len(clipped)) if clipped else None,
            "refined": self.refined,
            "shared_steps": self.shared_steps,
            "steps": len(self.steps),
            "seconds": round(self.seconds, 4),
            "error": self.error,
            "warnings": ";".join(self.warnings) or None,
        }

    def layer_rows(self) -> list[dict]:
        """Rows of ``layers.csv``: one per (step, layer group), in step then group order."""
        return [
            {"run": self.run, "step": s.step, "param": name, "grad_norm": norm}
            for s in self.steps
            for name, norm in s.layers
        ]

    def site_rows(self) -> list[dict]:
        """Rows of ``clip_sites.csv``: one per (step, clip call site)."""
        return [
            {"run": self.run, "step": s.step, "site": site, "grad_norm": norm, "clip_coef": coef}
            for s in self.steps
            for site, norm, coef in s.sites
        ]

    def control_norm_rows(self) -> list[dict]:
        """Rows of ``control_norms.csv``: one per (step, norm type) the run measured besides
        its own norm (the control run measures every norm type of the grid)."""
        return [
            {"run": self.run, "step": s.step, "norm_type": format_norm_type(p), "grad_norm": v}
            for s in self.steps
            for p, v in s.norms
        ]

    def step_rows(self) -> list[dict]:
        return [
            {
                "run": self.run,
                "step": s.step,
                "loss": s.loss,
                "grad_norm": s.grad_norm,
                "clip_coef": s.clip_coef,
                "clip_threshold": s.clip_threshold,
                "clipped_unit_frac": s.clipped_unit_frac,
                "lr": s.lr,
                "skipped": int(s.skipped),
                "seed": self.seed,
            }
            for s in self.steps
        ]


def was_clipped(step: StepRecord, mode: str) -> bool:
    """Whether the step counts as clipped in ``clipped_frac``: for norm cells a coefficient
    below 1 (as always); for AutoClip and ZClip a norm above the threshold (torch's coefficient
    ``threshold / (norm + 1e-6)`` is a hair below 1 when the norm *is* the threshold, as at
    AutoClip's first step, whose one norm is its own percentile); for value and AGC any element
    or unit clipped."""
    if mode in UNIT_MODES:
        return step.clipped_unit_frac > 0.0
    if mode in (MODE_AUTOCLIP, MODE_ZCLIP):
        return step.grad_norm > step.clip_threshold  # False for NaN: no threshold applied
    return step.clip_coef < 1.0


def smoothed_loss(result: RunResult, k: int = SMOOTH_STEPS) -> Smoothed | None:
    """``Smoothed`` over the run's last ``k`` finite losses, the step that stopped the run
    excluded; ``None`` when there is none (the ``smoothed_loss`` and ``smoothed_loss_sd``
    columns)."""
    stop = result.stop_step()
    losses = [s.loss for s in result.steps if s.step != stop and math.isfinite(s.loss)][-k:]
    return mean_sd(losses) if losses else None


@dataclass(frozen=True)
class NormRange:
    """What the shared histogram bins need from one run: its smallest positive and largest
    finite norm, and whether it has a norm of exactly 0 (``None`` when there is none)."""

    min_positive: float | None
    max_positive: float | None
    has_zero: bool
    has_finite: bool

    @classmethod
    def of(cls, result: RunResult, norm_type: float | None = None) -> NormRange:
        """The run's range in its own norm type, or in ``norm_type`` (``finite_norms_in``)."""
        norms = result.finite_norms() if norm_type is None else result.finite_norms_in(norm_type)
        positive = [n for n in norms if n > 0]
        return cls(
            min(positive) if positive else None,
            max(positive) if positive else None,
            any(n == 0 for n in norms),
            bool(norms),
        )


def shared_log_bins(results: list[RunResult], n_bins: int = 8) -> list[float]:
    """Log-spaced bin edges shared by every run, spanning all finite norms of the sweep.

    Norms of exactly 0 cannot sit on a log axis: when any run has one, the first edge is 0 so
    that every finite norm falls in some bin. Returns ``[]`` when no run has a finite norm.
    """
    return log_bins([NormRange.of(r) for r in results], n_bins)


def log_bins_by_norm_type(results: list[RunResult], n_bins: int = 8) -> dict[float, list[float]]:
    """``shared_log_bins`` per norm type: bins spanning every run's finite norms in that norm
    type (the control run's extra norms included), so L2 and inf norms never share an axis.
    Norm types in order of first appearance; one without finite norms maps to ``[]``."""
    return ranges_to_bins(norm_ranges_by_type(results), n_bins)


def norm_ranges_by_type(results: list[RunResult]) -> dict[float, list[NormRange]]:
    """Each norm type's ``NormRange`` of every run that has norms in it, in first-appearance order."""
    by_type: dict[float, list[NormRange]] = {}
    for r in results:
        for p in r.norm_types():
            by_type.setdefault(p, []).append(NormRange.of(r, p))
    return by_type


def ranges_to_bins(by_type: dict[float, list[NormRange]], n_bins: int = 8) -> dict[float, list[float]]:
    return {p: log_bins(ranges, n_bins) for p, ranges in by_type.items()}


def log_bins(ranges: list[NormRange], n_bins: int = 8) -> list[float]:
    """``shared_log_bins`` from each run's ``NormRange``: cheap to recompute after every run."""
    if not any(r.has_finite for r in ranges):
        return []
    lows = [r.min_positive for r in ranges if r.min_positive is not None]
    highs = [r.max_positive for r in ranges if r.max_positive is not None]
    if not lows:
        return [0.0, 1.0]
    low, high = min(lows), max(highs)
    lo, hi = math.log10(low), math.log10(high)
    if hi - lo < 1e-12:
        # One distinct value: a decade centred on it, or the top decade of the floats when the
        # centred one would overflow.
        v = low
        if v * 10**0.5 <= sys.float_info.max:
            edges = [v * 10 ** (i / n_bins - 0.5) for i in range(n_bins + 1)]
        else:
            edges = [sys.float_info.max * 10 ** (i / n_bins - 1) for i in range(n_bins)] + [sys.float_info.max]
    else:
        # Exact ends, so no value falls outside by rounding; inner edges lie strictly between.
        edges = [low] + [10 ** (lo + (hi - lo) * i / n_bins) for i in range(1, n_bins)] + [high]
    # Subnormal norms are too coarse for log spacing (edges round onto each other): step each
    # such edge up to the next float, so the edges stay strictly increasing.
    for i in range(1, len(edges)):
        if edges[i] <= edges[i - 1]:
            edges[i] = math.nextafter(edges[i - 1], math.inf)
    if any(r.has_zero for r in ranges):
        edges[0] = 0.0
    return edges


def histogram_counts(result: RunResult, edges, norm_type: float | None = None) -> list[int]:
    """Counts of the run's finite norms in ``norm_type`` (default: the run's own) per bin; bins
    are [left, right), the last one closed. ``edges`` is a list of edges or the per-norm-type
    dict of ``log_bins_by_norm_type``."""
    p = result.cell.norm_type if norm_type is None else norm_type
    if isinstance(edges, dict):
        edges = edges.get(p, [])
    counts = [0] * max(len(edges) - 1, 0)
    if not counts:
        return counts
    for n in result.finite_norms_in(p):
        i = _bin_index(n, edges)
        counts[i] += 1
    return counts


def _bin_index(value: float, edges: list[float]) -> int:
    i = bisect.bisect_right(edges, value) - 1
    return min(max(i, 0), len(edges) - 2)


def summary_frame(results: list[RunResult]):
    import pandas as pd

    return pd.DataFrame([r.summary_row() for r in results], columns=SUMMARY_COLUMNS)


def steps_frame(results: list[RunResult]):
    import pandas as pd

    return pd.DataFrame([row for r in results for row in r.step_rows()], columns=STEP_COLUMNS)


def layers_frame(results: list[RunResult]):
    import pandas as pd

    return pd.DataFrame([row for r in results for row in r.layer_rows()], columns=LAYER_COLUMNS)


def sites_frame(results: list[RunResult]):
    import pandas as pd

    return pd.DataFrame([row for r in results for row in r.site_rows()], columns=SITE_COLUMNS)


def control_norms_frame(results: list[RunResult]):
    import pandas as pd

    return pd.DataFrame([row for r in results for row in r.control_norm_rows()], columns=CONTROL_NORM_COLUMNS)


def histogram_frame(results: list[RunResult], edges):
    """One row per (run, norm type, bin). With per-norm-type ``edges`` (a dict) the control run
    gets rows in every norm type it measured; with one list of edges, each run's own only."""
    import pandas as pd

    rows = []
    for r in results:
        types = r.norm_types() if isinstance(edges, dict) else [r.cell.norm_type]
        for p in types:
            e = edges.get(p, []) if isinstance(edges, dict) else edges
            for i, c in enumerate(histogram_counts(r, e, p)):
                rows.append(
                    {
                        "run": r.run,
                        "norm_type": format_norm_type(p),
                        "bin_left": e[i],
                        "bin_right": e[i + 1],
                        "count": c,
                    }
                )
    return pd.DataFrame(rows, columns=HISTOGRAM_COLUMNS)
