"""The output directory's plumbing: its file names, the one-sweep-per-directory lock, atomic
replaces and appends, and the CSV encoding every report file shares.

Every file is replaced atomically (temporary file in the same directory, fsync, ``os.replace``)
or appended in one write of complete lines up to a committed length, so a sweep killed at any
moment leaves each file whole. See docs/outputs.md (Reference: how the files are written) and
docs/reliability.md (Results are never mixed up, overwritten or lost).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from gradcheck_cli.errors import ReportWriteError, UsageError

# The files of an output directory; nothing is ever written anywhere else.
SUMMARY_FILE = "summary.csv"
STEPS_FILE = "steps.csv"
LAYERS_FILE = "layers.csv"
HISTOGRAMS_FILE = "histograms.csv"
SITES_FILE = "clip_sites.csv"
CONTROL_NORMS_FILE = "control_norms.csv"
RECOMMENDATION_FILE = "recommendation.json"
HTML_FILE = "report.html"
MANIFEST_FILE = "gradclip-sweep.json"
LOCK_FILE = ".gradclip.lock"
# 2: the manifest records the committed byte length of every appended file ("committed").
MANIFEST_FORMAT = 2
READABLE_MANIFEST_FORMATS = (1, 2)

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


# --------------------------------------------------------------------------------------------
# The output directory
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
        raise UsageError(
            f"cannot create --out directory {str(out)!r}: a file is in the way", f"{fix}, or move that file away"
        ) from None
    except NotADirectoryError:
        raise UsageError(
            f"cannot create --out directory {str(out)!r}: part of the path is a file, not a directory", fix
        ) from None
    except PermissionError:
        raise UsageError(
            f"cannot create --out directory {str(out)!r}: permission denied", f"{fix} in a place you can write to"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot create --out directory {str(out)!r}: {exc.strerror or exc}", fix) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out directory {str(out)!r} is not writable: permission denied", f"{fix} in a place you can write to"
        )
    _remove_stale_temp_files(out)
    return out


def _remove_stale_temp_files(out: Path) -> None:
    """Temp files a killed sweep left behind (``.summary.csv.<pid>.<random>.tmp``): only ours,
    and only those of processes that are gone; a live sweep's temp file is never touched."""
    for name in (
        SUMMARY_FILE,
        STEPS_FILE,
        LAYERS_FILE,
        CONTROL_NORMS_FILE,
        HISTOGRAMS_FILE,
        SITES_FILE,
        MANIFEST_FILE,
        RECOMMENDATION_FILE,
        HTML_FILE,
    ):
        for stale in out.glob(f".{name}.*.tmp"):
            pid = stale.name[len(name) + 2 :].split(".", 1)[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            try:
                stale.unlink()
            except OSError:
                pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine. Where that cannot be asked
    (Windows), every process counts as alive: nothing of another process is ever removed."""
    if pid <= 0:
        return False
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


# --------------------------------------------------------------------------------------------
# One sweep per output directory
# --------------------------------------------------------------------------------------------


class OutDirLock:
    """``--out/.gradclip.lock``, created with ``O_EXCL`` and holding the sweep's pid: a second
    sweep on the same directory is refused with the holder's pid. A lock whose process is gone
    (a sweep killed with ``kill -9``) is taken over. Released (deleted) by ``release``.

    Creating the lock is also the first write into ``--out``, so an ``--out`` that cannot be
    written (a read-only file system) is refused here, before any run."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> OutDirLock:
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and pid_alive(holder):
                    raise UsageError(
                        f"--out {str(self.path.parent)!r} is in use by another gradclip sweep (pid {holder})",
                        f"wait for it to finish, or use another --out directory; if no sweep is running, delete {self.path}",
                    ) from None
                try:  # stale: its process is gone (or the file is unreadable garbage)
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise _write_error(self.path, exc) from None
                continue
            except OSError as exc:
                raise UsageError(
                    f"cannot write in --out {str(self.path.parent)!r}: {exc.strerror or exc}",
                    "choose an --out directory you can write to",
                ) from None
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as exc:
                os.close(fd)
                try:
                    self.path.unlink()
                except OSError:
                    pass
                raise UsageError(
                    f"cannot write in --out {str(self.path.parent)!r}: {exc.strerror or exc}",
                    "choose an --out directory you can write to",
                ) from None
            os.close(fd)
            self.held = True
            return self
        raise UsageError(
            f"cannot take the lock {self.path}", "another sweep keeps taking it; use another --out directory"
        )

    def _holder(self) -> int | None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self._holder() == os.getpid():
                    self.path.unlink()
            except OSError:
                pass

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# Atomic replaces and appends
# --------------------------------------------------------------------------------------------


def _write_error(path: Path, exc: OSError) -> ReportWriteError:
    return ReportWriteError(
        f"cannot write {path}: {exc.strerror or exc}",
        "free disk space or fix the permissions, then rerun with --resume to keep the finished runs",
    )


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


def append_bytes(path: str | os.PathLike, data: bytes, committed: int) -> int:
    """Append ``data`` (complete CSV lines) to ``path`` whose first ``committed`` bytes are the
    committed content, fsync, and return the new committed length.

    Anything past ``committed`` (the torn tail of a write that failed, or the rows of a run a
    ``kill -9`` cut off before its manifest) is cut first. If the append fails, the file is
    cut back to ``committed`` again (best effort) and the ``OSError`` propagates."""
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
    try:
        os.ftruncate(fd, committed)
        os.lseek(fd, committed, os.SEEK_SET)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, committed)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)
    return committed + len(data)


# --------------------------------------------------------------------------------------------
# CSV encoding shared by every report file
# --------------------------------------------------------------------------------------------


def _csv_bytes(frame) -> bytes:
    frame = frame.copy()
    for column in frame.columns:
        if column in _INT_COLUMNS:
            frame[column] = frame[column].astype("float64").astype("Int64")
    # Default float formatting is Python's repr: the shortest string that reads back exactly.
    return frame.to_csv(index=False, lineterminator="\n", na_rep="").encode("utf-8")


def _csv_header(frame_of) -> bytes:
    return _csv_bytes(frame_of([]))


def _csv_body(frame) -> bytes:
    """The CSV rows without the header line: per-run chunks concatenate to the whole file."""
    data = _csv_bytes(frame)
    return data[data.index(b"\n") + 1 :]
