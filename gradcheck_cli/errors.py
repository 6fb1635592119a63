"""Exception classes and exit codes: the one place where failures map to what the shell sees
(docs/reliability.md)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented exit codes of every gradclip command."""

    OK = 0
    INSTABILITY = 1  # a run went non-finite or diverged and the user asked to fail on it
    USAGE = 2  # bad option, bad script path, bad recipe: the user's input
    USER_CODE = 3  # the user's script raised
    INTERNAL = 4  # a bug in gradclip
    REPORTS_NOT_WRITTEN = 5  # a report file could not be written (disk full, permission lost, ...)
    HANGUP = 129  # SIGHUP (terminal closed): stopped like Ctrl-C, finished runs are kept
    INTERRUPTED = 130  # Ctrl-C (SIGINT); finished runs are kept
    BROKEN_PIPE = 141  # stdout was closed early (``| head``); the report files are complete
    TERMINATED = 143  # SIGTERM (CI cancellation, ``kill``): stopped like Ctrl-C


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop exactly as for Ctrl-C, with the signal's exit code.

    A ``KeyboardInterrupt`` so that every place that lets Ctrl-C through (the runner never
    catches it) lets these through as well."""

    def __init__(self, signum: int, exit_code: ExitCode) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = exit_code


class GradclipError(Exception):
    """A known failure: printed as one line plus a hint, never as a traceback."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(GradclipError):
    """Bad input from the user: options, paths, recipes, a script that breaks the contract."""

    exit_code = ExitCode.USAGE


class ReportWriteError(GradclipError):
    """A report file could not be written: the path and the OS error, exit 5."""

    exit_code = ExitCode.REPORTS_NOT_WRITTEN


class UserCodeError(GradclipError):
    """The user's script raised; ``user_traceback`` holds the trimmed traceback to show."""

    exit_code = ExitCode.USER_CODE

    def __init__(self, message: str, hint: str | None = None, user_traceback: str = "") -> None:
        super().__init__(message, hint)
        self.user_traceback = user_traceback
