"""A sweep's validated configuration, and the checks shared by the command line and recipes.

Every check that can fail on user input lives here and raises ``UsageError`` naming the value
and the fix, so the CLI and the recipe loader reject bad input with the same words. The options
themselves (names, defaults, help) are listed once, in ``options.py`` (docs/options.md).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from gradcheck_cli.errors import UsageError
from gradcheck_cli.options import CONFIG_OPTIONS, default
from gradcheck_cli.results import MODE_AGC, MODE_AUTOCLIP, MODE_VALUE, MODE_ZCLIP, Cell, format_float

DEFAULT_MAX_NORMS = default("max_norm")
DEFAULT_NORM_TYPES = default("norm_type")
DEFAULT_LR = 0.01  # the default SGD's learning rate when no lr is given
# Kept in step with gradcheck_cli.precision (not imported: it imports torch).
AMP_MODES = ("off", "fp16", "bf16")
DEFAULT_AMP_INIT_SCALE = default("amp_init_scale")
# ZClip's cap on the applied threshold: the reference implementation's max_grad_norm.
DEFAULT_ZCLIP_MAX_NORM = default("zclip_max_norm")
# The grid options: when none of them is given, the default max_norm grid runs.
GRID_KEYS = ("max_norms", "clip_values", "agc_clip_factors", "autoclip_percentiles", "zclip_z_thresholds")
LAYER_DEPTH_AUTO = "auto"  # layers.AUTO (not imported: layers imports torch)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that decides a sweep's numbers. Two sweeps with equal configs give equal
    numbers on CPU, which is what ``--resume`` relies on (see ``fingerprint``). The defaults
    are the options table's."""

    script: Path
    max_norms: tuple[float, ...] = DEFAULT_MAX_NORMS
    norm_types: tuple[float, ...] = DEFAULT_NORM_TYPES
    clip_values: tuple[float, ...] = default("clip_value")
    agc_clip_factors: tuple[float, ...] = default("agc")
    autoclip_percentiles: tuple[float, ...] = default("autoclip")
    zclip_z_thresholds: tuple[float, ...] = default("zclip")
    # parameter-name patterns AGC leaves alone (agc_excluded)
    agc_exclude: tuple[str, ...] = default("agc_exclude")
    zclip_max_norm: float | None = DEFAULT_ZCLIP_MAX_NORM  # None: no cap
    steps: int = default("steps")
    seeds: tuple[int, ...] = (default("seed"),)
    # None: no lr given; the default SGD uses DEFAULT_LR and a script's own build_optimizer
    # keeps its lr. Given (even one value), it is an axis: every run at each lr, overriding
    # the lr of every param group of the script's optimizer too.
    lrs: tuple[float, ...] | None = default("lr")
    divergence_factor: float = default("divergence_factor")  # inf turns the divergence check off
    device: str = default("device")
    amp: str = default("amp")
    accumulate: int = default("accumulate")
    amp_init_scale: float = DEFAULT_AMP_INIT_SCALE
    # "auto", None (per parameter) or a module depth (layers.py)
    layer_depth: int | str | None = default("layer_depth")
    # a layer's norm spikes above this x its running median (analysis.find_spike)
    spike_factor: float = default("spike_factor")
    refine: int = default("refine")  # extra bisection runs per norm type (refine.py)

    @classmethod
    def from_values(cls, values: dict, notes: list | None = None) -> SweepConfig:
        """A validated config from raw values (a recipe's, overridden by the command line's),
        under the options' keys (``Option.config_key``); missing keys, and keys given as
        ``None``, take the defaults. Raises ``UsageError`` naming the bad value. Duplicates
        merged in the grid are described in ``notes`` (see ``parse_max_norms``).
        The default max_norm grid runs only when no grid option (``GRID_KEYS``) is given at
        all: ``--agc 0.01`` alone sweeps the control run and AGC, not the max_norm grid too."""
        if "script" not in values:
            raise UsageError(
                "no script given",
                "pass the path of your model script, e.g. gradclip sweep my_model.py, or --recipe FILE",
            )
        script = check_script(values["script"])
        fields = {}
        for option in CONFIG_OPTIONS:
            key = option.config_key
            if key not in ("seed", "seeds") and _given(values, key):
                fields[option.config_field] = PARSERS[key](values[key], option.flag, notes)
        if "max_norms" not in fields and any(values.get(key) is not None for key in GRID_KEYS):
            fields["max_norms"] = ()
        config = cls(script=script, seeds=resolve_seeds(values.get("seed"), values.get("seeds")), **fields)
        config.check_run_names()
        if config.agc_exclude and not config.agc_clip_factors:
            raise UsageError(
                "--agc-exclude was given without --agc: it only changes AGC runs, and no AGC run is swept",
                "add AGC clip factors (e.g. --agc 0.01) or drop --agc-exclude",
            )
        if values.get("zclip_max_norm") is not None and not config.zclip_z_thresholds:
            raise UsageError(
                "--zclip-max-norm was given without --zclip: it only changes ZClip runs, and no ZClip run is swept",
                "add ZClip z thresholds (e.g. --zclip 2.5) or drop --zclip-max-norm",
            )
        return config

    def lr_of(self, cell: Cell) -> float | None:
        """The lr a run trains at when one was given (``--lr``), else ``None``."""
        if cell.lr is not None:
            return cell.lr
        return self.lrs[0] if self.lrs else None

    def seed_of(self, cell: Cell) -> int:
        """The seed of a run: its own when seeds vary, else the sweep's one seed."""
        return cell.seed if cell.seed is not None else self.seeds[0]

    def cells(self) -> list[Cell]:
        """Every run, seed-major then lr-major: per (seed, lr) the unclipped control run first
        (it measures the L2 norm), then the max_norm grid (max_norm major), then the value,
        AGC, AutoClip and ZClip cells, each in the given order.

        A cell names its lr and seed only when that axis has several values (``None``
        otherwise), so a sweep with one lr and one seed keeps the plain names ``unclipped``,
        ``clip_1_2``. Seed-major order lets a sweep hold one starting snapshot at a time."""
        lrs = self.lrs if self.lrs and len(self.lrs) > 1 else (None,)
        seeds = self.seeds if len(self.seeds) > 1 else (None,)
        rules = (
            (MODE_VALUE, self.clip_values),
            (MODE_AGC, self.agc_clip_factors),
            (MODE_AUTOCLIP, self.autoclip_percentiles),
            (MODE_ZCLIP, self.zclip_z_thresholds),
        )
        cells = []
        for seed in seeds:
            for lr in lrs:
                cells.append(Cell(None, 2.0, lr=lr, seed=seed))
                cells.extend(Cell(m, p, lr=lr, seed=seed) for m in self.max_norms for p in self.norm_types)
                for mode, params in rules:
                    cells.extend(Cell(None, 2.0, lr=lr, seed=seed, mode=mode, param=x) for x in params)
        return cells

    def check_run_names(self) -> None:
        """Two values that print the same (``0.1`` and ``0.10000001``) would give two runs one
        name; refuse them rather than mix their rows."""
        seen: dict[str, Cell] = {}
        for cell in self.cells():
            if cell.run in seen:
                raise UsageError(
                    f"two runs would both be named {cell.run!r}: some values are too close to tell apart",
                    "use grid values (--max-norm, --lr, --clip-value, --agc, --autoclip, --zclip) that differ in their first significant digits",
                )
            seen[cell.run] = cell

    def fingerprint(self) -> dict:
        """JSON-safe description used to refuse resuming with different options."""
        d = asdict(self)
        d["script"] = str(Path(self.script).resolve())
        d["script_sha256"] = script_sha256(self.script)
        d["max_norms"] = [float(m) for m in self.max_norms]
        d["norm_types"] = [format_float(p) for p in self.norm_types]
        d["lrs"] = [float(x) for x in self.lrs] if self.lrs is not None else None
        d["seeds"] = [int(s) for s in self.seeds]
        d["divergence_factor"] = (
            format_float(self.divergence_factor) if math.isinf(self.divergence_factor) else self.divergence_factor
        )
        d["layer_depth"] = "param" if self.layer_depth is None else self.layer_depth
        for key in GRID_KEYS[1:]:
            d[key] = [float(x) for x in d[key]]
        d["agc_exclude"] = list(self.agc_exclude)
        return d


def script_sha256(script: str | Path) -> str | None:
    """The script's content hash, part of the fingerprint: a resumed sweep must run the same
    code as the interrupted one. ``None`` when the file cannot be read."""
    try:
        return hashlib.sha256(Path(script).read_bytes()).hexdigest()
    except OSError:
        return None


def _split(value: str | list | tuple, option: str) -> list:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [part.strip() for part in str(value).split(",")]
    if not items or any(item == "" for item in items):
        raise UsageError(
            f"{option} {value!r} has an empty entry", f"give comma-separated values, e.g. {option} 0.1,1,10"
        )
    return items


def _note_duplicate(notes: list | None, option: str, item, kept: float) -> None:
    if notes is not None:
        notes.append(f"{option} {item!s} equals {format_float(kept)}, already in the grid: one run for both")


def parse_max_norms(
    value: str | list | tuple, option: str = "--max-norm", notes: list | None = None
) -> tuple[float, ...]:
    """Comma-separated positive finite floats, kept in the given order. Exact duplicates
    (``1`` and ``1.0``) are merged, each with a line appended to ``notes``; values that differ
    in the last bit are distinct runs with distinct names."""
    out: list[float] = []
    for item in _split(value, option):
        try:
            x = float(item)
        except (TypeError, ValueError):
            raise UsageError(
                f"{option} value {item!r} is not a number", f"use positive numbers, e.g. {option} 0.1,1,10"
            ) from None
        if not (x > 0) or not math.isfinite(x):
            raise UsageError(
                f"{option} value {item!r} must be a positive finite number",
                f"use values above 0, e.g. {option} 0.1,1,10",
            )
        if x not in out:
            out.append(x)
        else:
            _note_duplicate(notes, option, item, x)
    return tuple(out)


def _optional(values: dict, key: str, parse, option: str, notes: list | None = None) -> tuple[float, ...]:
    value = values.get(key)
    return () if value is None else parse(value, option, notes)


def parse_percentiles(
    value: str | list | tuple, option: str = "--autoclip", notes: list | None = None
) -> tuple[float, ...]:
    """Comma-separated percentiles from 0 to 100, kept in order; duplicates merged as in
    ``parse_max_norms``."""
    out: list[float] = []
    for item in _split(value, option):
        try:
            x = float(item)
        except (TypeError, ValueError):
            raise UsageError(
                f"{option} value {item!r} is not a number", f"use percentiles from 0 to 100, e.g. {option} 10,25"
            ) from None
        if not 0.0 <= x <= 100.0:
            raise UsageError(f"{option} value {item!r} is not a percentile from 0 to 100", f"use e.g. {option} 10,25")
        if x not in out:
            out.append(x)
        else:
            _note_duplicate(notes, option, item, x)
    return tuple(out)


def parse_names(value: str | list | tuple, option: str = "--agc-exclude") -> tuple[str, ...]:
    """Comma-separated parameter-name patterns (see ``agc_excluded``); duplicates dropped."""
    if isinstance(value, (list, tuple)) and not value:
        return ()
    out: list[str] = []
    for item in _split(value, option):
        if not isinstance(item, str):
            raise UsageError(
                f"{option} value {item!r} is not a name", f"give parameter names or globs, e.g. {option} fc,head.*"
            )
        if item not in out:
            out.append(item)
    return tuple(out)


def agc_excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether AGC leaves parameter ``name`` alone: a pattern matches the full name as an
    ``fnmatch`` glob (case-sensitive; ``*.bias``, ``head.*``), or names a module whose
    parameters it covers (``fc`` matches ``fc.weight`` and ``fc.bias``, not ``fc2.weight``)."""
    return any(fnmatchcase(name, pat) or fnmatchcase(name, pat + ".*") for pat in patterns)


def parse_optional_positive(value, option: str) -> float | None:
    """A positive finite number, or ``none`` (``None``) for "no limit"."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"{option} {value!r} is not a number or 'none'",
            f"give a positive number, or none for no cap, e.g. {option} 1",
        ) from None
    if not (x > 0) or not math.isfinite(x):
        raise UsageError(
            f"{option} {value!r} must be a positive finite number or 'none'",
            f"e.g. {option} 1, or {option} none for no cap",
        )
    return x


def parse_norm_types(
    value: str | list | tuple, option: str = "--norm-type", notes: list | None = None
) -> tuple[float, ...]:
    """Comma-separated floats or ``inf``; kept in order, exact duplicates merged (noted in
    ``notes``, as for ``parse_max_norms``)."""
    out: list[float] = []
    for item in _split(value, option):
        try:
            p = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"{option} value {item!r} is not a number or 'inf'", f"use e.g. {option} 2,inf") from None
        if math.isnan(p):
            raise UsageError(f"{option} value {item!r} is not a valid norm type", f"use e.g. {option} 2,inf")
        if p not in out:
            out.append(p)
        else:
            _note_duplicate(notes, option, item, p)
    return tuple(out)


def parse_lrs(value: float | str | list | tuple, option: str = "--lr") -> tuple[float, ...]:
    """One learning rate or a comma-separated list of positive finite numbers, in order,
    duplicates dropped."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    out: list[float] = []
    for item in _split(value, option):
        x = check_positive(item, option)
        if x not in out:
            out.append(x)
    return tuple(out)


def parse_seeds(value: int | str | list | tuple, option: str = "--seeds") -> tuple[int, ...]:
    """Comma-separated whole numbers from 0 to 2**63-1, in order, duplicates dropped."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    out: list[int] = []
    for item in _split(value, option):
        if isinstance(item, str):
            try:
                item = int(item)
            except ValueError:
                raise UsageError(f"{option} value {item!r} is not a whole number", f"e.g. {option} 0,1,2") from None
        seed = check_seed(item, option)
        if seed not in out:
            out.append(seed)
    return tuple(out)


def resolve_seeds(seed: int | None, seeds) -> tuple[int, ...]:
    """``--seed N`` is the one-seed form of ``--seeds``; both given must agree."""
    if seeds is None:
        return (check_seed(seed),) if seed is not None else (0,)
    parsed = parse_seeds(seeds)
    if seed is not None and parsed != (check_seed(seed),):
        raise UsageError(
            f"--seed {seed} and --seeds {','.join(map(str, parsed))} disagree",
            "give either --seed N (one seed) or --seeds LIST (several)",
        )
    return parsed


def check_amp(amp: str, option: str = "--amp") -> str:
    if amp not in AMP_MODES:
        raise UsageError(
            f"{option} {amp!r} is not a precision mode", f"use {option} off, {option} fp16 or {option} bf16"
        )
    return amp


def check_steps(steps: int, option: str = "--steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"{option} {steps!r} must be a whole number of at least 1", f"e.g. {option} 100")
    return steps


def check_seed(seed: int, option: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise UsageError(f"{option} {seed!r} must be a whole number from 0 to 2**63-1", f"e.g. {option} 0")
    return seed


def check_positive(value: float, option: str, allow_inf: bool = False) -> float:
    """A positive finite number (``allow_inf``: ``inf`` too, e.g. to turn a check off)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r} is not a number", f"give a positive number for {option}") from None
    if allow_inf and x == math.inf:
        return x
    if not (x > 0) or not math.isfinite(x):
        off = " (or inf to turn the check off)" if allow_inf else ""
        raise UsageError(
            f"{option} {value!r} must be a positive finite number{off}", f"give a positive number for {option}{off}"
        )
    return x


def parse_depth(value: str | int | None) -> int | str | None:
    """``"auto"``, ``"param"``/``"all"`` (one group per parameter, ``None``) or a depth >= 1.
    Raises ``ValueError`` with the accepted forms."""
    if value is None or value == LAYER_DEPTH_AUTO:
        return LAYER_DEPTH_AUTO
    if value in ("param", "all"):
        return None
    try:
        depth = int(value)
    except (TypeError, ValueError):
        depth = 0
    if isinstance(value, bool) or depth < 1 or str(depth) != str(value).strip():
        raise ValueError(f"{value!r} is not a layer depth: use auto, param or a whole number from 1")
    return depth


def check_layer_depth(value, option: str = "--layer-depth") -> int | str | None:
    """``auto``, ``param`` (one group per parameter) or a module depth >= 1 (see layers.py)."""
    try:
        return parse_depth(value)
    except ValueError:
        raise UsageError(
            f"{option} {value!r} is not a layer depth",
            f"use {option} auto, {option} param or a whole number from 1, e.g. {option} 2",
        ) from None


def check_spike_factor(value, option: str = "--spike-factor") -> float:
    x = check_positive(value, option)
    if x <= 1.0:
        raise UsageError(
            f"{option} {value!r} must be above 1", f"a jump is a factor above the running median, e.g. {option} 10"
        )
    return x


def check_refine(value, option: str = "--refine") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value <= 20):
        raise UsageError(f"{option} {value!r} must be a whole number from 0 to 20", f"e.g. {option} 3")
    return value


_DEVICE_FORM = re.compile(r"cpu|cuda|cuda:[0-9]+")


def check_device(device: str, option: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (N = 0, 1, ...); anything else is refused here, before
    torch would raise its own message about it."""
    if not isinstance(device, str) or not _DEVICE_FORM.fullmatch(device):
        raise UsageError(
            f"{option} {device!r} is not supported: gradclip accepts cpu, cuda and cuda:N",
            f"use {option} cpu, {option} cuda or {option} cuda:N with N = 0, 1, ... (e.g. cuda:0)",
        )
    return device


def check_script(script: str | Path) -> Path:
    path = Path(script)
    if not path.exists():
        raise UsageError(
            f"script {str(path)!r} does not exist", "check the path, or run from the directory that holds it"
        )
    if not path.is_file():
        raise UsageError(
            f"script {str(path)!r} is not a file",
            "point gradclip at a .py file that defines build_model, batches and loss_fn",
        )
    if path.suffix.lower() in (".pyc", ".pyo"):
        raise UsageError(
            f"script {str(path)!r} is compiled bytecode, not Python source",
            "give the .py file it was compiled from",
        )
    return path


def _given(values: dict, key: str) -> bool:
    """Whether ``values`` sets ``key``: ``None`` is "not given" (an option left out on the
    command line), except for zclip_max_norm, where it is a recipe's "none" (no cap)."""
    return key in values and (values[key] is not None or key == "zclip_max_norm")


def _plain(check):
    """A check without notes, called as a parser: ``(value, option, notes)``."""
    return lambda value, option, notes: check(value, option)


# Each SweepConfig input's parser, under its option's key: the value as given (command-line
# text, or a recipe's TOML value), the spelling to name in errors (--max-norm, or max_norm in a
# recipe) and the list that collects notes on merged duplicates -> the value SweepConfig holds.
PARSERS = {
    "max_norms": parse_max_norms,
    "norm_types": parse_norm_types,
    "clip_values": parse_max_norms,
    "agc_clip_factors": parse_max_norms,
    "agc_exclude": _plain(parse_names),
    "autoclip_percentiles": parse_percentiles,
    "zclip_z_thresholds": parse_max_norms,
    "zclip_max_norm": _plain(parse_optional_positive),
    "steps": _plain(check_steps),
    "seed": _plain(check_seed),
    "seeds": _plain(parse_seeds),
    "lr": _plain(parse_lrs),
    "divergence_factor": lambda value, option, notes: check_positive(value, option, allow_inf=True),
    "device": _plain(check_device),
    "amp": _plain(check_amp),
    "accumulate": _plain(check_steps),
    "amp_init_scale": _plain(check_positive),
    "layer_depth": _plain(check_layer_depth),
    "spike_factor": _plain(check_spike_factor),
    "refine": _plain(check_refine),
}
