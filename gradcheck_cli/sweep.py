"""A sweep: the control run and every clipping cell, at every lr and seed, each run from the
starting state of its seed.

``run_sweep`` builds the model and snapshots the starting state once per seed; every run of that
seed restores it, so every run with the same (lr, seed) starts from the same weights, optimizer
state, RNG state and batch order. Step 1's loss is therefore identical across the runs that share
an (lr, seed), and a repeated sweep gives bit-identical numbers on CPU (what ``--resume`` relies
on).

Order of events, per seed (cells come seed-major, so one snapshot is held at a time)::

    seed(s) -> build_model() -> model.to(device) -> build the optimizer once
    seed(s) -> snapshot(model, optimizer state, RNG)
    for each cell of seed s: restore model + RNG -> build the optimizer afresh -> load its
                   snapshot state -> set the run's lr -> build the scheduler -> train
                   (runner.run_cell)

The optimizer is built once up front to capture its starting state (and to find out early
whether ``build_optimizer`` works at all), then built afresh for every run from the restored
model and loaded with that captured state: a new object carries nothing over from an earlier
run, and loading the state makes its start identical even if ``build_optimizer`` is stateful.
The lr is not part of the snapshot: each run sets its own after loading the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gradcheck_cli.analysis import annotate_spike
from gradcheck_cli.config import DEFAULT_LR, SweepConfig
from gradcheck_cli.errors import UsageError
from gradcheck_cli.loader import Experiment
from gradcheck_cli.results import Cell, RunResult
from gradcheck_cli.runner import UserFailure, error_result, make_optimizer, run_cell, run_lr
from gradcheck_cli.snapshot import Snapshot, seed_everything

OnRunStart = Callable[[int, int, Cell], None]
OnRunDone = Callable[[int, int, RunResult], None]


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was given but CUDA is not available", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device} was given but only {torch.cuda.device_count()} CUDA device(s) exist",
                "use --device cuda:0",
            )


def run_sweep(
    config: SweepConfig,
    experiment: Experiment,
    *,
    skip: Mapping[str, RunResult] | None = None,
    on_run_start: OnRunStart | None = None,
    on_run_done: OnRunDone | None = None,
    cells: list[Cell] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """Run every cell of ``config.cells()`` (or of ``cells``, e.g. ``gradclip check``'s single
    cell) in order and return one ``RunResult`` per cell.

    ``skip`` maps run names (``Cell.run``) to results of runs that already finished (resume):
    those cells are not run again; their given result is returned in its place in the order.
    When every cell is skipped the model is not even built.

    ``on_run_start(index, total, cell)`` is called before and ``on_run_done(index, total,
    result)`` after each run actually executed (not for skipped ones); ``index`` counts from 1
    over all cells of the sweep, skipped ones included, and ``total`` is the number of cells;
    ``on_step(step)`` after every completed training step of a run.

    Raises ``UserCodeError`` when ``build_model()`` raises and ``UsageError`` when it returns no
    usable module or the device is unavailable. When ``build_optimizer`` raises, every run gets
    status ``error`` with its message and the sweep still completes. ``KeyboardInterrupt``
    propagates, from a callback or from the user's code alike.
    """
    cells = config.cells() if cells is None else list(cells)
    total = len(cells)
    skip = dict(skip or {})
    if all(cell.run in skip for cell in cells):
        return [skip[cell.run] for cell in cells]

    device = torch.device(config.device)
    _check_device(device)

    results: list[RunResult] = []
    prepared_seed: int | None = None
    model = snapshot = optimizer_failure = None
    for index, cell in enumerate(cells, start=1):
        if cell.run in skip:
            results.append(skip[cell.run])
            continue
        seed = config.seed_of(cell)
        if model is None or seed != prepared_seed:
            model = snapshot = None  # free the previous seed's model before building the next
            model, snapshot, optimizer_failure = _starting_state(config, experiment, device, seed)
            prepared_seed = seed
        if on_run_start is not None:
            on_run_start(index, total, cell)
        if optimizer_failure is not None:
            result = error_result(cell, optimizer_failure, lr=run_lr(experiment, config, cell), seed=seed)
        else:
            result = annotate_spike(
                run_cell(experiment, model, cell, config, snapshot=snapshot, on_step=on_step), config.spike_factor
            )
        results.append(result)
        if on_run_done is not None:
            on_run_done(index, total, result)
    return results


def _starting_state(config: SweepConfig, experiment: Experiment, device: torch.device, seed: int):
    """(model, snapshot, optimizer failure) for ``seed``: the model built and moved to the
    device, and the snapshot every run of this seed starts from."""
    seed_everything(seed, device)
    model = experiment.build_model()
    model.to(device)
    optimizer_failure: UserFailure | None = None
    optimizer = None
    try:
        optimizer = make_optimizer(experiment, model, config.lrs[0] if config.lrs else DEFAULT_LR)
    except UserFailure as failure:
        optimizer_failure = failure
    seed_everything(seed, device)
    snapshot = Snapshot.capture(model, optimizer, device)
    del optimizer  # every run builds its own
    return model, snapshot, optimizer_failure
