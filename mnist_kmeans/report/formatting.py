"""Numbers and JSON values as the text the report shows: every cell of the page goes through one of these.

Each formatter takes whatever the run directory holds, valid or not, and returns a string: a missing or
non-finite number is an em dash ("—"), never an exception, so an optional key absent from ``metrics.json`` or
``manifest.json`` only costs an empty cell. The text is left raw; the template escapes it.
"""

from __future__ import annotations

import json
import math
import shlex
from typing import Any

from mnist_kmeans.report.values import is_int, is_num

MISSING = "—"


def fmt_num(value: Any, digits: int = 4) -> str:
    """A score with ``digits`` decimals; anything else as it is, ``None`` as a dash."""
    if not is_num(value) or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING if value is None else str(value)
    return f"{value:.{digits}f}"


def fmt_pct(value: Any, digits: int = 2) -> str:
    """A fraction in [0, 1] as a percentage with ``digits`` decimals."""
    return f"{100 * value:.{digits}f} %" if is_num(value) and math.isfinite(value) else MISSING


def fmt_big(value: Any) -> str:
    """Inertia-like numbers: thousands separators, a decimal only while the number is small."""
    if not is_num(value) or not math.isfinite(value):
        return MISSING
    return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:,.1f}"


def fmt_int(value: Any) -> str:
    """A count with thousands separators; anything else as it is, ``None`` as a dash."""
    return f"{value:,}" if is_int(value) else (MISSING if value is None else str(value))


def fmt_secs(value: Any) -> str:
    """A duration in seconds, in the largest units that keep it short: "4.20 s", "2 min 05 s", "1 h 03 min"."""
    if not is_num(value) or not math.isfinite(value):
        return MISSING
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_value(value: Any) -> str:
    """Any JSON value as one line of text (the template escapes it)."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or is_num(value):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    """A nested JSON object as (dotted key, text) rows; a command line (list of strings) as one shell line."""
    if not prefix and isinstance(obj, dict) and not obj:
        return []
    if isinstance(obj, dict) and obj:
        rows: list[tuple[str, str]] = []
        for key, value in obj.items():
            rows.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(obj, list) and obj and all(isinstance(v, str) for v in obj) and "command" in prefix.lower():
        return [(prefix, shlex.join(obj))]
    return [(prefix, fmt_value(obj))]
