"""The control run's state at a step, so that a cell can start there instead of at step 1.

A cell whose clipping first changes the gradients at step k trains exactly as the control did
for steps 1..k-1 (docs/diagnosis.md, "Shared runs"). ``ControlState`` is what the control holds
at step k once its gradients are measured and judged, before anything is clipped or updated:
weights, gradients, optimizer and scheduler state, the random-number state, and the random-number
state before each batch it drew (so that a fresh ``batches()`` iterator can be brought to the
same position, ``run_setup.BatchStream.fast_forward``). ``Fork`` adds what is the cell's own:
its rows so far, its divergence test and its rule's state, as they were before step k.
Tensors are copied to the CPU: a snapshot never holds accelerator memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from gradcheck_cli.detect import Divergence
from gradcheck_cli.results import StepRecord
from gradcheck_cli.snapshot import GlobalState, RngState, capture_rng, restore_optimizer, restore_rng


def _to_cpu(value: Any) -> Any:
    """A deep copy of ``value`` with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, RngState):
        return _nbytes(value.torch_cpu) + _nbytes(value.torch_cuda or ()) + 5_000  # python, numpy
    return 0


@dataclass
class ControlState:
    """The control run at ``step``, after its gradients were measured, before its update."""

    step: int
    model: dict[str, Any]
    grads: list[torch.Tensor | None]  # in ``model.parameters()`` order
    optimizer: Any
    scheduler: dict[str, Any] | None
    rng: RngState
    pulls: tuple[RngState, ...]  # the random-number state before each batch drawn so far
    losses: list[torch.Tensor]  # the step's micro-batch losses
    global_state: GlobalState | None = None  # torch's global settings (a script may change them)

    @classmethod
    def capture(
        cls,
        step: int,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        pulls: list[RngState],
        losses: list[torch.Tensor],
        device: torch.device,
    ) -> ControlState:
        return cls(
            step=step,
            model=_to_cpu(model.state_dict()),
            grads=[None if p.grad is None else _to_cpu(p.grad) for p in model.parameters()],
            optimizer=_to_cpu(optimizer.state_dict()),
            scheduler=copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            rng=capture_rng(device),
            pulls=tuple(pulls),
            losses=[_to_cpu(x) for x in losses],
            global_state=GlobalState.capture(),
        )

    @staticmethod
    def size_of(model: torch.nn.Module, optimizer: Any) -> int:
        """Roughly what ``capture`` would hold for this model and optimizer, before copying."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return _nbytes([model.state_dict(), grads, optimizer.state_dict()])

    def restore(self, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Put ``model`` (weights and gradients), ``optimizer`` and ``scheduler`` where the
        control was; the random-number state is restored last, by ``restore_rng``, once the
        batches are fast-forwarded."""
        model.load_state_dict(self.model, strict=True)
        for p, g in zip(model.parameters(), self.grads):
            p.grad = None if g is None else g.to(device=p.device, copy=True)
        if scheduler is not None and self.scheduler is not None:
            scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        # after the scheduler: building and loading it may set each group's lr
        restore_optimizer(optimizer, self.optimizer)

    def restore_rng(self) -> None:
        """The random-number state and torch's global settings as the control had them."""
        restore_rng(self.rng)
        if self.global_state is not None:
            self.global_state.restore()


@dataclass
class Fork:
    """A cell starting at ``state.step`` from the control's state: its rows of the steps before
    (the control's, measured in the cell's norm type), its divergence test and its rule's state
    (``None``: a rule without state, or none) as they were before that step."""

    state: ControlState
    records: list[StepRecord]
    divergence: Divergence
    rule_state: dict[str, Any] | None

    @property
    def step(self) -> int:
        return self.state.step
