"""Capture and restore everything that decides a run's numbers, so every run starts identical.

Every run of a seed restores the same weights, optimizer state, random-number state (which also
fixes the batch order) and global torch state, so step 1's loss is identical across the sweep and
a repeated sweep is bit-identical on CPU. Capturing and restoring both deep-copy: ``state_dict()``
returns the live tensors, and ``Optimizer.load_state_dict`` may keep the tensors it is given, so
without a copy a run would train the snapshot itself. See docs/contract.md ("How a sweep starts
every run").
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass
from typing import Any

import torch


def _numpy_random():
    """``numpy.random`` when numpy is importable, else ``None`` (numpy is optional)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


def _uses_cuda(device: str | torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Random-number state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RngState:
    """Torch CPU, CUDA (all devices, when used), Python ``random`` and numpy generator states."""

    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] | None
    python: Any
    numpy: Any | None


def seed_everything(seed: int, device: str | torch.device | None = "cpu") -> None:
    """Seed torch (CPU, and every CUDA device when ``device`` is CUDA), ``random`` and numpy."""
    seed = int(seed)
    torch.manual_seed(seed)  # also seeds CUDA lazily
    if _uses_cuda(device):
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np_random = _numpy_random()
    if np_random is not None:
        np_random.seed(seed % 2**32)


def capture_rng(device: str | torch.device | None = "cpu") -> RngState:
    np_random = _numpy_random()
    return RngState(
        torch_cpu=torch.get_rng_state().clone(),
        torch_cuda=tuple(s.clone() for s in torch.cuda.get_rng_state_all()) if _uses_cuda(device) else None,
        python=random.getstate(),
        numpy=np_random.get_state() if np_random is not None else None,
    )


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.torch_cuda is not None:
        torch.cuda.set_rng_state_all(list(state.torch_cuda))
    random.setstate(state.python)
    if state.numpy is not None:
        np_random = _numpy_random()
        if np_random is not None:
            np_random.set_state(state.numpy)


# --------------------------------------------------------------------------------------------
# Model and optimizer state
# --------------------------------------------------------------------------------------------


def _copy_state(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def capture_model(model: torch.nn.Module) -> dict[str, Any]:
    """A deep copy of ``model.state_dict()`` (parameters and buffers, plus any extra state)."""
    return {k: _copy_state(v) for k, v in model.state_dict().items()}


def restore_model(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Copy ``state`` into ``model`` in place and drop any gradients.

    ``load_state_dict`` copies into the existing parameter tensors, so an optimizer that holds
    them keeps working. Gradients are set to ``None`` so nothing leaks from the previous run.
    """
    model.load_state_dict(state, strict=True)
    for p in model.parameters():
        p.grad = None


def capture_optimizer(optimizer: Any) -> Any:
    """A deep copy of ``optimizer.state_dict()`` (per-parameter state and param groups).

    Several optimizers (a list, tuple or dict of them, as ``build_optimizer`` may return for a
    ``train_step`` script) give the same structure of state dicts."""
    if isinstance(optimizer, (list, tuple)):
        return [capture_optimizer(o) for o in optimizer]
    if isinstance(optimizer, dict):
        return {k: capture_optimizer(o) for k, o in optimizer.items()}
    return copy.deepcopy(optimizer.state_dict())


def restore_optimizer(optimizer: Any, state: Any) -> None:
    """Load a *copy* of ``state``: ``load_state_dict`` may keep the tensors it is given, and the
    next ``step()`` would then update the snapshot in place. Several optimizers must come in the
    structure they were captured in (``ValueError`` otherwise)."""
    if isinstance(optimizer, (list, tuple)):
        if not isinstance(state, list) or len(state) != len(optimizer):
            raise ValueError(f"{len(optimizer)} optimizers, but the snapshot holds {_count(state)}")
        for o, st in zip(optimizer, state):
            restore_optimizer(o, st)
        return
    if isinstance(optimizer, dict):
        if not isinstance(state, dict) or set(state) != set(optimizer):
            raise ValueError(f"optimizers {sorted(optimizer)}, but the snapshot holds {_count(state)}")
        for k, o in optimizer.items():
            restore_optimizer(o, state[k])
        return
    if isinstance(state, (list, dict)) and "param_groups" not in state:
        raise ValueError(f"one optimizer, but the snapshot holds {_count(state)}")
    optimizer.load_state_dict(copy.deepcopy(state))


def _count(state: Any) -> str:
    if isinstance(state, list):
        return f"{len(state)} optimizers"
    if isinstance(state, dict) and "param_groups" not in state:
        return f"optimizers {sorted(state)}"
    return "one optimizer"


# --------------------------------------------------------------------------------------------
# Global torch state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalState:
    """Process-wide settings a script can change while it runs, and that would otherwise leak
    from one run into the next: torch's default dtype, grad mode, deterministic-algorithms
    flags, intra-op thread count, anomaly detection, the CPU autocast switch, float32 matmul
    precision, and the working directory (``os.chdir`` in ``batches()``)."""

    default_dtype: torch.dtype
    grad_enabled: bool
    deterministic: bool
    deterministic_warn_only: bool
    num_threads: int
    anomaly: bool
    anomaly_check_nan: bool
    autocast_cpu: bool
    matmul_precision: str
    cwd: str | None

    @classmethod
    def capture(cls) -> GlobalState:
        try:
            cwd = os.getcwd()
        except OSError:  # the directory was deleted under us
            cwd = None
        return cls(
            default_dtype=torch.get_default_dtype(),
            grad_enabled=torch.is_grad_enabled(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            num_threads=torch.get_num_threads(),
            anomaly=torch.is_anomaly_enabled(),
            anomaly_check_nan=torch.is_anomaly_check_nan_enabled(),
            autocast_cpu=torch.is_autocast_enabled("cpu"),
            matmul_precision=torch.get_float32_matmul_precision(),
            cwd=cwd,
        )

    def restore(self) -> None:
        """Set every captured setting back; cheap, so it runs before every run."""
        if torch.get_default_dtype() != self.default_dtype:
            torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad_enabled)
        if (
            torch.are_deterministic_algorithms_enabled() != self.deterministic
            or torch.is_deterministic_algorithms_warn_only_enabled() != self.deterministic_warn_only
        ):
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.deterministic_warn_only)
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
        if torch.is_anomaly_enabled() != self.anomaly or torch.is_anomaly_check_nan_enabled() != self.anomaly_check_nan:
            torch.set_anomaly_enabled(self.anomaly, self.anomaly_check_nan)
        if torch.is_autocast_enabled("cpu") != self.autocast_cpu:
            torch.set_autocast_enabled("cpu", self.autocast_cpu)
        if torch.get_float32_matmul_precision() != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        if self.cwd is not None:
            try:
                if os.getcwd() != self.cwd:
                    os.chdir(self.cwd)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# All of it together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Starting state of every run: model weights and buffers, optimizer state, RNG state."""

    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    rng: RngState
    global_state: GlobalState | None = None
    optimizer_class: type | None = None  # every run's optimizer must be of this class

    @classmethod
    def capture(
        cls,
        model: torch.nn.Module,
        optimizer: Any = None,
        device: str | torch.device | None = "cpu",
    ) -> Snapshot:
        """Deep-copy the state of ``model``, ``optimizer`` (if given) and the RNGs now."""
        return cls(
            model_state=capture_model(model),
            optimizer_state=capture_optimizer(optimizer) if optimizer is not None else None,
            rng=capture_rng(device),
            global_state=GlobalState.capture(),
            optimizer_class=type(optimizer) if optimizer is not None else None,
        )

    def restore_model(self, model: torch.nn.Module) -> None:
        restore_model(model, self.model_state)

    def restore_optimizer(self, optimizer: Any) -> None:
        """Load the captured optimizer state; does nothing when none was captured."""
        if self.optimizer_state is not None:
            restore_optimizer(optimizer, self.optimizer_state)

    def restore_rng(self) -> None:
        restore_rng(self.rng)

    def restore_global_state(self) -> None:
        if self.global_state is not None:
            self.global_state.restore()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore model, optimizer (when given and captured) and RNG state."""
        self.restore_model(model)
        if optimizer is not None:
            self.restore_optimizer(optimizer)
        self.restore_rng()
