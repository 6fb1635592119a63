"""A sweep's validated configuration, and the parsers shared by the command line and recipes.

Every check that can fail on user input lives here and raises ``UsageError`` naming the value
and the fix, so the CLI and the recipe loader reject bad input with the same words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from gradcheck_cli.errors import UsageError
from gradcheck_cli.results import Cell

DEFAULT_MAX_NORMS = (0.1, 1.0, 10.0)
DEFAULT_NORM_TYPES = (2.0, math.inf)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that decides a sweep's numbers. Two sweeps with equal configs give equal
    numbers on CPU, which is what ``--resume`` relies on (see ``fingerprint``)."""

    script: Path
    max_norms: tuple[float, ...] = DEFAULT_MAX_NORMS
    norm_types: tuple[float, ...] = DEFAULT_NORM_TYPES
    steps: int = 100
    seed: int = 0
    lr: float = 0.01
    divergence_factor: float = 10.0
    device: str = "cpu"

    @classmethod
    def from_values(cls, values: dict) -> "SweepConfig":
        """A validated config from raw values (a recipe's, overridden by the command line's);
        missing keys take the defaults above. Raises ``UsageError`` naming the bad value."""
        if "script" not in values:
            raise UsageError(
                "no script given", "pass the path of your model script, e.g. gradclip sweep my_model.py, or --recipe FILE"
            )
        d = cls.__dataclass_fields__
        return cls(
            script=check_script(values["script"]),
            max_norms=parse_max_norms(values.get("max_norms", d["max_norms"].default)),
            norm_types=parse_norm_types(values.get("norm_types", d["norm_types"].default)),
            steps=check_steps(values.get("steps", d["steps"].default)),
            seed=check_seed(values.get("seed", d["seed"].default)),
            lr=check_positive(values.get("lr", d["lr"].default), "--lr"),
            divergence_factor=check_positive(
                values.get("divergence_factor", d["divergence_factor"].default), "--divergence-factor"
            ),
            device=check_device(values.get("device", d["device"].default)),
        )

    def cells(self) -> list[Cell]:
        """The unclipped control run first (it measures the L2 norm), then the grid, max_norm major."""
        grid = [Cell(m, p) for m in self.max_norms for p in self.norm_types]
        return [Cell(None, 2.0)] + grid

    def fingerprint(self) -> dict:
        """JSON-safe description used to refuse resuming with different options."""
        d = asdict(self)
        d["script"] = str(Path(self.script).resolve())
        d["max_norms"] = [float(m) for m in self.max_norms]
        d["norm_types"] = [format_float(p) for p in self.norm_types]
        return d


def format_float(x: float) -> str:
    return f"{x:g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _split(value: str | list | tuple, option: str) -> list:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [part.strip() for part in str(value).split(",")]
    if not items or any(item == "" for item in items):
        raise UsageError(f"{option} {value!r} has an empty entry", f"give comma-separated values, e.g. {option} 0.1,1,10")
    return items


def parse_max_norms(value: str | list | tuple, option: str = "--max-norm") -> tuple[float, ...]:
    """Comma-separated positive finite floats, kept in the given order, duplicates dropped."""
    out: list[float] = []
    for item in _split(value, option):
        try:
            x = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"{option} value {item!r} is not a number", f"use positive numbers, e.g. {option} 0.1,1,10") from None
        if not (x > 0) or not math.isfinite(x):
            raise UsageError(f"{option} value {item!r} must be a positive finite number", f"use values above 0, e.g. {option} 0.1,1,10")
        if x not in out:
            out.append(x)
    return tuple(out)


def parse_norm_types(value: str | list | tuple, option: str = "--norm-type") -> tuple[float, ...]:
    """Comma-separated floats or ``inf``; kept in order, duplicates dropped."""
    out: list[float] = []
    for item in _split(value, option):
        try:
            p = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"{option} value {item!r} is not a number or 'inf'", f"use e.g. {option} 2,inf") from None
        if math.isnan(p):
            raise UsageError(f"{option} value {item!r} is not a valid norm type", f"use e.g. {option} 2,inf")
        if p not in out:
            out.append(p)
    return tuple(out)


def check_steps(steps: int, option: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"{option} {steps!r} must be a whole number of at least 1", f"e.g. {option} 100")
    return steps


def check_seed(seed: int, option: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise UsageError(f"{option} {seed!r} must be a whole number from 0 to 2**63-1", f"e.g. {option} 0")
    return seed


def check_positive(value: float, option: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r} is not a number", f"give a positive number for {option}") from None
    if not (x > 0) or not math.isfinite(x):
        raise UsageError(f"{option} {value!r} must be a positive finite number", f"give a positive number for {option}")
    return x


def check_device(device: str, option: str = "--device") -> str:
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise UsageError(f"{option} {device!r} is not supported", f"use {option} cpu or {option} cuda")
    return device


def check_script(script: str | Path) -> Path:
    path = Path(script)
    if not path.exists():
        raise UsageError(f"script {str(path)!r} does not exist", "check the path, or run from the directory that holds it")
    if not path.is_file():
        raise UsageError(f"script {str(path)!r} is not a file", "point gradclip at a .py file that defines build_model, batches and loss_fn")
    return path
