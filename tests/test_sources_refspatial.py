"""RefSpatial reader: streaming JSON arrays, str/list paths, per-file roots, damaged records and files."""

from __future__ import annotations

import json

import pytest

from pipelines.sources import RefSpatialFile, SourceError, iter_json_array, read_refspatial, split_results
from pipelines.sources.refspatial import DEFAULT_LAYOUT, default_files
from shards.keys import validate_key


def test_round_trip_matches_the_files(sample_world):
    items, rejects = split_results(read_refspatial(sample_world.refspatial_files))
    assert rejects == []
    raw = []
    for spec in sample_world.manifest["files"]["refspatial"]:
        raw += [(spec, r) for r in json.loads((sample_world.root / spec["json"]).read_text())]
    assert len(items) == len(raw) == sample_world.manifest["counts"]["refspatial_records"]
    forms = set()
    for it, (spec, rec) in zip(items, raw, strict=True):
        forms.add(type(rec["image"]).__name__)
        assert it["id"] == rec["id"] == it["source"]["id"] and it["conversations"] == rec["conversations"]
        image = rec["image"] if isinstance(rec["image"], str) else rec["image"][0]
        assert it["image_paths"] == [str(sample_world.root / spec["image_root"] / image)] and it["image_path"] == it["image_paths"][0]
        depth = rec["depth"] if isinstance(rec["depth"], str) else rec["depth"][0]
        assert it["depth_paths"] == [str(sample_world.root / spec["depth_root"] / depth)]
        assert it["source"]["file"] == spec["json"].removeprefix("RefSpatial/")
        assert validate_key(it["key"]) and it["key"].startswith("refspatial/3D/")
    assert forms == {"str", "list"}
    assert len({it["key"] for it in items}) == len(items)


def _write_array(path, elements, sep=",\n"):
    path.write_text("[" + sep.join(json.dumps(e, ensure_ascii=False) for e in elements) + "]")


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_streaming_equals_json_load_at_any_chunk_size(tmp_path, chunk):
    elements = [
        {"id": "a", "s": "brackets ] [ and , commas, \"quotes\" and \\ backslashes", "n": [1, 2.5e-3, -7]},
        {"id": "é✓", "emoji": "🙂", "nested": {"x": [[], {}], "t": True, "f": None}},
        {"id": "big", "v": "x" * 5000},
        {},
    ]
    p = tmp_path / "a.json"
    _write_array(p, elements, sep=" ,\n\t ")
    assert list(iter_json_array(p, chunk_chars=chunk)) == json.loads(p.read_text())
    p.write_text("  [ ]  \n")
    assert list(iter_json_array(p, chunk_chars=chunk)) == []


def test_truncated_and_invalid_files_raise_after_the_good_prefix(tmp_path):
    p = tmp_path / "t.json"
    _write_array(p, [{"id": i, "pad": "y" * 100} for i in range(5)])
    text = p.read_text()
    p.write_text(text[: len(text) - 60])
    got = []
    with pytest.raises(SourceError, match=r"t\.json.*truncated") as exc:
        for x in iter_json_array(p, chunk_chars=50):
            got.append(x)
    assert [g["id"] for g in got] == [0, 1, 2, 3] and "element 4" in str(exc.value)
    p.write_text(text[:-1])  # only the closing bracket missing
    with pytest.raises(SourceError, match="without ']'"):
        list(iter_json_array(p))
    p.write_text('{"id": 1}')
    with pytest.raises(SourceError, match="not a JSON array"):
        list(iter_json_array(p))
    p.write_text('[{"id": 1} {"id": 2}]')
    with pytest.raises(SourceError, match="expected ','"):
        list(iter_json_array(p))
    p.write_text('[{"id": 1}] trailing')
    with pytest.raises(SourceError, match="after the closing"):
        list(iter_json_array(p))
    p.write_bytes(b'[{"id": "\xff\xfe"}]')
    with pytest.raises(SourceError, match="UTF-8"):
        list(iter_json_array(p))


def _spec(sample_world, tmp_path, records, **kw):
    p = tmp_path / "3D" / "reasoning_template_qa.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_array(p, records)
    roots = sample_world.manifest["files"]["refspatial"][0]
    return RefSpatialFile(p, sample_world.root / roots["image_root"], sample_world.root / roots["depth_root"], **kw)


GOOD = {"id": "r", "image": "scene0000/image/000000.png", "depth": ["scene0000_000000_depth.png"],
        "conversations": [{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "[(0.5, 0.5)]"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"image": "scene0000/image/nope.png"}, "missing_image"),
        ({"image": ["scene0000/image/000000.png", "scene0000/image/nope.png"]}, "missing_image"),
        ({"image": "../../../etc/passwd"}, "path_escapes_root"),
        ({"depth": "../x.png"}, "path_escapes_root"),
        ({"image": []}, "malformed_record"),
        ({"image": 5}, "malformed_record"),
        ({"depth": [1]}, "malformed_record"),
        ({"conversations": []}, "malformed_record"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "malformed_record"),
    ],
)
def test_bad_record_is_rejected_and_the_rest_is_read(sample_world, tmp_path, change, reason):
    spec = _spec(sample_world, tmp_path, [GOOD, {**GOOD, **change}, GOOD, "not an object"])
    items, rejects = split_results(read_refspatial([spec]))
    assert [r.reason for r in rejects] == [reason, "malformed_record"]
    assert [it["record_index"] for it in items] == [0, 2]
    assert rejects[0].key == "refspatial/3D/reasoning_template_qa/00000001" and "record 1" in rejects[0].message


def test_missing_depth_is_a_warning_unless_required(sample_world, tmp_path):
    spec = _spec(sample_world, tmp_path, [{**GOOD, "depth": "nope.png"}, {k: v for k, v in GOOD.items() if k != "depth"}])
    items, rejects = split_results(read_refspatial([spec]))
    assert not rejects and items[0]["depth_paths"] == [] and "nope.png" in items[0]["warnings"][0]
    assert items[1]["depth_paths"] == [] and items[1]["warnings"] == []
    items, rejects = split_results(read_refspatial([spec], require_depth=True))
    assert [r.reason for r in rejects] == ["missing_depth"] and len(items) == 1


def test_default_layout_follows_the_release_table(tmp_path):
    for rel in ("3D/choice_qa.json", "3D/visual_choice_qa.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("[]")
    files = default_files(tmp_path)
    assert [f.file_tag() for f in files] == ["3D/choice_qa", "3D/visual_choice_qa"]
    vc = files[1]
    assert vc.image_root == tmp_path / "3D/image_visual_choice" and vc.depth_root == tmp_path / "3D/depth"
    assert DEFAULT_LAYOUT["3D/multi_view_qa.json"] == ("3D/image_multi_view", "3D/depth_multi_view")
    assert list(read_refspatial(files)) == []
