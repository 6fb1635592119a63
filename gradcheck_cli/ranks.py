"""A sweep under ``torchrun``: one process per rank, joined in a ``torch.distributed`` group.

``torchrun --nproc-per-node N -m gradcheck_cli sweep SCRIPT ...`` starts N copies of the
command; each finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment
(``from_environment``) and joins the group: NCCL on ``cuda:LOCAL_RANK`` with ``--device cuda``,
gloo on CPU otherwise. Two modes (``--distributed``):

* **cells** (default): the ranks share out the runs, round-robin over the cell list (rank r takes
  runs r, r + N, ...), each on its own device, each run in the rank's own worker process as
  without torchrun (``--jobs``). After each of its runs every rank takes part in one
  ``all_gather_object``, so rank 0 receives every result as the runs end, writes the reports
  after each round and alone prints; the files are the ones a single process writes.
* **model**: every rank runs every cell together, on a model the script shards
  (``fully_shard``) or replicates (``DistributedDataParallel``) in ``build_model``, in the rank's
  own process. The gradient norm is the global one: the engine reduces DTensor gradients over
  their mesh, and DDP's gradients are already identical on every rank. The loss each step is
  judged by is the mean over the ranks (``mean_across_ranks``), so every rank reaches the same
  verdict at the same step. Rank 0 writes.

Every collective is bounded by the group's timeout (``GRADCLIP_DIST_TIMEOUT`` seconds, default
600): a rank that hangs or dies makes the others fail with a message naming the timeout, rather
than wait forever; torchrun itself stops the remaining ranks when one exits with an error.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

from gradcheck_cli.errors import ExitCode, GradclipError, UsageError

DEFAULT_TIMEOUT_S = 600.0

# The group of the sweep running in model mode in this process, if any: the runner averages
# each step's loss over it (``mean_across_ranks``).
_model_group: Any = None
# Whether this process joined a process group (it is a torchrun rank): see ``exit_rank``.
_joined = False


def timeout_seconds() -> float:
    """The bound on every collective: ``GRADCLIP_DIST_TIMEOUT`` seconds (default 600)."""
    raw = os.environ.get("GRADCLIP_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(
            f"GRADCLIP_DIST_TIMEOUT={raw!r} is not a positive number of seconds", "e.g. GRADCLIP_DIST_TIMEOUT=600"
        )
    return value


def from_environment(mode: str, device: str) -> RankGroup | None:
    """The rank group when started by torchrun with more than one process (``WORLD_SIZE`` > 1),
    else ``None`` (a plain single-process sweep; ``--distributed`` is then ignored)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return None
    return RankGroup(mode, device, world)


class RankGroup:
    """This process's place in the group, and the two ways of sharing a sweep among ranks."""

    def __init__(self, mode: str, device: str, world: int) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise UsageError(
                "this torch build has no torch.distributed", "install a torch build with distributed support"
            )
        self.mode = mode
        self.world = world
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device} was given but CUDA is not available", "use --device cpu")
            self.device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
            backend = "nccl"
        else:
            self.device = "cpu"
            backend = "gloo"
        self.timeout_s = timeout_seconds()
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        global _joined
        _joined = True
        self._dist = dist

    @property
    def cells(self) -> bool:
        return self.mode == "cells"

    def __enter__(self) -> RankGroup:
        global _model_group
        if not self.cells:
            _model_group = self._dist.group.WORLD
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        global _model_group
        _model_group = None
        if self._dist.is_initialized():
            if exc_type is None:
                self._dist.destroy_process_group()
            # After a failure the others may be stuck in a collective; tearing the group down
            # would wait for them. The process exits and torchrun stops the rest.

    # -- collectives with a clear message on failure -----------------------------------------

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as exc:  # a timeout, or a peer that closed its connection
            raise RankFailure(
                f"rank {self.rank}: {what} failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                f"another rank died, raised or took longer than GRADCLIP_DIST_TIMEOUT={self.timeout_s:g}s",
                "see that rank's output above (torchrun names the failed rank); raise GRADCLIP_DIST_TIMEOUT if a run is just slow",
            ) from exc

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        box = [value]
        self._collective("broadcast from rank 0", self._dist.broadcast_object_list, box, 0)
        return box[0]

    def all_gather(self, value: Any) -> list:
        out: list = [None] * self.world
        self._collective("gathering results", self._dist.all_gather_object, out, value)
        return out

    # -- the sweep -------------------------------------------------------------------------

    def run_sweep(self, config, experiment, *, skip, on_run_start, on_run_done, on_run_step, executor):
        """``sweep.run_sweep`` shared out among the ranks: every rank returns every result."""
        from gradcheck_cli.sweep import run_sweep

        local = dataclasses.replace(config, device=self.device)
        if not self.cells:
            return run_sweep(
                local,
                experiment,
                skip=skip,
                on_run_start=on_run_start if self.rank == 0 else None,
                on_run_done=on_run_done if self.rank == 0 else None,
                on_run_step=on_run_step if self.rank == 0 else None,
                executor=executor,
            )
        cells = config.cells()
        todo = [c for c in cells if c.run not in skip]
        mine = todo[self.rank :: self.world]
        rounds = -(-len(todo) // self.world)
        index_of = {c.run: i for i, c in enumerate(cells, start=1)}
        gathered: dict[str, Any] = dict(skip)

        def share(result) -> None:
            """One round: every rank contributes its latest result (or None) and all receive."""
            for theirs in self.all_gather(result):
                if theirs is not None:
                    gathered[theirs.run] = theirs
                    if on_run_done is not None and self.rank == 0:
                        on_run_done(index_of[theirs.run], len(cells), theirs)

        def start(index, total, cell) -> None:  # index counts within ``mine``: report the sweep's
            on_run_start(index_of[cell.run], len(cells), cell)

        def step(index, n) -> None:
            on_run_step(index_of[mine[index - 1].run], n)

        lead = self.rank == 0
        if mine:
            run_sweep(
                local,
                experiment,
                cells=mine,
                on_run_start=start if lead and on_run_start is not None else None,
                on_run_done=lambda index, total, result: share(result),
                on_run_step=step if lead and on_run_step is not None else None,
                executor=executor,
            )
        for _ in range(rounds - len(mine)):
            share(None)
        return [gathered[c.run] for c in cells]


def exit_rank(code: int) -> None:
    """End a torchrun rank with ``code`` once its output is flushed, skipping the interpreter's
    teardown when this process joined a group. torch's distributed C++ side can still own a
    joinable thread when static objects are destroyed, and the process then aborts ("terminate
    called without an active exception", SIGABRT) after the sweep has finished and written
    everything: torchrun would report the rank as failed. Returns (does nothing) otherwise."""
    if not _joined:
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it
            pass
    os._exit(code)


class RankFailure(GradclipError):
    """A collective failed: another rank died, raised or hung past the timeout. Exit 3, as for
    a run that raised or crashed: the usual cause is the script on some rank."""

    exit_code = ExitCode.USER_CODE


def mean_across_ranks(losses: list) -> list:
    """The step's micro-batch losses averaged over the ranks in model mode (one all-reduce),
    so that every rank judges the same numbers; unchanged otherwise."""
    if _model_group is None or not losses:
        return losses
    import torch
    import torch.distributed as dist

    stacked = torch.stack(
        [loss.detach().float() if loss.dtype in (torch.float16, torch.bfloat16) else loss.detach() for loss in losses]
    )
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=_model_group)
    stacked = stacked / dist.get_world_size(_model_group)
    return list(stacked.unbind(0))
