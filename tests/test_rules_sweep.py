"""The clipping rules in the sweep: grid options, cells and names, the runner against a
plain-torch loop applying the same rule (tests/reference_loop.py), the CSV columns, resume,
usage errors and recipe keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_loop import AGCRule, AutoClipRule, ValueRule, ZClipRule, reference_training
from typer.testing import CliRunner

from gradcheck_cli.cli import app
from gradcheck_cli.config import DEFAULT_MAX_NORMS, SweepConfig, agc_excluded
from gradcheck_cli.errors import UsageError
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.recipes import load_recipe
from gradcheck_cli.report.files import load_finished
from gradcheck_cli.results import (
    DIVERGED,
    NON_FINITE,
    STABLE,
    STEP_COLUMNS,
    SUMMARY_COLUMNS,
    Cell,
    RunResult,
    StepRecord,
)
from gradcheck_cli.runner import run_cell
from gradcheck_cli.snapshot import seed_everything
from gradcheck_cli.sweep import run_sweep
from gradcheck_cli.text import describe_setting

ROOT = Path(__file__).resolve().parent.parent
RNN = ROOT / "sample_models" / "exploding_rnn.py"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
LINEAR = SCRIPTS / "stable_linear.py"

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(script: Path, cell: Cell, steps: int, **config) -> RunResult:
    """One run as the sweep's first run: seed, build, seed, run the cell."""
    exp = load_experiment(script)
    cfg = SweepConfig(script=script, steps=steps, **config)
    seed_everything(0)
    model = exp.build_model()
    seed_everything(0)
    return run_cell(exp, model, cell, cfg)


def reference(script: Path, rule, steps: int):
    return reference_training(load_experiment(script), steps, rule=rule)


def assert_matches(result: RunResult, ref, *, threshold: bool, frac: bool) -> None:
    assert len(result.steps) == len(ref)
    approx = lambda xs: pytest.approx(xs, rel=1e-5, abs=1e-7, nan_ok=True)  # noqa: E731
    assert [s.loss for s in result.steps] == approx([r.loss for r in ref])
    assert [s.grad_norm for s in result.steps] == approx([r.norm for r in ref])
    assert [s.clip_threshold for s in result.steps] == approx([r.threshold for r in ref])
    assert [s.clipped_unit_frac for s in result.steps] == approx([r.clipped_frac for r in ref])
    assert all(math.isfinite(s.clip_threshold) for s in result.steps) == threshold
    assert all(math.isfinite(s.clipped_unit_frac) for s in result.steps) == frac


# --- cells and names ---------------------------------------------------------------------------


def test_run_names_and_settings():
    cells = {
        "unclipped": Cell(None),
        "clip_1_2": Cell(1.0, 2.0),
        "clip_0.1_inf": Cell(0.1, math.inf),
        "value_0.5": Cell(None, mode="value", param=0.5),
        "agc_0.01": Cell(None, mode="agc", param=0.01),
        "autoclip_p10": Cell(None, mode="autoclip", param=10),
        "zclip_z2.5": Cell(None, mode="zclip", param=2.5),
    }
    assert {name: cell.run for name, cell in cells.items()} == {name: name for name in cells}
    assert [c.mode for c in cells.values()] == ["none", "norm", "norm", "value", "agc", "autoclip", "zclip"]
    assert Cell(1.0, 2.0).param == 1.0 and Cell(None).param is None
    assert Cell(1.0) == Cell(1.0, 2.0, mode="norm", param=1.0)
    assert [c.clipped for c in cells.values()] == [False] + [True] * 6
    assert [describe_setting(c) for c in cells.values()][3:] == [
        "value clip_value=0.5",
        "agc clip_factor=0.01",
        "autoclip percentile=10",
        "zclip z_thresh=2.5",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_norm=None, mode="agc"),
        dict(max_norm=1.0, mode="value", param=1.0),
        dict(max_norm=None, mode="bogus", param=1.0),
        dict(max_norm=None, mode="none", param=1.0),
        dict(max_norm=1.0, mode="norm", param=2.0),
    ],
)
def test_inconsistent_cells_are_refused(kwargs):
    with pytest.raises(ValueError):
        Cell(**kwargs)


def test_default_norm_grid_runs_only_without_any_grid_option():
    base = {"script": str(RNN)}
    assert SweepConfig.from_values(base).max_norms == DEFAULT_MAX_NORMS
    only_agc = SweepConfig.from_values({**base, "agc_clip_factors": "0.01"})
    assert [c.run for c in only_agc.cells()] == ["unclipped", "agc_0.01"]
    both = SweepConfig.from_values({**base, "max_norms": "1", "norm_types": "2", "autoclip_percentiles": "10,50"})
    assert [c.run for c in both.cells()] == ["unclipped", "clip_1_2", "autoclip_p10", "autoclip_p50"]
    every = SweepConfig.from_values(
        {
            **base,
            "clip_values": "0.5",
            "zclip_z_thresholds": "2.5,3",
            "agc_clip_factors": [0.01],
            "autoclip_percentiles": [0, 100],
        }
    )
    assert [c.run for c in every.cells()] == [
        "unclipped",
        "value_0.5",
        "agc_0.01",
        "autoclip_p0",
        "autoclip_p100",
        "zclip_z2.5",
        "zclip_z3",
    ]


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(1e-6, 1e6), max_size=4),
    percentiles=st.lists(st.floats(0, 100), max_size=4),
    lrs=st.sampled_from([None, "0.01", "0.01,0.1"]),
    seeds=st.sampled_from([None, "0,1"]),
)
def test_grid_names_are_unique_or_refused(values, percentiles, lrs, seeds):
    grid = {
        "max_norms": values,
        "clip_values": values,
        "agc_clip_factors": values,
        "autoclip_percentiles": percentiles,
        "zclip_z_thresholds": values,
        "lr": lrs,
        "seeds": seeds,
    }
    values_given = {"script": RNN, **{k: v for k, v in grid.items() if v}}
    # names spell numbers in their shortest round-trip form, so distinct values never share a
    # name (1e-06 and 1.0000000000000002e-06 are two runs): no grid is refused
    config = SweepConfig.from_values(values_given)
    cells = config.cells()
    assert len({c.run for c in cells}) == len(set(cells)) == len(cells)
    n_rule_cells = 3 * len(set(values)) + len(set(percentiles))
    n_norm_cells = len(set(values)) * 2 if values else (0 if percentiles else 6)
    per_axis = (2 if lrs == "0.01,0.1" else 1) * (2 if seeds else 1)
    assert len(cells) == per_axis * (1 + n_norm_cells + n_rule_cells)


def test_rule_cells_take_the_lr_and_seed_axes():
    config = SweepConfig.from_values(
        {"script": RNN, "agc_clip_factors": "0.01", "zclip_z_thresholds": "2.5", "lr": "0.01,0.1", "seeds": "0,1"}
    )
    names = [c.run for c in config.cells()]
    assert names[:3] == ["unclipped@lr=0.01,seed=0", "agc_0.01@lr=0.01,seed=0", "zclip_z2.5@lr=0.01,seed=0"]
    assert len(names) == 12 and names[-1] == "zclip_z2.5@lr=0.1,seed=1"
    agc = config.cells()[1]
    assert (agc.mode, agc.param, agc.lr, agc.seed) == ("agc", 0.01, 0.01, 0)
    assert agc.setting == Cell(None, mode="agc", param=0.01, lr=0.01)
    assert agc.clipping == Cell(None, mode="agc", param=0.01)


def test_agc_exclude_matches_modules_names_and_globs():
    assert agc_excluded("head.weight", ("head",)) and agc_excluded("head.bias", ("head",))
    assert not agc_excluded("head2.weight", ("head",))
    assert agc_excluded("rnn.bias_hh_l0", ("*.bias*",)) and not agc_excluded("rnn.weight_hh_l0", ("*.bias*",))
    assert agc_excluded("head.weight", ("head.weight",)) and not agc_excluded("head.weight", ())


# --- the runner against plain torch ------------------------------------------------------------


def test_value_clipping_matches_torch_clip_grad_value():
    result = run(RNN, Cell(None, mode="value", param=0.01), steps=12)
    assert result.status == STABLE
    assert_matches(result, reference(RNN, ValueRule(0.01), 12), threshold=False, frac=True)
    assert all(math.isnan(s.clip_coef) for s in result.steps)
    assert 0 < result.steps[0].clipped_unit_frac < 1


def test_agc_matches_timm_formula():
    result = run(RNN, Cell(None, mode="agc", param=0.1), steps=12)
    assert result.status == STABLE
    assert_matches(result, reference(RNN, AGCRule(0.1), 12), threshold=False, frac=True)
    assert all(math.isnan(s.clip_coef) for s in result.steps)


def test_agc_exclude_leaves_the_head_alone():
    result = run(RNN, Cell(None, mode="agc", param=0.1), steps=8, agc_exclude=("head",))
    ref = reference(RNN, AGCRule(0.1, exclude=("head",)), 8)
    assert_matches(result, ref, threshold=False, frac=True)
    plain = run(RNN, Cell(None, mode="agc", param=0.1), steps=8)
    assert [s.loss for s in plain.steps][1:] != [s.loss for s in result.steps][1:]


def test_autoclip_matches_numpy_percentile_of_the_history():
    result = run(LINEAR, Cell(None, mode="autoclip", param=10), steps=30)
    assert result.status == STABLE
    ref = reference(LINEAR, AutoClipRule(10), 30)
    assert_matches(result, ref, threshold=True, frac=False)
    coefs = [s.clip_coef for s in result.steps]
    assert coefs == pytest.approx([min(r.threshold / (r.norm + 1e-6), 1.0) for r in ref], rel=1e-5)
    assert sum(c < 0.999 for c in coefs) > 10  # the 10th percentile clips most steps


def test_autoclip_does_not_clip_the_first_step_so_the_rnn_diverges():
    result = run(RNN, Cell(None, mode="autoclip", param=10), steps=10)
    control = run(RNN, Cell(None), steps=10)
    assert (result.status, result.diverged_step) == (control.status, control.diverged_step) == (DIVERGED, 2)
    assert result.steps[0].clip_threshold == result.steps[0].grad_norm  # one norm: its own percentile
    assert result.steps[0].clip_coef < 1.0 and result.summary_row()["clipped_frac"] == 0.0  # not counted as clipped


SPIKY = """
import torch

gen = torch.Generator().manual_seed(0)
X = torch.randn(96, 3, generator=gen)
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]])


def build_model():
    return torch.nn.Linear(3, 1)


def batches():
    # every 12th batch has its targets scaled up: a gradient-norm spike
    return [(X[i : i + 8], Y[i : i + 8] * (20.0 if i == 88 else 1.0)) for i in range(0, 96, 8)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
"""


def test_zclip_matches_the_reference_with_spikes_after_warmup(tmp_path):
    script = tmp_path / "spiky.py"
    script.write_text(SPIKY)
    cell = Cell(None, mode="zclip", param=2.5)
    # the spike batches' loss is far above the first step's: not a divergence here
    result = run(script, cell, steps=45, zclip_max_norm=None, divergence_factor=1e9)
    ref = reference(script, ZClipRule(z_thresh=2.5, max_grad_norm=None), 45)
    assert result.status == STABLE
    assert_matches(result, ref, threshold=False, frac=False)
    thresholds = [s.clip_threshold for s in result.steps]
    assert all(math.isnan(t) for t in thresholds[:25])  # no cap: warmup does not clip
    assert any(math.isfinite(t) for t in thresholds[25:])  # a spike was clipped


def test_zclip_default_cap_clips_like_max_norm_1_during_warmup():
    zclip = run(RNN, Cell(None, mode="zclip", param=2.5), steps=25)
    norm = run(RNN, Cell(1.0, 2.0), steps=25)
    assert [(s.loss, s.grad_norm, s.clip_coef, s.clip_threshold) for s in zclip.steps] == [
        (s.loss, s.grad_norm, s.clip_coef, s.clip_threshold) for s in norm.steps
    ]


def test_rules_stop_at_a_non_finite_gradient_without_clipping_it():
    script = SCRIPTS / "nan_backward.py"
    control = run(script, Cell(None), steps=10)
    for cell in (
        Cell(None, mode="value", param=0.1),
        Cell(None, mode="agc", param=0.01),
        Cell(None, mode="autoclip", param=10),
        Cell(None, mode="zclip", param=2.5),
    ):
        result = run(script, cell, steps=10)
        assert (result.status, result.nan_step, result.nan_param) == (NON_FINITE, control.nan_step, control.nan_param)
        last = result.steps[-1]
        assert (
            not math.isfinite(last.grad_norm) and math.isnan(last.clip_threshold) and math.isnan(last.clipped_unit_frac)
        )


# --- the sweep end to end -----------------------------------------------------------------------

ALL_MODES = [
    "--max-norm",
    "1",
    "--norm-type",
    "2",
    "--clip-value",
    "0.01",
    "--agc",
    "0.1",
    "--autoclip",
    "10",
    "--zclip",
    "2.5",
    "--steps",
    "30",
]


@pytest.fixture(scope="module")
def all_modes(tmp_path_factory):
    out = tmp_path_factory.mktemp("all_modes")
    result = invoke("sweep", RNN, *ALL_MODES, "--out", out, "--junit", out / "junit.xml")
    assert result.exit_code == 0, result.output
    return out, result


def test_every_mode_in_one_sweep(all_modes):
    out, result = all_modes
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert list(summary.columns) == SUMMARY_COLUMNS
    rows = summary.set_index("run")
    assert list(rows.index) == ["unclipped", "clip_1_2", "value_0.01", "agc_0.1", "autoclip_p10", "zclip_z2.5"]
    assert list(rows["clip_mode"]) == ["none", "norm", "value", "agc", "autoclip", "zclip"]
    assert list(rows["clip_param"]) == ["", "1.0", "0.01", "0.1", "10.0", "2.5"]
    assert list(rows["max_norm"]) == ["", "1.0", "", "", "", ""]
    assert list(rows["status"]) == [DIVERGED, STABLE, STABLE, STABLE, DIVERGED, STABLE]
    assert rows.loc["autoclip_p10", "diverged_step"] == rows.loc["unclipped", "diverged_step"] == "2"
    # every run starts from the same state
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps.columns) == STEP_COLUMNS
    first = steps[steps.step == 1]
    assert first["loss"].nunique() == 1 and first["grad_norm"].nunique() == 1
    by = {run: frame for run, frame in steps.groupby("run")}
    assert (by["clip_1_2"]["clip_threshold"] == 1.0).all()
    assert by["unclipped"]["clip_threshold"].isna().all() and (by["unclipped"]["clip_coef"] == 1.0).iloc[:1].all()
    for run in ("value_0.01", "agc_0.1"):
        assert by[run]["clip_coef"].isna().all() and by[run]["clip_threshold"].isna().all()
        assert by[run]["clipped_unit_frac"].between(0, 1).all()
    for run in ("clip_1_2", "autoclip_p10", "zclip_z2.5"):
        assert by[run]["clipped_unit_frac"].isna().all()
    # the verdict may pick a rule: the lowest final loss among the stable clipped runs
    stable = rows[rows.status == STABLE].drop(index="unclipped", errors="ignore")
    best = stable["final_loss"].astype(float).idxmin()
    expected = {
        "clip_1_2": "max_norm=1 norm_type=2",
        "value_0.01": "value clip_value=0.01",
        "agc_0.1": "agc clip_factor=0.1",
        "zclip_z2.5": "zclip z_thresh=2.5",
    }[best]
    assert f"best: {expected} (stable" in result.stdout
    junit = (out / "junit.xml").read_text()
    assert 'name="agc_0.1"' in junit and "clipping: autoclip: autoclip percentile=10" in junit


def test_json_output_has_the_mode_columns(all_modes, tmp_path):
    result = invoke("sweep", RNN, "--agc", "0.1", "--steps", "3", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [(r["run"], r["clip_mode"], r["clip_param"], r["max_norm"]) for r in records] == [
        ("unclipped", "none", None, None),
        ("agc_0.1", "agc", 0.1, None),
    ]


def test_resume_with_modes_reruns_only_the_missing_run(all_modes, tmp_path):
    out, _ = all_modes
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("summary.csv", "steps.csv", "layers.csv", "histograms.csv", "gradclip-sweep.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    manifest = json.loads((copy / "gradclip-sweep.json").read_text())
    manifest["finished_runs"].remove("agc_0.1")
    (copy / "gradclip-sweep.json").write_text(json.dumps(manifest))
    config = SweepConfig.from_values(
        {
            "script": RNN,
            "max_norms": "1",
            "norm_types": "2",
            "clip_values": "0.01",
            "agc_clip_factors": "0.1",
            "autoclip_percentiles": "10",
            "zclip_z_thresholds": "2.5",
            "steps": 30,
        }
    )
    saved = manifest["fingerprint"]
    assert {k: saved[k] for k in config.fingerprint()} == json.loads(json.dumps(config.fingerprint()))
    loaded = load_finished(copy, saved)
    assert [r.cell for r in loaded.values()] == [c for c in config.cells() if c.run != "agc_0.1"]
    result = invoke("sweep", RNN, *ALL_MODES, "--out", copy, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming: 5 of 6 runs" in result.stderr
    assert (copy / "steps.csv").read_bytes() == (out / "steps.csv").read_bytes()
    drop = lambda f: f.drop(columns="seconds")  # noqa: E731
    pd.testing.assert_frame_equal(drop(pd.read_csv(copy / "summary.csv")), drop(pd.read_csv(out / "summary.csv")))


def test_resume_with_a_different_rule_grid_is_refused(all_modes, tmp_path):
    out, _ = all_modes
    args = [a if a != "0.1" else "0.2" for a in ALL_MODES]
    copy = tmp_path / "c"
    copy.mkdir()
    for name in ("summary.csv", "steps.csv", "layers.csv", "histograms.csv", "gradclip-sweep.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    result = invoke("sweep", RNN, *args, "--out", copy, "--resume")
    assert result.exit_code == 2
    assert "--agc 0.1 (saved) vs 0.2 (now)" in result.stderr


# --- usage errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--autoclip", "101"], "--autoclip value '101' is not a percentile from 0 to 100"),
        (["--autoclip", "ten"], "--autoclip value 'ten' is not a number"),
        (["--agc", "0"], "--agc value '0' must be a positive finite number"),
        (["--clip-value", "-1"], "--clip-value value '-1' must be a positive finite number"),
        (["--zclip", "2.5,"], "--zclip '2.5,' has an empty entry"),
        (["--zclip", "inf"], "--zclip value 'inf' must be a positive finite number"),
        (["--zclip", "2", "--zclip-max-norm", "0"], "--zclip-max-norm '0' must be a positive finite number or 'none'"),
        (["--agc", "0.01", "--agc-exclude", "heads,rnn"], "--agc-exclude heads matches no parameter of the model"),
        (["--agc-exclude", "head"], "--agc-exclude was given without --agc: it only changes AGC runs"),
        (
            ["--max-norm", "1", "--zclip-max-norm", "2"],
            "--zclip-max-norm was given without --zclip: it only changes ZClip runs",
        ),
        (["--zclip-max-norm", "none"], "--zclip-max-norm was given without --zclip"),
    ],
)
def test_usage_errors(args, message, tmp_path):
    result = invoke("sweep", RNN, *args, "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.stderr
    assert "hint: " in result.stderr and "Traceback" not in result.stderr


def test_agc_exclude_error_lists_the_parameters(tmp_path):
    result = invoke("sweep", RNN, "--agc", "0.01", "--agc-exclude", "fc", "--steps", "2", "--out", tmp_path)
    assert result.exit_code == 2
    assert "rnn.weight_ih_l0, rnn.weight_hh_l0" in result.stderr and "head.bias" in result.stderr


def test_zclip_max_norm_none_reaches_the_rule(tmp_path):
    config = SweepConfig.from_values({"script": RNN, "zclip_z_thresholds": "2", "zclip_max_norm": "none"})
    assert config.zclip_max_norm is None and config.fingerprint()["zclip_max_norm"] is None
    assert SweepConfig.from_values({"script": RNN}).zclip_max_norm == 1.0


# --- recipes -------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, body: str) -> Path:
    (tmp_path / "model.py").write_text(RNN.read_text())
    path = tmp_path / "r.toml"
    path.write_text('script = "model.py"\n' + body)
    return path


def test_recipe_takes_the_rule_keys(tmp_path):
    path = write_recipe(
        tmp_path,
        'clip_value = [0.5]\nagc = "0.01,0.1"\nagc_exclude = ["head"]\nautoclip = [10, 25]\nzclip = [2.5]\nzclip_max_norm = "none"\n',
    )
    values = load_recipe(path)
    assert values["clip_values"] == (0.5,) and values["agc_clip_factors"] == (0.01, 0.1)
    assert values["agc_exclude"] == ("head",) and values["autoclip_percentiles"] == (10.0, 25.0)
    assert values["zclip_z_thresholds"] == (2.5,) and values["zclip_max_norm"] is None
    config = SweepConfig.from_values(values)
    assert [c.run for c in config.cells()] == [
        "unclipped",
        "value_0.5",
        "agc_0.01",
        "agc_0.1",
        "autoclip_p10",
        "autoclip_p25",
        "zclip_z2.5",
    ]


@pytest.mark.parametrize(
    "body, message",
    [
        ("autoclip = [150]\n", "autoclip value 150 is not a percentile from 0 to 100"),
        ("agc = [true]\n", "'agc' must be a list of numbers"),
        ("agc_exclude = [1]\n", "'agc_exclude' must be a list of strings"),
        ("zclip_max_norm = -2\n", "zclip_max_norm -2 must be a positive finite number or 'none'"),
        ("clip_value = 0.5\n", "'clip_value' must be a list of numbers"),
    ],
)
def test_recipe_rule_keys_are_checked(tmp_path, body, message):
    with pytest.raises(UsageError) as info:
        load_recipe(write_recipe(tmp_path, body))
    assert message in info.value.message


def test_command_line_rule_option_joins_the_recipe_grid(tmp_path):
    path = write_recipe(tmp_path, "max_norm = [1]\nnorm_type = [2]\nsteps = 2\n")
    result = invoke("sweep", "--recipe", path, "--autoclip", "10", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    runs = list(pd.read_csv(tmp_path / "out" / "summary.csv")["run"])
    assert runs == ["unclipped", "clip_1_2", "autoclip_p10"]


def test_rule_records_survive_a_csv_round_trip(tmp_path):
    from gradcheck_cli.report.files import write_manifest, write_reports

    cell = Cell(None, mode="zclip", param=2.5)
    result = RunResult(cell, STABLE, [StepRecord(1, 1.5, 3.0, 0.25, 0.75), StepRecord(2, 1.0, 1.0, 0.999999, 1.0)])
    agc = RunResult(Cell(None, mode="agc", param=0.01), STABLE, [StepRecord(1, 1.5, 3.0, math.nan, math.nan, 0.125)])
    config = SweepConfig(script=RNN)
    write_reports(tmp_path, [result, agc], [0.1, 10.0])
    write_manifest(tmp_path, config.fingerprint(), [result.run, agc.run])
    loaded = load_finished(tmp_path, config.fingerprint())
    assert loaded["zclip_z2.5"].cell == cell and loaded["agc_0.01"].cell == agc.cell
    assert [(s.clip_coef, s.clip_threshold) for s in loaded["zclip_z2.5"].steps] == [(0.25, 0.75), (0.999999, 1.0)]
    assert loaded["agc_0.01"].steps[0].clipped_unit_frac == 0.125
    assert result.summary_row()["clipped_frac"] == 0.5 and agc.summary_row()["clipped_frac"] == 1.0


def test_readme_rules_recipe_loads_and_sweeps(tmp_path):
    import re

    page = (ROOT / "docs" / "engine.md").read_text()
    section = page.split("## Sweeping the rules", 1)[1]
    text = re.search(r"```toml\n(.*?)\n```", section, flags=re.S).group(1)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "sample_models").mkdir()
    (tmp_path / "sample_models" / "exploding_rnn.py").write_text(RNN.read_text())
    path = tmp_path / "recipes" / "rules.toml"
    path.write_text(text)
    config = SweepConfig.from_values(load_recipe(path))
    assert [c.run for c in config.cells()] == [
        "unclipped",
        "clip_0.1_2",
        "clip_1_2",
        "value_0.01",
        "agc_0.01",
        "agc_0.1",
        "autoclip_p10",
        "autoclip_p25",
        "zclip_z2.5",
    ]
    assert config.agc_exclude == ("head",) and config.zclip_max_norm is None
    result = invoke("sweep", "--recipe", path, "--steps", "3", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_rules_with_the_lr_and_seed_axes_end_to_end(tmp_path):
    result = invoke(
        "sweep",
        RNN,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--agc",
        "0.1",
        "--lr",
        "0.01,0.005",
        "--seeds",
        "0,1",
        "--steps",
        "6",
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "summary.csv")
    agc = summary[summary.clip_mode == "agc"]
    assert list(agc["run"]) == [
        "agc_0.1@lr=0.01,seed=0",
        "agc_0.1@lr=0.005,seed=0",
        "agc_0.1@lr=0.01,seed=1",
        "agc_0.1@lr=0.005,seed=1",
    ]
    assert list(agc["lr"]) == [0.01, 0.005, 0.01, 0.005] and list(agc["seed"]) == [0, 0, 1, 1]
    assert "stability: lr x clipping" in result.stdout and "agc_0.1" in result.stdout
    # each (lr, seed) starts from one state: step 1 is the same for the control, clip_1_2 and agc
    steps = pd.read_csv(tmp_path / "steps.csv")
    first = steps[steps.step == 1].groupby(["lr", "seed"])["loss"].nunique()
    assert (first == 1).all()
    resumed = invoke(
        "sweep",
        RNN,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--agc",
        "0.1",
        "--lr",
        "0.01,0.005",
        "--seeds",
        "0,1",
        "--steps",
        "6",
        "--out",
        tmp_path,
        "--resume",
    )
    assert resumed.exit_code == 0 and "resuming: 12 of 12 runs" in resumed.stderr


# --- train_step scripts: the rules at every clip call ---------------------------------------------

GAN = ROOT / "sample_models" / "tiny_gan.py"


class _Params:
    """A parameter list that looks like a module to the reference rules."""

    def __init__(self, params) -> None:
        self.params = list(params)

    def parameters(self):
        return iter(self.params)

    def named_parameters(self):
        return ((str(i), p) for i, p in enumerate(self.params))


def reference_gan_with_rule(steps: int, make_rule):
    """tiny_gan trained with torch alone, seeded as a sweep seeds, each clip call applying its
    own reference rule (one per call site); per step: the loss and (site, norm, threshold,
    share) per call."""
    import random

    import numpy as np

    experiment = load_experiment(GAN)

    def seed_all():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)

    seed_all()
    model = experiment.build_model_fn()
    optimizers = experiment.build_optimizer_fn(model)
    seed_all()
    rules, out = {}, []
    for batch in list(experiment.batches_fn())[:steps]:
        sites = []

        def clip(params, name=None):
            rule = rules.setdefault(name, make_rule())
            sites.append((name, *rule(_Params(params))))

        loss = experiment.train_step_fn(model, batch, optimizers, clip)
        out.append((float(loss), sites))
    return out


@pytest.mark.parametrize(
    "cell, make_ref",
    [
        (Cell(None, mode="autoclip", param=25), lambda: AutoClipRule(25)),
        (Cell(None, mode="agc", param=0.05), lambda: AGCRule(0.05)),
        (Cell(None, mode="value", param=0.05), lambda: ValueRule(0.05)),
    ],
    ids=["autoclip", "agc", "value"],
)
def test_train_step_clip_calls_apply_the_rule_per_site(cell, make_ref):
    config = SweepConfig(script=GAN, max_norms=(), steps=8)
    (result,) = run_sweep(config, load_experiment(GAN), cells=[cell])
    ref = reference_gan_with_rule(8, make_ref)
    assert result.status == STABLE and len(result.steps) == 8
    approx = lambda xs: pytest.approx(xs, rel=1e-5, abs=1e-7, nan_ok=True)  # noqa: E731
    for step, (loss, sites) in zip(result.steps, ref):
        assert step.loss == approx(loss)
        assert [s[0] for s in step.sites] == [s[0] for s in sites] == ["discriminator", "generator"]
        assert [s[1] for s in step.sites] == approx([s[1] for s in sites])
        thresholds = [s[2] for s in sites if not math.isnan(s[2])]
        assert step.clip_threshold == approx(min(thresholds) if thresholds else math.nan)
        fracs = [s[3] for s in sites if not math.isnan(s[3])]
        assert step.clipped_unit_frac == approx(max(fracs) if fracs else math.nan)
        if cell.mode == "autoclip":
            coefs = [min(t / (n + 1e-6), 1.0) for _, n, t, _ in sites]
            assert [s[2] for s in step.sites] == approx(coefs) and step.clip_coef == approx(min(coefs))
        else:
            assert math.isnan(step.clip_coef) and all(math.isnan(s[2]) for s in step.sites)
    if cell.mode == "autoclip":
        assert any(s[2] < 0.999 for st in result.steps for s in st.sites)  # the rule bit
    else:
        assert any(st.clipped_unit_frac > 0 for st in result.steps)


# --- sparse gradients ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.sampled_from([None, 1, 3]),
    entries=st.lists(st.tuples(st.integers(0, 5), st.floats(-5, 5)), min_size=1, max_size=8),
    clip_factor=st.sampled_from([0.01, 0.1, 1.0]),
    seed=st.integers(0, 100),
)
def test_agc_on_a_sparse_gradient_equals_agc_on_its_dense_equivalent(rows, cols, entries, clip_factor, seed):
    from gradcheck_cli.engine import AGC

    shape = (rows,) if cols is None else (rows, cols)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    index = torch.tensor([[r % rows for r, _ in entries]])  # repeated rows: an uncoalesced gradient
    values = (
        torch.tensor([v for _, v in entries]).reshape(-1, *shape[1:])
        if cols is None
        else torch.tensor([v for _, v in entries])[:, None] * torch.randn(len(entries), cols, generator=gen)
    )
    grad = torch.sparse_coo_tensor(index, values, shape)
    sparse_p, dense_p = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    sparse_p.grad, dense_p.grad = grad.clone(), grad.to_dense()
    a, b = AGC(clip_factor), AGC(clip_factor)
    a.clip([sparse_p])
    b.clip([dense_p])
    assert sparse_p.grad.is_sparse
    torch.testing.assert_close(sparse_p.grad.to_dense(), dense_p.grad, rtol=1e-5, atol=1e-7)
    assert a.last.clipped_frac == b.last.clipped_frac


def test_every_mode_runs_on_sparse_gradients(tmp_path):
    script = SCRIPTS / "sparse_embedding.py"
    result = invoke(
        "sweep",
        script,
        "--max-norm",
        "1",
        "--norm-type",
        "2",
        "--clip-value",
        "0.01",
        "--agc",
        "0.01",
        "--autoclip",
        "10",
        "--zclip",
        "2.5",
        "--steps",
        "6",
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(tmp_path / "summary.csv").set_index("run")
    assert (summary["status"] == STABLE).all()
    steps = pd.read_csv(tmp_path / "steps.csv")
    for run in ("value_0.01", "agc_0.01"):
        fracs = steps[steps.run == run]["clipped_unit_frac"]
        assert fracs.between(0, 1).all() and (fracs > 0).any()


def test_resume_refuses_a_corrupt_clip_mode(all_modes, tmp_path):
    out, _ = all_modes
    for name in ("summary.csv", "steps.csv", "layers.csv", "histograms.csv", "gradclip-sweep.json"):
        text = (out / name).read_bytes()
        if name == "summary.csv":
            text = text.replace(b",agc,0.1,", b",agk,0.1,")
        (tmp_path / name).write_bytes(text)
    result = invoke("sweep", RNN, *ALL_MODES, "--out", tmp_path, "--resume")
    assert result.exit_code == 2, result.output
    assert "unknown clip_mode 'agk'" in result.stderr


# --- the recommendation ----------------------------------------------------------------------------


def _run(cell: Cell, status: str, level: float, n: int = 12) -> RunResult:
    steps = [StepRecord(i + 1, level + 0.001 * (i % 3), 5.0, 0.5) for i in range(n)]
    if status == DIVERGED:
        steps = [StepRecord(1, 1.0, 50.0, 1.0), StepRecord(2, 1e9)]
        return RunResult(cell, status, steps, diverged_step=2)
    return RunResult(cell, status, steps)


def test_recommendation_picks_a_rule_only_when_it_beats_every_fixed_threshold():
    from gradcheck_cli.recommend import recommend

    control = _run(Cell(None), DIVERGED, 0)
    fixed = _run(Cell(1.0, 2.0), STABLE, 0.5)
    agc = _run(Cell(None, mode="agc", param=0.1), STABLE, 0.1)
    rec = recommend([control, fixed, agc])
    assert rec.run is agc and rec.as_json()["clip_mode"] == "agc" and rec.as_json()["max_norm"] is None
    assert rec.evidence["boundary"] is None
    assert (
        "clip with agc clip_factor=0.1 (agc_0.1)" in rec.line()
        and "better than every stable fixed threshold" in rec.reason
    )
    # within noise of the fixed threshold: the fixed threshold stays
    close = _run(Cell(None, mode="agc", param=0.1), STABLE, 0.5)
    assert recommend([control, fixed, close]).run is fixed
    # no fixed threshold stable: the stable rule is suggested
    unstable = _run(Cell(1.0, 2.0), DIVERGED, 0)
    rec = recommend([control, unstable, close])
    assert rec.run is close and "no fixed threshold was stable" in rec.reason


def test_rule_values_one_ulp_apart_are_two_runs_with_two_names():
    config = SweepConfig.from_values(
        {
            "script": RNN,
            "autoclip_percentiles": [1.0000000000000002e-06, 1e-06],
            "zclip_z_thresholds": [2.5, 2.5000000000000004],
        }
    )
    assert [c.run for c in config.cells()] == [
        "unclipped",
        "autoclip_p1.0000000000000002e-06",
        "autoclip_p1e-06",
        "zclip_z2.5",
        "zclip_z2.5000000000000004",
    ]
