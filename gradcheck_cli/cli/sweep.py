"""``gradclip sweep``: the grid of runs, in this process, in workers or across torchrun ranks,
written to --out after every run (docs/options.md, docs/outputs.md)."""

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
    LAYER_DEPTH,
    SEED,
    SPIKE_FACTOR,
    STEPS,
    resolve_config,
)
from gradcheck_cli.cli._shell import exit_code, exit_on_errors, stderr_console, stop_code, stop_word
from gradcheck_cli.cli.output import (
    absolute,
    prepare_junit,
    print_results,
    run_progress,
    user_output_to_stderr,
    write_derived,
    write_junit_report,
)
from gradcheck_cli.errors import ExitCode


def _fingerprint(config, threads: int | None = None) -> dict:
    """The sweep's options plus what else decides its numbers on CPU: the script's content,
    torch's version and the torch thread count the runs use (``threads``, a worker's; else this
    process's, read before the script runs)."""
    import torch

    fingerprint = config.fingerprint()
    fingerprint["torch_version"] = torch.__version__
    fingerprint["torch_threads"] = threads if threads is not None else torch.get_num_threads()
    return fingerprint


def _resume_command(argv: list[str]) -> str:
    import shlex

    args = [a for a in argv if a != "--resume"]
    return shlex.join(["gradclip", *args, "--resume"])


@exit_on_errors
def sweep(
    script: Path | None = typer.Argument(
        None,
        help="Your model script (defines build_model, batches, loss_fn; optionally build_optimizer, build_scheduler).",
        show_default=False,
    ),
    max_norm: str | None = typer.Option(
        None, "--max-norm", help="Comma-separated positive max_norm values (default 0.1,1,10)."
    ),
    norm_type: str | None = typer.Option(
        None, "--norm-type", help="Comma-separated norm types, numbers or inf (default 2,inf)."
    ),
    clip_value: str | None = typer.Option(
        None, "--clip-value", help="Also run value clipping (clip_grad_value_) at these comma-separated values."
    ),
    agc: str | None = typer.Option(
        None,
        "--agc",
        help="Also run adaptive gradient clipping (AGC) with these comma-separated clip factors, e.g. 0.01.",
    ),
    agc_exclude: str | None = typer.Option(
        None,
        "--agc-exclude",
        help="Parameters AGC leaves alone: comma-separated names, module names or globs (default none).",
    ),
    autoclip: str | None = typer.Option(
        None, "--autoclip", help="Also run AutoClip at these comma-separated percentiles (0-100), e.g. 10."
    ),
    zclip: str | None = typer.Option(
        None, "--zclip", help="Also run ZClip with these comma-separated z thresholds, e.g. 2.5."
    ),
    zclip_max_norm: str | None = typer.Option(
        None, "--zclip-max-norm", help="ZClip's cap on its threshold, max_grad_norm (default 1; none: no cap)."
    ),
    steps: int | None = STEPS,
    seed: int | None = SEED,
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        help="Comma-separated seeds: every run repeated per seed (e.g. 0,1,2); --seed N is the one-seed form.",
    ),
    lr: str | None = typer.Option(
        None,
        "--lr",
        help=(
            "Comma-separated learning rates: every run at each lr (e.g. 0.1,1,20). Without it the default SGD uses "
            "0.01 and a script's build_optimizer keeps its own lr; with it, every param group's lr is set to each value."
        ),
    ),
    divergence_factor: float | None = DIVERGENCE,
    device: str | None = DEVICE,
    amp: str | None = AMP,
    accumulate: int | None = ACCUMULATE,
    amp_init_scale: float | None = AMP_INIT_SCALE,
    out: Path = typer.Option(
        Path("gradclip-report"), "--out", help="Directory for summary.csv, steps.csv, histograms.csv."
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", help="A recipe TOML file or bundled recipe name; options given here override it."
    ),
    fail_on_nan: bool = typer.Option(False, "--fail-on-nan", help="Exit 1 if any run went NaN/inf."),
    fail_on_divergence: bool = typer.Option(False, "--fail-on-divergence", help="Exit 1 if any run diverged."),
    resume: bool = typer.Option(
        False, "--resume", help="Skip runs already finished in --out by a sweep with the same options."
    ),
    junit: Path | None = JUNIT,
    json_out: bool = JSON,
    layer_depth: str | None = LAYER_DEPTH,
    spike_factor: float | None = SPIKE_FACTOR,
    refine: int | None = typer.Option(
        None,
        "--refine",
        help="Up to this many extra max_norms per norm type (and lr), each run in every seed, bisecting the "
        "stability boundary (default 0).",
    ),
    jobs: int = typer.Option(
        1,
        "--jobs",
        help="Runs at once, each in its own worker process (default 1; 0: every run in this process, no isolation).",
    ),
    threads_per_job: int | None = typer.Option(
        None, "--threads-per-job", help="torch threads per worker (default: max(1, cores // jobs))."
    ),
    distributed: str = typer.Option(
        "cells",
        "--distributed",
        help="Under torchrun: cells (ranks share out the runs) or model (every rank runs every run on a sharded model).",
    ),
) -> None:
    """Run short training bursts unclipped and per max_norm x norm_type cell; report which clipping setting is stable.

    --clip-value, --agc, --autoclip and --zclip add cells for those rules. The default max_norm grid
    runs only when none of --max-norm, --clip-value, --agc, --autoclip, --zclip is given.

    Every run starts from identical weights, optimizer state, RNG state and batch order (per seed with
    --seeds; every cell and the control run again at each --lr). Results go to the terminal and to
    CSV files in --out, written after every finished run.
    """
    config, recipe_fail_nan, recipe_fail_div = resolve_config(
        script,
        recipe,
        dict(
            max_norms=max_norm,
            norm_types=norm_type,
            clip_values=clip_value,
            agc_clip_factors=agc,
            agc_exclude=agc_exclude,
            autoclip_percentiles=autoclip,
            zclip_z_thresholds=zclip,
            zclip_max_norm=zclip_max_norm,
            steps=steps,
            seed=seed,
            seeds=seeds,
            lr=lr,
            divergence_factor=divergence_factor,
            device=device,
            amp=amp,
            accumulate=accumulate,
            amp_init_scale=amp_init_scale,
            layer_depth=layer_depth,
            spike_factor=spike_factor,
            refine=refine,
        ),
    )
    fail_on_nan = fail_on_nan or recipe_fail_nan
    fail_on_divergence = fail_on_divergence or recipe_fail_div
    _check_jobs(jobs, threads_per_job, distributed)

    from gradcheck_cli import ranks

    group = ranks.from_environment(distributed, config.device)
    if group is None:
        code = _sweep_here(
            config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, None
        )
    else:
        with group:
            code = _sweep_here(
                config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, group
            )
    raise typer.Exit(code)


def _check_jobs(jobs: int, threads_per_job: int | None, distributed: str) -> None:
    from gradcheck_cli.errors import UsageError

    if jobs < 0:
        raise UsageError(
            f"--jobs {jobs} must be 0 or more",
            "e.g. --jobs 2 runs two at once; --jobs 0 runs every run in this process",
        )
    if threads_per_job is not None and threads_per_job < 1:
        raise UsageError(f"--threads-per-job {threads_per_job} must be at least 1", "e.g. --threads-per-job 1")
    if distributed not in ("cells", "model"):
        raise UsageError(
            f"--distributed {distributed!r} is not a mode", "use --distributed cells or --distributed model"
        )


def _sweep_here(
    config, out, resume, junit, json_out, fail_on_nan, fail_on_divergence, jobs, threads_per_job, group
) -> int:
    """The sweep in this process; under torchrun (``group``) every rank runs it, and rank 0
    alone reads and writes ``--out`` and prints."""
    import contextlib
    import dataclasses

    from gradcheck_cli.report import files

    lead = group is None or group.rank == 0
    shown_out = out
    with contextlib.ExitStack() as stack:
        if lead:
            out_dir = files.prepare_out_dir(absolute(out))
            junit = prepare_junit(junit)
            stack.enter_context(files.OutDirLock(out_dir))
        else:
            out_dir = absolute(out)
        executor = stack.enter_context(_executor(jobs, threads_per_job, group))
        # the thread count the runs use: each worker's, or this process's for --jobs 0
        fingerprint = _fingerprint(config, getattr(executor, "threads", None))
        finished = files.load_finished(out_dir, fingerprint) if resume and lead else {}
        if group is not None:
            finished = group.broadcast(finished)  # every rank skips the same runs
        if hasattr(executor, "start"):  # the workers start while the script loads here
            executor.start(
                config.script.resolve(), config if group is None else dataclasses.replace(config, device=group.device)
            )
        return _run_sweep_command(
            config,
            finished,
            fingerprint,
            out_dir,
            shown_out,
            junit,
            json_out,
            fail_on_nan,
            fail_on_divergence,
            executor,
            group,
            stack,
        )


def _executor(jobs: int, threads_per_job: int | None, group):
    """Where the runs execute: ``--jobs 0`` in this process; otherwise in supervised worker
    processes (``parallel.WorkerPool``). Under torchrun in model mode every rank runs in its
    own process (the process group cannot span workers)."""
    import contextlib

    from gradcheck_cli.sweep import InProcess

    if jobs == 0 or (group is not None and not group.cells):
        return contextlib.nullcontext(InProcess())
    from gradcheck_cli.parallel import WorkerPool

    return WorkerPool(jobs, threads_per_job)


def _run_sweep_command(
    config,
    finished,
    fingerprint,
    out_dir,
    shown_out,
    junit,
    json_out,
    fail_on_nan,
    fail_on_divergence,
    executor,
    group,
    stack,
) -> int:
    from gradcheck_cli.errors import ReportWriteError
    from gradcheck_cli.guard import guarded
    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.report import files
    from gradcheck_cli.sweep import run_sweep

    lead = group is None or group.rank == 0
    cells = config.cells()
    writer = files.ReportWriter(out_dir, fingerprint, [c.run for c in cells], finished.values()) if lead else None
    err = stderr_console()
    with guarded():
        with user_output_to_stderr(json_out):
            experiment = load_experiment(config.script)
        # refined runs come after the grid: per lr and norm type, each in every seed
        axes = len({c.lr for c in cells}) * len({c.seed for c in cells})
        most = len(cells) + config.refine * len(config.norm_types) * axes
        if finished and lead:
            of = f"{len(cells)}" if not config.refine else f"up to {most}"
            err.print(f"resuming: {len(finished)} of {of} runs already finished in {shown_out}", markup=False)

        with run_progress(enabled=lead) as progress:
            runs_task = progress.add_task("runs", total=most, completed=len(finished))
            step_tasks: dict = {}  # one steps bar per run in progress

            def on_run_start(index, total, cell):
                step_tasks[index] = progress.add_task(cell.run, total=config.steps)

            def on_run_step(index, step):
                if index in step_tasks:
                    progress.update(step_tasks[index], completed=step)

            unsaved: list = []

            def on_run_done(index, total, result):
                if writer is not None:
                    try:
                        writer.add(result)
                    except ReportWriteError:
                        unsaved.append(result)
                        raise
                if index in step_tasks:
                    progress.remove_task(step_tasks.pop(index))
                progress.advance(runs_task)

            try:
                with user_output_to_stderr(json_out):
                    run = run_sweep if group is None else group.run_sweep
                    results = run(
                        config,
                        experiment,
                        skip=finished,
                        on_run_start=on_run_start,
                        on_run_done=on_run_done,
                        on_run_step=on_run_step,
                        executor=executor,
                    )
                    if config.refine:
                        from gradcheck_cli.refine import run_refinement

                        results = run_refinement(
                            config,
                            experiment,
                            results,
                            skip=finished,
                            on_run_start=lambda cell: on_run_start(0, 0, cell),
                            on_run_done=lambda result: on_run_done(0, 0, result),
                            on_step=lambda step: on_run_step(0, step),
                        )
                        progress.update(runs_task, total=len(results), completed=len(results))
                if writer is None:
                    return exit_code(results, fail_on_nan, fail_on_divergence)
                writer.flush()
            except KeyboardInterrupt as exc:
                stack.close()  # stop the workers before saying anything
                progress.stop()
                err.print(
                    f"{stop_word(exc)}: {len(writer.results)} of {len(cells)} runs finished and saved in {shown_out}/",
                    markup=False,
                )
                # one line, whatever the terminal's width: it is copied from CI logs
                err.print(f"resume with: {_resume_command(sys.argv[1:])}", markup=False, soft_wrap=True)
                return stop_code(exc)
            except ReportWriteError as failure:
                progress.stop()
                saved = writer.results
                print_results(_in_cell_order(cells, saved + unsaved), json_out)
                err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
                err.print(
                    f"stopped after {len(saved) + len(unsaved)} of {len(cells)} runs, {len(saved)} of them saved in {shown_out}/",
                    markup=False,
                    soft_wrap=True,
                )
                err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
                return int(ExitCode.REPORTS_NOT_WRITTEN)

    try:
        recommendation = write_derived(out_dir, results, title=config.script.name)
    except OSError as exc:
        from gradcheck_cli.report.files import _write_error

        failure = _write_error(Path(out_dir) / "report.html", exc)
        print_results(results, json_out)
        err.print(f"error: {failure.message}", style="bold red", markup=False, soft_wrap=True)
        err.print(f"hint: {failure.hint}", markup=False, soft_wrap=True)
        return int(ExitCode.REPORTS_NOT_WRITTEN)
    print_results(results, json_out, recommendation)
    code = exit_code(results, fail_on_nan, fail_on_divergence)
    code = write_junit_report(junit, results, f"gradclip.{config.script.stem}", code)
    err.print(
        f"reports written to {shown_out}/ (report.html, summary.csv, steps.csv, layers.csv, recommendation.json, ...)",
        markup=False,
    )
    return code


def _in_cell_order(cells: list, results: list) -> list:
    """The grid's runs in cell order, then the others (refined runs) in the order they ran."""
    by_run = {r.run: r for r in results}
    grid = {c.run for c in cells}
    return [by_run[c.run] for c in cells if c.run in by_run] + [r for r in results if r.run not in grid]
