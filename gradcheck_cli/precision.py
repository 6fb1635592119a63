"""Mixed precision for one run (``--amp off|bf16|fp16``): the autocast context and, for fp16,
the gradient scaler, in the order torch documents (scale, backward, ``unscale_``, measure and clip
the unscaled gradients, step, update).

A step the scaler skips is not an onset; ``MAX_CONSECUTIVE_SKIPS`` skips in a row are (the scale
collapsed). The scaler's inf check is read as a tensor so that it reaches the host in the run's one
sync per step. See docs/contract.md ("Training as you train").
"""

from __future__ import annotations

import contextlib

import torch

AMP_OFF = "off"
AMP_FP16 = "fp16"
AMP_BF16 = "bf16"
AMP_MODES = (AMP_OFF, AMP_FP16, AMP_BF16)

# torch.amp.GradScaler's own default initial scale.
DEFAULT_INIT_SCALE = 2.0**16
# Skipped steps in a row after which the scale counts as collapsed (an instability). With the
# default back-off factor of 0.5 the scale has then shrunk by 2**20, about a million.
MAX_CONSECUTIVE_SKIPS = 20

_DTYPES = {AMP_FP16: torch.float16, AMP_BF16: torch.bfloat16}


class Precision:
    """The autocast context and the optional scaler of one run (build one per run)."""

    def __init__(self, mode: str, device: str | torch.device, init_scale: float = DEFAULT_INIT_SCALE) -> None:
        if mode not in AMP_MODES:
            raise ValueError(f"unknown amp mode {mode!r}; use one of {', '.join(AMP_MODES)}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type, init_scale=init_scale) if mode == AMP_FP16 else None
        self._checked = False  # the scaler recorded an inf check this step

    @property
    def scaled(self) -> bool:
        return self.scaler is not None

    def autocast(self):
        """Context for the forward pass (``loss_fn``); a no-op with ``off``."""
        if self.mode == AMP_OFF:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.mode])

    def backward_input(self, loss: torch.Tensor) -> torch.Tensor:
        """What ``backward()`` is called on: the loss, times the current scale with fp16."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients of the optimizer's parameters by the scale (fp16 only), so that
        they are measured and clipped at their true size; records the scaler's inf check."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """After ``unscale_``: a 0-dim tensor, > 0 when the scaler found inf/NaN in the
        unscaled gradients (the step will be skipped); ``None`` without a scaler. No host sync."""
        if self.scaler is None:
            return None
        per_device = list(self.scaler._found_inf_per_device(optimizer).values())
        self._checked = bool(per_device)
        if not per_device:  # no parameter of the optimizer has a gradient: nothing to skip
            return torch.zeros((), dtype=torch.float64)
        first = per_device[0]
        return sum((v.to(first.device, torch.float64) for v in per_device[1:]), first.to(torch.float64))

    def update(self) -> None:
        """End of an fp16 step, taken or skipped: back off after a skip, else count towards growth."""
        if self.scaler is None:
            return
        if self._checked:
            self.scaler.update()
        else:  # nothing was checked (no gradients): keep the scale, reset the step's state
            self.scaler.update(new_scale=self.scaler.get_scale())
        self._checked = False
