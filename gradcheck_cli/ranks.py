"""A sweep under ``torchrun``: one process per rank, joined in a ``torch.distributed`` group.

Each rank finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment
(``from_environment``) and joins the group (NCCL on ``cuda:LOCAL_RANK`` with ``--device cuda``,
gloo otherwise). ``RankGroup.run_sweep`` shares the sweep out: in ``cells`` mode the ranks take
the runs round-robin and gather every result after each run; in ``model`` mode every rank runs
every cell together on a sharded or replicated model, each step's loss averaged over the ranks
(``run_setup.mean_across_ranks``). Every collective is bounded by ``GRADCLIP_DIST_TIMEOUT``.
See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from gradcheck_cli.errors import ExitCode, GradclipError, UsageError
from gradcheck_cli.rank_exit import exit_rank as exit_rank  # re-exported: ranks.exit_rank
from gradcheck_cli.rank_exit import mark_joined
from gradcheck_cli.run_setup import set_model_group
from gradcheck_cli.sweep import run_sweep

DEFAULT_TIMEOUT_S = 600.0


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
        mark_joined()
        self._dist = dist

    @property
    def cells(self) -> bool:
        return self.mode == "cells"

    def __enter__(self) -> RankGroup:
        if not self.cells:
            set_model_group(self._dist.group.WORLD)  # each step's loss: the mean over the ranks
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        set_model_group(None)
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
                share=False,  # every rank must take the same decisions: it trains every run
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
                share=False,  # a rank's share of the runs need not hold their control run
            )
        for _ in range(rounds - len(mine)):
            share(None)
        return [gathered[c.run] for c in cells]


class RankFailure(GradclipError):
    """A collective failed: another rank died, raised or hung past the timeout. Exit 3, as for
    a run that raised or crashed: the usual cause is the script on some rank."""

    exit_code = ExitCode.USER_CODE
