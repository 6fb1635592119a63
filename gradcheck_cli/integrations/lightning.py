"""gradclip inside a PyTorch Lightning ``Trainer``: ``GradclipCallback``.

::

    from gradcheck_cli.integrations.lightning import GradclipCallback

    trainer = Trainer(callbacks=[GradclipCallback(out="gradclip-monitor")], gradient_clip_val=1.0)

Where each number comes from (automatic optimization, one optimizer):

* pre-clip norm: measured with gradclip's engine in ``on_before_optimizer_step``, which Lightning
  calls after the last micro-batch's backward, after the AMP scaler's ``unscale_`` and before its
  own clipping; so the norm is unscaled and pre-clip;
* clip coefficient: Lightning's ``gradient_clip_algorithm="norm"`` calls
  ``torch.nn.utils.clip_grad_norm_``, which the monitor intercepts while training runs (the same
  interception as ``GradMonitor``): with ``clip="engine"`` (the default) gradclip's engine clips
  (the fit is that of a Trainer whose ``clip_grad_norm_`` is
  ``gradcheck_cli.engine.clip_grad_norm_``), with ``clip="torch"`` torch's function does, and
  the fit is bit-identical with and without the callback. The coefficient recorded is the one
  applied; without clipping it is 1; with ``"value"`` clipping (``clip_grad_value_``,
  intercepted too) it is blank: value clipping has no single coefficient;
* skipped steps: a step post-hook on the optimizer notes that the optimizer ran (Lightning runs
  the closure inside ``optimizer.step``, so a pre-hook would come before the backward); the step
  is closed in ``on_train_batch_end`` of its last micro-batch, as ``skipped`` when the optimizer
  never ran (the 16-mixed scaler found inf/NaN);
* loss: the unscaled loss of ``on_train_batch_end``'s outputs times ``accumulate_grad_batches``
  (Lightning divides it for accumulation), averaged over the step's micro-batches;
* learning rate: the optimizer's first parameter group's, as the step used it.

With ``stop_on_non_finite=True`` the first non-finite step sets ``trainer.should_stop`` (training
ends after that batch; the message is logged on the ``gradclip`` logger). Files and verdicts are
``GradMonitor``'s (see ``gradcheck_cli.monitor``); they are written every ``write_every`` steps
and when fitting ends or raises.

``GradclipCallback`` subclasses ``lightning.pytorch.Callback`` (``pytorch_lightning.Callback``
when only ``pytorch_lightning`` is installed); ``PLGradclipCallback`` is the same callback for
``pytorch_lightning`` when both are installed.
"""

from __future__ import annotations

from typing import Any

import torch

from gradcheck_cli.integrations.recording import RecordingCallback
from gradcheck_cli.monitor import first_param_lr


def _import_callback_bases() -> dict[str, type]:
    bases: dict[str, type] = {}
    try:
        from lightning.pytorch.callbacks import Callback as LightningCallback

        bases["lightning"] = LightningCallback
    except ImportError:
        pass
    try:
        from pytorch_lightning.callbacks import Callback as PLCallback

        bases["pytorch_lightning"] = PLCallback
    except ImportError:
        pass
    if not bases:
        raise ImportError(
            "gradcheck_cli.integrations.lightning needs PyTorch Lightning: pip install 'gradclip[lightning]'"
        )
    return bases


def _scaler(trainer: Any) -> Any:
    """The AMP gradient scaler of the trainer's precision plugin (``16-mixed``), else None."""
    plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None)


class _GradclipCallbackMixin(RecordingCallback):
    # per-fit state, set again in on_train_start
    _trainer: Any = None
    _stepped = False
    _lr: Any = None

    # ---- set up and tear down -----------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._open(pl_module)
        self._trainer, self._stepped, self._lr = trainer, False, None
        self.recorder.lr_source = lambda: first_param_lr(trainer.optimizers[0])
        # A post-hook: Lightning runs the closure (forward, backward, on_before_optimizer_step,
        # clipping) inside optimizer.step(closure), after any pre-hook.
        self._handles = [opt.register_step_post_hook(self._post_step) for opt in trainer.optimizers]

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close(exception)

    # ---- per step -------------------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._session is None:
            return
        self.recorder.measure(2.0)  # Lightning's norm clipping is L2

    def _post_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True
        self._lr = first_param_lr(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._session is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning divides the loss by accumulate_grad_batches; its copy here is unscaled
            self.recorder.add_loss(loss.detach() * trainer.accumulate_grad_batches)
        if self.recorder.pending:  # the step's last micro-batch
            stepped, self._stepped = self._stepped, False
            lr = self._lr if stepped else first_param_lr(trainer.optimizers[0])
            # Without an AMP scaler nothing but the module itself skips a step (manual
            # optimization that does not call opt.step() on a non-finite norm): judged as such.
            abandoned = not stepped and _scaler(trainer) is None
            self._finish(skipped=not stepped, lr=lr, abandoned=abandoned)

    def _finish(self, *, skipped: bool, lr: Any, abandoned: bool = False) -> None:
        if self._record_step(skipped=skipped, lr=lr, abandoned=abandoned) is not None and self.stop_on_non_finite:
            self._trainer.should_stop = True


_BASES = _import_callback_bases()
_DEFAULT_BASE = _BASES.get("lightning") or _BASES["pytorch_lightning"]


class GradclipCallback(_GradclipCallbackMixin, _DEFAULT_BASE):  # type: ignore[valid-type, misc]
    """Record gradclip's per-step measurements of a Lightning ``Trainer.fit`` (module docstring).

    Args:
        out: directory for ``summary.csv``, ``steps.csv``, ``layers.csv``, ``histograms.csv``.
        run: the run's name in the files. Default ``monitor``.
        stop_on_non_finite: set ``trainer.should_stop`` at the first non-finite step.
        write_every, layer_depth, divergence_factor: as for ``GradMonitor``.
    """


if "pytorch_lightning" in _BASES and _BASES["pytorch_lightning"] is not _DEFAULT_BASE:

    class PLGradclipCallback(_GradclipCallbackMixin, _BASES["pytorch_lightning"]):  # type: ignore[valid-type, misc]
        """``GradclipCallback`` for ``pytorch_lightning.Trainer``."""

else:
    PLGradclipCallback = GradclipCallback
