"""``gradclip report``: the table, verdict and report.html again from an --out directory
(docs/outputs.md)."""

from __future__ import annotations

from pathlib import Path

from gradcheck_cli.analysis import DEFAULT_SPIKE_FACTOR, annotate_spike
from gradcheck_cli.cli._shell import stderr_console
from gradcheck_cli.cli.output import print_results, write_derived
from gradcheck_cli.config import check_spike_factor
from gradcheck_cli.errors import UsageError
from gradcheck_cli.report import files


def run(directory: Path, given: dict) -> None:
    """Read DIRECTORY's CSV files back and write recommendation.json and report.html there."""
    if not directory.is_dir():
        raise UsageError(
            f"{str(directory)!r} is not a directory",
            "give the --out directory of a gradclip sweep, e.g. gradclip report gradclip-report",
        )
    if not (directory / files.SUMMARY_FILE).is_file():
        raise UsageError(
            f"{str(directory)!r} is not a gradclip output: it has no {files.SUMMARY_FILE}",
            "give the --out directory of a gradclip sweep, e.g. gradclip report gradclip-report",
        )
    spike_factor = given["spike_factor"]
    factor = check_spike_factor(spike_factor) if spike_factor is not None else DEFAULT_SPIKE_FACTOR
    results = files.read_results(directory)
    if not results:
        raise UsageError(f"{directory / files.SUMMARY_FILE} holds no runs", "run gradclip sweep (or --resume it) first")
    for r in results:  # the spike is re-derived from layers.csv (a monitor does not judge it)
        if any(s.layers for s in r.steps):
            annotate_spike(r, factor)
    try:
        recommendation = write_derived(directory, results, title=directory.resolve().name)
    except OSError as exc:
        raise UsageError(
            f"cannot write the report into {str(directory)!r}: {exc.strerror or exc}",
            "copy the directory somewhere writable first",
        ) from None
    print_results(results, given["json"], recommendation)
    stderr_console().print(f"report written to {directory / files.HTML_FILE}", markup=False)
