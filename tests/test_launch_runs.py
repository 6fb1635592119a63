"""One run of an unmodified training script under a clipping setting, against the same script
run by itself with that setting: the same per-step losses and pre-clip norms. The scripts in
tests/scripts/as_is/ are written as their authors would (argparse, data built at import, their
own seeds, Lightning, the HF Trainer, a hand-written update, AMP with accumulation) and print
their own per-step numbers, which are the reference."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradcheck_cli.launch.command import parse_command
from gradcheck_cli.launch.runs import RunOptions, run_cell
from gradcheck_cli.results import Cell

AS_IS = Path(__file__).resolve().parent / "scripts" / "as_is"
LINE = re.compile(r"^step (\d+) loss (\S+) norm (\S+)", re.M)


def reference(script: str, *args: str, cwd: Path) -> list[tuple[int, float, float]]:
    """The script run by itself: its own printed (step, loss, pre-clip norm) lines."""
    proc = subprocess.run(
        [sys.executable, str(AS_IS / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [(int(s), float(loss), float(norm)) for s, loss, norm in LINE.findall(proc.stdout)]


def launched(script: str, *args: str, cell: Cell, steps: int, cwd: Path, **options):
    command = parse_command(["python", str(AS_IS / script), *args], cwd=cwd)
    return run_cell(command, cell, RunOptions(steps=steps, **options), cwd / "logs" / f"{cell.run}.log")


def assert_same_steps(run, ref, steps: int, rel: float) -> None:
    result = run.result
    assert [s.step for s in result.steps] == list(range(1, steps + 1)), run.log_tail()
    got = [(s.loss, s.grad_norm) for s in result.steps]
    want = [(loss, norm) for _, loss, norm in ref[:steps]]
    assert got[0][0] == pytest.approx(want[0][0], rel=1e-7) and got[0][1] == pytest.approx(want[0][1], rel=1e-6)
    for (loss, norm), (ref_loss, ref_norm) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=rel) and norm == pytest.approx(ref_norm, rel=rel)


def test_a_script_that_never_clips_gets_the_cells_clip_before_each_step(tmp_path):
    ref = reference("plain_loop.py", "--steps", "8", "--clip-norm", "0.5", cwd=tmp_path)
    run = launched("plain_loop.py", "--steps", "40", cell=Cell(0.5, 2.0), steps=8, cwd=tmp_path)
    assert run.result.status == "stable" and run.outcome.ended == "steps"
    assert run.outcome.as_written is None  # the script itself never clips
    assert_same_steps(run, ref, 8, rel=1e-5)
    assert all(s.clip_coef < 1 for s in run.result.steps)
    unclipped = launched("plain_loop.py", "--steps", "8", cell=Cell(None), steps=8, cwd=tmp_path)
    assert_same_steps(unclipped, reference("plain_loop.py", "--steps", "8", cwd=tmp_path), 8, rel=1e-6)
    assert all(s.clip_coef == 1 for s in unclipped.result.steps)


def test_a_hand_written_update_steps_at_each_clip_call(tmp_path):
    """pytorch/examples' word language model: no optimizer; each clip call is a step."""
    for cell, clip in ((Cell(0.05, 2.0), "0.05"), (Cell(None), "1e9")):
        ref = reference("word_lm.py", "--clip", clip, "--epochs", "1", cwd=tmp_path)
        run = launched("word_lm.py", "--epochs", "1", cell=cell, steps=10, cwd=tmp_path)
        assert run.result.status == "stable", run.log_tail()
        assert run.outcome.as_written == ("norm", 0.25, 2.0)  # the script's own --clip default
        assert_same_steps(run, ref, 10, rel=1e-4)


def test_a_lightning_trainer_with_gradient_clip_val(tmp_path):
    ref = reference("lightning_fit.py", "--max-steps", "6", "--clip", "0.05", cwd=tmp_path)
    run = launched("lightning_fit.py", "--max-steps", "20", cell=Cell(0.05, 2.0), steps=6, cwd=tmp_path)
    assert run.result.status == "stable", run.log_tail()
    assert run.outcome.as_written == ("norm", 0.5, 2.0)
    assert_same_steps(run, ref, 6, rel=1e-5)


def test_an_hf_trainer_with_max_grad_norm(tmp_path):
    ref = reference("hf_trainer.py", "--max-steps", "6", "--max-grad-norm", "0.1", cwd=tmp_path)
    run = launched("hf_trainer.py", "--max-steps", "6", cell=Cell(0.1, 2.0), steps=6, cwd=tmp_path)
    assert run.result.status == "stable", run.log_tail()
    assert run.outcome.as_written is not None and run.outcome.as_written[1] == 0.3
    assert_same_steps(run, ref, 6, rel=1e-5)


def test_amp_with_accumulation_records_the_unscaled_norm_and_the_summed_loss(tmp_path):
    ref = reference("amp_accumulate.py", "--steps", "8", "--max-norm", "0.2", cwd=tmp_path)
    run = launched("amp_accumulate.py", "--steps", "30", cell=Cell(0.2, 2.0), steps=8, cwd=tmp_path)
    assert run.result.status == "stable", run.log_tail()
    assert_same_steps(run, ref, 8, rel=1e-4)
    assert run.result.warnings == ()


def test_a_clip_before_unscale_is_named_with_its_step(tmp_path):
    run = launched("amp_accumulate.py", "--no-unscale", cell=Cell(None), steps=3, cwd=tmp_path)
    assert run.result.warnings == ("clip_on_scaled_gradients:1",)
    # the recorded norms are those of the scaled gradients the script clipped (x1024)
    ref = reference("amp_accumulate.py", "--steps", "3", "--max-norm", "1e9", cwd=tmp_path)
    assert run.result.steps[0].grad_norm == pytest.approx(ref[0][2] * 1024, rel=1e-4)


def test_the_run_stops_after_its_steps_and_the_script_keeps_its_own_seed(tmp_path):
    a = launched("plain_loop.py", "--steps", "100", cell=Cell(None), steps=3, cwd=tmp_path, seed=1)
    b = launched("plain_loop.py", "--steps", "100", cell=Cell(None), steps=3, cwd=tmp_path, seed=2)
    assert len(a.result.steps) == 3 and a.seconds < 60
    assert [s.loss for s in a.result.steps] == [s.loss for s in b.result.steps]  # it seeds itself
    assert "step 4 " not in a.log.read_text()
    assert math.isfinite(a.result.steps[0].grad_norm)
