"""Keep the user's code from ending gradclip's process without a verdict.

A CI gate must never pass because the process vanished. Two small measures, active while a
command runs the user's script (``guarded()``):

* ``os._exit(code)`` called by the user's code in gradclip's own main thread raises
  ``ProcessExitCalled`` instead of ending the process, so the run gets status ``error`` naming
  the call and the sweep goes on (like ``sys.exit``, which the runner already catches). In
  child processes (DataLoader workers, ``multiprocessing``) ``os._exit`` works as always; in
  another thread of gradclip's process it still ends the process, but with code 3 when the
  script asked for 0.
* ``faulthandler`` is on: a segmentation fault or abort in an extension prints
  ``Fatal Python error`` with the Python stack on stderr, and the process dies of the signal,
  which is a non-zero exit status (139 for SIGSEGV in a shell). The OOM killer's SIGKILL
  likewise exits 137; neither can exit 0.

In a sweep's worker process such a crash ends only its run (``crashed``, see ``parallel``). See
docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
from collections.abc import Iterator

from gradcheck_cli.errors import ExitCode


class ProcessExitCalled(SystemExit):
    """The user's code called ``os._exit``; raised in its place."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

    def __str__(self) -> str:
        return f"os._exit({self.status}) was called; gradclip turned it into this error so that the run is reported"


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """Intercept ``os._exit`` and enable ``faulthandler`` for the duration of the block."""
    real_exit = os._exit
    owner_pid = os.getpid()
    main_thread = threading.main_thread()

    def intercepted_exit(status: int) -> None:
        if os.getpid() != owner_pid:  # a forked child (DataLoader worker): exit as asked
            real_exit(status)
        if threading.current_thread() is not main_thread:
            sys.stderr.write(f"gradclip: a thread of your script called os._exit({status}) during a run\n")
            sys.stderr.flush()
            real_exit(status if status else int(ExitCode.USER_CODE))
        raise ProcessExitCalled(status)

    fault_was_on = faulthandler.is_enabled()
    if not fault_was_on:
        try:
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        except (AttributeError, ValueError, OSError):  # no usable stderr (pythonw)
            pass
    os._exit = intercepted_exit
    try:
        yield
    finally:
        os._exit = real_exit
        if not fault_was_on and faulthandler.is_enabled():
            faulthandler.disable()
