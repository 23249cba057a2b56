"""`pipelines.sources.omni3d_lean`: exactly `read_omni3d`'s results (then det3d's transform), in pieces or not.

Every case is compared, result by result and by `repr` (types too), with `read_omni3d([path], ...,
check_files=False, ann_fields=...)` followed by the same transform, for 1 to 4 pieces. Cases that the fast path
must list itself assert that it did (the serial reader is made to fail); cases it must leave to the serial
reader assert that it did.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from pipelines.corpora.det3d import builder as det3d
from pipelines.engine.stage import Reject
from pipelines.sources import omni3d_lean
from pipelines.sources.common import SourceError
from pipelines.sources.omni3d import TRAIN_RULES, read_omni3d

pytestmark = pytest.mark.skipif(not omni3d_lean.available(), reason="msgspec not installed")

FIELDS = det3d._OMNI3D_FIELDS
ITEM = det3d._omni3d_trimmed_item


def _reference(path: Path, root: Path) -> list[Any]:
    return [r if isinstance(r, Reject) else ITEM(r)
            for r in read_omni3d([path], root, TRAIN_RULES, check_files=False, ann_fields=FIELDS)]


def _lean(path: Path, root: Path, pieces: int, fork: bool = False, transform: Any = ITEM) -> list[Any]:
    return list(omni3d_lean.read_omni3d_lean(path, root, TRAIN_RULES, FIELDS, transform, pieces, fork=fork))


def _same(got: list[Any], want: list[Any]) -> None:
    assert got == want
    assert repr(got) == repr(want)  # types too: an int stays an int, a float a float, a list a list


@pytest.fixture
def no_serial_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path must list the file itself: the serial reader it would fall back to fails."""
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the fast path fell back to read_omni3d")

    monkeypatch.setattr(omni3d_lean, "read_omni3d", refuse)


def _world_doc(sample_world: Any, n_images: int = 48) -> dict[str, Any]:
    """The sample world's Omni3D file with its images (and their annotations) repeated under new ids."""
    doc = json.loads(sample_world.omni3d_files[0].read_text())
    base, anns = doc["images"], doc["annotations"]
    doc["images"], doc["annotations"] = [], []
    for k in range(n_images):
        r, img = divmod(k, len(base))
        new_id = 10**6 * r + base[img]["id"]
        doc["images"].append({**base[img], "id": new_id})
        doc["annotations"] += [{**a, "id": 10**6 * r + a["id"], "image_id": new_id} for a in anns
                               if a["image_id"] == base[img]["id"]]
    return doc


def _write(tmp_path: Path, doc: Any, name: str = "Case_train.json", **dump: Any) -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc, **dump))
    return p


@pytest.mark.parametrize("pieces", [1, 2, 3, 4])
def test_sample_world_file_in_pieces(sample_world: Any, tmp_path: Path, pieces: int, no_serial_reader: None) -> None:
    for path in (sample_world.omni3d_files[0], _write(tmp_path, _world_doc(sample_world))):
        want = _reference(path, sample_world.root)
        assert sum(not isinstance(r, Reject) for r in want) >= 4
        _same(_lean(path, sample_world.root, pieces), want)


_FORKED_CHECK = """
import sys
from pathlib import Path
from pipelines.corpora.det3d import builder as det3d
from pipelines.engine.plan import _encoded_chunks, decode_item, encode_inputs
from pipelines.engine.stage import Reject
from tests.test_omni3d_lean import _lean, _same
from pipelines.sources.omni3d import TRAIN_RULES, read_omni3d

def _reference(path, root):
    items = read_omni3d([path], root, TRAIN_RULES, check_files=False, ann_fields=det3d._OMNI3D_FIELDS)
    return [r if isinstance(r, Reject) else det3d._omni3d_trimmed_item(r) for r in items]

path, root, es = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
from pipelines.sources import omni3d_lean
b = det3d.make_builder(det3d.Det3dBuildConfig([path], es, root))
real_msgspec = omni3d_lean.msgspec
omni3d_lean.msgspec = None  # the reference listing: read_omni3d for every file
want = encode_inputs(det3d.iter_inputs(b.config)).pairs
omni3d_lean.msgspec = real_msgspec
def refuse(*_a, **_k):
    raise AssertionError("the fast path fell back to read_omni3d")
omni3d_lean.read_omni3d = refuse  # from here on, the fast path must list the file itself
serial = _lean(path, root, 1)
_same(_lean(path, root, 2, fork=True), serial)
enc = _lean(path, root, 3, fork=True, transform=det3d._encoded_omni3d_item)
assert [e if isinstance(e, Reject) else decode_item(e.blob) for e in enc] == serial == _reference(path, root)
# the build's listing: one Omni3D file in forked pieces, the reference listing's keys, items and chunk digests
det3d.PIECES_MIN_BYTES = 0
assert det3d._piece_workers("omni3d", str(path)) > 1
got = encode_inputs(b.list_inputs(b.config)).pairs
assert [(k, decode_item(v)) for k, v in got] == [(k, decode_item(v)) for k, v in want]
assert [c.digest for c in _encoded_chunks(got, 7)] == [c.digest for c in _encoded_chunks(want, 7)]
print("forked pieces: same results")
"""


def test_forked_pieces_and_the_build_listing(sample_world: Any, tmp_path: Path) -> None:
    """Forked workers (the build's way) give the same items, encoded ones decode to them, and the det3d listing
    with its one Omni3D file in forked pieces makes the serial listing's keys, items and chunk digests. Run in a
    fresh interpreter: a fork is only taken from a process running no other thread, and earlier tests leave
    some in this one."""
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the listing never forks")
    path = _write(tmp_path, _damaged(_world_doc(sample_world)))
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _FORKED_CHECK, str(path), str(sample_world.root),
                          *map(str, sample_world.embodiedscan_files)],
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "forked pieces: same results" in res.stdout


def _damaged(doc: dict[str, Any]) -> dict[str, Any]:
    """The sample world's file with one of every kind of damage the pieces must reproduce exactly."""
    anns, images = doc["annotations"], doc["images"]
    # the last images are left whole, so the annotation damage is seen (not dropped with a rejected image)
    anns[-1]["bbox3D_cam"][0][0] = 1e-5  # an exponent in the text: parsed, not trusted from its text
    anns[-2]["bbox3D_cam"] = anns[-2]["bbox3D_cam"][:7]  # 7 rows: malformed
    anns[-3]["bbox3D_cam"][3] = [True, 0.0, 1.0]  # a literal: parsed; numpy reads true as 1.0
    anns[-4]["bbox3D_cam"][2][1] = "0.5"  # a string: malformed
    anns[-5].pop("bbox3D_cam")  # absent: malformed
    anns[-6]["bbox3D_cam"][1][2] = int("9" * 320)  # beyond float64: malformed (it once ended the listing)
    anns[-7]["center_cam"] = [0.0, 1.0]  # a short kept field
    anns[-8]["category_name"] = "x" * 500
    anns[-9]["visibility"] = None
    anns[-10].pop("dimensions")
    anns[10]["image_id"] = 10**9  # an orphan
    anns[11]["image_id"] = 10**9 + 1
    anns[12]["image_id"] = 10**9  # the first orphan's image again, later
    anns[13]["extra"] = {"nested": [1, 2, {"deep": "},{"}]}  # an unknown field with the cut's bytes inside
    anns[-11]["visibility"] = int("9" * 400)  # beyond float64 in a rule's field: "not available", as inf
    anns[-12]["bbox2D_trunc"] = [0, 0, int("9" * 400), 10]  # an unusable 2D box
    for a in anns:  # a rejected image's annotations are never looked at, however broken (they come first: an edge)
        if a["image_id"] == images[1]["id"]:
            a["truncation"] = int("9" * 400)
            a["center_cam"] = "not a list"
    images[8]["height"] = int("9" * 400)  # an absurd size: bad_image_size (it once ended the listing)
    images[1]["K"][0][0] = 0.0  # bad intrinsics: rejected, its annotations unused
    images[2]["width"] = -5
    images[3]["file_path"] = "../../etc/passwd"
    images[4]["id"] = images[5]["id"]  # a duplicate id: both rejected
    images[6] = {"no_id": 1}  # a malformed image
    images[7]["id"] = 10**12  # a valid image without annotations
    return doc


@pytest.mark.parametrize("pieces", [1, 2, 3, 4])
def test_damage_listed_by_the_fast_path_exactly(sample_world: Any, tmp_path: Path, pieces: int,
                                                no_serial_reader: None) -> None:
    path = _write(tmp_path, _damaged(_world_doc(sample_world)))
    got = _lean(path, sample_world.root, pieces)
    _same(got, _reference(path, sample_world.root))  # this module's read_omni3d is the real one
    reasons = {r.reason for r in got if isinstance(r, Reject)}
    assert {"orphan_annotation", "bad_intrinsics", "bad_image_size", "path_escapes_root", "duplicate_image_id",
            "malformed_image"} <= reasons
    assert sum(r.reason == "bad_image_size" for r in got if isinstance(r, Reject)) == 2
    ignored = {x for it in got if isinstance(it, dict) for a in it["annotations"] for x in a["ignore_reasons"]}
    assert {"malformed_bbox3D_cam", "malformed_center_cam", "malformed_category_name",
            "malformed_dimensions"} <= ignored


def _fallback_cases(doc: dict[str, Any]) -> dict[str, str]:
    """Files the fast path must leave to `read_omni3d` (text; results or errors must be the same)."""
    cases: dict[str, str] = {}
    d = json.loads(json.dumps(doc))
    d["annotations"][3]["image_id"] = True  # a bool id groups with the int 1 in a dict
    cases["bool_image_id"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    d["annotations"][3]["image_id"] = float(d["annotations"][3]["image_id"])
    cases["float_image_id"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    d["images"][0]["id"] = True
    cases["bool_image"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    d["annotations"].insert(5, 7)
    cases["non_dict_annotation"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    d["annotations"][4]["visibility"] = float("nan")
    cases["nan_literal"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    d["annotations"][4]["depth_error"] = 1e400
    cases["overflow_in_kept_field"] = json.dumps(d).replace("Infinity", "1e400")
    d = json.loads(json.dumps(doc))
    d["info"] = {"split": "train", "note": "\ud800"}
    cases["lone_surrogate"] = json.dumps(d)
    d = json.loads(json.dumps(doc))
    cases["annotations_not_last"] = json.dumps({"annotations": d["annotations"], "images": d["images"],
                                                 "categories": d["categories"]})
    cases["truncated"] = json.dumps(doc)[:-5000]
    cases["not_an_object"] = "[1, 2, 3]"
    return cases


@pytest.mark.parametrize("case", ["bool_image_id", "float_image_id", "bool_image", "non_dict_annotation",
                                  "nan_literal", "overflow_in_kept_field", "lone_surrogate", "annotations_not_last",
                                  "truncated", "not_an_object"])
def test_what_the_fast_path_is_not_sure_of_goes_to_read_omni3d(sample_world: Any, tmp_path: Path, case: str) -> None:
    text = _fallback_cases(_world_doc(sample_world))[case]
    path = _write(tmp_path, text)
    try:
        want: Any = _reference(path, sample_world.root)
    except SourceError as exc:
        want = exc
    for pieces in (1, 3):
        try:
            got: Any = _lean(path, sample_world.root, pieces)
        except SourceError as exc:
            assert isinstance(want, SourceError) and str(exc) == str(want)
            continue
        _same(got, want)
    assert omni3d_lean._lean_results(path, sample_world.root, TRAIN_RULES, FIELDS, ITEM, 3, fork=False) is None


def test_invalid_utf8_in_a_skipped_field_is_the_serial_error(sample_world: Any, tmp_path: Path) -> None:
    """msgspec skips unknown fields without checking their UTF-8; the file is still refused as json.load does."""
    text = json.dumps(_world_doc(sample_world)).encode()
    i = text.index(b'"category_id"')
    path = tmp_path / "Bytes_train.json"
    path.write_bytes(text[:i] + b'"junk": "\xff\xfe", ' + text[i:])
    with pytest.raises(SourceError) as want:
        _reference(path, sample_world.root)
    with pytest.raises(SourceError) as got:
        _lean(path, sample_world.root, 2)
    assert str(got.value) == str(want.value) and "UTF-8" in str(got.value)


@pytest.mark.parametrize("seed", range(6))
def test_random_orders_and_damage(sample_world: Any, tmp_path: Path, seed: int) -> None:
    """Annotations kept together per image or scattered, images shuffled, pieces 1-4, dumped compact or indented:
    the same results as the serial reader (scattered files may fall back; grouped ones never do)."""
    rnd = random.Random(seed)
    doc = _damaged(_world_doc(sample_world)) if seed % 2 else _world_doc(sample_world)
    rnd.shuffle(doc["images"])
    scattered = seed % 3 == 0
    if scattered:
        rnd.shuffle(doc["annotations"])
    else:  # kept together per image, in a random image order
        order = {iid: rnd.random() for iid in {a["image_id"] for a in doc["annotations"]}}
        doc["annotations"].sort(key=lambda a: order[a["image_id"]])
    path = _write(tmp_path, doc, indent=rnd.choice([None, 1]))
    want = _reference(path, sample_world.root)
    for pieces in (1, 2, 3, 4):
        _same(_lean(path, sample_world.root, pieces), want)
    if not scattered:
        results = omni3d_lean._lean_results(path, sample_world.root, TRAIN_RULES, FIELDS, ITEM, 4, fork=False)
        assert results is not None  # listed by the fast path


def test_serial_listing_parses_in_small_pieces(sample_world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_serial_reader: None) -> None:
    """Listed in this process, a file is cut into ~SERIAL_PIECE_BYTES pieces (another thread gets the GIL between
    them), with the same results."""
    path = _write(tmp_path, _world_doc(sample_world))  # no "},{" inside a string: every cut is a real one
    want = _reference(path, sample_world.root)
    seen: list[int] = []
    real = omni3d_lean.cut_points
    monkeypatch.setattr(omni3d_lean, "cut_points", lambda *a: seen.append(len(real(*a))) or real(*a))
    monkeypatch.setattr(omni3d_lean, "SERIAL_PIECE_BYTES", 4096)
    _same(_lean(path, sample_world.root, 1), want)
    assert seen and seen[0] > 10


def test_pieces_join_an_image_split_between_them(sample_world: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 no_serial_reader: None) -> None:
    """With 4 pieces, some image's annotations straddle a cut, and the driver joins them (same results)."""
    path = _write(tmp_path, _world_doc(sample_world))
    seen: list[list[Any]] = []
    real = omni3d_lean._merge
    monkeypatch.setattr(omni3d_lean, "_merge", lambda ctx, pieces: seen.append(pieces) or real(ctx, pieces))
    _same(_lean(path, sample_world.root, 4), _reference(path, sample_world.root))
    pieces = seen[0]
    assert len(pieces) == 4
    split = [iid for iid in pieces[0].present if any(iid in p.present for p in pieces[1:])]
    assert split and all(iid in pieces[0].edges for iid in split)


def test_empty_annotations_and_deep_nesting(sample_world: Any, tmp_path: Path) -> None:
    """No annotations at all: listed by the fast path, every image without boxes. A skipped field nested near the
    interpreter's limit: the fast path refuses it first, so the file gets read_omni3d's verdict."""
    import sys

    doc = _world_doc(sample_world)
    doc["annotations"] = []
    path = _write(tmp_path, doc)
    assert omni3d_lean._lean_results(path, sample_world.root, TRAIN_RULES, FIELDS, ITEM, 2, fork=False) is not None
    _same(_lean(path, sample_world.root, 2), _reference(path, sample_world.root))
    for depth in (sys.getrecursionlimit() - 250, sys.getrecursionlimit() - 4):
        doc = _world_doc(sample_world)
        text = json.dumps(doc)
        i = text.index('"category_id"')
        path = _write(tmp_path, text[:i] + '"deep": ' + "[" * depth + "]" * depth + ", " + text[i:])
        try:
            want: Any = _reference(path, sample_world.root)
        except SourceError as exc:
            want = str(exc)
        try:
            got: Any = _lean(path, sample_world.root, 2)
        except SourceError as exc:
            got = str(exc)
        assert got == want


def test_a_huge_integer_in_a_skipped_field_is_the_one_known_difference(sample_world: Any, tmp_path: Path) -> None:
    """An integer beyond Python's digit limit in a field the listing skips: json.load refuses the file (read_omni3d
    reports it as unreadable, it no longer crashes), msgspec skips the field (module docstring)."""
    import sys

    text = json.dumps(_world_doc(sample_world))
    i = text.index('"category_id"')
    path = _write(tmp_path, text[:i] + '"junk": ' + "7" * (sys.get_int_max_str_digits() + 10) + ", " + text[i:])
    with pytest.raises(SourceError, match="unreadable JSON"):
        _reference(path, sample_world.root)
    assert [r for r in _lean(path, sample_world.root, 2) if not isinstance(r, Reject)]
