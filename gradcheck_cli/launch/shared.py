"""Free cells of a sweep of the user's own command: a cell whose clipping would change no
gradient on any step of the control run is that run, step for step (a run of the command is
deterministic on the CPU), so its result is built from the control's rows without running the
command again. Only from numbers the control recorded: the L2 norm it measures in (norm cells of
norm type 2, AutoClip and ZClip, which measure L2 too), and its inf norm for value clipping. Cells
that measure in another norm type (their per-layer rows would differ) and AGC (its units are not
recorded) run; no cell forks (there is no snapshot of another process). See docs/your-command.md
and docs/diagnosis.md ("Shared runs").
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from gradcheck_cli import engine
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.detect import Divergence, clip_coefficient
from gradcheck_cli.results import (
    DIVERGED,
    MODE_AUTOCLIP,
    MODE_NORM,
    MODE_VALUE,
    MODE_ZCLIP,
    NON_FINITE,
    STABLE,
    Cell,
    RunResult,
)
from gradcheck_cli.run_setup import make_rule


def _leaves_alone(threshold: float, norm: float) -> bool:
    """Clipping the total ``norm`` to ``threshold`` multiplies by exactly 1: in float32 and
    float64 (whichever the measured total was), and by the recorded coefficient."""
    if threshold == math.inf:
        return True
    return (
        engine.host_clip_coef(threshold, norm, torch.float32) >= 1.0
        and engine.host_clip_coef(threshold, norm, torch.float64) >= 1.0
        and clip_coefficient(norm, threshold) == 1.0
    )


def _row(cell: Cell, rule, step) -> tuple[float, float, float] | None:
    """The cell's ``(clip_coef, clip_threshold, clipped_unit_frac)`` at a control step whose
    norm is finite, as the run would record them; ``None`` when its clipping would act."""
    nan, norm = math.nan, step.grad_norm
    if cell.mode == MODE_NORM:
        return (1.0, cell.max_norm, nan) if _leaves_alone(cell.max_norm, norm) else None
    if cell.mode == MODE_VALUE:
        largest = dict(step.norms).get(math.inf)
        if largest is None or not largest <= cell.param:
            return None
        return nan, nan, 0.0
    threshold = rule.observe(norm)  # AutoClip, ZClip: their state advances as in clip()
    if threshold is None:
        return 1.0, nan, nan
    return (1.0, threshold, nan) if _leaves_alone(threshold, norm) else None


def free_result(cell: Cell, control: RunResult, config: SweepConfig) -> RunResult | None:
    """``cell``'s result built from the ``control`` run's (as the run recorded it, before any
    annotation), or ``None`` when the cell must run: its clipping would act on some step, its
    verdict would end it elsewhere, or the control's rows do not hold what it measures."""
    shares_norms = cell.mode in (MODE_AUTOCLIP, MODE_ZCLIP, MODE_VALUE) or (
        cell.mode == MODE_NORM and cell.norm_type == control.cell.norm_type
    )
    if not shares_norms or control.status not in (STABLE, NON_FINITE, DIVERGED) or not control.steps:
        return None
    rule = make_rule(cell, config)
    divergence = Divergence(config.divergence_factor)
    rows, status, diverged_step = [], STABLE, None
    for step in control.steps:
        coef, threshold, unit_frac = math.nan, math.nan, math.nan
        if math.isfinite(step.grad_norm):  # else nothing is clipped, and no rule sees the step
            row = _row(cell, rule, step)
            if row is None:
                return None
            coef, threshold, unit_frac = row
            if step.skipped:  # no update was made: the run keeps no coefficient
                coef = math.nan
        rows.append(replace(step, clip_coef=coef, clip_threshold=threshold, clipped_unit_frac=unit_frac, norms=()))
        if control.status == NON_FINITE and step.step == control.nan_step:
            break  # the control's non-finite verdict is the cell's: the same numbers
        applied = step.grad_norm * coef if math.isfinite(coef) else math.nan
        if divergence.loss_diverged(step.loss) or divergence.norm_diverged(applied):
            status, diverged_step = DIVERGED, step.step
            break
    if control.status == NON_FINITE:
        if len(rows) != len(control.steps):
            return None
        status = NON_FINITE
    elif (status, diverged_step, len(rows)) != (control.status, control.diverged_step, len(control.steps)):
        return None  # the cell would stop elsewhere, or go on where the control stopped
    return replace(
        control,
        cell=cell,
        name=None,
        steps=rows,
        status=status,
        diverged_step=diverged_step,
        seconds=0.0,
        shared_steps=len(rows),
    )
