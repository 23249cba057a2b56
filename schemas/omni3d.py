"""Cube R-CNN's Omni3D annotation rules, written once: which objects are ignored, and which 2D box an
object has. The det3d reader (`pipelines.sources.omni3d`) and the evaluator (`model.eval.io`) both call
these functions, so what the corpus drops and what the benchmark ignores agree by construction.

The rule is `is_ignore` of `cubercnn/data/datasets.py` (facebookresearch/omni3d), read there and
written here in our own words (docs/formats.md, "Omni3D ignore rule"). An object is ignored when:
behind_camera; not valid3D; a dimension <= 0; center depth > max_depth; lidar_pts == 0;
segmentation_pts == 0; depth_error > 0.5; the height of its 2D box <= min_height_thres * H or
>= max_height_factor * H; truncation >= truncation_thres (when truncation >= 0); visibility <=
visibility_thres (when visibility >= 0); its category is dontcare / ignore / void.

The 2D box of the height test is Cube R-CNN's choice in `is_ignore`: `bbox2D_trunc` when present and
not all -1 (TRUNC_2D_BOXES), else `bbox2D_proj` when the field exists (an all -1 box has no height, so
the object is ignored), else the box the loader stores (`stored_box`). The box the loader stores for an
object (its `bbox`, the one 2D AP is scored on) is chosen in another order: trunc, else proj when its x1
!= -1, else tight when its x1 != -1, else none (the object is dropped).

Thresholds: the evaluation uses `configs/Base.yaml`'s TEST section (VISIBILITY_THRES = TRUNCATION_THRES
= 0.33333333; MIN_HEIGHT_THRES 0.0625 is the `DATASETS` default of the config), training the DATASETS
section (0.25 / 0.75 / 0.05).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IGNORE_NAMES", "IgnoreRules", "EVAL_RULES", "TRAIN_RULES", "NO_RULES", "RULE_PRESETS", "box4",
           "height_box", "stored_box", "ignore_rule_reasons", "is_ignore"]

IGNORE_NAMES = ("dontcare", "ignore", "void")


@dataclass(frozen=True)
class IgnoreRules:
    """Cube R-CNN's `is_ignore` thresholds. A threshold of None switches that rule off."""

    visibility_thres: float | None = 0.33333333
    truncation_thres: float | None = 0.33333333
    min_height_thres: float | None = 0.0625
    max_height_factor: float | None = 1.5
    max_depth: float | None = 1e8
    max_depth_error: float | None = 0.5
    require_lidar_pts: bool = True
    require_segmentation_pts: bool = True
    ignore_names: tuple[str, ...] = field(default=IGNORE_NAMES)
    use_trunc_box: bool = True  # TRUNC_2D_BOXES: the height rule measures bbox2D_trunc (else bbox2D_proj)


EVAL_RULES = IgnoreRules()
TRAIN_RULES = IgnoreRules(visibility_thres=0.25, truncation_thres=0.75, min_height_thres=0.05)
NO_RULES = IgnoreRules(None, None, None, None, None, None, False, False, (), True)
RULE_PRESETS = {"eval": EVAL_RULES, "train": TRAIN_RULES, "none": NO_RULES}


def box4(x: object) -> list[float] | None:
    """A valid [x1, y1, x2, y2] or None when absent (-1 / missing / malformed)."""
    if not isinstance(x, list | tuple) or len(x) != 4:
        return None
    try:
        v = [float(a) for a in x]
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(a) for a in v) or all(a == -1 for a in v) or v[2] < v[0] or v[3] < v[1]:
        return None
    return v


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        v = float(x)
    except OverflowError:  # an integer beyond float64: not a usable value, like inf
        return None
    return v if math.isfinite(v) else None


def _x1_set(x: object) -> bool:
    return isinstance(x, list | tuple) and len(x) == 4 and _num(x[0]) != -1


def stored_box(ann: Mapping[str, Any], rules: IgnoreRules = EVAL_RULES) -> list[float] | None:
    """The XYXY box Cube R-CNN's loader stores for an object (trunc, proj, tight), or None: dropped."""
    trunc = ann.get("bbox2D_trunc")
    if rules.use_trunc_box and box4(trunc) is not None:
        return box4(trunc)
    for name in ("bbox2D_proj", "bbox2D_tight"):
        if _x1_set(ann.get(name)):
            return box4(ann.get(name))
    return None


def height_box(ann: Mapping[str, Any], rules: IgnoreRules = EVAL_RULES) -> list[float] | None:
    """The XYXY box whose height `is_ignore` tests, or None when it has no usable one (then ignored)."""
    trunc = box4(ann.get("bbox2D_trunc")) if rules.use_trunc_box else None
    if trunc is not None:
        return trunc
    if "bbox2D_proj" in ann:
        return box4(ann.get("bbox2D_proj"))
    return stored_box(ann, rules)


def ignore_rule_reasons(ann: Mapping[str, Any], image_height: float, rules: IgnoreRules = EVAL_RULES) -> list[str]:
    """Why Cube R-CNN's `is_ignore` ignores this annotation, in a fixed order (empty list: keep it).

    Absent optional fields count as "not available" (-1), as the Omni3D format notes say.
    """
    out = []
    if bool(ann.get("behind_camera", False)):
        out.append("behind_camera")
    if not bool(ann.get("valid3D", True)):
        out.append("invalid_3d")
    dims = ann.get("dimensions")
    if dims is not None and any(float(d) <= 0 for d in dims):
        out.append("nonpositive_dimensions")
    if rules.max_depth is not None and float(ann["center_cam"][2]) > rules.max_depth:
        out.append("too_far")
    if rules.require_lidar_pts and _num(ann.get("lidar_pts")) == 0:
        out.append("no_lidar_points")
    if rules.require_segmentation_pts and _num(ann.get("segmentation_pts")) == 0:
        out.append("no_segmentation_points")
    de = _num(ann.get("depth_error"))
    if rules.max_depth_error is not None and de is not None and de > rules.max_depth_error:
        out.append("depth_error")
    box = height_box(ann, rules)
    if box is None:
        out.append("no_2d_box")
    else:
        h = box[3] - box[1]
        if rules.min_height_thres is not None and h <= rules.min_height_thres * image_height:
            out.append("too_short")
        if rules.max_height_factor is not None and h >= rules.max_height_factor * image_height:
            out.append("too_tall")
    tr = _num(ann.get("truncation"))
    if rules.truncation_thres is not None and tr is not None and tr >= 0 and tr >= rules.truncation_thres:
        out.append("truncated")
    vis = _num(ann.get("visibility"))
    if rules.visibility_thres is not None and vis is not None and vis >= 0 and vis <= rules.visibility_thres:
        out.append("occluded")
    if ann.get("category_name") in rules.ignore_names:
        out.append("ignore_category")
    return out


def is_ignore(ann: Mapping[str, Any], image_height: float, rules: IgnoreRules = EVAL_RULES) -> bool:
    """Cube R-CNN's `is_ignore`: the object is kept but counts as neither a miss nor a hit."""
    return bool(ignore_rule_reasons(ann, image_height, rules))
