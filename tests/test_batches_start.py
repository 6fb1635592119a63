"""batches() whose iterable fails as it starts (a DataLoader whose workers cannot start, a
dataset that cannot open its shard) is the script's error, exit 3, never gradclip's."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def check(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "model.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "check", str(script), "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


HEAD = """
import torch
def build_model():
    return torch.nn.Linear(2, 1)
def loss_fn(model, batch):
    return model(batch).pow(2).mean()
"""


def test_an_iterable_that_fails_to_start_is_the_scripts_error(tmp_path):
    proc = check(
        tmp_path,
        HEAD
        + """
class Shards:
    def __iter__(self):
        raise RuntimeError("cannot open shard 0")
def batches():
    return Shards()
""",
    )
    assert proc.returncode == 3, proc.stderr
    assert "RuntimeError: cannot open shard 0" in proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr


def test_a_non_iterable_is_named(tmp_path):
    proc = check(tmp_path, HEAD + "\ndef batches():\n    return 42\n")
    assert proc.returncode == 3, proc.stderr
    assert "batches() must return an iterable of batches, got int" in proc.stdout + proc.stderr
