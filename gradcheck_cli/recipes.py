"""Recipes: sweep presets as TOML data.

A recipe is a TOML file (read with ``tomllib``; reading it never executes code) that names a
script and the sweep's options, under the keys the options table gives them (docs/options.md).
Options given on the command line override the recipe's. Bundled recipes live in the
repository's top-level ``recipes/`` folder; an installed wheel carries them as
``gradcheck_cli/recipes/`` with ``gradcheck_cli/sample_models/`` beside them (see
``pyproject.toml``), so a recipe's ``script = "../sample_models/x.py"`` resolves in both layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged
    import tomli as tomllib

from gradcheck_cli.config import PARSERS
from gradcheck_cli.errors import UsageError
from gradcheck_cli.options import Option, recipe_options

RECIPE_SUFFIX = ".toml"

# The options a recipe may set, by key; the two keys that are not options come first.
_OPTIONS: dict[str, Option] = {option.name: option for option in recipe_options()}
_NOT_OPTIONS = {"description": "a string", "script": "a string (a path relative to the recipe file)"}
RECIPE_KEYS: tuple[str, ...] = (*_NOT_OPTIONS, *_OPTIONS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(check):
    return lambda value: isinstance(value, str) or (isinstance(value, list) and all(check(v) for v in value))


# The TOML shapes an option takes (``Recipe.accepts``), checked before its value is parsed.
ACCEPTS = {
    "numbers": _list_of(_is_number),
    "norm_types": _list_of(lambda v: _is_number(v) or isinstance(v, str)),
    "names": _list_of(lambda v: isinstance(v, str)),
    "ints": _list_of(_is_int),
    "lrs": lambda value: _is_number(value) or _list_of(_is_number)(value),
    "number_or_none": lambda value: _is_number(value) or value == "none",
    "number": _is_number,
    "int": _is_int,
    "string": lambda value: isinstance(value, str),
    "depth": lambda value: isinstance(value, str) or _is_int(value),
    "bool": lambda value: isinstance(value, bool),
}


def bundled_recipes_dir() -> Path:
    """Where the bundled recipes are: ``gradcheck_cli/recipes`` in an installed wheel, else the
    repository's top-level ``recipes/``."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"
    if installed.is_dir():
        return installed
    return here.parent / "recipes"


def _bundled_paths() -> list[Path]:
    directory = bundled_recipes_dir()
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{RECIPE_SUFFIX}") if p.is_file())


def list_bundled_recipes() -> list[tuple[str, str, Path]]:
    """``(name, description, path)`` of every bundled recipe, sorted by name. A recipe that
    cannot be read shows why in place of its description."""
    out = []
    for path in _bundled_paths():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            description = data.get("description", "")
            if not isinstance(description, str):
                description = ""
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            description = f"(unreadable: {exc})"
        out.append((path.stem, description, path))
    return out


def _bundled_names() -> str:
    names = [p.stem for p in _bundled_paths()]
    return ", ".join(names) if names else "(none found)"


def find_recipe(value: str | os.PathLike) -> Path:
    """The recipe file for ``value``: an existing file path, else a bundled recipe's name
    (``exploding_rnn`` or ``exploding_rnn.toml``). Raises ``UsageError`` when neither exists."""
    path = Path(value)
    if path.is_file():
        return path
    if path.exists():
        raise UsageError(
            f"recipe {str(path)!r} is not a file",
            "give a recipe .toml file or a bundled recipe name (gradclip recipes lists them)",
        )
    text = str(value)
    if os.sep not in text and "/" not in text and text not in ("", ".", ".."):
        name = text if text.endswith(RECIPE_SUFFIX) else text + RECIPE_SUFFIX
        bundled = bundled_recipes_dir() / name
        if bundled.is_file():
            return bundled
    raise UsageError(
        f"recipe {text!r} does not exist: it is neither a file nor a bundled recipe",
        f"give a path to a recipe .toml file, or one of the bundled recipes: {_bundled_names()}",
    )


def _type_error(file: Path, key: str, value) -> UsageError:
    got = type(value).__name__
    if isinstance(value, list):
        got = "a list (" + ", ".join(type(v).__name__ for v in value) + ")" if value else "an empty list"
    expected = _NOT_OPTIONS[key] if key in _NOT_OPTIONS else _OPTIONS[key].recipe.words
    return UsageError(f"recipe {file}: {key!r} must be {expected}, got {got} {value!r}", f"fix {key!r} in {file}")


def load_recipe(value: str | os.PathLike, notes: list | None = None) -> dict:
    """Read and validate a recipe, given a path or a bundled recipe's name.

    Returns the values present, under the keys ``SweepConfig.from_values`` reads
    (``Option.config_key``: ``max_norms`` for ``max_norm``, ...), each parsed as the command
    line's would be: ``script`` a ``Path`` resolved relative to the recipe file, grids as
    tuples, ``layer_depth`` as written; plus ``fail_on_nan`` and ``fail_on_divergence``.
    ``description`` is checked but not returned.

    Raises ``UsageError`` naming the file and the problem when the file does not exist, is not
    valid TOML (with the line), has unknown keys (listing them and the allowed ones), or has a
    value of the wrong type or out of range.
    """
    file = find_recipe(value)
    data = _read(file)
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(
            f"recipe {file} has unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            f"allowed keys: {', '.join(RECIPE_KEYS)}",
        )
    out: dict = {}
    for key, raw in data.items():
        if key in _NOT_OPTIONS:
            if not isinstance(raw, str):
                raise _type_error(file, key, raw)
            if key == "script":
                out["script"] = _script(file, raw)
        else:
            option = _OPTIONS[key]
            out[option.config_key] = _value(file, option, raw, notes)
    return out


def _read(file: Path) -> dict:
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors save one, is not part of the TOML
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"recipe {file} is not UTF-8 text", "save the recipe as a UTF-8 TOML file") from None
    except OSError as exc:
        raise UsageError(f"cannot read recipe {file}: {exc.strerror or exc}", "check the file's permissions") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries the position: "Invalid value (at line 3, column 7)".
        raise UsageError(
            f"recipe {file} is not valid TOML: {exc}",
            "fix the TOML syntax at that line (strings need quotes, lists use [a, b])",
        ) from None


def _script(file: Path, raw: str) -> Path:
    if not raw.strip():
        raise UsageError(
            f"recipe {file}: 'script' is empty",
            f"fix 'script' in {file}: a path relative to the recipe file, e.g. script = \"model.py\"",
        )
    script = (file.resolve().parent / raw).resolve()
    if not script.is_file():
        raise UsageError(
            f"recipe {file}: script {raw!r} does not exist (looked for {script})",
            f"fix 'script' in {file}: it is a path relative to the recipe file",
        )
    return script


# The rules' grids merge a recipe's duplicates without a note (the command line notes them).
_SILENT_DUPLICATES = ("clip_value", "agc", "autoclip", "zclip")


def _value(file: Path, option: Option, raw, notes: list | None):
    """One option's TOML value checked (its shape, then its value, with the command line's
    parser) and returned as ``SweepConfig.from_values`` takes it."""
    key = option.name
    if not ACCEPTS[option.recipe.accepts](raw):
        raise _type_error(file, key, raw)
    if option.type is bool:  # fail_on_nan, fail_on_divergence: read by the command, not the config
        return raw
    try:
        value = PARSERS[option.config_key](raw, key, None if key in _SILENT_DUPLICATES else notes)
    except UsageError as err:
        raise UsageError(
            f"recipe {file}: {err.message}", f"fix {key!r} in {file}, e.g. {key} = {option.recipe.example}"
        ) from None
    # layer_depth stays as written: SweepConfig.from_values parses it as the command line's text
    return raw if key == "layer_depth" else value
