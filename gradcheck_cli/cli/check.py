"""``gradclip check``: one run as a CI gate (docs/options.md)."""

from __future__ import annotations

from pathlib import Path

from gradcheck_cli import config as cfg
from gradcheck_cli import sweep as sweeping
from gradcheck_cli.cli._options import config_values, resolve_config
from gradcheck_cli.cli._shell import exit_code
from gradcheck_cli.cli.output import prepare_junit, print_check, run_progress, user_output_to_stderr, write_junit_report
from gradcheck_cli.errors import UsageError
from gradcheck_cli.guard import guarded
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import Cell


def run(script: Path, given: dict) -> int:
    """One training run, unclipped or clipped at --max-norm; its verdict first, then any file."""
    max_norm, norm_type, json_out = given["max_norm"], given["norm_type"], given["json"]
    norm_types = cfg.parse_norm_types(norm_type if norm_type is not None else "2")
    if len(norm_types) != 1:
        raise UsageError(
            f"--norm-type {norm_type!r} gives several values; check runs one configuration",
            "use gradclip sweep for a grid",
        )
    if norm_type is not None and max_norm is None:
        raise UsageError(
            f"--norm-type {norm_type} only applies to a clipped run, and check runs unclipped without --max-norm",
            f"add --max-norm, e.g. gradclip check {script} --max-norm 1 --norm-type {norm_type}",
        )
    max_norms = cfg.parse_max_norms([max_norm]) if max_norm is not None else cfg.DEFAULT_MAX_NORMS
    values = {**config_values(given), "max_norms": max_norms, "norm_types": norm_types}
    config, _, _ = resolve_config(script, None, values)
    cell = Cell(max_norms[0], norm_types[0]) if max_norm is not None else Cell(None, 2.0)
    junit = prepare_junit(given["junit"])

    with guarded():
        with user_output_to_stderr(json_out):
            experiment = load_experiment(config.script)
        with run_progress() as progress, user_output_to_stderr(json_out):
            task = progress.add_task(cell.run, total=config.steps)
            results = sweeping.run_sweep(
                config, experiment, cells=[cell], on_step=lambda step: progress.update(task, completed=step)
            )
    print_check(results, json_out)
    code = exit_code(results, fail_on_nan=True, fail_on_divergence=True)
    return write_junit_report(junit, results, f"gradclip.{config.script.stem}", code)
