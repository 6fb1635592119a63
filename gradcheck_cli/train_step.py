"""One run of a script that defines ``train_step`` instead of ``loss_fn``.

``train_step(model, batch, optimizers, clip)`` runs one update the script's own way and calls
``clip(parameters, name=None)`` where it would call ``torch.nn.utils.clip_grad_norm_``. ``Clip``
measures those gradients with gradclip's engine, stops the run at a non-finite norm, or one
exploding above its site's running level, before anything is clipped, applies the cell's
clipping per call site and returns the pre-clip norm; ``run_train_step_cell`` runs the steps,
judges the loss as ``runner.run_cell`` does and calls ``evaluate`` at the end. The
contract, how the sites combine into a step's row, and what does not apply (``--amp``,
``--accumulate``, ``build_scheduler``) are in docs/contract.md ("Your own update: train_step").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from gradcheck_cli import engine
from gradcheck_cli.config import SweepConfig, agc_excluded
from gradcheck_cli.detect import Divergence, is_non_finite
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
    evaluation,
    judged_norm,
    make_rule,
    optimizer_members,
    run_lr,
    start_run,
    to_device,
    unchanged_clipping,
)
from gradcheck_cli.snapshot import Snapshot


class StopAtClip(BaseException):
    """Raised by ``clip`` through the user's ``train_step`` to stop the run before clipping.
    A ``BaseException``, so that the user's ``except Exception`` does not swallow it."""

    def __init__(self, site: str, norm: float, param: str | None) -> None:
        super().__init__(site)
        self.site, self.norm, self.param = site, norm, param


class DivergedAtClip(StopAtClip):
    """Raised by ``clip`` when the norm about to be applied at a site has exploded above its
    running level there (``detect.Divergence.norm_diverged``): the run stops before clipping."""


class ClippingActs(Exception):
    """Raised by a dry ``Clip.judge_and_clip`` when the cell's clipping would change a gradient
    at this call (``run_setup.unchanged_clipping``)."""


class ClipObserver(Protocol):
    """Sees each step of a ``train_step`` run (the control run of a sweep that shares it with
    its cells, ``shadows.TrainStepShadows``): every clip call once measured, before it is
    judged, and every step's end before its loss is judged."""

    def start_step(self, step: int, lr: float) -> None: ...

    def at_clip(self, site: str, params: list, named: list, measured: Any) -> None: ...

    def end_step(self, step: int, loss: float | None, lr: float) -> None: ...


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


def measured_norm_type(cell: Cell) -> float:
    """The norm type ``clip`` measures in for ``cell``: the cell's own, L2 for the control."""
    return cell.norm_type if cell.clipped else 2.0


class Clip:
    """The ``clip`` callable handed to ``train_step`` for one run (module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cell: Cell,
        config: SweepConfig,
        grouping: LayerGrouping | None = None,
        divergence: Divergence | None = None,
        observer: ClipObserver | None = None,
    ) -> None:
        self.observer = observer
        self.cell = cell
        self.divergence = divergence  # judges each site's norm against its own running level
        self.norm_type = measured_norm_type(cell)
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
        if self.observer is not None:
            self.observer.at_clip(site, params, named, measured)
        return self.judge_and_clip(site, params, named, measured)

    def judge_and_clip(self, site: str, params: list, named: list, measured: Any, dry: bool = False) -> Tensor:
        """Stop the run at a non-finite or diverging norm, else clip as the cell says and keep
        the call's numbers. ``dry`` (a cell following the control, ``shadows.py``): nothing is
        clipped, and ``ClippingActs`` is raised where clipping would change a gradient."""
        norm = float(measured.total_norm)  # host sync: the norm decides whether the run stops
        if not math.isfinite(norm):
            raise StopAtClip(site, norm, measured.first_non_finite())
        if self.divergence is not None and self.divergence.norm_diverged(judged_norm(self.cell, norm), site):
            raise DivergedAtClip(site, norm, None)
        if site not in self._rules:
            self._rules[site] = make_rule(self.cell, self.config)
        targets = params
        if self.cell.mode == MODE_AGC and self.config.agc_exclude:
            targets = [p for n, p in named if not agc_excluded(n, self.config.agc_exclude)]
        # the control run only measures (coefficient 1); every other mode as in runner.run_cell
        if dry:
            clipping = unchanged_clipping(self.cell, self._rules[site], targets, measured.total_norm, norm)
            if clipping is None:
                raise ClippingActs(site)
        else:
            clipping = apply_clipping(self.cell, self._rules[site], targets, measured.total_norm, norm)
        coef, threshold, unit_frac = clipping
        self.thresholds.append(threshold)
        self.unit_fracs.append(unit_frac)
        if measured.names:
            groups, norms = self.grouping.combine(measured.names, measured.norms, self.norm_type)
            self.layers.extend(zip(groups, norms.tolist()))
        self.sites.append((site, norm, coef))
        return measured.total_norm

    def step_record(self, step: int, loss: float, lr: float) -> StepRecord:
        """The step's row of ``steps.csv``: the norm of the sites' norms, the smallest coefficient
        and threshold, the largest share of units clipped, every site's layers."""
        return StepRecord(
            step,
            loss,
            combine_site_norms([n for _, n, _ in self.sites], self.norm_type),
            _smallest([c for _, _, c in self.sites]),
            _smallest(self.thresholds),
            _largest(self.unit_fracs),
            layers=tuple(self.layers),
            lr=lr,
            sites=tuple(self.sites),
        )


def stopped_at_clip(clip: Clip, stop: StopAtClip, step: int, lr: float) -> tuple[StepRecord, str, dict]:
    """The row, status and result fields of a step a clip call stopped: its sites so far and
    the stopping one (no coefficient), the norm as a row shows it."""
    sites = (*clip.sites, (stop.site, stop.norm, math.nan))
    diverged = isinstance(stop, DivergedAtClip)
    norm = combine_site_norms([n for _, n, _ in sites], clip.norm_type) if diverged else stop.norm
    record = StepRecord(step, math.nan, norm, layers=tuple(clip.layers), lr=lr, sites=sites)
    if diverged:
        return record, DIVERGED, {"diverged_step": step}
    return record, NON_FINITE, {"nan_step": step, "nan_source": SOURCE_BACKWARD, "nan_param": stop.param}


def step_end(
    clip: Clip, divergence: Divergence, step: int, loss: float | None, lr: float
) -> tuple[StepRecord, str | None, dict]:
    """The row of a step ``train_step`` completed, and the status and fields when its loss
    ends the run (non-finite, or diverged), else ``None``."""
    record = clip.step_record(step, math.nan if loss is None else loss, lr)
    if is_non_finite(loss):
        return record, NON_FINITE, {"nan_step": step, "nan_source": SOURCE_FORWARD}
    if divergence.loss_diverged(loss):
        return record, DIVERGED, {"diverged_step": step}
    return record, None, {}


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
    observer: ClipObserver | None = None,
) -> RunResult:
    """``runner.run_cell`` for a ``train_step`` script: same arguments, same kind of result
    (``sweep.execute`` picks the loop); ``observer`` sees every clip call and step end."""
    start = time.perf_counter()
    records: list[StepRecord] = []
    device = torch.device(config.device)
    lr = config.lr_of(cell)
    reported = dict(lr=run_lr(experiment, config, cell), seed=config.seed_of(cell))

    divergence = Divergence(config.divergence_factor)

    def finish(status: str, **kw: Any) -> RunResult:
        """The run's result, with ``evaluate`` after a stable or diverged run (``evaluation``)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        kw.update(evaluation(experiment, model, status))
        if records:
            kw.setdefault("divergence_checked", divergence.active)
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
        clip = Clip(model, cell, config, divergence=divergence, observer=observer)
        for step in range(1, config.steps + 1):
            batch = stream.next()
            if device.type != "cpu":
                batch = to_device(batch, device)
            clip.reset()
            step_lr = float(first_optimizer.param_groups[0]["lr"])  # the first optimizer's, before its step
            if observer is not None:
                observer.start_step(step, step_lr)
            try:
                out = call_user(experiment, experiment.train_step_fn, model, batch, optimizers, clip)
            except StopAtClip as stop:
                record, status, fields = stopped_at_clip(clip, stop, step, step_lr)
                records.append(record)
                return finish(status, **fields)
            if not clip.sites:
                raise UserFailure(
                    "train_step never called clip(parameters): call it where you would call "
                    "torch.nn.utils.clip_grad_norm_, so that gradclip can measure and clip",
                    definition_site(experiment.train_step_fn, "train_step"),
                )
            loss = _loss_value(experiment, out)
            if observer is not None:
                observer.end_step(step, loss, step_lr)
            record, status, fields = step_end(clip, divergence, step, loss, step_lr)
            records.append(record)
            if status is not None:
                return finish(status, **fields)
            if on_step is not None:
                on_step(step)
        return finish(STABLE)
    except UserFailure as failure:
        return finish(ERROR, error=failure.error, error_traceback=failure.user_traceback)
