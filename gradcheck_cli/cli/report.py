"""``gradclip report``: the table, verdict and report.html again from an --out directory
(docs/outputs.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradcheck_cli.cli._options import JSON, SPIKE_FACTOR
from gradcheck_cli.cli._shell import exit_on_errors, stderr_console
from gradcheck_cli.cli.output import print_results, write_derived


@exit_on_errors
def report(
    directory: Path = typer.Argument(
        ..., help="An --out directory written by gradclip sweep (or a monitor).", show_default=False
    ),
    json_out: bool = JSON,
    spike_factor: float | None = SPIKE_FACTOR,
) -> None:
    """Read the CSV files in DIRECTORY (after a resume, or from a CI artifact) and re-render the summary table, the
    verdict, recommendation.json and report.html there; spikes are found again from layers.csv (give the sweep's
    --spike-factor if it was not the default). Exit 2 when DIRECTORY is not a gradclip output."""
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.report import files

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
    from gradcheck_cli.analysis import DEFAULT_SPIKE_FACTOR, annotate_spike
    from gradcheck_cli.config import check_spike_factor

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
    print_results(results, json_out, recommendation)
    stderr_console().print(f"report written to {directory / files.HTML_FILE}", markup=False)
