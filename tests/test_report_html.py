"""report.html (self-contained, one figure per view that has data) and ``gradclip report DIR``
(re-render from files, exit codes, one monitored run, missing optional files)."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from gradcheck_cli.cli import app

SCRIPTS = Path(__file__).resolve().parent / "scripts"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(path: Path) -> list[tuple[str, dict]]:
    collector = _Collect()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector.tags


def images(tags) -> list[bytes]:
    out = []
    for tag, attrs in tags:
        if tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), src[:40]
            out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def assert_self_contained(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    tags = parse(path)
    for tag, attrs in tags:
        for key in ("src", "href", "data", "action"):
            value = attrs.get(key) or ""
            assert not re.match(r"\s*(https?:)?//", value), (tag, key, value[:60])
        assert tag not in ("script", "link", "iframe"), tag
    assert "@import" not in text and "url(" not in text


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report"
    result = invoke(
        "sweep",
        SCRIPTS / "spike_at_step.py",
        "--steps",
        12,
        "--lr",
        0.05,
        "--max-norm",
        "0.5,50,500",
        "--norm-type",
        "2,inf",
        "--refine",
        1,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    return out


def test_sweep_writes_a_self_contained_report_with_every_figure(sweep_dir):
    path = sweep_dir / "report.html"
    assert_self_contained(path)
    pngs = images(parse(path))
    # loss, norms per norm type, the status map, the control's layer heatmap, the histograms
    assert len(pngs) == 5
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    text = path.read_text()
    for section in ("Loss", "Pre-clip gradient norm", "Stability map", "Per-layer gradient norms", "Norm histograms"):
        assert f"<h2>{section}</h2>" in text
    assert "gradients of body.2.weight spike at step 6" in text  # the verdict
    assert "recommendation:" in text
    summary = pd.read_csv(sweep_dir / "summary.csv")
    for run in summary["run"]:
        assert f"<td>{run}" in text
    assert "(refined)" in text


def test_report_command_re_renders_from_the_files(sweep_dir, tmp_path):
    copy = tmp_path / "artifact"
    copy.mkdir()
    for f in sweep_dir.iterdir():
        if f.name not in ("report.html", "recommendation.json"):
            (copy / f.name).write_bytes(f.read_bytes())
    result = invoke("report", copy)
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").exists() and len(images(parse(copy / "report.html"))) == 5
    assert json.loads((copy / "recommendation.json").read_text()) == json.loads(
        (sweep_dir / "recommendation.json").read_text()
    )
    text = " ".join(result.stdout.split())
    assert "gradclip sweep" in text and "unclipped: gradients of body.2.weight spike at step 6" in text
    assert "recommendation:" in text
    as_json = invoke("report", copy, "--json")
    assert as_json.exit_code == 0
    assert [r["run"] for r in json.loads(as_json.stdout)] == list(pd.read_csv(copy / "summary.csv")["run"])


def test_report_command_exit_codes(tmp_path):
    missing = invoke("report", tmp_path / "nope")
    assert missing.exit_code == 2 and "is not a directory" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("report", empty)
    assert result.exit_code == 2 and "is not a gradclip output: it has no summary.csv" in " ".join(
        result.output.split()
    )
    assert "hint:" in result.output and "Traceback" not in result.output
    (empty / "summary.csv").write_text("a,b\n1,2\n")
    result = invoke("report", empty)
    assert result.exit_code == 2 and "is not a gradclip summary" in " ".join(result.output.split())
    (empty / "summary.csv").write_text("")
    result = invoke("report", empty)
    assert result.exit_code == 2 and "is empty" in result.output


def test_report_on_one_monitored_run_without_optional_files(sweep_dir, tmp_path):
    """A monitor writes the same files for a single run named ``monitor``; per-layer norms,
    control norms and histograms may be missing."""
    out = tmp_path / "monitor"
    out.mkdir()
    for name in ("summary.csv", "steps.csv"):
        frame = pd.read_csv(sweep_dir / name, dtype=str, keep_default_na=False)
        frame = frame[frame["run"] == "unclipped"].assign(run="monitor")
        frame.to_csv(out / name, index=False)
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert_self_contained(out / "report.html")
    # loss, the norm, the histogram; no map (nothing clipped), no heatmap (no layers.csv)
    assert len(images(parse(out / "report.html"))) == 3
    assert "monitor" in result.stdout
    rec = json.loads((out / "recommendation.json").read_text())
    # the monitored run diverged and no clipped setting was tried: what to try next
    assert rec["needs_clipping"] is True and "max_norm" not in rec and "run a sweep" in rec["advice"]


def test_report_on_a_read_only_directory_is_a_usage_error(sweep_dir, tmp_path, monkeypatch):
    from gradcheck_cli.report import files

    def refuse(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "atomic_write_bytes", refuse)
    result = invoke("report", sweep_dir)
    assert result.exit_code == 2 and "cannot write the report" in result.output


def test_report_on_a_real_monitored_loop(tmp_path):
    """The monitor's own files (one run named ``monitor``, per-layer norms, no control norms)
    render: the spike injected at step 6 is found by the report's analysis of those files."""
    import torch

    from gradcheck_cli.loader import load_experiment
    from gradcheck_cli.monitor import GradMonitor

    exp = load_experiment(SCRIPTS / "spike_at_step.py")
    torch.manual_seed(0)
    model = exp.build_model_fn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = tmp_path / "mon"
    with GradMonitor(model, optimizer, out=out) as monitor:
        for batch in list(exp.batches_fn())[:10]:
            optimizer.zero_grad()
            loss = exp.loss_fn(model, batch)
            loss.backward()
            monitor.record_loss(loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert_self_contained(out / "report.html")
    # loss, norm, the map (the loop clips at max_norm 1), the layer heatmap (the monitored run is
    # its own control), histogram
    assert len(images(parse(out / "report.html"))) == 5
    assert "monitor" in result.stdout
    # the monitor does not judge spikes; the report finds the injected one in layers.csv
    assert "<td>6</td><td>body.2.weight</td>" in (out / "report.html").read_text()  # spike step, spike param
