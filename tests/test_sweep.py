import math
from pathlib import Path

import pytest
import torch

from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import UsageError, UserCodeError
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.results import DIVERGED, ERROR, NON_FINITE, SOURCE_FORWARD, STABLE, Cell, RunResult
from gradcheck_cli.sweep import run_sweep

SCRIPTS = Path(__file__).parent / "scripts"


def config(name: str, **kw) -> SweepConfig:
    kw.setdefault("steps", 12)
    return SweepConfig(script=SCRIPTS / f"{name}.py", **kw)


def sweep(name: str, **kw):
    cfg = config(name, **{k: v for k, v in kw.items() if k not in ("skip", "on_run_start", "on_run_done")})
    callbacks = {k: v for k, v in kw.items() if k in ("skip", "on_run_start", "on_run_done")}
    return run_sweep(cfg, load_experiment(cfg.script), **callbacks)


def records(result: RunResult) -> list[tuple]:
    """Step records as tuples in which NaN compares equal to NaN (as its repr)."""
    return [
        tuple(
            repr(v) if isinstance(v, float) and math.isnan(v) else v for v in (s.step, s.loss, s.grad_norm, s.clip_coef)
        )
        for s in result.steps
    ]


def test_one_result_per_cell_control_first():
    cfg = config("stable_linear")
    results = run_sweep(cfg, load_experiment(cfg.script))
    assert [r.cell for r in results] == cfg.cells()
    assert results[0].run == "unclipped"
    assert all(r.status == STABLE for r in results)
    assert all(s.clip_coef == 1.0 for s in results[0].steps)  # the control run never clips


@pytest.mark.parametrize("name", ["stable_linear", "with_optimizer", "nan_backward"])
def test_every_run_starts_identical(name):
    results = sweep(name)
    first = {(r.steps[0].loss) for r in results}
    assert len(first) == 1
    # runs with the same norm type see the same first gradient norm too
    l2 = {r.steps[0].grad_norm for r in results if r.cell.norm_type == 2.0}
    assert len(l2) == 1


def test_two_sweeps_are_bit_identical():
    a = sweep("with_optimizer")  # Adam state, dropout, batches shuffled with three RNGs
    b = sweep("with_optimizer")
    assert [records(r) for r in a] == [records(r) for r in b]
    assert [r.status for r in a] == [r.status for r in b]


def test_a_run_does_not_depend_on_the_runs_before_it():
    full = {r.run: r for r in sweep("with_optimizer")}
    alone = sweep("with_optimizer", max_norms=(1.0,), norm_types=(math.inf,))
    assert [r.run for r in alone] == ["unclipped", "clip_1_inf"]
    for r in alone:
        assert records(r) == records(full[r.run])


def test_seed_changes_the_numbers():
    a = sweep("with_optimizer", seeds=(0,), max_norms=(1.0,), norm_types=(2.0,))
    b = sweep("with_optimizer", seeds=(1,), max_norms=(1.0,), norm_types=(2.0,))
    assert records(a[0]) != records(b[0])


def test_statuses_of_the_divergent_script():
    results = {r.run: r for r in sweep("diverge", lrs=(1.5,))}
    assert results["unclipped"].status == DIVERGED and results["unclipped"].diverged_step == 4  # 64 > 4 + 10 x 4
    assert results["clip_10_2"].status == DIVERGED and results["clip_10_inf"].status == DIVERGED
    for run in ("clip_0.1_2", "clip_0.1_inf", "clip_1_2", "clip_1_inf"):
        assert results[run].status == STABLE and len(results[run].steps) == 12


def test_nan_loss_hits_every_run_at_the_same_step():
    results = sweep("nan_forward")
    assert {(r.status, r.nan_step, r.nan_source) for r in results} == {(NON_FINITE, 5, SOURCE_FORWARD)}


def test_callbacks_report_progress_in_order():
    events = []
    results = sweep(
        "stable_linear",
        steps=3,
        max_norms=(1.0,),
        on_run_start=lambda i, n, cell: events.append(("start", i, n, cell.run)),
        on_run_done=lambda i, n, result: events.append(("done", i, n, result.run, result.status)),
    )
    assert events == [
        ("start", 1, 3, "unclipped"),
        ("done", 1, 3, "unclipped", STABLE),
        ("start", 2, 3, "clip_1_2"),
        ("done", 2, 3, "clip_1_2", STABLE),
        ("start", 3, 3, "clip_1_inf"),
        ("done", 3, 3, "clip_1_inf", STABLE),
    ]
    assert len(results) == 3


def test_skip_returns_finished_runs_in_place_without_rerunning():
    full = sweep("stable_linear", steps=5)
    done_control = RunResult(Cell(None, 2.0), STABLE)
    done_clip = RunResult(Cell(0.1, 2.0), STABLE)
    started = []
    results = sweep(
        "stable_linear",
        steps=5,
        skip={"unclipped": done_control, "clip_0.1_2": done_clip},
        on_run_start=lambda i, n, cell: started.append((i, cell.run)),
    )
    assert results[0] is done_control and results[1] is done_clip
    assert [r.run for r in results] == [r.run for r in full]
    assert started == [(i, r.run) for i, r in enumerate(full, start=1)][2:]
    # the remaining runs are exactly what a full sweep gives
    for got, want in zip(results[2:], full[2:]):
        assert records(got) == records(want)


def test_all_runs_skipped_does_not_build_the_model():
    cfg = config("raises_in_build_model", max_norms=(1.0,), norm_types=(2.0,))
    skip = {c.run: RunResult(c, STABLE) for c in cfg.cells()}
    results = run_sweep(cfg, load_experiment(cfg.script), skip=skip)
    assert results == [skip["unclipped"], skip["clip_1_2"]]


def test_build_model_failure_raises_before_any_run():
    started = []
    with pytest.raises(UserCodeError) as info:
        sweep("raises_in_build_model", on_run_start=lambda *a: started.append(a))
    assert "raises_in_build_model.py" in info.value.user_traceback
    assert started == []


def test_build_model_returning_no_module_is_usage_error():
    with pytest.raises(UsageError, match="returned NoneType"):
        sweep("bad_model")


def test_build_optimizer_failure_marks_every_run_as_error():
    done = []
    results = sweep("bad_optimizer", on_run_done=lambda i, n, r: done.append(i))
    assert len(results) == len(done) == 7
    assert {r.status for r in results} == {ERROR}
    assert {r.error for r in results} == {"ValueError: Invalid learning rate: -1.0"}
    assert all("bad_optimizer.py" in r.error_traceback for r in results)


def test_error_in_one_run_does_not_stop_the_sweep():
    results = sweep("raises_in_loss", max_norms=(1.0,))
    assert [r.status for r in results] == [ERROR, ERROR, ERROR]
    assert all(len(r.steps) == 3 for r in results)


def test_keyboard_interrupt_from_user_code_propagates():
    done = []
    with pytest.raises(KeyboardInterrupt):
        sweep("interrupt", on_run_done=lambda *a: done.append(a))
    assert done == []


def test_keyboard_interrupt_from_a_callback_propagates():
    def stop(index, total, result):
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep("stable_linear", steps=2, on_run_done=stop)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_unavailable_cuda_is_usage_error():
    with pytest.raises(UsageError, match="CUDA is not available"):
        sweep("stable_linear", device="cuda")


def test_optimizer_starting_state_is_the_same_for_every_run(tmp_path):
    # build_optimizer is called afresh per run and is stateful here (its lr grows per call);
    # every run is loaded with the state of the first optimizer built, so all runs match
    script = tmp_path / "stateful_optimizer.py"
    script.write_text(
        "import torch\n"
        "CALLS = []\n"
        "def build_model():\n    return torch.nn.Linear(2, 1)\n"
        "def build_optimizer(model):\n"
        "    CALLS.append(1)\n"
        "    return torch.optim.SGD(model.parameters(), lr=0.01 * len(CALLS), momentum=0.9)\n"
        "def batches():\n    return [torch.ones(3, 2)]\n"
        "def loss_fn(model, batch):\n    return model(batch).pow(2).mean()\n"
    )
    # never clips and never judged diverged: every run must give the same losses
    cfg = SweepConfig(script=script, steps=6, max_norms=(100.0,), divergence_factor=1e6)
    exp = load_experiment(script)
    results = run_sweep(cfg, exp, share=False)  # every run trained: each builds its optimizer
    assert len(exp.module.CALLS) == 1 + len(results)  # once up front, then once per run
    losses = [[s.loss for s in r.steps] for r in results]
    assert all(x == losses[0] for x in losses) and len(losses[0]) == 6
