"""Recipes: sweep presets as TOML data.

A recipe is a TOML file (read with ``tomllib``; reading it never executes code) that names a
script and the sweep's options. Every key is optional except that a sweep needs a script from
somewhere (the recipe or the command line); options given on the command line override the
recipe's.

=======================  ======================================  ==================================
key                      type                                    sweep option
=======================  ======================================  ==================================
``description``          string                                  shown by ``gradclip recipes``
``script``               string: a path, relative to the recipe  the script argument
``max_norm``             list of numbers, or ``"0.1,1,10"``      ``--max-norm``
``norm_type``            list of numbers/``inf``/``"inf"``,      ``--norm-type``
                         or ``"2,inf"``
``clip_value``           list of numbers, or ``"0.1,1"``         ``--clip-value``
``agc``                  list of numbers, or ``"0.01,0.1"``      ``--agc``
``agc_exclude``          list of strings, or ``"fc,head.*"``     ``--agc-exclude``
``autoclip``             list of numbers 0-100, or ``"10,25"``   ``--autoclip``
``zclip``                list of numbers, or ``"2.5,3"``         ``--zclip``
``zclip_max_norm``       number, or ``"none"``                   ``--zclip-max-norm``
``steps``                integer                                 ``--steps``
``seed``                 integer                                 ``--seed``
``seeds``                list of integers, or ``"0,1,2"``        ``--seeds``
``lr``                   number, list of numbers, or ``"0.1,1"``  ``--lr``
``divergence_factor``    number                                  ``--divergence-factor``
``device``               string                                  ``--device``
``amp``                  ``"off"``, ``"fp16"`` or ``"bf16"``     ``--amp``
``accumulate``           integer                                 ``--accumulate``
``amp_init_scale``       number                                  ``--amp-init-scale``
``layer_depth``          ``"auto"``, ``"param"`` or integer      ``--layer-depth``
``spike_factor``         number                                  ``--spike-factor``
``refine``               integer                                 ``--refine``
``fail_on_nan``          boolean                                 ``--fail-on-nan``
``fail_on_divergence``   boolean                                 ``--fail-on-divergence``
=======================  ======================================  ==================================

Bundled recipes live in the repository's top-level ``recipes/`` folder; an installed wheel
carries them as ``gradcheck_cli/recipes/`` with the sample models beside them as
``gradcheck_cli/sample_models/`` (see ``pyproject.toml``), so a recipe's
``script = "../sample_models/x.py"`` resolves in both layouts.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged
    import tomli as tomllib

from gradcheck_cli import config as cfg
from gradcheck_cli.errors import UsageError

RECIPE_SUFFIX = ".toml"

# TOML key -> (key in the returned dict, expected type in words)
RECIPE_KEYS = {
    "description": ("description", "a string"),
    "script": ("script", "a string (a path relative to the recipe file)"),
    "max_norm": ("max_norms", 'a list of numbers or a comma-separated string, e.g. [0.1, 1, 10] or "0.1,1,10"'),
    "norm_type": ("norm_types", 'a list of numbers or "inf", or a comma-separated string, e.g. [2, "inf"] or "2,inf"'),
    "clip_value": ("clip_values", 'a list of numbers or a comma-separated string, e.g. [0.1, 1] or "0.1,1"'),
    "agc": ("agc_clip_factors", 'a list of numbers or a comma-separated string, e.g. [0.01, 0.1] or "0.01,0.1"'),
    "agc_exclude": (
        "agc_exclude",
        'a list of strings or a comma-separated string, e.g. ["fc", "head.*"] or "fc,head.*"',
    ),
    "autoclip": (
        "autoclip_percentiles",
        'a list of numbers from 0 to 100 or a comma-separated string, e.g. [10, 25] or "10,25"',
    ),
    "zclip": ("zclip_z_thresholds", 'a list of numbers or a comma-separated string, e.g. [2.5, 3] or "2.5,3"'),
    "zclip_max_norm": ("zclip_max_norm", 'a number, or "none" for no cap'),
    "steps": ("steps", "an integer"),
    "seed": ("seed", "an integer"),
    "seeds": ("seeds", 'a list of integers or a comma-separated string, e.g. [0, 1, 2] or "0,1,2"'),
    "lr": ("lr", "a number, a list of numbers or a comma-separated string, e.g. 0.01 or [0.1, 1]"),
    "divergence_factor": ("divergence_factor", "a number"),
    "device": ("device", 'a string, "cpu" or "cuda"'),
    "amp": ("amp", 'a string, "off", "fp16" or "bf16"'),
    "accumulate": ("accumulate", "an integer"),
    "amp_init_scale": ("amp_init_scale", "a number"),
    "layer_depth": ("layer_depth", 'a string ("auto" or "param") or an integer'),
    "spike_factor": ("spike_factor", "a number"),
    "refine": ("refine", "an integer"),
    "fail_on_nan": ("fail_on_nan", "a boolean (true or false)"),
    "fail_on_divergence": ("fail_on_divergence", "a boolean (true or false)"),
}


# The rules' grid keys: parser and an example for the hint.
_GRID_PARSERS = {
    "clip_value": (cfg.parse_max_norms, "clip_value = [0.1, 1]"),
    "agc": (cfg.parse_max_norms, "agc = [0.01, 0.1]"),
    "autoclip": (cfg.parse_percentiles, "autoclip = [10, 25]"),
    "zclip": (cfg.parse_max_norms, "zclip = [2.5]"),
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
    return UsageError(
        f"recipe {file}: {key!r} must be {RECIPE_KEYS[key][1]}, got {got} {value!r}",
        f"fix {key!r} in {file}",
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reraise(file: Path, key: str, err: UsageError, example: str) -> UsageError:
    return UsageError(f"recipe {file}: {err.message}", f"fix {key!r} in {file}, e.g. {example}")


def load_recipe(value: str | os.PathLike, notes: list | None = None) -> dict:
    """Read and validate a recipe, given a path or a bundled recipe's name.

    Returns the values present, under the keys ``SweepConfig.from_values`` reads: ``script``
    (a ``Path`` resolved relative to the recipe file), ``max_norms`` and ``norm_types``
    (tuples of floats), the rules' grids ``clip_values``, ``agc_clip_factors``,
    ``autoclip_percentiles``, ``zclip_z_thresholds`` (tuples of floats), ``agc_exclude`` (a
    tuple of patterns), ``zclip_max_norm`` (a float or None), ``steps``, ``seed``, ``seeds``
    and ``lr`` (tuples), ``divergence_factor``, ``device``, ``amp``, ``accumulate``,
    ``amp_init_scale``, plus ``fail_on_nan`` and ``fail_on_divergence``; ``description`` is
    checked but not returned.

    Raises ``UsageError`` naming the file and the problem when the file does not exist, is not
    valid TOML (with the line), has unknown keys (listing them and the allowed ones), or has a
    value of the wrong type or out of range.
    """
    file = find_recipe(value)
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors save one, is not part of the TOML
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"recipe {file} is not UTF-8 text", "save the recipe as a UTF-8 TOML file") from None
    except OSError as exc:
        raise UsageError(f"cannot read recipe {file}: {exc.strerror or exc}", "check the file's permissions") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries the position: "Invalid value (at line 3, column 7)".
        raise UsageError(
            f"recipe {file} is not valid TOML: {exc}",
            "fix the TOML syntax at that line (strings need quotes, lists use [a, b])",
        ) from None

    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise UsageError(
            f"recipe {file} has unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
            f"allowed keys: {', '.join(RECIPE_KEYS)}",
        )

    out: dict = {}
    for key, raw in data.items():
        field = RECIPE_KEYS[key][0]
        if key in ("description", "device", "amp"):
            if not isinstance(raw, str):
                raise _type_error(file, key, raw)
            if key == "device":
                try:
                    out[field] = cfg.check_device(raw, option="device")
                except UsageError as err:
                    raise _reraise(file, key, err, 'device = "cpu"') from None
            elif key == "amp":
                try:
                    out[field] = cfg.check_amp(raw, option="amp")
                except UsageError as err:
                    raise _reraise(file, key, err, 'amp = "fp16"') from None
        elif key in ("lr", "seeds"):
            ok = _is_number if key == "lr" else _is_int
            if not (
                isinstance(raw, str)
                or (key == "lr" and _is_number(raw))
                or (isinstance(raw, list) and all(ok(v) for v in raw))
            ):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.parse_lrs(raw, option="lr") if key == "lr" else cfg.parse_seeds(raw, option="seeds")
            except UsageError as err:
                raise _reraise(file, key, err, "lr = [0.01, 0.1]" if key == "lr" else "seeds = [0, 1, 2]") from None
        elif key == "script":
            if not isinstance(raw, str):
                raise _type_error(file, key, raw)
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
            out[field] = script
        elif key == "max_norm":
            if not (isinstance(raw, str) or (isinstance(raw, list) and all(_is_number(v) for v in raw))):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.parse_max_norms(raw, option="max_norm", notes=notes)
            except UsageError as err:
                raise _reraise(file, key, err, "max_norm = [0.1, 1, 10]") from None
        elif key in _GRID_PARSERS:
            parse, example = _GRID_PARSERS[key]
            if not (isinstance(raw, str) or (isinstance(raw, list) and all(_is_number(v) for v in raw))):
                raise _type_error(file, key, raw)
            try:
                out[field] = parse(raw, option=key)
            except UsageError as err:
                raise _reraise(file, key, err, example) from None
        elif key == "agc_exclude":
            if not (isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(v, str) for v in raw))):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.parse_names(raw, option=key)
            except UsageError as err:
                raise _reraise(file, key, err, 'agc_exclude = ["fc"]') from None
        elif key == "zclip_max_norm":
            if not (_is_number(raw) or raw == "none"):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.parse_optional_positive(raw, key)
            except UsageError as err:
                raise _reraise(file, key, err, "zclip_max_norm = 1.0") from None
        elif key == "norm_type":
            if not (
                isinstance(raw, str)
                or (isinstance(raw, list) and all(_is_number(v) or isinstance(v, str) for v in raw))
            ):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.parse_norm_types(raw, option="norm_type", notes=notes)
            except UsageError as err:
                raise _reraise(file, key, err, 'norm_type = [2, "inf"]') from None
        elif key in ("steps", "seed", "accumulate"):
            if not _is_int(raw):
                raise _type_error(file, key, raw)
            if key in ("steps", "accumulate"):
                try:
                    out[field] = cfg.check_steps(raw, option=key)
                except UsageError as err:
                    raise _reraise(file, key, err, f"{key} = {100 if key == 'steps' else 4}") from None
            else:
                try:
                    out[field] = cfg.check_seed(raw, option="seed")
                except UsageError as err:
                    raise _reraise(file, key, err, "seed = 0") from None
        elif key in ("divergence_factor", "amp_init_scale"):
            if not _is_number(raw):
                raise _type_error(file, key, raw)
            try:
                out[field] = cfg.check_positive(raw, key, allow_inf=key == "divergence_factor")
            except UsageError as err:
                raise _reraise(file, key, err, f"{key} = {10.0 if key == 'divergence_factor' else 65536.0}") from None
        elif key == "layer_depth":
            if not (isinstance(raw, str) or _is_int(raw)):
                raise _type_error(file, key, raw)
            try:
                cfg.check_layer_depth(raw, option=key)
                out[field] = raw  # parsed by SweepConfig.from_values, as the command line's text
            except UsageError as err:
                raise _reraise(file, key, err, 'layer_depth = "auto"') from None
        elif key in ("spike_factor", "refine"):
            if not (_is_int(raw) if key == "refine" else _is_number(raw)):
                raise _type_error(file, key, raw)
            try:
                check = cfg.check_refine if key == "refine" else cfg.check_spike_factor
                out[field] = check(raw, option=key)
            except UsageError as err:
                raise _reraise(file, key, err, f"{key} = {3 if key == 'refine' else 10}") from None
        else:  # fail_on_nan, fail_on_divergence
            if not isinstance(raw, bool):
                raise _type_error(file, key, raw)
            out[field] = raw
    return out
