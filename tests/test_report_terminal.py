import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

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
    CRASHED,
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
from gradcheck_cli.text import describe_result, format_number, onset_step

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
        run(
            None,
            losses=(2.0, 3.0, 5.0),
            norms=(60.0, 900.0, math.inf),
            status=NON_FINITE,
            nan_step=3,
            nan_source=SOURCE_BACKWARD,
            nan_param="rnn.weight_hh_l0",
        ),
        run(0.1, losses=(2.0, 1.0, 0.5), norms=(60.0, 30.0, 10.0)),
        run(1.0, losses=(2.0, 0.8, 0.1), norms=(60.0, 20.0, 5.0)),
        run(10.0, math.inf, losses=(2.0, 30.0), norms=(60.0,), status=DIVERGED, diverged_step=2),
    ]


# --- numbers and sparklines ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (None, "—"),
        (NAN, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (0.123456, "0.1235"),
        (34571184.0, "3.457e7"),
        (1.2e-5, "1.2e-5"),
        (2, "2"),
        (100.0, "100"),
    ],
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
    assert len(table.columns) == 14
    text = render(table)
    lines = {
        line.split()[0]: line
        for line in text.splitlines()
        if line.strip() and line.split()[0] in {r.run for r in results}
    }
    assert set(lines) == {"unclipped", "clip_0.1_2", "clip_1_2", "clip_10_inf"}
    control = lines["unclipped"].split()
    assert control[1] == "—"  # no max_norm for the control
    assert control[2:8] == ["2", "non_finite", "3", "—", "rnn.weight_hh_l0", "5"]  # ..., onset, spike, param, loss
    assert lines["clip_10_inf"].split()[1:5] == ["10", "inf", "diverged", "2"]
    stable = lines["clip_1_2"].split()
    assert stable[3:8] == ["stable", "—", "—", "—", "0.1"]  # status, onset, spike, param, final loss
    assert "100%" in lines["clip_0.1_2"]  # clipped every step at max_norm 0.1
    assert "0%" in control  # the control never clips


def test_summary_table_statuses_are_coloured():
    results = sweep_results() + [run(5.0, status=ERROR, losses=(), norms=(), error="ValueError: boom")]
    table = summary_table(results, shared_log_bins(results))
    status_cells = list(table.columns[3].cells)
    assert [c.plain for c in status_cells] == [r.status for r in results]
    assert [str(c.style) for c in status_cells] == [STATUS_STYLES[r.status] for r in results]
    assert STATUS_STYLES == {
        STABLE: "green",
        DIVERGED: "yellow",
        NON_FINITE: "red",
        ERROR: "magenta",
        CRASHED: "magenta",
    }


def test_summary_table_histogram_uses_the_shared_bins():
    results = sweep_results()
    edges = shared_log_bins(results)
    table = summary_table(results, edges)
    hist = [c.plain for c in table.columns[-1].cells]
    # Finite norms 5..900 on 8 log bins: edges 5, 9.569, 18.31, 35.05, 67.08, 128.4, 245.7, 470.3, 900.
    # control 60, 900 (inf not counted); 0.1: 60, 30, 10; 1: 60, 20, 5; 10/inf: 60.
    assert hist == ["   █   █", " ███    ", "█ ██    ", "   █    "]
    assert str(table.caption).endswith("histogram: 8 log-spaced bins from 5 to 900, shared by all runs")


def test_sparkline_levels_in_the_table_by_hand():
    # norms 1..100 on 2 bins (edges 1, 10, 100): counts per run written next to each sparkline;
    # level = ceil(8 * count / fullest) - 1 over "▁▂▃▄▅▆▇█"
    results = [
        run(None, losses=(1.0,) * 4, norms=(1.0, 2.0, 3.0, 50.0)),  # [3, 1]: 1 -> ceil(8/3)-1 = 2
        run(1.0, losses=(1.0,) * 3, norms=(100.0, 20.0, 30.0)),  # [0, 3]
        run(2.0, losses=(1.0,) * 8, norms=(1.0,) * 7 + (10.0,)),  # [7, 1]: 1 -> ceil(8/7)-1 = 1
        run(3.0, losses=(1.0,) * 8, norms=(1.0,) * 4 + (10.0,) * 4),  # [4, 4]
    ]
    edges = shared_log_bins(results, n_bins=2)
    assert edges == pytest.approx([1.0, 10.0, 100.0], rel=1e-12)
    table = summary_table(results, edges)
    assert [c.plain for c in table.columns[-1].cells] == ["█▃", " █", "█▂", "██"]
    assert sparkline([5, 2, 1, 0, 3, 4]) == "█▄▂ ▅▇"  # 8*k/5 = 3.2, 1.6, 4.8, 6.4 -> levels 3, 1, 4, 6


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
    # smoothed losses (mean of the last 10): 0.9667 for max_norm=1, 1.167 for 0.1, within noise
    assert line.startswith(
        "best: max_norm=1 norm_type=2 (stable, smoothed loss 0.9667); no meaningful difference from clip_0.1_2 "
        "(noise judged by the spread of each run's last 10 losses);"
    )
    assert "unclipped: non_finite at step 3 (backward): first non-finite gradient in rnn.weight_hh_l0" in line


def test_verdict_unclipped_diverged_mentions_step_and_loss():
    results = [run(None, losses=(1.789, 3.457e7), norms=(65.7,), status=DIVERGED, diverged_step=2), run(1.0)]
    line = verdict_line(results)
    assert "unclipped: diverged at step 2: loss 3.457e7 vs 1.789 at step 1" in line
    assert line.startswith("best: max_norm=1 norm_type=2")


def test_verdict_control_stable_and_best():
    results = [run(None, losses=(1.0, 0.1)), run(1.0, losses=(1.0, 0.3)), run(0.1, losses=(1.0, 0.5))]
    line = verdict_line(results)
    assert line == (
        "clipping not needed: unclipped is stable, smoothed loss 0.55; no clipped setting is meaningfully better "
        "(best: max_norm=1 norm_type=2, smoothed loss 0.65; noise judged by the spread of each run's last 10 losses)"
    )


def test_verdict_clipped_beats_a_stable_control_only_beyond_noise():
    quiet = [run(None, losses=(0.51, 0.5, 0.49, 0.5)), run(1.0, losses=(0.31, 0.3, 0.29, 0.3))]
    assert verdict_line(quiet) == (
        "best: max_norm=1 norm_type=2 (stable, smoothed loss 0.3); meaningfully better than unclipped: stable, smoothed loss 0.5"
        " (noise judged by the spread of each run's last 10 losses)"
    )
    # the same means with minibatch noise of +-0.5: no longer a meaningful difference
    noisy = [run(None, losses=(1.0, 0.0, 1.0, 0.0)), run(1.0, losses=(0.8, -0.2, 0.8, -0.2))]
    assert verdict_line(noisy).startswith("clipping not needed: unclipped is stable, smoothed loss 0.5;")


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
        run(
            m,
            losses=(1.0, 0.9),
            norms=(2.0, NAN),
            status=NON_FINITE,
            nan_step=2,
            nan_source=SOURCE_BACKWARD,
            nan_param="head.weight",
        )
        for m in (None, 1.0, 0.1)
    ]
    line = verdict_line(results)
    assert "every run goes non-finite at step 2, clipped or not: clipping cannot help" in line


def test_verdict_all_errors():
    results = [run(m, status=ERROR, losses=(), norms=(), error="ValueError: boom") for m in (None, 1.0)]
    assert verdict_line(results) == "no verdict: all 2 runs raised an error (see the tracebacks above)"


def test_verdict_ties_go_to_the_earlier_run_and_odd_cases():
    results = [
        run(None, losses=(1.0, 9.0), norms=(1.0,), status=DIVERGED, diverged_step=2),
        run(0.1, losses=(1.0, 0.2)),
        run(1.0, losses=(1.0, 0.2)),
    ]
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
    bad = run(
        None,
        losses=(1.0, 0.5),
        norms=(1.0, NAN),
        status=NON_FINITE,
        nan_step=2,
        nan_source=SOURCE_BACKWARD,
        nan_param="head.weight",
    )
    assert (
        check_line(bad)
        == "FAIL unclipped: non_finite at step 2 (backward): first non-finite gradient in head.weight (2 steps)"
    )


# --- error panels -------------------------------------------------------------------------------


def test_error_panels_show_tracebacks_verbatim():
    tb = 'Traceback (most recent call last):\n  File "model.py", line 3, in loss_fn\n    raise ValueError("[red]not markup[/red]")\nValueError: [red]not markup[/red]'
    results = sweep_results() + [
        run(
            5.0,
            status=ERROR,
            losses=(1.0,),
            norms=(1.0,),
            error="ValueError: [red]not markup[/red]",
            error_traceback=tb,
        ),
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


# --- the lr and seed axes ---------------------------------------------------------------------------


def grid_run(max_norm, lr, seed, final, status=STABLE, **kw) -> RunResult:
    """A run of a sweep over lrs (0.1, 1) and seeds (0, 1, 2): names carry both axes."""
    steps = [
        StepRecord(1, 2.0, 4.0, 1.0 if max_norm is None else min(max_norm / 4.000001, 1.0), lr=lr),
        StepRecord(2, final, 2.0 * (seed + 1), 1.0, lr=lr),
    ]
    return RunResult(Cell(max_norm, 2.0, lr=lr, seed=seed), status, steps, lr=lr, seed=seed, **kw)


def grid_results():
    out = []
    for seed in (0, 1, 2):
        for lr in (0.1, 1.0):
            control_ok = lr == 0.1 and seed != 2
            out.append(
                grid_run(
                    None,
                    lr,
                    seed,
                    0.9 if control_ok else 50.0,
                    STABLE if control_ok else DIVERGED,
                    diverged_step=None if control_ok else 2,
                )
            )
            out.append(grid_run(1.0, lr, seed, 0.5 + 0.1 * seed + (0.0 if lr == 0.1 else 0.3)))
    return out


def test_several_seeds_give_one_row_per_setting_with_stable_k_of_n_and_the_loss_spread():
    results = grid_results()
    text = render(summary_table(results, shared_log_bins(results)))
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("unclipped@", "clip_"))}
    assert list(rows) == ["unclipped@lr=0.1", "clip_1_2@lr=0.1", "unclipped@lr=1", "clip_1_2@lr=1"]
    assert "stable 2/3" in rows["unclipped@lr=0.1"] and "stable 0/3" in rows["unclipped@lr=1"]
    assert "stable 3/3" in rows["clip_1_2@lr=0.1"] and "stable 3/3" in rows["clip_1_2@lr=1"]
    # clip_1_2 at lr 0.1: final losses 0.5, 0.6, 0.7 -> mean 0.6, spread 0.2
    cells = rows["clip_1_2@lr=0.1"].split()
    # onset, spike, non-finite param, mean final loss, spread
    assert cells[cells.index("3/3") + 1 : cells.index("3/3") + 6] == ["—", "—", "—", "0.6", "0.2"]
    assert "onset" in text and "spread" in text and "mean" in text


def test_stable_k_of_n_is_green_only_when_every_seed_is_stable():
    results = grid_results()
    table = summary_table(results, shared_log_bins(results))
    statuses = table.columns[[c.header for c in table.columns].index("status")]._cells
    assert [(c.plain, c.style) for c in statuses] == [
        ("stable 2/3", STATUS_STYLES[DIVERGED]),
        ("stable 3/3", STATUS_STYLES[STABLE]),
        ("stable 0/3", STATUS_STYLES[DIVERGED]),
        ("stable 3/3", STATUS_STYLES[STABLE]),
    ]


def test_stability_map_lr_by_max_norm():
    from gradcheck_cli.report.terminal import stability_map

    assert stability_map(sweep_results()) is None  # one lr: no map
    text = render(stability_map(grid_results()))
    lines = [line.split() for line in text.splitlines()]
    assert ["lr", "unclipped", "clip_1_2"] in lines
    assert ["0.1", "2/3", "3/3"] in lines and ["1", "0/3", "3/3"] in lines
    single_seed = [r for r in grid_results() if r.seed == 2]
    single_seed = [RunResult(Cell(r.cell.max_norm, 2.0, lr=r.cell.lr), r.status, r.steps, lr=r.lr) for r in single_seed]
    lines = [line.split() for line in render(stability_map(single_seed)).splitlines()]
    assert ["0.1", "diverged", "stable"] in lines and ["1", "diverged", "stable"] in lines


def test_grouped_verdict_needs_every_seed_stable_and_ranks_by_the_mean_smoothed_loss():
    # per-seed smoothed losses (2 + final) / 2: clip_1_2 at lr 0.1 1.25, 1.3, 1.35 (mean 1.3); at lr 1
    # 1.4, 1.45, 1.5: 0.15 apart, beyond 2 standard errors over the seeds (2 * sqrt(2 * 0.05**2 / 3) = 0.082)
    line = verdict_line(grid_results())
    assert line == (
        "best: max_norm=1 norm_type=2 lr=0.1 (stable in all 3 seeds, mean smoothed loss 1.3); "
        "unclipped: lr=0.1 stable 2/3 seeds, lr=1 stable 0/3 seeds"
    )
    # the control stable in every seed with a meaningfully lower figure (1.1 in every seed): clipping not needed
    results = [r for r in grid_results() if not (r.cell.max_norm is None and r.cell.lr == 0.1)]
    results += [grid_run(None, 0.1, seed, 0.2) for seed in (0, 1, 2)]
    assert verdict_line(results) == (
        "clipping not needed: unclipped is stable at lr=0.1 in every seed, mean smoothed loss 1.1; "
        "no clipped setting is meaningfully better (best: max_norm=1 norm_type=2 lr=0.1, mean smoothed loss 1.3; "
        "noise judged by the spread of the 3 seeds' smoothed losses)"
    )


def test_describe_amp_collapse_and_micro_batch_onsets():
    from gradcheck_cli.results import SOURCE_AMP

    steps = [StepRecord(1, 1.0, 2.0, 1.0)] + [StepRecord(i, 1.0, math.inf, NAN, skipped=True) for i in range(2, 22)]
    amp = RunResult(Cell(None), NON_FINITE, steps, nan_step=21, nan_source=SOURCE_AMP, nan_param="head.weight")
    assert describe_result(amp) == (
        "non_finite at step 21 (amp): the gradient scaler skipped 20 steps in a row "
        "(from step 2); non-finite gradient in head.weight"
    )
    forward = RunResult(
        Cell(None), NON_FINITE, [StepRecord(3, NAN)], nan_step=3, nan_source=SOURCE_FORWARD, nan_micro_batch=2
    )
    assert describe_result(forward) == "non_finite at step 3 (forward, micro-batch 2): the loss is nan"


DROPPABLE = {"min loss": "0.5", "norm p50": "2", "norm p95": "2.9", "clipped": "33%", "norm max": "3"}


@pytest.mark.parametrize("width", [60, 70, 75, 80, 85, 90, 100, 160])
def test_narrow_note_names_exactly_the_columns_left_out(width):
    """README: "On a narrower terminal the table drops its least important columns and says
    which." Each droppable column has a value found nowhere else in its row: the value is shown
    if and only if the note does not name the column, and columns go in the documented order."""
    # final 0.75, min 0.5; norms 3, 2, 1: p50 2, p95 2.9, max 3; max_norm 2.5 clips only the 3
    result = run(2.5, math.inf, losses=(1.0, 0.5, 0.75), norms=(3.0, 2.0, 1.0))
    text = render(summary_table([result], shared_log_bins([result])), width=width)
    flat = " ".join(text.split())
    row = next(line.split() for line in text.splitlines() if line.startswith("clip_2.5_inf"))
    assert row[:6] == ["clip_2.5_inf", "2.5", "inf", "stable", "—", "—"] and "0.75" in row
    if "left out to fit the console: " in flat:
        named = flat.split("left out to fit the console: ")[1].split(" (see summary.csv)")[0].split(", ")
    else:
        named = []
    order = ["min loss", "norm p50", "norm p95", "clipped", "norm max", "spike step"]
    assert named == order[: len(named)]
    for column, value in DROPPABLE.items():
        assert (value in row) == (column not in named), (column, row, named)
    if width >= 100:
        assert named == []
    if width <= 80:
        assert named  # the full table needs about 100 columns


def test_verdict_says_divergence_was_not_judged_and_still_names_a_spike():
    control = run(
        None,
        losses=(-1.0, -1.2, -1.1, -1.3),
        norms=(1.0, 1.0, 1.0, 50.0),
        divergence_checked=False,
        spike_step=4,
        spike_param="policy.weight",
    )
    line = verdict_line([control, run(1.0, losses=(-1.0, -1.1, -1.2, -1.3), divergence_checked=False)])
    assert line.endswith(
        "; divergence not judged (--divergence-factor inf); unclipped: gradients of policy.weight spike at step 4"
    )
    off = run(None, losses=(1.0, 2.0), divergence_checked=False)
    assert verdict_line([off]).endswith("; divergence not judged (--divergence-factor inf)")
