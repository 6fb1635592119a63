"""The three snippets of docs/monitor.md run as copied and write a monitored run; the README's
GradMonitor lines are those of the plain-loop snippet."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def snippet(name: str) -> str:
    page = (ROOT / "docs" / "monitor.md").read_text()
    return re.search(rf"```python\n(# {re.escape(name)}\n.*?)\n```", page, flags=re.S).group(1)


def test_readme_monitor_lines_are_the_tested_snippets():
    """The README shows the plain loop's monitor in a few lines: each of them is a line of the
    snippet that runs below, so the README's form is tested with it."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Inside your own training\n", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1).splitlines()
    tested = snippet("train.py").splitlines()
    assert 'with GradMonitor(model, optimizer, out="gradclip-monitor") as monitor:' in shown
    assert [line for line in shown if line.strip()] == [line for line in tested if line in shown and line.strip()]
    assert all(line in tested for line in shown)


@pytest.mark.parametrize(
    "name,steps,module",
    [("train.py", 50, None), ("train_lightning.py", 20, "lightning"), ("train_hf.py", 20, "transformers")],
)
def test_snippet_runs_as_copied(tmp_path, name, steps, module):
    if module is not None:
        pytest.importorskip(module)
    (tmp_path / name).write_text(snippet(name))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "gradclip-monitor" / "summary.csv")
    steps_csv = pd.read_csv(tmp_path / "gradclip-monitor" / "steps.csv")
    assert summary["run"].tolist() == ["monitor"] and summary["status"].tolist() == ["stable"]
    assert summary["max_norm"].tolist() == [1.0] and len(steps_csv) == steps
    assert steps_csv["loss"].notna().all() and (steps_csv["clip_coef"] <= 1).all()
