"""gradclip inside a Hugging Face ``transformers.Trainer``: ``GradclipTrainerCallback``.

::

    from gradcheck_cli.integrations.hf import GradclipTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GradclipTrainerCallback(out="gradclip-monitor")])

The pre-clip norm. ``on_pre_optimizer_step`` runs *after* the Trainer has clipped, so measuring
there would record the clipped norm. Instead, while training runs, the callback intercepts
``torch.nn.utils.clip_grad_norm_``, which the Trainer reaches through
``accelerator.clip_grad_norm_`` once per optimizer step, after unscaling the AMP gradients: with
``max_grad_norm > 0`` to clip, and with ``max_grad_norm = 0`` with ``max_norm=inf`` to report the
norm. First gradclip's engine measures the model's gradients (after the last micro-batch,
unscaled, not yet clipped), so the recorded norm is the true pre-clip norm and the first
non-finite parameter is found before clipping spreads NaN. Then the call is served as
``GradMonitor`` serves it: with ``clip="engine"`` (the default) the engine clips in that same
pass (the Trainer's training and its logged ``grad_norm`` are those of a Trainer whose
``clip_grad_norm_`` is ``gradcheck_cli.engine.clip_grad_norm_``); with ``clip="torch"`` torch's
function clips unchanged after the measurement, and the training is bit-identical with and
without the callback. The coefficient applied is recorded (1 when it only measured). Set-ups where accelerate does not
call ``torch.nn.utils.clip_grad_norm_`` (DeepSpeed, FSDP, XLA) are not supported: there the norm
is measured just before the optimizer step, after any clipping.

Other numbers: the loss is taken from the model's output (``outputs.loss``, through a forward
hook while the model is in training mode), averaged over the step's micro-batches; the learning
rate is the optimizer's first parameter group's; a step whose optimizer never ran (the AMP scaler
found inf/NaN) is recorded as ``skipped``.

``stop_on_non_finite=True`` sets ``control.should_training_stop`` at the first non-finite step
(the Trainer stops after it; the message is logged on the ``gradclip`` logger). Files and
verdicts are ``GradMonitor``'s (``gradcheck_cli.monitor``), written every ``write_every`` steps
and when training ends.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
    raise ImportError(
        "gradcheck_cli.integrations.hf needs transformers and accelerate: pip install 'gradclip[hf]'"
    ) from exc

from gradcheck_cli.integrations.recording import RecordingCallback
from gradcheck_cli.monitor import first_param_lr


def _innermost_optimizer(optimizer: Any) -> Any:
    """accelerate's ``AcceleratedOptimizer`` (itself an ``Optimizer`` subclass) wraps the torch
    optimizer as ``.optimizer``; hooks go on the innermost one, which ``step()`` really runs."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _loss_of(output: Any) -> Any:
    loss = None
    if isinstance(output, dict) or hasattr(output, "keys"):
        try:
            loss = output["loss"]
        except (KeyError, TypeError):
            loss = None
    if loss is None:
        loss = getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class GradclipTrainerCallback(RecordingCallback, TrainerCallback):
    """Record gradclip's per-step measurements of a ``Trainer.train`` (module docstring).

    Args:
        out: directory for ``summary.csv``, ``steps.csv``, ``layers.csv``, ``histograms.csv``.
        run: the run's name in the files. Default ``monitor``.
        stop_on_non_finite: set ``control.should_training_stop`` at the first non-finite step.
        write_every, layer_depth, divergence_factor: as for ``GradMonitor``.
    """

    # per-training state, set again in on_train_begin
    _optimizer: Any = None
    _stop = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._open(model)
        self._optimizer = _innermost_optimizer(optimizer)
        self.recorder.lr_source = lambda: first_param_lr(self._optimizer)
        self._stop = False
        self._handles = [
            self._optimizer.register_step_pre_hook(self._pre_step),
            model.register_forward_hook(self._forward_hook),
        ]

    def _forward_hook(self, module, inputs, output) -> None:
        if self._session is not None and module.training and torch.is_grad_enabled():
            loss = _loss_of(output)
            if loss is not None:
                self.recorder.add_loss(loss)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self._session is not None:
            self._finish(skipped=False, lr=first_param_lr(optimizer))

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._session is not None and self.recorder.pending:  # the scaler skipped the step
            self._finish(skipped=True, lr=first_param_lr(self._optimizer))
        if self._stop:
            control.should_training_stop = True
        return control

    def _finish(self, *, skipped: bool, lr: Any) -> None:
        if self._record_step(skipped=skipped, lr=lr) is not None:
            self._stop = self.stop_on_non_finite

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Stop intercepting and write the files. ``on_train_end`` calls it; the Trainer has no
        hook for a training that raised, so call it yourself in that case."""
        self._close()
