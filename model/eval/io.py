"""Reading evaluation inputs: Omni3D ground-truth JSONs (with the test-time ignore rules) and predictions.

Ground truth follows Cube R-CNN's `Omni3D` loader at test time: the 2D box an object is scored on and
whether it is ignored (kept, but neither a miss nor a hit) are `schemas.omni3d`'s `stored_box` and
`is_ignore` with `EVAL_RULES` (the reader of the det3d corpus uses the same functions); categories named
dontcare / ignore / void are not evaluated.

Predictions: Omni3D's per-image form `[{image_id, K, width, height, instances: [{image_id, category_id,
bbox (XYWH px), score, depth, bbox3D (8x3)}]}]`, or a flat list of such instances. An instance may carry
`category_name` instead of (or besides) `category_id`; Cube R-CNN's contiguous ids can be mapped back
with its `category_meta.json`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.eval.omni3d_ap import Detection, GroundTruthSet, GTInstance
from schemas.omni3d import EVAL_RULES, IgnoreRules, is_ignore, stored_box

__all__ = [
    "FilterSettings",
    "TEST_FILTER",
    "is_ignore",
    "gt_bbox_xywh",
    "load_omni3d_gt",
    "parse_predictions",
    "load_predictions",
    "load_category_meta",
]


FilterSettings = IgnoreRules  # the evaluator's name for the rules (Cube R-CNN's "filter settings")
TEST_FILTER = EVAL_RULES


def gt_bbox_xywh(anno: Mapping[str, Any], fs: IgnoreRules = TEST_FILTER) -> tuple[float, float, float, float] | None:
    """The 2D box (XYWH px) Omni3D assigns to a GT object, or None when it has none (then it is dropped)."""
    b = stored_box(anno, fs)
    return None if b is None else (b[0], b[1], b[2] - b[0], b[3] - b[1])


def _dataset_name(path: Path, taken: set[str]) -> str:
    """`SUNRGBD_test.json` -> `SUNRGBD_test`; Omni3D keys evaluation (and proximity) on this name."""
    base = path.stem
    name, i = base, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    return name


def load_omni3d_gt(
    paths: Sequence[str | Path],
    fs: FilterSettings = TEST_FILTER,
    category_names: Sequence[str] | None = None,
) -> GroundTruthSet:
    """Load one or more Omni3D JSONs (one dataset each, named by file stem) with the test-time rules.

    `category_names` restricts evaluation to those categories (Omni3D uses its 50); by default each
    dataset is evaluated on every category its JSON lists, except the ignore names.
    """
    keep = None if category_names is None else set(category_names)
    gt = GroundTruthSet(categories={}, image_dataset={}, dataset_categories={})
    next_id = 1
    for p in paths:
        path = Path(p)
        data = json.loads(path.read_text())
        ds = _dataset_name(path, set(gt.dataset_categories))
        vocab: list[int] = []
        for c in data.get("categories", []):
            cid, name = int(c["id"]), str(c["name"])
            if name in fs.ignore_names or (keep is not None and name not in keep):
                continue
            if gt.categories.get(cid, name) != name:
                raise ValueError(
                    f"{path}: category id {cid} is {name!r} here but {gt.categories[cid]!r} elsewhere"
                )
            gt.categories[cid] = name
            vocab.append(cid)
        gt.dataset_categories[ds] = sorted(set(vocab))
        heights: dict[int, float] = {}
        for im in data.get("images", []):
            iid = int(im["id"])
            if iid in gt.image_dataset:
                raise ValueError(
                    f"{path}: image id {iid} also appears in {gt.image_dataset[iid]} (ids must be unique)"
                )
            gt.image_dataset[iid] = ds
            heights[iid] = float(im["height"])
            gt.image_sizes[iid] = (int(im["width"]), int(im["height"]))
            if "K" in im:
                gt.image_K[iid] = np.asarray(im["K"], dtype=np.float64)
            if "file_path" in im:
                gt.image_files[iid] = str(im["file_path"])
        vocab_set = set(vocab)
        for a in data.get("annotations", []):
            if int(a["category_id"]) not in vocab_set:
                continue
            iid = int(a["image_id"])
            if iid not in heights:
                raise ValueError(f"{path}: annotation {a.get('id')} refers to unknown image {iid}")
            bbox = gt_bbox_xywh(a, fs)
            if bbox is None:
                continue
            ann_id = int(a["id"]) if "id" in a else next_id
            next_id = max(next_id, ann_id) + 1
            gt.instances.append(
                GTInstance(
                    id=ann_id,
                    image_id=iid,
                    category_id=int(a["category_id"]),
                    corners=np.asarray(a["bbox3D_cam"], dtype=np.float64).reshape(8, 3),
                    depth=float(a["center_cam"][2]),
                    bbox=bbox,
                    ignore=is_ignore(a, heights[iid], fs),
                )
            )
    return gt


def load_category_meta(path: str | Path) -> dict[int, int]:
    """Cube R-CNN's `category_meta.json` -> {contiguous id: Omni3D category id} (predictions use contiguous ids)."""
    meta = json.loads(Path(path).read_text())
    return {int(v): int(k) for k, v in meta["thing_dataset_id_to_contiguous_id"].items()}


def projected_bbox(corners: np.ndarray, K: np.ndarray | None, size: tuple[int, int] | None) -> tuple | None:
    """Box of the projected corners clipped to the image: a stand-in 2D box for detectors that give none."""
    if K is None:
        return None
    pts = corners[corners[:, 2] > 1e-6]
    if len(pts) == 0:
        return None
    uvw = pts @ K.T
    uv = uvw[:, :2] / uvw[:, 2:3]
    x1, y1 = uv.min(axis=0)
    x2, y2 = uv.max(axis=0)
    if size is not None:
        w, h = size
        x1, x2 = np.clip([x1, x2], 0, w)
        y1, y2 = np.clip([y1, y2], 0, h)
    return (float(x1), float(y1), float(x2 - x1), float(y2 - y1))


def parse_predictions(
    data: Any,
    gt: GroundTruthSet | None = None,
    id_map: Mapping[int, int] | None = None,
) -> list[Detection]:
    """Detections from parsed predictions JSON (per-image Omni3D form, or a flat list of instances).

    `category_name` (resolved through `gt.categories`) wins over `category_id`; `id_map` maps
    contiguous ids to Omni3D ids. A missing 2D box is replaced by the box of the projected corners when
    the ground truth knows the image's K (needed only for proximity evaluation).
    """
    if isinstance(data, Mapping) and "predictions" in data:
        data = data["predictions"]
    if not isinstance(data, list):
        raise ValueError("predictions must be a JSON list (per-image records with 'instances', or instances)")
    instances: list[Mapping[str, Any]] = []
    for rec in data:
        if "instances" in rec:
            for inst in rec["instances"]:
                instances.append({"image_id": rec["image_id"], **inst})
        else:
            instances.append(rec)
    by_name: dict[str, int] = {}
    if gt is not None:
        for cid, name in sorted(gt.categories.items()):
            by_name.setdefault(name, cid)
    dets: list[Detection] = []
    for i, inst in enumerate(instances):
        try:
            if "category_name" in inst and gt is not None:
                name = str(inst["category_name"])
                if name not in by_name:
                    continue  # not an evaluated category: Omni3D drops out-of-vocabulary predictions
                cid = by_name[name]
            else:
                cid = int(inst["category_id"])
                if id_map is not None:
                    cid = id_map[cid]
            corners = np.asarray(inst["bbox3D"], dtype=np.float64).reshape(8, 3)
            score = float(inst["score"])
            image_id = int(inst["image_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"prediction {i}: {type(e).__name__}: {e}") from e
        if not math.isfinite(score):
            raise ValueError(f"prediction {i}: score is not finite")
        bbox = inst.get("bbox")
        bbox_t = tuple(float(v) for v in bbox) if bbox is not None else None
        if bbox_t is None and gt is not None:
            bbox_t = projected_bbox(corners, gt.image_K.get(image_id), gt.image_sizes.get(image_id))
        depth = inst.get("depth")
        dets.append(
            Detection(
                image_id=image_id,
                category_id=cid,
                score=score,
                corners=corners,
                bbox=bbox_t,  # type: ignore[arg-type]
                depth=float(depth) if depth is not None else None,
            )
        )
    return dets


def load_predictions(
    path: str | Path, gt: GroundTruthSet | None = None, id_map: Mapping[int, int] | None = None
) -> list[Detection]:
    """`parse_predictions` of a JSON file."""
    return parse_predictions(json.loads(Path(path).read_text()), gt, id_map)
