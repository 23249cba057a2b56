"""Omni3D AP3D protocol on synthetic detections with hand-computed answers.

Recall thresholds are 0.00, 0.01, ..., 1.00 (101). A precision curve that is 1 up to recall r and 0
after scores (number of thresholds <= r) / 101: e.g. r = 0.5 -> 51/101, r = 2/3 -> 67/101.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.eval.iou3d import DegenerateBoxWarning
from model.eval.omni3d_ap import (
    Detection,
    GroundTruthSet,
    GTInstance,
    Omni3DParams,
    accumulate,
    evaluate,
    evaluate_image,
)

UNIT = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float
)
T = 10  # IoU thresholds 0.05 .. 0.50


def cube(x: float, z: float, size: float = 1.0) -> np.ndarray:
    return (UNIT - 0.5) * size + np.array([x, 0.0, z])


def gt_set(datasets: dict[str, list[int]], cats: dict[int, str], images: dict[int, str]) -> GroundTruthSet:
    return GroundTruthSet(categories=cats, image_dataset=images, dataset_categories=datasets)


def add_gt(
    gt: GroundTruthSet, image: int, cat: int, x: float, z: float, ignore: bool = False, bbox=None
) -> None:
    gt.instances.append(
        GTInstance(len(gt.instances) + 1, image, cat, cube(x, z), depth=z, bbox=bbox, ignore=ignore)
    )


def det(image: int, cat: int, x: float, z: float, score: float, bbox=None) -> Detection:
    return Detection(image, cat, score, cube(x, z), bbox=bbox)


def one_dataset(name: str = "KITTI_test") -> GroundTruthSet:
    return gt_set({name: [1]}, {1: "car"}, {10: name, 11: name})


def test_perfect_detections_score_one_everywhere() -> None:
    gt = one_dataset()
    for i, x in enumerate([0.0, 3.0, 6.0]):
        add_gt(gt, 10 + (i % 2), 1, x, 5.0)
    dets = [det(10 + (i % 2), 1, x, 5.0, 0.9 - 0.1 * i) for i, x in enumerate([0.0, 3.0, 6.0])]
    m = evaluate(gt, dets)["datasets"]["KITTI_test"]
    for k in ("AP3D", "AP15", "AP25", "AP50", "APn", "AR100"):
        assert m[k] == pytest.approx(1.0, abs=1e-12), k
    assert np.isnan(m["APm"]) and np.isnan(m["APf"])  # no GT at those depths: no AP, not 0
    assert m["per_category"] == {"car": pytest.approx(1.0)}


def test_half_the_gt_missed() -> None:
    gt = one_dataset()
    add_gt(gt, 10, 1, 0.0, 5.0)
    add_gt(gt, 10, 1, 3.0, 5.0)
    m = evaluate(gt, [det(10, 1, 0.0, 5.0, 0.8)])["overall"]
    assert m["AP3D"] == pytest.approx(51 / 101, abs=1e-12)
    assert m["AR100"] == pytest.approx(0.5, abs=1e-12)


def test_duplicate_detection_is_a_false_positive() -> None:
    # GT A, B; detections: A (0.9), A again (0.8), B (0.7) -> TP, FP, TP.
    # recall [.5, .5, 1], precision [1, .5, 2/3] -> monotone [1, 2/3, 2/3]:
    # 51 thresholds (<= 0.5) at 1, 50 thresholds (0.51..1) at 2/3.
    gt = one_dataset()
    add_gt(gt, 10, 1, 0.0, 5.0)
    add_gt(gt, 10, 1, 3.0, 5.0)
    dets = [det(10, 1, 0.0, 5.0, 0.9), det(10, 1, 0.0, 5.0, 0.8), det(10, 1, 3.0, 5.0, 0.7)]
    ap = evaluate(gt, dets)["overall"]["AP3D"]
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_ignored_gt_is_neither_a_miss_nor_a_hit() -> None:
    gt = one_dataset()
    add_gt(gt, 10, 1, 0.0, 5.0)
    add_gt(gt, 10, 1, 3.0, 5.0, ignore=True)
    # unmatched ignored GT: no miss -> AP 1 (it would be 51/101 if it counted)
    assert evaluate(gt, [det(10, 1, 0.0, 5.0, 0.5)])["overall"]["AP3D"] == pytest.approx(1.0)
    # a detection on the ignored GT, scored above the true positive: not a false positive
    both = [det(10, 1, 3.0, 5.0, 0.9), det(10, 1, 0.0, 5.0, 0.5)]
    assert evaluate(gt, both)["overall"]["AP3D"] == pytest.approx(1.0)
    # whereas a detection on no GT at all, at the same rank, is a false positive:
    # FP, TP over 1 regular GT: precision [0, .5] -> monotone [.5, .5] at every recall threshold
    stray = [det(10, 1, 9.0, 5.0, 0.95), det(10, 1, 0.0, 5.0, 0.5)]
    assert evaluate(gt, stray)["overall"]["AP3D"] == pytest.approx(0.5, abs=1e-12)


def test_detection_prefers_regular_over_ignored_gt() -> None:
    # COCOeval: a detection overlapping an ignored GT (IoU .9) and a regular GT (IoU .5) takes the regular one.
    e = evaluate_image(
        ious=np.array([[0.9, 0.5]]),
        gt_ignore=np.array([True, False]),
        gt_depth=np.array([5.0, 5.0]),
        dt_depth=np.array([5.0]),
        dt_scores=np.array([0.9]),
        depth_range=(0.0, 1e5),
        iou_thrs=Omni3DParams().iou_thrs,
    )
    assert e.dt_matched.all() and not e.dt_ignore.any()  # matched to the regular GT at every threshold
    assert e.gt_ignore.tolist() == [False, True]  # regular GT sorted first, as COCOeval does


def test_greedy_matching_by_score_with_hand_made_ious() -> None:
    # d1 (0.9) overlaps G1 .6 and G2 .4; d2 (0.8) overlaps G1 .9 only. Greedy: d1 takes G1 wherever
    # .6 >= t (all thresholds), so d2 is unmatched everywhere. (A global assignment would do better.)
    thr = Omni3DParams().iou_thrs
    e = evaluate_image(
        np.array([[0.6, 0.4], [0.9, 0.0]]), np.array([False, False]), np.array([5.0, 5.0]),
        np.array([5.0, 5.0]), np.array([0.9, 0.8]), (0.0, 1e5), thr,
    )  # fmt: skip
    assert e.dt_matched[:, 0].all() and not e.dt_matched[:, 1].any()
    # d1 with IoU .45 to G1: matched at t <= .45 only (9 of 10 thresholds)
    e = evaluate_image(
        np.array([[0.45]]),
        np.array([False]),
        np.array([5.0]),
        np.array([5.0]),
        np.array([0.9]),
        (0.0, 1e5),
        thr,
    )
    assert e.dt_matched[:, 0].tolist() == [True] * 9 + [False]


def test_depth_buckets_near_medium_far() -> None:
    # GT at z = 5 (near), 20 (medium), 50 (far); the far one is missed.
    gt = one_dataset()
    for x, z in [(0.0, 5.0), (0.0, 20.0), (0.0, 50.0)]:
        add_gt(gt, 10, 1, x, z)
    dets = [det(10, 1, 0.0, 5.0, 0.9), det(10, 1, 0.0, 20.0, 0.8)]
    m = evaluate(gt, dets)["overall"]
    assert m["APn"] == pytest.approx(1.0)
    assert m["APm"] == pytest.approx(1.0)
    assert m["APf"] == pytest.approx(0.0)
    assert m["AP3D"] == pytest.approx(67 / 101, abs=1e-12)  # recall 2/3 at precision 1
    # an unmatched detection at z = 50 is a false positive for "all" and "far" only
    stray = dets + [det(10, 1, 5.0, 50.0, 0.95)]
    m2 = evaluate(gt, stray)["overall"]
    assert m2["APn"] == pytest.approx(1.0) and m2["APm"] == pytest.approx(1.0)
    # all: FP, TP, TP over 3 GT: precision [0, .5, 2/3] -> monotone 2/3 up to recall 2/3
    assert m2["AP3D"] == pytest.approx(67 / 101 * 2 / 3, abs=1e-12)


def test_proximity_rule_only_for_sunrgbd_and_objectron() -> None:
    # One GT with 2D box [0,0,100,100]; a stray 3D false positive whose 2D box is far away (2D IoU 0).
    def run(name: str) -> float:
        gt = gt_set({name: [1]}, {1: "chair"}, {10: name})
        add_gt(gt, 10, 1, 0.0, 3.0, bbox=(0, 0, 100, 100))
        dets = [
            det(10, 1, 9.0, 3.0, 0.95, bbox=(300, 300, 50, 50)),
            det(10, 1, 0.0, 3.0, 0.5, bbox=(0, 0, 100, 100)),
        ]
        return evaluate(gt, dets)["overall"]["AP3D"]

    assert run("SUNRGBD_test") == pytest.approx(1.0)  # the stray is ignored
    assert run("Objectron_test") == pytest.approx(1.0)
    assert run("KITTI_test") == pytest.approx(0.5)  # FP then TP
    # A detection exact in 3D but with 2D IoU <= 0.3 cannot match under proximity: it is ignored, so
    # the GT is missed (AP 0, not 1).
    gt = gt_set({"SUNRGBD_test": [1]}, {1: "chair"}, {10: "SUNRGBD_test"})
    add_gt(gt, 10, 1, 0.0, 3.0, bbox=(0, 0, 100, 100))
    assert evaluate(gt, [det(10, 1, 0.0, 3.0, 0.9, bbox=(80, 0, 100, 100))])["overall"]["AP3D"] == 0.0


def test_overall_accumulates_jointly_not_mean_of_datasets() -> None:
    # X: 1 GT, its TP at score .5. Y: 1 GT missed, an FP at score .9. Per dataset: 1 and 0.
    # Jointly: FP(.9), TP(.5) over 2 GT: recall [0, .5], precision [0, .5] -> .5 at the 51 thresholds <= .5.
    gt = gt_set({"X_test": [1], "Y_test": [1]}, {1: "car"}, {10: "X_test", 20: "Y_test"})
    add_gt(gt, 10, 1, 0.0, 5.0)
    add_gt(gt, 20, 1, 0.0, 5.0)
    r = evaluate(gt, [det(10, 1, 0.0, 5.0, 0.5), det(20, 1, 5.0, 5.0, 0.9)])
    assert r["datasets"]["X_test"]["AP3D"] == pytest.approx(1.0)
    assert r["datasets"]["Y_test"]["AP3D"] == pytest.approx(0.0)
    assert r["overall"]["AP3D"] == pytest.approx(0.5 * 51 / 101, abs=1e-12)


def test_dataset_ap_is_mean_over_its_categories_with_gt() -> None:
    cats = {1: "car", 2: "van", 3: "truck"}
    gt = gt_set({"KITTI_test": [1, 2, 3]}, cats, {10: "KITTI_test"})
    add_gt(gt, 10, 1, 0.0, 5.0)  # car: found
    add_gt(gt, 10, 2, 3.0, 5.0)  # van: missed; truck: no GT at all -> no AP
    r = evaluate(gt, [det(10, 1, 0.0, 5.0, 0.9), det(10, 3, 6.0, 5.0, 0.9)])
    m = r["datasets"]["KITTI_test"]
    assert m["per_category"]["car"] == pytest.approx(1.0)
    assert m["per_category"]["van"] == 0.0
    assert np.isnan(m["per_category"]["truck"])
    assert m["AP3D"] == pytest.approx(0.5)
    # a category outside the dataset's vocabulary is dropped, not scored
    r2 = evaluate(gt, [det(10, 9, 0.0, 5.0, 0.9)])
    assert r2["counts"]["dropped_out_of_vocabulary"] == 1


def test_only_100_detections_per_image_and_category_count() -> None:
    gt = one_dataset()
    add_gt(gt, 10, 1, 0.0, 5.0)
    strays = [det(10, 1, 10.0 + 2 * i, 5.0, 0.9) for i in range(100)]
    assert evaluate(gt, strays + [det(10, 1, 0.0, 5.0, 0.5)])["overall"]["AP3D"] == 0.0  # the TP is cut
    assert evaluate(gt, strays[:99] + [det(10, 1, 0.0, 5.0, 0.5)])["overall"]["AP3D"] == pytest.approx(0.01)


def test_degenerate_detection_warns_once_and_is_a_false_positive() -> None:
    gt = one_dataset()
    add_gt(gt, 10, 1, 0.0, 5.0)
    flat = Detection(10, 1, 0.9, cube(0.0, 5.0) * [1, 0, 1] + [0, 0, 0])  # zero height, at the GT
    with pytest.warns(DegenerateBoxWarning, match="1 detection and 0 ground-truth"):
        ap = evaluate(gt, [flat, det(10, 1, 0.0, 5.0, 0.5)])["overall"]["AP3D"]
    assert ap == pytest.approx(0.5)  # FP then TP


def test_accumulate_without_regular_gt_gives_no_ap() -> None:
    e = evaluate_image(np.zeros((1, 1)), np.array([True]), np.array([5.0]), np.array([5.0]), np.array([0.5]),
                       (0.0, 1e5), Omni3DParams().iou_thrs)  # fmt: skip
    assert accumulate([e], Omni3DParams()) is None
