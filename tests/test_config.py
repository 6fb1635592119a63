"""Parsing and validating a sweep's options: the same rules for the command line and recipes."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck_cli.config import (
    SweepConfig,
    check_device,
    check_positive,
    check_script,
    check_steps,
    parse_max_norms,
    parse_norm_types,
)
from gradcheck_cli.errors import ExitCode, UsageError

positive = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(positive, min_size=1, max_size=6))
def test_max_norms_round_trip_through_text_in_order_without_duplicates(values):
    text = ",".join(repr(v) for v in values)
    parsed = parse_max_norms(text)
    assert parsed == tuple(dict.fromkeys(values))
    assert parse_max_norms(values) == parsed  # recipes give lists


@pytest.mark.parametrize(
    "text, bad",
    [
        ("-1", "'-1'"),
        ("0", "'0'"),
        ("1,abc", "'abc'"),
        ("inf", "'inf'"),
        ("nan", "'nan'"),
        ("1,,2", "empty"),
        ("", "empty"),
    ],
)
def test_bad_max_norms_name_the_value(text, bad):
    with pytest.raises(UsageError) as info:
        parse_max_norms(text)
    assert bad in info.value.message
    assert info.value.exit_code == ExitCode.USAGE
    assert "--max-norm" in (info.value.hint or "")


def test_norm_types_accept_numbers_and_inf():
    assert parse_norm_types("2, inf ,1,0.5,-inf,2") == (2.0, math.inf, 1.0, 0.5, -math.inf)
    assert parse_norm_types([2, "inf"]) == (2.0, math.inf)


@pytest.mark.parametrize("text", ["l2", "nan", "2,", "two"])
def test_bad_norm_types(text):
    with pytest.raises(UsageError):
        parse_norm_types(text)


@pytest.mark.parametrize("steps", [0, -3, 1.5, True, "10"])
def test_steps_must_be_a_whole_number_of_at_least_one(steps):
    with pytest.raises(UsageError, match="--steps"):
        check_steps(steps)
    assert check_steps(1) == 1


def test_positive_and_device_checks():
    assert check_positive("0.5", "--lr") == 0.5
    for bad in (0, -1, "x", math.inf, math.nan):
        with pytest.raises(UsageError, match="--lr"):
            check_positive(bad, "--lr")
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(UsageError, match="'tpu'"):
        check_device("tpu")


def test_script_must_be_an_existing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_script(tmp_path / "missing.py")
    with pytest.raises(UsageError, match="not a file"):
        check_script(tmp_path)


def test_cells_control_first_then_grid_max_norm_major(tmp_path):
    config = SweepConfig(script=tmp_path / "m.py", max_norms=(0.1, 1.0), norm_types=(2.0, math.inf))
    runs = [c.run for c in config.cells()]
    assert runs == ["unclipped", "clip_0.1_2", "clip_0.1_inf", "clip_1_2", "clip_1_inf"]
    assert config.cells()[0].max_norm is None and config.cells()[0].norm_type == 2.0


def test_fingerprint_is_json_and_tells_configs_apart(tmp_path):
    a = SweepConfig(script=tmp_path / "m.py")
    b = SweepConfig(script=tmp_path / "m.py", steps=50)
    assert json.loads(json.dumps(a.fingerprint())) == a.fingerprint()
    assert a.fingerprint() == SweepConfig(script=tmp_path / "m.py").fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint()["norm_types"] == ["2", "inf"]


def test_from_values_applies_defaults_and_validates(tmp_path):
    script = tmp_path / "m.py"
    script.write_text("")
    config = SweepConfig.from_values({"script": script, "steps": 5, "norm_types": "inf"})
    assert config == SweepConfig(script=script, steps=5, norm_types=(math.inf,))
    with pytest.raises(UsageError, match="no script"):
        SweepConfig.from_values({})
    with pytest.raises(UsageError, match="--seed"):
        SweepConfig.from_values({"script": script, "seed": -1})
    with pytest.raises(UsageError, match="--divergence-factor"):
        SweepConfig.from_values({"script": script, "divergence_factor": 0})


@settings(max_examples=100, deadline=None)
@given(
    st.lists(positive, min_size=1, max_size=3, unique_by=lambda x: f"{x:g}"),
    st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=3, unique=True),
    st.lists(positive, min_size=1, max_size=3, unique_by=lambda x: f"{x:g}"),
)
def test_grid_names_are_unique_and_name_only_the_axes_that_vary(tmp_path_factory, lrs, seeds, max_norms):
    script = tmp_path_factory.mktemp("m") / "m.py"
    script.write_text("")
    config = SweepConfig.from_values(
        {"script": script, "lr": lrs, "seeds": seeds, "max_norms": max_norms, "norm_types": "2,inf"}
    )
    cells = config.cells()
    names = [c.run for c in cells]
    assert len(names) == len(set(names)) == len(lrs) * len(seeds) * (1 + 2 * len(max_norms))
    for cell in cells:
        assert ("lr=" in cell.run) == (len(lrs) > 1) and ("seed=" in cell.run) == (len(seeds) > 1)
        assert config.lr_of(cell) in lrs and config.seed_of(cell) in seeds
    # seed-major: each seed's runs are contiguous, so one snapshot is held at a time
    order = [config.seed_of(c) for c in cells]
    assert order == sorted(order, key=seeds.index)


def test_axes_from_values_and_their_checks(tmp_path):
    script = tmp_path / "m.py"
    script.write_text("")
    config = SweepConfig.from_values(
        {"script": script, "lr": "0.1, 1,0.1", "seeds": "2,0", "amp": "bf16", "accumulate": 4}
    )
    assert (config.lrs, config.seeds, config.amp, config.accumulate) == ((0.1, 1.0), (2, 0), "bf16", 4)
    assert SweepConfig.from_values({"script": script}).lrs is None  # no lr given: the script keeps its own
    assert SweepConfig.from_values({"script": script, "seed": 4}).seeds == (4,)
    assert SweepConfig.from_values({"script": script, "seed": 4, "seeds": "4"}).seeds == (4,)
    with pytest.raises(UsageError, match="disagree"):
        SweepConfig.from_values({"script": script, "seed": 4, "seeds": "4,5"})
    # values that differ in the last digits get names that differ too (shortest exact form)
    close = SweepConfig.from_values({"script": script, "lr": "0.1,0.1000001", "max_norms": "1", "norm_types": "2"})
    assert [c.run for c in close.cells()] == [
        "unclipped@lr=0.1",
        "clip_1_2@lr=0.1",
        "unclipped@lr=0.1000001",
        "clip_1_2@lr=0.1000001",
    ]
    fingerprint = config.fingerprint()
    assert (fingerprint["lrs"], fingerprint["seeds"], fingerprint["amp"], fingerprint["accumulate"]) == (
        [0.1, 1.0],
        [2, 0],
        "bf16",
        4,
    )
    assert json.loads(json.dumps(fingerprint)) == fingerprint
