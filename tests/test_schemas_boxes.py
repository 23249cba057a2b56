"""One 2D IoU: the scalar `box_iou` and the vectorized `iou_2d` agree wherever the conventions meet."""

from __future__ import annotations

import random

import pytest

from schemas.boxes import box_iou, iou_2d, xywh_to_xyxy


def test_scalar_and_matrix_agree_on_proper_boxes() -> None:
    rng = random.Random(0)
    boxes = []
    for _ in range(40):
        x, y = rng.uniform(0, 50), rng.uniform(0, 50)
        boxes.append([x, y, x + rng.uniform(0.1, 40), y + rng.uniform(0.1, 40)])
    m = iou_2d(boxes, boxes)
    for i, a in enumerate(boxes):
        for j, b in enumerate(boxes):
            assert box_iou(a, b) == pytest.approx(m[i, j], abs=1e-12)
    assert box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)


def test_zero_size_boxes() -> None:
    p = [0.3, 0.4, 0.3, 0.4]
    assert box_iou(p, p) == 1.0  # the cot grammar's point answers: the same point is the same box
    assert box_iou(p, p, identical_degenerate=0.0) == 0.0  # the oracle's convention
    assert box_iou(p, [0.3, 0.5, 0.3, 0.5]) == 0.0
    assert iou_2d([p], [p])[0, 0] == 0.0  # pycocotools: empty union -> 0


def test_xywh_to_xyxy() -> None:
    assert xywh_to_xyxy([1, 2, 3, 4]).tolist() == [[1, 2, 4, 6]]
