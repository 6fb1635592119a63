"""The options sweep, check and report share, and how they meet a recipe (docs/options.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from gradcheck_cli.cli._shell import stderr_console

# --- option declarations shared by sweep and check -------------------------------------------
# Defaults are None so that a recipe's value applies unless the option is given explicitly.

STEPS = typer.Option(None, "--steps", help="Optimizer steps per run (default 100).")
SEED = typer.Option(None, "--seed", help="Seed for weights, data order and RNG (default 0).")
AMP = typer.Option(
    None, "--amp", help="Mixed precision: off (default), fp16 (autocast + gradient scaler) or bf16 (autocast)."
)
ACCUMULATE = typer.Option(
    None, "--accumulate", help="Micro-batches per optimizer step (gradient accumulation, default 1)."
)
AMP_INIT_SCALE = typer.Option(
    None, "--amp-init-scale", help="Initial scale of the fp16 gradient scaler (default 65536, torch's)."
)
DIVERGENCE = typer.Option(
    None,
    "--divergence-factor",
    help="A run diverged when a finite loss exceeds this x the first step's loss (default 10; inf turns the check off).",
)
LAYER_DEPTH = typer.Option(
    None,
    "--layer-depth",
    help="Per-layer norms grouped by module depth: auto (default: per parameter up to 64 tensors, else the deepest depth with at most 64 groups), param, or N.",
)
SPIKE_FACTOR = typer.Option(
    None,
    "--spike-factor",
    help="A layer's gradient spikes when its norm exceeds this x its running median (default 10).",
)
DEVICE = typer.Option(None, "--device", help="cpu (default), cuda or cuda:N.")
JUNIT = typer.Option(None, "--junit", help="Also write a JUnit XML report to this file (one test case per run).")
JSON = typer.Option(False, "--json", help="Print the summary as JSON on stdout instead of the table.")


def resolve_config(
    script: Path | None,
    recipe: str | None,
    overrides: dict,
):
    """Merge defaults < recipe < command line into a validated ``SweepConfig`` plus fail flags."""
    from gradcheck_cli.config import SweepConfig
    from gradcheck_cli.recipes import load_recipe

    notes: list[str] = []
    values: dict = load_recipe(recipe, notes=notes) if recipe else {}
    if overrides.get("seed") is not None or overrides.get("seeds") is not None:
        # --seed/--seeds on the command line replace the recipe's seed and seeds alike
        values.pop("seed", None)
        values.pop("seeds", None)
    values.update({key: value for key, value in overrides.items() if value is not None})
    if script is not None:
        values["script"] = script
    fail_on_nan = bool(values.pop("fail_on_nan", False))
    fail_on_divergence = bool(values.pop("fail_on_divergence", False))
    config = SweepConfig.from_values(values, notes=notes)
    for note in notes:  # exact duplicates merged in the grid
        stderr_console().print(f"note: {note}", markup=False)
    return config, fail_on_nan, fail_on_divergence
