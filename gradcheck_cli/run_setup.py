"""What the two training loops share: building the run's optimizer(s) and scheduler, its lr, its
batches, the clip dispatch of every clipping mode, the per-step loss mean over torchrun ranks
(model mode), and how the user's failures become a run's ``error`` result.

``runner.run_cell`` (a script with ``loss_fn``) and ``train_step.run_train_step_cell`` (a script
with ``train_step``) are built from these pieces; see docs/contract.md ("How a run executes").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from gradcheck_cli import engine
from gradcheck_cli.config import DEFAULT_LR, SweepConfig
from gradcheck_cli.detect import applied_norm, clip_coefficient
from gradcheck_cli.loader import Experiment, definition_site, describe_exception, type_name
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    MODE_AGC,
    MODE_AUTOCLIP,
    MODE_NONE,
    MODE_NORM,
    MODE_VALUE,
    MODE_ZCLIP,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
)
from gradcheck_cli.snapshot import RngState, Snapshot, capture_rng, restore_rng


class UserFailure(Exception):
    """The user's code raised, or broke the contract, during a run.

    ``error`` is ``"ExceptionType: message"`` (or the contract message), ``user_traceback`` the
    trimmed traceback (or where the offending function is defined)."""

    def __init__(self, error: str, user_traceback: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.user_traceback = user_traceback or None


def call_user(experiment: Experiment, fn: Callable, *args: Any) -> Any:
    """Call user code; anything it raises becomes ``UserFailure`` (``KeyboardInterrupt`` passes).

    ``SystemExit`` is caught too: a stray ``sys.exit()`` in the user's loss must not end the
    whole sweep without a report."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:
        raise UserFailure(describe_exception(exc), experiment.format_traceback(exc)) from exc


def error_result(
    cell: Cell,
    failure: UserFailure,
    steps: list[StepRecord] | None = None,
    seconds: float = 0.0,
    *,
    lr: float | None = None,
    seed: int | None = None,
) -> RunResult:
    """A ``RunResult`` with status ``error`` for ``failure``."""
    return RunResult(
        cell=cell,
        status=ERROR,
        steps=list(steps or []),
        seconds=seconds,
        error=failure.error,
        error_traceback=failure.user_traceback,
        lr=lr,
        seed=seed,
    )


def run_lr(experiment: Experiment, config: SweepConfig, cell: Cell) -> float | None:
    """The lr a run starts at, as reported: the lr axis value when given, else the default
    SGD's; ``None`` when the script's own optimizer chose it."""
    lr = config.lr_of(cell)
    if lr is None and experiment.build_optimizer_fn is None:
        return DEFAULT_LR
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every param group trains at ``lr`` (the lr axis replaces the script's values, it does
    not scale them); ``initial_lr`` too where a scheduler already recorded one, so that a
    scheduler built next starts from ``lr``."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                if isinstance(group[key], torch.Tensor):
                    group[key].fill_(lr)
                else:
                    group[key] = lr


def make_scheduler(experiment: Experiment, optimizer: torch.optim.Optimizer):
    """The script's ``build_scheduler(optimizer)``, or ``None`` when it defines none.

    Raises ``UserFailure`` when it raises or returns something that is not a scheduler of
    ``optimizer`` stepped without arguments (``ReduceLROnPlateau`` needs a metric)."""
    fn = experiment.build_scheduler_fn
    if fn is None:
        return None
    scheduler = call_user(experiment, fn, optimizer)
    schedulers = torch.optim.lr_scheduler
    base = getattr(schedulers, "LRScheduler", None) or schedulers._LRScheduler
    site = definition_site(fn, "build_scheduler")
    if isinstance(scheduler, schedulers.ReduceLROnPlateau):
        raise UserFailure(
            "build_scheduler(optimizer) returned ReduceLROnPlateau, which needs a metric at every "
            "step; gradclip steps the scheduler without arguments: use a schedule of the step count",
            site,
        )
    if not isinstance(scheduler, base):
        raise UserFailure(
            f"build_scheduler(optimizer) must return a torch.optim.lr_scheduler.LRScheduler, got {type_name(scheduler)}",
            site,
        )
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise UserFailure(
            "build_scheduler(optimizer) returned a scheduler of another optimizer: build it on the one given",
            site,
        )
    return scheduler


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The first param group's learning rate, as a float."""
    return float(optimizer.param_groups[0]["lr"])


def make_optimizer(experiment: Experiment, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The script's ``build_optimizer(model)`` if it defines one, else ``SGD(lr=lr)``.

    Raises ``UserFailure`` when ``build_optimizer`` raises or returns something that is not a
    ``torch.optim.Optimizer`` (for a ``train_step`` script: nor a non-empty list, tuple or dict
    of them)."""
    fn = experiment.build_optimizer_fn
    if fn is None:
        return torch.optim.SGD(model.parameters(), lr=lr)
    optimizer = call_user(experiment, fn, model)
    if experiment.train_step_fn is not None and isinstance(optimizer, (list, tuple, dict)):
        members = list(optimizer.values() if isinstance(optimizer, dict) else optimizer)
        if members and all(isinstance(o, torch.optim.Optimizer) for o in members):
            return optimizer
        raise UserFailure(
            "build_optimizer(model) must return a torch.optim.Optimizer or a non-empty list, tuple "
            f"or dict of them, got {type_name(optimizer)} holding {', '.join(sorted({type_name(o) for o in members})) or 'nothing'}",
            definition_site(fn, "build_optimizer"),
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserFailure(
            f"build_optimizer(model) must return a torch.optim.Optimizer, got {type_name(optimizer)}",
            definition_site(fn, "build_optimizer"),
        )
    return optimizer


def optimizer_members(optimizers: Any) -> list[torch.optim.Optimizer]:
    """The optimizers of what ``build_optimizer`` returned: one, or a list, tuple or dict of them."""
    if isinstance(optimizers, dict):
        return list(optimizers.values())
    if isinstance(optimizers, (list, tuple)):
        return list(optimizers)
    return [optimizers]


def start_run(
    experiment: Experiment,
    model: torch.nn.Module,
    lr: float | None,
    snapshot: Snapshot | None,
) -> Any:
    """Put the process where every run of the sweep with this seed starts, and return the
    run's optimizer(s): the snapshot's global torch state, weights and RNG restored, the
    optimizer(s) built anew (``make_optimizer``) and loaded with the snapshot's state, every
    param group at ``lr`` when the sweep sets it. Raises ``UserFailure`` when ``build_optimizer``
    does not build the same optimizer(s) as on its first call."""
    if snapshot is not None:
        snapshot.restore_global_state()
        snapshot.restore_model(model)
        snapshot.restore_rng()
    model.train()
    optimizers = make_optimizer(experiment, model, lr if lr is not None else DEFAULT_LR)
    several = isinstance(optimizers, (list, tuple, dict))
    site = definition_site(experiment.build_optimizer_fn, "build_optimizer") if experiment.build_optimizer_fn else None
    if snapshot is not None:
        if not several and snapshot.optimizer_class is not None and type(optimizers) is not snapshot.optimizer_class:
            raise UserFailure(
                "build_optimizer(model) returned an optimizer that does not match the first one it built "
                f"({type(optimizers).__name__}, first {snapshot.optimizer_class.__name__}); it must build the same optimizer on every call",
                site,
            )
        try:
            snapshot.restore_optimizer(optimizers)
        except (ValueError, KeyError, RuntimeError) as exc:
            what = (
                "optimizers that do not match the first ones"
                if several
                else "an optimizer that does not match the first one"
            )
            raise UserFailure(
                f"build_optimizer(model) returned {what} it built ({describe_exception(exc)}); "
                f"it must build the same optimizer{'s' if several else ''} on every call",
                site,
            ) from exc
    if lr is not None:  # the lr axis: every optimizer trains at it
        for optimizer in optimizer_members(optimizers):
            set_lr(optimizer, lr)
    return optimizers


def to_device(batch: Any, device: str | torch.device) -> Any:
    """``batch`` with every tensor moved to ``device``, looking inside tuples (named tuples
    too), lists and dicts; anything else is returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        moved = [to_device(b, device) for b in batch]
        try:
            return type(batch)(moved)
        except TypeError:
            return moved if isinstance(batch, list) else tuple(moved)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    return batch


class BatchStream:
    """Endless batches from ``batches()``: called on first use and again each time it runs out.

    Raises ``UserFailure`` when ``batches()`` raises, returns something that is not iterable, or
    yields nothing at all (on the first call or after a pass)."""

    def __init__(self, experiment: Experiment, record_rng: torch.device | None = None) -> None:
        self._experiment = experiment
        self._it = None
        self._passes = 0
        self._in_pass = 0
        # With ``record_rng`` (a device), the random-number state before every batch drawn:
        # what ``fast_forward`` needs to bring a fresh stream to the same position.
        self._record_rng = record_rng
        self.pulls: list[RngState] = []

    def fast_forward(self, pulls: tuple[RngState, ...] | list[RngState]) -> None:
        """Draw as many batches as ``pulls`` holds, each from the random-number state another
        stream drew it from: iterators the user's ``batches()`` returns (a shuffling
        ``DataLoader`` draws its order as a pass starts) end up where that stream's were. The
        batches themselves are dropped; the caller restores the random-number state after."""
        for state in pulls:
            restore_rng(state)
            self.next()

    def _fresh(self) -> None:
        fn = self._experiment.batches_fn
        iterable = call_user(self._experiment, fn)
        if not hasattr(iterable, "__iter__") and not hasattr(iterable, "__getitem__"):
            raise UserFailure(
                f"batches() must return an iterable of batches, got {type_name(iterable)}",
                definition_site(fn, "batches"),
            )
        try:
            self._it = iter(iterable)
        except (Exception, SystemExit) as exc:  # e.g. a DataLoader whose workers cannot start
            raise UserFailure(describe_exception(exc), self._experiment.format_traceback(exc)) from exc
        self._passes += 1
        self._in_pass = 0

    def _pull(self) -> tuple[bool, Any]:
        try:
            return True, next(self._it)
        except StopIteration:
            return False, None
        except (
            Exception,
            SystemExit,
        ) as exc:  # raised by the user's generator or dataset
            raise UserFailure(describe_exception(exc), self._experiment.format_traceback(exc)) from exc

    def next(self) -> Any:
        if self._record_rng is not None:
            self.pulls.append(capture_rng(self._record_rng))
        if self._it is None:
            self._fresh()
        ok, batch = self._pull()
        if not ok:
            previous = self._in_pass
            self._fresh()
            ok, batch = self._pull()
            if not ok:
                fn = self._experiment.batches_fn
                if self._passes == 1 or previous == 0:
                    msg = "batches() yielded no batches: it must return a non-empty iterable"
                else:
                    msg = (
                        f"batches() yielded no batches when called again after its first pass of "
                        f"{previous} batches ran out; it must return a fresh iterable on every call"
                    )
                raise UserFailure(msg, definition_site(fn, "batches"))
        self._in_pass += 1
        return batch


def judged_norm(cell: Cell, norm: float) -> float:
    """The norm the divergence test judges at a step (``detect.Divergence.norm_diverged``): the
    one the update applies, unclipped or under a fixed ``max_norm``. NaN for the adaptive rules
    and value and AGC clipping, which bound the update relative to the run's own history or per
    element and unit by construction."""
    if cell.mode in (MODE_NONE, MODE_NORM):
        return applied_norm(norm, cell.max_norm)
    return math.nan


def evaluate_model(experiment: Experiment, model: torch.nn.Module) -> float:
    """The script's ``evaluate(model)`` as a float, in eval mode without gradients. Raises
    ``UserFailure`` when it raises or returns something that is not a single number."""
    fn = experiment.evaluate_fn
    model.eval()
    try:
        with torch.no_grad():
            value = call_user(experiment, fn, model)
    finally:
        model.train()
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        raise UserFailure(
            f"evaluate(model) must return a number, got {type_name(value)}", definition_site(fn, "evaluate")
        ) from None


def evaluation(experiment: Experiment, model: torch.nn.Module, status: str) -> dict:
    """``eval_metric`` and its direction for a run that ended with ``status``, as ``RunResult``
    fields: ``evaluate(model)`` runs at the end of every run that stayed finite, stable or
    diverged. A stable run's failing ``evaluate`` is the run's error (``UserFailure``); a
    diverged model may break it (non-finite outputs), so there it only leaves no metric."""
    if experiment.evaluate_fn is None or status not in (STABLE, DIVERGED):
        return {}
    try:
        metric = evaluate_model(experiment, model)
    except UserFailure:
        if status == STABLE:
            raise
        return {}
    return {"eval_metric": metric, "eval_higher_is_better": experiment.evaluate_higher_is_better}


def make_rule(cell: Cell, config: SweepConfig) -> Any:
    """A fresh rule object for an AGC, AutoClip or ZClip cell (ZClip's other parameters at the
    reference defaults, its cap ``config.zclip_max_norm``); ``None`` for the other modes."""
    if cell.mode == MODE_AGC:
        return engine.AGC(clip_factor=cell.param)
    if cell.mode == MODE_AUTOCLIP:
        return engine.AutoClip(percentile=cell.param)
    if cell.mode == MODE_ZCLIP:
        return engine.ZClip(z_thresh=cell.param, max_grad_norm=config.zclip_max_norm)
    return None


def apply_clipping(
    cell: Cell, rule: Any, params: list[torch.Tensor], norm: torch.Tensor, norm_f: float
) -> tuple[float, float, float]:
    """Clip the (finite) gradients of ``params`` as ``cell`` says, given their pre-clip norm
    (``norm`` on the device, ``norm_f`` on the host, in the cell's norm type: L2 for the rules).

    ``params`` are the parameters the mode acts on (AGC's exclusions already removed).
    Returns ``(clip_coef, clip_threshold, clipped_unit_frac)`` for the step's record, NaN where
    the mode has none."""
    nan = math.nan
    if cell.mode == MODE_NONE:
        return 1.0, nan, nan  # the control run only measures; it never clips
    if cell.mode == MODE_NORM:
        engine.clip_grads_with_norm_(params, cell.max_norm, norm)
        return clip_coefficient(norm_f, cell.max_norm), cell.max_norm, nan
    if cell.mode == MODE_VALUE:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return nan, nan, 0.0
        over = _values_over(grads, cell.param)  # counted before clamping
        engine.clip_grad_value_(params, cell.param)
        return nan, nan, over / sum(g.numel() for g in grads)
    if cell.mode == MODE_AGC:
        rule.clip(params, total_norm=norm)
        return nan, nan, rule.last.clipped_frac
    rule.clip(params, total_norm=norm)  # AutoClip, ZClip
    threshold = rule.last.threshold
    if threshold is None:  # ZClip without a cap and no spike: nothing applied
        return 1.0, nan, nan
    # the norm cells' coefficient, computed the same way (float64), so the columns compare
    return clip_coefficient(norm_f, threshold), threshold, nan


def _values_over(grads: list[torch.Tensor], value: float) -> int:
    """How many gradient elements exceed ``value`` in magnitude, in one host read; a sparse
    gradient by its coalesced values (duplicates summed, as ``clip_grad_value_`` clamps them)."""
    dense = [g.coalesce().values() if g.is_sparse else g for g in grads]
    return int(torch.stack([(g.abs() > value).sum().to(grads[0].device) for g in dense]).sum())


def unchanged_clipping(
    cell: Cell, rule: Any, params: list[torch.Tensor], norm: torch.Tensor, norm_f: float
) -> tuple[float, float, float] | None:
    """What ``apply_clipping`` would return for these gradients when it would leave every one
    of them as it is (bit for bit), without touching them; ``None`` when it would change some.
    A rule's state advances as ``apply_clipping`` advances it. Sparse gradients always count
    as changed (clipping coalesces them in place). The control run's trajectory is every
    cell's until the step this says ``None`` for (docs/diagnosis.md, "Shared runs")."""
    nan = math.nan
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        return None
    if cell.mode == MODE_NONE:
        return 1.0, nan, nan
    if cell.mode == MODE_NORM:
        if cell.max_norm != math.inf and engine.host_clip_coef(cell.max_norm, norm_f, norm.dtype) < 1.0:
            return None
        return clip_coefficient(norm_f, cell.max_norm), cell.max_norm, nan
    if cell.mode == MODE_VALUE:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return nan, nan, 0.0
        return None if _values_over(grads, cell.param) else (nan, nan, 0.0)
    if cell.mode == MODE_AGC:
        return None if rule.clipped_units(params) else (nan, nan, 0.0)
    threshold = rule.observe(norm_f)  # AutoClip, ZClip: the state advances as in clip()
    if threshold is None:
        return 1.0, nan, nan
    if threshold != math.inf and engine.host_clip_coef(threshold, norm_f, norm.dtype) < 1.0:
        return None
    return clip_coefficient(norm_f, threshold), threshold, nan


# The process group of a sweep running in model mode in this process (``ranks.RankGroup`` sets it
# for the sweep's duration): each step's loss is averaged over it (``mean_across_ranks``).
_model_group: Any = None


def set_model_group(group: Any) -> None:
    """Average every step's loss over ``group`` from now on (``None``: no longer)."""
    global _model_group
    _model_group = group


def mean_across_ranks(losses: list) -> list:
    """The step's micro-batch losses averaged over the ranks in model mode (one all-reduce),
    so that every rank judges the same numbers; unchanged otherwise."""
    if _model_group is None or not losses:
        return losses
    stacked = torch.stack(
        [loss.detach().float() if loss.dtype in (torch.float16, torch.bfloat16) else loss.detach() for loss in losses]
    )
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=_model_group)
    stacked = stacked / dist.get_world_size(_model_group)
    return list(stacked.unbind(0))
