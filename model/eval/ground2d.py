"""2D box IoU and explicit 2D grounding accuracy (Acc@0.5).

GR3D grounds every mention as `<bbox>[x1, y1, x2, y2]</bbox>` in [0, 1] image coordinates; a grounding is
correct when its IoU with the reference box is at least 0.5 (RefCOCO convention, boundary included).
A prediction that failed to produce a box counts as wrong, never as skipped: otherwise a model that
declines hard cases would score higher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schemas.boxes import iou_2d, xywh_to_xyxy

__all__ = ["iou_2d", "xywh_to_xyxy", "grounding_accuracy"]


def grounding_accuracy(
    predictions: Mapping[str, Sequence[float] | None],
    references: Mapping[str, Sequence[float]],
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Acc@threshold of predicted boxes against reference boxes, both keyed by a sample/mention id.

    Boxes are [x1, y1, x2, y2] in one shared frame (normalized or pixels). Every reference counts; a
    reference without a prediction (missing key or None) is a miss. Predictions without a reference
    are reported in `n_unmatched_predictions` and not scored.
    """
    keys = sorted(references)
    ious = np.zeros(len(keys))
    n_missing = 0
    for i, k in enumerate(keys):
        p = predictions.get(k)
        if p is None:
            n_missing += 1
            continue
        ious[i] = iou_2d([p], [references[k]])[0, 0]
    correct = ious >= threshold
    return {
        "accuracy": float(correct.mean()) if keys else float("nan"),
        "threshold": threshold,
        "n": len(keys),
        "n_correct": int(correct.sum()),
        "n_missing": n_missing,
        "n_unmatched_predictions": len(set(predictions) - set(references)),
        "mean_iou": float(ious.mean()) if keys else float("nan"),
    }
