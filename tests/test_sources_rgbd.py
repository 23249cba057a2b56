"""Generic RGB-D folder reader: the sample world's rgbd/ variant, folder-level intrinsics, bad frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines.sources import SourceError, read_rgbd, resolve_under, split_results
from pipelines.sources.common import PathEscapesRoot, relative_to_root
from shards.keys import validate_key


def test_round_trip_matches_ground_truth(sample_world):
    items, rejects = split_results(read_rgbd(sample_world.rgbd_root))
    assert rejects == []
    views = {v["rgbd"]: v for s in sample_world.ground_truth["scenes"] for v in s["views"]}
    assert len(items) == len(views)
    for it in items:
        v = views["rgbd/" + it["source"]["id"]]
        assert validate_key(it["key"]) and it["key"] == "rgbd/" + it["source"]["id"]
        assert it["depth_format"] == "npy_m" and it["depth_scale"] is None
        assert np.allclose(it["K"], v["K"]) and np.allclose(it["depth_K"], v["K"])
        assert (it["width"], it["height"]) == (v["width"], v["height"]) == (it["depth_width"], it["depth_height"])
        # the float depth is the same surface as the millimetre PNG, to within the quantization
        d_m = np.load(it["depth_path"])
        d_mm = np.asarray(Image.open(sample_world.root / v["depth"])).astype(np.float64) / 1000.0
        assert d_m.dtype == np.float32 and np.abs(d_m - d_mm).max() <= 0.0005 + 1e-5
        assert (d_m == 0).sum() == (d_mm == 0).sum()
        assert open(it["image_path"], "rb").read() == (sample_world.root / v["image"]).read_bytes()


def _frame(d, name, size=(8, 6), depth="npy", meta=None):
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(d / f"{name}.png")
    if depth == "npy":
        np.save(d / f"{name}.depth.npy", np.ones((size[1], size[0]), np.float32))
    elif depth == "png":
        Image.fromarray(np.full((size[1], size[0]), 1500, np.uint16)).save(d / f"{name}.depth.png")
    if meta is not None:
        (d / f"{name}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


K = [[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]]


def test_folder_intrinsics_png_depth_and_rejects(tmp_path):
    root = tmp_path / "cap"
    (root / "seq").mkdir(parents=True)
    (root / "intrinsics.json").write_text(json.dumps({"K": K, "depth_scale": 4000}))
    _frame(root / "seq", "a", depth="png")  # uses the folder-level intrinsics
    _frame(root / "seq", "b", meta={"K": [[float("nan"), 0, 4], [0, 10, 3], [0, 0, 1]]})
    _frame(root / "seq", "c", meta={"K": [[0.0, 0, 4], [0, 10, 3], [0, 0, 1]]})
    _frame(root / "seq", "d", depth=None, meta={"K": K})
    _frame(root / "seq", "e", meta="{not json")
    _frame(root / "seq", "f.v2", meta={"K": K})  # a dot in the stem still gives a valid key
    _frame(root / "seq", "g", meta={"K": K})
    np.save(root / "seq" / "g.depth.npy", np.ones((3, 4), np.float32))  # half resolution, no depth_K
    _frame(root / "seq", "h", meta={"K": K, "depth_K": [[5.0, 0, 2], [0, 5.0, 1.5], [0, 0, 1]]})
    np.save(root / "seq" / "h.depth.npy", np.ones((3, 4), np.float32))  # half resolution with its own K
    _frame(root / "seq", "i", meta={"K": K})
    (root / "seq" / "i.depth.npy").write_bytes(b"garbage")
    _frame(root / "seq", "j", meta={"K": K})
    np.save(root / "seq" / "j.depth.npy", np.ones((6, 8), np.int32))
    items, rejects = split_results(read_rgbd(root))
    got = {it["source"]["id"]: it for it in items}
    assert sorted(got) == ["seq/a", "seq/f.v2", "seq/h"]
    assert got["seq/a"]["depth_format"] == "png_mm" and got["seq/a"]["depth_scale"] == 4000.0
    assert got["seq/h"]["depth_width"] == 4 and got["seq/h"]["depth_K"][0, 0] == 5.0
    assert validate_key(got["seq/f.v2"]["key"]) and "." not in got["seq/f.v2"]["key"]
    reasons = {r.key.split("/")[-1]: r.reason for r in rejects}
    assert reasons == {"b": "bad_intrinsics", "c": "bad_intrinsics", "d": "missing_depth", "e": "bad_intrinsics",
                       "g": "depth_size_mismatch", "i": "bad_depth", "j": "bad_depth"}  # fmt: skip
    assert all(r.stage == "read" and r.message for r in rejects)


def test_no_intrinsics_anywhere_is_a_reject_and_no_folder_an_error(tmp_path):
    _frame(tmp_path / "x", "a")
    items, rejects = split_results(read_rgbd(tmp_path))
    assert not items and rejects[0].reason == "bad_intrinsics" and "intrinsics.json" in rejects[0].message
    with pytest.raises(SourceError, match="RGB-D folder not found"):
        list(read_rgbd(tmp_path / "absent"))


def test_resolve_under_refuses_escapes_but_keeps_symlinked_datasets(tmp_path):
    root = tmp_path / "datasets"
    root.mkdir()
    outside = tmp_path / "mnt"
    outside.mkdir()
    (outside / "img.png").write_bytes(b"x")
    (root / "SUNRGBD").symlink_to(outside)
    assert resolve_under(root, "SUNRGBD/img.png").is_file()  # datasets are often symlinked in
    assert resolve_under(root, "a/../b.png") == root / "b.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", "", None, "a\x00b"):
        with pytest.raises(PathEscapesRoot):
            resolve_under(root, bad)
    assert relative_to_root(root / "Omni3D" / "x.json", root) == "Omni3D/x.json"
    assert relative_to_root(outside / "img.png", root) == "img.png"
