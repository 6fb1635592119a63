"""The summary as strict JSON, for ``--json`` on stdout: a list with one object per run, keys
exactly ``results.SUMMARY_COLUMNS`` in that order; NaN and "no value" are ``null``, +-inf the
strings ``"inf"``/``"-inf"``. See docs/outputs.md (JSON; Reference: how the files are written).
"""

from __future__ import annotations

import json
import math

from gradcheck_cli.results import RunResult


def json_safe(value):
    """``value`` with NaN as ``None`` and +-inf as ``"inf"``/``"-inf"``."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value


def summary_records(results: list[RunResult]) -> list[dict]:
    """The summary rows, JSON-safe."""
    return [{k: json_safe(v) for k, v in r.summary_row().items()} for r in results]


def summary_json(results: list[RunResult]) -> str:
    """``summary_records`` as an indented JSON list (no trailing newline)."""
    return json.dumps(summary_records(results), indent=2, allow_nan=False)
