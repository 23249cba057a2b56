"""Deterministic JSON: same value -> same bytes; numpy converted; NaN refused with its path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.jsonio import JsonError, dumps, loads


def test_sorted_compact_utf8() -> None:
    a = dumps({"b": 1, "a": [1.5, "é"], "c": {"z": None, "y": True}})
    b = dumps({"c": {"y": True, "z": None}, "a": [1.5, "é"], "b": 1})
    assert a == b == '{"a":[1.5,"é"],"b":1,"c":{"y":true,"z":null}}'.encode()
    assert dumps({"x": 0.1}) == b'{"x":0.1}'  # shortest round-trip float repr
    assert dumps({"a": 1}, indent=1) == b'{\n "a": 1\n}'


def test_numpy_values_are_converted() -> None:
    obj = {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "arr": np.arange(4).reshape(2, 2),
           "farr": np.array([0.25, 1.0], dtype=np.float32), "t": (1, 2), np.str_("k"): "v"}
    out = json.loads(dumps(obj))
    assert out == {"i": 3, "f": 0.5, "b": True, "arr": [[0, 1], [2, 3]], "farr": [0.25, 1.0], "t": [1, 2], "k": "v"}
    assert type(out["i"]) is int


@pytest.mark.parametrize("obj,where", [
    ({"a": {"b": [1.0, float("nan")]}}, "a.b[1]"),
    ({"x": np.float32("inf")}, "x"),
    ({"arr": np.array([1.0, np.nan])}, "arr"),
    ({"s": {1, 2}}, "s"),
    ({1: "a"}, "<root>"),
    ({"o": np.array(["a"], dtype=object)}, "o"),
])
def test_bad_values_are_refused_with_their_path(obj: object, where: str) -> None:
    with pytest.raises(JsonError) as ei:
        dumps(obj)
    assert str(ei.value).startswith(where + ":")


def test_loads_refuses_nan_constants() -> None:
    assert loads(b'{"a":1}') == {"a": 1}
    with pytest.raises(JsonError, match="NaN"):
        loads(b'{"a":NaN}')
