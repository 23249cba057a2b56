"""Evaluation of GR3D: the Omni3D AP3D protocol with an exact oriented-box IoU, and 2D grounding accuracy.

`iou_3d` is resolved lazily so that `gr3d --help` (which imports `model.eval.cli`) does not pay for numpy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["iou_3d"]


def __getattr__(name: str) -> Any:
    if name == "iou_3d":
        from model.eval.iou3d import iou_3d

        return iou_3d
    raise AttributeError(f"module 'model.eval' has no attribute {name!r}")
