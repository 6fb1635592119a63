"""Rich renderables for the terminal: the summary table, error panels and one-line verdicts.

Nothing here prints: the CLI decides which console (stdout for data, stderr for hints) gets
what. Nothing here decides either: statuses and onsets come from the runner; ``verdict_line``
words the ranking and the noise rule of ``analysis``.
"""

from __future__ import annotations

import math

from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradcheck_cli.analysis import (
    BASIS_EVAL,
    BASIS_STABILITY,
    best_settings,
    rank,
    rank_settings,
    settings_of,
    summed_loss_text,
    sweep_seeds,
)
from gradcheck_cli.detect import explain_warning
from gradcheck_cli.recommend import what_to_try
from gradcheck_cli.results import (
    CRASHED,
    DIVERGED,
    ERROR,
    MODE_NONE,
    MODE_NORM,
    NON_FINITE,
    STABLE,
    RunResult,
    format_norm_type,
    histogram_counts,
)
from gradcheck_cli.settings import SettingOverSeeds, lr_grid, lrs_vary, over_seeds, seeds_vary
from gradcheck_cli.text import describe_result, describe_setting_at_lr, format_number, onset_step

STATUS_STYLES = {STABLE: "green", DIVERGED: "yellow", NON_FINITE: "red", ERROR: "magenta", CRASHED: "magenta"}

# Eight levels; a bin with no norms is a space, so an empty bin never looks like a small one.
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """One block character per bin, scaled so the fullest bin is ``█``; ``" "`` for 0.

    Any non-zero count shows at least ``▁``: the level is ``ceil(8 * count / max) - 1``.
    """
    peak = max(counts, default=0)
    if peak <= 0:
        return " " * len(counts)
    out = []
    for c in counts:
        if c <= 0:
            out.append(" ")
        else:
            level = min(max(math.ceil(len(SPARK_BLOCKS) * c / peak) - 1, 0), len(SPARK_BLOCKS) - 1)
            out.append(SPARK_BLOCKS[level])
    return "".join(out)


def _percent(frac: float | None) -> str:
    if frac is None or (isinstance(frac, float) and math.isnan(frac)):
        return "—"
    return f"{100.0 * frac:.0f}%"


def _text(value: str | None) -> str:
    return value if value else "—"


def status_text(status: str) -> Text:
    """The status word, coloured (stable green, diverged yellow, non_finite red, error magenta)."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


# (key, header, justify) of every summary column, in order.
_COLUMNS = [
    ("run", "run", "left"),
    ("max_norm", "max\nnorm", "right"),
    ("norm_type", "norm\ntype", "right"),
    ("status", "status", "left"),
    ("onset", "onset\nstep", "right"),
    ("spike", "spike\nstep", "right"),
    ("nan_param", "non-finite\nparam", "left"),
    ("final_loss", "final\nloss", "right"),
    ("min_loss", "min\nloss", "right"),
    ("p50", "norm\np50", "right"),
    ("p95", "norm\np95", "right"),
    ("max", "norm\nmax", "right"),
    ("clipped", "clip-\nped", "right"),
    ("histogram", "norm\nhistogram", "left"),
]
# Added when the sweep varies the lr / the seed.
_LR_COLUMN = ("lr", "lr", "right")
_SPREAD_COLUMN = ("spread", "loss\nspread", "right")
# Left out, in this order, when the console is too narrow for the whole table (the CSV files
# keep everything).
_NARROW_DROP_ORDER = ["min_loss", "p50", "p95", "clipped", "spread", "max", "spike"]
_DROP_NAMES = {
    "min_loss": "min loss",
    "p50": "norm p50",
    "p95": "norm p95",
    "clipped": "clipped",
    "spread": "loss spread",
    "max": "norm max",
    "spike": "spike step",
}


def _columns(results: list[RunResult]) -> list[tuple[str, str, str]]:
    columns = list(_COLUMNS)
    if lrs_vary(results):
        columns.insert(3, _LR_COLUMN)
    if seeds_vary(results):
        at = [key for key, _, _ in columns].index("final_loss")
        columns[at] = ("final_loss", "mean\nfinal\nloss", "right")
        columns.insert(at + 1, _SPREAD_COLUMN)
    return columns


class SummaryTable(Table):
    """A ``Table`` that leaves out its least important columns (min loss, p50, p95, ...) when
    the console is too narrow to show it whole, instead of cutting every number short. On a
    wide enough console it renders exactly as the plain table."""

    def __init__(self, *args, rebuild=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rebuild = rebuild  # drop (a tuple of column keys) -> Table

    def __rich_console__(self, console, options):
        if self._rebuild is None or self.__rich_measure__(console, options).maximum <= options.max_width:
            yield from super().__rich_console__(console, options)
            return
        table: Table = self
        for n in range(1, len(_NARROW_DROP_ORDER) + 1):
            table = self._rebuild(tuple(_NARROW_DROP_ORDER[:n]))
            if table.__rich_measure__(console, options).maximum <= options.max_width:
                break
        yield from Table.__rich_console__(table, console, options)


def summary_table(results: list[RunResult], edges: list[float], title: str | None = "gradclip sweep") -> Table:
    """One row per run, in the order given.

    Columns: run, max_norm (``—`` for the unclipped control and the adaptive rules, whose run
    names carry their parameter), norm_type (the norm measured), status (coloured:
    stable green, diverged yellow, non_finite red, error magenta), onset step (the non-finite
    onset, else the divergence step), first non-finite parameter, final and minimum loss,
    p50/p95/max pre-clip gradient norm, share of steps clipped, and the run's norm histogram
    on the shared log-spaced bins ``edges`` (``results.shared_log_bins``) as a sparkline
    scaled per run. Numbers have 4 significant digits; ``—`` means no value. The caption
    gives the bins' range.

    The layout is compact (two-line headers, no vertical rules, one space between columns)
    and needs about 100 columns. On a narrower console the table leaves out min loss, p50,
    p95, clipped, loss spread and max norm, in that order, until it fits, and says so in its
    caption.

    When the sweep varies the lr, an ``lr`` column follows the norm type. When it varies the
    seed, there is one row per setting over its seeds (``over_seeds``): the status reads
    ``stable 2/3`` (stable in 2 of 3 seeds), the onset is the earliest of the seeds', the
    parameter the first unstable seed's, the final loss is the seeds' mean with its spread
    (largest minus smallest) beside it, and the norm columns pool every seed's steps.
    """
    return _build_summary_table(results, edges, title, drop=(), adaptive=True)


def _run_cells(r: RunResult, edges: list[float]) -> dict:
    row = r.summary_row()
    onset = onset_step(r)
    return {
        "run": r.run,
        "max_norm": format_number(r.cell.max_norm),
        "norm_type": format_norm_type(r.cell.norm_type),
        "lr": format_number(r.lr),
        "status": status_text(r.status),
        "onset": str(onset) if onset is not None else "—",
        "spike": str(r.spike_step) if r.spike_step is not None else "—",
        "nan_param": _text(r.nan_param),
        "final_loss": format_number(row["final_loss"]),
        "min_loss": format_number(row["min_loss"]),
        "p50": format_number(row["grad_norm_p50"]),
        "p95": format_number(row["grad_norm_p95"]),
        "max": format_number(row["grad_norm_max"]),
        "clipped": _percent(row["clipped_frac"]),
        "histogram": Text(sparkline(histogram_counts(r, edges)) if _has_bins(r, edges) else ""),
    }


def _group_cells(group: SettingOverSeeds, edges: list[float]) -> dict:
    pooled = group.pooled()
    cells = _run_cells(pooled, edges)
    onsets = [step for step in (onset_step(r) for r in group.runs) if step is not None]
    unstable = group.first_unstable
    cells.update(
        run=group.cell.run,
        lr=format_number(group.runs[0].lr),
        status=Text(group.stable_text, style=STATUS_STYLES[unstable.status] if unstable else STATUS_STYLES[STABLE]),
        onset=str(min(onsets)) if onsets else "—",
        nan_param=_text(unstable.nan_param if unstable else None),
        final_loss=format_number(group.mean_final_loss),
        spread=format_number(group.final_loss_spread),
    )
    return cells


def _build_summary_table(results, edges, title, drop: tuple[str, ...], adaptive: bool = False) -> Table:
    columns = _columns(results)
    drop = tuple(d for d in drop if d in {key for key, _, _ in columns})
    keys = [key for key, _, _ in columns if key not in drop]
    kwargs = dict(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False)
    # The box's column divider is a space: with no padding, one space separates the columns.
    if adaptive:
        table: Table = SummaryTable(rebuild=lambda d: _build_summary_table(results, edges, title, d), **kwargs)
    else:
        table = Table(**kwargs)
    for key, header, justify in columns:
        if key in drop:
            continue
        if key == "nan_param":
            table.add_column(header, overflow="fold", min_width=6)
        else:
            table.add_column(header, justify=justify, no_wrap=True)
    if seeds_vary(results):
        rows = [_group_cells(group, edges) for group in over_seeds(results)]
    else:
        rows = [_run_cells(r, edges) for r in results]
    for cells in rows:
        table.add_row(*(cells[k] for k in keys))
    notes = []
    if any(k in keys for k in ("p50", "p95", "max", "histogram")):
        notes.append("norms are pre-clip gradient norms")
    if isinstance(edges, dict) and "histogram" in keys:
        ranges = [
            f"{format_norm_type(p)}: {format_number(e[0])} to {format_number(e[-1])}"
            for p, e in edges.items()
            if len(e) >= 2
        ]
        if ranges:
            n = max(len(e) for e in edges.values()) - 1
            notes.append(f"histogram: {n} log-spaced bins per norm type ({'; '.join(ranges)})")
    elif len(edges) >= 2 and "histogram" in keys:
        notes.append(
            f"histogram: {len(edges) - 1} log-spaced bins from {format_number(edges[0])} to "
            f"{format_number(edges[-1])}, shared by all runs"
        )
    if seeds_vary(results):
        notes.append("one row per setting over its seeds; final loss: mean over the seeds")
    if drop:
        notes.append("left out to fit the console: " + ", ".join(_DROP_NAMES[d] for d in drop) + " (see summary.csv)")
    if notes:
        table.caption = "; ".join(notes)
    return table


def stability_map(results: list[RunResult]) -> Table | None:
    """The lr x clipping-setting map: one row per lr, one column per setting (``unclipped``,
    ``clip_1_2``, ...); each entry the run's status, or with several seeds the number of seeds
    in which it was stable (``3/3``). ``None`` when the sweep has a single lr."""
    if not lrs_vary(results):
        return None
    lrs, clips, entries = lr_grid(results)
    several_seeds = seeds_vary(results)
    caption = "entries: seeds stable / seeds" if several_seeds else "entries: status of each run"
    # with the adaptive rules among the columns, they are clipping settings, not max_norms
    title = (
        "stability: lr x max_norm"
        if all(c.mode in (MODE_NONE, MODE_NORM) for c in clips)
        else "stability: lr x clipping"
    )
    table = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("lr", justify="right", no_wrap=True)
    for clip in clips:
        table.add_column(clip.run, justify="center", no_wrap=True)
    for lr in lrs:
        row: list = [format_number(lr)]
        for clip in clips:
            group = entries.get((lr, clip))
            if group is None:
                row.append("—")
            elif several_seeds:
                unstable = group.first_unstable
                style = STATUS_STYLES[unstable.status] if unstable else STATUS_STYLES[STABLE]
                row.append(Text(f"{group.n_stable}/{len(group.runs)}", style=style))
            else:
                row.append(status_text(group.runs[0].status))
        table.add_row(*row)
    return table


def _has_bins(r: RunResult, edges) -> bool:
    e = edges.get(r.cell.norm_type, []) if isinstance(edges, dict) else edges
    return len(e) >= 2


def _setting(r: RunResult) -> str:
    return describe_setting_at_lr(r.cell)


def _group_outcome(group: SettingOverSeeds, several_seeds: bool) -> str:
    if several_seeds:
        return f"{group.stable_text} seeds"
    r = group.runs[0]
    text = describe_result(r)
    return text.split(":", 1)[0] if r.status != STABLE else "stable"


def _controls(groups: list[SettingOverSeeds], several_seeds: bool) -> str | None:
    """``unclipped: lr=0.01 stable, lr=1 diverged at step 2`` (or ``stable 2/3 seeds``)."""
    parts = []
    for g in groups:
        where = f"lr={format_number(g.cell.lr)} " if g.cell.lr is not None else ""
        parts.append(where + _group_outcome(g, several_seeds))
    return "unclipped: " + ", ".join(parts) if parts else None


def _grouped_verdict(results: list[RunResult]) -> str:
    """The verdict when the sweep varies the lr or the seed, with the single-run verdict's cases
    and rules: settings (a clipping cell at an lr) count as stable only if stable in every seed,
    are ranked by ``analysis.rank_settings`` (the mean over the seeds of each run's figure) and
    are only called better beyond noise (across the seeds; with one seed, within the run)."""
    several_seeds = seeds_vary(results)
    seeds = sweep_seeds(results)
    groups = settings_of(results)
    controls = [g for g in groups if not g.cell.clipped]
    ranking = rank_settings(groups, seeds)
    best, best_control = best_settings(ranking)
    every = " in every seed" if several_seeds else ""
    unclipped = _controls(controls, several_seeds)
    if ranking.basis == BASIS_STABILITY:
        return _stability_verdict(
            [g.cell.run for g in ranking.settings if g.cell.clipped],
            best_control is not None,
            f"unclipped is stable{_at_lr(best_control)}{every}" if best_control is not None else None,
            unclipped,
            any(g.cell.clipped for g in groups),
            every,
            list(ranking.objectives),
        )
    noise = f"noise judged by {ranking.noise}"
    if best_control is not None and (best is None or not ranking.better(best, best_control)):
        line = f"clipping not needed: unclipped is stable{_at_lr(best_control)}{every}, {_group_figure(best_control, ranking)}"
        if best is not None:
            return line + (
                f"; no clipped setting is meaningfully better (best: {describe_setting_at_lr(best.cell)}, "
                f"{_group_figure(best, ranking)}; {noise})"
            )
        if any(g.cell.clipped for g in groups):
            return line + f"; no clipped setting was stable{every}"
        return line
    if best is not None:
        seeds_note = f" in all {len(best.runs)} seeds" if several_seeds else ""
        line = f"best: {describe_setting_at_lr(best.cell)} (stable{seeds_note}, {_group_figure(best, ranking)})"
        clipped_ranked = [g for g in ranking.settings if g.cell.clipped]
        tied = [g.cell.run for g in clipped_ranked[1:] if not ranking.better(best, g)]
        if tied:
            line += f"; no meaningful difference from {', '.join(tied)} ({noise})"
        if best_control is not None:
            line += (
                f"; meaningfully better than unclipped{_at_lr(best_control)}: stable{every}, "
                f"{_group_figure(best_control, ranking)}" + ("" if tied else f" ({noise})")
            )
        return f"{line}; {unclipped}" if unclipped else line
    line = f"no clipped setting is stable{every}"
    if unclipped:
        line += f"; {unclipped}"
    return line + "; try smaller max_norm values or a lower learning rate"


def _stability_verdict(
    stable_clipped: list[str],
    control_stable: bool,
    control_text: str | None,
    unclipped: str | None,
    any_clipped: bool,
    every: str,
    objectives: list[str],
) -> str | None:
    """The verdict when the loss measures nothing (``analysis.summed_objectives``): which
    settings were stable, and why nothing is ranked. ``None`` when no clipped setting was stable
    and the control was not either (the usual wording then applies)."""
    why = f"judged on stability only, as {summed_loss_text(objectives)}"
    if control_stable:
        line = f"clipping not needed: {control_text}"
        if stable_clipped:
            return f"{line}; stable too: {', '.join(stable_clipped)}; {why}"
        return f"{line}; no clipped setting was stable{every}" if any_clipped else line
    if stable_clipped:
        line = f"stable{every}: {', '.join(stable_clipped)}"
        return f"{line}; {unclipped}; {why}" if unclipped else f"{line}; {why}"
    return None


def _at_lr(group: SettingOverSeeds) -> str:
    return f" at lr={format_number(group.cell.lr)}" if group.cell.lr is not None else ""


def _group_figure(group: SettingOverSeeds, ranking) -> str:
    """``smoothed loss 0.25``; over several seeds ``mean smoothed loss 0.25`` (or eval_metric)."""
    name = "eval_metric" if ranking.basis == BASIS_EVAL else "smoothed loss"
    mean = "mean " if len(group.runs) > 1 else ""
    return f"{mean}{name} {format_number(ranking.value(group))}"


def _figure(r: RunResult, ranking) -> str:
    value = ranking.value(r)
    name = "eval_metric" if ranking.basis == BASIS_EVAL else "smoothed loss"
    return f"{name} {format_number(value)}"


def _divergence_note(results: list[RunResult]) -> str | None:
    """That divergence was not judged (``--divergence-factor inf``), and what still was: a
    gradient explosion in a run that was not stopped."""
    unchecked = [r for r in results if r.divergence_checked is False and r.steps]
    if not unchecked:
        return None
    note = "divergence not judged (--divergence-factor inf)"
    spiked = [r for r in unchecked if r.status == STABLE and r.spike_step is not None]
    if spiked:
        r = spiked[0]
        where = f"gradients of {r.spike_param}" if r.spike_param else "the gradient norm"
        more = f" (and {len(spiked) - 1} more run{'s' if len(spiked) > 2 else ''})" if len(spiked) > 1 else ""
        note += f"; {r.run}: {where} spike at step {r.spike_step}{more}"
    return note


def verdict_line(results: list[RunResult]) -> str:
    """One line: the best stable clipped setting and what happened unclipped.

    Runs are ranked by ``analysis.rank`` (the script's ``evaluate`` metric, else the smoothed
    loss, or nothing when the loss sums several objectives: ``_stability_verdict``) and a setting
    is only called better when the difference is beyond noise (``analysis``'s rule); every
    judgement of a difference says what the noise was judged by. Unstable runs name their
    gradient spike (``gradients of X spike at step 3, then diverged at step 5: ...``). Cases: a
    best clipped setting exists; the unclipped control is stable and no clipped run is
    meaningfully better (``clipping not needed: ...``); no clipped run is stable (with what to
    try); every run raised. A note says when divergence was not judged. Ties go to the earlier
    run of the sweep. When the sweep varies the lr or the seed, the same cases are worded for
    settings over their seeds (``_grouped_verdict``). The recommendation (``recommend``) applies
    the same rules, so the two never contradict each other (tests/test_one_story.py).
    """
    line = _verdict(results, rank, what_to_try)
    note = _divergence_note(results)
    return f"{line}; {note}" if note else line


def _verdict(results, rank, advice) -> str:
    if not results:
        return "no runs"
    if all(r.status == ERROR for r in results):
        return f"no verdict: all {len(results)} runs raised an error (see the tracebacks above)"
    if lrs_vary(results) or seeds_vary(results):
        return _grouped_verdict(results)
    control = next((r for r in results if not r.cell.clipped), None)
    clipped = [r for r in results if r.cell.clipped]
    ranking = rank(results)
    clipped_ranked = [r for r in ranking.runs if r.cell.clipped]
    best = clipped_ranked[0] if clipped_ranked else None
    unclipped = f"unclipped: {describe_unstable(control)}" if control is not None else None
    control_stable = control is not None and control.status == STABLE
    if ranking.basis == BASIS_STABILITY and clipped:
        line = _stability_verdict(
            [r.run for r in clipped_ranked],
            control_stable,
            "unclipped is stable",
            unclipped,
            True,
            "",
            list(ranking.objectives),
        )
        if line is not None:
            return line
    noise = f"noise judged by {ranking.noise}"
    if control_stable and (best is None or not ranking.better(best, control)):
        if not clipped:
            return unclipped
        line = f"clipping not needed: unclipped is stable, {_figure(control, ranking)}"
        if best is None:
            return line + "; no clipped setting was stable"
        return (
            line
            + f"; no clipped setting is meaningfully better (best: {_setting(best)}, {_figure(best, ranking)}; {noise})"
        )
    if best is not None:
        line = f"best: {_setting(best)} (stable, {_figure(best, ranking)})"
        tied = [r.run for r in clipped_ranked[1:] if not ranking.better(best, r)]
        if tied:
            line += f"; no meaningful difference from {', '.join(tied)} ({noise})"
        if control_stable:
            return f"{line}; meaningfully better than unclipped: stable, {_figure(control, ranking)}" + (
                "" if tied else f" ({noise})"
            )
        return f"{line}; {unclipped}" if unclipped else line
    if not clipped:
        return unclipped or "no runs"
    counts = {}
    for r in clipped:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    line = f"no stable clipped setting ({summary})"
    if unclipped:
        line += f"; {unclipped}"
    if control is None or control.status != STABLE:
        line += f"; {advice(results)}"
    return line


def describe_unstable(r: RunResult) -> str:
    """``describe_result``, led by the gradient spike for an unstable run that had one before
    it stopped: ``gradients of lstm.weight_hh_l0 spike at step 3, then diverged at step 5: ...``."""
    text = describe_result(r)
    stop = r.stop_step()
    if r.status in (DIVERGED, NON_FINITE) and r.spike_step is not None and (stop is None or r.spike_step <= stop):
        where = f"gradients of {r.spike_param}" if r.spike_param else "the gradient norm"
        joint = " and the run " if r.spike_step == stop and r.status == DIVERGED else ", then "
        return f"{where} spike at step {r.spike_step}{joint}{text}"
    return text


def check_line(result: RunResult) -> str:
    """One line for ``gradclip check``: ``PASS``/``FAIL``, the run and its outcome."""
    word = "PASS" if result.status == STABLE else "FAIL"
    return f"{word} {result.run}: {describe_result(result)} ({_steps(len(result.steps))})"


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def error_blocks(results: list[RunResult]) -> list[tuple[str, str]]:
    """``(title, body)`` for each errored or crashed run: its trimmed traceback, and the error's
    explanation when the traceback does not already end with it (a broken contract, such as
    an empty ``batches()``, has only the line where the function is defined; a crashed run has
    only how its worker died)."""
    blocks = []
    for r in results:
        if r.status not in (ERROR, CRASHED):
            continue
        body = (r.error_traceback or "").rstrip()
        if r.error and not body.endswith(r.error):
            body = f"{body}\n{r.error}" if body else r.error
        where = f" after {_steps(len(r.steps))}" if r.steps else ""
        blocks.append((f"{r.run}: {r.status}{where}", body or "no details recorded"))
    return blocks


def error_panels(results: list[RunResult]) -> list[Panel]:
    """One panel per errored or crashed run (``error_blocks``)."""
    return [
        Panel(Text(body), title=Text(title), title_align="left", border_style=STATUS_STYLES[ERROR])
        for title, body in error_blocks(results)
    ]


def warning_lines(results: list[RunResult]) -> list[str]:
    """One line per warning of each run, in words: ``warning: clip_1_2: the loss never changed: ...``."""
    return [f"warning: {r.run}: {explain_warning(code)}" for r in results for code in r.warnings]
