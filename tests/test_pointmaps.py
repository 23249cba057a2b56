"""Point maps on the sample world, checked against its exact ground truth (not against the depth maps).

Every sampled point must lie on the true scene surface (room floor and walls, object boxes, rebuilt
from ground_truth.json) within 2 mm, limited by the millimetre PNG depth; reprojecting (X, Y, Z) with
the colour K gives back the stored (u, v) within 0.01 px. The EmbodiedScan files of the sample world use
the half-resolution depth sensor with its own intrinsics, so they test the depth-vs-colour case.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.corpora.pointmaps.builder import (
    PointmapConfig,
    ReadFrame,
    SamplePoints,
    build_record,
    list_inputs,
    make_builder,
)
from pipelines.corpora.pointmaps.geometry import (
    backproject,
    backproject_indices,
    colour_affine,
    colour_view_mask,
    sample_frame,
)
from pipelines.corpora.pointmaps.sampling import SamplerConfig, SamplingError
from schemas import records
from schemas.camera import project
from schemas.grammar import find_grounded, parse_point3d

SURFACE_TOL = 0.002  # metres
REPROJ_TOL = 0.01  # pixels


# ---------------------------------------------------------------- exact scene geometry


def _rect_dist(p: np.ndarray, axis: int, level: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distance from points to an axis-aligned rectangle {p[axis] = level, lo <= other coords <= hi}."""
    other = [a for a in range(3) if a != axis]
    q = p[:, other]
    d = np.maximum(np.maximum(lo - q, q - hi), 0.0)
    return np.sqrt((d**2).sum(1) + (p[:, axis] - level) ** 2)


def _box_surface_dist(p: np.ndarray, center, size, yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    R = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    q = (p - np.asarray(center)) @ R  # local coordinates
    d = np.abs(q) - np.asarray(size) / 2
    outside = np.sqrt((np.maximum(d, 0.0) ** 2).sum(1))
    return np.where((d > 0).any(1), outside, -d.max(1))


def surface_distance(points_cam: np.ndarray, scene: dict, view: dict) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest true surface, index of that surface: 0 = room, i + 1 = object i)."""
    T = np.asarray(view["cam2world"])
    p = points_cam @ T[:3, :3].T + T[:3, 3]
    Lx, Ly, Hw = scene["room"]
    hx, hy = Lx / 2, Ly / 2
    room = np.min([
        _rect_dist(p, 2, 0.0, np.array([-hx, -hy]), np.array([hx, hy])),  # floor
        _rect_dist(p, 0, -hx, np.array([-hy, 0.0]), np.array([hy, Hw])),
        _rect_dist(p, 0, hx, np.array([-hy, 0.0]), np.array([hy, Hw])),
        _rect_dist(p, 1, -hy, np.array([-hx, 0.0]), np.array([hx, Hw])),
        _rect_dist(p, 1, hy, np.array([-hx, 0.0]), np.array([hx, Hw])),
    ], axis=0)  # fmt: skip
    dists = [room] + [_box_surface_dist(p, o["center"], o["size_lwh"], o["yaw"]) for o in scene["objects"]]
    D = np.stack(dists, axis=1)
    return D.min(1), D.argmin(1)


def _views(world) -> dict[str, tuple[dict, dict]]:
    """Image path (relative to the world root) -> (scene, view) of the ground truth."""
    out = {}
    for sc in world.ground_truth["scenes"]:
        for v in sc["views"]:
            out[v["image"]] = (sc, v)
            out[v["rgbd"] + ".png"] = (sc, v)
    return out


def _config(world, source: str, **kw):
    """The builder config dict (`make_builder(PointmapConfig(...)).config`) of a world's source."""
    return make_builder(_options(world, source, **kw)).config


def _options(world, source: str, **kw):
    if source == "embodiedscan":
        return PointmapConfig("embodiedscan", data_root=world.root, embodiedscan=world.embodiedscan_files, **kw)
    if source == "omni3d":
        return PointmapConfig("omni3d", data_root=world.root, omni3d=world.omni3d_files, **kw)
    return PointmapConfig("rgbd", data_root=world.rgbd_root, rgbd=world.rgbd_root, **kw)


def _frames(world, source: str, mode: str = "uniform", n: int = 100):
    cfg = _config(world, source, sampler=SamplerConfig(n=n, mode=mode))
    items = list_inputs(cfg)
    read, rej = ReadFrame().process(items)
    assert not rej
    out, rej = SamplePoints(SamplerConfig(n=n, mode=mode)).process(read)
    assert not rej and len(out) == len(items) == 6
    return out


@pytest.mark.parametrize("source, mode", [
    ("embodiedscan", "uniform"),
    ("omni3d", "uniform"),
    ("rgbd", "uniform"),
    ("embodiedscan", "depth_stratified_edge_avoiding"),
])  # fmt: skip
def test_points_lie_on_the_true_surface_and_reproject(sample_world, source: str, mode: str) -> None:
    views = _views(sample_world)
    for it in _frames(sample_world, source, mode):
        pts = it["points"]
        assert pts.dtype == np.float32 and pts.shape == (100, 5)
        scene, view = views[Path(it["image_path"]).relative_to(sample_world.root).as_posix()]
        K = np.asarray(view["K"])
        np.testing.assert_allclose(np.asarray(it["K"]), K, atol=1e-7)
        d, _ = surface_distance(pts[:, 2:5].astype(np.float64), scene, view)
        assert d.max() <= SURFACE_TOL, f"{it['key']}: a point is {d.max() * 1000:.2f} mm off the surface"
        uv = project(K, pts[:, 2:5].astype(np.float64))
        assert np.abs(uv - pts[:, :2]).max() <= REPROJ_TOL
        assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= view["width"] - 1
        assert pts[:, 1].min() >= 0 and pts[:, 1].max() <= view["height"] - 1
        assert len({(float(a), float(b)) for a, b in pts[:, :2]}) == 100  # distinct pixels


def test_depth_camera_differs_from_colour_camera(sample_world) -> None:
    """EmbodiedScan frames: 160x120 depth with its own K; using the colour K instead would be wrong."""
    views = _views(sample_world)
    frames = _frames(sample_world, "embodiedscan", "edge_avoiding")
    for it in frames:
        scene, view = views[Path(it["image_path"]).relative_to(sample_world.root).as_posix()]
        assert it["depth"].shape == (view["depth_height"], view["depth_width"]) != (view["height"], view["width"])
        np.testing.assert_allclose(np.asarray(it["depth_K"]), np.asarray(view["depth_K"]), atol=1e-7)
        # the colour pixel of each point sees that point: the instance image there shows the surface it is on
        pts = it["points"].astype(np.float64)
        _, surface = surface_distance(pts[:, 2:5], scene, view)
        label = np.asarray(Image.open(sample_world.root / view["instance"]))
        seen = label[np.rint(pts[:, 1]).astype(int), np.rint(pts[:, 0]).astype(int)]
        assert np.mean(seen == surface) >= 0.98
        # teeth: the same depth pixels back-projected with the colour K land far off the surface
        Kd = np.asarray(view["depth_K"])
        uvd = project(Kd, pts[:, 2:5])
        idx = np.rint(uvd[:, 1]).astype(int) * it["depth"].shape[1] + np.rint(uvd[:, 0]).astype(int)
        wrong = backproject_indices(it["depth"], view["K"], idx)
        assert np.median(surface_distance(wrong, scene, view)[0]) > 0.05


def test_full_backprojection_matches_ground_truth_and_open3d(sample_world) -> None:
    import open3d as o3d

    scene, view = _views(sample_world)[sample_world.ground_truth["scenes"][0]["views"][0]["image"]]
    raw = np.asarray(Image.open(sample_world.root / view["depth"]))
    z = raw.astype(np.float32) / np.float32(1000)
    xyz, idx = backproject(z, view["K"], return_index=True)
    assert xyz.shape == (np.count_nonzero(raw), 3) and np.array_equal(idx, np.flatnonzero(raw))
    d, _ = surface_distance(xyz.astype(np.float64), scene, view)
    assert d.max() <= SURFACE_TOL
    assert backproject(raw.astype(np.uint16), view["K"], scale=1000.0).tobytes() == xyz.tobytes()  # raw input path
    K = np.asarray(view["K"])
    intr = o3d.camera.PinholeCameraIntrinsic(raw.shape[1], raw.shape[0], K[0, 0], K[1, 1], K[0, 2], K[1, 2])
    pc = o3d.geometry.PointCloud.create_from_depth_image(o3d.geometry.Image(raw.astype(np.uint16)), intr,
                                                         depth_scale=1000.0, depth_trunc=1e6)
    np.testing.assert_allclose(np.asarray(pc.points), xyz, atol=2e-6)  # same order: row-major valid pixels


def test_colour_affine_is_projection_of_backprojection() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        Kd = np.array([[rng.uniform(100, 600), rng.uniform(-2, 2), rng.uniform(50, 350)],
                       [0, rng.uniform(100, 600), rng.uniform(50, 250)], [0, 0, 1]])  # fmt: skip
        Kc = np.array([[rng.uniform(300, 1200), rng.uniform(-2, 2), rng.uniform(200, 700)],
                       [0, rng.uniform(300, 1200), rng.uniform(150, 500)], [0, 0, 1]])  # fmt: skip
        u, v = rng.uniform(0, 640, 50), rng.uniform(0, 480, 50)
        z = rng.uniform(0.5, 8, 50)
        y = (v - Kd[1, 2]) / Kd[1, 1]
        x = (u - Kd[0, 2] - Kd[0, 1] * y) / Kd[0, 0]
        want = project(Kc, np.stack([x * z, y * z, z], 1))
        got = np.stack([u, v, np.ones_like(u)], 1) @ colour_affine(Kc, Kd).T
        np.testing.assert_allclose(got, want, atol=1e-9)
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    assert colour_view_mask((480, 640), K, K, 640, 480) is None  # identical cameras: exact identity


def test_points_outside_the_colour_view_are_never_sampled() -> None:
    Kd = np.array([[100.0, 0, 49.5], [0, 100.0, 49.5], [0, 0, 1]])
    Kc = np.array([[100.0, 0, 9.5], [0, 100.0, 49.5], [0, 0, 1]])  # colour sees only depth columns 40..59
    depth = np.full((100, 100), 2.0, np.float32)
    pts, counts = sample_frame(depth, Kd, Kc, 20, 100, "k", SamplerConfig(n=300, min_valid_fraction=0.5))
    assert counts["n_in_view"] == 20 * 100 and counts["n_valid"] == 10000
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= 19
    with pytest.raises(SamplingError) as ei:
        sample_frame(depth, Kd, Kc, 20, 100, "k", SamplerConfig(n=2001))
    assert ei.value.reason == "too_few_pixels_in_colour_view"


@pytest.mark.parametrize("fill, cfg, reason", [
    (0.0, SamplerConfig(n=10), "too_few_valid_pixels"),
    (np.nan, SamplerConfig(n=10), "too_few_valid_pixels"),
    (9.0, SamplerConfig(n=10, max_depth=5.0), "too_few_valid_pixels"),
])  # fmt: skip
def test_invalid_depth_is_never_sampled(fill, cfg, reason) -> None:
    K = np.array([[100.0, 0, 49.5], [0, 100.0, 49.5], [0, 0, 1]])
    depth = np.full((100, 100), fill, np.float32)
    depth[:2, :10] = 1.5  # 20 valid pixels: enough for 10 points, under 5 % of the frame
    with pytest.raises(SamplingError) as ei:
        sample_frame(depth, K, K, 100, 100, "k", cfg)
    assert ei.value.reason == reason
    pts, _ = sample_frame(depth, K, K, 100, 100, "k", SamplerConfig(n=10, min_valid_fraction=0.0,
                                                                      max_depth=cfg.max_depth))
    assert np.all(pts[:, 4] == np.float32(1.5)) and np.all(pts[:, 1] <= 1)


def test_same_key_same_points_other_key_other_points(sample_world) -> None:
    it = _frames(sample_world, "rgbd", n=50)[0]
    a, _ = sample_frame(it["depth"], it["depth_K"], it["K"], it["width"], it["height"], it["key"], SamplerConfig(n=50))
    b, _ = sample_frame(it["depth"], it["depth_K"], it["K"], it["width"], it["height"], it["key"], SamplerConfig(n=50))
    c, _ = sample_frame(it["depth"], it["depth_K"], it["K"], it["width"], it["height"], it["key"] + "x",
                        SamplerConfig(n=50))
    assert a.tobytes() == b.tobytes() == it["points"].tobytes() and a.tobytes() != c.tobytes()


def test_record_validates_and_text_round_trips(sample_world) -> None:
    it = _frames(sample_world, "embodiedscan", n=100)[1]
    it = {**it, "image_ext": "png"}
    cfg = SamplerConfig(n=100)
    rec = build_record(it, it["points"], cfg, points_per_conversation=10, conversations=3)
    records.validate("pointmap", rec)
    assert rec["points"] == {"n": 100, "mode": "uniform"} and rec["arrays"] == ["points"]
    assert rec["camera"]["scale"] == pytest.approx(1000 / it["K"][0][0])
    assert rec["source"]["depth"].endswith(".png") and "depth_half" in rec["source"]["depth"]
    assert rec["source"]["depth_K"] == it["depth_K"]
    convs = rec["conversations"]
    assert [c["point_rows"] for c in convs] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    W, H = rec["image"]["width"], rec["image"]["height"]
    for c in convs:
        assert c["task"] == "point_3d" and len(c["turns"]) == 20
        for r, (q, a) in zip(c["point_rows"], zip(c["turns"][::2], c["turns"][1::2])):
            u, v, X, Y, Z = it["points"][r].astype(np.float64)
            (g,) = find_grounded(q["value"])
            assert g.has_region and g.box[0] == g.box[2] and g.box[1] == g.box[3]
            assert abs(g.box[0] - u / W) <= 0.0005 + 1e-9 and abs(g.box[1] - v / H) <= 0.0005 + 1e-9
            assert np.allclose(parse_point3d(a["value"]), (X, Y, Z), atol=0.005 + 1e-9)
    assert any(q["value"].startswith("Please detect the 3D location of point <bbox>")
               for c in convs for q in c["turns"][::2])


def test_read_stage_rejects_with_reasons(sample_world, tmp_path) -> None:
    """A damaged copy of the RGB-D folder: every bad frame is a reject with its specific reason."""
    root = tmp_path / "rgbd"
    shutil.copytree(sample_world.rgbd_root / "scene0000", root / "scene0000")
    s = root / "scene0000"
    np.save(s / "000001.depth.npy", np.zeros((240, 320), np.float32))  # empty depth
    shutil.copy(s / "000000.png", s / "000002.png")  # a frame whose depth is a truncated PNG
    shutil.copy(s / "000000.json", s / "000002.json")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(1, 9000, (240, 320)).astype(np.uint16)).save(buf, "PNG")
    (s / "000002.depth.png").write_bytes(buf.getvalue()[:5000])
    (s / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # not an image (reader rejects)
    shutil.copy(s / "000000.depth.npy", s / "000003.depth.npy")
    shutil.copy(s / "000000.json", s / "000003.json")
    cfg = make_builder(PointmapConfig("rgbd", rgbd=root, sampler=SamplerConfig(n=20))).config
    items = list_inputs(cfg)
    assert [it["key"] for it in items] == [f"rgbd/scene0000/00000{i}" for i in range(4)]
    read, rej = ReadFrame().process(items)
    got = {r.key.rsplit("/", 1)[1]: (r.stage, r.reason) for r in rej}
    assert got == {"000002": ("read_frame", "bad_depth"), "000003": ("read", "unreadable_image")}
    out, rej = SamplePoints(SamplerConfig(n=20)).process(read)
    assert [r.reason for r in rej] == ["too_few_valid_pixels"] and rej[0].key.endswith("000001")
    assert [o["key"] for o in out] == ["rgbd/scene0000/000000"]


def test_3rscan_pgm_and_matterport_quarter_mm_depth(sample_world, tmp_path) -> None:
    """EmbodiedScan's other depth encodings give the same surface points: 3RScan `.depth.pgm` (mm,
    big-endian) and Matterport3D PNGs in 1/4 mm (scale 4000, chosen from `sample_idx`)."""
    import pickle

    root = tmp_path / "data"
    shutil.copytree(sample_world.root / "sample_world", root / "sample_world")
    info = pickle.loads(sample_world.embodiedscan_files[0].read_bytes())  # our own generated file
    scans = info["data_list"][:2]
    scans[0]["sample_idx"] = "3rscan/" + scans[0]["sample_idx"].split("/")[-1]
    scans[1]["sample_idx"] = "matterport3d/bldg/" + scans[1]["sample_idx"].split("/")[-1]
    for img in scans[0]["images"]:
        mm = np.asarray(Image.open(root / img["depth_path"])).astype(">u2")
        pgm = root / img["depth_path"].replace(".png", ".depth.pgm")
        pgm.write_bytes(b"P5\n# 3RScan\n%d %d\n65535\n" % (mm.shape[1], mm.shape[0]) + mm.tobytes())
        img["depth_path"] = str(pgm.relative_to(root))
    for img in scans[1]["images"]:
        p = root / img["depth_path"]
        Image.fromarray((np.asarray(Image.open(p)).astype(np.uint32) * 4).astype(np.uint16)).save(p)
    info["data_list"] = scans
    pkl = root / "es.pkl"
    pkl.write_bytes(pickle.dumps(info, protocol=2))
    cfg = make_builder(PointmapConfig("embodiedscan", data_root=root, embodiedscan=[pkl],
                                     sampler=SamplerConfig(n=100))).config
    items = list_inputs(cfg)
    assert sorted({(it["depth_format"], it["depth_scale"]) for it in items}) == [("pgm_u16", 1000.0), ("png_u16", 4000.0)]
    read, rej = ReadFrame().process(items)
    out, rej2 = SamplePoints(SamplerConfig(n=100)).process(read)
    assert not rej and not rej2 and len(out) == 4
    views = _views(sample_world)
    for it in out:
        scene, view = views[Path(it["image_path"]).relative_to(root).as_posix()]
        d, _ = surface_distance(it["points"][:, 2:5].astype(np.float64), scene, view)
        assert d.max() <= SURFACE_TOL


def test_reader_rejects_keep_unique_keys_and_reach_the_reject_rows(sample_world, tmp_path) -> None:
    """EmbodiedScan's `duplicate_key` reject repeats a frame's key: it travels as `KEY-dup1` and still
    becomes a reject row of stage `read` (nothing dropped, plan keys unique)."""
    import copy
    import pickle

    info = pickle.loads(sample_world.embodiedscan_files[0].read_bytes())
    scan = info["data_list"][0]
    scan["images"].append(copy.deepcopy(scan["images"][0]))  # same img_path -> same key
    pkl = tmp_path / "es.pkl"
    pkl.write_bytes(pickle.dumps(info, protocol=2))
    items = list_inputs(make_builder(PointmapConfig("embodiedscan", data_root=sample_world.root,
                                                         embodiedscan=[pkl])).config)
    keys = [it["key"] for it in items]
    assert len(keys) == len(set(keys))
    dup = [it for it in items if it["key"].endswith("-dup1")]
    assert len(dup) == 1 and dup[0]["read_reject"]["reason"] == "duplicate_key"
    _, rej = ReadFrame().process(dup)
    assert [(r.key, r.stage, r.reason) for r in rej] == [(dup[0]["key"], "read", "duplicate_key")]
