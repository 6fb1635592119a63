"""The README's quick start is a contract: exactly two commands, and CI runs the test one."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme() -> str:
    return (ROOT / "README.md").read_text()


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def section_of(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level (lines in
    code blocks are not headings)."""
    level = len(heading.split(" ", 1)[0])
    lines = text.split("\n")
    start = lines.index(heading) + 1
    fenced = False
    for end in range(start, len(lines)):
        line = lines[end]
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def quick_start_commands() -> list[str]:
    section = section_of(readme(), "## Quick start")
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quick_start_has_exactly_two_single_line_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    main_job, tests = commands
    assert "gradclip sweep" in main_job
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_ci_runs_the_readme_main_job_verbatim():
    main_job, _ = quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert main_job in ci_lines


def test_bundled_recipe_named_in_quick_start_exists():
    main_job, _ = quick_start_commands()
    name = re.search(r"--recipe (\S+)", main_job).group(1)
    assert (ROOT / "recipes" / f"{name}.toml").is_file()


def test_readme_example_script_runs(tmp_path):
    """The contract example in the README is a working script, as copied."""
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    example = re.search(r"```python\n(# my_model\.py\n.*?)\n```", readme(), flags=re.S).group(1)
    script = tmp_path / "my_model.py"
    script.write_text(example)
    result = CliRunner().invoke(app, ["check", str(script), "--steps", "5", "--max-norm", "1"])
    assert result.exit_code == 0, result.output
    assert "stable" in result.stdout


def readme_sample_blocks() -> tuple[list[str], list[str]]:
    """The two ```text blocks of "## What the sweep prints": the table as printed, and the verdict
    and recommendation lines, each one line on stdout, wrapped in the README with indented
    continuation lines (joined back here with one space)."""
    section = section_of(readme(), "## What the sweep prints")
    table, wrapped = re.findall(r"```text\n(.*?)\n```", section, flags=re.S)[:2]
    lines: list[str] = []
    for line in wrapped.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return table.splitlines(), lines


def test_readme_sample_output_is_what_the_bundled_recipe_prints(tmp_path):
    """The README's sample table line for line, and its wrapped verdict and recommendation word
    for word, from the README's own main command (run in a fresh interpreter, stdout piped as in
    CI); then the files agree with the table."""
    import os
    import subprocess
    import sys

    import pandas as pd

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "sweep", "--recipe", "exploding_rnn", "--out", "gradclip-report"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    table, verdict_lines = readme_sample_blocks()
    got = [line.rstrip() for line in proc.stdout.splitlines()]
    assert got == [line.rstrip() for line in table] + verdict_lines
    assert len(verdict_lines) == 2
    # readable: the table as wide as it prints, the verdict wrapped to a page's width
    wrapped = re.findall(r"```text\n(.*?)\n```", section_of(readme(), "## What the sweep prints"), flags=re.S)[1]
    assert max(map(len, table)) <= 104 and max(map(len, wrapped.splitlines())) <= 100

    # The rows of the README table, read back as words: all seven runs, their statuses and onsets.
    rows = {line.split()[0]: line.split() for line in table if line.startswith(("unclipped", "clip_"))}
    assert list(rows) == [
        "unclipped",
        "clip_0.1_2",
        "clip_0.1_inf",
        "clip_1_2",
        "clip_1_inf",
        "clip_10_2",
        "clip_10_inf",
    ]
    summary = pd.read_csv(tmp_path / "gradclip-report" / "summary.csv")
    assert list(summary["run"]) == list(rows)
    assert list(summary["status"]) == [words[3] for words in rows.values()]
    assert list(summary["status"]) == ["diverged", "stable", "stable", "stable", "stable", "diverged", "diverged"]
    onsets = [None if words[4] == "—" else int(words[4]) for words in rows.values()]
    assert (
        [None if pd.isna(s) else int(s) for s in summary["diverged_step"]]
        == onsets
        == [2, None, None, None, None, 4, 2]
    )
    # The chosen setting: the README's verdict names the lowest smoothed loss (mean of the last 10
    # losses) among stable clipped runs, and the recommendation line and file agree with it.
    verdict, recommendation = verdict_lines
    assert verdict.startswith("best: max_norm=0.1 norm_type=inf (stable, smoothed loss 0.0879)")
    stable = summary[(summary["status"] == "stable") & summary["max_norm"].notna()]
    best = stable.loc[stable["smoothed_loss"].idxmin()]
    assert (best["run"], best["max_norm"], str(best["norm_type"])) == ("clip_0.1_inf", 0.1, "inf")
    assert f"{best['smoothed_loss']:.4g}" == "0.0879"
    assert recommendation.startswith("recommendation: clip with max_norm=0.1 norm_type=inf (clip_0.1_inf)")
    rec = json.loads((tmp_path / "gradclip-report" / "recommendation.json").read_text())
    assert (rec["needs_clipping"], rec["max_norm"], rec["norm_type"], rec["run"]) == (True, 0.1, "inf", "clip_0.1_inf")
    # the prose under the blocks says the same
    assert "The unclipped run diverges at step 2; `max_norm=0.1` with the inf norm trains best" in readme()


def test_readme_pandas_example_runs_on_a_sweeps_files(tmp_path):
    """The plotting example in docs/outputs.md works after the README's install (matplotlib is
    a dependency), in a fresh interpreter, on the files of a real sweep."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    example = re.search(r"```python\n(import pandas as pd\n.*?)\n```", doc("outputs.md"), flags=re.S).group(1)
    out = tmp_path / "gradclip-report"
    script = ROOT / "sample_models" / "nan_at_step.py"
    result = CliRunner().invoke(app, ["sweep", str(script), "--steps", "3", "--max-norm", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    code = example + "\nimport matplotlib.pyplot as plt\nplt.savefig('plot.png')\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MPLBACKEND": "Agg"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
