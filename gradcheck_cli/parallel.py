"""Runs in supervised worker processes (``--jobs N``), each reused across runs.

A worker receives its seed's starting state from the sweep as a snapshot and runs from it, so a
run's numbers equal those of the sweep's own process, bit for bit on CPU. A worker that dies
mid-run gives that run the status ``crashed``, and the sweep goes on in a fresh worker. Workers
come from a fork server and may start processes of their own (a ``DataLoader``'s workers), which
end with them. See docs/reliability.md (Worker processes; DataLoader workers in a run).
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gradcheck_cli.errors import GradclipError
from gradcheck_cli.guard import guarded
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import CRASHED, ERROR, Cell, RunResult
from gradcheck_cli.run_setup import UserFailure, run_lr
from gradcheck_cli.shadows import Shared
from gradcheck_cli.snapshot import seed_everything
from gradcheck_cli.sweep import WAIT, execute

# How long a worker may take to stop after being asked before it is killed.
_STOP_TIMEOUT_S = 5.0


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; all cores where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """The torch threads each of ``jobs`` workers gets: ``max(1, cores // jobs)``, so the workers
    together never use more threads than there are cores (oversubscribed cores make small
    models many times slower: threads wait on each other at every op)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, jobs))


def _ranks_on_this_machine() -> int:
    """torchrun's ``LOCAL_WORLD_SIZE``: the ranks sharing this machine's cores (1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def serialise(value: Any) -> bytes:
    """``value`` (a ``Snapshot``) as bytes, tensors moved to CPU; ``deserialise`` reverses it."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def deserialise(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def crash_message(exitcode: int | None, step: int | None) -> str:
    """What killed a worker, for the ``error`` column: ``worker process killed by signal SIGKILL
    (9) during step 3`` or ``worker process exited with code 7 before step 1``."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "signal"
        how = f"killed by signal {name} ({-exitcode})"
    elif exitcode is None:
        how = "stopped answering"
    else:
        how = f"exited with code {exitcode}"
    when = f"during step {step}" if step else "before its first step"
    return f"worker process {how} {when}"


# --------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------


class _Forward(io.TextIOBase):
    """A text stream that sends what is written to the supervising process."""

    def __init__(self, conn, lock: threading.Lock, name: str) -> None:
        self._conn, self._lock, self._name = conn, lock, name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if text:
            with self._lock:
                self._conn.send(("out", self._name, text))
        return len(text)

    def isatty(self) -> bool:
        return False


def _stop_group(pgid: int) -> None:
    """Kill every process left in a worker's process group: the DataLoader workers (and any
    other processes) its script started, which outlive a worker that was killed."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (AttributeError, OSError):  # none left (ESRCH), or no process groups here
        pass


def _may_start_processes() -> bool:
    """Let the script start processes of its own in this worker, as in its own process.

    The supervisor starts workers as daemons, so that its exit stops them; ``multiprocessing``
    forbids a daemon to have children (a ``DataLoader`` with workers): its abrupt end
    would orphan them. Here the worker is not a daemon to itself, and leads a process group
    that its children join: the supervisor stops the group with the worker, and the worker
    stops it when the supervisor goes away (``_watch_supervisor``). True when it leads one."""
    multiprocessing.current_process().daemon = False
    try:
        os.setpgid(0, 0)
    except (AttributeError, OSError):
        return False
    return True


def _watch_supervisor(conn, own_group: bool) -> None:
    """Kill this worker, with the processes it started, once the supervisor's end of the pipe
    closes (the supervisor died) even in the middle of a run: a thread polls for the hang-up
    without reading. Where ``poll`` is missing, an idle worker still stops at EOF."""
    if not hasattr(select, "poll"):
        return
    hangup = select.POLLHUP | getattr(select, "POLLRDHUP", 0)

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), hangup)
        while True:
            for _fd, event in poller.poll():
                if event & select.POLLNVAL:  # this worker closed its end: it is exiting
                    return
                if event & hangup:
                    if own_group:
                        _stop_group(os.getpid())
                    os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gradclip-watch-supervisor", daemon=True).start()


def _worker_main(conn, script: str, config, threads: int, environ: dict, cwd: str) -> None:
    """A worker's life: import the script, then run every task it is sent until told to stop
    (or until the pipe closes: the supervisor is gone).

    Messages to the supervisor: ``("step", step)``, ``("out", stream, text)``, ``("done",
    result)`` or ``("shared", bytes)`` (a control run's ``shadows.Shared``). From it: ``("run",
    cell, seed, snapshot bytes or None, optimizer failure or None, the cells a control run
    follows, a fork's bytes or None)`` and ``None`` (stop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_supervisor(conn, _may_start_processes())
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    lock = threading.Lock()
    sys.stdout = _Forward(conn, lock, "stdout")
    sys.stderr = _Forward(conn, lock, "stderr")

    import torch

    torch.set_num_threads(threads)

    def send(message) -> None:
        with lock:
            conn.send(message)

    experiment = None
    load_failure: UserFailure | None = None
    try:
        experiment = load_experiment(script)
    except GradclipError as err:
        load_failure = UserFailure(f"the worker process could not import the script: {err.message}")
    snapshots: dict[int, Any] = {}
    model = None
    model_seed: int | None = None
    device = torch.device(config.device)
    with guarded():  # os._exit in the script's main thread: an error, as in one process
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the supervisor is gone: nobody to report to
                return
            if message is None:
                return
            _, cell, seed, snapshot_bytes, failure, shadows, fork_bytes = message
            if snapshot_bytes is not None:
                snapshots = {seed: _for_this_worker(deserialise(snapshot_bytes), threads)}  # seed-major: keep one
            if load_failure is not None:
                send(("done", RunResult(cell=cell, status=ERROR, error=load_failure.error, seed=seed)))
                continue
            optimizer_failure = UserFailure(*failure) if failure is not None else None
            if optimizer_failure is None and model_seed != seed:
                # The module's structure only: its state comes from the snapshot. Built as the
                # sweep built it (same seed first), so anything outside the state dict matches too.
                model = None
                try:
                    seed_everything(seed, device)
                    model = experiment.build_model()
                    model.to(device)
                    model_seed = seed
                except GradclipError as err:
                    optimizer_failure = UserFailure(f"build_model() failed in the worker process: {err.message}")
            try:
                result = execute(
                    experiment,
                    model,
                    cell,
                    config,
                    snapshots.get(seed),
                    optimizer_failure,
                    on_step=lambda step: send(("step", step)),
                    shadows=shadows,
                    fork=deserialise(fork_bytes) if fork_bytes is not None else None,
                )
            except KeyboardInterrupt:  # raised by the script itself (SIGINT is ignored here)
                send(("interrupted",))
                return
            except Exception as exc:  # a bug in gradclip: reported as such by the supervisor
                import traceback

                send(("internal", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
                return
            if isinstance(result, Shared):  # it holds tensors (the forks' states): sent as bytes
                send(("shared", serialise(result)))
            else:
                send(("done", result))


class WorkerError(RuntimeError):
    """gradclip itself failed inside a worker (a bug: exit 4); ``worker_traceback`` says where."""

    def __init__(self, message: str, worker_traceback: str) -> None:
        super().__init__(message)
        self.worker_traceback = worker_traceback


def _context():
    """The fork server (preloaded with torch and gradclip), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "gradcheck_cli.sweep", "gradcheck_cli.parallel"])
        return context
    return multiprocessing.get_context("spawn")


def _for_this_worker(snapshot, threads: int):
    """The snapshot with this worker's thread count in its global state: every run restores
    that state, and the sweep's process captured its own thread count in it."""
    import dataclasses

    state = getattr(snapshot, "global_state", None)
    if state is None:
        return snapshot
    return dataclasses.replace(snapshot, global_state=dataclasses.replace(state, num_threads=threads))


# --------------------------------------------------------------------------------------------
# The supervisor
# --------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker: its process and pipe, the task it runs, the seed whose snapshot it holds."""

    process: Any = None
    conn: Any = None
    task: Any = None
    last_step: int = 0
    seeds: set = field(default_factory=set)


class WorkerPool:
    """Executor (see ``sweep.Executor``) running each task in one of ``jobs`` worker processes.

    ``threads``: torch threads per worker (default ``threads_per_job(jobs)``; under torchrun the
    ranks on this machine share its cores too: ``threads_per_job(jobs * LOCAL_WORLD_SIZE)``). Use it as a
    context manager, or call ``close()``: workers are stopped and joined either way."""

    def __init__(self, jobs: int = 1, threads: int | None = None) -> None:
        if jobs < 1:
            raise ValueError("a worker pool needs at least one job")
        self.jobs = jobs
        self.threads = threads if threads is not None else threads_per_job(jobs * _ranks_on_this_machine())
        self._context = _context()
        self._slots = [_Slot() for _ in range(jobs)]
        self._snapshot_bytes: tuple[Any, bytes] | None = None  # (state, its serialised snapshot)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers -------------------------------------------------------------------------

    def start(self, script, config) -> None:
        """Start every worker now (they import torch and the script while this process gets
        the sweep ready), rather than at the first run."""
        for slot in self._slots:
            if slot.process is None:
                self._start(slot, str(script), config)

    def _start(self, slot: _Slot, script: str, config) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child, script, config, self.threads, dict(os.environ), os.getcwd()),
            name="gradclip-worker",
            daemon=True,
        )
        process.start()
        child.close()
        slot.process, slot.conn, slot.seeds = process, parent, set()

    def _discard(self, slot: _Slot) -> None:
        """Forget a dead worker (and make sure it is dead)."""
        if slot.process is not None:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join()
            _stop_group(slot.process.pid)  # the script's DataLoader workers, say
        if slot.conn is not None:
            slot.conn.close()
        slot.process = slot.conn = slot.task = None
        slot.seeds = set()

    def close(self) -> None:
        """Ask every worker to stop, kill the ones that do not, and join them all."""
        for slot in self._slots:
            if slot.process is None:
                continue
            if slot.task is None and slot.process.is_alive():
                try:
                    slot.conn.send(None)
                except (OSError, ValueError):
                    pass
                slot.process.join(_STOP_TIMEOUT_S)
            self._discard(slot)

    # -- running ---------------------------------------------------------------------------

    def run(
        self,
        experiment,
        config,
        tasks: Iterator,
        on_start: Callable,
        on_step: Callable,
    ) -> Iterator[tuple[Any, RunResult]]:
        script = str(experiment.path)
        pending = iter(tasks)
        exhausted = False
        try:
            while True:
                for slot in self._slots:
                    if slot.task is None and not exhausted:
                        task = next(pending, None)
                        if task is None:
                            exhausted = True
                            break
                        if task is WAIT:  # the next run waits for a running one to end
                            break
                        self._dispatch(slot, task, script, config)
                        on_start(task)
                busy = [s for s in self._slots if s.task is not None]
                if not busy:
                    return
                waitables = [s.conn for s in busy] + [s.process.sentinel for s in busy]
                ready = set(multiprocessing.connection.wait(waitables))
                for slot in busy:
                    done = None
                    if slot.conn in ready or slot.process.sentinel in ready:
                        done = self._drain(slot, on_step)
                    if done is None and slot.process.sentinel in ready and not slot.process.is_alive():
                        done = self._drain(slot, on_step)  # what it sent just before dying
                        if done is None:
                            task = slot.task
                            done = (task, self._crashed(experiment, config, task, slot, run_lr))
                            self._discard(slot)
                    if done is not None:
                        yield done
        finally:
            self.close()

    def _dispatch(self, slot: _Slot, task, script: str, config) -> None:
        state = task.state
        failure = state.optimizer_failure
        for _attempt in range(2):
            if slot.process is None or not slot.process.is_alive():
                self._discard(slot)
                self._start(slot, script, config)
            snapshot = None
            if failure is None and state.seed not in slot.seeds:
                snapshot = self._serialised(state)
            message = (
                "run",
                task.cell,
                state.seed,
                snapshot,
                (failure.error, failure.user_traceback) if failure is not None else None,
                task.shadows,
                serialise(task.fork) if task.fork is not None else None,
            )
            try:
                slot.conn.send(message)
            except (OSError, ValueError):  # the worker died while idle: start another
                self._discard(slot)
                continue
            if snapshot is not None:
                slot.seeds = {state.seed}
            slot.task, slot.last_step = task, 0
            return
        raise RuntimeError("could not start a worker process")

    def _drain(self, slot: _Slot, on_step: Callable):
        """Handle every message waiting from ``slot``'s worker; the finished ``(task, result)``
        if one came, else ``None``."""
        task = slot.task
        try:
            while slot.conn.poll():
                kind, *payload = slot.conn.recv()
                if kind == "out":
                    stream = sys.stdout if payload[0] == "stdout" else sys.stderr
                    stream.write(payload[1])
                    stream.flush()
                elif kind == "step":
                    slot.last_step = payload[0]
                    on_step(task, payload[0])
                elif kind == "done":
                    slot.task = None
                    return task, payload[0]
                elif kind == "shared":
                    slot.task = None
                    return task, deserialise(payload[0])
                elif kind == "interrupted":
                    raise KeyboardInterrupt
                elif kind == "internal":
                    raise WorkerError(f"in a worker process: {payload[0]}", payload[1])
        except (EOFError, OSError):
            pass  # the worker is gone; its sentinel says so
        return None

    def _serialised(self, state) -> bytes:
        """The state's snapshot as bytes, serialised once per seed however many workers get it."""
        if self._snapshot_bytes is None or self._snapshot_bytes[0] is not state:
            self._snapshot_bytes = (state, serialise(state.snapshot))
        return self._snapshot_bytes[1]

    @staticmethod
    def _crashed(experiment, config, task, slot: _Slot, run_lr) -> RunResult:
        slot.process.join()
        cell: Cell = task.cell
        return RunResult(
            cell=cell,
            status=CRASHED,
            error=crash_message(slot.process.exitcode, slot.last_step + 1),
            lr=run_lr(experiment, config, cell),
            seed=config.seed_of(cell),
        )
