"""Omni3D reader: round trip of the sample world, ignore rules, and damaged inputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from pipelines.sources import SourceError, read_omni3d, split_results
from pipelines.sources.omni3d import EVAL_RULES, NO_RULES, TRAIN_RULES, ignore_reasons
from shards.keys import validate_key


def _files(world):
    return [str(p) for p in world.omni3d_files]


def test_round_trip_matches_ground_truth(sample_world):
    items, rejects = split_results(read_omni3d(_files(sample_world), sample_world.root))
    assert rejects == []
    gt_views = {v["omni3d_image_id"]: (s, v) for s in sample_world.ground_truth["scenes"] for v in s["views"]}
    assert len(items) == len(gt_views) == 6
    keys = [it["key"] for it in items]
    assert len(set(keys)) == len(keys) and all(validate_key(k) for k in keys)
    splits = set()
    for it in items:
        s, v = gt_views[it["image_id"]]
        assert it["format"] == "omni3d" and it["source"]["dataset"] == "SampleWorld"
        assert it["source"]["file"] in ("Omni3D/SampleWorld_train.json", "Omni3D/SampleWorld_val.json")
        assert it["split"] == s["split"]
        splits.add(it["split"])
        assert it["image_path"] == str(sample_world.root / v["image"])
        assert isinstance(it["K"], np.ndarray) and np.allclose(it["K"], v["K"])
        assert (it["width"], it["height"]) == (v["width"], v["height"])
        by_id = {a["id"]: a for a in it["annotations"]}
        assert sorted(by_id) == sorted(o["omni3d_annotation_id"] for o in v["objects"])
        for o in v["objects"]:
            a = by_id[o["omni3d_annotation_id"]]
            assert a["segmentation_pts"] == o["visible_pixels"]
            assert a["ignore"] == bool(a["ignore_reasons"])
            if o["visible_pixels"] == 0:
                assert "no_segmentation_points" in a["ignore_reasons"]
            if a["behind_camera"]:
                assert "behind_camera" in a["ignore_reasons"]
    assert splits == {"train", "val"}
    # not everything is ignored, not nothing: the default rules bite on this world
    flags = [a["ignore"] for it in items for a in it["annotations"]]
    assert any(flags) and not all(flags)


def test_reading_is_deterministic(sample_world):
    a = [(it["key"], len(it["annotations"])) for it in read_omni3d(_files(sample_world), sample_world.root)]
    b = [(it["key"], len(it["annotations"])) for it in read_omni3d(_files(sample_world), sample_world.root)]
    assert a == b


def _ann(**kw):
    base = {
        "id": 1, "image_id": 1, "category_name": "chair", "valid3D": True, "behind_camera": False,
        "bbox3D_cam": [[0, 0, 3]] * 8, "center_cam": [0, 0, 3.0], "dimensions": [0.5, 0.9, 0.5],
        "R_cam": np.eye(3).tolist(), "bbox2D_proj": [10, 10, 60, 200], "bbox2D_trunc": [10, 10, 60, 200],
        "visibility": 0.9, "truncation": 0.0, "lidar_pts": 100, "segmentation_pts": 100, "depth_error": 0.01,
    }  # fmt: skip
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"behind_camera": True}, "behind_camera"),
        ({"valid3D": False}, "invalid_3d"),
        ({"dimensions": [0.5, 0.0, 0.5]}, "nonpositive_dimensions"),
        ({"lidar_pts": 0}, "no_lidar_points"),
        ({"segmentation_pts": 0}, "no_segmentation_points"),
        ({"depth_error": 0.6}, "depth_error"),
        ({"bbox2D_trunc": [10, 10, 60, 40], "bbox2D_proj": [10, 10, 60, 40]}, "too_short"),  # 30 px <= 0.0625 * 480
        ({"bbox2D_trunc": [10, -400, 60, 400]}, "too_tall"),
        ({"truncation": 0.34}, "truncated"),
        ({"visibility": 0.3}, "occluded"),
        ({"category_name": "dontcare"}, "ignore_category"),
        ({"bbox2D_trunc": [-1, -1, -1, -1], "bbox2D_proj": [-1, -1, -1, -1]}, "no_2d_box"),
        ({"bbox3D_cam": [[0, 0, 3]] * 7}, "malformed_bbox3D_cam"),
        ({"R_cam": [[float("nan")] * 3] * 3}, "malformed_R_cam"),
    ],
)
def test_each_default_ignore_rule(change, reason):
    assert ignore_reasons(_ann(), 480.0) == []
    assert reason in ignore_reasons(_ann(**change), 480.0)


def test_ignore_rules_are_selectable():
    a = _ann(truncation=0.5, visibility=0.3)
    assert set(ignore_reasons(a, 480.0, EVAL_RULES)) == {"truncated", "occluded"}
    assert ignore_reasons(a, 480.0, TRAIN_RULES) == []  # Base.yaml: TRUNC 0.75, VIS 0.25
    assert ignore_reasons(_ann(lidar_pts=0, segmentation_pts=0, depth_error=3.0), 480.0, NO_RULES) == []
    assert ignore_reasons(_ann(visibility=-1, truncation=-1), 480.0) == []  # -1 = unavailable, not a failure
    with pytest.raises(ValueError, match="preset"):
        list(read_omni3d([], ".", rules="strict"))


def _damaged(world, tmp_path, edit):
    src = json.loads(world.omni3d_files[0].read_text())
    data = copy.deepcopy(src)
    edit(data)
    p = tmp_path / "SampleWorld_train.json"
    p.write_text(json.dumps(data))  # allow_nan: NaN is written as the bare token NaN, as some dumps do
    return p


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda im: im.update(file_path="sample_world/scene0000/image/missing.png"), "missing_image"),
        (lambda im: im["K"][0].__setitem__(0, 0.0), "bad_intrinsics"),
        (lambda im: im["K"][0].__setitem__(0, -500.0), "bad_intrinsics"),
        (lambda im: im["K"][1].__setitem__(1, float("nan")), "bad_intrinsics"),
        (lambda im: im.update(K=[[1, 0], [0, 1]]), "bad_intrinsics"),
        (lambda im: im.update(file_path="../../../etc/passwd"), "path_escapes_root"),
        (lambda im: im.update(file_path="/etc/passwd"), "path_escapes_root"),
        (lambda im: im.update(width=0), "bad_image_size"),
    ],
)
def test_bad_image_is_rejected_with_a_reason_and_the_rest_is_read(sample_world, tmp_path, edit, reason):
    p = _damaged(sample_world, tmp_path, lambda d: edit(d["images"][0]))
    items, rejects = split_results(read_omni3d([p], sample_world.root))
    n_images = len(json.loads(sample_world.omni3d_files[0].read_text())["images"])
    assert len(items) == n_images - 1
    assert [r.reason for r in rejects] == [reason]
    r = rejects[0]
    assert r.stage == "read" and r.key == items[0]["key"].rsplit("/", 1)[0] + "/1" and r.message
    assert set(r.to_dict()) == {"key", "stage", "reason", "message"}


def test_orphan_and_duplicate_and_malformed_entries(sample_world, tmp_path):
    def edit(d):
        d["annotations"].append({**d["annotations"][0], "id": 999, "image_id": 424242})
        d["images"].append(dict(d["images"][0]))  # same id again: both images are ambiguous
        d["images"].append("not an image")
        next(a for a in d["annotations"] if a["image_id"] == d["images"][1]["id"])["bbox3D_cam"] = [[0, 0]]

    p = _damaged(sample_world, tmp_path, edit)
    items, rejects = split_results(read_omni3d([p], sample_world.root))
    assert sorted(r.reason for r in rejects) == ["duplicate_image_id"] * 2 + ["malformed_image", "orphan_annotation"]
    bad = [a for it in items for a in it["annotations"] if a["ignore_reasons"] == ["malformed_bbox3D_cam"]]
    assert len(bad) == 1 and bad[0]["ignore"]


def test_duplicate_ids_across_files_are_rejected(sample_world, tmp_path):
    p = tmp_path / "Other_val.json"
    p.write_text(sample_world.omni3d_files[0].read_text())
    items, rejects = split_results(read_omni3d([sample_world.omni3d_files[0], p], sample_world.root))
    assert rejects and {r.reason for r in rejects} == {"duplicate_image_id"}
    assert len(items) == len(json.loads(p.read_text())["images"])


def test_truncated_or_wrong_json_raises_naming_the_file(sample_world, tmp_path):
    text = sample_world.omni3d_files[0].read_text()
    p = tmp_path / "Trunc_train.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(SourceError, match=r"Trunc_train\.json.*(truncated|invalid)"):
        list(read_omni3d([p], sample_world.root))
    p.write_text("[1, 2]")
    with pytest.raises(SourceError, match="top level must be an object"):
        list(read_omni3d([p], sample_world.root))
    with pytest.raises(SourceError, match="cannot read"):
        list(read_omni3d([tmp_path / "absent.json"], sample_world.root))


@pytest.mark.parametrize("value", [
    [1.0, 2.0, 3.0], [1, 2, 3], [1.0, 2, 3.5], [1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [1.0, float("nan"), 3.0],
    [1.0, float("inf"), 3.0], [True, 2.0, 3.0], ["1", 2.0, 3.0], [1.0, None, 3.0], [2**60, 1.0, 1.0],
    [10**400, 1.0, 1.0], (1.0, 2.0, 3.0), [[1.0], [2.0], [3.0]], None, "abc", [np.float64(1.0), 2.0, 3.0],
    [1e308, 1e308, 1.0], [-1e308, -1e308, 1.0], [float("inf"), float("-inf"), 1.0], [10**300, 1, 1], [2**70, 1.0, 1.0],
    [True, False, True], [0, 0, 0], [1.0, [2.0], 3.0], [1.0, {}, 3.0], [],
])
def test_malformed_fast_path_never_changes_the_verdict(value):
    """The listing's pure-Python shape check answers "fine" only where numpy would too; else numpy decides."""
    from pipelines.sources.omni3d import _malformed, _plainly_shaped

    def numpy_verdict(v: object) -> bool:  # the check as it was before the fast path (OverflowError escapes)
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            return False
        return a.shape == (3,) and bool(np.all(np.isfinite(a)))

    ann = {"bbox3D_cam": [[0.0, 0.0, 1.0]] * 8, "center_cam": [0.0, 0.0, 2.0], "dimensions": value,
           "R_cam": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "category_name": "chair"}
    try:
        expected = None if numpy_verdict(value) else "dimensions"
    except OverflowError:  # a 400-digit int: numpy raises; the reader calls the field malformed (it raised once,
        assert not _plainly_shaped(value, (3,))  # ending the whole listing on one annotation)
        assert _malformed(ann) == "dimensions"
        return
    if _plainly_shaped(value, (3,)):
        assert expected is None
    assert _malformed(ann) == expected


def test_ann_fields_keep_what_trimming_the_full_annotations_keeps(sample_world, tmp_path):
    """`read_omni3d(ann_fields=F)` is `{f: a[f] for f in F if f in a}` of each full annotation: same values,
    same order, including "ignore"/"ignore_reasons" (the reader's, even when the file has its own) and fields
    an annotation lacks (the det3d listing relies on it instead of copying every annotation twice)."""
    data = json.loads(sample_world.omni3d_files[0].read_text())
    data["annotations"][0]["ignore_reasons"] = ["from the file"]
    data["annotations"][1].pop("visibility")
    data["annotations"][2]["center_cam"] = [1.0, float("nan"), 2.0]
    p = tmp_path / "Edited_train.json"
    p.write_text(json.dumps(data))
    fields = ("id", "category_name", "visibility", "ignore_reasons", "center_cam", "ignore", "absent")
    full = list(read_omni3d([p], sample_world.root, TRAIN_RULES))
    lean = list(read_omni3d([p], sample_world.root, TRAIN_RULES, ann_fields=fields))
    want = [[{f: a[f] for f in fields if f in a} for a in it["annotations"]] for it in full]
    got = [it["annotations"] for it in lean]
    assert repr(got) == repr(want) and any(a for a in got)
    assert repr([{k: v for k, v in it.items() if k != "annotations"} for it in lean]) == \
        repr([{k: v for k, v in it.items() if k != "annotations"} for it in full])
    reasons = {a["id"]: a["ignore_reasons"] for anns in got for a in anns}
    assert reasons[data["annotations"][0]["id"]] != ["from the file"]
    assert reasons[data["annotations"][2]["id"]] == ["malformed_center_cam"]


def test_resolve_under_prefix_test_is_commonpath(tmp_path):
    """The listing's cheap "inside the root" test gives os.path.commonpath's verdict (sibling prefixes too)."""
    import os

    from pipelines.sources.common import PathEscapesRoot, resolve_under

    for root in ("/", "/data", "/data/", "/data/sets", str(tmp_path)):
        for rel in ("a.png", "a/../b.png", "../data2/x.png", "../datasets/x", "./.", "a/./../../sets/x", "..", "x/.."):
            base = os.path.normpath(os.path.abspath(root))
            full = os.path.normpath(os.path.join(base, rel))
            inside = os.path.commonpath([base, full]) == base
            try:
                got = resolve_under(root, rel)
            except PathEscapesRoot:
                assert not inside, (root, rel)
            else:
                assert inside and str(got) == full, (root, rel)
