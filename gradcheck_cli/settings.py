"""Settings: a sweep's runs grouped over the seeds, and the lr x clipping map.

A multi-seed sweep asks whether a setting (a clipping cell at one lr) is stable *in every seed*,
so the runs that differ only in their seed are grouped (``over_seeds``): ``stable 3/3``, the mean
and spread of their final losses, their norms pooled. Pure functions over ``RunResult``s; no
torch, no printing. See docs/diagnosis.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradcheck_cli.results import STABLE, Cell, RunResult


def seeds_vary(results: list[RunResult]) -> bool:
    return any(r.cell.seed is not None for r in results)


def lrs_vary(results: list[RunResult]) -> bool:
    return any(r.cell.lr is not None for r in results)


@dataclass
class SettingOverSeeds:
    """The runs of one setting (clipping cell and lr) across the seeds of the sweep."""

    cell: Cell  # without its seed
    runs: list[RunResult]

    @property
    def n_stable(self) -> int:
        return sum(r.status == STABLE for r in self.runs)

    @property
    def stable(self) -> bool:
        """Stable only if stable in every seed."""
        return self.n_stable == len(self.runs)

    @property
    def stable_text(self) -> str:
        return f"stable {self.n_stable}/{len(self.runs)}"

    @property
    def final_losses(self) -> list[float]:
        return [r.steps[-1].loss if r.steps else math.nan for r in self.runs]

    @property
    def mean_final_loss(self) -> float:
        """Mean final loss over the seeds; NaN/inf when some seed has no finite one."""
        losses = self.final_losses
        return sum(losses) / len(losses) if losses else math.nan

    @property
    def final_loss_spread(self) -> float:
        """Largest minus smallest final loss over the seeds (0 with one seed)."""
        losses = self.final_losses
        if not losses or not all(math.isfinite(x) for x in losses):
            return math.nan
        return max(losses) - min(losses)

    def pooled(self) -> RunResult:
        """One ``RunResult`` holding every seed's steps, for pooled norm statistics and
        histograms (its final loss means nothing)."""
        steps = [s for r in self.runs for s in r.steps]
        return RunResult(self.cell, STABLE if self.stable else self.runs[0].status, steps)

    @property
    def first_unstable(self) -> RunResult | None:
        return next((r for r in self.runs if r.status != STABLE), None)


def over_seeds(results: list[RunResult]) -> list[SettingOverSeeds]:
    """The runs grouped by setting (``Cell.setting``), in the order settings first appear."""
    groups: dict[Cell, SettingOverSeeds] = {}
    for r in results:
        key = r.cell.setting
        if key not in groups:
            groups[key] = SettingOverSeeds(key, [])
        groups[key].runs.append(r)
    return list(groups.values())


def lr_grid(
    results: list[RunResult],
) -> tuple[list[float | None], list[Cell], dict[tuple[float | None, Cell], SettingOverSeeds]]:
    """(lrs in sweep order, clipping cells without lr and seed in sweep order, and the group of
    each (lr, clipping cell)): the stability map's rows, columns and entries."""
    lrs: list[float | None] = []
    clips: list[Cell] = []
    entries: dict[tuple[float | None, Cell], SettingOverSeeds] = {}
    for group in over_seeds(results):
        clip = group.cell.clipping
        if group.cell.lr not in lrs:
            lrs.append(group.cell.lr)
        if clip not in clips:
            clips.append(clip)
        entries[(group.cell.lr, clip)] = group
    return lrs, clips, entries
