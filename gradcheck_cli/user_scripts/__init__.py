"""The package under which users' scripts are imported: ``gradcheck_cli.user_scripts.<stem>_<n>``.

Why a package: a class defined in the script (a ``Dataset``) is pickled by its module's name.
A ``DataLoader`` worker started with the ``spawn`` method (the default on macOS and Windows)
unpickles it in a fresh interpreter, which must be able to import that name. Importing this
package there installs ``ScriptFinder``, which finds each registered name's file through the
``GRADCLIP_SCRIPT_MODULES`` environment variable (a JSON map of module name to path, set by
``loader.load_experiment`` and inherited by child processes) and runs the script there, as
Python's own ``spawn`` re-runs a script that its user started directly. In gradclip's own
process the modules are already in ``sys.modules`` and the finder is never asked.

``prepare_loader`` readies a ``DataLoader`` returned by ``batches()`` for workers started that
way. See docs/reliability.md.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import multiprocessing
import os
import sys

ENV_VAR = "GRADCLIP_SCRIPT_MODULES"


def registered() -> dict[str, str]:
    try:
        value = json.loads(os.environ.get(ENV_VAR, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def register(module_name: str, path: str) -> None:
    """Make ``module_name`` importable from ``path`` in child processes started from now on."""
    mapping = registered()
    mapping[module_name] = path
    os.environ[ENV_VAR] = json.dumps(mapping)


class _ScriptLoader(importlib.abc.SourceLoader):
    def __init__(self, path: str) -> None:
        self.path = path

    def get_filename(self, fullname: str) -> str:
        return self.path

    def get_data(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exec_module(self, module) -> None:
        script_dir = os.path.dirname(self.path)
        sys.path.insert(0, script_dir)  # the script may import the files beside it
        write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            super().exec_module(module)
        finally:
            sys.dont_write_bytecode = write_bytecode
            try:
                sys.path.remove(script_dir)
            except ValueError:
                pass


class ScriptFinder(importlib.abc.MetaPathFinder):
    """Finds ``gradcheck_cli.user_scripts.<name>`` registered in ``GRADCLIP_SCRIPT_MODULES``."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        script = registered().get(fullname)
        if script is None:
            return None
        return importlib.util.spec_from_loader(fullname, _ScriptLoader(script), origin=script)


if not any(isinstance(f, ScriptFinder) for f in sys.meta_path):
    sys.meta_path.append(ScriptFinder())


class UnpicklableForWorkers(TypeError):
    """A ``DataLoader`` that pickles what its workers need holds something pickle cannot find
    by name (a class defined inside a function, a lambda); raised in place of pickle's error,
    with the fix."""


def _start_method(loader) -> str:
    """How ``loader`` starts its workers: its ``multiprocessing_context``, else the default."""
    context = loader.multiprocessing_context
    if context is not None:
        return context.get_start_method()
    # the default without fixing it (get_start_method() would)
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def _reduces_itself(cls: type) -> bool:
    """Whether instances of ``cls`` say how they are pickled (``__reduce__``, ``__reduce_ex__``)."""
    return cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__


def _not_by_name(what: str, obj) -> str | None:
    """Why pickle cannot find ``obj`` (a class, a function or an instance) by name, if it
    cannot: only the two causes that always fail, a definition inside a function and a lambda."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    if not (isinstance(obj, type) or hasattr(obj, "__code__") or hasattr(obj, "__func__")):
        if _reduces_itself(type(obj)):
            return None
        obj = type(obj)  # an instance: its class is pickled by name
    qualname = getattr(obj, "__qualname__", "") or ""
    if "<lambda>" in qualname:
        return f"{what} is a lambda ({qualname})"
    if "<locals>" in qualname:
        return f"{what} {qualname} is defined inside a function"
    return None


def prepare_loader(iterable, script: str) -> None:
    """Ready a torch ``DataLoader`` returned by the script's ``batches()`` for workers started
    by ``spawn`` or ``forkserver``, which import what they unpickle by name.

    The script's folder goes on ``sys.path`` (at its end, and stays there): ``python script.py``
    has it there, so its workers import the modules beside it, a ``Dataset`` defined in one of
    them. Raises ``UnpicklableForWorkers`` for a ``Dataset`` class, ``collate_fn``,
    ``worker_init_fn`` or ``Dataset`` attribute that is a lambda or defined inside a function:
    pickle fails on those wherever the script runs. Anything else is left alone."""
    data = sys.modules.get("torch.utils.data")
    if data is None or not isinstance(iterable, data.DataLoader) or not iterable.num_workers:
        return
    method = _start_method(iterable)
    if method == "fork":
        return
    folder = os.path.dirname(script)
    if folder not in sys.path:
        sys.path.append(folder)
    dataset = iterable.dataset
    parts = [("the Dataset's class", dataset)]
    parts += [(name, getattr(iterable, name, None)) for name in ("collate_fn", "worker_init_fn")]
    cls = type(dataset)
    if not _reduces_itself(cls) and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None):
        # pickled attribute by attribute: the first level is where lambdas usually sit
        state = getattr(dataset, "__dict__", {})
        parts += [(f"the Dataset's attribute {k!r}", v) for k, v in state.items() if callable(v)]
    problems = [p for p in (_not_by_name(what, obj) for what, obj in parts if obj is not None) if p]
    if problems:
        raise UnpicklableForWorkers(
            f"DataLoader(multiprocessing_context={method!r}) pickles what its workers need, and pickle "
            f"finds classes and functions by name: {'; '.join(problems)}. Define them at the top level of "
            f"{os.path.basename(script)} (or of a module it imports), or use multiprocessing_context='fork' "
            "or num_workers=0"
        )
