"""The report files of one run that is still growing: a monitored training, written every few
hundred steps for hours.

Rewriting every file at each write would cost in proportion to the whole run so far, so a long
training would pay quadratically. Instead, per write:

* ``steps.csv`` and ``layers.csv`` (``files.APPENDED_FILES``): the rows of the steps recorded
  since the previous write are appended in one ``write`` of complete lines, then fsync. The first
  write creates each file atomically with its header.
* ``summary.csv`` (one row): replaced atomically.
* ``histograms.csv`` (bins over every step so far): replaced atomically at the first write, when
  the run has at least doubled since the last refresh, and whenever the caller asks (the first
  non-finite step, the end of the run), so its total cost stays in proportion to the run.
  ``gradclip report`` recomputes the histograms from ``steps.csv`` in any case.

A write that fails raises the ``OSError``; the next write starts again from the last committed
length of each appended file (``files.append_bytes`` cuts anything past it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from gradcheck_cli.report import files
from gradcheck_cli.results import RunResult, histogram_frame, shared_log_bins, summary_frame


class LiveRunWriter:
    """Keeps ``out_dir``'s report files current for one run whose steps keep growing."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out = Path(out_dir)
        self._committed: dict[str, int] | None = None  # appended files' committed lengths
        self._steps_written = 0
        self._histogram_steps = 0  # steps covered by the last histograms.csv

    def write(self, result: RunResult, *, refresh_histograms: bool = False) -> None:
        """Bring the files up to ``result`` (every step so far; earlier steps unchanged)."""
        committed: dict[str, int] = {}
        if self._committed is None:
            for name, frame_of in files.APPENDED_FILES.items():
                size = files._write_whole(self.out / name, frame_of([result]))
                if size is not None:
                    committed[name] = size
        else:
            # Appends start from the lengths committed before this write: if one file fails,
            # the retry cuts the others back and appends the same rows again.
            committed = dict(self._committed)
            new = dataclasses.replace(result, steps=result.steps[self._steps_written :])
            for name, frame_of in files.APPENDED_FILES.items():
                frame = frame_of([new])
                if name in self._committed:
                    body = files._csv_body(frame)
                    if body:
                        committed[name] = files.append_bytes(self.out / name, body, self._committed[name])
                elif len(frame):  # a file that had no rows until now
                    committed[name] = files._write_whole(self.out / name, frame_of([result]))
        self._committed = committed
        self._steps_written = len(result.steps)
        files.atomic_write_bytes(self.out / files.SUMMARY_FILE, files._csv_bytes(summary_frame([result])))
        n = len(result.steps)
        if refresh_histograms or self._histogram_steps == 0 or n >= 2 * self._histogram_steps:
            frame = histogram_frame([result], shared_log_bins([result]))
            files.atomic_write_bytes(self.out / files.HISTOGRAMS_FILE, files._csv_bytes(frame))
            self._histogram_steps = max(n, 1)
