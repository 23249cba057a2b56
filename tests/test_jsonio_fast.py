"""The orjson fast paths of `shards.jsonio` and `schemas.records` give exactly what the walks give.

Shard bytes must not depend on which path wrote a record (byte-identity across executors, machines and
versions), so `dumps` and `to_jsonable` are compared with their reference walks (`_dumps_walk`, `_walk`) on
values chosen to hit every place orjson differs from `json.dumps`: floats around 1e-4 and 1e16, NaN and
infinities, escapes, non-ASCII text and keys, 64-bit limits, tuples, enums, numpy values, subclasses. A
value the walk refuses must be refused the same way (same error and message) by the fast path.
"""

from __future__ import annotations

import enum
import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import records
from shards import jsonio


def _outcome(fn, *args):  # noqa: ANN001, ANN202 (a test helper over two call shapes)
    try:
        return "ok", fn(*args)
    except Exception as e:  # noqa: BLE001 (the point is to compare whatever is raised)
        return type(e).__name__, str(e)


def _same(obj: object) -> None:
    assert _outcome(jsonio.dumps, obj) == _outcome(jsonio._dumps_walk, obj, None), obj
    fast, ref = _outcome(jsonio.to_jsonable, obj), _outcome(jsonio._walk, obj, "")
    assert fast[0] == ref[0], obj
    if fast[0] == "ok":
        assert fast[1] == ref[1]
        assert _outcome(jsonio._dumps_walk, fast[1], None) == _outcome(jsonio._dumps_walk, ref[1], None)
    else:
        assert fast == ref


class Colour(enum.Enum):
    RED = 1


class Num(enum.IntEnum):
    ONE = 1


class MyStr(str):
    pass


def _floats() -> list[float]:
    vals = [0.0, -0.0, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), -float("inf")]
    for e in range(-330, 309):
        v = 1.2345678901234567 * 10.0**e
        if math.isfinite(v) and v != 0:
            vals += [v, -v, math.nextafter(v, 0), math.nextafter(v, math.inf)]
    return vals


def test_every_character_escaped_alike() -> None:
    """orjson and json.dumps escape text alike (the fast path relies on it): every character up to U+07FF,
    the line separators, BOM, the last BMP and the first and last astral code points."""
    from pipelines.engine.plan import canonical_bytes, canonical_json

    chars = [chr(c) for c in range(0x800)] + ["\u2028", "\u2029", "\ufeff", "\uffff", "\U00010000", "\U0010ffff"]
    for ch in chars:
        text = f"a{ch}{ch}b\"q\\"
        _same({"t": text, text: [text]})
        assert canonical_bytes({"t": text}) == canonical_json({"t": text}).encode()


def test_records_with_floats_of_every_magnitude() -> None:
    for v in _floats():
        _same({"corpus": "det3d", "x": v, "box": [v, 1.0, [v]]})


def test_text_escapes_and_non_ascii_keys() -> None:
    for s in ("", "a", 'q"', "b\\s", "t\tn\nr\r", "\x00\x1f", "\x7f", "é", "日本", "\U0001f600", "\uffff", "\ud800",
              "e-5 text", "0.00001"):
        _same({"caption": s, s: 1, "z": [s]})
    _same({"\U00010000": 1, "\uffff": 2, "é": 3, "e": 4, "E": 5, "": 6})  # code point order of keys


def test_values_the_walk_converts_or_refuses() -> None:
    for v in ((1.0, 2.0), [(1,)], np.float32(0.1), np.float64(1e-7), np.int64(2**40), np.bool_(True),
              np.array([1.5, 2.0]), np.array([np.nan]), np.array(["a"]), np.str_("s"), Colour.RED, Num.ONE,
              MyStr("x"), 2**63 - 1, 2**64, -(2**63) - 1, {1: 2}, {np.str_("k"): 1}, b"bytes", None, True):
        _same({"v": v})
        _same({"v": {"w": [v, 0.5]}})


_plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=30)


@given(st.dictionaries(st.text(max_size=5), _plain, max_size=6))
@settings(max_examples=400, deadline=None)
def test_random_records(rec: dict) -> None:
    _same(rec)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_random_float_bit_patterns(bits: list[int]) -> None:
    _same({"f": [struct.unpack("<d", struct.pack("<Q", b))[0] for b in bits]})


def test_to_jsonable_copies() -> None:
    rec = {"a": [1.0, {"b": 2}]}
    out = jsonio.to_jsonable(rec)
    out["a"][1]["b"] = 3
    assert rec == {"a": [1.0, {"b": 2}]}


def test_surely_finite_and_validate_still_name_the_field() -> None:
    assert records._surely_finite({"a": [1.0, None, "x"]})
    for bad in ({"a": [float("nan")]}, {"a": {"b": float("inf")}}, {"a": np.float64(1.0)}, {"a": (1.0,)}, {1: 2}):
        assert not records._surely_finite(bad)
    with pytest.raises(records.SchemaError, match=r"objects\[0\]\.score.*non-finite"):
        records.validate("det3d", {"corpus": "det3d", "objects": [{"score": float("nan")}]})
