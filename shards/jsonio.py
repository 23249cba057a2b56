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

__all__ = ["JsonError", "dumps", "loads", "to_jsonable"]


class JsonError(ValueError):
    """A value cannot be written as deterministic JSON; the message names the field path."""


def _where(path: str) -> str:
    return path or "<root>"


def to_jsonable(obj: Any, path: str = "") -> Any:
    """Plain-Python copy of `obj` (dicts with str keys, lists, str, int, float, bool, None)."""
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
            out[k] = to_jsonable(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(obj, list | tuple):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
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
    seps = (",", ":") if indent is None else (",", ": ")
    return json.dumps(
        to_jsonable(obj), sort_keys=True, separators=seps, indent=indent, ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def loads(data: bytes | str) -> Any:
    """Parse JSON, refusing the NaN/Infinity extensions Python would otherwise accept."""

    def _bad_constant(name: str) -> Any:
        raise JsonError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=_bad_constant)
