"""What a run of the user's command reports back to gradclip's process (pickled by the worker,
read by ``launch.runs``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradcheck_cli.results import RunResult


@dataclass
class Outcome:
    """What a worker reports back: the run's result and how the script ended."""

    result: RunResult | None
    ended: str  # "steps" (reached --steps), "finished", "exit", "error", "no_steps"
    as_written: tuple[str, float, float] | None = None
    first_clip_norm: float | None = None
    first_loss: float | None = None
    error: str | None = None
    user_traceback: str = ""
    exit_code: int | None = None
    optimizer_steps: int = 0
    clip_calls: int = 0
    notes: list[str] = field(default_factory=list)
