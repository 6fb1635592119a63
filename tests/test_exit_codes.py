"""The command line's exit-code logic without running a sweep: which statuses and which
``--fail-on-*`` flags give which documented exit code, and how typed errors map to codes.

Fast on purpose: mutation testing (see tests/README.md) runs these for every mutant of
``cli._shell.exit_code`` and ``cli._shell.exit_on_errors``.
"""

from __future__ import annotations

import itertools

import pytest
import typer

from gradcheck_cli.cli._shell import exit_code as _exit_code
from gradcheck_cli.cli._shell import exit_on_errors as _exit_on_errors
from gradcheck_cli.cli.sweep import _resume_command
from gradcheck_cli.errors import ExitCode, GradclipError, UsageError, UserCodeError
from gradcheck_cli.results import DIVERGED, ERROR, NON_FINITE, STABLE, Cell, RunResult


def results(*statuses: str) -> list[RunResult]:
    return [RunResult(Cell(None if i == 0 else float(i)), s) for i, s in enumerate(statuses)]


def test_documented_exit_code_values():
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "INSTABILITY": 1,
        "USAGE": 2,
        "USER_CODE": 3,
        "INTERNAL": 4,
        "REPORTS_NOT_WRITTEN": 5,
        "HANGUP": 129,
        "INTERRUPTED": 130,
        "BROKEN_PIPE": 141,
        "TERMINATED": 143,
    }


# Every combination of the two flags over each kind of sweep, written out by hand from the
# README: "--fail-on-nan: exit 1 when a run went NaN/inf", "--fail-on-divergence: exit 1 when a
# run diverged", 3 when the script raised (wins over everything).
EXPECTED = {
    # statuses in the sweep           (no flags, nan only, divergence only, both)
    (STABLE,): (0, 0, 0, 0),
    (STABLE, NON_FINITE): (0, 1, 0, 1),
    (STABLE, DIVERGED): (0, 0, 1, 1),
    (NON_FINITE, DIVERGED): (0, 1, 1, 1),
    (STABLE, ERROR): (3, 3, 3, 3),
    (NON_FINITE, DIVERGED, ERROR): (3, 3, 3, 3),
    (ERROR,): (3, 3, 3, 3),
    (): (0, 0, 0, 0),
}


@pytest.mark.parametrize("statuses", list(EXPECTED), ids=lambda s: "+".join(s) or "empty")
def test_fail_flags_act_independently(statuses):
    flags = [(False, False), (True, False), (False, True), (True, True)]
    got = tuple(_exit_code(results(*statuses), nan, div) for nan, div in flags)
    assert got == EXPECTED[statuses]


def test_exit_code_is_a_plain_int():
    code = _exit_code(results(STABLE, NON_FINITE), True, False)
    assert type(code) is int and code == 1


def _wrapped(exc: BaseException):
    @_exit_on_errors
    def command():
        raise exc

    return command


@pytest.mark.parametrize(
    "exc, code",
    [
        (UsageError("bad --steps", "use 1 or more"), 2),
        (UserCodeError("your script raised", "fix it", user_traceback="Traceback: user.py line 3"), 3),
        (GradclipError("unclassified"), 4),
        (KeyboardInterrupt(), 130),
        (ZeroDivisionError("a bug"), 4),
    ],
)
def test_errors_map_to_documented_codes(exc, code, capsys, monkeypatch):
    monkeypatch.delenv("GRADCLIP_DEBUG", raising=False)
    with pytest.raises(typer.Exit) as info:
        _wrapped(exc)()
    assert info.value.exit_code == code
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" not in err
    if isinstance(exc, GradclipError):
        assert f"error: {exc.message}" in err
        assert (f"hint: {exc.hint}" in err) == bool(exc.hint)
    if isinstance(exc, UserCodeError):
        assert "Traceback: user.py line 3" in err
    if isinstance(exc, ZeroDivisionError):
        assert "internal error: ZeroDivisionError: a bug" in err and "GRADCLIP_DEBUG=1" in err
    if isinstance(exc, KeyboardInterrupt):
        assert "interrupted" in err


def test_debug_prints_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("GRADCLIP_DEBUG", "1")
    for exc in (UsageError("bad"), ZeroDivisionError("a bug")):
        with pytest.raises(typer.Exit):
            _wrapped(exc)()
        assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("GRADCLIP_DEBUG", "0")  # "0" means off
    with pytest.raises(typer.Exit):
        _wrapped(UsageError("bad"))()
    assert "Traceback" not in capsys.readouterr().err


def test_typer_exits_pass_through_unchanged():
    for exit_code in (0, 1, 3):
        with pytest.raises(typer.Exit) as info:
            _wrapped(typer.Exit(exit_code))()
        assert info.value.exit_code == exit_code


def test_successful_command_returns_its_value():
    @_exit_on_errors
    def command(a, b=2):
        return a + b

    assert command(1, b=5) == 6
    assert command.__name__ == "command"  # functools.wraps keeps the name typer shows


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sweep", "m.py", "--out", "r"], "gradclip sweep m.py --out r --resume"),
        (["sweep", "my model.py", "--resume", "--out", "r"], "gradclip sweep 'my model.py' --out r --resume"),
    ],
)
def test_resume_command_is_quoted_with_one_resume(argv, expected):
    assert _resume_command(argv) == expected


def test_every_combination_of_statuses_against_a_plain_rule():
    """The rule read straight from the README, checked over every subset of statuses."""
    all_statuses = (STABLE, NON_FINITE, DIVERGED, ERROR)
    for n in range(len(all_statuses) + 1):
        for subset in itertools.combinations(all_statuses, n):
            for nan, div in itertools.product((False, True), repeat=2):
                if ERROR in subset:
                    want = 3
                elif (nan and NON_FINITE in subset) or (div and DIVERGED in subset):
                    want = 1
                else:
                    want = 0
                assert _exit_code(results(*subset), nan, div) == want, (subset, nan, div)


def _recipe(tmp_path, text: str):
    (tmp_path / "model.py").write_text("# a script\n")
    path = tmp_path / "r.toml"
    path.write_text('script = "model.py"\n' + text)
    return str(path)


@pytest.mark.parametrize(
    "text, flags",
    [
        ("", (False, False)),
        ("fail_on_nan = true\n", (True, False)),
        ("fail_on_divergence = true\n", (False, True)),
        ("fail_on_nan = true\nfail_on_divergence = true\n", (True, True)),
        ("fail_on_nan = false\nfail_on_divergence = false\n", (False, False)),
    ],
)
def test_recipe_fail_flags_reach_the_exit_code_independently(tmp_path, text, flags):
    from gradcheck_cli.cli._options import resolve_config as _resolve_config

    config, fail_on_nan, fail_on_divergence = _resolve_config(None, _recipe(tmp_path, text), {"steps": 3, "lr": None})
    assert (fail_on_nan, fail_on_divergence) == flags
    assert config.script == tmp_path / "model.py" and config.steps == 3 and config.lrs is None


def test_command_line_values_override_the_recipe_and_none_means_not_given(tmp_path):
    from pathlib import Path

    from gradcheck_cli.cli._options import resolve_config as _resolve_config

    recipe = _recipe(tmp_path, "steps = 7\nseed = 3\n")
    config, _, _ = _resolve_config(None, recipe, {"steps": 2, "seed": None})
    assert (config.steps, config.seeds) == (2, (3,))
    other = tmp_path / "other.py"
    other.write_text("# another script\n")
    config, nan, div = _resolve_config(Path(other), None, {})
    assert config.script == other and config.steps == 100 and (nan, div) == (False, False)


@pytest.mark.parametrize(
    "recipe_text, overrides, seeds",
    [
        ("seed = 3\n", {}, (3,)),
        ("seeds = [1, 2]\n", {}, (1, 2)),
        ("seed = 3\n", {"seed": 5}, (5,)),  # --seed replaces the recipe's seed ...
        ("seeds = [1, 2]\n", {"seed": 5}, (5,)),  # ... and its seeds (no "disagree" error)
        ("seed = 3\n", {"seeds": "4,6"}, (4, 6)),  # --seeds replaces the recipe's seed
        ("seeds = [1, 2]\n", {"seeds": "7"}, (7,)),
        ("seed = 3\nseeds = [3, 4]\n", {"seeds": "8,9"}, (8, 9)),
    ],
)
def test_seed_options_on_the_command_line_replace_the_recipes_seeds(tmp_path, recipe_text, overrides, seeds):
    from gradcheck_cli.cli._options import resolve_config as _resolve_config

    config, _, _ = _resolve_config(None, _recipe(tmp_path, recipe_text), {"seed": None, "seeds": None, **overrides})
    assert config.seeds == seeds
