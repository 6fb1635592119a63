"""``--refine K``: up to K extra ``max_norm``s per norm type (and lr), bisecting the stability boundary.

Each refined run is an ordinary run (``sweep.run_sweep``, from the same starting state as every
other run of its seed), flagged ``refined``, its ``max_norm`` chosen from the results so far
(``analysis.next_refine_max_norm``): on CPU the sequence is deterministic, so a resumed sweep
asks for the same refined runs and skips the finished ones. See docs/diagnosis.md ("The
stability boundary and --refine K").
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
    """``results`` (the grid's) followed by up to ``config.refine`` refined ``max_norm``s per lr
    and norm type, each run in every seed: lrs, norm types and seeds in the grid's order. ``skip``
    holds finished runs by name (resume): a refined run found there is taken as it is instead of
    running again."""
    out = list(results)
    skip = dict(skip or {})
    cells = config.cells()
    lrs = list(dict.fromkeys(c.lr for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    for lr in lrs:
        for norm_type in config.norm_types:
            for _ in range(config.refine):
                max_norm = next_refine_max_norm(out, norm_type, lr)
                if max_norm is None:
                    break
                refined = [Cell(max_norm, norm_type, lr=lr, seed=seed) for seed in seeds]
                out.extend(_refined_runs(config, experiment, refined, skip, on_run_start, on_run_done, on_step))
    return out


def _refined_runs(config, experiment, cells, skip, on_run_start, on_run_done, on_step) -> list[RunResult]:
    """The refined runs of ``cells``: the finished ones from ``skip``, the others run now."""

    def started(index, total, cell):
        if on_run_start is not None:
            on_run_start(cell)

    def done(index, total, result):
        result.refined = True
        if on_run_done is not None:
            on_run_done(result)

    results = run_sweep(
        config, experiment, cells=cells, skip=skip, on_run_start=started, on_run_done=done, on_step=on_step
    )
    for result in results:
        result.refined = True
    return results
