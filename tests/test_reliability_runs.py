"""Ordinary script habits and bad input inside runs: global torch state, degenerate training,
state carried between runs, tracebacks of the user's own code, contract violations, devices,
recipes, --lr, optimizers, exit codes. In-process (CliRunner and the sweep API): fast."""

from __future__ import annotations

import json
import os
import py_compile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from gradcheck_cli.cli import app
from gradcheck_cli.config import SweepConfig
from gradcheck_cli.errors import ExitCode
from gradcheck_cli.loader import load_experiment
from gradcheck_cli.report import files
from gradcheck_cli.sweep import run_sweep

SCRIPTS = Path(__file__).resolve().parent / "scripts"
runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def write_script(directory: Path, body: str, name: str = "model.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture(autouse=True)
def torch_defaults():
    """These tests let scripts change global torch state; put it back whatever happens."""
    state = (
        torch.get_default_dtype(),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        os.getcwd(),
    )
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(state[0])
    torch.set_grad_enabled(state[1])
    torch.use_deterministic_algorithms(state[2])
    torch.set_num_threads(state[3])
    os.chdir(state[4])


LINEAR = """
import torch
def build_model():
    return torch.nn.Linear(2, 1)
def batches():
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0], [-1.5, 0.25], [2.0, 1.0]])
    return [(x, x @ torch.tensor([[0.5], [-1.0]]))] * 3  # the same batch: an untrained model's loss is constant
"""


# --- global torch state does not leak from one run into the next ----------------------------------


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_every_run_starts_from_the_same_global_torch_state(tmp_path, seeds):
    script = write_script(
        tmp_path,
        LINEAR
        + """
seen = []
def loss_fn(model, batch):
    seen.append((torch.get_default_dtype(), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                 torch.get_num_threads(), torch.is_anomaly_enabled(), torch.get_float32_matmul_precision()))
    x, y = batch
    loss = torch.nn.functional.mse_loss(model(x), y)
    # what a careless script does, every step
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(3)
    torch.set_anomaly_enabled(True)
    torch.set_float32_matmul_precision("medium")
    return loss
""",
    )
    experiment = load_experiment(script)
    config = SweepConfig(script=script, steps=2, max_norms=(0.5, 1.0), norm_types=(2.0,), seeds=seeds)
    results = run_sweep(config, experiment, share=False)  # every run trains: each records its first step
    n = 3 * len(seeds)
    assert [r.status for r in results] == ["stable"] * n
    firsts = experiment.module.seen[::2]  # each run's first step
    assert firsts == [(torch.float32, True, False, 1, False, "highest")] * n
    # and so the numbers: within a seed every run's step 1 loss is identical, with no state warning
    for seed in seeds:
        assert len({r.steps[0].loss for r in results if (r.seed or 0) == seed}) == 1
    assert all(not r.warnings for r in results)


# --- degenerate training is reported, not called healthy ------------------------------------------


@pytest.mark.parametrize(
    "loss_body, optimizer, expected",
    [
        ("return (model(x) * 0).sum() + 1.0", "", ["zero_gradients", "constant_loss"]),
        (
            "return torch.nn.functional.mse_loss(model(x), y)",
            "def build_optimizer(model):\n    return torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)",
            ["foreign_parameters", "no_model_parameters", "constant_loss"],
        ),
        ("return torch.nn.functional.mse_loss(model(x), y)", "", []),
    ],
    ids=["loss ignores the parameters", "optimizer of another model", "healthy"],
)
def test_degenerate_training_gets_a_warnings_column_a_note_and_check_says_so(tmp_path, loss_body, optimizer, expected):
    script = write_script(
        tmp_path,
        LINEAR
        + f"""
def loss_fn(model, batch):
    x, y = batch
    {loss_body}
{optimizer}
""",
    )
    out = tmp_path / "out"
    result = invoke("sweep", script, "--steps", 3, "--max-norm", 1, "--norm-type", 2, "--out", out)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / files.SUMMARY_FILE, keep_default_na=False)
    assert list(summary["warnings"]) == [";".join(expected)] * 2
    note_lines = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(note_lines) == 2 * len(expected)
    check = invoke("check", script, "--steps", 3)
    assert check.exit_code == 0
    assert check.stdout.startswith("PASS unclipped")
    if expected:
        assert "warning: unclipped: " in check.stdout
    else:
        assert "warning" not in check.stdout


def test_state_carried_between_runs_is_named(tmp_path):
    script = write_script(
        tmp_path,
        LINEAR
        + """
calls = [0]
def loss_fn(model, batch):
    calls[0] += 1
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y) + 0.001 * calls[0]
""",
    )
    out = tmp_path / "out"
    # every run trained (--no-share): a run built from the control's steps carries nothing over
    args = ("--steps", 2, "--max-norm", "1,2", "--norm-type", 2, "--out", out, "--no-share")
    result = invoke("sweep", script, *args)
    assert result.exit_code == 0, result.output
    summary = pd.read_csv(out / files.SUMMARY_FILE, keep_default_na=False)
    assert list(summary["warnings"]) == ["", "step1_loss_differs:unclipped", "step1_loss_differs:unclipped"]
    assert "warning: clip_1_2: step 1's loss differs from that of run unclipped" in result.stdout


# --- tracebacks keep every frame of the user's code -------------------------------------------------


def test_user_code_imported_from_another_folder_keeps_its_frames(tmp_path):
    lib = tmp_path / "training_repo"
    lib.mkdir()
    (lib / "helpers.py").write_text("def compute(model, x):\n    raise ValueError('bad shapes in helpers')\n")
    script_dir = tmp_path / "scripts"
    script_dir.mkdir()
    script = write_script(
        script_dir,
        f"""
import sys
sys.path.insert(0, {str(lib)!r})
import torch, helpers
def build_model():
    return torch.nn.Linear(1, 1)
def batches():
    return [torch.ones(1, 1)]
def loss_fn(model, batch):
    return helpers.compute(model, batch)
""",
    )
    result = invoke("check", script, "--steps", 1)
    assert result.exit_code == 3
    assert f'File "{lib / "helpers.py"}", line 2, in compute' in result.stderr
    assert f'File "{script}", line 10, in loss_fn' in result.stderr
    assert "run_setup.py" not in result.stderr
    debug = invoke("check", script, "--steps", 1, env={"GRADCLIP_DEBUG": "1"})
    # the full traceback, from gradclip's call into the user's code (run_setup.call_user)
    assert "gradcheck_cli" in debug.stderr and "run_setup.py" in debug.stderr


# --- contract violations show their explanation in the error panel ------------------------------


@pytest.mark.parametrize(
    "body, explanation",
    [
        (
            "def batches():\n    return []\ndef loss_fn(model, b):\n    return model(b).sum()",
            "batches() yielded no batches",
        ),
        (
            "def batches():\n    return 3\ndef loss_fn(model, b):\n    return model(b).sum()",
            "batches() must return an iterable of batches, got int",
        ),
        (
            "def batches():\n    return [torch.ones(1, 1)]\ndef loss_fn(model, b):\n    return 1.5",
            "loss_fn must return a scalar tensor, got float",
        ),
        (
            "def batches():\n    return [torch.ones(1, 1)]\ndef loss_fn(model, b):\n    return model(b).sum().detach()",
            "does not require grad",
        ),
        (
            "def batches():\n    return [torch.ones(1, 1)]\ndef loss_fn(model, b):\n    return model(b).sum()\n"
            "def build_optimizer(model):\n    return torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 1)",
            "build_optimizer(model) must return a torch.optim.Optimizer, got StepLR",
        ),
    ],
    ids=["empty batches", "not iterable", "python float loss", "detached loss", "scheduler"],
)
def test_contract_violations_show_their_explanation_in_the_terminal(tmp_path, body, explanation):
    script = write_script(
        tmp_path, "import torch\ndef build_model():\n    return torch.nn.Linear(1, 1)\n" + body + "\n"
    )
    result = invoke("check", script, "--steps", 2)
    assert result.exit_code == 3
    block = result.stderr.split("--- unclipped: error ---", 1)[1]
    assert f'File "{script}"' in block and explanation in block


# --- clear messages for the rest -----------------------------------------------------------------------


def test_recipe_with_a_utf8_bom(tmp_path):
    (tmp_path / "r.toml").write_bytes(
        b"\xef\xbb\xbf"
        + f'script = "{SCRIPTS / "stable_linear.py"}"\nsteps = 2\nmax_norm = [1]\nnorm_type = [2]\n'.encode()
    )
    result = invoke("sweep", "--recipe", tmp_path / "r.toml", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "out" / files.SUMMARY_FILE)) == 2


def test_recipe_key_with_a_bad_value_names_the_key(tmp_path):
    (tmp_path / "r.toml").write_text(f'script = "{SCRIPTS / "stable_linear.py"}"\nseed = -1\n')
    result = invoke("sweep", "--recipe", tmp_path / "r.toml", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"recipe {tmp_path / 'r.toml'}: seed -1 must be a whole number" in result.stderr
    assert "--seed" not in result.stderr


def test_pyc_as_the_script_is_a_usage_error(tmp_path):
    source = write_script(tmp_path, LINEAR + "def loss_fn(m, b):\n    return m(b[0]).sum()\n")
    compiled = Path(py_compile.compile(str(source), cfile=str(tmp_path / "model.pyc")))
    result = invoke("check", compiled)
    assert result.exit_code == 2
    assert "is compiled bytecode, not Python source" in result.stderr and "the .py file" in result.stderr


def test_check_norm_type_without_max_norm_is_refused():
    result = invoke("check", SCRIPTS / "stable_linear.py", "--norm-type", "inf")
    assert result.exit_code == 2
    assert "--norm-type inf only applies to a clipped run" in result.stderr and "--max-norm" in result.stderr


def test_build_optimizer_returning_different_types_gets_the_documented_message(tmp_path):
    script = write_script(
        tmp_path,
        LINEAR
        + """
calls = [0]
def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)
def build_optimizer(model):
    calls[0] += 1
    if calls[0] == 1:
        return torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.Adam(model.parameters(), lr=0.1)
""",
    )
    result = invoke("check", script, "--steps", 2)
    assert result.exit_code == 3
    assert "(Adam, first SGD); it must build the same optimizer on every call" in result.stderr
    assert "KeyError" not in result.output


def test_an_lr_too_large_for_the_default_sgd_names_lr(tmp_path):
    result = invoke("check", SCRIPTS / "stable_linear.py", "--lr", "1e39")
    assert result.exit_code == 2
    assert "--lr 1e+39 is too large for the default SGD: the model has torch.float32 parameters" in result.stderr


def test_a_model_on_the_meta_device_is_a_usage_error(tmp_path):
    script = write_script(
        tmp_path,
        """
import torch
def build_model():
    with torch.device("meta"):
        return torch.nn.Linear(2, 1)
def batches():
    return [torch.ones(1, 2)]
def loss_fn(model, b):
    return model(b).sum()
""",
    )
    result = invoke("check", script)
    assert result.exit_code == 2, result.output
    assert "returned a model on the meta device" in result.stderr and "to_empty" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "cuda:", "gpu", "cuda:0:1"])
def test_malformed_device_strings_exit_2_with_the_accepted_forms(tmp_path, device):
    result = invoke("check", SCRIPTS / "stable_linear.py", "--device", device)
    assert result.exit_code == 2
    assert f"--device {device!r} is not supported" in result.stderr
    assert "cpu, cuda and cuda:N" in result.stderr


# --- names, duplicates and the resume fingerprint through the command line -----------------------


def test_neighbouring_max_norms_are_separate_runs_and_duplicates_merge_with_a_note(tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "sweep",
        SCRIPTS / "stable_linear.py",
        "--steps",
        2,
        "--max-norm",
        "1,1.0000001,1.0",
        "--norm-type",
        "2,2.0000001",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "note: --max-norm 1.0 equals 1, already in the grid: one run for both" in result.stderr
    summary = pd.read_csv(out / files.SUMMARY_FILE, dtype={"norm_type": str})
    assert list(summary["run"]) == [
        "unclipped",
        "clip_1_2",
        "clip_1_2.0000001",
        "clip_1.0000001_2",
        "clip_1.0000001_2.0000001",
    ]
    assert list(summary["max_norm"][1:]) == [1.0, 1.0, 1.0000001, 1.0000001]
    assert list(summary["norm_type"]) == ["2", "2", "2.0000001", "2", "2.0000001"]


def test_resume_under_another_thread_count_or_changed_script_is_refused(tmp_path):
    script = tmp_path / "s.py"
    script.write_text((SCRIPTS / "stable_linear.py").read_text())
    (tmp_path / "data_helper.py").write_text((SCRIPTS / "data_helper.py").read_text())
    out = tmp_path / "out"
    # --jobs 0: the runs use this process's thread count
    args = ("sweep", script, "--steps", 2, "--max-norm", 1, "--norm-type", 2, "--out", out, "--jobs", 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert invoke(*args).exit_code == 0
        manifest = json.loads((out / files.MANIFEST_FILE).read_text())["fingerprint"]
        assert manifest["torch_version"] == torch.__version__ and manifest["torch_threads"] == 1
        torch.set_num_threads(2)
        refused = invoke(*args, "--resume")
        assert refused.exit_code == 2
        assert "torch thread count 1 (saved) vs 2 (now)" in refused.stderr
        torch.set_num_threads(1)
        script.write_text(script.read_text() + "\n# edited\n")
        refused = invoke(*args, "--resume")
        assert refused.exit_code == 2
        assert f"the script {script} has changed since the interrupted sweep" in refused.stderr
    finally:
        torch.set_num_threads(threads)


def test_with_workers_the_fingerprint_records_the_workers_thread_count(tmp_path):
    out = tmp_path / "out"
    args = ("sweep", SCRIPTS / "stable_linear.py", "--steps", 2, "--max-norm", 1, "--norm-type", 2, "--out", out)
    assert invoke(*args, "--threads-per-job", 1).exit_code == 0
    assert json.loads((out / files.MANIFEST_FILE).read_text())["fingerprint"]["torch_threads"] == 1
    refused = invoke(*args, "--threads-per-job", 2, "--resume")
    assert refused.exit_code == 2 and "torch thread count 1 (saved) vs 2 (now)" in refused.stderr


def test_help_documents_the_exit_codes():
    result = invoke("--help")
    text = " ".join(result.output.split())
    for fragment in ("5 reports could not be written", "129/130/143", "141 stdout closed early"):
        assert fragment in text
    assert {int(c) for c in ExitCode} == {0, 1, 2, 3, 4, 5, 129, 130, 141, 143}


def test_a_train_step_script_gets_the_same_global_torch_state_every_run(tmp_path):
    """The same restore for scripts that run their own update (``train_step``)."""
    script = write_script(
        tmp_path,
        LINEAR
        + """
seen = []
def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)
def train_step(model, batch, optimizers, clip):
    seen.append((torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()))
    x, y = batch
    optimizers.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    clip(model.parameters())
    optimizers.step()
    torch.set_default_dtype(torch.float64)  # careless, every step
    torch.set_num_threads(3)
    return loss
""",
    )
    experiment = load_experiment(script)
    config = SweepConfig(script=script, steps=2, max_norms=(0.5, 1.0), norm_types=(2.0,))
    results = run_sweep(config, experiment)
    assert [r.status for r in results] == ["stable"] * 3
    assert experiment.module.seen[::2] == [(torch.float32, True, 1)] * 3
    assert len({r.steps[0].loss for r in results}) == 1
