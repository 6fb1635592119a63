"""The user's own command, as typed after ``--``: ``python SCRIPT ARGS`` or ``python -m MODULE
ARGS``, checked before any run starts. See docs/your-command.md."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gradcheck_cli.errors import UsageError

ACCEPTED = "python SCRIPT [ARGS...] or python -m MODULE [ARGS...]"
# Launchers that start several processes of their own: gradclip cannot place its recorder in
# each of them and stop them all at a step, so they are refused with the reason.
_LAUNCHERS = {
    "torchrun": "torchrun starts one process per rank",
    "accelerate": "accelerate launch starts its own processes",
    "deepspeed": "the deepspeed launcher starts its own processes",
    "mpirun": "mpirun starts its own processes",
}
# Interpreter options that change how the code runs but not what it is: accepted and passed on.
_PASSED_FLAGS = {"-u", "-B", "-O", "-OO", "-X", "-W"}


@dataclass(frozen=True)
class UserCommand:
    """``python SCRIPT ARGS`` (``module`` None) or ``python -m MODULE ARGS`` (``script`` None).

    ``script`` is absolute; ``cwd`` is where the command runs (the directory gradclip was
    started in, as for ``python``)."""

    script: Path | None
    module: str | None
    args: tuple[str, ...]
    cwd: Path
    python_flags: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        """``sys.argv`` as ``python`` would set it: the script's path as typed, or the module's
        file for ``-m`` (the worker fills it in once the module is found)."""
        first = str(self.script) if self.script is not None else "-m"
        return [first, *self.args]

    @property
    def file(self) -> Path:
        """The file that runs: the script, or the module's source file."""
        if self.script is not None:
            return self.script
        spec = _find_module(self.module, self.cwd)
        origin = getattr(spec, "origin", None)
        if spec is not None and spec.submodule_search_locations and origin and origin.endswith("__init__.py"):
            main = Path(origin).with_name("__main__.py")
            return main if main.exists() else Path(origin)
        return Path(origin) if origin else self.cwd

    @property
    def name(self) -> str:
        return self.script.name if self.script is not None else self.module

    def shown(self) -> str:
        target = str(self.script) if self.script is not None else f"-m {self.module}"
        return " ".join(["python", *self.python_flags, target, *self.args])


def _is_python(word: str) -> bool:
    base = os.path.basename(word)
    if base.startswith("python") and all(c.isdigit() or c in ".tw" for c in base[len("python") :]):
        return True
    return os.path.realpath(word) == os.path.realpath(sys.executable)


def looks_like_command(words: list[str] | None) -> bool:
    """Whether positional words are a training command (several words, or a python interpreter
    or a launcher) rather than one model script path."""
    if not words:
        return False
    return len(words) > 1 or _is_python(words[0]) or os.path.basename(words[0]) in _LAUNCHERS


def parse_command(words: list[str], cwd: Path | None = None) -> UserCommand:
    """The command after ``--``, or a ``UsageError`` (exit 2) naming what is wrong and which
    forms are accepted."""
    cwd = Path.cwd() if cwd is None else cwd
    if not words:
        raise UsageError("no command after --", f"give the command you train with: {ACCEPTED}")
    first = words[0]
    launcher = os.path.basename(first)
    if launcher in _LAUNCHERS:
        raise UsageError(
            f"{' '.join(words[:2])} is not supported: {_LAUNCHERS[launcher]}",
            f"run one process as {ACCEPTED}; for several ranks see docs/distributed.md",
        )
    if first.endswith(".py"):
        raise UsageError(f"the command starts with a script, not python: {first}", f"write it as python {first} ...")
    if not _is_python(first):
        raise UsageError(f"unsupported command {first!r}", f"gradclip runs commands of the form {ACCEPTED}")
    rest = list(words[1:])
    flags: list[str] = []
    while rest and rest[0].startswith("-") and rest[0] != "-m":
        flag = rest.pop(0)
        if flag in ("-c", "-"):
            raise UsageError(f"python {flag} is not supported", f"gradclip runs {ACCEPTED}")
        if flag[:2] not in _PASSED_FLAGS and flag not in _PASSED_FLAGS:
            raise UsageError(f"unsupported python option {flag}", f"gradclip runs {ACCEPTED}")
        flags.append(flag)
        if flag in ("-X", "-W") and rest:
            flags.append(rest.pop(0))
    if not rest:
        raise UsageError("python with no script", f"give the command you train with: {ACCEPTED}")
    if rest[0] == "-m":
        if len(rest) < 2:
            raise UsageError("python -m with no module name", f"write it as {ACCEPTED}")
        module = rest[1]
        if _find_module(module, cwd) is None:
            raise UsageError(
                f"no module named {module!r} (looked in {cwd} and on sys.path)",
                "run gradclip from the directory you run python -m from",
            )
        return UserCommand(None, module, tuple(rest[2:]), cwd, tuple(flags))
    script = Path(rest[0])
    path = script if script.is_absolute() else cwd / script
    if not path.is_file():
        raise UsageError(f"script not found: {path}", "check the path; it is relative to the current directory")
    return UserCommand(path.resolve(), None, tuple(rest[1:]), cwd, tuple(flags))


def _find_module(module: str, cwd: Path):
    """The spec of ``module`` as ``python -m`` would find it from ``cwd`` (``cwd`` first on
    the path), or None."""
    sys.path.insert(0, str(cwd))
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    finally:
        sys.path.pop(0)


def python_executable() -> str:
    """The interpreter that runs the command: this one (gradclip's own environment)."""
    return sys.executable or shutil.which("python3") or "python3"
