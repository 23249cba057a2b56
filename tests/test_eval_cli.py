"""`gr3d eval det3d|ground2d` end to end, and the Omni3D JSON reader's test-time ignore rules."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model.eval.io import gt_bbox_xywh, is_ignore, load_omni3d_gt, parse_predictions
from pipelines.cli import main

UNIT = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float
)
K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]
CHAIR, TABLE, CAR, DONTCARE = 10, 12, 3, 99


def cube(center: list[float]) -> list[list[float]]:
    return ((UNIT - 0.5) + np.asarray(center, float)).tolist()


def ann(
    aid: int, image: int, cat: int, name: str, center: list[float], trunc2d: list[float], **extra
) -> dict:
    a = {
        "id": aid, "image_id": image, "category_id": cat, "category_name": name, "valid3D": True,
        "bbox2D_tight": [-1, -1, -1, -1], "bbox2D_proj": trunc2d, "bbox2D_trunc": trunc2d,
        "bbox3D_cam": cube(center), "center_cam": center, "dimensions": [1.0, 1.0, 1.0],
        "R_cam": np.eye(3).tolist(), "behind_camera": False, "visibility": 0.9, "truncation": 0.0,
        "segmentation_pts": 100, "lidar_pts": 100, "depth_error": 0.05,
    }  # fmt: skip
    a.update(extra)
    return a


def write_gt(tmp: Path) -> list[str]:
    sun = {
        "info": {"id": 13, "name": "SUNRGBD test"},
        "categories": [{"id": CHAIR, "name": "chair"}, {"id": TABLE, "name": "table"}, {"id": DONTCARE, "name": "dontcare"}],
        "images": [{"id": 1, "dataset_id": 14, "width": 640, "height": 480, "K": K, "file_path": "a.jpg"}],
        "annotations": [
            ann(1, 1, CHAIR, "chair", [0, 0, 3], [100, 100, 300, 300]),  # regular
            ann(2, 1, CHAIR, "chair", [3, 0, 3], [400, 100, 500, 300], visibility=0.2),  # ignored: visibility
            ann(3, 1, TABLE, "table", [-3, 0, 3], [0, 100, 90, 300]),  # regular, never detected
            ann(4, 1, CHAIR, "chair", [0, 3, 3], [100, 350, 300, 470], behind_camera=True),  # ignored
            ann(5, 1, DONTCARE, "dontcare", [6, 0, 3], [500, 100, 600, 300]),  # not evaluated
            ann(6, 1, CHAIR, "chair", [-6, 0, 3], [-1, -1, -1, -1], bbox2D_proj=[-1, -1, -1, -1]),  # no 2D box: dropped
            ann(7, 1, TABLE, "table", [0, -3, 3], [10, 10, 60, 30]),  # ignored: 20 px <= 0.0625 * 480
        ],
    }  # fmt: skip
    kitti = {
        "info": {"id": 1, "name": "KITTI test"},
        "categories": [{"id": CAR, "name": "car"}],
        "images": [{"id": 2, "dataset_id": 2, "width": 1242, "height": 375, "K": K, "file_path": "b.png"}],
        "annotations": [
            ann(11, 2, CAR, "car", [0, 1, 20], [600, 150, 700, 250]),  # medium
            ann(12, 2, CAR, "car", [5, 1, 50], [800, 150, 850, 200]),  # far, missed
        ],
    }
    paths = [tmp / "SUNRGBD_test.json", tmp / "KITTI_test.json"]
    paths[0].write_text(json.dumps(sun))
    paths[1].write_text(json.dumps(kitti))
    return [str(p) for p in paths]


def write_predictions(tmp: Path) -> str:
    preds = [
        {"image_id": 1, "K": K, "width": 640, "height": 480, "instances": [
            {"image_id": 1, "category_id": CHAIR, "bbox": [100, 100, 200, 200], "score": 0.9, "depth": 3.0, "bbox3D": cube([0, 0, 3])},
            # on the visibility-ignored chair: ignored, not a false positive
            {"image_id": 1, "category_id": CHAIR, "bbox": [400, 100, 100, 200], "score": 0.8, "depth": 3.0, "bbox3D": cube([3, 0, 3])},
            # far from every chair in 2D (SUN RGB-D proximity rule): ignored
            {"image_id": 1, "category_id": CHAIR, "bbox": [600, 400, 20, 20], "score": 0.95, "depth": 10.0, "bbox3D": cube([0, 0, 10])},
        ]},
        {"image_id": 2, "K": K, "width": 1242, "height": 375, "instances": [
            {"image_id": 2, "category_id": CAR, "bbox": [600, 150, 100, 100], "score": 0.7, "depth": 20.0, "bbox3D": cube([0, 1, 20])},
            {"image_id": 2, "category_id": CAR, "bbox": [900, 150, 50, 50], "score": 0.6, "depth": 50.0, "bbox3D": cube([10, 1, 50])},
        ]},
    ]  # fmt: skip
    p = tmp / "preds.json"
    p.write_text(json.dumps(preds))
    return str(p)


def test_det3d_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = write_gt(tmp_path)
    rc = main(
        [
            "eval",
            "det3d",
            "--gt",
            *gt,
            "--predictions",
            write_predictions(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0
    r = json.loads((tmp_path / "o" / "det3d_eval.json").read_text())
    sun, kitti, overall = r["datasets"]["SUNRGBD_test"], r["datasets"]["KITTI_test"], r["overall"]
    # SUN: chair found (the ignored-GT and out-of-proximity detections do not count), table missed.
    assert sun["per_category"] == {"chair": pytest.approx(1.0), "table": 0.0}
    assert sun["AP3D"] == pytest.approx(0.5)
    assert sun["proximity"] is True and kitti["proximity"] is False
    assert (sun["n_gt"], sun["n_gt_ignored"]) == (5, 3)  # dontcare not evaluated, no-2D-box dropped
    # KITTI: TP (.7), FP (.6) over 2 GT -> precision 1 up to recall .5: 51/101. Medium: the only GT found,
    # and the FP at 50 m is outside the medium range -> 1. Far: the GT at 50 m is missed -> 0.
    assert kitti["AP3D"] == pytest.approx(51 / 101, abs=1e-12)
    assert kitti["APm"] == pytest.approx(1.0) and kitti["APf"] == 0.0
    assert kitti["APn"] is None  # no near GT: no AP (NaN in the API, null in JSON)
    assert overall["AP3D"] == pytest.approx((1.0 + 0.0 + 51 / 101) / 3, abs=1e-12)
    assert overall["APm"] == pytest.approx(1.0)
    assert r["omni3d"]["Omni3D"] is None  # not all 50 categories present
    out = capsys.readouterr().out
    assert "SUNRGBD_test" in out and "KITTI_test" in out and "overall" in out
    assert f"{100 * 51 / 101:.2f}" in out  # the table prints percent


def test_det3d_flat_predictions_with_names_and_contiguous_ids(tmp_path: Path) -> None:
    gt_paths = write_gt(tmp_path)
    gt = load_omni3d_gt(gt_paths)
    # Cube R-CNN contiguous ids: 0 = car, 1 = chair (category_meta.json maps Omni3D id -> contiguous id)
    meta = tmp_path / "category_meta.json"
    meta.write_text(
        json.dumps(
            {"thing_classes": ["car", "chair"], "thing_dataset_id_to_contiguous_id": {"3": 0, "10": 1}}
        )
    )
    flat = [
        {
            "image_id": 1,
            "category_id": 1,
            "score": 0.9,
            "bbox": [100, 100, 200, 200],
            "bbox3D": cube([0, 0, 3]),
        },
        {
            "image_id": 2,
            "category_id": 0,
            "score": 0.7,
            "bbox": [600, 150, 100, 100],
            "bbox3D": cube([0, 1, 20]),
        },
    ]
    p = tmp_path / "flat.json"
    p.write_text(json.dumps(flat))
    assert main(["eval", "det3d", "--gt", *gt_paths, "--predictions", str(p), "--out", str(tmp_path / "o"),
                 "--category-meta", str(meta)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "o" / "det3d_eval.json").read_text())
    assert r["datasets"]["SUNRGBD_test"]["per_category"]["chair"] == pytest.approx(1.0)
    assert r["datasets"]["KITTI_test"]["AP3D"] == pytest.approx(51 / 101, abs=1e-12)  # TP, far GT missed
    # category names instead of ids; no 2D box -> the projected-corner box (needed by the proximity rule)
    dets = parse_predictions(
        [{"image_id": 1, "category_name": "chair", "score": 0.5, "bbox3D": cube([0, 0, 5])}], gt
    )
    assert dets[0].category_id == CHAIR and dets[0].depth == pytest.approx(5.0)
    # corners x, y in +-0.5, z in [4.5, 5.5]: u = 500 x / z + 320 spans 320 +- 250 / 4.5
    half = 250 / 4.5
    assert dets[0].bbox == pytest.approx((320 - half, 240 - half, 2 * half, 2 * half))
    assert (
        parse_predictions(
            [{"image_id": 1, "category_name": "sofa", "score": 1, "bbox3D": cube([0, 0, 5])}], gt
        )
        == []
    )


def test_checkpoint_needs_an_image_root(tmp_path: Path) -> None:
    gt = write_gt(tmp_path)
    with pytest.raises(SystemExit, match="--image-root"):
        main(["eval", "det3d", "--gt", *gt, "--checkpoint", "tiny", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("change", "ignored"),
    [
        ({}, False),
        ({"behind_camera": True}, True),
        ({"valid3D": False}, True),
        ({"dimensions": [1.0, 0.0, 1.0]}, True),
        ({"lidar_pts": 0}, True),
        ({"lidar_pts": -1}, False),  # -1 = not available
        ({"segmentation_pts": 0}, True),
        ({"depth_error": 0.51}, True),
        ({"depth_error": 0.5}, False),
        ({"truncation": 0.33333333}, True),
        ({"truncation": 0.3}, False),
        ({"truncation": -1}, False),
        ({"visibility": 0.33333333}, True),
        ({"visibility": 0.34}, False),
        ({"visibility": -1}, False),
        ({"bbox2D_trunc": [0, 0, 10, 30]}, True),  # 30 px <= 0.0625 * 480
        ({"bbox2D_trunc": [0, 0, 10, 31]}, False),
        ({"bbox2D_trunc": [0, -200, 10, 520]}, True),  # 720 px >= 1.5 * 480
        # trunc unset: the projected box decides the height
        ({"bbox2D_trunc": [-1, -1, -1, -1], "bbox2D_proj": [0, 0, 10, 20]}, True),
    ],
)
def test_test_time_ignore_rules(change: dict, ignored: bool) -> None:
    a = ann(1, 1, CHAIR, "chair", [0, 0, 3], [100, 100, 300, 300], **change)
    assert is_ignore(a, image_height=480) is ignored


def test_gt_2d_box_preference() -> None:
    a = ann(1, 1, CHAIR, "chair", [0, 0, 3], [10, 20, 110, 220], bbox2D_proj=[0, 0, 500, 500])
    assert gt_bbox_xywh(a) == (10, 20, 100, 200)  # trunc first, XYXY -> XYWH
    a["bbox2D_trunc"] = [-1, -1, -1, -1]
    assert gt_bbox_xywh(a) == (0, 0, 500, 500)
    a["bbox2D_proj"] = [-1, -1, -1, -1]
    a["bbox2D_tight"] = [1, 2, 3, 5]
    assert gt_bbox_xywh(a) == (1, 2, 2, 3)
    a["bbox2D_tight"] = [-1, -1, -1, -1]
    assert gt_bbox_xywh(a) is None


def test_ground2d_acc_at_half(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gt = {"a": [0, 0, 1, 1], "b": [0, 0, 1, 1], "c": [0.5, 0.5, 1, 1], "d": [0, 0, 0.2, 0.2]}
    preds = [
        {"id": "a", "bbox": [0, 0, 0.5, 1]},  # IoU exactly 0.5: counts (>=)
        {"id": "b", "bbox": [0, 0, 0.5, 0.9]},  # IoU 0.45: miss
        {"id": "c", "bbox": [0.5, 0.5, 1, 1]},  # exact
        {"id": "d", "bbox": None},  # no box produced: a miss
        {"id": "zzz", "bbox": [0, 0, 1, 1]},  # no reference: not scored
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    args = ["eval", "ground2d", "--predictions", str(tmp_path / "p.json"), "--gt", str(tmp_path / "gt.json")]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    r = json.loads((tmp_path / "o" / "ground2d_eval.json").read_text())
    assert r["accuracy"] == pytest.approx(0.5) and (r["n"], r["n_correct"], r["n_missing"]) == (4, 2, 1)
    assert r["n_unmatched_predictions"] == 1
    assert r["mean_iou"] == pytest.approx((0.5 + 0.45 + 1.0 + 0.0) / 4)
    assert "Acc@0.5: 50.00%" in capsys.readouterr().out


def test_ground2d_references_from_a_shard_set(tmp_path: Path) -> None:
    records = [
        {"key": "cot/s1", "corpus": "cot", "mentions": [{"text": "the cup", "bbox2d": [0.1, 0.1, 0.3, 0.3]}]},
        {
            "key": "det/s2",
            "corpus": "det3d",
            "objects": [{"category": "chair", "bbox2d": [0.5, 0.5, 0.9, 0.9]}],
        },
    ]
    (tmp_path / "b" / "shards").mkdir(parents=True)
    with tarfile.open(tmp_path / "b" / "shards" / "000000.tar", "w") as tf:
        for rec in records:
            for name, data in (
                (f"{rec['key']}.json", json.dumps(rec).encode()),
                (f"{rec['key']}.jpg", b"\xff\xd8"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    preds = {"cot/s1/mention/0": [0.1, 0.1, 0.3, 0.3], "det/s2/object/0": [0.0, 0.0, 0.2, 0.2]}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    assert main(["eval", "ground2d", "--predictions", str(tmp_path / "p.json"), "--shards", str(tmp_path / "b"),
                 "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    r = json.loads((tmp_path / "o" / "ground2d_eval.json").read_text())
    assert (r["n"], r["n_correct"]) == (2, 1)
