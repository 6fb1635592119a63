"""The README's quick start is a contract: exactly two commands, and CI runs the test one."""

import json
import re
from pathlib import Path

import pytest

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
    """.ci/run has the README's test command as a line of its own (indented or not), after it
    made the fresh virtual environment that the line installs into."""
    _, test_command = quick_start_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert ci_lines.index('fresh_venv "$work/venv-latest"') < ci_lines.index(test_command)


def test_ci_runs_the_readme_main_job_verbatim():
    """.ci/run has the README's main job as a line of its own (indented or not), after it made
    the fresh virtual environment that the line installs into."""
    main_job, _ = quick_start_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert main_job in ci_lines
    assert ci_lines.index('fresh_venv "$work/venv-latest"') < ci_lines.index(main_job)


def test_bundled_recipe_named_in_quick_start_exists():
    main_job, _ = quick_start_commands()
    name = re.search(r"--recipe (\S+)", main_job).group(1)
    assert (ROOT / "recipes" / f"{name}.toml").is_file()


@pytest.mark.parametrize("page", ["README.md", "docs/contract.md"])
def test_readme_example_script_runs(tmp_path, page):
    """The contract example in the README (and its longer form in docs/contract.md) is a working
    script, as copied."""
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    text = (ROOT / page).read_text()
    example = re.search(r"```python\n(# my_model\.py\n.*?)\n```", text, flags=re.S).group(1)
    script = tmp_path / "my_model.py"
    script.write_text(example)
    result = CliRunner().invoke(app, ["check", str(script), "--steps", "5", "--max-norm", "1"])
    assert result.exit_code == 0, result.output
    assert "stable" in result.stdout


def unwrap(block: str) -> list[str]:
    """Lines printed as one and wrapped in the docs, with indented continuation lines: joined
    back with one space."""
    lines: list[str] = []
    for line in block.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def sample_blocks(text: str) -> tuple[list[str], list[str]]:
    """The first two ```text blocks of ``text``: a table as printed, and the verdict and
    recommendation lines, each one line on stdout, wrapped in the docs."""
    table, wrapped = re.findall(r"```text\n(.*?)\n```", text, flags=re.S)[:2]
    assert max(map(len, wrapped.splitlines())) <= 100, "wrap the verdict to a page's width"
    return table.splitlines(), unwrap(wrapped)


def readme_sample_blocks() -> tuple[list[str], list[str]]:
    """The table and the verdict lines of the README's "## What the sweep prints"."""
    return sample_blocks(section_of(readme(), "## What the sweep prints"))


def gradclip_stdout(args: list[str], cwd: Path) -> str:
    """gradclip's stdout in a fresh interpreter, piped as in CI (no terminal width set)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_readme_sample_output_is_what_the_bundled_recipe_prints(tmp_path):
    """The README's sample table line for line, and its wrapped verdict and recommendation word
    for word, from the README's own main command (run in a fresh interpreter, stdout piped as in
    CI); then the files agree with the table."""
    import pandas as pd

    stdout = gradclip_stdout(["sweep", "--recipe", "exploding_rnn", "--out", "gradclip-report"], tmp_path)
    table, verdict_lines = readme_sample_blocks()
    assert [line.rstrip() for line in stdout.splitlines()] == [line.rstrip() for line in table] + verdict_lines
    assert len(verdict_lines) == 2 and max(map(len, table)) <= 104

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


def documented_example(page: str, command: str) -> tuple[list[str], list[str], list[str]]:
    """(gradclip's arguments, table, verdict lines) of the example in docs/``page`` whose command,
    in backquotes, starts with ``command``: the two ```text blocks that follow it."""
    text = doc(page)
    found = re.search(rf"`({re.escape(command)}[^`]*)`", text)
    table, verdict = sample_blocks(text[found.end() :])
    return found.group(1).split()[1:], table, verdict


def test_diagnosis_spike_example_is_what_it_prints(tmp_path):
    """docs/diagnosis.md's spike example: its table line for line and its wrapped verdict word for
    word, from the command the page gives; and the control's step-6 rows of layers.csv."""
    args, table, verdict = documented_example("diagnosis.md", "gradclip sweep tests/scripts/spike_at_step.py")
    args = [str(ROOT / a) if a.endswith(".py") else a for a in args]
    stdout = gradclip_stdout([*args, "--out", str(tmp_path / "out")], tmp_path)
    assert [line.rstrip() for line in stdout.splitlines()] == [line.rstrip() for line in table] + verdict
    shown = re.search(r"```text\n(run,step,param,grad_norm\n.*?)\n```", doc("diagnosis.md"), flags=re.S).group(1)
    header, *rows = shown.splitlines()
    written = (tmp_path / "out" / "layers.csv").read_text().splitlines()
    assert written[0] == header and rows == [r for r in written if r.startswith("unclipped,6,")]


@pytest.mark.slow
def test_engine_rules_example_is_what_it_prints(tmp_path):
    """docs/engine.md's sweep of the rules (8 runs of 100 steps): table and verdict as printed."""
    text = doc("engine.md")
    command = re.search(r"```bash\n(gradclip sweep sample_models/exploding_rnn\.py.*?)\n```", text, flags=re.S)
    args = command.group(1).replace("\\\n", " ").split()[1:]
    args = [str(ROOT / a) if a.endswith(".py") else a for a in args]
    table, verdict = sample_blocks(text[command.end() :])
    stdout = gradclip_stdout([*args, "--out", str(tmp_path / "out")], tmp_path)
    assert [line.rstrip() for line in stdout.splitlines()] == [line.rstrip() for line in table] + verdict


def test_contract_gan_excerpt_is_the_bundled_script():
    """docs/contract.md's train_step excerpt is copied from sample_models/tiny_gan.py, line for line."""
    excerpt = re.search(r"```python\n# my_gan\.py.*?\n(.*?)\n```", doc("contract.md"), flags=re.S).group(1)
    script = (ROOT / "sample_models" / "tiny_gan.py").read_text()
    for block in excerpt.split("\n\n\n"):
        assert block.strip("\n") in script


def test_contract_recipe_example_sweeps(tmp_path):
    """The recipe shown in docs/contract.md is a valid recipe (its script path relative to it)."""
    from typer.testing import CliRunner

    from gradcheck_cli.cli import app

    text = re.search(r"```toml\n(.*?)\n```", section_of(doc("contract.md"), "## Recipes"), flags=re.S).group(1)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "sample_models").mkdir()
    rnn = "exploding_rnn.py"
    (tmp_path / "sample_models" / rnn).write_text((ROOT / "sample_models" / rnn).read_text())
    recipe = tmp_path / "recipes" / "mine.toml"
    recipe.write_text(text)
    args = ["sweep", "--recipe", str(recipe), "--steps", "2", "--max-norm", "1", "--norm-type", "2"]
    result = CliRunner().invoke(app, [*args, "--jobs", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "unclipped" in result.stdout and "clip_1_2" in result.stdout


def test_readme_commands_use_existing_options():
    """Every option in the README's example commands is an option of that gradclip command."""
    import typer

    from gradcheck_cli.cli import app

    commands = typer.main.get_command(app).commands
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)\n```", readme(), flags=re.S)
        for line in block.splitlines()
        if line.startswith("gradclip ")
    ]
    assert len(lines) >= 5
    for line in lines:
        words = line.split("#", 1)[0].split()[1:]
        if "--" in words:  # the user's own command follows: its options are its own
            words = words[: words.index("--")]
        options = {name for param in commands[words[0]].params for name in param.opts}
        for word in words[1:]:
            if word.startswith("--"):
                assert word in options, f"{line}: gradclip {words[0]} has no {word}"


def test_readme_is_short():
    assert len(readme().splitlines()) <= 250


def markdown_pages() -> list[Path]:
    pages = [
        ROOT / "README.md",
        ROOT / "CONTRIBUTING.md",
        ROOT / "tests" / "README.md",
        ROOT / "benchmarks" / "README.md",
    ]
    return pages + sorted((ROOT / "docs").glob("*.md"))


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_pages_resolve(page):
    """Every relative link of the README, CONTRIBUTING and docs/ names a file that exists, and a
    heading of it where the link has an anchor."""
    text = page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{page.name}: {target}"


def test_outputs_page_lists_the_columns_the_files_have():
    """docs/outputs.md's table of files names each file's columns exactly as gradclip writes them."""
    from gradcheck_cli import results

    table = {
        row[0].strip("` "): row[2]
        for row in (line.split("|")[1:-1] for line in section_of(doc("outputs.md"), "## Output files").splitlines())
        if len(row) == 3 and row[0].strip().startswith("`")
    }
    for file, columns in {
        "summary.csv": results.SUMMARY_COLUMNS,
        "steps.csv": results.STEP_COLUMNS,
        "layers.csv": results.LAYER_COLUMNS,
        "control_norms.csv": results.CONTROL_NORM_COLUMNS,
        "histograms.csv": results.HISTOGRAM_COLUMNS,
        "clip_sites.csv": results.SITE_COLUMNS,
    }.items():
        assert table[file].strip().split("`")[1] == ", ".join(columns), file
