"""``report.html``: one self-contained page with the verdict, the recommendation, the summary
table and the figures, drawn with matplotlib on its Agg canvas (no pyplot, so a user's
interactive backend is never switched) and embedded as base64 PNG ``data:`` URIs, so the page
loads nothing from the network. A figure whose data is missing is left out. This module draws;
it never decides: verdicts come from ``analysis`` and ``terminal``. See docs/outputs.md (The HTML
report).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from gradcheck_cli.report._io import atomic_write_bytes
from gradcheck_cli.report.terminal import verdict_line
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    NON_FINITE,
    STABLE,
    RunResult,
    format_norm_type,
    histogram_counts,
    log_bins_by_norm_type,
)
from gradcheck_cli.text import format_number

STATUS_COLOURS = {STABLE: "#2e7d32", DIVERGED: "#f9a825", NON_FINITE: "#c62828", ERROR: "#8e24aa"}
CONTROL_COLOUR = "#222222"
_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]

_TABLE_COLUMNS = [
    ("run", "run"),
    ("max_norm", "max_norm"),
    ("norm_type", "norm_type"),
    ("status", "status"),
    ("onset", "onset step"),
    ("spike_step", "spike step"),
    ("spike_param", "spike param"),
    ("nan_param", "non-finite param"),
    ("final_loss", "final loss"),
    ("smoothed_loss", "smoothed loss"),
    ("eval_metric", "eval metric"),
    ("grad_norm_p50", "norm p50"),
    ("grad_norm_max", "norm max"),
    ("clipped_frac", "clipped"),
]


def _colours(results: list[RunResult]) -> dict[str, str]:
    out, i = {}, 0
    for r in results:
        if not r.cell.clipped:
            out[r.run] = CONTROL_COLOUR
        else:
            out[r.run] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(r: RunResult) -> str:
    return f"{r.run} ({r.status})"


def _legend(ax, n: int) -> None:
    if n:
        ax.legend(fontsize=7, ncol=2 if n > 6 else 1, loc="best", framealpha=0.8)


# --------------------------------------------------------------------------------------------
# figures; each returns (caption, figure) or None when there is nothing to draw


def loss_figure(results: list[RunResult], colours: dict[str, str]):
    series = [(r, [(s.step, s.loss) for s in r.steps if math.isfinite(s.loss)]) for r in results]
    series = [(r, pts) for r, pts in series if pts]
    if not series:
        return None
    fig = _figure(12, 4.2)
    ax = fig.add_subplot()
    losses = [v for _, pts in series for _, v in pts]
    symlog = min(losses) <= 0
    for r, pts in series:
        steps, values = zip(*pts)
        ax.plot(steps, values, color=colours[r.run], lw=1.4 if r.cell.clipped else 2.2, label=_label(r))
        stop = r.stop_step()
        if stop is not None:  # the step that stopped the run, where its loss is still finite
            last = next((v for s, v in pts if s == stop), None)
            if last is not None:
                ax.plot([stop], [last], marker="x", ms=9, mew=2, color=colours[r.run])
    if symlog:
        nonzero = sorted(abs(v) for v in losses if v != 0)
        ax.set_yscale("symlog", linthresh=nonzero[len(nonzero) // 10] if nonzero else 1.0)
        scale = "symmetric log scale: some losses are 0 or negative"
    else:
        ax.set_yscale("log")
        scale = "log scale"
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    return f"Loss per step per run ({scale}); x marks the step that stopped an unstable run.", fig


def _norm_types(results: list[RunResult]) -> list[float]:
    types: list[float] = []
    for r in results:
        for p in r.norm_types():
            if p not in types:
                types.append(p)
    return types


def _norm_series(r: RunResult, p: float) -> list[tuple[int, float]]:
    if p == r.cell.norm_type:
        return [(s.step, s.grad_norm) for s in r.steps if math.isfinite(s.grad_norm) and s.grad_norm > 0]
    return [(s.step, v) for s in r.steps for q, v in s.norms if q == p and math.isfinite(v) and v > 0]


def norm_figure(results: list[RunResult], colours: dict[str, str]):
    types = [p for p in _norm_types(results) if any(_norm_series(r, p) for r in results)]
    if not types:
        return None
    fig = _figure(12, 3.6 * len(types))
    axes = fig.subplots(len(types), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, types):
        n = 0
        for r in results:
            pts = _norm_series(r, p)
            if not pts:
                continue
            steps, values = zip(*pts)
            ax.plot(steps, values, color=colours[r.run], lw=1.2 if r.cell.clipped else 2.0, label=_label(r))
            n += 1
            if r.cell.max_norm is not None and r.cell.norm_type == p:  # the rules have no fixed line
                ax.axhline(r.cell.max_norm, color=colours[r.run], ls="--", lw=0.9)
        ax.set_yscale("log")
        ax.set_ylabel(f"pre-clip norm ({format_norm_type(p)})")
        ax.set_title(f"norm type {format_norm_type(p)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        _legend(ax, n)
    axes[-1].set_xlabel("step")
    return (
        "Pre-clip total gradient norm per step per run, one panel per norm type (L2 and inf never share an axis); "
        "dashed lines are each clipped run's max_norm.",
        fig,
    )


def map_figure(results: list[RunResult]):
    clipped = [r for r in results if r.cell.max_norm is not None]  # a max_norm axis: norm cells only
    if not clipped:
        return None
    types = []
    for r in clipped:
        if r.cell.norm_type not in types:
            types.append(r.cell.norm_type)
    fig = _figure(12, 1.2 + 0.8 * len(types))
    ax = fig.add_subplot()
    seen = set()
    for r in clipped:
        y = types.index(r.cell.norm_type)
        label = r.status + (" (refined)" if r.refined else "")
        ax.scatter(
            [r.cell.max_norm],
            [y],
            s=140 if not r.refined else 110,
            marker="D" if r.refined else "o",
            color=STATUS_COLOURS.get(r.status, "#999999"),
            edgecolor="black",
            linewidth=0.6,
            zorder=3,
            label=None if label in seen else label,
        )
        seen.add(label)
        ax.annotate(
            f"{r.cell.max_norm:g}",
            (r.cell.max_norm, y),
            xytext=(0, 10),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_yticks(range(len(types)), [format_norm_type(p) for p in types])
    ax.set_ylim(-0.7, len(types) - 0.3)
    ax.set_xlabel("max_norm")
    ax.set_ylabel("norm type")
    ax.grid(alpha=0.3, axis="x", which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return "Stability map: max_norm x norm_type coloured by status; diamonds are --refine runs.", fig


def heatmap_figure(results: list[RunResult]):
    control = next((r for r in results if not r.cell.clipped and any(s.layers for s in r.steps)), None)
    if control is None:  # a single monitored run is its own control
        control = next((r for r in results if any(s.layers for s in r.steps)), None)
    if control is None:
        return None
    import numpy as np

    layers: list[str] = []
    for s in control.steps:
        for name, _ in s.layers:
            if name not in layers:
                layers.append(name)
    steps = [s.step for s in control.steps if s.layers]
    grid = np.full((len(layers), len(steps)), np.nan)
    for j, s in enumerate(st for st in control.steps if st.layers):
        for name, v in s.layers:
            if math.isfinite(v) and v > 0:
                grid[layers.index(name), j] = math.log10(v)
    fig = _figure(12, min(2.0 + 0.22 * len(layers), 14))
    ax = fig.add_subplot()
    image = ax.imshow(
        grid,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5),
    )
    fig.colorbar(image, ax=ax, label=f"log10 pre-clip norm ({format_norm_type(control.cell.norm_type)})", pad=0.01)
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) < 40 else 5)
    ax.set_xlabel("step")
    marks = []
    if control.spike_step is not None:
        ax.axvline(control.spike_step, color="#ff9800", lw=2, ls="--", label=f"spike (step {control.spike_step})")
        if control.spike_param in layers:
            ax.plot(
                [control.spike_step],
                [layers.index(control.spike_param)],
                marker="o",
                ms=10,
                mfc="none",
                mec="#ff9800",
                mew=2,
            )
        marks.append("the spike (orange)")
    stop = control.stop_step()
    if stop is not None:
        ax.axvline(stop, color="#e53935", lw=2, label=f"onset: {control.status} (step {stop})")
        marks.append("the onset (red)")
    if marks:  # above the map, so it hides no layer
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False)
    caption = f"Per-layer pre-clip gradient norms of run {control.run} (steps x layers)"
    return caption + (", with " + " and ".join(marks) + " marked." if marks else "."), fig


def histogram_figure(results: list[RunResult], colours: dict[str, str]):
    edges = log_bins_by_norm_type(results)
    types = [p for p, e in edges.items() if len(e) >= 2]
    if not types:
        return None
    fig = _figure(12, 3.2 * len(types))
    axes = fig.subplots(len(types), 1, squeeze=False)[:, 0]
    for ax, p in zip(axes, types):
        e = edges[p]
        n = 0
        for r in results:
            counts = histogram_counts(r, edges, p)
            if not sum(counts):
                continue
            left = [x if x > 0 else e[1] / 10 for x in e[:-1]]  # a 0 edge on a log axis
            ax.stairs(counts, left + [e[-1]], color=colours[r.run], lw=1.6, label=_label(r))
            n += 1
        ax.set_xscale("log")
        ax.set_xlabel(f"pre-clip norm ({format_norm_type(p)})")
        ax.set_ylabel("steps")
        ax.set_title(f"norm type {format_norm_type(p)}", fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, n)
    return "Histograms of the pre-clip norms, log-spaced bins shared by the runs of each norm type.", fig


# --------------------------------------------------------------------------------------------
# the page


def _table(results: list[RunResult]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in _TABLE_COLUMNS)
    rows = []
    for r in results:
        row = r.summary_row()
        row["onset"] = r.stop_step()
        cells = []
        for key, _ in _TABLE_COLUMNS:
            v = row.get(key)
            if key == "status":
                text = f'<span class="status" style="background:{STATUS_COLOURS.get(v, "#999")}">{html.escape(str(v))}</span>'
            elif key == "clipped_frac":
                text = "—" if v is None else f"{100 * v:.0f}%"
            elif key == "run":
                text = html.escape(str(v)) + (" <small>(refined)</small>" if r.refined else "")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                text = html.escape(format_number(v))
            else:
                text = html.escape(str(v)) if v not in (None, "") else "—"
            cells.append(f"<td>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.verdict{background:#f5f7fa;border-left:4px solid #1f77b4;padding:8px 12px;margin:8px 0;font-size:14px}
.rec{border-left-color:#2e7d32}
.scroll{overflow-x:auto} table{border-collapse:collapse;font-size:11px;width:100%} th,td{padding:2px 5px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#fafafa;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
.status{color:#fff;border-radius:3px;padding:1px 5px}
figure{margin:12px 0} img{max-width:100%} figcaption{font-size:13px;color:#555}
.meta{font-size:12px;color:#666}
"""


def render_html(results: list[RunResult], recommendation=None, title: str = "gradclip report") -> tuple[str, int]:
    """The page as text, and how many figures it embeds."""
    colours = _colours(results)
    figures = []
    for section, make in (
        ("Loss", lambda: loss_figure(results, colours)),
        ("Pre-clip gradient norm", lambda: norm_figure(results, colours)),
        ("Stability map", lambda: map_figure(results)),
        ("Per-layer gradient norms", lambda: heatmap_figure(results)),
        ("Norm histograms", lambda: histogram_figure(results, colours)),
    ):
        made = make()
        if made is not None:
            caption, fig = made
            figures.append((section, caption, _png(fig)))
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>gradclip: {html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>gradclip: {html.escape(title)}</h1>",
        f'<p class="meta">{len(results)} runs. Norms are pre-clip gradient norms.</p>',
        f'<div class="verdict">{html.escape(verdict_line(results))}</div>',
    ]
    if recommendation is not None:
        parts.append(f'<div class="verdict rec">{html.escape(recommendation.line())}</div>')
    parts.append("<h2>Summary</h2>" + _table(results))
    for section, caption, data in figures:
        parts.append(
            f'<h2>{html.escape(section)}</h2><figure><img alt="{html.escape(section)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    parts.append("</body></html>\n")
    return "\n".join(parts), len(figures)


def write_html(path: str | Path, results: list[RunResult], recommendation=None, title: str = "gradclip report") -> int:
    """Write ``report.html`` atomically; returns the number of figures."""
    text, n = render_html(results, recommendation, title)
    atomic_write_bytes(path, text.encode("utf-8"))
    return n
