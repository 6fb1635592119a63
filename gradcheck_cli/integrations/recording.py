"""What the framework callbacks share: their options, the recorder they open when training
starts, and closing it (hooks removed, interception uninstalled, files written).

Imports neither Lightning nor transformers: each callback combines ``RecordingCallback`` with
its framework's base class."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gradcheck_cli.layers import AUTO
from gradcheck_cli.monitor import (
    CLIP_CHOICES,
    CLIP_ENGINE,
    DEFAULT_OUT,
    DEFAULT_RUN,
    ClipSession,
    NonFiniteError,
    StepRecorder,
)

_log = logging.getLogger("gradclip")


class RecordingCallback:
    """Options and recorder life cycle of a framework callback (see ``GradMonitor`` for the
    options). Subclasses register their hooks in ``self._handles`` after ``_open``."""

    def __init__(
        self,
        out: str | Path = DEFAULT_OUT,
        *,
        run: str = DEFAULT_RUN,
        stop_on_non_finite: bool = False,
        write_every: int = 100,
        layer_depth: int | str | None = AUTO,
        divergence_factor: float | None = 10.0,
        clip: str = CLIP_ENGINE,
    ) -> None:
        super().__init__()
        if clip not in CLIP_CHOICES:
            raise ValueError(f"clip must be one of {', '.join(map(repr, CLIP_CHOICES))}, got {clip!r}")
        self.out = out
        self.run = run
        self.stop_on_non_finite = stop_on_non_finite
        self.write_every = write_every
        self.layer_depth = layer_depth
        self.divergence_factor = divergence_factor
        self.clip = clip
        self.recorder: StepRecorder | None = None
        self._session: ClipSession | None = None
        self._handles: list[Any] = []

    def _open(self, model: torch.nn.Module) -> None:
        """A new recorder for ``model``, its output directory prepared, clip calls intercepted."""
        self.recorder = StepRecorder(
            model,
            self.out,
            run=self.run,
            layer_depth=self.layer_depth,
            write_every=self.write_every,
            divergence_factor=self.divergence_factor,
            clip=self.clip,
        )
        self.recorder.prepare()
        self._session = ClipSession(self.recorder)
        self._session.install()

    def _close(self, exc: BaseException | None = None) -> None:
        """Remove the hooks, stop intercepting, note a failure, write the files. Once."""
        if self._session is None:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._session.uninstall()
        self._session = None
        self.recorder.close(exc)

    def _record_step(self, *, skipped: bool, lr: Any, abandoned: bool = False) -> NonFiniteError | None:
        """Close the step; log the first non-finite one on the ``gradclip`` logger."""
        event = self.recorder.finish_step(skipped=skipped, lr=lr, abandoned=abandoned)
        if event is not None:
            _log.warning("gradclip: %s", event)
        return event
