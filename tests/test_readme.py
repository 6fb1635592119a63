"""The README's quick start is a contract: exactly two commands, and CI runs the test one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
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
