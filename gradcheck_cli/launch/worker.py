"""``python -m gradcheck_cli.launch.worker SPEC``: one run of the user's command in this fresh
process, exactly as ``python SCRIPT ARGS`` would run it (``__main__``, ``sys.argv``, the
current directory, ``sys.path[0]``), with the run's clipping and recorder installed first.
The outcome is saved to the spec's result file, whatever way the script ends. See
docs/your-command.md."""

from __future__ import annotations

import json
import os
import pickle
import runpy
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gradcheck_cli.launch import intercept
from gradcheck_cli.launch.outcome import Outcome
from gradcheck_cli.launch.session import LaunchSession, StopRun
from gradcheck_cli.results import ERROR, STABLE, Cell, RunResult
from gradcheck_cli.snapshot import seed_everything


def _user_traceback(exc: BaseException, script: str | None) -> str:
    """The traceback from the first frame outside gradclip (the user's code and what it calls)."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = str(Path(__file__).resolve().parent.parent)
    kept = [f for f in frames if not f.filename.startswith(here) and "runpy" not in f.filename]
    lines = traceback.format_list(kept) + traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cell = Cell(**spec["cell"]) if spec.get("cell") is not None else None
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    session = LaunchSession(
        cell,
        steps=spec.get("steps"),
        norm_types=spec.get("norm_types", [2.0]),
        zclip_max_norm=spec.get("zclip_max_norm"),
        divergence_factor=spec.get("divergence_factor"),
        stop_on_non_finite=bool(spec.get("stop_on_non_finite")),
        stop_on_divergence=bool(spec.get("stop_on_divergence")),
        layer_depth=spec.get("layer_depth", "auto"),
    )
    result_path = Path(spec["result"])
    saved: list[Outcome] = []

    def save(outcome: Outcome) -> None:
        if saved:
            return
        rec = session.recorder
        if outcome.ended == "error" and rec is not None:
            rec.error = outcome.error
            if rec.status == STABLE:
                rec.status = ERROR
        result = session.finish()
        if result is not None:
            result = _with_seed(result, spec.get("seed"))
        outcome.result = result
        outcome.as_written = session.as_written
        outcome.first_clip_norm = session.first_clip_norm
        outcome.first_loss = result.steps[0].loss if result is not None and result.steps else None
        outcome.optimizer_steps = session.optimizer_steps
        outcome.clip_calls = session.clip_calls
        tmp = result_path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(outcome))
        os.replace(tmp, result_path)
        saved.append(outcome)

    def on_os_exit(code: Any) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        save(Outcome(None, "exit" if code == 0 else "error", exit_code=int(code), error=_exit_error(code)))

    intercept.install(session, on_os_exit)
    if spec.get("seed") is not None:
        seed_everything(spec["seed"], "cuda" if torch.cuda.is_available() else "cpu")
    script, module = spec.get("script"), spec.get("module")
    try:
        if script is not None:
            sys.argv = [spec["argv0"], *spec["args"]]
            sys.path[0] = str(Path(script).parent)
            runpy.run_path(script, run_name="__main__")
        else:
            sys.argv = [module, *spec["args"]]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        outcome = Outcome(None, "finished")
    except StopRun:
        outcome = Outcome(None, "steps")
    except SystemExit as exc:
        code = exc.code
        if code is None or code == 0:
            outcome = Outcome(None, "exit", exit_code=0)
        else:
            outcome = Outcome(None, "error", exit_code=code if isinstance(code, int) else 1, error=_exit_error(code))
    except KeyboardInterrupt:
        outcome = Outcome(None, "error", error="KeyboardInterrupt")
    except BaseException as exc:  # the script's own error: reported, never gradclip's
        message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        outcome = Outcome(None, "error", error=message, user_traceback=_user_traceback(exc, script))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    save(outcome)


def _exit_error(code: Any) -> str | None:
    if code in (None, 0):
        return None
    if isinstance(code, int):
        return f"the script exited with code {code}"
    return f"the script exited: {code}"


def _with_seed(result: RunResult, seed: int | None) -> RunResult:
    return replace(result, seed=seed)


def error_result(cell: Cell, message: str, seed: int | None = None) -> RunResult:
    return RunResult(cell=cell, status=ERROR, error=message, seed=seed)


if __name__ == "__main__":
    main(sys.argv[1])
