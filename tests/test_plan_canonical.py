"""`canonical_bytes` (orjson with a checked fallback) writes exactly `canonical_json`'s text.

The digests in plan.json are sha256 of that text, so a single differing byte would make every resume of a
build planned by an earlier version redo its chunks. The reference is `json.dumps` itself (`canonical_json`),
compared on values chosen to hit each place where orjson's text differs: float formatting around 1e-4 and
1e16, NaN and infinities, escapes and non-ASCII text, 64-bit integer limits, tuples, enums, dataclasses,
paths, numpy scalars, subclasses and non-string keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import math
import struct
import uuid
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.engine.plan import canonical_bytes, canonical_json, digest


def _same(obj: object) -> None:
    assert canonical_bytes(obj) == canonical_json(obj).encode(), obj
    assert digest(obj) == hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def test_floats_of_every_magnitude_and_their_neighbours() -> None:
    vals = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308]
    for e in range(-330, 309):
        for m in (1.0, 1.5, 9.999999999999998, 1.0000000000000002):
            v = m * 10.0**e
            if math.isfinite(v) and v != 0:
                vals += [v, -v, math.nextafter(v, 0), math.nextafter(v, math.inf)]
    for v in vals:
        _same(v)
    _same(vals)  # in one list: an odd element must not change its neighbours' text


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50))
@settings(max_examples=200, deadline=None)
def test_random_bit_patterns_as_floats(bits: list[int]) -> None:
    _same([struct.unpack("<d", struct.pack("<Q", b))[0] for b in bits])


def test_integers_at_and_past_64_bits() -> None:
    for v in (0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**40, True, False):
        _same(v)
        _same({"v": v, "w": [v]})


def test_strings_escapes_and_non_ascii() -> None:
    for s in ("", "plain/path.jpg", 'q"uote', "back\\slash", "tab\tnew\nline\r", "\x00\x01\x1f", "\x7f",
              "é", "日本", "\U0001f600", "\ud800", "e-3 is text", "0.00001 in text", "</script>"):
        _same(s)
        _same({s: s})  # as a key too: sort order and escaping of keys


def test_sorting_of_keys_and_nesting() -> None:
    _same({"b": 1, "a": {"d": [1, 2.5, None, True], "c": {}}, "A": [], "_": "x", "a0": 0, "a-": 1})
    deep: object = 1.5
    for _ in range(300):  # deeper than orjson's limit (254): must fall back, not fail
        deep = [deep]
    _same(deep)


class Colour(enum.Enum):
    RED = 1


class Num(enum.IntEnum):
    ONE = 1


class Name(str, enum.Enum):  # noqa: UP042 (the mixin form is the case tested)
    A = "a"


class MyStr(str):
    pass


class MyFloat(float):
    pass


@dataclasses.dataclass
class Box:
    w: float


def test_values_orjson_would_write_otherwise() -> None:
    for v in ((1, 2.5), [(1,), ()], Colour.RED, Num.ONE, Name.A, MyStr("x"), MyFloat(1e-7), MyFloat(2.5),
              Box(1.0), Path("/a/b.jpg"), np.float64(0.1), np.float32(0.1), np.int64(3), np.array([1.0]),
              uuid.UUID(int=5), datetime.date(2026, 12, 3), {1: "int key"}, {"k": {2: 3}}, b"bytes",
              {"nan": float("nan"), "x": [1.0, None]}):
        _same(v)
        _same([1.5, v, "after"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=5),
    max_leaves=30)


@given(_json)
@settings(max_examples=400, deadline=None)
def test_random_structures(obj: object) -> None:
    _same(obj)
    _same([obj, obj])
