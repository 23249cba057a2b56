"""Read a JSON file into exactly what `json.load` gives, with orjson's parser when that is certain to agree.

Why: the det3d driver parses every Omni3D annotation file before any chunk can start, and the standard
library's parser was the largest single part of that serial listing (bench/executors.md, "Driver per input
(session 4)"). orjson parses the same text ~1.25x faster here (the cost is creating the Python floats either way).

orjson gives the same values as `json.load` for the JSON both accept (floats by correct rounding, `-0` an int,
`-0.0` a float, a repeated key's last value at its first place), with these differences, all sent to the
standard library instead, so the caller always gets `json.load`'s values and `json.load`'s errors:
- NaN / Infinity / -Infinity literals, numbers overflowing to inf (`1e400`), lone surrogate escapes (`"\\ud800"`),
  invalid UTF-8 and nesting deeper than 1024 levels: orjson raises, then the file is parsed again by
  `json.load` (which accepts them, or raises its own error with line and column, exactly as before);
- integers outside 64 bits: orjson returns them as floats without an error, so a file with any run of 19 or
  more digits (every integer beyond 64 bits has one; so do some long float mantissas, which then only lose the
  fast path) goes to `json.load` from the start.
Without orjson installed, every file takes `json.load`.
"""

from __future__ import annotations

import json
import os
from typing import Any

try:
    import orjson
except ImportError:  # an optional speed-up: the standard library gives the same values
    orjson = None  # type: ignore[assignment]

__all__ = ["load_json_path", "has_long_digit_run", "LONG_DIGITS"]

LONG_DIGITS = 19
"""Digits from which an integer may not fit in 64 bits (2**63 has 19): orjson would turn it into a float."""

_DIGITS_ONLY = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))  # each digit -> "0", rest -> " "
_RUN = b"0" * LONG_DIGITS
_SCAN = 1 << 20  # bytes translated at once (a bounded copy, not a second copy of the whole file)


def has_long_digit_run(raw: bytes) -> bool:
    """True when `raw` holds `LONG_DIGITS` or more digits in a row (C-speed: translate + find, ~3 ms per MB)."""
    for s in range(0, len(raw), _SCAN):
        if raw[s:s + _SCAN + LONG_DIGITS - 1].translate(_DIGITS_ONLY).find(_RUN) >= 0:
            return True
    return False


def load_json_path(path: str | os.PathLike) -> Any:
    """`json.load(open(path, encoding="utf-8"))`: the same value, or the same exception, faster when it can be.

    Raises what `json.load` raises: OSError, UnicodeDecodeError, json.JSONDecodeError (line and column as
    `json.load` reports them, since a file orjson refuses is parsed again by `json.load`), RecursionError.
    The file's bytes are held while parsed, as `json.load` holds its text.
    """
    if orjson is not None:
        with open(path, "rb") as fh:
            raw = fh.read()
        if not has_long_digit_run(raw):
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                pass  # not certain to be an error for json.load (NaN, 1e400, lone surrogates): ask it
        del raw
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
