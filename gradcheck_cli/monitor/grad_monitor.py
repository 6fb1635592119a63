"""``GradMonitor``: gradclip's measurements of an unchanged plain training loop, written as a
sweep's files. See docs/monitor.md."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradcheck_cli.layers import AUTO
from gradcheck_cli.monitor.intercept import ClipSession
from gradcheck_cli.monitor.recorder import (
    CLIP_ENGINE,
    DEFAULT_OUT,
    DEFAULT_RUN,
    StepRecorder,
    first_param_lr,
)
from gradcheck_cli.results import RunResult, StepRecord


class GradMonitor(ClipSession):
    """Record gradclip's per-step measurements of an unchanged training loop (module docstring).

    Args:
        model: the ``nn.Module`` being trained (its trainable parameters are measured).
        optimizer: the ``torch.optim.Optimizer`` whose ``step()`` ends an optimizer step.
        out: directory for the report files (created; existing report files are replaced).
        run: the run's name in the files. Default ``monitor``.
        stop_on_non_finite: raise ``NonFiniteError`` (step, source, parameter) from
            ``optimizer.step()`` at the first non-finite step, before the update is applied.
        write_every: bring the files up to date every this many steps (and at the first
            non-finite or diverged step, and on exit). Each write appends the new steps' rows,
            so its cost does not grow with the length of the run.
        layer_depth: per-layer grouping, as ``layers.LayerGrouping`` (``"auto"``, ``None`` for one
            group per parameter, or a module depth).
        divergence_factor: ``diverged`` when a finite loss exceeds this times the first recorded
            loss (``None``: never judged). Needs ``record_loss``.
        clip: who clips when the loop calls ``clip_grad_norm_`` on this model. ``"engine"``
            (default): gradclip's engine, whose measuring pass is also the clip's, so a step
            reads its gradients once; the training equals the same loop with
            ``gradcheck_cli.engine.clip_grad_norm_``, which differs from torch's only by the
            rounding of torch's float32 norm, in steps that clip. ``"torch"``: torch's own
            function clips after the engine has measured (a second pass over the gradients),
            and the training is bit-identical to the loop without the monitor.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        out: str | Path = DEFAULT_OUT,
        *,
        run: str = DEFAULT_RUN,
        stop_on_non_finite: bool = False,
        write_every: int = 100,
        layer_depth: int | str | None = AUTO,
        divergence_factor: float | None = 10.0,
        clip: str = CLIP_ENGINE,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        super().__init__(
            StepRecorder(
                model,
                out,
                run=run,
                layer_depth=layer_depth,
                write_every=write_every,
                divergence_factor=divergence_factor,
                clip=clip,
            )
        )
        self.optimizer = optimizer
        self.recorder.lr_source = lambda: first_param_lr(optimizer)
        self.stop_on_non_finite = stop_on_non_finite
        self._handles: list[Any] = []
        self._in_scaler_step = False
        self._stepped = False
        self._active = False

    # ---- the user's API -----------------------------------------------------------------------

    def record_loss(self, loss: Tensor | float) -> None:
        """Give the monitor the step's loss (each micro-batch's under accumulation; the step
        records their mean). Call it before ``optimizer.step()``. Never syncs."""
        self.recorder.add_loss(loss)

    @property
    def steps(self) -> list[StepRecord]:
        return self.recorder.steps

    def result(self) -> RunResult:
        return self.recorder.result()

    def start(self) -> GradMonitor:
        if self._active:
            return self
        self.recorder.prepare()
        caller = (
            sys._getframe(2).f_globals if sys._getframe(1).f_code.co_name == "__enter__" else sys._getframe(1).f_globals
        )
        self.install([caller])
        self._handles = [self.optimizer.register_step_pre_hook(self._pre_step)]
        self._active = True
        return self

    def close(self, exc: BaseException | None = None) -> None:
        if not self._active:
            return
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.uninstall()
        self.recorder.close(exc)

    def __enter__(self) -> GradMonitor:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(exc)
        return False

    # ---- hooks ------------------------------------------------------------------------------

    def handles(self, optimizer: Any) -> bool:
        return optimizer is self.optimizer

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True
        event = self.recorder.finish_step(skipped=False, lr=first_param_lr(optimizer))
        if event is not None and self.stop_on_non_finite:
            raise event

    def scaler_step_begin(self) -> None:
        self._stepped = False

    def scaler_step_end(self) -> None:
        if not self._stepped:  # the scaler found inf/NaN and skipped optimizer.step()
            self.recorder.finish_step(skipped=True, lr=first_param_lr(self.optimizer))
        self._stepped = False
