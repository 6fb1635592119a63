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
import secrets
from pathlib import Path

from gradcheck_cli.errors import UsageError
from gradcheck_cli.results import (
    Cell,
    RunResult,
    StepRecord,
    control_norms_frame,
    histogram_frame,
    layers_frame,
    sites_frame,
    steps_frame,
    summary_frame,
)

SUMMARY_FILE = "summary.csv"
STEPS_FILE = "steps.csv"
LAYERS_FILE = "layers.csv"
HISTOGRAMS_FILE = "histograms.csv"
SITES_FILE = "clip_sites.csv"
CONTROL_NORMS_FILE = "control_norms.csv"
RECOMMENDATION_FILE = "recommendation.json"
HTML_FILE = "report.html"
MANIFEST_FILE = "gradclip-sweep.json"
MANIFEST_FORMAT = 1

# Columns holding whole numbers; pandas would write them as floats (``37.0``) once a blank
# appears, so they are written through the nullable ``Int64`` dtype.
_INT_COLUMNS = {
    "nan_step",
    "diverged_step",
    "spike_step",
    "steps",
    "step",
    "count",
    "seed",
    "skipped",
    "skipped_steps",
    "first_skip",
    "nan_micro_batch",
}

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
    "layer_depth": "--layer-depth",
    "spike_factor": "--spike-factor",
    "refine": "--refine",
}


# --------------------------------------------------------------------------------------------
# The output directory and atomic writes
# --------------------------------------------------------------------------------------------


def prepare_out_dir(path: str | os.PathLike) -> Path:
    """Create the output directory if missing, remove temp files a killed sweep left in it,
    and return it.

    Raises ``UsageError`` (exit 2) naming the path and the fix when it exists but is not a
    directory, cannot be created (permission denied, a parent is a file, ...) or is not
    writable.
    """
    out = Path(path)
    fix = "choose another --out directory"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory", f"{fix}, or move that file away")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"cannot create --out directory {str(out)!r}: a file is in the way", f"{fix}, or move that file away") from None
    except NotADirectoryError:
        raise UsageError(f"cannot create --out directory {str(out)!r}: part of the path is a file, not a directory", fix) from None
    except PermissionError:
        raise UsageError(f"cannot create --out directory {str(out)!r}: permission denied", f"{fix} in a place you can write to") from None
    except OSError as exc:
        raise UsageError(f"cannot create --out directory {str(out)!r}: {exc.strerror or exc}", fix) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out directory {str(out)!r} is not writable: permission denied", f"{fix} in a place you can write to")
    _remove_stale_temp_files(out)
    return out


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files a killed sweep left behind (``.summary.csv.<pid>.<random>.tmp``); only ours."""
    for name in (SUMMARY_FILE, STEPS_FILE, LAYERS_FILE, CONTROL_NORMS_FILE, HISTOGRAMS_FILE, SITES_FILE, MANIFEST_FILE,
                 RECOMMENDATION_FILE, HTML_FILE):
        for stale in out.glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: temp file in the same directory, flush, fsync,
    ``os.replace``. The temp file is removed if anything fails before the replace.

    The temp file is created with mode ``0o666`` minus the umask, like any file ``open()``
    creates (``tempfile.mkstemp`` would make it private, ``0o600``)."""
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _create_temp(path: Path) -> tuple[int, Path]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _csv_bytes(frame) -> bytes:
    frame = frame.copy()
    for column in frame.columns:
        if column in _INT_COLUMNS:
            frame[column] = frame[column].astype("float64").astype("Int64")
    # Default float formatting is Python's repr: the shortest string that reads back exactly.
    return frame.to_csv(index=False, lineterminator="\n", na_rep="").encode("utf-8")


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def write_reports(out_dir: str | os.PathLike, results: list[RunResult], edges) -> None:
    """Write ``summary.csv``, ``steps.csv``, ``layers.csv``, ``control_norms.csv``,
    ``histograms.csv`` and ``clip_sites.csv`` for ``results`` (all runs finished so far, in
    sweep order), each atomically. ``edges`` are the histogram bins: per norm type
    (``results.log_bins_by_norm_type(results)``) or one shared list."""
    out = Path(out_dir)
    atomic_write_bytes(out / SUMMARY_FILE, _csv_bytes(summary_frame(results)))
    atomic_write_bytes(out / STEPS_FILE, _csv_bytes(steps_frame(results)))
    atomic_write_bytes(out / LAYERS_FILE, _csv_bytes(layers_frame(results)))
    atomic_write_bytes(out / CONTROL_NORMS_FILE, _csv_bytes(control_norms_frame(results)))
    atomic_write_bytes(out / HISTOGRAMS_FILE, _csv_bytes(histogram_frame(results, edges)))
    sites = sites_frame(results)
    if len(sites):
        atomic_write_bytes(out / SITES_FILE, _csv_bytes(sites))
    elif (out / SITES_FILE).exists():
        (out / SITES_FILE).unlink()


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


def write_manifest(out_dir: str | os.PathLike, fingerprint: dict, finished_runs: list[str]) -> None:
    """Record, atomically, which runs of the sweep described by ``fingerprint``
    (``SweepConfig.fingerprint()``) have finished. Write it after ``write_reports``."""
    from gradcheck_cli import __version__

    manifest = {
        "format": MANIFEST_FORMAT,
        "gradclip_version": __version__,
        "fingerprint": fingerprint,
        "finished_runs": list(finished_runs),
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(Path(out_dir) / MANIFEST_FILE, text.encode("utf-8"))


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fingerprint_differences(saved: dict, now: dict) -> list[str]:
    diffs = []
    keys = [k for k in _OPTION_NAMES if k in saved or k in now]
    keys += sorted((set(saved) | set(now)) - set(keys))
    for key in keys:
        a, b = saved.get(key), now.get(key)
        if a != b:
            name = _OPTION_NAMES.get(key, key)
            diffs.append(f"{name} {_show(a)} (saved) vs {_show(b)} (now)")
    return diffs


_RESUME_HINT = (
    "to resume, rerun with the same options; or use a new --out directory; or drop --resume "
    "to start over (the reports in this directory will be overwritten)"
)


def load_finished(out_dir: str | os.PathLike, fingerprint: dict) -> dict[str, RunResult]:
    """The runs already finished in ``out_dir`` by a sweep with this ``fingerprint``, keyed by
    run name in sweep order, rebuilt from ``summary.csv`` and ``steps.csv``.

    Returns ``{}`` when there is no manifest. Raises ``UsageError`` when the manifest belongs
    to a sweep with different options (naming each option that differs), or when the manifest
    or the reports it refers to are missing or unreadable.

    Rebuilt exactly: floats are parsed with ``float()`` from their round-trip text, blanks
    become ``None`` (summary fields) or NaN (step numbers). ``error_traceback`` is not kept in
    the CSV files and comes back as ``None``.
    """
    out = Path(out_dir)
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.exists():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        saved = manifest["fingerprint"]
        finished = [str(r) for r in manifest["finished_runs"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"cannot resume from {manifest_path}: the manifest is unreadable ({type(exc).__name__}: {exc})",
            "drop --resume to start over, or use a new --out directory",
        ) from None
    diffs = _fingerprint_differences(saved, _json_normal(fingerprint))
    if diffs:
        raise UsageError(f"cannot resume in {str(out)!r}: the options differ from the saved sweep: " + "; ".join(diffs), _RESUME_HINT)
    if not finished:
        return {}
    try:
        results = read_results(
            out,
            missing_hint="drop --resume to start over, or use a new --out directory",
            lr_varies=len(saved.get("lrs") or ()) > 1,
            seed_varies=len(saved.get("seeds") or ()) > 1,
        )
    except UsageError as err:
        raise UsageError(f"cannot resume: {err.message} although the manifest lists finished runs", err.hint) from None
    by_run = {r.run: r for r in results}
    # A run the manifest lists but the reports lack simply runs again.
    return {run: by_run[run] for run in finished if run in by_run}


def read_results(
    out_dir: str | os.PathLike,
    missing_hint: str | None = None,
    lr_varies: bool | None = None,
    seed_varies: bool | None = None,
) -> list[RunResult]:
    """Every run in ``out_dir``'s reports, in ``summary.csv``'s order, rebuilt exactly from
    ``summary.csv``, ``steps.csv`` and, when present, ``layers.csv`` and ``control_norms.csv``
    (reports of older versions, or of a single monitored run, may lack the optional files and
    columns: they come back empty).

    Floats are parsed with ``float()`` from their round-trip text, blanks become ``None``
    (summary fields) or NaN (step numbers). ``error_traceback`` is not kept in the CSV files
    and comes back as ``None``. Raises ``UsageError`` when ``summary.csv`` is missing or a file
    is unreadable."""
    out = Path(out_dir)
    hint = missing_hint or f"point at a directory written by gradclip sweep --out (it holds {SUMMARY_FILE})"
    summary_rows = _read_csv_rows(out / SUMMARY_FILE, hint)
    step_rows = _read_csv_rows(out / STEPS_FILE, hint) if (out / STEPS_FILE).exists() or missing_hint else []
    layers_by_step: dict[tuple[str, int], list[tuple[str, float]]] = {}
    if (out / LAYERS_FILE).exists():  # reports of gradclip 0.1 have none
        for row in _read_csv_rows(out / LAYERS_FILE, hint):
            layers_by_step.setdefault((row["run"], int(row["step"])), []).append(
                (row["param"], _float_or_nan(row["grad_norm"]))
            )
    sites_by_step: dict[tuple[str, int], list[tuple[str, float, float]]] = {}
    if (out / SITES_FILE).exists():  # older reports have none
        for row in _read_csv_rows(out / SITES_FILE, hint):
            sites_by_step.setdefault((row["run"], int(row["step"])), []).append(
                (row["site"], _float_or_nan(row["grad_norm"]), _float_or_nan(row["clip_coef"]))
            )
    norms_by_step: dict[tuple[str, int], list[tuple[float, float]]] = {}
    if (out / CONTROL_NORMS_FILE).exists():
        for row in _read_csv_rows(out / CONTROL_NORMS_FILE, hint):
            norms_by_step.setdefault((row["run"], int(row["step"])), []).append(
                (float(row["norm_type"]), _float_or_nan(row["grad_norm"]))
            )
    steps_by_run: dict[str, list[StepRecord]] = {}
    for row in step_rows:
        key = (row["run"], int(row["step"]))
        steps_by_run.setdefault(row["run"], []).append(
            StepRecord(
                step=int(row["step"]),
                loss=_float_or_nan(row["loss"]),
                grad_norm=_float_or_nan(row["grad_norm"]),
                clip_coef=_float_or_nan(row["clip_coef"]),
                layers=tuple(layers_by_step.get(key, ())),
                lr=_float_or_nan(row.get("lr", "")),
                skipped=row.get("skipped", "") == "1",
                sites=tuple(sites_by_step.get(key, ())),
                norms=tuple(norms_by_step.get(key, ())),
            )
        )
    # A cell names its lr and seed only when the sweep varies them (see SweepConfig.cells); without
    # the manifest's word for it, an axis varies when the summary holds several of its values.
    if lr_varies is None:
        lr_varies = len({row.get("lr", "") for row in summary_rows} - {""}) > 1
    if seed_varies is None:
        seed_varies = len({row.get("seed", "") for row in summary_rows} - {""}) > 1
    results = []
    try:
        for row in summary_rows:
            run = row["run"]
            lr = _float_or_none(row.get("lr", ""))
            seed = _int_or_none(row.get("seed", ""))
            cell = Cell(
                _float_or_none(row.get("max_norm", "")),
                float(row.get("norm_type") or 2.0),
                lr=lr if lr_varies else None,
                seed=seed if seed_varies else None,
            )
            results.append(
                RunResult(
                    cell=cell,
                    status=row["status"],
                    steps=steps_by_run.get(run, []),
                    nan_step=_int_or_none(row.get("nan_step", "")),
                    nan_source=row.get("nan_source") or None,
                    nan_param=row.get("nan_param") or None,
                    nan_micro_batch=_int_or_none(row.get("nan_micro_batch", "")),
                    diverged_step=_int_or_none(row.get("diverged_step", "")),
                    seconds=_float_or_none(row.get("seconds", "")) or 0.0,
                    error=row.get("error") or None,
                    lr=lr,
                    seed=seed,
                    divergence_checked=_bool_or_none(row.get("divergence_checked", "")),
                    spike_step=_int_or_none(row.get("spike_step", "")),
                    spike_param=row.get("spike_param") or None,
                    eval_metric=_float_or_none(row.get("eval_metric", "")),
                    eval_higher_is_better=_bool_or_none(row.get("eval_higher_is_better", "")),
                    refined=_bool_or_none(row.get("refined", "")) or False,
                    name=run if run != cell.run else None,  # another producer's name (a monitored run)
                )
            )
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{out / SUMMARY_FILE} is not a gradclip summary ({type(exc).__name__}: {exc})", hint) from None
    return results


def _read_csv_rows(path: Path, hint: str) -> list[dict[str, str]]:
    """Every cell as the exact text written (no type inference, no NA guessing)."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise UsageError(f"{path} is missing", hint) from None
    except pd.errors.EmptyDataError:
        raise UsageError(f"{path} is empty", hint) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc})", hint) from None
    return frame.to_dict("records")


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
