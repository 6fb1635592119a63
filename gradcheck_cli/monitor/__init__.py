"""gradclip's measurements inside your own training loop, written as a sweep's files:
``GradMonitor`` for a plain loop; the recorder and the interception of torch's clipping family
that the framework callbacks (``gradcheck_cli.integrations``) share. See docs/monitor.md.

::

    from gradcheck_cli.monitor import GradMonitor

    with GradMonitor(model, optimizer, out="gradclip-monitor") as monitor:
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            monitor.record_loss(loss)                               # optional
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # or no clipping at all
            optimizer.step()
"""

from gradcheck_cli.monitor.grad_monitor import GradMonitor
from gradcheck_cli.monitor.intercept import ClipSession
from gradcheck_cli.monitor.recorder import (
    CLIP_CHOICES,
    CLIP_ENGINE,
    CLIP_TORCH,
    DEFAULT_OUT,
    DEFAULT_RUN,
    NonFiniteError,
    StepRecorder,
    first_param_lr,
)

__all__ = [
    "CLIP_CHOICES",
    "CLIP_ENGINE",
    "CLIP_TORCH",
    "DEFAULT_OUT",
    "DEFAULT_RUN",
    "ClipSession",
    "GradMonitor",
    "NonFiniteError",
    "StepRecorder",
    "first_param_lr",
]
