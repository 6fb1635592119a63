"""``gradclip sweep|watch|check -- python SCRIPT ARGS``: the user's training command as it is,
each run a fresh process (docs/your-command.md). The files, verdicts, recommendation, report,
resume and JUnit are a contract script's; what differs is how a run executes."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

from gradcheck_cli.cli._options import config_values, resolve_config
from gradcheck_cli.cli._shell import exit_code, stderr_console
from gradcheck_cli.cli.output import (
    absolute,
    prepare_junit,
    print_check,
    run_progress,
    write_junit_report,
)
from gradcheck_cli.cli.sweep import _fingerprint, _finish, _not_saved, _Progress, _stopped, _Sweep
from gradcheck_cli.config import SweepConfig, parse_max_norms, parse_norm_types
from gradcheck_cli.errors import ReportWriteError, UsageError
from gradcheck_cli.launch.command import UserCommand, parse_command
from gradcheck_cli.launch.runs import RunOptions, threads_for
from gradcheck_cli.launch.sweep import as_written_line, options_for, run_command_sweep, single_run
from gradcheck_cli.options import WATCH, for_command
from gradcheck_cli.report import files
from gradcheck_cli.results import CRASHED, ERROR, Cell

# Options that set what a contract script's run does for it; a command sets these itself.
_NOT_FOR_COMMANDS = {
    "recipe": "a recipe names a model script",
    "lr": "your command sets its own learning rate (change it in its arguments)",
    "device": "your command puts its model on its device itself",
    "amp": "your command sets up its own mixed precision",
    "accumulate": "your command accumulates gradients itself",
    "amp_init_scale": "your command builds its own GradScaler",
    "refine": "--refine bisects with a contract script's runs",
}


def _refuse_contract_options(given: dict) -> None:
    for name, why in _NOT_FOR_COMMANDS.items():
        if given.get(name) not in (None, False, 0, ""):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} does not apply to a command run as it is: {why}", f"drop {flag}")


def _config(command: UserCommand, given: dict) -> SweepConfig:
    values = {key: value for key, value in config_values(given).items() if value is not None}
    config, _, _ = resolve_config(command.file, None, values)
    return config


def sweep(words: list[str], given: dict) -> int:
    """The grid over the command: the same files and report as a contract script's sweep."""
    command = parse_command(words)
    _refuse_contract_options(given)
    if given.get("distributed") not in (None, "cells"):
        raise UsageError("--distributed does not apply to a command run as it is", "drop --distributed")
    jobs = max(1, given["jobs"] or 1)
    config = _config(command, given)
    sweep_ = _Sweep(
        config,
        given["out"],
        prepare_junit(given["junit"]),
        given["json"],
        fail_on_nan=given["fail_on_nan"],
        fail_on_divergence=given["fail_on_divergence"],
        group=None,
    )
    out_dir = files.prepare_out_dir(absolute(sweep_.out))
    with contextlib.ExitStack() as stack:
        stack.enter_context(files.OutDirLock(out_dir))
        fingerprint = {**_fingerprint(config, threads_for(jobs)), "command": command.shown()}
        finished = files.load_finished(out_dir, fingerprint) if given["resume"] else {}
        cells = config.cells()
        writer = files.ReportWriter(out_dir, fingerprint, [c.run for c in cells], finished.values())
        if finished:
            stderr_console().print(
                f"resuming: {len(finished)} of {len(cells)} runs already finished in {sweep_.out}", markup=False
            )
        with run_progress() as progress:
            bars = _Progress(progress, config.steps, len(cells), len(finished), writer)
            try:
                swept = run_command_sweep(
                    config,
                    command,
                    out_dir,
                    jobs=jobs,
                    skip=finished,
                    on_run_start=bars.run_started,
                    on_run_done=bars.run_done,
                    share=not given["no_share"],
                )
                writer.flush()
            except KeyboardInterrupt as exc:
                progress.stop()
                return _stopped(sweep_, exc, len(writer.results), len(cells))
            except ReportWriteError as failure:
                progress.stop()
                return _not_saved(sweep_, failure, cells, writer.results, bars.unsaved)
    code = _finish(sweep_, out_dir, swept.results)
    _say_as_written(swept.as_written, swept.results)
    return code


def _say_as_written(as_written, results) -> None:
    """The script's own clipping, beside the verdict."""
    stderr_console().print(as_written_line(as_written, results), markup=False, soft_wrap=True)


def watch(words: list[str], given: dict) -> int:
    """One run of the command with its own clipping, recorded like GradMonitor."""
    command = parse_command(words)
    values = {
        o.name: given.get(o.name) if given.get(o.name) is not None else o.default_for(WATCH) for o in for_command(WATCH)
    }
    config = _config(command, {**given, "steps": values["steps"] or 1, "seed": values["seed"]})
    out_dir = files.prepare_out_dir(absolute(values["out"]))
    options = RunOptions(
        steps=values["steps"],
        seed=values["seed"],
        divergence_factor=config.divergence_factor,
        stop_on_non_finite=bool(values["stop_on_non_finite"]),
        layer_depth=config.layer_depth,
        threads=threads_for(1),
    )
    with files.OutDirLock(out_dir):
        with run_progress() as progress:
            progress.add_task("as_written", total=values["steps"])
            run = single_run(command, None, options, out_dir)
        fingerprint = {**_fingerprint(config), "command": command.shown()}
        writer = files.ReportWriter(out_dir, fingerprint, [run.result.run], ())
        writer.add(run.result)
        writer.flush()
    watch_sweep = _Sweep(config, values["out"], None, bool(values["json"]), False, False, None)
    code = _finish(watch_sweep, out_dir, [run.result])
    _say_as_written(run.outcome.as_written if run.outcome else None, [])
    return code


def check(words: list[str], given: dict) -> int:
    """The CI gate on the command: as written, or clipped at --max-norm; exit 1 on NaN/inf or
    divergence."""
    command = parse_command(words)
    max_norm, norm_type = given["max_norm"], given["norm_type"]
    norm_types = parse_norm_types(norm_type if norm_type is not None else "2")
    if len(norm_types) != 1:
        raise UsageError(f"--norm-type {norm_type!r} gives several values; check runs one configuration", "use sweep")
    for name in ("lr", "device", "amp", "accumulate", "amp_init_scale"):
        if given.get(name) is not None:
            _refuse_contract_options({name: given[name]})
    cell = Cell(parse_max_norms([max_norm])[0], norm_types[0]) if max_norm is not None else None
    config = _config(command, {**given, "max_norm": None, "norm_type": None})
    options = dataclasses.replace(options_for(config, 1)(Cell(None)), stop_on_non_finite=True, stop_on_divergence=True)
    junit = prepare_junit(given["junit"])
    with run_progress() as progress, tempfile.TemporaryDirectory(prefix="gradclip-check-") as scratch:
        progress.add_task(cell.run if cell is not None else "as_written", total=config.steps)
        run = single_run(command, cell, options, Path(scratch))
        tail = run.log_tail() if run.result.status in (ERROR, CRASHED) else ""
    if tail:
        stderr_console().print(f"--- last lines of the script's output ---\n{tail}", markup=False, soft_wrap=True)
    results = [run.result]
    print_check(results, given["json"])
    code = exit_code(results, fail_on_nan=True, fail_on_divergence=True)
    return write_junit_report(junit, results, f"gradclip.{command.file.stem}", code)
