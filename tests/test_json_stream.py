"""The streaming JSON parse (`pipelines.sources.json_stream`) gives exactly `json.load`'s result, or its error.

Every document is parsed with tiny buffers (1, 2, 3, 7 and 64 characters) so values are cut by buffer ends at
every possible place: inside escapes, surrogate pairs, numbers, literals, nested arrays and whitespace.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from pipelines.sources.json_stream import iter_object, load_object
from pipelines.sources.omni3d import load_omni3d_json

SIZES = (1, 2, 3, 7, 64)
STREAM = ("images", "annotations")

TRICKY = [
    '{"images": [], "annotations": []}',
    '  \n\t{ "annotations" :[ {"id":1,"image_id":2} , {"id":2}\n] ,"images":[{"id":2,"K":[[1.5e-7,0,-0.0],[1,2,3]]}]}\r\n ',
    '{"info": {"a": [1, [2, [3, []]]]}, "images": [{"file_path": "a\\"b\\\\c\\/d\\u00e9\\ud83d\\ude00\\n"}]}',
    '{"images": [123456789012345678901234567890, -1E+400, 1e-400, 0.1, -0, true, false, null, "x"]}',
    '{"images": [NaN, Infinity, -Infinity]}',
    '{"images": "not a list", "annotations": {"a": 1}}',
    '{"images": [1], "other": [1, 2], "images": [2, 3]}',  # repeated key: the last wins, first's place
    '{"caf\\u00e9": "\u00b5\u4e2d\u6587", "images": [{"name": "\u00e9\U0001f600"}]}',
    '{}',
    '[{"images": []}]',
    '"just a string"',
    '12345',
]

BAD = [
    '',
    '{',
    '{"images": [1, 2',
    '{"images": [1, 2,]}',
    '{"images": [1 2]}',
    '{"images" [1]}',
    '{"a": 1,}',
    '{"a": 1} x',
    '{"images": [{"a": "unterminated}]}',
    '{"images": [tru]}',
    '{"a": 1}\n{"b": 2}',
    "{'a': 1}",
]


def _stream(text: str, size: int) -> object:
    return load_object(io.StringIO(text), STREAM, read_size=size)


@pytest.mark.parametrize("text", TRICKY)
def test_same_result_as_json_load(text: str) -> None:
    want = json.loads(text)
    for size in SIZES:
        got = _stream(text, size)
        assert json.dumps(got) == json.dumps(want) and type(got) is type(want), size  # NaN != NaN: compare text
        if isinstance(want, dict):
            assert list(got) == list(want)  # key order too


@pytest.mark.parametrize("text", BAD)
def test_same_error_as_json_load(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    for size in SIZES:
        with pytest.raises(json.JSONDecodeError) as got:
            _stream(text, size)
        assert got.value.lineno == ref.value.lineno or "Extra data" in str(got.value), (size, got.value, ref.value)


def test_every_truncation_of_a_document_raises() -> None:
    """A file cut anywhere is an error, never a shorter result (a build must not lose the tail silently)."""
    text = json.dumps({"info": {"v": 1}, "images": [{"id": i, "K": [[1.0, 0, 2], [0, 1, 2]], "s": "\u00e9\\x"}
                                                    for i in range(3)], "annotations": [{"id": 7}]}, indent=1)
    for cut in range(len(text.rstrip())):
        with pytest.raises(json.JSONDecodeError):
            _stream(text[:cut], 5)


def test_error_line_and_column_are_the_whole_files() -> None:
    text = '{\n "images": [\n  1,\n  2,\n  3 4\n ]\n}'
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    for size in SIZES:
        with pytest.raises(json.JSONDecodeError) as got:
            _stream(text, size)
        assert (got.value.lineno, got.value.colno, got.value.pos) == (ref.value.lineno, ref.value.colno, ref.value.pos)


def test_random_documents_match_json_load() -> None:
    rng = random.Random(0)
    alphabet = ['a', '"', '\\', '\n', '\u00e9', '\U0001f600', ' ', '/', '\t', '\x01']

    def val(depth: int) -> object:
        k = rng.randrange(7 if depth < 3 else 4)
        if k == 0:
            return rng.choice([None, True, False])
        if k == 1:
            return rng.choice([rng.randint(-10**20, 10**20), rng.uniform(-1e9, 1e9), rng.random() * 1e-300])
        if k in (2, 3):
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        if k in (4, 5):
            return [val(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{j}{rng.choice(alphabet)}": val(depth + 1) for j in range(rng.randrange(4))}

    for _ in range(60):
        doc = {"images": [val(0) for _ in range(rng.randrange(5))], "x": val(0),
               "annotations": [val(0) for _ in range(rng.randrange(5))]}
        text = json.dumps(doc, indent=rng.choice([None, 0, 2]), ensure_ascii=rng.random() < 0.5)
        for size in (1, 3, 17):
            assert _stream(text, size) == json.loads(text)


def test_elements_come_one_at_a_time(tmp_path: Path) -> None:
    """The arrays' elements are handed over as parsed: the consumer need not keep them (the point of it)."""
    events = list(iter_object(io.StringIO('{"a": 1, "images": [{"id": 1}, {"id": 2}], "b": [3]}'), STREAM, 4))
    assert events == [("member", "a", 1), ("array", "images", None), ("item", "images", {"id": 1}),
                      ("item", "images", {"id": 2}), ("member", "b", [3])]


def test_omni3d_loader_streams_as_json_load_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.sources.json_stream as js
    import pipelines.sources.omni3d as omni3d

    monkeypatch.setattr(omni3d, "STREAM_ABOVE_BYTES", 0)  # stream even a small file
    monkeypatch.setattr(js, "READ_SIZE", 64)  # in many buffers
    doc = {"info": {"split": "train"}, "annotations": [{"id": i, "image_id": i // 2, "bbox3D_cam": [[0.5, 1, 2]] * 8,
                                                        "category_name": "chair\u00e9"} for i in range(10)],
           "categories": [{"id": 0, "name": "chair"}],
           "images": [{"id": i, "K": [[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]], "file_path": f"a/{i}.jpg"}
                      for i in range(5)]}
    path = tmp_path / "X_train.json"
    path.write_text(json.dumps(doc, indent=1))
    assert load_omni3d_json(path) == json.loads(path.read_text()) == doc
    path.write_text(json.dumps(doc)[:-20])
    with pytest.raises(Exception, match=r"X_train\.json.*invalid or truncated JSON at line 1"):
        load_omni3d_json(path)
