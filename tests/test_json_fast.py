"""`pipelines.sources.json_fast.load_json_path`: exactly `json.load`'s values and errors, orjson or not.

Values are compared by `repr` (types, key order, the sign of -0.0, ints stay ints), not by `==` (1 == 1.0).
"""

from __future__ import annotations

import json
from pathlib import Path

import orjson  # a pinned dependency (pyproject, requirements.lock): missing it fails, never skips
import pytest

from pipelines.sources import json_fast
from pipelines.sources.json_fast import has_long_digit_run, load_json_path

AGREE = [  # JSON both parsers accept: orjson's values must be json.load's
    '{"a": 1, "b": [1.5, -0.0, -0, 0, 1E2, 1e-400, 5e-324, 2.4703282292062327e-324, 1.7976931348623157e308]}',
    '{"a": 1, "b": 2, "a": 3}',  # a repeated key: its last value, at its first place
    '{"ints": [9223372036854775807, -9223372036854775808, 18446744073709551615, 123456789012345678]}',
    '{"s": ["\\u00e9", "é", "\\ud83d\\ude00", "\\u0000", "a\\"b\\\\c\\/d", "\\u2028"], "e": {}, "l": [], "n": null}',
    '{"f": [0.1, 0.2, 4.35e-05, 1.0000000000000002, 123456789012345678.5, 9007199254740993]}',
    '\r\n\t {"crlf": [1,\r\n 2]} \n',
    '[1, 2]',
    '"top"',
]

FALLBACK = [  # orjson refuses these, or (beyond 64 bits) returns a float: json.load's values must come back
    '{"a": NaN, "b": Infinity, "c": -Infinity}',
    '{"a": 1e400, "b": -1e400}',
    '{"a": "\\ud800", "b": "\\udc00\\ud800"}',
    '{"a": 18446744073709551616, "b": -9223372036854775809, "c": 100000000000000000000000000000}',
    '{"a": 1234567890123456789.0, "b": 1e0000000000000000001}',  # a long integer part or exponent: only slower
]


def _write(tmp_path: Path, text: str, name: str = "f.json") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8", "surrogatepass"))
    return p


def _stdlib(p: Path) -> object:
    with open(p, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.parametrize("text", AGREE + FALLBACK)
def test_values_are_json_loads(tmp_path, text):
    p = _write(tmp_path, text)
    assert repr(load_json_path(p)) == repr(_stdlib(p))


def test_big_ints_stay_ints(tmp_path):
    """orjson turns an int beyond 64 bits into a float without an error: the digit-run check must catch it."""
    p = _write(tmp_path, '{"id": 18446744073709551616, "ids": [1, 99999999999999999999]}')
    with open(p, "rb") as fh:
        assert isinstance(orjson.loads(fh.read())["id"], float)  # the hazard this module guards against
    got = load_json_path(p)
    assert got == {"id": 2**64, "ids": [1, 99999999999999999999]} and type(got["id"]) is int


def test_orjson_is_used_when_it_agrees_and_the_stdlib_otherwise(tmp_path, monkeypatch):
    calls = []
    real = json.load
    monkeypatch.setattr(json_fast.json, "load", lambda fh: calls.append(1) or real(fh))
    load_json_path(_write(tmp_path, AGREE[0]))
    assert calls == []
    load_json_path(_write(tmp_path, FALLBACK[0]))
    assert calls == [1]


def test_without_orjson_every_file_takes_json_load(tmp_path, monkeypatch):
    monkeypatch.setattr(json_fast, "orjson", None)
    for text in AGREE + FALLBACK:
        p = _write(tmp_path, text)
        assert repr(load_json_path(p)) == repr(_stdlib(p))


@pytest.mark.parametrize("text", [
    '{"a": [1, 2,\n "b": 3}',  # invalid on line 2
    '{"images": [\r\n{"id": 1},\r\n{"id": 2,}\r\n]}',  # CRLF: json.load's text mode sees "\n"; same line/column
    '{"a": 1',  # truncated
    '{"a": 1} x',  # extra data
    '\ufeff{"a": 1}',  # a UTF-8 BOM: json.load refuses it
    '',
    '{"a": 01}',
    '{"a": "x\x01y"}',  # a raw control character in a string
])
def test_errors_are_json_loads_with_line_and_column(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(json.JSONDecodeError) as want:
        _stdlib(p)
    with pytest.raises(json.JSONDecodeError) as got:
        load_json_path(p)
    assert type(got.value) is json.JSONDecodeError  # the stdlib's error, not orjson's subclass
    assert (str(got.value), got.value.lineno, got.value.colno) == (str(want.value), want.value.lineno, want.value.colno)


def test_invalid_utf8_and_deep_nesting_raise_as_json_load(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(UnicodeDecodeError):
        load_json_path(p)
    p.write_text("[" * 5000 + "]" * 5000)  # orjson stops at 1024 levels; json.load at the recursion limit
    with pytest.raises(RecursionError):
        load_json_path(p)


def test_long_digit_runs_are_found_across_scan_boundaries():
    size = json_fast._SCAN
    assert not has_long_digit_run(b"[1, 123456789012345678, 0.123456789012345678]")
    assert not has_long_digit_run(b"[0.00012345678901234567, -0.00012345678901234567]")  # decimals: both agree
    assert has_long_digit_run(b"[1234567890123456789]") and has_long_digit_run(b"1234567890123456789")
    assert has_long_digit_run(b"[-1234567890123456789]") and has_long_digit_run(b"[1.5e1234567890123456789]")
    for cut in range(0, 21):  # the run straddles the boundary of two scanned pieces
        raw = b" " * (size - cut) + b"1" * 19 + b" "
        assert has_long_digit_run(raw), cut
        assert not has_long_digit_run(b" " * (size - cut) + b"1" * 18 + b" ")
        assert not has_long_digit_run(b" " * (size - cut) + b"." + b"1" * 25 + b" "), cut


def test_full_precision_small_floats_keep_the_fast_path(tmp_path, monkeypatch):
    p = _write(tmp_path, json.dumps({"a": [0.00012345678901234567, 1.2345678901234567e-05, 0.1 + 0.2]}))
    monkeypatch.setattr(json_fast.json, "load", lambda fh: pytest.fail("json.load was asked"))
    assert load_json_path(p) == {"a": [0.00012345678901234567, 1.2345678901234567e-05, 0.1 + 0.2]}


def _omni3d_like(n: int = 40) -> dict:
    anns = [{"id": i, "image_id": i // 3, "category_name": ["chair", "a}, {b", 'q"}, {"x'][i % 3],
             "bbox3D_cam": [[0.1 * i, -0.0, 2.5]] * 2, "seg": [{"k": i}, {"k": -i}], "v": 1e-7 * i}
            for i in range(n)]
    return {"info": {"note": 'looks like "annotations": [{}, {}] but is a string'},
            "images": [{"id": j, "file_path": f"a/{j}.png"} for j in range(n // 3 + 1)],
            "categories": [{"id": 0, "name": "chair"}], "annotations": anns}


PIECE_DOCS = {
    "omni3d-like": json.dumps(_omni3d_like()),
    "indented": json.dumps(_omni3d_like(), indent=2),
    "not last": json.dumps({"annotations": _omni3d_like()["annotations"], "images": [1, 2], "z": {"a": [{}]}}),
    "nested twin": json.dumps({"info": {"annotations": [{"a": 1}, {"a": 2}]}, **_omni3d_like()}),
    "repeated key": '{"annotations": [{"a": 1}, {"a": 2}], "b": 1, "annotations": [{"c": 3}, {"c": 4}]}',
    "repeated, not an array": '{"annotations": [{"a": 1}, {"a": 2}, {"a": 3}], "annotations": null}',
    "empty": '{"images": [{"id": 1}, {"id": 2}], "annotations": []}',
    "no such array": json.dumps({"images": _omni3d_like()["images"]}),
    "top array": json.dumps([{"annotations": [{"a": 1}, {"a": 2}]}]),
    "NaN in a piece": json.dumps(_omni3d_like())[:-2] + ', {"v": NaN}]}',
}


@pytest.mark.parametrize("piece", [1, 40, 300, 10**9])
@pytest.mark.parametrize("name", sorted(PIECE_DOCS))
def test_a_large_file_parsed_in_pieces_is_json_loads(tmp_path, monkeypatch, name, piece):
    """Cuts land anywhere a `},{` is (inside strings, inside nested arrays, in another member): the result is
    json.load's whatever the piece size, because a wrong cut cannot pass the parses (or goes to json.load)."""
    monkeypatch.setattr(json_fast, "PIECE_BYTES", piece)
    p = _write(tmp_path, PIECE_DOCS[name])
    assert repr(load_json_path(p, split="annotations")) == repr(_stdlib(p))


def test_pieces_are_parsed_by_orjson_and_hold_less_at_once(tmp_path, monkeypatch):
    p = _write(tmp_path, PIECE_DOCS["indented"])
    sizes = []
    real = orjson.loads
    monkeypatch.setattr(json_fast, "PIECE_BYTES", 500)
    monkeypatch.setattr(json_fast.orjson, "loads", lambda b: sizes.append(len(b)) or real(b))
    monkeypatch.setattr(json_fast.json, "load", lambda fh: pytest.fail("json.load was asked"))
    assert load_json_path(p, split="annotations") == _omni3d_like()
    assert len(sizes) > 5 and max(sizes) < p.stat().st_size / 4


def test_a_broken_piece_reports_json_loads_error(tmp_path, monkeypatch):
    monkeypatch.setattr(json_fast, "PIECE_BYTES", 100)
    text = PIECE_DOCS["indented"]
    cut = text.index('"v"', len(text) * 3 // 4)
    p = _write(tmp_path, text[:cut] + '"v": 1.2.3,' + text[cut:])  # invalid late in the last pieces
    with pytest.raises(json.JSONDecodeError) as want:
        _stdlib(p)
    with pytest.raises(json.JSONDecodeError) as got:
        load_json_path(p, split="annotations")
    assert (str(got.value), got.value.lineno, got.value.colno) == (str(want.value), want.value.lineno, want.value.colno)


def test_a_large_file_without_a_split_array_is_parsed_by_json_load(tmp_path, monkeypatch):
    monkeypatch.setattr(json_fast, "PIECE_BYTES", 10)
    calls = []
    real = json.load
    monkeypatch.setattr(json_fast.json, "load", lambda fh: calls.append(1) or real(fh))
    p = _write(tmp_path, PIECE_DOCS["omni3d-like"])
    assert load_json_path(p) == _omni3d_like() and calls == [1]  # orjson's whole-file memory is not paid
