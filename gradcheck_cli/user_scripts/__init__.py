"""The package under which users' scripts are imported: ``gradcheck_cli.user_scripts.<stem>_<n>``.

Why a package: a class defined in the script (a ``Dataset``) is pickled by its module's name.
A ``DataLoader`` worker started with the ``spawn`` method (the default on macOS and Windows)
unpickles it in a fresh interpreter, which must be able to import that name. Importing this
package there installs ``ScriptFinder``, which finds each registered name's file through the
``GRADCLIP_SCRIPT_MODULES`` environment variable (a JSON map of module name to path, set by
``loader.load_experiment`` and inherited by child processes) and runs the script there, as
Python's own ``spawn`` re-runs a script that its user started directly. In gradclip's own
process the modules are already in ``sys.modules`` and the finder is never asked.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
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
