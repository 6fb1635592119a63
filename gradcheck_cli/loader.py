"""Import the user's script by path and check it against the contract.

The script is a plain Python file that defines:

=====================  ========  ==========================================================
name                   required  meaning
=====================  ========  ==========================================================
``build_model()``      yes       returns a ``torch.nn.Module``
``batches()``          yes       returns an iterable of batches; called afresh for every run
                                 and again whenever it runs out
``loss_fn(model, b)``  yes (*)   returns a scalar loss tensor
``train_step(model,    yes (*)   instead of ``loss_fn``: runs one update of the user's own
b, optimizers, clip)``           (several optimizers, alternating updates) and calls
                                 ``clip(parameters)`` where it would clip; returns the loss
``build_optimizer(m)`` no        returns a ``torch.optim.Optimizer`` (with ``train_step``
                                 also a list, tuple or dict of them); default: SGD with
                                 ``--lr``
``build_scheduler(o)`` no        returns a ``torch.optim.lr_scheduler.LRScheduler`` for the
                                 optimizer; built afresh per run, stepped after every
                                 optimizer step taken
``evaluate(model)``    no        returns a number (a held-out loss, a reward) computed at
                                 the end of every stable run; runs are ranked by it
``EVALUATE_HIGHER_     no        ``True`` when a higher ``evaluate`` is better (default:
IS_BETTER``                      lower is better)
=====================  ========  ==========================================================

(*) exactly one of ``loss_fn`` and ``train_step``.

The script is imported under a unique module name, so its ``if __name__ == "__main__":`` block
does not run, and with its own directory on ``sys.path`` during the import so that it can import
the files beside it.

Failures are typed so the CLI maps them to exit codes in one place:

* a syntax error, a missing or non-callable required name, a wrong signature, or a
  ``build_model()`` that returns something other than a module: ``UsageError`` (exit 2), naming
  the file, the line and every problem at once;
* anything the script raises while being imported or while building the model:
  ``UserCodeError`` (exit 3) carrying the traceback trimmed to the user's own frames
  (``format_user_traceback``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gradcheck_cli import user_scripts
from gradcheck_cli.errors import UsageError, UserCodeError

REQUIRED = ("build_model", "batches", "loss_fn")
OPTIONAL = ("build_optimizer", "build_scheduler", "evaluate")
HIGHER_IS_BETTER = "EVALUATE_HIGHER_IS_BETTER"
# ``train_step`` replaces ``loss_fn``: a script defines exactly one of the two.
ALTERNATIVES = {"loss_fn": "train_step"}

# How each contract function is called, for the signature check and the hint.
_CALL_ARGS = {
    "build_model": 0,
    "batches": 0,
    "loss_fn": 2,
    "build_optimizer": 1,
    "build_scheduler": 1,
    "train_step": 4,
    "evaluate": 1,
}
_EXAMPLES = {
    "build_model": "def build_model():\n    return torch.nn.Linear(4, 1)",
    "batches": "def batches():\n    return [(x, y)]  # any iterable of batches",
    "loss_fn": "def loss_fn(model, batch):\n    x, y = batch\n    return torch.nn.functional.mse_loss(model(x), y)",
    "build_optimizer": "def build_optimizer(model):\n    return torch.optim.SGD(model.parameters(), lr=0.01)",
    "build_scheduler": "def build_scheduler(optimizer):\n    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)",
    "train_step": (
        "def train_step(model, batch, optimizers, clip):  # instead of loss_fn\n"
        "    optimizers.zero_grad()\n    loss = model(batch).mean()\n    loss.backward()\n"
        "    clip(model.parameters())\n    optimizers.step()\n    return loss"
    ),
    "evaluate": "def evaluate(model):\n    return float(held_out_loss(model))  # a number",
}

_PACKAGE_DIR = Path(__file__).resolve().parent
_module_counter = itertools.count()


# --------------------------------------------------------------------------------------------
# Tracebacks trimmed to the user's code
# --------------------------------------------------------------------------------------------


def _is_library_path(filename: str) -> bool:
    return "site-packages" in filename or "dist-packages" in filename


def _library_dirs() -> list[Path]:
    """Where the standard library and torch live: their frames are not the user's."""
    import sysconfig

    dirs = []
    for key in ("stdlib", "platstdlib"):
        try:
            dirs.append(Path(sysconfig.get_paths()[key]).resolve())
        except (KeyError, OSError):
            pass
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None)
    if torch_file:
        dirs.append(Path(torch_file).resolve().parent)
    return dirs


def _is_user_frame(filename: str, user_dir: Path | None = None) -> bool:
    """A frame is the user's when it is a real file that is not gradclip itself, not the
    standard library, not torch and not an installed library (site-packages): the script, the
    modules beside it and code it imports from anywhere else (a ``model.py`` in a training
    repository). ``user_dir`` is accepted for compatibility and not needed."""
    if not filename or filename.startswith("<"):
        return False
    if _is_library_path(filename):
        return False
    try:
        path = Path(filename).resolve()
    except (OSError, RuntimeError):
        return False
    if path == _PACKAGE_DIR or _PACKAGE_DIR in path.parents:
        return False
    return not any(d in path.parents for d in _library_dirs())


def _is_internal_frame(filename: str) -> bool:
    """gradclip's own frames and the import machinery: never interesting to the user."""
    if filename.startswith("<frozen importlib") or "importlib" in Path(filename).parts:
        return True
    try:
        path = Path(filename).resolve()
    except (OSError, RuntimeError):
        return False
    return path == _PACKAGE_DIR or _PACKAGE_DIR in path.parents


def _trim_stack(stack: traceback.StackSummary, user_dir: Path) -> traceback.StackSummary:
    frames = list(stack)
    kept = [f for f in frames if _is_user_frame(f.filename, user_dir)]
    if not kept:
        kept = [f for f in frames if not _is_internal_frame(f.filename)]
    return traceback.StackSummary.from_list(kept)


def format_user_traceback(exc: BaseException, script_path: str | os.PathLike) -> str:
    """The traceback of ``exc`` as text, trimmed to the frames that matter to the user.

    Kept: every frame of the user's code, wherever it lives (the script, the modules beside
    it, a package it imports from another folder). Dropped: gradclip's own frames, the
    standard library (``importlib`` included), torch and installed libraries; the final
    ``ExceptionType: message`` line still says what the library reported. When no frame is the
    user's, every frame except gradclip's and importlib's is kept. Chained exceptions
    (``raise ... from ...``) are trimmed the same way. Ends with ``ExceptionType: message``.

    With ``GRADCLIP_DEBUG=1`` nothing is trimmed: the full traceback, gradclip's frames too.
    """
    if os.environ.get("GRADCLIP_DEBUG", "") not in ("", "0"):
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")
    user_dir = Path(script_path).resolve().parent
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    todo = [te]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        cur.stack = _trim_stack(cur.stack, user_dir)
        for nxt in (cur.__cause__, cur.__context__):
            if nxt is not None:
                todo.append(nxt)
        for sub in getattr(cur, "exceptions", None) or ():  # ExceptionGroup members
            todo.append(sub)
    return "".join(te.format()).rstrip("\n")


def describe_exception(exc: BaseException) -> str:
    """``"ExceptionType: message"`` (just the type when the message is empty)."""
    name = type(exc).__name__
    msg = str(exc)
    return f"{name}: {msg}" if msg else name


def type_name(value: Any) -> str:
    """What a value is, for error messages: ``NoneType``, ``list``, ``Tensor of shape (2, 3)``."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dim"):
        return f"{type(value).__name__} of shape {tuple(shape)}"
    return type(value).__name__


def definition_site(fn: Callable, name: str | None = None) -> str:
    """``  File "path", line N, in name``: where a user function is defined, for messages about
    what it returned (there is no exception traceback to show then)."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return ""
    return f'  File "{code.co_filename}", line {code.co_firstlineno}, in {name or code.co_name}'


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


@dataclass
class Experiment:
    """The user's script, checked: its contract functions and where it lives.

    ``build_model_fn``, ``batches_fn``, ``loss_fn``, ``build_optimizer_fn`` and
    ``build_scheduler_fn`` are the script's own callables, unwrapped (the runner calls them
    and records what they raise), except that ``batches_fn`` readies a ``DataLoader`` it returns
    for workers started by ``spawn`` (``user_scripts.prepare_loader``). The methods below wrap
    them with the checks and error types that gradclip reports.
    """

    path: Path
    build_model_fn: Callable[[], Any]
    batches_fn: Callable[[], Any]
    loss_fn: Callable[[Any, Any], Any] | None
    build_optimizer_fn: Callable[[Any], Any] | None = None
    module: ModuleType | None = field(default=None, repr=False)
    build_scheduler_fn: Callable[[Any], Any] | None = None
    # ``train_step(model, batch, optimizers, clip)`` when the script defines it instead of loss_fn
    train_step_fn: Callable[..., Any] | None = None
    evaluate_fn: Callable[[Any], Any] | None = None
    evaluate_higher_is_better: bool = False

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_optimizer(self) -> bool:
        return self.build_optimizer_fn is not None

    def format_traceback(self, exc: BaseException) -> str:
        return format_user_traceback(exc, self.path)

    def build_model(self):
        """Call the script's ``build_model()`` and check that it returned a trainable module.

        Raises ``UserCodeError`` when ``build_model`` raises (``KeyboardInterrupt`` passes
        through) and ``UsageError`` when it returns something that is not an ``nn.Module`` or a
        module without trainable parameters.
        """
        import torch

        try:
            model = self.build_model_fn()
        except (Exception, SystemExit) as exc:
            raise UserCodeError(
                f"build_model() in {self.name} raised {describe_exception(exc)}",
                "fix the error in build_model(); its traceback shows where it happened",
                user_traceback=self.format_traceback(exc),
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"build_model() in {self.name} returned {type_name(model)}, expected a torch.nn.Module",
                "end build_model() with `return model`, where model is a torch.nn.Module",
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise UsageError(
                f"build_model() in {self.name} returned a {type(model).__name__} with no trainable parameters",
                "return a model with parameters that require grad; there is nothing to clip otherwise",
            )
        return model


def _syntax_usage_error(exc: SyntaxError, script_path: Path) -> UsageError:
    filename = exc.filename or str(script_path)
    where = f"{filename}, line {exc.lineno}" if exc.lineno else filename
    text = (exc.text or "").rstrip("\n")
    detail = f"{where}: {exc.msg}"
    if text.strip():
        detail += f"\n    {text.strip()}"
    return UsageError(
        f"syntax error in {detail}",
        "fix the line above; check it with `python -m py_compile " + filename + "`",
    )


def _check_contract(module: ModuleType, path: Path) -> None:
    problems: list[str] = []
    fixes: list[str] = []
    names = list(REQUIRED + OPTIONAL)
    for name, alternative in ALTERNATIVES.items():
        if hasattr(module, alternative):
            if hasattr(module, name):
                problems.append(f"both {name} and {alternative} are defined: define one of them")
                fixes.append(f"keep {name}(model, batch) for a plain step, or {alternative} for your own update")
            names[names.index(name)] = alternative
    for name in names:
        required = name not in OPTIONAL
        if not hasattr(module, name):
            if required:
                alternative = ALTERNATIVES.get(name)
                problems.append(f"{name} is missing" + (f" (or define {alternative} instead)" if alternative else ""))
                fixes.append(_EXAMPLES[name])
            continue
        value = getattr(module, name)
        if not callable(value):
            problems.append(f"{name} is not callable (it is {type_name(value)})")
            fixes.append(_EXAMPLES[name])
            continue
        n = _CALL_ARGS[name]
        try:
            sig = inspect.signature(value)
        except (TypeError, ValueError):  # builtins and C callables: cannot tell, accept
            continue
        try:
            sig.bind(*([None] * n))
        except TypeError:
            want = {
                0: "no arguments",
                1: "one argument (model)",
                2: "two arguments (model, batch)",
                4: "four arguments (model, batch, optimizers, clip)",
            }[n]
            problems.append(f"{name}{sig} must accept {want}")
            fixes.append(_EXAMPLES[name])
    flag = getattr(module, HIGHER_IS_BETTER, False)
    if not isinstance(flag, bool):
        problems.append(f"{HIGHER_IS_BETTER} must be True or False (it is {type_name(flag)})")
        fixes.append(f"{HIGHER_IS_BETTER} = True  # evaluate() is a reward: higher is better")
    if problems:
        listing = "; ".join(problems)
        raise UsageError(
            f"{path.name} does not follow the gradclip script contract: {listing}",
            "define at module level:\n" + "\n".join(fixes),
        )


def _batches_for_workers(fn: Callable, script: Path) -> Callable:
    """The script's ``batches``, whose ``DataLoader`` is readied for spawned workers: the
    script's folder importable there, and a clear error for what pickle cannot send."""

    @functools.wraps(fn)
    def batches(*args, **kwargs):
        iterable = fn(*args, **kwargs)
        user_scripts.prepare_loader(iterable, str(script))
        return iterable

    return batches


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Import the script at ``path`` and return its checked ``Experiment``.

    The script runs under a unique module name (``gradcheck_cli.user_scripts.<stem>_<n>``), so
    its ``__main__`` block does not run and loading the same file twice gives two independent
    modules; child processes started with ``spawn`` can import that name too
    (``user_scripts``). Its directory is on ``sys.path`` only for the duration of the import.

    Raises ``UsageError`` for a missing or unreadable file, a syntax error (file, line and the
    offending text) and contract problems (all of them in one message); ``UserCodeError`` for
    anything else the script raises at import time, with its trimmed traceback.
    ``KeyboardInterrupt`` passes through.
    """
    script = Path(path)
    if not script.is_file():
        raise UsageError(f"script {str(script)!r} does not exist or is not a file", "check the path to the script")
    script = script.resolve()
    try:
        source = script.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {script}: {exc.strerror or exc}", "check the file's permissions") from None

    # Compile first: a syntax error in the script itself is a usage error with its line.
    try:
        code = compile(source, str(script), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise _syntax_usage_error(exc, script) from None
    except ValueError as exc:  # e.g. null bytes in the source
        raise UsageError(f"cannot compile {script}: {exc}", "is this a Python source file?") from None

    stem = "".join(c if c.isalnum() else "_" for c in script.stem)
    mod_name = f"{user_scripts.__name__}.{stem}_{next(_module_counter)}"
    spec = importlib.util.spec_from_file_location(mod_name, script)
    if spec is None:
        raise UsageError(f"cannot import {script}", "give a path to a .py file")
    module = importlib.util.module_from_spec(spec)

    script_dir = str(script.parent)
    sys.modules[mod_name] = module  # dataclasses, pickling and typing look modules up here
    user_scripts.register(mod_name, str(script))  # and spawned DataLoader workers find it too
    sys.path.insert(0, script_dir)
    # Nothing is written outside --out: no __pycache__ beside the user's modules either.
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        exec(code, module.__dict__)
    except SyntaxError as exc:  # a module the script imports has a syntax error
        sys.modules.pop(mod_name, None)
        raise _syntax_usage_error(exc, script) from None
    except (Exception, SystemExit) as exc:
        sys.modules.pop(mod_name, None)
        raise UserCodeError(
            f"importing {script.name} raised {describe_exception(exc)}",
            "fix the error raised while the script is imported (top-level code); its traceback shows where",
            user_traceback=format_user_traceback(exc, script),
        ) from exc
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    finally:
        sys.dont_write_bytecode = write_bytecode
        try:
            sys.path.remove(script_dir)
        except ValueError:  # the script removed it itself
            pass

    _check_contract(module, script)
    return Experiment(
        path=script,
        build_model_fn=module.build_model,
        batches_fn=_batches_for_workers(module.batches, script),
        loss_fn=getattr(module, "loss_fn", None),
        build_optimizer_fn=getattr(module, "build_optimizer", None),
        module=module,
        build_scheduler_fn=getattr(module, "build_scheduler", None),
        train_step_fn=getattr(module, "train_step", None),
        evaluate_fn=getattr(module, "evaluate", None),
        evaluate_higher_is_better=getattr(module, HIGHER_IS_BETTER, False),
    )
