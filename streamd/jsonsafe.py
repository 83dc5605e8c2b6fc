"""JSON without NaN or Infinity, both ways.

Python's `json` writes `NaN`/`Infinity` (not JSON: most parsers refuse them) and reads them back, and reads
`1e999` as `inf`. Everything streamd writes (records, events, API responses) goes through `dumps`: `allow_nan=False`
first (the fast path), and when a stray non-finite float is found, the value is cleaned (each such float becomes
`null`) and encoded again, so the output is always valid JSON. Everything streamd reads from a client (API bodies)
goes through `loads`, which refuses those literals and out-of-range numbers (`NonFiniteNumber`, a ValueError).
"""

from __future__ import annotations

import json
import math
from typing import Any


class NonFiniteNumber(ValueError):
    """A JSON text holds NaN, Infinity or a number too large for a float."""


def _refuse_constant(name: str) -> Any:
    raise NonFiniteNumber(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise NonFiniteNumber(f"{text[:40]} is out of range for a number")
    return v


def loads(raw: str | bytes | bytearray) -> Any:
    """json.loads that refuses NaN, Infinity, -Infinity and numbers that overflow to infinity."""
    return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)


def clean(obj: Any) -> Any:
    """A copy of `obj` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


cleaned = 0  # documents written with a non-finite float replaced by null (logged at the 1st, 2nd, 4th ... one)


def encoder(**kw: Any) -> Any:
    """An `encode(obj) -> str` that never writes NaN/Infinity (options as json.JSONEncoder's; default=str)."""
    kw.setdefault("default", str)
    enc = json.JSONEncoder(allow_nan=False, **kw).encode

    def encode(obj: Any) -> str:
        global cleaned
        try:
            return enc(obj)
        except ValueError:  # "Out of range float values are not JSON compliant"
            cleaned += 1
            if cleaned & (cleaned - 1) == 0:
                from streamd.log import get_logger

                get_logger("streamd.json").warning("a non-finite number (NaN/Infinity) was written as null",
                                                   times=cleaned)
            return enc(clean(obj))

    return encode


dumps = encoder()
