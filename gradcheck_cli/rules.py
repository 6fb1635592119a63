"""The adaptive clipping rules at their documented path: a re-export of :mod:`gradcheck_cli.engine.rules`."""

from gradcheck_cli.engine.rules import AGC, AutoClip, ClipStep, ZClip, adaptive_clip_grad_

__all__ = ["AGC", "AutoClip", "ClipStep", "ZClip", "adaptive_clip_grad_"]
