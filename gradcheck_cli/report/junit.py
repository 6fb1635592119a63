"""A JUnit XML report: one test case per run, for CI systems that render test results, in the
shape Jenkins, GitLab, GitHub test reporters and pytest's ``--junitxml`` use. A stable run
passes, ``non_finite`` and ``diverged`` are failures, ``error`` and ``crashed`` are errors. See
docs/outputs.md (JUnit and CI; Reference: how the files are written).
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gradcheck_cli.errors import ReportWriteError, UsageError
from gradcheck_cli.report._io import atomic_write_bytes
from gradcheck_cli.results import CRASHED, DIVERGED, ERROR, NON_FINITE, RunResult, format_float, format_norm_type
from gradcheck_cli.text import describe_result, describe_setting, format_number

# Characters XML 1.0 forbids even when escaped (most C0 controls, e.g. the ESC of colour codes).
_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    return _XML_ILLEGAL.sub("\ufffd", text)


def _classname(suite_name: str) -> str:
    return suite_name if suite_name == "gradclip" or suite_name.startswith("gradclip.") else f"gradclip.{suite_name}"


def _details(r: RunResult) -> str:
    row = r.summary_row()
    if r.cell.max_norm is not None:
        max_norm = format_float(r.cell.max_norm)
    else:
        max_norm = "none (unclipped)" if not r.cell.clipped else "none"
    lr = format_number(r.lr) if r.lr is not None else "set by the script's optimizer"
    return (
        f"run: {r.run}\n"
        f"max_norm: {max_norm}\n"
        f"norm_type: {format_norm_type(r.cell.norm_type)}\n"
        f"clipping: {r.cell.mode}: {describe_setting(r.cell)}\n"
        f"lr: {lr}\n"
        f"seed: {r.seed if r.seed is not None else '—'}\n"
        f"status: {r.status}\n"
        f"steps run: {len(r.steps)}\n"
        f"steps skipped by the gradient scaler: {r.skipped_steps}\n"
        f"final loss: {format_number(row['final_loss'])}\n"
        f"max pre-clip gradient norm: {format_number(row['grad_norm_max'])}"
    )


def junit_tree(results: list[RunResult], suite_name: str = "gradclip") -> ET.ElementTree:
    """The report as an ``ElementTree`` (``write_junit`` writes it)."""
    classname = _classname(suite_name)
    failures = sum(r.status in (NON_FINITE, DIVERGED) for r in results)
    errors = sum(r.status in (ERROR, CRASHED) for r in results)
    total_time = f"{sum(r.seconds for r in results):.3f}"
    counts = {
        "tests": str(len(results)),
        "failures": str(failures),
        "errors": str(errors),
        "skipped": "0",
        "time": total_time,
    }
    root = ET.Element("testsuites", {"name": _xml_safe(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": _xml_safe(suite_name), **counts})
    for r in results:
        case = ET.SubElement(
            suite, "testcase", {"classname": _xml_safe(classname), "name": _xml_safe(r.run), "time": f"{r.seconds:.3f}"}
        )
        if r.status in (NON_FINITE, DIVERGED):
            failure = ET.SubElement(case, "failure", {"type": r.status, "message": _xml_safe(describe_result(r))})
            failure.text = _xml_safe(_details(r))
        elif r.status == CRASHED:
            error = ET.SubElement(case, "error", {"type": CRASHED, "message": _xml_safe(r.error or CRASHED)})
            error.text = _xml_safe(r.error or "")
        elif r.status == ERROR:
            exc_type = (r.error or "error").split(":", 1)[0]
            error = ET.SubElement(
                case, "error", {"type": _xml_safe(exc_type), "message": _xml_safe(r.error or "error")}
            )
            error.text = _xml_safe(r.error_traceback or r.error or "")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(path: str | os.PathLike, results: list[RunResult], suite_name: str = "gradclip") -> None:
    """Write the JUnit XML report to ``path`` atomically (UTF-8, with an XML declaration).

    The parent directory is created if missing. Raises ``UsageError`` when ``path`` is a
    directory and ``ReportWriteError`` (exit 5) when it cannot be written.
    """
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--junit {str(target)!r} is a directory", "give a file name, e.g. --junit gradclip-junit.xml")
    tree = junit_tree(results, suite_name)
    data = ET.tostring(tree.getroot(), encoding="utf-8", xml_declaration=True) + b"\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    except OSError as exc:
        raise ReportWriteError(
            f"cannot write --junit {str(target)!r}: {exc.strerror or exc}", "choose a path you can write to"
        ) from None
