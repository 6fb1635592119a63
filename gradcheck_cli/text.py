"""Shared wording: how a number, a clipping setting and a run's outcome are put into words.

The same words in the terminal, JUnit, HTML and the recommendation, so every format and the
analysis say the same thing. Pure functions over ``results``; no rich, no printing. See
docs/diagnosis.md.
"""

from __future__ import annotations

import math

from gradcheck_cli.results import (
    CRASHED,
    DIVERGED,
    ERROR,
    MODE_AGC,
    MODE_AUTOCLIP,
    MODE_NONE,
    MODE_NORM,
    MODE_VALUE,
    MODE_ZCLIP,
    NON_FINITE,
    SOURCE_AMP,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    format_float,
    format_norm_type,
)


def format_number(x: float | int | None) -> str:
    """Compact number for humans: 4 significant digits with a short exponent (``3.457e7``,
    ``1.2e-5``), ``nan``/``inf``/``-inf`` spelled out, ``—`` when there is no value."""
    if x is None:
        return "—"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = f"{x:.4g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


# How each mode's parameter is named in words (the rule's own argument name).
_PARAM_NAMES = {
    MODE_VALUE: "value clip_value",
    MODE_AGC: "agc clip_factor",
    MODE_AUTOCLIP: "autoclip percentile",
    MODE_ZCLIP: "zclip z_thresh",
}


def describe_setting(cell: Cell) -> str:
    """A cell's clipping setting in words: ``max_norm=1 norm_type=2``, ``agc clip_factor=0.01``,
    ``autoclip percentile=10``, ``zclip z_thresh=2.5``, ``value clip_value=0.5``, ``unclipped``."""
    if cell.mode == MODE_NONE:
        return "unclipped"
    if cell.mode == MODE_NORM:
        return f"max_norm={format_float(cell.max_norm)} norm_type={format_norm_type(cell.norm_type)}"
    return f"{_PARAM_NAMES[cell.mode]}={format_float(cell.param)}"


def describe_setting_at_lr(cell: Cell) -> str:
    """``describe_setting`` followed by the cell's lr when the sweep varies it:
    ``max_norm=1 norm_type=2 lr=0.1``."""
    text = describe_setting(cell)
    return text + (f" lr={format_number(cell.lr)}" if cell.lr is not None else "")


def onset_step(result: RunResult) -> int | None:
    """The step where the run went wrong: the non-finite onset, else the divergence step
    (``RunResult.stop_step``)."""
    return result.stop_step()


def describe_result(result: RunResult) -> str:
    """One phrase for a run's outcome, shared by the verdict line, ``check`` and JUnit.

    * ``stable, final loss 0.0619``
    * ``non_finite at step 37 (backward): first non-finite gradient in rnn.weight_hh_l0``
    * ``non_finite at step 3 (forward): the loss is nan``
    * ``non_finite at step 3 (forward, micro-batch 2): the loss is nan`` (with ``--accumulate``)
    * ``non_finite at step 20 (amp): the gradient scaler skipped 20 steps in a row (from step 1);
      non-finite gradient in head.weight``
    * ``diverged at step 2: loss 3.457e+07 vs 1.789 at step 1``
    * ``error: ValueError: shapes do not match``
    * ``crashed: worker process killed by signal SIGKILL (9) during step 4``
    """
    status = result.status
    steps = result.steps
    if status == STABLE:
        final = steps[-1].loss if steps else None
        return f"stable, final loss {format_number(final)}"
    if status == NON_FINITE:
        where = f" at step {result.nan_step}" if result.nan_step is not None else ""
        micro = f", micro-batch {result.nan_micro_batch}" if result.nan_micro_batch is not None else ""
        source = f" ({result.nan_source}{micro})" if result.nan_source else ""
        text = f"non_finite{where}{source}"
        if result.nan_source == SOURCE_AMP:
            run_length = 0
            for record in reversed(steps):
                if not record.skipped:
                    break
                run_length += 1
            text += f": the gradient scaler skipped {run_length} steps in a row"
            if run_length:
                text += f" (from step {steps[-run_length].step})"
            return text + (f"; non-finite gradient in {result.nan_param}" if result.nan_param else "")
        if result.nan_source == SOURCE_FORWARD:
            loss = _loss_at(result, result.nan_step)
            return text + (f": the loss is {format_number(loss)}" if loss is not None else ": the loss is not finite")
        if result.nan_param:
            return text + f": first non-finite gradient in {result.nan_param}"
        if result.nan_source == SOURCE_BACKWARD:
            return text + ": the gradient norm is not finite"
        return text
    if status == DIVERGED:
        where = f" at step {result.diverged_step}" if result.diverged_step is not None else ""
        text = f"diverged{where}"
        loss = _loss_at(result, result.diverged_step)
        if loss is not None and steps:
            text += f": loss {format_number(loss)} vs {format_number(steps[0].loss)} at step {steps[0].step}"
        return text
    if status == ERROR:
        return f"error: {result.error}" if result.error else "error"
    if status == CRASHED:
        return f"crashed: {result.error}" if result.error else "crashed"
    return status


def _loss_at(result: RunResult, step: int | None) -> float | None:
    if step is None:
        return None
    for record in reversed(result.steps):
        if record.step == step:
            return record.loss
    return None
