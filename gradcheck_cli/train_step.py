"""One training burst for one cell of a script that defines ``train_step`` instead of ``loss_fn``.

The contract: ``train_step(model, batch, optimizers, clip)`` runs one update the script's own way
(several optimizers, alternating updates, rollouts, truncated BPTT, its own accumulation) and
returns the step's loss (a one-element tensor or a number; ``None`` when it has none). Where it
would call ``torch.nn.utils.clip_grad_norm_`` it calls ``clip(parameters)``, optionally with
``name="..."``. ``optimizers`` is exactly what ``build_optimizer(model)`` returned (one optimizer,
or a list, tuple or dict of them), or gradclip's default ``SGD(model.parameters(), lr=--lr)``.

What ``clip(parameters, name=None)`` does is the cell's business:

* it measures the pre-clip norm of the given parameters' gradients with gradclip's engine, in
  the cell's norm type (L2 for the control run), with their per-tensor norms;
* a non-finite norm stops the run right there, before anything is clipped: status
  ``non_finite``, source ``backward``, and ``nan_param`` the first parameter, in the order given
  to that call, whose gradient is NaN/inf (the rest of ``train_step`` does not run);
* a clipped cell scales those gradients by ``min(max_norm / (norm + 1e-6), 1)``; the control run
  leaves them alone; the rule cells (value, AGC, AutoClip, ZClip) apply their rule to those
  gradients, with one rule object per call site (AutoClip's history and ZClip's statistics are
  kept per site, built afresh for every run);
* it returns the pre-clip norm (a 0-dim tensor), as ``clip_grad_norm_`` does.

Call sites are named by ``name=`` when given, else by call order within the step: ``call_1``,
``call_2``, ... Each call is one row of ``clip_sites.csv`` (site, pre-clip norm, coefficient).
Each clip call clips its own parameters on its own (a GAN clips each network separately). The
step's row in ``steps.csv`` combines them: ``grad_norm`` is the norm (cell's type) of the vector of
the sites' norms, which is the norm of all the clipped gradients together when the sites cover
different parameters, ``clip_coef`` is the smallest coefficient applied, ``clip_threshold`` the
smallest threshold and ``clipped_unit_frac`` the largest share of elements or units clipped
(``clip_sites.csv`` has each call's norm and coefficient). ``layers.csv`` gets
each call's parameters grouped as in any run (``layers.LayerGrouping``), measured at that call.

A ``train_step`` that never calls ``clip`` in a step ends the run with status ``error`` (there is
nothing to measure or clip). The loss is judged after ``train_step`` returns, as for ``loss_fn``
scripts: non-finite (source ``forward``) or diverged against the first step's loss.

Fair starts as for ``loss_fn`` scripts: every run restores the model, RNG state and the state of
every optimizer (``snapshot``), and calls ``batches()`` afresh; the lr axis sets the lr of every
optimizer; the seed axis works unchanged. The runner zeroes nothing and steps no scheduler
(``build_scheduler`` is not used): the script's own update owns its gradients and schedules.
``--amp`` and ``--accumulate`` do not apply (the run is an ``error`` saying so): mixed precision
and accumulation belong inside ``train_step``. Host syncs: one per ``clip`` call (the norm decides
whether the run stops) and one for the loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli import engine
from gradcheck_cli.config import SweepConfig, agc_excluded
from gradcheck_cli.detect import is_diverged, is_non_finite
from gradcheck_cli.layers import LayerGrouping
from gradcheck_cli.loader import Experiment, definition_site, type_name
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_AGC,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
)
from gradcheck_cli.run_setup import (
    BatchStream,
    UserFailure,
    apply_clipping,
    call_user,
    make_rule,
    optimizer_members,
    run_lr,
    start_run,
    to_device,
)
from gradcheck_cli.snapshot import Snapshot


class _NonFiniteAtClip(BaseException):
    """Raised by ``clip`` through the user's ``train_step`` to stop the run before clipping.
    A ``BaseException``, so that the user's ``except Exception`` does not swallow it."""

    def __init__(self, site: str, norm: float, param: str | None) -> None:
        super().__init__(site)
        self.site, self.norm, self.param = site, norm, param


def combine_site_norms(norms: list[float], p: float) -> float:
    """The ``p``-norm of the sites' (finite) norms, scaled so that it cannot overflow."""
    if not norms:
        return math.nan
    if p == math.inf:
        return max(norms)
    if p == -math.inf:
        return min(norms)
    if p == 0:
        return float(sum(n != 0 for n in norms))
    m = max(norms) if p > 0 else min(norms)
    if not (m > 0 and math.isfinite(m)):
        return m
    return m * sum((n / m) ** p for n in norms) ** (1.0 / p)


class Clip:
    """The ``clip`` callable handed to ``train_step`` for one run (module docstring)."""

    def __init__(
        self, model: torch.nn.Module, cell: Cell, config: SweepConfig, grouping: LayerGrouping | None = None
    ) -> None:
        self.cell = cell
        self.norm_type = cell.norm_type if cell.clipped else 2.0
        self._names = {id(p): n for n, p in model.named_parameters()}
        self.grouping = grouping or LayerGrouping()
        self.config = config  # the rules' options (AGC exclusions, ZClip's cap)
        self._rules: dict[str, Any] = {}  # one rule per call site: AutoClip's history is per site
        self.sites: list[tuple[str, float, float]] = []
        self.layers: list[tuple[str, float]] = []
        self.thresholds: list[float] = []  # per call of this step (NaN: none)
        self.unit_fracs: list[float] = []

    def reset(self) -> None:
        self.sites = []
        self.layers = []
        self.thresholds = []
        self.unit_fracs = []

    def __call__(self, parameters: Tensor | Any, name: str | None = None) -> Tensor:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        named = [(self._names.get(id(p), f"param_{i}"), p) for i, p in enumerate(params)]
        site = str(name) if name is not None else f"call_{len(self.sites) + 1}"
        measured = engine.measure_grad_norms(named, self.norm_type)
        norm = float(measured.total_norm)  # host sync: the norm decides whether the run stops
        if not math.isfinite(norm):
            raise _NonFiniteAtClip(site, norm, measured.first_non_finite())
        if site not in self._rules:
            self._rules[site] = make_rule(self.cell, self.config)
        targets = params
        if self.cell.mode == MODE_AGC and self.config.agc_exclude:
            targets = [p for n, p in named if not agc_excluded(n, self.config.agc_exclude)]
        # the control run only measures (coefficient 1); every other mode as in runner.run_cell
        coef, threshold, unit_frac = apply_clipping(self.cell, self._rules[site], targets, measured.total_norm, norm)
        self.thresholds.append(threshold)
        self.unit_fracs.append(unit_frac)
        if measured.names:
            groups, norms = self.grouping.combine(measured.names, measured.norms, self.norm_type)
            self.layers.extend(zip(groups, norms.tolist()))
        self.sites.append((site, norm, coef))
        return measured.total_norm


def _smallest(values: list[float]) -> float:
    """The smallest of the values that are not NaN; NaN when none is (value and AGC cells have
    no coefficient, most cells no share of units)."""
    present = [v for v in values if not math.isnan(v)]
    return min(present) if present else math.nan


def _largest(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return max(present) if present else math.nan


def _loss_value(experiment: Experiment, out: Any) -> float | None:
    """The step's loss as a float (``None`` when it returned none); ``UserFailure`` for
    anything that is not a scalar."""
    if out is None:
        return None
    if isinstance(out, Tensor):
        if out.numel() != 1:
            raise UserFailure(
                f"train_step must return the loss as a scalar (or None), got shape {tuple(out.shape)}",
                definition_site(experiment.train_step_fn, "train_step"),
            )
        return float(out.detach())
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        return float(out)
    raise UserFailure(
        f"train_step must return the loss as a scalar tensor, a number or None, got {type_name(out)}",
        definition_site(experiment.train_step_fn, "train_step"),
    )


def run_train_step_cell(
    experiment: Experiment,
    model: torch.nn.Module,
    cell: Cell,
    config: SweepConfig,
    *,
    snapshot: Snapshot | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """``runner.run_cell`` for a ``train_step`` script: same arguments, same kind of result
    (``sweep.execute`` picks the loop)."""
    start = time.perf_counter()
    records: list[StepRecord] = []
    device = torch.device(config.device)
    lr = config.lr_of(cell)
    reported = dict(lr=run_lr(experiment, config, cell), seed=config.seed_of(cell))

    def finish(status: str, **kw: Any) -> RunResult:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return RunResult(cell=cell, status=status, steps=records, seconds=time.perf_counter() - start, **reported, **kw)

    try:
        if config.amp != "off" or config.accumulate != 1:
            raise UserFailure(
                "--amp and --accumulate do not apply to a train_step script: its own update decides "
                "precision and accumulation (use autocast, a GradScaler and several backward passes inside train_step)"
            )
        optimizers = start_run(experiment, model, lr, snapshot)
        first_optimizer = optimizer_members(optimizers)[0]
        stream = BatchStream(experiment)
        clip = Clip(model, cell, config)
        first_loss: float | None = None
        for step in range(1, config.steps + 1):
            batch = stream.next()
            if device.type != "cpu":
                batch = to_device(batch, device)
            clip.reset()
            step_lr = float(first_optimizer.param_groups[0]["lr"])  # the first optimizer's, before its step
            try:
                out = call_user(experiment, experiment.train_step_fn, model, batch, optimizers, clip)
            except _NonFiniteAtClip as stop:
                sites = (*clip.sites, (stop.site, stop.norm, math.nan))
                records.append(
                    StepRecord(step, math.nan, stop.norm, layers=tuple(clip.layers), lr=step_lr, sites=sites)
                )
                return finish(NON_FINITE, nan_step=step, nan_source=SOURCE_BACKWARD, nan_param=stop.param)
            if not clip.sites:
                raise UserFailure(
                    "train_step never called clip(parameters): call it where you would call "
                    "torch.nn.utils.clip_grad_norm_, so that gradclip can measure and clip",
                    definition_site(experiment.train_step_fn, "train_step"),
                )
            loss = _loss_value(experiment, out)
            loss_f = math.nan if loss is None else loss
            norm_f = combine_site_norms([n for _, n, _ in clip.sites], clip.norm_type)
            coef = _smallest([c for _, _, c in clip.sites])
            record = StepRecord(
                step,
                loss_f,
                norm_f,
                coef,
                _smallest(clip.thresholds),
                _largest(clip.unit_fracs),
                layers=tuple(clip.layers),
                lr=step_lr,
                sites=tuple(clip.sites),
            )
            if is_non_finite(loss):
                records.append(record)
                return finish(NON_FINITE, nan_step=step, nan_source=SOURCE_FORWARD)
            if first_loss is None and loss is not None:
                first_loss = loss
            elif is_diverged(loss, first_loss, config.divergence_factor):
                records.append(record)
                return finish(DIVERGED, diverged_step=step)
            records.append(record)
            if on_step is not None:
                on_step(step)
        return finish(STABLE)
    except UserFailure as failure:
        return finish(ERROR, error=failure.error, error_traceback=failure.user_traceback)
