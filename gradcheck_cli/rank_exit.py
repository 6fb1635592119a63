"""How a torchrun rank's process ends: ``exit_rank``, called by the command line on every exit.

Kept apart from ``ranks.py`` (which imports torch and the whole sweep) because every
``gradclip`` command calls it as it exits, most of them without ever importing torch; it only
needs to know whether this process joined a process group. See docs/distributed.md.
"""

from __future__ import annotations

import os
import sys

# Whether this process joined a process group (it is a torchrun rank): see ``exit_rank``.
_joined = False


def mark_joined() -> None:
    """Record that this process joined a process group (``ranks.RankGroup`` does, once)."""
    global _joined
    _joined = True


def exit_rank(code: int) -> None:
    """End a torchrun rank with ``code`` once its output is flushed, skipping the interpreter's
    teardown when this process joined a group. torch's distributed C++ side can still own a
    joinable thread when static objects are destroyed, and the process then aborts ("terminate
    called without an active exception", SIGABRT) after the sweep has finished and written
    everything: torchrun would report the rank as failed. Returns (does nothing) otherwise."""
    if not _joined:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it
            pass
    os._exit(code)
