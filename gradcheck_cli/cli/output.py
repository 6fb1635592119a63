"""What a command prints and writes after its runs: the table, the verdict, the derived reports
and the JUnit file (docs/outputs.md)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gradcheck_cli.cli._shell import stderr_console, stdout_console, to_stdout
from gradcheck_cli.errors import ExitCode, GradclipError, UsageError
from gradcheck_cli.recommend import recommend
from gradcheck_cli.report import files
from gradcheck_cli.report.html import write_html
from gradcheck_cli.report.jsonout import summary_json
from gradcheck_cli.report.junit import write_junit
from gradcheck_cli.report.terminal import (
    check_line,
    error_blocks,
    error_panels,
    stability_map,
    summary_table,
    verdict_line,
    warning_lines,
)
from gradcheck_cli.results import log_bins_by_norm_type


def absolute(path: Path | None) -> Path | None:
    """Paths gradclip owns are fixed before the script runs: an ``os.chdir`` in the script must
    not move the reports."""
    return None if path is None else Path(os.path.abspath(path))


def prepare_junit(path: Path | None) -> Path | None:
    """Check, before the first run, that the JUnit file can be written: its parent directory
    is created and a probe file created and removed there."""
    if path is None:
        return None
    path = absolute(path)
    fix = "choose a --junit path you can write to"
    if path.is_dir():
        raise UsageError(f"--junit {str(path)!r} is a directory", "give a file name, e.g. --junit gradclip-junit.xml")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.{os.getpid()}.probe"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write --junit {str(path)!r}: {exc.strerror or exc}", fix) from None
    return path


def write_junit_report(junit: Path | None, results: list, suite_name: str, code: int) -> int:
    """Write the JUnit file after the verdict is out; a failure is one line on stderr and never
    hides the verdict: its exit code stays, and only a clean exit becomes 5."""
    if junit is None:
        return code
    try:
        write_junit(junit, results, suite_name=suite_name)
    except GradclipError as err:
        err_console = stderr_console()
        err_console.print(f"error: {err.message}", style="bold red", markup=False, soft_wrap=True)
        if err.hint:
            err_console.print(f"hint: {err.hint}", markup=False, soft_wrap=True)
        return code if code != int(ExitCode.OK) else int(ExitCode.REPORTS_NOT_WRITTEN)
    return code


def run_progress(enabled: bool = True):
    """Rich progress bars on stderr: one for the runs, one for the steps of each run in progress
    (``enabled=False``: drawn nowhere, for ranks other than 0 under torchrun)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr_console(),
        transient=False,
        disable=not enabled,
    )


def user_output_to_stderr(active: bool):
    """With --json, stdout carries only the JSON: whatever the user's script prints goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if active else contextlib.nullcontext()


def print_errors(results: list) -> None:
    """The errored runs' tracebacks on stderr: in panels on a terminal, as plain unwrapped text
    otherwise (CI logs)."""
    err = stderr_console()
    if err.is_terminal:
        for panel in error_panels(results):
            err.print(panel)
        return
    for title, body in error_blocks(results):
        err.print(f"--- {title} ---\n{body}", markup=False, soft_wrap=True)


def write_derived(out_dir: Path, results: list, title: str):
    """``recommendation.json`` and ``report.html``, both derived from the results alone."""
    recommendation = recommend(results)
    files.write_recommendation(out_dir, recommendation.as_json())
    write_html(Path(out_dir) / files.HTML_FILE, results, recommendation, title=title)
    return recommendation


def print_results(results: list, json_out: bool, recommendation=None) -> None:
    """A sweep's (or a report's) errors, summary table, stability map and verdict: the table on
    stdout, or with ``json_out`` the JSON there and the verdict on stderr."""
    err = stderr_console()
    print_errors(results)
    lines = [verdict_line(results)] + ([recommendation.line()] if recommendation is not None else [])
    if json_out:
        to_stdout(lambda: sys.stdout.write(summary_json(results) + "\n"))
        for line in warning_lines(results) + lines:
            err.print(line, markup=False, soft_wrap=True)
        return
    out = stdout_console()

    def write() -> None:
        out.print(summary_table(results, log_bins_by_norm_type(results)))
        grid = stability_map(results)
        if grid is not None:
            out.print(grid)
        for line in warning_lines(results) + lines:  # the note under the table, then the verdict
            out.print(line, markup=False, soft_wrap=True)

    to_stdout(write)


def print_check(results: list, json_out: bool) -> None:
    """A check's errors, then its verdict line and warnings on stdout; with ``json_out`` the
    JSON on stdout and the warnings on stderr."""
    print_errors(results)
    if json_out:
        to_stdout(lambda: sys.stdout.write(summary_json(results) + "\n"))
        for line in warning_lines(results):
            stderr_console().print(line, markup=False, soft_wrap=True)
        return
    out = stdout_console()

    def write() -> None:
        out.print(check_line(results[0]), markup=False, soft_wrap=True)
        for line in warning_lines(results):
            out.print(line, markup=False, soft_wrap=True)

    to_stdout(write)
