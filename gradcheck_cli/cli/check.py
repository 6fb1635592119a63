"""``gradclip check``: one run as a CI gate (docs/options.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from gradcheck_cli.cli._options import (
    ACCUMULATE,
    AMP,
    AMP_INIT_SCALE,
    DEVICE,
    DIVERGENCE,
    JSON,
    JUNIT,
    SEED,
    STEPS,
    resolve_config,
)
from gradcheck_cli.cli._shell import exit_code, exit_on_errors, stderr_console, stdout_console, to_stdout
from gradcheck_cli.cli.output import (
    prepare_junit,
    print_errors,
    run_progress,
    user_output_to_stderr,
    write_junit_report,
)


@exit_on_errors
def check(
    script: Path = typer.Argument(..., help="Your model script.", show_default=False),
    max_norm: float | None = typer.Option(
        None, "--max-norm", help="Clip at this max_norm; without it the run is unclipped."
    ),
    norm_type: str | None = typer.Option(
        None, "--norm-type", help="Norm type for clipping, with --max-norm: a number or inf (default 2)."
    ),
    steps: int | None = STEPS,
    seed: int | None = SEED,
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Learning rate: of the default SGD (default 0.01), or set on every param group of the script's optimizer.",
    ),
    divergence_factor: float | None = DIVERGENCE,
    device: str | None = DEVICE,
    amp: str | None = AMP,
    accumulate: int | None = ACCUMULATE,
    amp_init_scale: float | None = AMP_INIT_SCALE,
    junit: Path | None = JUNIT,
    json_out: bool = JSON,
) -> None:
    """CI gate: one training run; exit 0 when stable, 1 on NaN/inf or divergence (naming step and parameter)."""
    from gradcheck_cli import config as cfg
    from gradcheck_cli.errors import UsageError
    from gradcheck_cli.results import Cell

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
    config, _, _ = resolve_config(
        script,
        None,
        dict(
            max_norms=max_norms,
            norm_types=norm_types,
            steps=steps,
            seed=seed,
            lr=lr,
            divergence_factor=divergence_factor,
            device=device,
            amp=amp,
            accumulate=accumulate,
            amp_init_scale=amp_init_scale,
        ),
    )
    cell = Cell(max_norms[0], norm_types[0]) if max_norm is not None else Cell(None, 2.0)
    junit = prepare_junit(junit)

    from gradcheck_cli.guard import guarded
    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.sweep import run_sweep

    with guarded():
        with user_output_to_stderr(json_out):
            experiment = load_experiment(config.script)
        with run_progress() as progress, user_output_to_stderr(json_out):
            task = progress.add_task(cell.run, total=config.steps)
            results = run_sweep(
                config, experiment, cells=[cell], on_step=lambda step: progress.update(task, completed=step)
            )
    result = results[0]

    from gradcheck_cli.report.terminal import check_line, warning_lines

    # The verdict first; only then any file.
    print_errors(results)
    if json_out:
        from gradcheck_cli.report.jsonout import summary_json

        to_stdout(lambda: sys.stdout.write(summary_json(results) + "\n"))
        for line in warning_lines(results):
            stderr_console().print(line, markup=False, soft_wrap=True)
    else:
        out = stdout_console()

        def write() -> None:
            out.print(check_line(result), markup=False, soft_wrap=True)
            for line in warning_lines(results):
                out.print(line, markup=False, soft_wrap=True)

        to_stdout(write)
    code = exit_code(results, fail_on_nan=True, fail_on_divergence=True)
    raise typer.Exit(write_junit_report(junit, results, f"gradclip.{config.script.stem}", code))
