"""Shared wording: how a number, a clipping setting and a run's outcome are put into words.

The same words in the terminal, JUnit, HTML and the recommendation, so every format and the
analysis say the same thing. Pure functions over ``results``; no rich, no printing. See
docs/diagnosis.md.
"""

from __future__ import annotations

import math

from gradcheck_cli.detect import EARLY_MIN, EVAL_COLLAPSED, applied_norm, loss_range, norm_level
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
    * ``diverged at step 9: loss 41.2 vs 0.58 to 11.6 over steps 1-3`` (the early range)
    * ``diverged at step 6: gradient norm 2.73e4 about to be applied, 3602x its running median 7.58``
    * ``diverged: evaluate() gave 9.4 at the end, worse than 22 before training``
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
        return _describe_divergence(result)
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


def _describe_divergence(result: RunResult) -> str:
    """Why a run diverged, from its recorded steps (docs/diagnosis.md, "Divergence"): the loss
    against its early range, the norm about to be applied against its running median (the
    stopping step has a norm but no coefficient applied), or ``evaluate`` against the untrained
    model (no stopping step)."""
    step = result.diverged_step
    if step is None:
        before = eval_before(result)
        after = format_number(result.eval_metric)
        if before is None:
            return f"diverged: evaluate() gave {after} at the end"
        return f"diverged: evaluate() gave {after} at the end, worse than {format_number(before)} before training"
    text = f"diverged at step {step}"
    stop = next((s for s in reversed(result.steps) if s.step == step), None)
    if stop is None:
        return text
    earlier = [s for s in result.steps if s.step < step and not s.skipped]
    if result.cell.mode in (MODE_NONE, MODE_NORM) and math.isnan(stop.clip_coef) and math.isfinite(stop.grad_norm):
        return text + _norm_reason(result, stop, earlier)
    finite = [s for s in earlier if math.isfinite(s.loss)]
    reference = loss_range([s.loss for s in finite], 1.0)
    if reference is None or not math.isfinite(stop.loss):
        return text
    loss = format_number(stop.loss)
    if reference.n == 1:
        return text + f": loss {loss} vs {format_number(reference.low)} at step {finite[0].step}"
    if reference.has_level:
        first = finite[: min(reference.n, EARLY_MIN)]
        return (
            text
            + f": loss {loss} vs {format_number(reference.level)} at the start (steps {first[0].step}-{first[-1].step})"
        )
    low, high = format_number(reference.low), format_number(reference.high)
    return text + f": loss {loss} vs {low} to {high} over steps {finite[0].step}-{finite[reference.n - 1].step}"


def _norm_reason(result: RunResult, stop, earlier: list) -> str:
    """``: gradient norm X about to be applied, Rx its running median M`` (at which clip site,
    for a ``train_step`` script)."""
    if stop.sites:
        site, norm, _ = stop.sites[-1]
        history = [n * c for s in earlier for name, n, c in s.sites if name == site]
        where = f" at clip site {site}"
    else:
        norm = stop.grad_norm
        history = [s.grad_norm * s.clip_coef for s in earlier]
        where = ""
    applied = applied_norm(norm, result.cell.max_norm)
    level = norm_level(history)
    if level is None:
        return f": gradient norm {format_number(applied)} about to be applied{where}"
    return (
        f": gradient norm {format_number(applied)} about to be applied{where}, "
        f"{format_number(applied / level)}x its running median {format_number(level)}"
    )


def eval_before(result: RunResult) -> float | None:
    """The untrained model's ``evaluate`` metric, as recorded with a collapse (``detect``'s
    ``eval_collapsed`` warning); ``None`` when the run has none."""
    for code in result.warnings:
        name, _, ref = code.partition(":")
        if name == EVAL_COLLAPSED and ref:
            try:
                return float(ref)
            except ValueError:
                return None
    return None


def sharing_line(results: list[RunResult]) -> str | None:
    """What the sweep took from its control runs instead of training (docs/diagnosis.md,
    "Shared runs"); ``None`` when it took nothing."""
    free = [r for r in results if r.shared_steps and r.shared_steps == len(r.steps)]
    forked = [r for r in results if 0 < r.shared_steps < len(r.steps)]
    if not free and not forked:
        return None
    total = sum(len(r.steps) for r in results)
    trained = total - sum(r.shared_steps for r in results)
    parts = []
    if free:
        parts.append(f"{len(free)} identical to their control run, not trained ({_names(free)})")
    if forked:
        shown = _names(forked, lambda r: f"{r.run} from step {r.shared_steps + 1}")
        parts.append(f"{len(forked)} started from their control run where their clipping first acts ({shown})")
    return (
        f"shared runs: {'; '.join(parts)}; {trained} of {total} steps trained "
        "(the results are those of training every run from step 1, which --no-share does)"
    )


def _names(results: list[RunResult], name=lambda r: r.run, most: int = 4) -> str:
    shown = [name(r) for r in results[:most]]
    return ", ".join(shown) + (f" and {len(results) - most} more" if len(results) > most else "")
