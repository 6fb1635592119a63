"""Gradient-norm measurement and clipping, the numerical core of gradclip: drop-in replacements
for torch's clip family (``torch.nn.utils``, same signatures and defaults as torch 2.6+) that
keep torch's behaviour wherever torch is right and fix it where it is wrong, a measuring call
for the diagnostics, and the adaptive rules AGC, AutoClip and ZClip. See docs/engine.md.

Layers, each importing only those below it: the local norms (:mod:`.exact` < :mod:`.cpu` <
:mod:`.norms`) < :mod:`.distributed` (process groups, DTensor) < :mod:`.clipping` (the
torch-compatible functions) < :mod:`.rules` (AGC, AutoClip, ZClip).
"""

# ``__all__`` is torch's drop-in API and the measuring call; the other names are public too
# (re-exported with ``as``): the host-side helpers and the adaptive rules.
from gradcheck_cli.engine.clipping import (
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)
from gradcheck_cli.engine.clipping import clip_grads_with_host_norm_ as clip_grads_with_host_norm_
from gradcheck_cli.engine.clipping import host_clip_coef as host_clip_coef
from gradcheck_cli.engine.clipping import raise_if_nonfinite as raise_if_nonfinite
from gradcheck_cli.engine.norms import GradNorms, measure_grad_norms
from gradcheck_cli.engine.norms import host_grad_norms as host_grad_norms
from gradcheck_cli.engine.rules import AGC as AGC
from gradcheck_cli.engine.rules import AutoClip as AutoClip
from gradcheck_cli.engine.rules import ClipStep as ClipStep
from gradcheck_cli.engine.rules import ZClip as ZClip
from gradcheck_cli.engine.rules import adaptive_clip_grad_ as adaptive_clip_grad_

__all__ = [
    "GradNorms",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "measure_grad_norms",
]
