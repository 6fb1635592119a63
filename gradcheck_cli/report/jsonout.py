"""The summary as strict JSON, for ``--json`` on stdout.

A JSON list with one object per run, keys exactly ``results.SUMMARY_COLUMNS`` in that order.
Strict JSON has no NaN or infinity, so non-finite numbers are encoded as:

* NaN and "no value": ``null`` (``max_norm`` of the unclipped control and of the rule runs,
  ``clip_param`` of the control, a loss that was NaN, a percentile of a run without finite
  norms);
* ``+inf`` / ``-inf``: the strings ``"inf"`` / ``"-inf"`` (a final loss that overflowed).

``norm_type`` is always a string (``"2"``, ``"inf"``), as in the CSV files. Floats are written
in Python's shortest round-trip form.
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
