"""``--refine K``: up to K extra runs per norm type, bisecting the stability boundary.

Each refined run is an ordinary run (``sweep.run_sweep`` with one cell, from the same starting
state as every other run), flagged ``refined``. Its ``max_norm`` is chosen from the results so
far by ``analysis.next_refine_max_norm``, so on CPU the sequence is deterministic and a resumed
sweep asks for the same refined runs, finds them finished and skips them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gradcheck_cli.analysis import next_refine_max_norm
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.loader import Experiment
from gradcheck_cli.results import Cell, RunResult
from gradcheck_cli.sweep import run_sweep


def run_refinement(
    config: SweepConfig,
    experiment: Experiment,
    results: list[RunResult],
    *,
    skip: Mapping[str, RunResult] | None = None,
    on_run_start: Callable[[Cell], None] | None = None,
    on_run_done: Callable[[RunResult], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """``results`` (the grid's) followed by up to ``config.refine`` refined runs per norm type,
    norm types in the grid's order. ``skip`` holds finished runs by name (resume): a refined
    run found there is taken as it is instead of running again."""
    out = list(results)
    skip = dict(skip or {})
    # With lr or seed axes, each (lr, seed) of the sweep has its own boundary to bisect.
    groups = list(dict.fromkeys((c.lr, c.seed) for c in config.cells()))
    for lr, seed in groups:
        for norm_type in config.norm_types:
            for _ in range(config.refine):
                mine = [r for r in out if (r.cell.lr, r.cell.seed) == (lr, seed)]
                max_norm = next_refine_max_norm(mine, norm_type)
                if max_norm is None:
                    break
                out.append(_refined_run(config, experiment, Cell(max_norm, norm_type, lr=lr, seed=seed), skip,
                                        on_run_start, on_run_done, on_step))
    return out


def _refined_run(config, experiment, cell, skip, on_run_start, on_run_done, on_step) -> RunResult:
    """The refined run of ``cell``: the finished one from ``skip``, else run now."""
    if cell.run in skip:
        return skip[cell.run]
    if on_run_start is not None:
        on_run_start(cell)
    result = run_sweep(config, experiment, cells=[cell], on_step=on_step)[0]
    result.refined = True
    if on_run_done is not None:
        on_run_done(result)
    return result
