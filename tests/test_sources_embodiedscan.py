"""EmbodiedScan reader and the restricted unpickler: round trip, damaged frames, hostile pickles."""

from __future__ import annotations

import collections
import copy
import os
import pickle

import numpy as np
import pytest

from pipelines.sources import SourceError, UnsafePickleError, read_embodiedscan, safe_load, split_results
from pipelines.sources.embodiedscan import depth_shift_for
from pipelines.sources.safe_pickle import safe_loads
from shards.keys import validate_key


def _load(world, i=0):
    with open(world.embodiedscan_files[i], "rb") as fh:
        return pickle.load(fh)  # the test's own trusted copy, to damage


def _write(tmp_path, info, name="embodiedscan_infos_train.pkl"):
    p = tmp_path / name
    p.write_bytes(pickle.dumps(info, protocol=2))
    return p


def test_round_trip_matches_ground_truth(sample_world):
    items, rejects = split_results(read_embodiedscan(sample_world.embodiedscan_files, sample_world.root))
    assert rejects == []
    scenes = {s["scene_id"]: s for s in sample_world.ground_truth["scenes"]}
    assert len(items) == sum(len(s["views"]) for s in scenes.values())
    assert len({it["key"] for it in items}) == len(items) and all(validate_key(it["key"]) for it in items)
    per_view_k = 0
    for it in items:
        s = scenes[it["sample_idx"].split("/")[-1]]
        v = s["views"][it["frame_index"]]
        assert it["format"] == "embodiedscan" and it["key"] == f"embodiedscan/sample_world/{s['scene_id']}/{v['index']:06d}"
        assert it["image_path"] == str(sample_world.root / v["image"]) and it["depth_path"] == str(sample_world.root / v["depth_half"])
        assert np.allclose(it["K"], v["K"]) and np.allclose(it["depth_K"], v["depth_K"])
        assert not np.allclose(it["K"], it["depth_K"])  # the half-resolution depth sensor has its own intrinsics
        assert np.abs(it["T"] - np.asarray(v["cam2world"])).max() < 1e-7
        assert it["depth_shift"] == 1000.0 and it["warnings"] == []
        per_view_k += s["per_view_intrinsics"]
        expect = {o["index"] for o in v["objects"] if o["visible_pixels"] > 0}
        assert {i["index"] for i in it["instances"]} == expect
        for inst in it["instances"]:
            o = s["objects"][inst["index"]]
            assert inst["category"] == o["category"] and inst["bbox_id"] == o["bbox_id"]
            assert np.allclose(inst["bbox_3d"], o["es_bbox_3d"])
    assert per_view_k > 0, "a scene with per-image cam2img (Matterport3D style) is read"
    # bbox_id is not the position: a reader mixing them up would give other boxes
    assert any(i["bbox_id"] != i["index"] for it in items for i in it["instances"])


def test_depth_shift_follows_the_source_dataset():
    assert depth_shift_for("matterport3d/17DRP5sb8fy/region0") == 4000.0
    assert depth_shift_for("scannet/scene0000_00") == 1000.0
    assert depth_shift_for("3rscan/abc") == 1000.0


def test_missing_axis_align_uses_identity_with_a_warning(sample_world, tmp_path):
    info = _load(sample_world)
    scan = info["data_list"][0]
    A = scan.pop("axis_align_matrix")
    for img in scan["images"]:
        img["cam2global"] = A @ img["cam2global"]
    items, rejects = split_results(read_embodiedscan([_write(tmp_path, info)], sample_world.root))
    first = [it for it in items if it["sample_idx"] == scan["sample_idx"]]
    assert not rejects and first and all("identity" in it["warnings"][0] for it in first)
    assert np.allclose(first[0]["axis_align_matrix"], np.eye(4))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s, im: im.update(img_path="sample_world/nope.png"), "missing_image"),
        (lambda s, im: im.update(depth_path="sample_world/nope.png"), "missing_depth"),
        (lambda s, im: im.update(img_path="../outside.png"), "path_escapes_root"),
        (lambda s, im: im.update(cam2img=np.diag([np.nan, 500.0, 1.0, 1.0])), "bad_intrinsics"),
        (lambda s, im: im.update(cam2img=np.diag([-5.0, 500.0, 1.0, 1.0])), "bad_intrinsics"),
        (lambda s, im: im.update(cam2global=np.diag([1.0, 2.0, 1.0, 1.0])), "bad_pose"),
        (lambda s, im: im.update(cam2global="identity"), "bad_pose"),
        (lambda s, im: im.update(visible_instance_ids=[0, 99]), "bad_visible_instance_id"),
        (lambda s, im: im.update(visible_instance_ids="all"), "bad_visible_instance_id"),
        (lambda s, im: im.update(visible_instance_ids=["0"]), "bad_visible_instance_id"),
    ],
)
def test_bad_frame_is_rejected_and_the_rest_is_read(sample_world, tmp_path, edit, reason):
    info = _load(sample_world)
    good = sum(len(s["images"]) for s in info["data_list"])
    scan = info["data_list"][0]
    edit(scan, scan["images"][0])
    items, rejects = split_results(read_embodiedscan([_write(tmp_path, info)], sample_world.root))
    assert [r.reason for r in rejects] == [reason] and rejects[0].stage == "read"
    assert scan["sample_idx"] in rejects[0].message
    assert len(items) == good - 1


def test_bad_scan_level_intrinsics_reject_every_frame_of_the_scan(sample_world, tmp_path):
    info = _load(sample_world)
    scan = info["data_list"][0]
    scan["cam2img"] = np.zeros((4, 4))
    for img in scan["images"]:
        img.pop("cam2img", None)
    items, rejects = split_results(read_embodiedscan([_write(tmp_path, info)], sample_world.root))
    assert len(rejects) == len(scan["images"]) and {r.reason for r in rejects} == {"bad_intrinsics"}


def test_malformed_instance_is_listed_not_dropped(sample_world, tmp_path):
    info = _load(sample_world)
    scan = info["data_list"][0]
    pos = scan["images"][0]["visible_instance_ids"][0]
    scan["instances"][pos]["bbox_3d"] = [0.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    items, rejects = split_results(read_embodiedscan([_write(tmp_path, info)], sample_world.root))
    first = next(it for it in items if it["sample_idx"] == scan["sample_idx"] and it["frame_index"] == 0)
    assert first["invalid_instances"] == [{"index": pos, "reason": "bbox_3d is not 9 finite values with positive sizes"}]
    assert pos not in {i["index"] for i in first["instances"]}


def test_wrong_top_level_and_truncated_pickles_raise_naming_the_file(sample_world, tmp_path):
    p = _write(tmp_path, {"data_list": []})
    with pytest.raises(SourceError, match=r"embodiedscan_infos_train\.pkl.*metainfo"):
        list(read_embodiedscan([p], sample_world.root))
    raw = sample_world.embodiedscan_files[0].read_bytes()
    t = tmp_path / "truncated.pkl"
    t.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match=r"truncated\.pkl.*not a readable pickle"):
        list(read_embodiedscan([t], sample_world.root))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_code_is_refused_and_not_executed(sample_world, tmp_path):
    marker = str(tmp_path / "pwned")
    info = _load(sample_world)
    info["data_list"][0]["instances"][0]["bbox_id"] = _Evil(marker)
    p = _write(tmp_path, info)
    with pytest.raises(UnsafePickleError, match=r"embodiedscan_infos_train\.pkl.*posix\.mkdir"):
        list(read_embodiedscan([p], sample_world.root))
    assert not os.path.exists(marker)
    for payload in (pickle.dumps(eval, protocol=2), pickle.dumps(getattr, protocol=4), pickle.dumps(copy.deepcopy)):
        with pytest.raises(UnsafePickleError):
            safe_loads(payload)


def test_object_array_cannot_smuggle_a_global(tmp_path):
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = 1, _Evil(str(tmp_path / "x"))
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(arr, protocol=2))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_round_trips(tmp_path, protocol):
    data = {
        "f64": np.arange(12, dtype=np.float64).reshape(3, 4), "f32": np.float32(1.5), "i16": np.array([1, -2], np.int16),
        "u8": np.zeros((2, 2, 3), np.uint8), "bytes": b"\x00\xff", "set": {1, 2}, "fs": frozenset({"a"}),
        "od": collections.OrderedDict(a=1), "tuple": (1, 2.5, None, True), "c": complex(1, 2), "s": "é",
    }  # fmt: skip
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps(data, protocol=protocol))
    back = safe_load(p)
    assert back.keys() == data.keys()
    for k, v in data.items():
        if isinstance(v, np.ndarray):
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
        else:
            assert back[k] == v
