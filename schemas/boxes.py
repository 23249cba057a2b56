"""2D box arithmetic, written once: IoU of [x1, y1, x2, y2] boxes and the XYWH -> XYXY conversion.

Used by the cot assignment, the oracle annotators, the audit and the evaluator. Two conventions differ
only for boxes of zero area, and callers choose: `box_iou` (one pair) says two identical zero-size boxes
(points, as the cot grammar writes point answers) are the same box unless told otherwise; `iou_2d` (all
pairs, vectorized) follows pycocotools' bbox IoU (no +1, areas of inverted boxes clipped to 0, empty
union -> 0), as the Omni3D evaluation does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["box_iou", "iou_2d", "xywh_to_xyxy"]


def box_iou(a: Sequence[float], b: Sequence[float], *, identical_degenerate: float = 1.0) -> float:
    """IoU of two xyxy boxes. With an empty union (zero-size boxes) it is `identical_degenerate` when
    the boxes are equal (default 1: the same point), else 0."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    if union <= 0:
        return identical_degenerate if [float(v) for v in a] == [float(v) for v in b] else 0.0
    return float(inter / union)


def xywh_to_xyxy(boxes: object) -> np.ndarray:
    """(N, 4) [x, y, w, h] -> [x1, y1, x2, y2] (COCO/Omni3D store XYWH, GR3D's text uses XYXY)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def iou_2d(a_xyxy: object, b_xyxy: object) -> np.ndarray:
    """IoU (N, M) of axis-aligned boxes [x1, y1, x2, y2]; like pycocotools' bbox IoU (no +1, empty union -> 0)."""
    a = np.asarray(a_xyxy, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b_xyxy, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
