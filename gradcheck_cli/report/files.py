"""Writing a sweep's report files in ``--out``: ``summary.csv``, ``steps.csv``, ``layers.csv``,
``control_norms.csv``, ``histograms.csv``, ``clip_sites.csv``, ``recommendation.json`` and the
resume manifest ``gradclip-sweep.json``. Each file is replaced atomically or appended up to a
committed length (``_io``), the manifest last, so it never names a run the CSV files lack;
``ReportWriter`` keeps them current during a sweep at a cost per run in proportion to that run's
rows. Reading them back (``--resume``, ``gradclip report``) is ``resume``'s job. See
docs/outputs.md (Output files; Reference: how the files are written).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

from gradcheck_cli import __version__
from gradcheck_cli.errors import ReportWriteError
from gradcheck_cli.report._io import (
    CONTROL_NORMS_FILE,
    HISTOGRAMS_FILE,
    HTML_FILE,
    LAYERS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    RECOMMENDATION_FILE,
    SITES_FILE,
    STEPS_FILE,
    SUMMARY_FILE,
    OutDirLock,
    _csv_body,
    _csv_bytes,
    _csv_header,
    _write_error,
    append_bytes,
    atomic_write_bytes,
    prepare_out_dir,
)
from gradcheck_cli.report.resume import load_finished, read_results
from gradcheck_cli.results import (
    NormRange,
    RunResult,
    control_norms_frame,
    format_norm_type,
    histogram_frame,
    layers_frame,
    ranges_to_bins,
    sites_frame,
    steps_frame,
    summary_frame,
)

# The output directory's API, importable from here: what this module writes, and beside it the
# file names, the directory lock and the atomic writes (``_io``) and the readers (``resume``).
__all__ = [
    "APPENDED_FILES",
    "CONTROL_NORMS_FILE",
    "HISTOGRAMS_FILE",
    "HTML_FILE",
    "LAYERS_FILE",
    "LOCK_FILE",
    "MANIFEST_FILE",
    "ONLY_WITH_ROWS",
    "RECOMMENDATION_FILE",
    "SITES_FILE",
    "STEPS_FILE",
    "SUMMARY_FILE",
    "OutDirLock",
    "ReportWriter",
    "append_bytes",
    "atomic_write_bytes",
    "load_finished",
    "prepare_out_dir",
    "read_results",
    "write_manifest",
    "write_recommendation",
    "write_reports",
]

# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def write_reports(out_dir: str | os.PathLike, results: list[RunResult], edges) -> None:
    """Write ``summary.csv``, ``steps.csv``, ``layers.csv``, ``control_norms.csv``,
    ``histograms.csv`` and ``clip_sites.csv`` for ``results`` (all runs finished so far, in
    sweep order), each atomically. ``edges`` are the histogram bins: per norm type
    (``results.log_bins_by_norm_type(results)``) or one shared list. A sweep writes through
    ``ReportWriter`` instead, which costs per run only that run's rows."""
    out = Path(out_dir)
    atomic_write_bytes(out / SUMMARY_FILE, _csv_bytes(summary_frame(results)))
    for name, frame_of in APPENDED_FILES.items():
        _write_whole(out / name, frame_of(results))
    atomic_write_bytes(out / HISTOGRAMS_FILE, _csv_bytes(histogram_frame(results, edges)))


def _write_whole(path: Path, frame) -> int | None:
    """Replace ``path`` with ``frame``'s CSV and return its length; a file written only when it
    has rows (``ONLY_WITH_ROWS``) is removed instead when there are none (``None``)."""
    if path.name in ONLY_WITH_ROWS and not len(frame):
        if path.exists():
            path.unlink()
        return None
    data = _csv_bytes(frame)
    atomic_write_bytes(path, data)
    return len(data)


# Files whose rows belong to one run and never change once that run has finished: a sweep
# appends each finished run's rows to them instead of rewriting every row, and the manifest
# records how many bytes of each are committed. A new per-run file is one more entry here.
APPENDED_FILES = {
    STEPS_FILE: steps_frame,
    LAYERS_FILE: layers_frame,
    CONTROL_NORMS_FILE: control_norms_frame,
    SITES_FILE: sites_frame,
}
# Of those, the files that exist only when some run has rows for them.
ONLY_WITH_ROWS = {SITES_FILE}


class ReportWriter:
    """Keeps the report files in ``out_dir`` current while a sweep runs, at a cost per finished
    run in proportion to that run's rows.

    * ``steps.csv`` and ``layers.csv`` (``APPENDED_FILES``): the run's rows are appended (one
      ``write`` of complete lines, then fsync); their committed byte lengths go into the
      manifest. The first write of a sweep (and of a resumed one) replaces each file
      atomically with the header and every finished run's rows.
    * ``summary.csv`` and ``histograms.csv`` (a row or a few per run): replaced atomically
      from cached per-run rows; the histogram rows are recomputed only when the shared bins
      move.
    * the manifest last, so it never names a run or a byte the other files lack.

    Runs are kept in sweep order (``run_order``); a run finishing out of order makes the next
    write a full rewrite. A failing write raises ``ReportWriteError`` naming the file.
    """

    def __init__(self, out_dir: str | os.PathLike, fingerprint: dict, run_order: list[str], finished=()) -> None:
        self.out = Path(out_dir)
        self.fingerprint = fingerprint
        self._position = {run: i for i, run in enumerate(run_order)}
        self._results: list[RunResult] = sorted(finished, key=self._where)
        self._committed: dict[str, int] | None = None  # None: rewrite the appended files whole
        self._summary_rows: dict[str, bytes] = {}
        self._ranges: dict[tuple[str, float], NormRange] = {}
        self._histogram_rows: dict[str, bytes] = {}
        self._sorted_norms: dict[tuple[str, float], list[float]] = {}
        self._edges: dict[float, list[float]] | None = None
        self._bin_text: dict[float, list[str]] = {}

    def _where(self, result: RunResult) -> int:
        return self._position.get(result.run, len(self._position))

    @property
    def results(self) -> list[RunResult]:
        """The runs saved so far, in sweep order."""
        return list(self._results)

    def add(self, result: RunResult) -> None:
        """Record one more finished run and bring every file up to date."""
        if self._results and self._where(result) < self._where(self._results[-1]):
            self._committed = None  # out of order: appending would break the sweep order
            self._results.append(result)
            self._results.sort(key=self._where)
        else:
            self._results.append(result)
        try:
            self._write(result)
        except ReportWriteError:
            self._results.remove(result)  # ``results`` lists the saved runs only
            raise

    def flush(self) -> None:
        """Write every file whole, once, if this writer has not written yet (e.g. a resumed
        sweep whose runs had all finished)."""
        if self._committed is None:
            self._write(None)

    def _write(self, new: RunResult | None) -> None:
        out = self.out
        path = out / SUMMARY_FILE
        try:
            if self._committed is None or new is None:
                committed = {}
                for name, frame_of in APPENDED_FILES.items():
                    path = out / name
                    size = _write_whole(path, frame_of(self._results))
                    if size is not None:
                        committed[name] = size
                self._committed = committed
            else:
                for name, frame_of in APPENDED_FILES.items():
                    path = out / name
                    frame = frame_of([new])
                    if name not in self._committed:  # a file that had no rows until this run
                        size = _write_whole(path, frame)
                        if size is not None:
                            self._committed[name] = size
                        continue
                    self._committed[name] = append_bytes(path, _csv_body(frame), self._committed[name])
            path = out / SUMMARY_FILE
            atomic_write_bytes(path, self._summary_bytes())
            path = out / HISTOGRAMS_FILE
            atomic_write_bytes(path, self._histogram_bytes())
            path = out / MANIFEST_FILE
            write_manifest(out, self.fingerprint, [r.run for r in self._results], committed=self._committed)
        except OSError as exc:
            self._committed = None  # the next write (if any) starts from scratch
            raise _write_error(path, exc) from exc

    def _summary_bytes(self) -> bytes:
        parts = [_header(SUMMARY_FILE)]
        for r in self._results:
            row = self._summary_rows.get(r.run)
            if row is None:
                row = self._summary_rows[r.run] = _csv_body(summary_frame([r]))
            parts.append(row)
        return b"".join(parts)

    def _histogram_bytes(self) -> bytes:
        """Recomputed from each run's cached sorted norms when the bins move (a few bisections
        per run), formatted without pandas: the bins can move after every run. Bins are per
        norm type (``results.log_bins_by_norm_type``): L2 and inf norms never share an axis."""
        by_type: dict[float, list[NormRange]] = {}
        for r in self._results:
            for p in r.norm_types():
                key = (r.run, p)
                if key not in self._ranges:
                    self._ranges[key] = NormRange.of(r, p)
                    self._sorted_norms[key] = sorted(r.finite_norms_in(p))
                by_type.setdefault(p, []).append(self._ranges[key])
        edges = ranges_to_bins(by_type)
        if edges != self._edges:
            self._edges = edges
            self._histogram_rows = {}
            # "norm_type,left,right," of every bin of every norm type; repr is pandas' float format
            self._bin_text = {
                p: [f"{format_norm_type(p)},{float(e[i])!r},{float(e[i + 1])!r}," for i in range(len(e) - 1)]
                for p, e in edges.items()
            }
        parts = [_header(HISTOGRAMS_FILE)]
        for r in self._results:
            row = self._histogram_rows.get(r.run)
            if row is None:
                row = self._histogram_rows[r.run] = b"".join(
                    _histogram_csv_rows(r.run, self._sorted_norms[(r.run, p)], edges[p], self._bin_text[p])
                    for p in r.norm_types()
                )
            parts.append(row)
        return b"".join(parts)


_HEADERS: dict[str, bytes] = {}


def _header(name: str) -> bytes:
    if name not in _HEADERS:
        frame_of = {SUMMARY_FILE: summary_frame, HISTOGRAMS_FILE: lambda rs: histogram_frame(rs, {})}[name]
        _HEADERS[name] = _csv_header(frame_of)
    return _HEADERS[name]


def _histogram_csv_rows(run: str, sorted_norms: list[float], edges: list[float], bin_text: list[str]) -> bytes:
    """The run's ``histograms.csv`` rows, byte-identical to ``histogram_frame`` written by
    pandas: bins are [left, right), the last one closed, as ``results.histogram_counts``.
    Quoted as pandas quotes (only a name with a comma, quote or newline needs it)."""
    if len(edges) < 2:
        return b""
    below = [bisect.bisect_left(sorted_norms, e) for e in edges[1:-1]]  # norms under each inner edge
    bounds = [0, *below, len(sorted_norms)]
    if any(c in run for c in ',"\r\n'):  # a name of its own (a monitored run) may need quoting
        run = '"' + run.replace('"', '""') + '"'
    return "".join(f"{run},{bin_text[i]}{bounds[i + 1] - bounds[i]}\n" for i in range(len(edges) - 1)).encode("utf-8")


def write_recommendation(out_dir: str | os.PathLike, recommendation: dict) -> None:
    """``recommendation.json`` (``recommend.Recommendation.as_json()``), strict JSON, atomically."""
    text = json.dumps(recommendation, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(out_dir) / RECOMMENDATION_FILE, text.encode("utf-8"))


def write_manifest(
    out_dir: str | os.PathLike, fingerprint: dict, finished_runs: list[str], committed: dict[str, int] | None = None
) -> None:
    """Record, atomically, which runs of the sweep described by ``fingerprint``
    (``SweepConfig.fingerprint()``) have finished, and (``committed``) how many bytes of each
    appended file hold them: a reader ignores anything past that. Write it after the reports."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "gradclip_version": __version__,
        "fingerprint": fingerprint,
        "finished_runs": list(finished_runs),
    }
    if committed is not None:
        manifest["committed"] = dict(committed)
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(Path(out_dir) / MANIFEST_FILE, text.encode("utf-8"))
