"""The report files of one run that is still growing (a monitored training, written every few
hundred steps for hours), at a cost per write in proportion to the steps since the last one:
the per-step files (``files.APPENDED_FILES``) get the new rows appended, ``summary.csv`` is
replaced, ``histograms.csv`` only when the run has doubled or the caller asks. A write that fails
raises the ``OSError``; the next one starts again from the last committed length of each
appended file. See docs/monitor.md (Options) and docs/outputs.md (Reference: how the files are
written).
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
