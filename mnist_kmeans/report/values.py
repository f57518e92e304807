"""What counts as an integer and as a number in the run directory's JSON files.

``json`` reads ``true`` as a Python ``bool``, which is an ``int``; a flag is never a count or a metric, so both
checks turn booleans away. Reading the run directory (:mod:`.rundir`), drawing the figures (:mod:`.gallery`) and
formatting numbers (:mod:`.formatting`) share these two definitions.
"""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: Any) -> bool:
    """Whether ``value`` is a JSON number, integer or float (not a boolean); NaN and infinities count."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
