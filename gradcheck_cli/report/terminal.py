"""Rich renderables for the terminal: the summary table, error panels and one-line verdicts.

Nothing here prints: the CLI decides which console (stdout for data, stderr for hints) gets
what. Nothing here decides either: statuses and onsets come from the runner; ``verdict_line``
only ranks the runs it is given by final loss.
"""

from __future__ import annotations

import math

from rich import box
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gradcheck_cli.report import describe_result, format_number, onset_step
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    NON_FINITE,
    STABLE,
    RunResult,
    format_norm_type,
    histogram_counts,
)

STATUS_STYLES = {STABLE: "green", DIVERGED: "yellow", NON_FINITE: "red", ERROR: "magenta"}

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
    ("nan_param", "non-finite\nparam", "left"),
    ("final_loss", "final\nloss", "right"),
    ("min_loss", "min\nloss", "right"),
    ("p50", "norm\np50", "right"),
    ("p95", "norm\np95", "right"),
    ("max", "norm\nmax", "right"),
    ("clipped", "clip-\nped", "right"),
    ("histogram", "norm\nhistogram", "left"),
]
# Left out, in this order, when the console is too narrow for the whole table (the CSV files
# keep everything).
_NARROW_DROP_ORDER = ["min_loss", "p50", "p95", "clipped", "max"]


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

    Columns: run, max_norm (``—`` for the unclipped control), norm_type, status (coloured:
    stable green, diverged yellow, non_finite red, error magenta), onset step (the non-finite
    onset, else the divergence step), first non-finite parameter, final and minimum loss,
    p50/p95/max pre-clip gradient norm, share of steps clipped, and the run's norm histogram
    on the shared log-spaced bins ``edges`` (``results.shared_log_bins``) as a sparkline
    scaled per run. Numbers have 4 significant digits; ``—`` means no value. The caption
    gives the bins' range.

    The layout is compact (two-line headers, no vertical rules, one space between columns)
    and needs about 100 columns. On a narrower console the table leaves out min loss, p50,
    p95, clipped and max norm, in that order, until it fits, and says so in its caption.
    """
    return _build_summary_table(results, edges, title, drop=(), adaptive=True)


def _build_summary_table(results, edges, title, drop: tuple[str, ...], adaptive: bool = False) -> Table:
    keys = [key for key, _, _ in _COLUMNS if key not in drop]
    kwargs = dict(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False)
    # The box's column divider is a space: with no padding, one space separates the columns.
    if adaptive:
        table: Table = SummaryTable(rebuild=lambda d: _build_summary_table(results, edges, title, d), **kwargs)
    else:
        table = Table(**kwargs)
    for key, header, justify in _COLUMNS:
        if key in drop:
            continue
        if key == "nan_param":
            table.add_column(header, overflow="fold", min_width=6)
        else:
            table.add_column(header, justify=justify, no_wrap=True)
    for r in results:
        row = r.summary_row()
        onset = onset_step(r)
        cells = {
            "run": r.run,
            "max_norm": format_number(r.cell.max_norm),
            "norm_type": format_norm_type(r.cell.norm_type),
            "status": status_text(r.status),
            "onset": str(onset) if onset is not None else "—",
            "nan_param": _text(r.nan_param),
            "final_loss": format_number(row["final_loss"]),
            "min_loss": format_number(row["min_loss"]),
            "p50": format_number(row["grad_norm_p50"]),
            "p95": format_number(row["grad_norm_p95"]),
            "max": format_number(row["grad_norm_max"]),
            "clipped": _percent(row["clipped_frac"]),
            "histogram": Text(sparkline(histogram_counts(r, edges)) if len(edges) >= 2 else ""),
        }
        table.add_row(*(cells[k] for k in keys))
    notes = []
    if any(k in keys for k in ("p50", "p95", "max", "histogram")):
        notes.append("norms are pre-clip gradient norms")
    if len(edges) >= 2 and "histogram" in keys:
        notes.append(
            f"histogram: {len(edges) - 1} log-spaced bins from {format_number(edges[0])} to "
            f"{format_number(edges[-1])}, shared by all runs"
        )
    if drop:
        names = {"min_loss": "min loss", "p50": "norm p50", "p95": "norm p95", "clipped": "clipped", "max": "norm max"}
        notes.append("left out to fit the console: " + ", ".join(names[d] for d in drop) + " (see summary.csv)")
    if notes:
        table.caption = "; ".join(notes)
    return table


def _final_loss(r: RunResult) -> float:
    """Final loss for ranking; runs without a finite one rank last."""
    if not r.steps or not math.isfinite(r.steps[-1].loss):
        return math.inf
    return r.steps[-1].loss


def _setting(r: RunResult) -> str:
    return f"max_norm={r.cell.max_norm:g} norm_type={format_norm_type(r.cell.norm_type)}"


def verdict_line(results: list[RunResult]) -> str:
    """One line: the best stable clipped setting (lowest final loss) and what happened unclipped.

    Cases: a best clipped setting exists (``best: max_norm=1 norm_type=2 (stable, final loss
    0.0619); unclipped: diverged at step 2: ...``); the unclipped control is stable and no
    clipped run beats its final loss (``clipping not needed: ...``); no clipped run is stable;
    every run raised. Ties go to the earlier run of the sweep.
    """
    if not results:
        return "no runs"
    if all(r.status == ERROR for r in results):
        return f"no verdict: all {len(results)} runs raised an error (see the tracebacks above)"
    control = next((r for r in results if not r.cell.clipped), None)
    clipped = [r for r in results if r.cell.clipped]
    stable = [r for r in clipped if r.status == STABLE]
    best = min(stable, key=_final_loss) if stable else None  # min keeps the first of equals
    unclipped = f"unclipped: {describe_result(control)}" if control is not None else None

    if control is not None and control.status == STABLE and (best is None or _final_loss(control) <= _final_loss(best)):
        if not clipped:
            return unclipped
        line = f"clipping not needed: unclipped is stable, final loss {format_number(_final_loss(control))}"
        if best is None:
            return line + "; no clipped setting was stable"
        return line + f", no higher than the best clipped setting ({_setting(best)}, final loss {format_number(_final_loss(best))})"
    if best is not None:
        line = f"best: {_setting(best)} ({describe_result(best)})"
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
    onsets = {r.nan_step for r in results if r.status == NON_FINITE}
    if control is not None and all(r.status == NON_FINITE for r in results) and len(onsets) == 1:
        # The same onset clipped or not: the cause is not the size of the gradients.
        line += f"; every run goes non-finite at step {onsets.pop()}, clipped or not: clipping cannot help, look at that step's data, loss or custom ops"
    elif control is None or control.status != STABLE:
        line += "; try smaller max_norm values or a lower learning rate"
    return line


def check_line(result: RunResult) -> str:
    """One line for ``gradclip check``: ``PASS``/``FAIL``, the run and its outcome."""
    word = "PASS" if result.status == STABLE else "FAIL"
    return f"{word} {result.run}: {describe_result(result)} ({_steps(len(result.steps))})"


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def error_panels(results: list[RunResult]) -> list[Panel]:
    """One panel per errored run with its trimmed traceback (or the error line if none)."""
    panels = []
    for r in results:
        if r.status != ERROR:
            continue
        body = r.error_traceback or r.error or "no details recorded"
        where = f" after {_steps(len(r.steps))}" if r.steps else ""
        panels.append(
            Panel(
                Text(body.rstrip()),
                title=Text(f"{r.run}: error{where}"),
                title_align="left",
                border_style=STATUS_STYLES[ERROR],
            )
        )
    return panels
