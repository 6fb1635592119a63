import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gradcheck_cli.errors import UsageError
from gradcheck_cli.report.junit import junit_tree, write_junit
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
)

NAN = math.nan
TRACEBACK = 'Traceback (most recent call last):\n  File "model.py", line 9, in loss_fn\n    return x[3]\nIndexError: index 3 is out of bounds <&> "x"\x1b[0m'


def results() -> list[RunResult]:
    return [
        RunResult(
            Cell(None, 2.0),
            NON_FINITE,
            [StepRecord(i, 1.0, 2.0, 1.0) for i in range(1, 37)] + [StepRecord(37, 0.9, NAN, NAN)],
            nan_step=37,
            nan_source=SOURCE_BACKWARD,
            nan_param="rnn.weight_hh_l0",
            seconds=0.5,
        ),
        RunResult(Cell(1.0, 2.0), STABLE, [StepRecord(1, 1.0, 2.0, 0.5), StepRecord(2, 0.5, 1.0, 1.0)], seconds=0.25),
        RunResult(
            Cell(10.0, math.inf),
            DIVERGED,
            [StepRecord(1, 1.789, 65.7, 1.0), StepRecord(2, 3.457e7)],
            diverged_step=2,
            seconds=0.125,
        ),
        RunResult(Cell(0.1, 2.0), NON_FINITE, [StepRecord(1, NAN)], nan_step=1, nan_source=SOURCE_FORWARD),
        RunResult(
            Cell(5.0, 2.0),
            ERROR,
            [],
            seconds=0.01,
            error='IndexError: index 3 is out of bounds <&> "x"',
            error_traceback=TRACEBACK,
        ),
    ]


def read(path: Path):
    return ET.parse(path).getroot()


def test_counts_and_structure_as_junit_consumers_read_them(tmp_path):
    path = tmp_path / "junit.xml"
    write_junit(path, results(), suite_name="gradclip.exploding_rnn")
    assert path.read_bytes().startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = read(path)
    # Jenkins / GitLab / pytest layout: <testsuites><testsuite><testcase/>...</testsuite></testsuites>
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["unclipped", "clip_1_2", "clip_10_inf", "clip_0.1_2", "clip_5_2"]
    assert {c.get("classname") for c in cases} == {"gradclip.exploding_rnn"}
    for element in (root, suite):
        assert element.get("name") == "gradclip.exploding_rnn"
        assert int(element.get("tests")) == len(cases) == 5
        assert int(element.get("failures")) == sum(c.find("failure") is not None for c in cases) == 3
        assert int(element.get("errors")) == sum(c.find("error") is not None for c in cases) == 1
        assert int(element.get("skipped")) == 0
        assert float(element.get("time")) == pytest.approx(0.885, abs=1e-3)
    assert [float(c.get("time")) for c in cases] == [0.5, 0.25, 0.125, 0.0, 0.01]
    # A passing case is an empty element.
    assert list(cases[1]) == []


def test_failure_messages_name_step_source_and_parameter(tmp_path):
    path = tmp_path / "junit.xml"
    write_junit(path, results())
    cases = {c.get("name"): c for c in read(path).iter("testcase")}
    nan = cases["unclipped"].find("failure")
    assert nan.get("type") == "non_finite"
    assert nan.get("message") == "non_finite at step 37 (backward): first non-finite gradient in rnn.weight_hh_l0"
    assert "steps run: 37" in nan.text and "max_norm: none (unclipped)" in nan.text
    div = cases["clip_10_inf"].find("failure")
    assert div.get("type") == "diverged"
    assert div.get("message") == "diverged at step 2: loss 3.457e7 vs 1.789 at step 1"
    assert "norm_type: inf" in div.text
    fwd = cases["clip_0.1_2"].find("failure")
    assert fwd.get("message") == "non_finite at step 1 (forward): the loss is nan"


def test_error_carries_the_exception_and_a_parseable_traceback(tmp_path):
    path = tmp_path / "junit.xml"
    write_junit(path, results())
    error = next(c for c in read(path).iter("testcase") if c.get("name") == "clip_5_2").find("error")
    assert error.get("type") == "IndexError"
    assert error.get("message") == 'IndexError: index 3 is out of bounds <&> "x"'
    assert 'File "model.py", line 9, in loss_fn' in error.text
    assert "\x1b" not in error.text  # a control character XML cannot hold is replaced, not written


def test_default_suite_name_and_plain_names():
    assert junit_tree(results()).getroot().find("testsuite/testcase").get("classname") == "gradclip"
    assert junit_tree(results(), "mymodel").getroot().find("testsuite/testcase").get("classname") == "gradclip.mymodel"


def test_all_stable_and_empty(tmp_path):
    path = tmp_path / "ok.xml"
    write_junit(path, [results()[1]])
    root = read(path)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("1", "0", "0")
    write_junit(path, [])
    root = read(path)
    assert root.get("tests") == "0" and root.find("testsuite") is not None


def test_write_is_atomic_creates_parents_and_rejects_directories(tmp_path):
    path = tmp_path / "reports" / "ci" / "junit.xml"
    write_junit(path, results())
    write_junit(path, results()[:1])  # replaced whole
    assert read(path).get("tests") == "1"
    assert [p.name for p in path.parent.iterdir()] == ["junit.xml"]  # no temp file left
    with pytest.raises(UsageError, match="is a directory"):
        write_junit(tmp_path, results())


# Elements, attributes and children allowed by the common JUnit schema (Jenkins' junit-10.xsd,
# which GitLab and most CI report parsers follow).
SCHEMA = {
    "testsuites": ({"name", "time", "tests", "failures", "errors", "skipped", "disabled"}, {"testsuite"}),
    "testsuite": (
        {
            "name",
            "tests",
            "failures",
            "errors",
            "time",
            "disabled",
            "skipped",
            "timestamp",
            "hostname",
            "id",
            "package",
            "file",
            "log",
            "url",
            "version",
        },
        {"testcase", "properties", "system-out", "system-err"},
    ),
    "testcase": (
        {"name", "classname", "time", "assertions", "status", "file", "line"},
        {"skipped", "error", "failure", "system-out", "system-err"},
    ),
    "failure": ({"message", "type"}, set()),
    "error": ({"message", "type"}, set()),
}


def test_only_schema_elements_and_attributes(tmp_path):
    path = tmp_path / "junit.xml"
    write_junit(path, results())
    for element in read(path).iter():
        attributes, children = SCHEMA[element.tag]
        assert set(element.attrib) <= attributes, element.tag
        assert {child.tag for child in element} <= children, element.tag
    for case in read(path).iter("testcase"):
        assert case.get("name") and case.get("classname")
