"""JSON for result lines, the batch hot path: orjson (10 vs 78 us for a line holding 64 floats,
the NaN check included), and the standard library wherever orjson would refuse the value or
write it differently, so every line reads back as the value written.

Reading stays with the standard library: orjson reads integers past 64 bits as floats.
Fingerprints keep their own encoder: they must not change between versions.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON on one line. NaN and infinities (orjson writes them as null) and what
    orjson refuses (a lone surrogate, an integer past 64 bits) go through the standard library,
    which writes them as before; a lone surrogate ASCII-escaped, as it cannot be UTF-8."""
    if finite(value):
        try:
            return orjson.dumps(value)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            pass
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def finite(value: Any) -> bool:
    """No NaN or infinity anywhere in `value` (a list of numbers is checked in one pass).
    Subclasses count as their base type (orjson writes an OrderedDict as a dict)."""
    if type(value) in _PLAIN:
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(finite, value.values()))
    if isinstance(value, list | tuple):
        try:
            # A vector in one C loop: a NaN or an infinity anywhere leaves the sum non-finite.
            # A finite sum proves them all finite; a non-finite one (an overflow, say) is checked
            # one by one.
            if math.isfinite(sum(value)):
                return True
        except (TypeError, OverflowError):  # strings, dicts, None, huge integers: one by one
            pass
        return all(map(finite, value))
    return True


_PLAIN = frozenset({str, int, bool, type(None)})  # nothing inside to check
