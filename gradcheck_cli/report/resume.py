"""Reading an output directory back: the finished runs of an interrupted sweep for ``--resume``
(``load_finished``, checked against the sweep's fingerprint) and every run of a report
directory for ``gradclip report`` (``read_results``).

Runs are rebuilt exactly from the CSV text (floats parsed from their round-trip form), so
rewriting the reports after a resumed sweep gives the files of an uninterrupted one. A missing,
malformed or hand-edited file is refused with a message naming it. See docs/outputs.md
(Resuming; Reference: how the files are written) and docs/reliability.md (Interrupting and
resuming).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from gradcheck_cli.errors import UsageError
from gradcheck_cli.report._io import (
    CONTROL_NORMS_FILE,
    LAYERS_FILE,
    MANIFEST_FILE,
    READABLE_MANIFEST_FORMATS,
    SITES_FILE,
    STEPS_FILE,
    SUMMARY_FILE,
)
from gradcheck_cli.results import (
    CONTROL_RUN,
    MODE_NONE,
    MODE_NORM,
    MODES,
    SOURCE_AMP,
    SOURCE_BACKWARD,
    SOURCE_FORWARD,
    STATUSES,
    Cell,
    RunResult,
    StepRecord,
    format_float,
)

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


def _json_normal(value):
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


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
    summary_path = out / SUMMARY_FILE
    summary_rows = _read_csv_rows(summary_path, _SUMMARY_NEEDED)
    # optional files: reports of gradclip 0.1 have no layers.csv, only train_step scripts write
    # clip_sites.csv, older reports have no control_norms.csv
    layers = _by_step(out / LAYERS_FILE, _LAYERS_NEEDED, committed, wanted, _layer_values)
    sites = _by_step(out / SITES_FILE, _SITES_NEEDED, committed, wanted, _site_values)
    norms = _by_step(out / CONTROL_NORMS_FILE, _CONTROL_NORMS_NEEDED, committed, wanted, _norm_values)
    steps_by_run = _step_records(out / STEPS_FILE, committed, wanted, layers, sites, norms)
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


def _by_step(
    path: Path, needed: list[str], committed: dict[str, int], wanted: set[str] | None, values
) -> dict[tuple[str, int], list[tuple]]:
    """``(run, step) -> [values(path, line, row), ...]`` from a per-step file that may be
    absent (then empty), for the runs ``wanted`` (all when None)."""
    by_step: dict[tuple[str, int], list[tuple]] = {}
    if path.exists():
        for line, row in _read_csv_rows(path, needed, committed.get(path.name)):
            if wanted is None or row["run"] in wanted:
                key = (row["run"], _parse(path, line, "step", row["step"], int))
                by_step.setdefault(key, []).append(values(path, line, row))
    return by_step


def _layer_values(path: Path, line: int, row: dict[str, str]) -> tuple[str, float]:
    return (row["param"], _parse(path, line, "grad_norm", row["grad_norm"], _float_or_nan))


def _site_values(path: Path, line: int, row: dict[str, str]) -> tuple[str, float, float]:
    return (
        row["site"],
        _parse(path, line, "grad_norm", row["grad_norm"], _float_or_nan),
        _parse(path, line, "clip_coef", row["clip_coef"], _float_or_nan),
    )


def _norm_values(path: Path, line: int, row: dict[str, str]) -> tuple[float, float]:
    return (
        _parse(path, line, "norm_type", row["norm_type"], float),
        _parse(path, line, "grad_norm", row["grad_norm"], _float_or_nan),
    )


def _step_records(
    path: Path,
    committed: dict[str, int],
    wanted: set[str] | None,
    layers: dict[tuple[str, int], list[tuple]],
    sites: dict[tuple[str, int], list[tuple]],
    norms: dict[tuple[str, int], list[tuple]],
) -> dict[str, list[StepRecord]]:
    """Each wanted run's ``StepRecord``s from ``steps.csv``, with its layers, clip sites and
    control norms joined on ``(run, step)``."""
    steps_by_run: dict[str, list[StepRecord]] = {}
    for line, row in _read_csv_rows(path, _STEPS_NEEDED, committed.get(STEPS_FILE)):
        if wanted is not None and row["run"] not in wanted:
            continue
        step = _parse(path, line, "step", row["step"], int)
        steps_by_run.setdefault(row["run"], []).append(
            StepRecord(
                step=step,
                loss=_parse(path, line, "loss", row["loss"], _float_or_nan),
                grad_norm=_parse(path, line, "grad_norm", row["grad_norm"], _float_or_nan),
                clip_coef=_parse(path, line, "clip_coef", row["clip_coef"], _float_or_nan),
                # reports written before the clipping modes have neither column
                clip_threshold=_parse(path, line, "clip_threshold", row.get("clip_threshold", ""), _float_or_nan),
                clipped_unit_frac=_parse(
                    path, line, "clipped_unit_frac", row.get("clipped_unit_frac", ""), _float_or_nan
                ),
                layers=tuple(layers.get((row["run"], step), ())),
                lr=_parse(path, line, "lr", row.get("lr", ""), _float_or_nan),
                skipped=row.get("skipped", "") == "1",
                sites=tuple(sites.get((row["run"], step), ())),
                norms=tuple(norms.get((row["run"], step), ())),
            )
        )
    return steps_by_run


def _summary_result(
    path: Path, line: int, row: dict[str, str], steps: list[StepRecord], lr_varies: bool, seed_varies: bool
) -> RunResult:
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
        shared_steps=_parse(path, line, "shared_steps", row.get("shared_steps", ""), _int_or_none) or 0,
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
    import pandas as pd  # heavy: only when a directory is read back

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
