"""CSV reports and the resume manifest in the output directory.

Files (all in ``out_dir``; nothing is ever written anywhere else):

=========================  =====================================================================
``summary.csv``            one row per finished run (``results.SUMMARY_COLUMNS``)
``steps.csv``              one row per optimizer step of every run (``results.STEP_COLUMNS``)
``layers.csv``             one row per (run, step, layer group): pre-clip per-layer norms
                           (``results.LAYER_COLUMNS``)
``control_norms.csv``      one row per (control run, step, norm type): the control's pre-clip
                           total norm in every norm type of the grid
                           (``results.CONTROL_NORM_COLUMNS``)
``histograms.csv``         each run's pre-clip norm counts on log-spaced bins shared per norm
                           type (``results.HISTOGRAM_COLUMNS``)
``clip_sites.csv``         one row per (run, step, ``clip`` call) of ``train_step`` scripts
                           (``results.SITE_COLUMNS``); only when there are such rows (a stale
                           one from an earlier sweep in the same directory is removed)
``recommendation.json``    ``analysis.recommend``'s verdict with its evidence
``report.html``            the visual report (``report/html.py``)
``gradclip-sweep.json``    the resume manifest: the sweep's fingerprint and its finished runs
=========================  =====================================================================

Every file is replaced atomically: written to a temporary file in the same directory, flushed
and fsynced, then ``os.replace``-d over the old one. A sweep killed at any moment (even with
``kill -9``) leaves each file either in its previous complete state or in its new one, never
half written. The CLI rewrites all of them after every finished run, reports first and the
manifest last, so the manifest never names a run the CSV files lack.

CSV conventions: one tidy row per record; blank for "no value" (``None`` and NaN); ``inf`` and
``-inf`` spelled out; integer columns without a trailing ``.0``; floats in Python's shortest
round-trip form (pandas' default ``repr`` formatting), so reading a value back with ``float()``
gives the identical double. Status words are never the bare word ``nan``.

Resume: ``load_finished`` rebuilds the finished ``RunResult``s exactly from ``summary.csv`` and
``steps.csv``, so rewriting the reports after a resumed sweep gives files byte-identical to an
uninterrupted sweep's (only the ``seconds`` timings differ, and only for the runs that re-ran).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from gradcheck_cli.errors import ReportWriteError, UsageError
from gradcheck_cli.report._io import (
    CONTROL_NORMS_FILE,
    HISTOGRAMS_FILE,
    HTML_FILE,
    LAYERS_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    READABLE_MANIFEST_FORMATS,
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
from gradcheck_cli.results import (
    MODE_NONE,
    MODE_NORM,
    Cell,
    NormRange,
    RunResult,
    StepRecord,
    control_norms_frame,
    format_float,
    format_norm_type,
    histogram_frame,
    layers_frame,
    ranges_to_bins,
    sites_frame,
    steps_frame,
    summary_frame,
)

# The output directory's API: what this module writes, and (from ``_io``) the file names, the
# directory lock and the atomic writes that callers use beside it.
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

# How each fingerprint key is spelled on the command line, for the "options differ" message.
_OPTION_NAMES = {
    "script": "script",
    "max_norms": "--max-norm",
    "norm_types": "--norm-type",
    "steps": "--steps",
    "seeds": "--seeds",
    "lrs": "--lr",
    "divergence_factor": "--divergence-factor",
    "device": "--device",
    "amp": "--amp",
    "accumulate": "--accumulate",
    "amp_init_scale": "--amp-init-scale",
    "script_sha256": "script content",
    "torch_version": "torch version",
    "torch_threads": "torch thread count",
    "layer_depth": "--layer-depth",
    "spike_factor": "--spike-factor",
    "refine": "--refine",
    "clip_values": "--clip-value",
    "agc_clip_factors": "--agc",
    "agc_exclude": "--agc-exclude",
    "autoclip_percentiles": "--autoclip",
    "zclip_z_thresholds": "--zclip",
    "zclip_max_norm": "--zclip-max-norm",
}


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
    import bisect

    if len(edges) < 2:
        return b""
    below = [bisect.bisect_left(sorted_norms, e) for e in edges[1:-1]]  # norms under each inner edge
    bounds = [0, *below, len(sorted_norms)]
    if any(c in run for c in ',"\r\n'):  # a name of its own (a monitored run) may need quoting
        run = '"' + run.replace('"', '""') + '"'
    return "".join(f"{run},{bin_text[i]}{bounds[i + 1] - bounds[i]}\n" for i in range(len(edges) - 1)).encode("utf-8")


def write_recommendation(out_dir: str | os.PathLike, recommendation: dict) -> None:
    """``recommendation.json`` (``analysis.Recommendation.as_json()``), strict JSON, atomically."""
    text = json.dumps(recommendation, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(Path(out_dir) / RECOMMENDATION_FILE, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def _json_normal(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def write_manifest(
    out_dir: str | os.PathLike, fingerprint: dict, finished_runs: list[str], committed: dict[str, int] | None = None
) -> None:
    """Record, atomically, which runs of the sweep described by ``fingerprint``
    (``SweepConfig.fingerprint()``) have finished, and (``committed``) how many bytes of each
    appended file hold them: a reader ignores anything past that. Write it after the reports."""
    from gradcheck_cli import __version__

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


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return format_float(value)
    return str(value)


def _fingerprint_differences(saved: dict, now: dict) -> list[str]:
    diffs = []
    keys = [k for k in _OPTION_NAMES if k in saved or k in now]
    keys += sorted((set(saved) | set(now)) - set(keys))
    for key in keys:
        a, b = saved.get(key), now.get(key)
        if a != b and key == "script_sha256" and saved.get("script") == now.get("script"):
            diffs.append(
                f"the script {now.get('script')} has changed since the interrupted sweep (its content differs)"
            )
        elif a != b:
            name = _OPTION_NAMES.get(key, key)
            diffs.append(f"{name} {_show(a)} (saved) vs {_show(b)} (now)")
    return diffs


_RESUME_HINT = (
    "to resume, rerun with the same options (and script, torch version and thread count, e.g. "
    "OMP_NUM_THREADS); or use a new --out directory; or drop --resume to start over (the "
    "reports in this directory will be overwritten)"
)


_START_OVER = "drop --resume to start over, or use a new --out directory"

# Columns resume needs; files of an older gradclip may lack the later additions (warnings).
_SUMMARY_NEEDED = [
    "run",
    "max_norm",
    "norm_type",
    "status",
    "nan_step",
    "nan_source",
    "nan_param",
    "diverged_step",
    "seconds",
    "error",
]
_STEPS_NEEDED = ["run", "step", "loss", "grad_norm", "clip_coef"]
_LAYERS_NEEDED = ["run", "step", "param", "grad_norm"]
_SITES_NEEDED = ["run", "step", "site", "grad_norm", "clip_coef"]
_CONTROL_NORMS_NEEDED = ["run", "step", "norm_type", "grad_norm"]


class _Corrupt(Exception):
    """A resume file that cannot be trusted: ``problem`` says what is wrong in it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def _cannot_resume(err: _Corrupt) -> UsageError:
    return UsageError(f"cannot resume: {err.path}: {err.problem}", _START_OVER)


def _read_manifest(path: Path) -> tuple[dict, list[str], dict[str, int] | None]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot resume from {path}: the manifest is unreadable ({type(exc).__name__}: {exc})", _START_OVER
        ) from None
    if not isinstance(manifest, dict):
        raise _Corrupt(path, "the manifest is unreadable: not a JSON object")
    version = manifest.get("format", 1)
    if version not in READABLE_MANIFEST_FORMATS:
        raise _Corrupt(
            path, f"manifest format {version!r} is not one this gradclip reads ({READABLE_MANIFEST_FORMATS})"
        )
    saved, finished, committed = manifest.get("fingerprint"), manifest.get("finished_runs"), manifest.get("committed")
    if not isinstance(saved, dict):
        raise _Corrupt(path, "the manifest is unreadable: 'fingerprint' is missing or not an object")
    if not isinstance(finished, list) or not all(isinstance(r, str) for r in finished):
        raise _Corrupt(path, "the manifest is unreadable: 'finished_runs' is missing or not a list of run names")
    if committed is not None and not (
        isinstance(committed, dict)
        and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in committed.items()
        )
    ):
        raise _Corrupt(path, "the manifest is unreadable: 'committed' is not a map of file names to byte counts")
    return saved, finished, committed


def load_finished(out_dir: str | os.PathLike, fingerprint: dict) -> dict[str, RunResult]:
    """The runs already finished in ``out_dir`` by a sweep with this ``fingerprint``, keyed by
    run name in sweep order, rebuilt from ``summary.csv``, ``steps.csv`` and ``layers.csv``.

    Returns ``{}`` when there is no manifest. Raises ``UsageError`` (exit 2) when the manifest
    belongs to a sweep with different options (naming each option that differs), and
    ``cannot resume: FILE: problem`` when a file is missing, malformed or hand-edited: a
    missing column, a number that does not parse, an unknown status word, a row whose numbers
    do not match its run name, a file shorter than the manifest records.

    Of ``steps.csv`` and ``layers.csv`` only the bytes the manifest records as committed are
    read; rows past them (a run cut off by ``kill -9`` before its manifest) are ignored.

    Rebuilt exactly: floats are parsed with ``float()`` from their round-trip text, blanks
    become ``None`` (summary fields) or NaN (step numbers). ``error_traceback`` is not kept in
    the CSV files and comes back as ``None``.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.exists():
        return {}
    try:
        saved, finished, committed = _read_manifest(manifest_path)
        diffs = _fingerprint_differences(saved, _json_normal(fingerprint))
        if diffs:
            raise UsageError(
                f"cannot resume in {str(out)!r}: the options differ from the saved sweep: " + "; ".join(diffs),
                _RESUME_HINT,
            )
        if not finished:
            return {}
        return _load_runs(out, saved, finished, committed or {})
    except _Corrupt as err:
        raise _cannot_resume(err) from None


def _load_runs(
    out: Path, saved: dict | None, finished: list[str] | None, committed: dict[str, int]
) -> dict[str, RunResult]:
    """The runs ``finished`` (all of ``summary.csv`` when None) rebuilt from the files in
    ``out``; of the appended files only the ``committed`` bytes are read. Raises ``_Corrupt``."""
    wanted = set(finished) if finished is not None else None
    summary_path, steps_path, layers_path = out / SUMMARY_FILE, out / STEPS_FILE, out / LAYERS_FILE
    summary_rows = _read_csv_rows(summary_path, _SUMMARY_NEEDED)
    layers_by_step: dict[tuple[str, int], list[tuple[str, float]]] = {}
    if layers_path.exists():  # reports of gradclip 0.1 have none
        for line, row in _read_csv_rows(layers_path, _LAYERS_NEEDED, committed.get(LAYERS_FILE)):
            if wanted is None or row["run"] in wanted:
                key = (row["run"], _parse(layers_path, line, "step", row["step"], int))
                layers_by_step.setdefault(key, []).append(
                    (row["param"], _parse(layers_path, line, "grad_norm", row["grad_norm"], _float_or_nan))
                )
    sites_path = out / SITES_FILE
    sites_by_step: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
    if sites_path.exists():  # written only by train_step scripts; older reports have none
        for line, row in _read_csv_rows(sites_path, _SITES_NEEDED, committed.get(SITES_FILE)):
            if wanted is None or row["run"] in wanted:
                sites_by_step.setdefault((row["run"], _parse(sites_path, line, "step", row["step"], int)), []).append(
                    (
                        row["site"],
                        _parse(sites_path, line, "grad_norm", row["grad_norm"], _float_or_nan),
                        _parse(sites_path, line, "clip_coef", row["clip_coef"], _float_or_nan),
                    )
                )
    norms_path = out / CONTROL_NORMS_FILE
    norms_by_step: dict[tuple[str, int], list[tuple[float, float]]] = {}
    if norms_path.exists():  # older reports have none
        for line, row in _read_csv_rows(norms_path, _CONTROL_NORMS_NEEDED, committed.get(CONTROL_NORMS_FILE)):
            if wanted is None or row["run"] in wanted:
                norms_by_step.setdefault((row["run"], _parse(norms_path, line, "step", row["step"], int)), []).append(
                    (
                        _parse(norms_path, line, "norm_type", row["norm_type"], float),
                        _parse(norms_path, line, "grad_norm", row["grad_norm"], _float_or_nan),
                    )
                )
    steps_by_run: dict[str, list[StepRecord]] = {}
    for line, row in _read_csv_rows(steps_path, _STEPS_NEEDED, committed.get(STEPS_FILE)):
        if wanted is not None and row["run"] not in wanted:
            continue
        step = _parse(steps_path, line, "step", row["step"], int)
        steps_by_run.setdefault(row["run"], []).append(
            StepRecord(
                step=step,
                loss=_parse(steps_path, line, "loss", row["loss"], _float_or_nan),
                grad_norm=_parse(steps_path, line, "grad_norm", row["grad_norm"], _float_or_nan),
                clip_coef=_parse(steps_path, line, "clip_coef", row["clip_coef"], _float_or_nan),
                # reports written before the clipping modes have neither column
                clip_threshold=_parse(steps_path, line, "clip_threshold", row.get("clip_threshold", ""), _float_or_nan),
                clipped_unit_frac=_parse(
                    steps_path, line, "clipped_unit_frac", row.get("clipped_unit_frac", ""), _float_or_nan
                ),
                layers=tuple(layers_by_step.get((row["run"], step), ())),
                lr=_parse(steps_path, line, "lr", row.get("lr", ""), _float_or_nan),
                skipped=row.get("skipped", "") == "1",
                sites=tuple(sites_by_step.get((row["run"], step), ())),
                norms=tuple(norms_by_step.get((row["run"], step), ())),
            )
        )
    by_run = {row["run"]: (line, row) for line, row in summary_rows}
    if finished is None:  # every run of the reports (gradclip report), in summary order
        finished = list(by_run)
    # A cell names its lr and seed only when the sweep varies them (see SweepConfig.cells);
    # without a manifest, an axis varies when the summary holds several of its values.
    if saved is not None:
        lr_varies = len(saved.get("lrs") or ()) > 1
        seed_varies = len(saved.get("seeds") or ()) > 1
    else:
        lr_varies = len({row.get("lr", "") for _, row in summary_rows} - {""}) > 1
        seed_varies = len({row.get("seed", "") for _, row in summary_rows} - {""}) > 1
    loaded: dict[str, RunResult] = {}
    for run in finished:
        if run not in by_run:  # not in the reports: it simply runs again
            continue
        line, row = by_run[run]
        loaded[run] = _summary_result(summary_path, line, row, steps_by_run.get(run, []), lr_varies, seed_varies)
    return loaded


def _summary_result(
    path: Path, line: int, row: dict[str, str], steps: list[StepRecord], lr_varies: bool, seed_varies: bool
) -> RunResult:
    from gradcheck_cli.results import CONTROL_RUN, MODES, SOURCE_AMP, SOURCE_BACKWARD, SOURCE_FORWARD, STATUSES

    lr = _parse(path, line, "lr", row.get("lr", ""), _float_or_none)
    seed = _parse(path, line, "seed", row.get("seed", ""), _int_or_none)
    # reports written before the clipping modes have no clip_mode: the control or a norm cell
    mode = row.get("clip_mode", "") or None
    if mode is not None and mode not in MODES:
        raise _Corrupt(path, f"line {line}: unknown clip_mode {mode!r} (expected one of {', '.join(MODES)})")
    max_norm = _parse(path, line, "max_norm", row["max_norm"], _float_or_none)
    norm_type = _parse(path, line, "norm_type", row["norm_type"], float)
    axes = dict(lr=lr if lr_varies else None, seed=seed if seed_varies else None)
    try:
        if mode in (None, MODE_NONE, MODE_NORM):
            cell = Cell(max_norm, norm_type, **axes)
        else:
            param = _parse(path, line, "clip_param", row.get("clip_param", ""), _float_or_none)
            cell = Cell(max_norm, norm_type, mode=mode, param=param, **axes)
    except ValueError as exc:  # e.g. an agc row with a max_norm, or without its clip_param
        raise _Corrupt(path, f"line {line}: {exc}") from None
    looks_like_a_cell = row["run"].startswith(("clip_", CONTROL_RUN, "value_", "agc_", "autoclip_p", "zclip_z"))
    if cell.run != row["run"] and looks_like_a_cell:  # a name of its own (``monitor``) is not checked
        raise _Corrupt(
            path,
            f"line {line}: run {row['run']!r} has clip_mode {cell.mode!r}, max_norm {row['max_norm']!r}, "
            f"clip_param {row.get('clip_param', '')!r} and norm_type {row['norm_type']!r}, which name run {cell.run!r}",
        )
    if row["status"] not in STATUSES:
        raise _Corrupt(path, f"line {line}: unknown status {row['status']!r} (expected one of {', '.join(STATUSES)})")
    if row["nan_source"] not in ("", SOURCE_FORWARD, SOURCE_BACKWARD, SOURCE_AMP):
        raise _Corrupt(
            path,
            f"line {line}: unknown nan_source {row['nan_source']!r} (expected {SOURCE_FORWARD} or {SOURCE_BACKWARD})",
        )
    warnings = row.get("warnings", "")
    return RunResult(
        cell=cell,
        status=row["status"],
        steps=steps,
        nan_step=_parse(path, line, "nan_step", row["nan_step"], _int_or_none),
        nan_source=row["nan_source"] or None,
        nan_param=row["nan_param"] or None,
        nan_micro_batch=_parse(path, line, "nan_micro_batch", row.get("nan_micro_batch", ""), _int_or_none),
        diverged_step=_parse(path, line, "diverged_step", row["diverged_step"], _int_or_none),
        seconds=_parse(path, line, "seconds", row["seconds"], _float_or_none) or 0.0,
        error=row["error"] or None,
        lr=lr,
        seed=seed,
        name=row["run"] if row["run"] != cell.run else None,
        warnings=tuple(w for w in warnings.split(";") if w),
        divergence_checked=_bool_or_none(row.get("divergence_checked", "")),
        spike_step=_parse(path, line, "spike_step", row.get("spike_step", ""), _int_or_none),
        spike_param=row.get("spike_param") or None,
        eval_metric=_parse(path, line, "eval_metric", row.get("eval_metric", ""), _float_or_none),
        eval_higher_is_better=_bool_or_none(row.get("eval_higher_is_better", "")),
        refined=_bool_or_none(row.get("refined", "")) or False,
    )


def read_results(out_dir: str | os.PathLike, missing_hint: str | None = None) -> list[RunResult]:
    """Every run in ``out_dir``'s reports, in ``summary.csv``'s order (``gradclip report``):
    a sweep's, a resumed sweep's or a monitored run's. Optional files (``layers.csv``,
    ``control_norms.csv``, ``clip_sites.csv``) and later columns may be missing: they come back
    empty. Raises ``UsageError`` naming the file when a report is missing or malformed."""
    out = Path(out_dir)
    hint = missing_hint or f"point at a directory written by gradclip sweep --out (it holds {SUMMARY_FILE})"
    summary = out / SUMMARY_FILE
    if not summary.is_file():
        raise UsageError(f"{summary} is missing: {out} is not a gradclip report directory", hint)
    if summary.stat().st_size == 0:
        raise UsageError(f"{summary} is empty", hint)
    try:
        _read_csv_rows(summary, _SUMMARY_NEEDED)
    except _Corrupt as err:
        raise UsageError(f"{summary} is not a gradclip summary: {err.problem}", hint) from None
    if not (out / STEPS_FILE).is_file():
        raise UsageError(f"{out / STEPS_FILE} is missing: {out} is not a complete gradclip report directory", hint)
    try:
        return list(_load_runs(out, None, None, {}).values())
    except _Corrupt as err:
        raise UsageError(f"{err.path}: {err.problem}", hint) from None


def _parse(path: Path, line: int, column: str, text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise _Corrupt(path, f"line {line}: {column} {text!r} is not a valid number") from None


def _read_csv_rows(path: Path, needed: list[str], committed: int | None = None) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs, every cell as the exact text written (no type inference,
    no NA guessing). With ``committed``, only that many bytes of the file are read."""
    import io

    import pandas as pd

    try:
        with open(path, "rb") as f:
            data = f.read() if committed is None else f.read(committed)
    except FileNotFoundError:
        raise UsageError(
            f"cannot resume: {path} is missing although the manifest lists finished runs", _START_OVER
        ) from None
    except OSError as exc:
        raise _Corrupt(path, f"unreadable ({exc.strerror or exc})") from None
    if committed is not None and len(data) < committed:
        raise _Corrupt(path, f"the file has {len(data)} bytes but the manifest records {committed} committed bytes")
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_filter=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise _Corrupt(path, f"unreadable CSV ({str(exc).strip()})") from None
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise _Corrupt(path, f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    # line 1 is the header; rows with embedded newlines make this approximate, which is fine for a message
    return [(i + 2, row) for i, row in enumerate(frame.to_dict("records"))]


def _bool_or_none(text: str) -> bool | None:
    if text in ("True", "true", "1"):
        return True
    if text in ("False", "false", "0"):
        return False
    return None


def _float_or_none(text: str) -> float | None:
    return float(text) if text != "" else None


def _float_or_nan(text: str) -> float:
    return float(text) if text != "" else math.nan


def _int_or_none(text: str) -> int | None:
    return int(text) if text != "" else None
