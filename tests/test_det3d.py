"""The 3D-detection corpus on the sample world: boxes against exact ground truth, Omni3D vs EmbodiedScan,
the text against the evaluator's parser, conversation shapes, rejects, and the CLI.

Ground truth is recomputed here from `ground_truth.json`'s world boxes (center, size_lwh, yaw in the aligned
z-up world) and each view's cam2world, not taken from the Omni3D file the builder reads.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.eval.iou3d import iou_3d
from model.eval.predict import parse_answer
from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder, parse_rule
from pipelines.corpora.det3d.convert import (
    ConvertReject,
    Det3dConfig,
    DetObject,
    clipped_silhouette_box,
    convert_item,
    image_header,
    make_record,
    text_box,
)
from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import decoded
from pipelines.engine.run import run_build
from schemas import records
from schemas.camera import box_corners
from schemas.grammar import (
    Box3D,
    box3d_from_pose,
    box3d_to_pose,
    find_grounded,
    format_box3d,
    parse_bbox2d,
    parse_box3d,
)
from schemas.prompts import DETECT_3D, REGION_TO_3D, detect_prompt, plural
from shards.reader import iter_samples
from shards.verify import verify_build

# ---------------------------------------------------------------------------------------------- helpers


def _build(builder: Any, out: Path, **kw: Any) -> Any:
    return run_build(builder, out,
                     BuildOptions.on("local", chunk_size=kw.pop("chunk_size", 4), show_progress=False, **kw))


def _samples(build_dir: Path) -> list[dict[str, Any]]:
    return [s["json"] for s in iter_samples(build_dir)]


class Truth:
    """Ground truth per record: the view, and each written object's world box as camera-frame corners."""

    def __init__(self, world: Any):
        self.scenes = {s["scene_id"]: s for s in world.ground_truth["scenes"]}
        self.by_image_id = {}
        for s in self.scenes.values():
            for v in s["views"]:
                self.by_image_id[v["omni3d_image_id"]] = (s, v)

    def view(self, rec: dict[str, Any]) -> tuple[dict, dict]:
        src = rec["source"]
        if src["dataset"] == "embodiedscan":
            scene_path, frame = src["id"].rsplit("/", 1)
            s = self.scenes[scene_path.split("/")[-1]]
            return s, next(v for v in s["views"] if v["index"] == int(frame))
        return self.by_image_id[int(src["id"])]

    def world_object(self, rec: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
        s, v = self.view(rec)
        if rec["source"]["dataset"] == "embodiedscan":
            return next(o for o in s["objects"] if str(o["bbox_id"]) == obj["object_id"])
        ov = next(o for o in v["objects"] if str(o["omni3d_annotation_id"]) == obj["object_id"])
        return next(o for o in s["objects"] if o["index"] == ov["index"])

    def pose(self, rec: dict[str, Any], obj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Omni3D camera pose of the world box: local x = length, y = down, z = width."""
        _, v = self.view(rec)
        o = self.world_object(rec, obj)
        w2c = np.linalg.inv(np.asarray(v["cam2world"]))
        c, s = math.cos(o["yaw"]), math.sin(o["yaw"])
        R_world = np.stack([[c, s, 0.0], [0.0, 0.0, -1.0], [-s, c, 0.0]], axis=1)
        length, width, height = o["size_lwh"]
        center = w2c[:3, :3] @ np.asarray(o["center"]) + w2c[:3, 3]
        return center, np.array([width, height, length]), w2c[:3, :3] @ R_world

    def corners(self, rec: dict[str, Any], obj: dict[str, Any]) -> np.ndarray:
        return box_corners(*self.pose(rec, obj))

    def bbox2d(self, rec: dict[str, Any], obj: dict[str, Any]) -> list[float]:
        """The analytic silhouette box (bbox2D_trunc) normalized by the image size."""
        s, v = self.view(rec)
        o = self.world_object(rec, obj)
        ov = next(x for x in v["objects"] if x["index"] == o["index"])
        b = ov["bbox2D_trunc"]
        return [b[0] / v["width"], b[1] / v["height"], b[2] / v["width"], b[3] / v["height"]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(iou_3d(a[None], b[None])[0, 0])


def _text_corners(box: Box3D) -> np.ndarray:
    return box_corners(*box3d_to_pose(box))


def _angle_diff(a: float, b: float) -> float:
    """Distance of two angles / pi on the circle of circumference 2."""
    d = (a - b) % 2.0
    return min(d, 2.0 - d)


def _within_rounding(parsed: Box3D, exact: Box3D, ndigits: int) -> None:
    half = 0.5 * 10.0**-ndigits + 1e-6  # + the 8-decimal rounding of the input files
    unit = 10.0**-ndigits
    for p, e in zip(parsed.center, exact.center):
        assert abs(p - e) <= half, (parsed, exact)
    for p, e in zip(parsed.dimensions, exact.dimensions):  # text_box raises dims below one unit to one unit
        assert abs(p - e) <= half or (e < unit and p == unit), (parsed, exact)
    for p, e in zip(parsed.rotation, exact.rotation):
        assert _angle_diff(p, e) <= half, (parsed, exact)


def _written_objects(rec: dict[str, Any]) -> list[tuple[dict[str, Any], Box3D, tuple[float, ...]]]:
    """Every (object, parsed 3D box, parsed 2D box) the text of a record states, from both conversation kinds."""
    by_box = {}
    for o in rec["objects"]:
        by_box.setdefault(tuple(round(x, 3) for x in o["bbox2d"]), []).append(o)
    out = []
    for conv in rec["conversations"]:
        turns = conv["turns"]
        if conv["task"] == "region_to_3d":
            for q, a in zip(turns[::2], turns[1::2]):
                (g,) = find_grounded(q["value"])
                assert g.has_region
                out.append((g.box, parse_box3d(a["value"])))
        else:
            for p in parse_answer(turns[1]["value"]):
                out.append((p.bbox2d, p.box3d))
    res = []
    for b2, b3 in out:
        cands = by_box[tuple(b2)]
        # two objects could share a rounded 2D box; the 3D text tells them apart
        o = min(cands, key=lambda c: float(np.abs(np.subtract(c["box3d"]["center"], b3.center)).sum()))
        res.append((o, b3, b2))
    return res


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The default det3d build of the session's sample world (both sources, local executor)."""
    out = tmp_path_factory.mktemp("det3d_build")
    b = make_builder(Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files, sample_world.root))
    res = _build(b, out)
    return out, res


@pytest.fixture(scope="module")
def truth(sample_world: Any) -> Truth:
    return Truth(sample_world)


def _convert_all(world: Any, **convert: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Records of every input, through the builder's listing and stages, without writing shards."""
    b = make_builder(Det3dBuildConfig(world.omni3d_files, world.embodiedscan_files, world.root,
                                     convert=Det3dConfig(**convert)))
    items = list(decoded(b.list_inputs(b.config)))  # builders yield their listing (det3d's encoded)
    read, conv = b.stages
    o1, r1 = read.process(items)
    o2, r2 = conv.process(o1)
    return [o["record"] for o in o2], r1 + r2


# ---------------------------------------------------------------------------------------------- geometry vs truth


def test_build_writes_every_view_of_both_sources_and_verifies(built: tuple[Path, Any], sample_world: Any) -> None:
    out, res = built
    n_views = sample_world.manifest["counts"]["views"]
    t = res.manifest["totals"]
    assert t["n_input"] == 2 * n_views
    assert t["n_samples"] + t["n_rejected"] == t["n_input"]
    recs = _samples(out)
    assert Counter(r["source"]["dataset"] for r in recs) == {"SampleWorld": n_views, "embodiedscan": n_views}
    assert all(r["key"].startswith(("omni3d/SampleWorld/", "embodiedscan/sample_world/")) for r in recs)
    assert not [str(p) for p in verify_build(out)]
    for r in recs:
        K = np.asarray(r["camera"]["K"])
        assert r["camera"]["scale"] == pytest.approx(1000.0 / K[0, 0], rel=1e-12)
        _, v = Truth(sample_world).view(r)
        np.testing.assert_allclose(K, v["K"], atol=1e-6)
        assert (r["image"]["width"], r["image"]["height"]) == (v["width"], v["height"])


def test_images_are_passed_through_byte_for_byte(built: tuple[Path, Any], sample_world: Any, truth: Truth) -> None:
    for s in iter_samples(built[0]):
        _, v = truth.view(s["json"])
        assert s["png"] == (sample_world.root / v["image"]).read_bytes()


def test_written_3d_boxes_match_ground_truth_up_to_rounding(built: tuple[Path, Any], truth: Truth) -> None:
    """Every box stated in the text (both tasks) equals the canonical GT box up to 2-decimal rounding; the
    record's unrounded box has the GT's corners; IoU >= 0.9 wherever 2 decimals can express that."""
    n, ious, thin = 0, [], []
    for rec in _samples(built[0]):
        stated = _written_objects(rec)
        assert {id(o) for o, _, _ in stated} == {id(o) for o in rec["objects"]}, "an object is never asked about"
        for obj, parsed, _ in stated:
            gt = truth.corners(rec, obj)
            exact = Box3D(*(tuple(obj["box3d"][k]) for k in ("center", "dimensions", "rotation")))
            assert _iou(_text_corners(exact), gt) > 0.99999
            _within_rounding(parsed, box3d_from_pose(*truth.pose(rec, obj)), 2)
            iou = _iou(_text_corners(parsed), gt)
            (ious if min(obj["box3d"]["dimensions"]) >= 0.2 else thin).append(iou)
            n += 1
    assert n >= 60 and len(ious) >= 30
    assert min(ious) >= 0.9, min(ious)
    # 2 decimals cannot describe a 2 cm thick laptop within IoU 0.9; the rounding bound above still holds.
    assert min(thin) > 0.6


def test_three_decimal_text_gives_iou_above_09_for_every_object(sample_world: Any, truth: Truth) -> None:
    recs, rejects = _convert_all(sample_world, digits_3d=3, omni3d_ignore="none")
    assert not rejects
    ious = []
    for rec in recs:
        for obj, parsed, _ in _written_objects(rec):
            _within_rounding(parsed, box3d_from_pose(*truth.pose(rec, obj)), 3)
            ious.append(_iou(_text_corners(parsed), truth.corners(rec, obj)))
    assert len(ious) >= 100 and min(ious) >= 0.9, min(ious)


def test_2d_boxes_match_ground_truth_within_rounding(built: tuple[Path, Any], truth: Truth) -> None:
    n = 0
    for rec in _samples(built[0]):
        for obj, _, b2 in _written_objects(rec):
            want = truth.bbox2d(rec, obj)
            np.testing.assert_allclose(obj["bbox2d"], want, atol=1e-6)
            np.testing.assert_allclose(b2, want, atol=0.0005 + 1e-6)
            n += 1
    assert n >= 60


def test_omni3d_and_embodiedscan_give_the_same_boxes(sample_world: Any, truth: Truth) -> None:
    recs, rejects = _convert_all(sample_world, omni3d_ignore="none")
    assert not rejects
    by_view: dict[tuple[str, int], dict[str, dict[int, dict]]] = {}
    for rec in recs:
        s, v = truth.view(rec)
        fmt = "es" if rec["source"]["dataset"] == "embodiedscan" else "omni"
        slot = by_view.setdefault((s["scene_id"], v["index"]), {})
        slot[fmt] = {truth.world_object(rec, o)["index"]: o for o in rec["objects"]}
    assert len(by_view) == sample_world.manifest["counts"]["views"]
    n = 0
    for pair in by_view.values():
        es, omni = pair["es"], pair["omni"]
        assert set(es) <= set(omni)  # Omni3D also lists objects hidden behind others; EmbodiedScan only visible ones
        for idx, e in es.items():
            o = omni[idx]
            assert e["category"] == o["category"]
            ce, co = (_text_corners(Box3D(*(tuple(x["box3d"][k]) for k in ("center", "dimensions", "rotation"))))
                      for x in (e, o))
            assert _iou(ce, co) >= 0.99
            np.testing.assert_allclose(e["box3d"]["center"], o["box3d"]["center"], atol=1e-6)
            np.testing.assert_allclose(e["bbox2d"], o["bbox2d"], atol=1e-6)  # silhouette box == bbox2D_trunc
            n += 1
    assert n >= 25


# ---------------------------------------------------------------------------------------------- text and conversations


def test_detect_answers_round_trip_through_the_evaluator_parser(built: tuple[Path, Any]) -> None:
    n_conv = 0
    prompts = {detect_prompt("X", variant=i) for i in range(len(DETECT_3D))}
    assert len(prompts) == len(DETECT_3D)
    for rec in _samples(built[0]):
        convs = [c for c in rec["conversations"] if c["task"] == "detect_3d"]
        assert sorted(c["category"] for c in convs) == sorted({o["category"] for o in rec["objects"]})
        for c in convs:
            q, a = c["turns"]
            assert q["from"] == "human" and a["from"] == "gpt"
            cat = c["category"]
            assert q["value"] in {t.format(plural=plural(cat), name=cat) for t in DETECT_3D}
            objs = [o for o in rec["objects"] if o["category"] == cat]
            parsed = parse_answer(a["value"])
            lines = a["value"].split("\n")
            assert len(parsed) == len(lines) == min(len(objs), 20)
            for p, line, o in zip(parsed, lines, objs):
                b2, b3 = line.split("<region> ")
                assert p.bbox2d == parse_bbox2d(b2)
                assert p.box3d == parse_box3d(b3)
                np.testing.assert_allclose(p.bbox2d, o["bbox2d"], atol=0.0005 + 1e-9)
            zs = [p.box3d.center[2] for p in parsed]
            assert zs == sorted(zs), "near to far"
            n_conv += 1
    assert n_conv >= 20


def test_region_to_3d_conversations_cover_each_object_once(built: tuple[Path, Any]) -> None:
    templates = set()
    for rec in _samples(built[0]):
        convs = [c for c in rec["conversations"] if c["task"] == "region_to_3d"]
        assert convs and all(2 <= len(c["turns"]) <= 20 for c in convs)
        asked = []
        for c in convs:
            for i, t in enumerate(c["turns"]):
                assert t["from"] == ("human" if i % 2 == 0 else "gpt")
            for q in c["turns"][::2]:
                (g,) = find_grounded(q["value"])
                templates.add(q["value"][: g.start] + "{region}" + q["value"][g.end + len("<region>"):])
                asked.append(tuple(g.box))
        assert sorted(asked) == sorted(tuple(round(x, 3) for x in o["bbox2d"]) for o in rec["objects"])
    assert templates <= set(REGION_TO_3D) and len(templates) >= 2


def _chairs(n: int) -> list[DetObject]:
    return [DetObject("chair", np.array([0.1 * i - 1.0, 0.2, 1.0 + 0.25 * ((7 * i) % n)]), np.array([0.5, 0.9, 0.5]),
                      np.eye(3), (10.0 + i, 20.0, 30.0 + i, 60.0), object_id=str(i)) for i in range(n)]  # fmt: skip


def test_many_objects_split_into_balanced_conversations_and_capped_detections() -> None:
    K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]
    objs = _chairs(25) + [DetObject("lamp", np.array([0.0, 0.0, 2.0]), np.array([0.3, 1.5, 0.3]), np.eye(3),
                                    (1.0, 2.0, 3.0, 4.0), object_id="lamp")]  # fmt: skip
    rec = make_record("t/k", {"dataset": "t", "file": "f", "id": "1"}, "png", 640, 480, K, objs, Det3dConfig())
    records.validate("det3d", rec)
    r3d = [c for c in rec["conversations"] if c["task"] == "region_to_3d"]
    assert [len(c["turns"]) // 2 for c in r3d] == [9, 9, 8]  # 26 objects, <= 10 rounds, balanced
    det = {c["category"]: c for c in rec["conversations"] if c["task"] == "detect_3d"}
    chairs = parse_answer(det["chair"]["turns"][1]["value"])
    assert len(chairs) == 20 and det["chair"]["n_objects"] == 25 and "n_objects" not in det["lamp"]
    zs = sorted(o.center[2] for o in objs[:25])
    assert [p.box3d.center[2] for p in chairs] == pytest.approx([round(z, 2) for z in zs[:20]])
    small = make_record("t/k", {"dataset": "t", "file": "f", "id": "1"}, "png", 640, 480, K, objs,
                        Det3dConfig(max_rounds=4))
    assert [len(c["turns"]) // 2 for c in small["conversations"] if c["task"] == "region_to_3d"] == [4] * 5 + [3] * 2


def test_text_is_deterministic_and_phrasing_follows_key_and_salt() -> None:
    K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]
    src = {"dataset": "t", "file": "f", "id": "1"}
    a = make_record("t/a", src, "png", 640, 480, K, _chairs(8), Det3dConfig())
    assert a == make_record("t/a", src, "png", 640, 480, K, _chairs(8), Det3dConfig())
    human = [t["value"] for c in a["conversations"] for t in c["turns"][::2]]
    assert len({h.split("<bbox>")[0] for h in human}) >= 2  # several phrasings within one image
    others = [make_record(f"t/{i}", src, "png", 640, 480, K, _chairs(8), Det3dConfig(prompt_salt="x"))
              for i in range(6)]  # fmt: skip
    assert len({o["conversations"][-1]["turns"][0]["value"] for o in others}) >= 2


def test_thin_boxes_stay_parseable() -> None:
    b = box3d_from_pose([0.0, 0.0, 2.0], [0.5, 0.003, 0.4], np.eye(3))
    text = format_box3d(text_box(b, 2), 2)
    assert parse_box3d(text).dimensions == (0.5, 0.01, 0.4)
    assert text_box(Box3D((0, 0, 1), (0.5, 0.2, 0.4), (0, 0, 0)), 2) == Box3D((0, 0, 1), (0.5, 0.2, 0.4), (0, 0, 0))


# ---------------------------------------------------------------------------------------------- 2D silhouette, header


def test_silhouette_box_clips_the_hull_not_the_corner_box() -> None:
    def diamond(cx: float, cy: float, r: float) -> np.ndarray:
        return np.array([[cx, cy - r], [cx + r, cy], [cx, cy + r], [cx - r, cy]])

    # fully inside: the min/max box
    assert clipped_silhouette_box(diamond(50, 40, 10), 100, 80) == (40, 30, 60, 50)
    # leaving across the image corner: inside the image it is the triangle x + y <= 6, so (0, 0, 6, 6),
    # where clipping the min/max box would give (0, 0, 8, 8)
    np.testing.assert_allclose(clipped_silhouette_box(diamond(-2, -2, 10), 100, 80), (0, 0, 6, 6), atol=1e-12)
    assert clipped_silhouette_box(diamond(-5, -5, 10), 100, 80) is None  # touches the image in one point
    assert clipped_silhouette_box(diamond(-50, 40, 10), 100, 80) is None  # entirely left of the image
    np.testing.assert_allclose(clipped_silhouette_box(diamond(100, 40, 10), 100, 80), (90, 30, 100, 50))


def test_image_header_reads_size_without_decoding(tmp_path: Path) -> None:
    import io

    from PIL import Image

    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
        buf = io.BytesIO()
        Image.new("RGB", (37, 21), (1, 2, 3)).save(buf, format=fmt)
        assert image_header(buf.getvalue()) == (ext, 37, 21)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(ValueError, match="not a PNG or JPEG"):
        image_header(buf.getvalue())
    with pytest.raises(ValueError, match="truncated PNG"):
        image_header(b"\x89PNG\r\n\x1a\n\x00\x00")


# ---------------------------------------------------------------------------------------------- rejects


def _damaged_world(world: Any, root: Path) -> tuple[list[Path], list[Path], dict[str, str]]:
    """A copy of the world with one defect per image / frame; returns the files and {key: expected reason}."""
    shutil.copytree(world.root, root)
    expect: dict[str, str] = {}
    omni = [root / p for p in world.manifest["files"]["omni3d"]]
    datas = [json.loads(p.read_text()) for p in omni]
    imgs = [(d, i) for d in datas for i in d["images"]]
    assert len(imgs) >= 6

    def anns(n: int) -> list[dict[str, Any]]:
        d, img = imgs[n]
        return [a for a in d["annotations"] if a["image_id"] == img["id"]]

    def key(n: int) -> str:
        return f"omni3d/SampleWorld/{imgs[n][1]['id']}"

    imgs[0][1]["K"][0][0] = 0.0
    expect[key(0)] = "bad_intrinsics"
    imgs[1][1]["file_path"] = "sample_world/no_such_image.png"
    expect[key(1)] = "missing_image"
    for a in anns(2):
        a["valid3D"] = False
    expect[key(2)] = "all_boxes_ignored"
    anns(3)[0]["dimensions"][1] = -0.4  # ignored (nonpositive_dimensions) and NaN (malformed): dropped,
    anns(3)[1]["center_cam"][0] = float("nan")  # counted, and the image is kept with its other objects
    expect[key(3)] = None
    d4, img4 = imgs[4]
    d4["annotations"] = [a for a in d4["annotations"] if a["image_id"] != img4["id"]]
    expect[key(4)] = "no_objects"
    imgs[0][0]["annotations"].append({**anns(5)[0], "id": 99999999, "image_id": 424242})
    expect["omni3d/SampleWorld/annotation/99999999"] = "orphan_annotation"
    imgs[5][1]["width"] += 2
    expect[key(5)] = "image_size_mismatch"
    for p, d in zip(omni, datas):
        p.write_text(json.dumps(d))
    broken = root / "Omni3D" / "Broken_train.json"
    broken.write_text('{"images": [')
    omni.append(broken)

    es = [root / p for p in world.manifest["files"]["embodiedscan"]]
    info = pickle.loads(es[0].read_bytes())
    scan = info["data_list"][0]
    sidx = scan["sample_idx"]
    v0 = scan["images"][0]["visible_instance_ids"][0]
    scan["instances"][v0]["bbox_3d"] = np.asarray(scan["instances"][v0]["bbox_3d"], dtype=np.float64).copy()
    scan["instances"][v0]["bbox_3d"][3] = float("nan")
    for img in scan["images"]:  # every frame that sees the broken instance drops it and keeps the others
        if v0 in img["visible_instance_ids"]:
            expect[f"embodiedscan/{sidx}/{Path(img['img_path']).stem}"] = None
    # the first frame of the next scan looks away from everything: every visible box is behind the camera
    scan1 = info["data_list"][1]
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    scan1["images"][0]["cam2global"] = np.asarray(scan1["images"][0]["cam2global"]) @ flip
    expect[f"embodiedscan/{scan1['sample_idx']}/000000"] = "all_boxes_ignored"
    es[0].write_bytes(pickle.dumps(info, protocol=2))
    return omni, es, expect


def test_bad_inputs_become_reject_rows_with_specific_reasons(sample_world: Any, tmp_path: Path) -> None:
    omni, es, expect = _damaged_world(sample_world, tmp_path / "world")
    b = make_builder(Det3dBuildConfig(omni, es, tmp_path / "world"))
    res = _build(b, tmp_path / "out")
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    got = {r["key"]: r["reason"] for r in rej}
    recs = {r["key"]: r for r in _samples(tmp_path / "out")}
    for k, reason in expect.items():
        assert got.get(k) == reason, (k, got.get(k), [r for r in rej if r["key"] == k])
        if reason is None:
            assert recs[k]["objects"], k
    (omni_kept,) = [k for k, r in expect.items() if r is None and k.startswith("omni3d/")]
    d = recs[omni_kept]["source"]["dropped"]
    assert d["malformed_center_cam"] >= 1 and d["nonpositive_dimensions"] >= 1
    es_kept = [k for k, r in expect.items() if r is None and k.startswith("embodiedscan/")]
    assert es_kept and all(recs[k]["source"]["dropped"].get("degenerate_box") == 1 for k in es_kept)
    # the drops are summed in the shard stats and the manifest
    assert res.manifest["dropped_by_reason"]["degenerate_box"] == len(es_kept)
    assert res.manifest["dropped_by_reason"]["nonpositive_dimensions"] >= 1
    assert got[[k for k in got if k.startswith("det3d/source_file/")][0]] == "bad_source_file"
    stages = {r["reason"]: r["stage"] for r in rej}
    assert stages["bad_intrinsics"] == "read" and stages["missing_image"] == "det3d_read"
    t = res.manifest["totals"]
    assert t["n_samples"] + t["n_rejected"] == t["n_input"]
    assert t["n_samples"] == 2 * sample_world.manifest["counts"]["views"] - sum(
        1 for k, r in expect.items() if "/annotation/" not in k and r is not None)
    assert not [str(p) for p in verify_build(tmp_path / "out")]
    # objects dropped inside a written image are counted in its source, never lost silently
    for rec in _samples(tmp_path / "out"):
        src = rec["source"]
        assert src["n_annotations"] == len(rec["objects"]) + sum(src["dropped"].values())


def _omni_item(anns: list[dict[str, Any]]) -> dict[str, Any]:
    return {"key": "omni3d/X/1", "format": "omni3d", "source": {"dataset": "X", "file": "f", "id": "1"},
            "K": [[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]], "annotations": anns}


def _omni_ann(i: int, **edit: Any) -> dict[str, Any]:
    from pipelines.sources.omni3d import TRAIN_RULES, ignore_reasons

    a = {"id": i, "category_name": "chair", "valid3D": True, "center_cam": [0.0, 0.0, 3.0],
         "dimensions": [0.5, 0.8, 0.6], "R_cam": np.eye(3).tolist(), "bbox2D_proj": [100.0, 60.0, 220.0, 200.0],
         "bbox2D_trunc": [100.0, 60.0, 220.0, 200.0], "truncation": 0.0, "visibility": 1.0, "behind_camera": False,
         "lidar_pts": 50, "segmentation_pts": 500, "depth_error": 0.0, **edit}  # fmt: skip
    a["bbox3D_cam"] = box_corners(np.array([0.0, 0.0, 3.0]), np.array([0.5, 0.8, 0.6]), np.eye(3)).tolist()
    reasons = ignore_reasons(a, 240.0, TRAIN_RULES)
    return {**a, "ignore": bool(reasons), "ignore_reasons": reasons}


def test_one_ignorable_omni3d_annotation_does_not_reject_its_image() -> None:
    """Issue 15: `dimensions: [0.0, 0.5, 0.7]` once rejected the whole image as degenerate_box."""
    anns = [_omni_ann(1), _omni_ann(2, dimensions=[0.0, 0.5, 0.7]),
            _omni_ann(3, R_cam=(np.eye(3) * 1.5).tolist()), _omni_ann(4, center_cam=[float("nan"), 0.0, 3.0])]
    rec = convert_item(_omni_item(anns), "png", 320, 240, Det3dConfig())
    assert len(rec["objects"]) == 1 and rec["objects"][0]["object_id"] == "1"
    assert rec["source"]["dropped"] == {"degenerate_box": 1, "malformed_center_cam": 1, "nonpositive_dimensions": 1}
    assert rec["source"]["n_annotations"] == 4
    records.validate("det3d", rec)


def test_image_is_rejected_only_when_nothing_usable_remains() -> None:
    bad_r = (np.eye(3) * 1.5).tolist()
    with pytest.raises(ConvertReject) as ei:
        convert_item(_omni_item([_omni_ann(1, R_cam=bad_r), _omni_ann(2, R_cam=bad_r)]), "png", 320, 240,
                     Det3dConfig())
    assert ei.value.reason == "degenerate_box"
    assert ei.value.message.startswith("none of the 2 boxes is usable") and "not a rotation" in ei.value.message
    with pytest.raises(ConvertReject) as ei:
        convert_item(_omni_item([_omni_ann(1, R_cam=bad_r), _omni_ann(2, dimensions=[0.0, 0.5, 0.7])]), "png",
                     320, 240, Det3dConfig())
    assert ei.value.reason == "all_boxes_ignored"
    assert "all 2 boxes were dropped: degenerate_box=1, nonpositive_dimensions=1" in ei.value.message


def test_convert_rejects_unknown_labels_only_as_drops() -> None:
    item = {"key": "embodiedscan/x/0", "format": "embodiedscan", "source": {"dataset": "embodiedscan", "file": "f",
            "id": "x/0"}, "K": [[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]], "T": np.eye(4).tolist(),
            "instances": [{"index": 0, "bbox_id": 7, "category": None, "bbox_3d": [0, 0, 3, 1, 1, 1, 0, 0, 0]},
                          {"index": 1, "bbox_id": 8, "category": "box", "bbox_3d": [0, 0, 3, 1, 1, 1, 0, 0, 0]}],
            "invalid_instances": [{"index": 2, "reason": "bbox_label_3d is not an int: 'x'"}]}  # fmt: skip
    rec = convert_item(item, "png", 320, 240, Det3dConfig())
    assert [o["object_id"] for o in rec["objects"]] == ["8"]
    assert rec["source"]["dropped"] == {"bad_label": 1, "unknown_category": 1} and rec["source"]["n_annotations"] == 3
    records.validate("det3d", rec)
    item["instances"], item["invalid_instances"] = item["instances"][:1], []
    with pytest.raises(ConvertReject) as e:
        convert_item(item, "png", 320, 240, Det3dConfig())
    assert e.value.reason == "all_boxes_ignored" and "unknown_category=1" in e.value.message


def test_ignore_rule_overrides_parse_and_apply(sample_world: Any) -> None:
    assert parse_rule("visibility_thres=0.1") == ("visibility_thres", 0.1)
    assert parse_rule("max-depth=none") == ("max_depth", None)
    assert parse_rule("require_lidar_pts=false") == ("require_lidar_pts", False)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_rule("bogus=1")
    loose, _ = _convert_all(sample_world, omni3d_ignore="none")
    strict, _ = _convert_all(sample_world, omni3d_rules={"min_height_thres": 0.3})
    n = lambda recs: sum(len(r["objects"]) for r in recs if r["source"]["dataset"] != "embodiedscan")  # noqa: E731
    assert n(strict) < n(loose)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_builds_from_a_sample_world_and_stays_light(sample_world: Any, tmp_path: Path) -> None:
    code = ("import sys, pipelines.corpora.det3d.builder, pipelines.engine.build_cli as b; b.registered_builders(); "
            "heavy = [m for m in ('torch', 'ray', 'open3d', 'transformers', 'apache_beam') if m in sys.modules]; "
            "assert not heavy, heavy; assert 'det3d' in b.registered_builders()")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    from pipelines.cli import main

    out = tmp_path / "cli"
    rc = main(["build", "det3d", "--sample-world", str(sample_world.root), "--out", str(out), "--executor", "local",
               "--quiet", "--limit", "3", "--omni3d-rule", "visibility_thres=0.1"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["convert"]["omni3d_rules"] == {"visibility_thres": 0.1}
    assert man["config"]["convert"]["digits_3d"] == 2 and man["totals"]["n_input"] == 3
    assert main(["build", "det3d", "--omni3d", str(tmp_path / "nope.json"), "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "x"), "--executor", "local", "--quiet"]) == 2


def test_listing_items_are_the_full_reader_output_trimmed_byte_for_byte(sample_world: Any) -> None:
    """The listing trims annotations inside the reader (`ann_fields`): each Omni3D work item must pickle to the
    same bytes as trimming the reader's full output did (`_omni3d_item`), so plan blobs and digests stay."""
    from pipelines.corpora.det3d.builder import _omni3d_item, list_inputs, omni3d_rules
    from pipelines.sources import read_omni3d, split_results

    b = make_builder(Det3dBuildConfig(sample_world.omni3d_files, (), sample_world.root))
    got = list_inputs(b.config)
    full, _ = split_results(read_omni3d([str(f) for f in sample_world.omni3d_files], b.config["data_root"],
                                        omni3d_rules("train"), check_files=False))
    want = [_omni3d_item(r) for r in full]
    assert len(want) > 0 and [pickle.dumps(it, protocol=5) for it in got if "read_reject" not in it] == \
        [pickle.dumps(it, protocol=5) for it in want]
