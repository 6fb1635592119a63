import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from gradcheck_cli.report import describe_result, format_number, onset_step
from gradcheck_cli.report.terminal import (
    SPARK_BLOCKS,
    STATUS_STYLES,
    check_line,
    error_panels,
    sparkline,
    summary_table,
    verdict_line,
)
from gradcheck_cli.results import (
    DIVERGED,
    ERROR,
    NON_FINITE,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STABLE,
    Cell,
    RunResult,
    StepRecord,
    histogram_counts,
    shared_log_bins,
)

NAN = math.nan


def run(max_norm, norm_type=2.0, status=STABLE, losses=(1.0, 0.5, 0.25), norms=(3.0, 2.0, 1.0), **kw) -> RunResult:
    steps = []
    for i, loss in enumerate(losses, start=1):
        norm = norms[i - 1] if i <= len(norms) else NAN
        coef = NAN if math.isnan(norm) else (1.0 if max_norm is None else min(max_norm / (norm + 1e-6), 1.0))
        steps.append(StepRecord(i, loss, norm, coef))
    return RunResult(Cell(max_norm, norm_type), status, steps, **kw)


def render(renderable, width=200) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def sweep_results():
    """An exploding-RNN-like sweep: control non-finite, one clipped run diverged, two stable."""
    return [
        run(None, losses=(2.0, 3.0, 5.0), norms=(60.0, 900.0, math.inf), status=NON_FINITE, nan_step=3,
            nan_source=SOURCE_BACKWARD, nan_param="rnn.weight_hh_l0"),
        run(0.1, losses=(2.0, 1.0, 0.5), norms=(60.0, 30.0, 10.0)),
        run(1.0, losses=(2.0, 0.8, 0.1), norms=(60.0, 20.0, 5.0)),
        run(10.0, math.inf, losses=(2.0, 30.0), norms=(60.0,), status=DIVERGED, diverged_step=2),
    ]


# --- numbers and sparklines ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [(None, "—"), (NAN, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (0.123456, "0.1235"), (34571184.0, "3.457e7"),
     (1.2e-5, "1.2e-5"), (2, "2"), (100.0, "100")],
)
def test_format_number(value, text):
    assert format_number(value) == text


def test_sparkline_scales_to_the_fullest_bin_and_blanks_empty_bins():
    assert sparkline([0, 1, 2, 4, 8]) == " ▁▂▄█"
    assert sparkline([0, 0, 3]) == "  █"
    assert sparkline([1, 100]) == "▁█"  # a single count still shows
    assert sparkline([0, 0]) == "  "
    assert sparkline([]) == ""


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_sparkline_properties(counts):
    line = sparkline(counts)
    assert len(line) == len(counts)
    assert set(line) <= set(SPARK_BLOCKS) | {" "}
    for c, ch in zip(counts, line):
        assert (c == 0) == (ch == " ")
        if c and c == max(counts):
            assert ch == "█"
    # monotone: a larger count never gets a lower block
    levels = [SPARK_BLOCKS.index(ch) if ch != " " else -1 for ch in line]
    for (a, la), (b, lb) in zip(zip(counts, levels), zip(counts[1:], levels[1:])):
        if a < b:
            assert la <= lb


# --- the summary table --------------------------------------------------------------------------


def test_summary_table_rows_and_cells():
    results = sweep_results()
    edges = shared_log_bins(results)
    table = summary_table(results, edges)
    assert isinstance(table, Table)
    assert table.row_count == 4
    assert len(table.columns) == 13
    text = render(table)
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip() and line.split()[0] in {r.run for r in results}}
    assert set(lines) == {"unclipped", "clip_0.1_2", "clip_1_2", "clip_10_inf"}
    control = lines["unclipped"].split()
    assert control[1] == "—"  # no max_norm for the control
    assert control[2:7] == ["2", "non_finite", "3", "rnn.weight_hh_l0", "5"]
    assert lines["clip_10_inf"].split()[1:5] == ["10", "inf", "diverged", "2"]
    stable = lines["clip_1_2"].split()
    assert stable[3:7] == ["stable", "—", "—", "0.1"]  # status, onset, param, final loss
    assert "100%" in lines["clip_0.1_2"]  # clipped every step at max_norm 0.1
    assert "0%" in control  # the control never clips


def test_summary_table_statuses_are_coloured():
    results = sweep_results() + [run(5.0, status=ERROR, losses=(), norms=(), error="ValueError: boom")]
    table = summary_table(results, shared_log_bins(results))
    status_cells = list(table.columns[3].cells)
    assert [c.plain for c in status_cells] == [r.status for r in results]
    assert [str(c.style) for c in status_cells] == [STATUS_STYLES[r.status] for r in results]
    assert STATUS_STYLES == {STABLE: "green", DIVERGED: "yellow", NON_FINITE: "red", ERROR: "magenta"}


def test_summary_table_histogram_uses_the_shared_bins():
    results = sweep_results()
    edges = shared_log_bins(results)
    table = summary_table(results, edges)
    hist = [c.plain for c in table.columns[-1].cells]
    assert hist == [sparkline(histogram_counts(r, edges)) for r in results]
    assert all(len(h) == len(edges) - 1 for h in hist)
    assert "log-spaced bins" in str(table.caption)


def test_summary_table_missing_and_non_finite_values():
    results = [
        run(None, losses=(1.0, math.inf), norms=(2.0,), status=NON_FINITE, nan_step=2, nan_source=SOURCE_FORWARD),
        run(1.0, status=ERROR, losses=(), norms=(), error="RuntimeError: x"),
    ]
    text = render(summary_table(results, shared_log_bins(results)))
    control = next(line for line in text.splitlines() if line.startswith("unclipped"))
    assert "inf" in control.split()  # final loss really is inf
    errored = next(line for line in text.splitlines() if line.startswith("clip_1_2"))
    assert errored.split()[3] == "error"
    assert errored.count("—") >= 8  # no losses, no norms, no onset


def test_summary_table_without_any_finite_norm():
    results = [run(None, losses=(NAN,), norms=(), status=NON_FINITE, nan_step=1, nan_source=SOURCE_FORWARD)]
    text = render(summary_table(results, shared_log_bins(results)))
    assert "non_finite" in text and "nan" in text


@pytest.mark.parametrize("width", [60, 80, 100])
def test_summary_table_fits_narrow_consoles_keeping_run_and_status_whole(width):
    results = sweep_results()
    text = render(summary_table(results, shared_log_bins(results)), width=width)
    assert max(len(line) for line in text.splitlines()) <= width
    for r in results:
        assert any(line.split()[:1] == [r.run] and r.status in line.split() for line in text.splitlines())
    if width < 100:
        assert "left out to fit the console" in " ".join(text.split())


def test_summary_table_renders_whole_when_wide():
    results = sweep_results()
    text = render(summary_table(results, shared_log_bins(results)), width=160)
    assert "left out" not in text
    assert "p50" in text and "p95" in text and "min" in text


# --- verdicts -----------------------------------------------------------------------------------


def test_verdict_best_clipped_and_unclipped_non_finite():
    line = verdict_line(sweep_results())
    assert "\n" not in line
    assert line.startswith("best: max_norm=1 norm_type=2 (stable, final loss 0.1)")
    assert "unclipped: non_finite at step 3 (backward): first non-finite gradient in rnn.weight_hh_l0" in line


def test_verdict_unclipped_diverged_mentions_step_and_loss():
    results = [run(None, losses=(1.789, 3.457e7), norms=(65.7,), status=DIVERGED, diverged_step=2), run(1.0)]
    line = verdict_line(results)
    assert "unclipped: diverged at step 2: loss 3.457e7 vs 1.789 at step 1" in line
    assert line.startswith("best: max_norm=1 norm_type=2")


def test_verdict_control_stable_and_best():
    results = [run(None, losses=(1.0, 0.1)), run(1.0, losses=(1.0, 0.3)), run(0.1, losses=(1.0, 0.5))]
    line = verdict_line(results)
    assert line.startswith("clipping not needed: unclipped is stable, final loss 0.1")
    assert "max_norm=1 norm_type=2, final loss 0.3" in line


def test_verdict_clipped_beats_a_stable_control():
    results = [run(None, losses=(1.0, 0.5)), run(1.0, losses=(1.0, 0.3))]
    line = verdict_line(results)
    assert line == "best: max_norm=1 norm_type=2 (stable, final loss 0.3); unclipped: stable, final loss 0.5"


def test_verdict_no_stable_clipped_run_but_stable_control():
    results = [run(None), run(1.0, losses=(1.0, 20.0), norms=(1.0,), status=DIVERGED, diverged_step=2)]
    line = verdict_line(results)
    assert line.startswith("clipping not needed: unclipped is stable")
    assert "no clipped setting was stable" in line


def test_verdict_nothing_stable():
    results = [
        run(None, losses=(1.0, 50.0), norms=(9.0,), status=DIVERGED, diverged_step=2),
        run(1.0, losses=(1.0, 20.0), norms=(1.0,), status=DIVERGED, diverged_step=2),
        run(0.1, losses=(1.0, NAN), norms=(1.0,), status=NON_FINITE, nan_step=2, nan_source=SOURCE_FORWARD),
    ]
    line = verdict_line(results)
    assert line.startswith("no stable clipped setting (1 diverged, 1 non_finite)")
    assert "unclipped: diverged at step 2" in line
    assert "lower learning rate" in line


def test_verdict_same_onset_everywhere_says_clipping_cannot_help():
    results = [
        run(m, losses=(1.0, 0.9), norms=(2.0, NAN), status=NON_FINITE, nan_step=2, nan_source=SOURCE_BACKWARD, nan_param="head.weight")
        for m in (None, 1.0, 0.1)
    ]
    line = verdict_line(results)
    assert "every run goes non-finite at step 2, clipped or not: clipping cannot help" in line


def test_verdict_all_errors():
    results = [run(m, status=ERROR, losses=(), norms=(), error="ValueError: boom") for m in (None, 1.0)]
    assert verdict_line(results) == "no verdict: all 2 runs raised an error (see the tracebacks above)"


def test_verdict_ties_go_to_the_earlier_run_and_odd_cases():
    results = [run(None, losses=(1.0, 9.0), norms=(1.0,), status=DIVERGED, diverged_step=2), run(0.1, losses=(1.0, 0.2)), run(1.0, losses=(1.0, 0.2))]
    assert verdict_line(results).startswith("best: max_norm=0.1 norm_type=2")
    assert verdict_line([]) == "no runs"
    assert verdict_line([run(None)]) == "unclipped: stable, final loss 0.25"
    assert verdict_line([run(1.0)]).startswith("best: max_norm=1 norm_type=2")


def test_describe_result_forward_and_error():
    fwd = run(None, losses=(1.0, math.inf), norms=(1.0,), status=NON_FINITE, nan_step=2, nan_source=SOURCE_FORWARD)
    assert describe_result(fwd) == "non_finite at step 2 (forward): the loss is inf"
    assert onset_step(fwd) == 2
    err = run(1.0, status=ERROR, losses=(), norms=(), error="KeyError: 'x'")
    assert describe_result(err) == "error: KeyError: 'x'"
    assert onset_step(err) is None


def test_check_line():
    assert check_line(run(1.0)) == "PASS clip_1_2: stable, final loss 0.25 (3 steps)"
    bad = run(None, losses=(1.0, 0.5), norms=(1.0, NAN), status=NON_FINITE, nan_step=2, nan_source=SOURCE_BACKWARD, nan_param="head.weight")
    assert check_line(bad) == "FAIL unclipped: non_finite at step 2 (backward): first non-finite gradient in head.weight (2 steps)"


# --- error panels -------------------------------------------------------------------------------


def test_error_panels_show_tracebacks_verbatim():
    tb = 'Traceback (most recent call last):\n  File "model.py", line 3, in loss_fn\n    raise ValueError("[red]not markup[/red]")\nValueError: [red]not markup[/red]'
    results = sweep_results() + [
        run(5.0, status=ERROR, losses=(1.0,), norms=(1.0,), error="ValueError: [red]not markup[/red]", error_traceback=tb),
        run(50.0, status=ERROR, losses=(), norms=(), error="RuntimeError: no traceback kept"),
    ]
    panels = error_panels(results)
    assert len(panels) == 2 and all(isinstance(p, Panel) for p in panels)
    text = render(panels[0], width=120)
    assert "clip_5_2: error after 1 step" in text
    assert "[red]not markup[/red]" in text  # shown as written, not interpreted as markup
    assert 'File "model.py", line 3, in loss_fn' in text
    assert "RuntimeError: no traceback kept" in render(panels[1], width=120)
    assert error_panels(sweep_results()) == []


@given(st.lists(st.floats(min_value=0.0, allow_infinity=False), min_size=1, max_size=30), st.integers(1, 12))
def test_shared_bins_are_ordered_and_count_every_finite_norm(norms, n_bins):
    result = run(1.0, losses=[1.0] * len(norms), norms=norms)
    edges = shared_log_bins([result], n_bins)
    assert len(edges) == (n_bins + 1 if any(norms) else 2)  # all zeros: the single bin [0, 1]
    assert edges == sorted(edges)
    assert sum(histogram_counts(result, edges)) == len(norms)
