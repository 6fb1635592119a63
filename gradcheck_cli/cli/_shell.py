"""What every command shares with the shell: consoles, exit codes, signals, a closed stdout.

Every known failure is a ``GradclipError`` mapped to its exit code in ``exit_on_errors``;
SIGTERM and SIGHUP stop like Ctrl-C; stdout closed early (``| head``) exits 141. The codes are
listed in docs/reliability.md.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

import typer
from rich.console import Console

from gradcheck_cli.errors import ExitCode, GradclipError, Stopped, UserCodeError
from gradcheck_cli.results import CRASHED, DIVERGED, ERROR, NON_FINITE


def stderr_console():
    """Progress, hints and errors. When stderr is not a terminal (a CI log, a file) nothing is
    wrapped at 80 columns: every message stays on its one line, so it can be copied."""
    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


# --- stdout closed early (``gradclip sweep s.py | head -1``) -----------------------------------

_stdout_state = {"broken": False}


def _silence_stdout() -> None:
    """Point stdout at the null device: nothing more to write, and no second ``BrokenPipeError``
    when Python flushes stdout at exit."""
    _stdout_state["broken"] = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner)
        pass


def to_stdout(write: Callable[[], None]) -> None:
    """Run ``write``; if the reader of stdout has gone away, stop writing there and carry on
    (report files and the JUnit file are still written)."""
    if _stdout_state["broken"]:
        return
    try:
        write()
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()


def _final_code(code: int) -> int:
    """A broken stdout turns an otherwise clean exit into 141 (as a shell reports SIGPIPE);
    a verdict or an error code is kept."""
    if _stdout_state["broken"] and code == int(ExitCode.OK):
        return int(ExitCode.BROKEN_PIPE)
    return code


# --- SIGTERM and SIGHUP stop like Ctrl-C ------------------------------------------------------


def _stop_signals() -> dict:
    wanted = {"SIGTERM": ExitCode.TERMINATED, "SIGHUP": ExitCode.HANGUP}
    return {getattr(signal, name): code for name, code in wanted.items() if hasattr(signal, name)}


def _install_stop_handlers() -> dict:
    """SIGTERM (CI cancellation, ``kill``) and SIGHUP (terminal closed) raise ``Stopped``, a
    ``KeyboardInterrupt``: finished runs are kept and the resume command printed, as for
    Ctrl-C. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum, code in _stop_signals().items():

        def handler(received, frame, code=code):
            raise Stopped(received, code)

        try:
            if signal.getsignal(signum) is signal.SIG_IGN:  # e.g. under nohup: the user asked to ignore it
                continue
            previous[signum] = signal.signal(signum, handler)
        except (OSError, ValueError):
            pass
    return previous


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError, TypeError):
            pass


def stop_code(exc: KeyboardInterrupt) -> int:
    return int(exc.exit_code) if isinstance(exc, Stopped) else int(ExitCode.INTERRUPTED)


def stop_word(exc: KeyboardInterrupt) -> str:
    if isinstance(exc, Stopped):
        return f"stopped by {signal.Signals(exc.signum).name}"
    return "interrupted"


def stdout_console():
    """Tables and verdicts. Piped into a file or a CI log there is no terminal width to fit, so
    the table gets 120 columns (all of them) unless COLUMNS says otherwise."""
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120

    class StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich would raise SystemExit(1), and 1 means "instability found": stop writing
            # to stdout instead and let the command finish (see _final_code)
            self.quiet = True
            _silence_stdout()

    return StdoutConsole(highlight=False, width=width)


def _debug() -> bool:
    return os.environ.get("GRADCLIP_DEBUG", "") not in ("", "0")


def exit_on_errors(command: Callable) -> Callable:
    """Map typed errors to one line on stderr plus a hint and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _stdout_state["broken"] = False
        previous = _install_stop_handlers()
        try:
            return command(*args, **kwargs)
        except typer.Exit as done:
            raise typer.Exit(_final_code(done.exit_code)) from None
        except typer.Abort:
            raise
        except BrokenPipeError:  # stdout closed while writing outside to_stdout
            _silence_stdout()
            raise typer.Exit(int(ExitCode.BROKEN_PIPE)) from None
        except GradclipError as err:
            console = stderr_console()
            if isinstance(err, UserCodeError) and err.user_traceback:
                console.print(err.user_traceback.rstrip(), markup=False, soft_wrap=True)
            # soft_wrap: a one-line error stays one line, whatever the terminal width
            console.print(f"error: {err.message}", style="bold red", markup=False, soft_wrap=True)
            if err.hint:
                console.print(f"hint: {err.hint}", markup=False, soft_wrap=True)
            if _debug():
                traceback.print_exc()
            raise typer.Exit(_final_code(int(err.exit_code))) from None
        except KeyboardInterrupt as exc:
            stderr_console().print(stop_word(exc), markup=False)
            raise typer.Exit(stop_code(exc)) from None
        except Exception as err:  # a bug in gradclip, not in the user's input or script
            console = stderr_console()
            console.print(
                f"internal error: {type(err).__name__}: {err}", style="bold red", markup=False, soft_wrap=True
            )
            if _debug():
                traceback.print_exc()
                if getattr(err, "worker_traceback", None):  # parallel.WorkerError
                    sys.stderr.write(err.worker_traceback)
            else:
                console.print("hint: set GRADCLIP_DEBUG=1 to see the traceback, and report it", markup=False)
            raise typer.Exit(int(ExitCode.INTERNAL)) from None
        finally:
            _restore_handlers(previous)

    return wrapper


def exit_code(results, fail_on_nan: bool, fail_on_divergence: bool) -> int:
    """The exit code a finished sweep or check earns from its runs' statuses."""
    statuses = {r.status for r in results}
    if ERROR in statuses or CRASHED in statuses:  # a run that killed its worker: the script's doing
        return int(ExitCode.USER_CODE)
    if (fail_on_nan and NON_FINITE in statuses) or (fail_on_divergence and DIVERGED in statuses):
        return int(ExitCode.INSTABILITY)
    return int(ExitCode.OK)
