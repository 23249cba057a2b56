"""Deterministic JSON bytes for records, stats and manifests.

Shards must be byte-identical across runs, executors and machines, so every JSON the build
writes goes through `dumps`: sorted keys, compact separators, UTF-8 (not \\u escapes), floats
in Python's shortest round-trip repr, numpy scalars/arrays converted to plain values, and
NaN/Inf refused (they are not JSON, and other readers choke on them) with the field path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

__all__ = ["JsonError", "dumps", "exact_orjson", "loads", "to_jsonable"]

# Where orjson's compact text may differ from `json.dumps`'s: floats below 1e-4 (Python writes `1e-05`,
# orjson `0.00001`, `1e-5` or `1e-05` by magnitude). `exact_orjson` sends a text holding either to
# `json.dumps`; a string that merely contains these bytes costs time, never a byte. String escapes agree
# (`"`, `\\`, `\n`-style and `\u00XX` for the other control characters, no others; tested on every
# character up to U+07FF and beyond), so escaped text (every det3d record quotes its 3D box) stays fast.
_ORJSON_MAY_DIFFER = (b"e-", b"0.0000")
_ORJSON_OPTS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
                | orjson.OPT_PASSTHROUGH_SUBCLASS)


def exact_orjson(obj: Any, *, ascii_only: bool) -> tuple[bytes, Any] | None:
    """orjson's sorted-keys compact text of `obj` and the plain value it reads back, when that text is certain
    to be `json.dumps(obj, sort_keys=True, separators=(",", ":"))`'s, byte for byte; else None.

    Why: `json.dumps` with sorted keys spends most of its time in Python-level float formatting; orjson writes
    the same JSON 5-8x faster (det3d records, the read-back included), but not always the same text. Certain means: orjson wrote it with no `default`
    (only str, int within 64 bits, float, bool, None, list, tuple and dict with str keys; a subclass,
    dataclass, datetime, Path or numpy value raises), none of `_ORJSON_MAY_DIFFER` is in it, it is ASCII
    without DEL when `ascii_only` (`json.dumps` escapes both unless `ensure_ascii=False`; UTF-8 sorts keys in
    code point order, as Python does), and the text reads back equal to `obj`. The read-back catches what orjson
    writes without raising where `json.dumps` differs or refuses: NaN and infinities (orjson writes `null`),
    enum members (their value), tuples (a list reads back: unequal, though the text would agree). The value
    read back is a plain copy of `obj` (`to_jsonable`'s result for a plain `obj`).
    """
    try:
        out = orjson.dumps(obj, option=_ORJSON_OPTS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return None
    if (ascii_only and (not out.isascii() or b"\x7f" in out)) or any(m in out for m in _ORJSON_MAY_DIFFER):
        return None
    back = orjson.loads(out)
    return (out, back) if back == obj else None


class JsonError(ValueError):
    """A value cannot be written as deterministic JSON; the message names the field path."""


def _where(path: str) -> str:
    return path or "<root>"


def to_jsonable(obj: Any, path: str = "") -> Any:
    """Plain-Python copy of `obj` (dicts with str keys, lists, str, int, float, bool, None).

    A record that is plain already (the common case) is copied by orjson (`exact_orjson`, ~10x faster than
    this walk); anything else (numpy values, tuples, NaN, bad keys) is walked here, which also names the
    field path of what cannot be written."""
    if not path and type(obj) is dict:
        fast = exact_orjson(obj, ascii_only=False)
        if fast is not None:
            return fast[1]
    return _walk(obj, path)


def _walk(obj: Any, path: str) -> Any:
    """`to_jsonable` by walking the value (the reference, and every value orjson cannot copy exactly)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        if not math.isfinite(f):
            raise JsonError(f"{_where(path)}: non-finite number {f!r} cannot be written as JSON")
        return f
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if isinstance(k, np.str_):
                k = str(k)
            if not isinstance(k, str):
                raise JsonError(f"{_where(path)}: dict key {k!r} is a {type(k).__name__}, JSON keys must be str")
            out[k] = _walk(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(obj, list | tuple):
        return [_walk(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise JsonError(f"{_where(path)}: numpy array of dtype {obj.dtype} cannot be written as JSON")
        if obj.dtype.kind == "f" and not np.isfinite(obj).all():
            raise JsonError(f"{_where(path)}: array holds non-finite numbers")
        return obj.tolist()
    raise JsonError(f"{_where(path)}: {type(obj).__name__} is not JSON-serializable")


def dumps(obj: Any, *, indent: int | None = None) -> bytes:
    """Canonical UTF-8 JSON bytes of `obj`; same value -> same bytes.

    Compact by default (records inside tars); `indent` for files people read (manifest.json),
    still deterministic.
    """
    if indent is None and type(obj) is dict:
        fast = exact_orjson(obj, ascii_only=False)
        if fast is not None:
            return fast[0]
    return _dumps_walk(obj, indent)


def _dumps_walk(obj: Any, indent: int | None) -> bytes:
    """`dumps` by `json.dumps` (the reference)."""
    seps = (",", ":") if indent is None else (",", ": ")
    return json.dumps(
        _walk(obj, ""), sort_keys=True, separators=seps, indent=indent, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse JSON, refusing the NaN/Infinity extensions Python would otherwise accept."""

    def _bad_constant(name: str) -> Any:
        raise JsonError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=_bad_constant)
