"""The Omni3D AP3D protocol (Cube R-CNN's `Omni3Deval`), without pycocotools, detectron2 or pytorch3d.

What it reproduces (cubercnn/evaluation/omni3d_evaluation.py @ 778bd02, see docs/formats.md, "Omni3D"):

* matching per (image, category), detections sorted by score (stable) and cut to 100, each taking the
  unmatched ground truth of highest 3D IoU >= t (ties: the later one), regular ground truth before
  ignored ground truth, exactly as COCOeval's loop does;
* IoU thresholds linspace(0.05, 0.50, 10), 101 recall points, precision made monotone and sampled;
* "area" ranges are depth ranges on the GT centre z and the detection depth (mean corner z): all
  [0, 1e5], near [0, 10], medium [10, 35], far [35, 1e5] (bounds inclusive); GT outside a range is
  ignored there, an unmatched detection outside it is ignored there;
* a GT flagged `ignore` (the test-time ignore rules) does not count as a miss, and a detection
  matched to it does not count at all (neither TP nor FP);
* proximity evaluation for SUN RGB-D and Objectron (not exhaustively labelled): a detection may only
  match GT whose 2D IoU with it is > 0.3, and a detection with no such GT of its category in the
  image is ignored. As in Omni3D, this applies only when the image has GT of that category; a
  detection of a category absent from the image stays a false positive;
* per-category AP = mean precision over IoU thresholds and recall points (categories without
  non-ignored GT have no AP); a dataset's AP3D = mean over its categories that have an AP; the overall
  figure accumulates all datasets' images jointly (Omni3D's `summarize_all`).

All metrics are fractions in [0, 1] (Omni3D prints them x100).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.eval.ground2d import iou_2d, xywh_to_xyxy
from model.eval.iou3d import DegenerateBoxWarning, iou_3d_pairs, valid_boxes

__all__ = [
    "Omni3DParams",
    "GTInstance",
    "Detection",
    "GroundTruthSet",
    "ImageEval",
    "evaluate_image",
    "accumulate",
    "evaluate",
    "OMNI3D_CATEGORIES",
    "OMNI3D_IN_CATEGORIES",
    "OMNI3D_OUT_CATEGORIES",
    "PROXIMITY_DATASETS",
]

# Category lists from cubercnn/data/builtin.py (docs/formats.md), for the Omni3D / _In / _Out summaries.
from schemas.categories import OMNI3D_CATEGORIES, OMNI3D_IN_CATEGORIES, OMNI3D_OUT_CATEGORIES  # noqa: F401

# Omni3D turns proximity evaluation on when the dataset name contains one of these.
PROXIMITY_DATASETS: tuple[str, ...] = ("SUNRGBD", "Objectron")


@dataclass(frozen=True)
class Omni3DParams:
    """Omni3D's `setDet3DParams` (3D mode)."""

    iou_thrs: tuple[float, ...] = tuple(float(x) for x in np.linspace(0.05, 0.5, 10))
    rec_thrs: tuple[float, ...] = tuple(float(x) for x in np.linspace(0.0, 1.0, 101))
    max_dets: int = 100
    depth_ranges: tuple[tuple[str, float, float], ...] = (
        ("all", 0.0, 1e5),
        ("near", 0.0, 10.0),
        ("medium", 10.0, 35.0),
        ("far", 35.0, 1e5),
    )
    proximity_thresh: float = 0.3


@dataclass
class GTInstance:
    """One ground-truth object: 8 corners (Omni3D order), 2D box XYWH (pixels), depth = centre z."""

    id: int
    image_id: int
    category_id: int
    corners: np.ndarray
    depth: float
    bbox: tuple[float, float, float, float] | None = None
    ignore: bool = False


@dataclass
class Detection:
    """One detection; `depth` defaults to the mean z of its corners (as Cube R-CNN writes it)."""

    image_id: int
    category_id: int
    score: float
    corners: np.ndarray
    bbox: tuple[float, float, float, float] | None = None
    depth: float | None = None

    def __post_init__(self) -> None:
        self.corners = np.asarray(self.corners, dtype=np.float64).reshape(8, 3)
        if self.depth is None:
            self.depth = float(self.corners[:, 2].mean())


@dataclass
class GroundTruthSet:
    """Ground truth of one or more datasets (e.g. Omni3D test JSONs), in evaluation order.

    `image_dataset` maps image id -> dataset name; `dataset_categories` lists, per dataset, the category
    ids it is evaluated on (its vocabulary: detections of other categories are dropped, as Omni3D does).
    """

    categories: dict[int, str]
    image_dataset: dict[int, str]
    dataset_categories: dict[str, list[int]]
    instances: list[GTInstance] = field(default_factory=list)
    image_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (width, height)
    image_K: dict[int, np.ndarray] = field(default_factory=dict)
    image_files: dict[int, str] = field(default_factory=dict)  # id -> file_path (relative to the image root)

    def subset(self, image_ids: Iterable[int]) -> GroundTruthSet:
        """The same ground truth restricted to some images (e.g. the ones a partial run predicted)."""
        keep = set(image_ids)
        return GroundTruthSet(
            categories=dict(self.categories),
            image_dataset={i: d for i, d in self.image_dataset.items() if i in keep},
            dataset_categories={d: list(c) for d, c in self.dataset_categories.items()},
            instances=[g for g in self.instances if g.image_id in keep],
            image_sizes={i: v for i, v in self.image_sizes.items() if i in keep},
            image_K={i: v for i, v in self.image_K.items() if i in keep},
            image_files={i: v for i, v in self.image_files.items() if i in keep},
        )

    def prediction_jobs(self) -> list[dict[str, Any]]:
        """Per image: id, file_path, size, K and the categories present in its GT (target-aware prompting)."""
        present: dict[int, set[int]] = defaultdict(set)
        for g in self.instances:
            present[g.image_id].add(g.category_id)
        jobs = []
        for iid in sorted(self.image_dataset):
            w, h = self.image_sizes[iid]
            jobs.append(
                {
                    "id": iid,
                    "file_path": self.image_files.get(iid, ""),
                    "width": w,
                    "height": h,
                    "K": self.image_K[iid].tolist() if iid in self.image_K else None,
                    "categories": [(c, self.categories[c]) for c in sorted(present[iid])],
                }
            )
        return jobs

    def datasets(self) -> list[str]:
        """Dataset names in the order they were added (their order in the overall accumulation)."""
        return list(self.dataset_categories)

    def proximity(self, dataset: str) -> bool:
        return any(p in dataset for p in PROXIMITY_DATASETS)


@dataclass
class ImageEval:
    """COCOeval's per (image, category, depth range) record: what `accumulate` needs."""

    image_id: int
    category_id: int
    dt_scores: np.ndarray  # (D,) sorted descending
    dt_matched: np.ndarray  # (T, D) bool
    dt_ignore: np.ndarray  # (T, D) bool
    gt_ignore: np.ndarray  # (G,) bool


def _last_argmax(x: np.ndarray) -> np.ndarray:
    """Index of the last maximum along axis 1 (COCOeval keeps the later GT on equal IoU)."""
    return x.shape[1] - 1 - np.argmax(x[:, ::-1], axis=1)


def evaluate_image(
    ious: np.ndarray,
    gt_ignore: np.ndarray,
    gt_depth: np.ndarray,
    dt_depth: np.ndarray,
    dt_scores: np.ndarray,
    depth_range: tuple[float, float],
    iou_thrs: Sequence[float],
    in_prox: np.ndarray | None = None,
    image_id: int = 0,
    category_id: int = 0,
) -> ImageEval:
    """Match the detections of one (image, category) to its GT for one depth range (COCOeval.evaluateImg).

    `ious` (D, G) must have the detections already sorted by descending score and cut to maxDets;
    `in_prox` (D, G) is the proximity mask (2D IoU > 0.3) or None when proximity evaluation is off.
    """
    lo, hi = depth_range
    ious = np.asarray(ious, dtype=np.float64).reshape(len(dt_scores), len(gt_ignore))
    g_ig = np.asarray(gt_ignore, bool) | (np.asarray(gt_depth) < lo) | (np.asarray(gt_depth) > hi)
    order = np.argsort(g_ig, kind="mergesort")  # regular GT first, as COCOeval sorts them
    g_ig = g_ig[order]
    ious = ious[:, order]
    prox = None if in_prox is None else np.asarray(in_prox, bool).reshape(ious.shape)[:, order]
    thr = np.minimum(np.asarray(iou_thrs, dtype=np.float64), 1 - 1e-10)
    T, (D, G) = len(thr), ious.shape
    gtm = np.zeros((T, G), bool)
    dtm = np.zeros((T, D), bool)
    dt_ig = np.zeros((T, D), bool)
    if D and G:
        tr = np.arange(T)
        for d in range(D):
            iou = ious[d]
            ok = ~gtm & (iou[None, :] >= thr[:, None])
            if prox is not None:
                ok &= prox[d][None, :]
            ok_reg = ok & ~g_ig[None, :]
            ok_ign = ok & g_ig[None, :]
            has_reg = ok_reg.any(axis=1)
            has = has_reg | ok_ign.any(axis=1)
            m_reg = _last_argmax(np.where(ok_reg, iou[None, :], -np.inf))
            m_ign = _last_argmax(np.where(ok_ign, iou[None, :], -np.inf))
            m = np.where(has_reg, m_reg, m_ign)
            dtm[has, d] = True
            dt_ig[has, d] = g_ig[m[has]]
            gtm[tr[has], m[has]] = True
    out_of_range = (np.asarray(dt_depth) < lo) | (np.asarray(dt_depth) > hi)
    dt_ig |= ~dtm & out_of_range[None, :]
    if prox is not None and D and G:
        dt_ig |= ~prox.any(axis=1)[None, :]
    return ImageEval(image_id, category_id, np.asarray(dt_scores, np.float64), dtm, dt_ig, g_ig)


def accumulate(evals: Sequence[ImageEval], params: Omni3DParams) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision (T, R) and recall (T,) of one category and depth range over images (COCOeval.accumulate).

    Returns None when there is no non-ignored GT (COCOeval leaves -1 there: no AP for that category).
    """
    if not evals:
        return None
    maxd = params.max_dets
    scores = np.concatenate([e.dt_scores[:maxd] for e in evals])
    gt_ig = np.concatenate([e.gt_ignore for e in evals])
    npig = int(np.count_nonzero(~gt_ig))
    if npig == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    T = len(params.iou_thrs)
    dtm = (
        np.concatenate([e.dt_matched[:, :maxd] for e in evals], axis=1)[:, order]
        if len(scores)
        else np.zeros((T, 0), bool)
    )
    dti = (
        np.concatenate([e.dt_ignore[:, :maxd] for e in evals], axis=1)[:, order]
        if len(scores)
        else np.zeros((T, 0), bool)
    )
    tps = np.cumsum(dtm & ~dti, axis=1).astype(np.float64)
    fps = np.cumsum(~dtm & ~dti, axis=1).astype(np.float64)
    rec_thrs = np.asarray(params.rec_thrs)
    R = len(rec_thrs)
    precision = np.zeros((T, R))
    recall = np.zeros(T)
    nd = tps.shape[1]
    if nd == 0:
        return precision, recall
    for t in range(T):
        rc = tps[t] / npig
        pr = tps[t] / (fps[t] + tps[t] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # monotone (right-to-left max)
        recall[t] = rc[-1]
        inds = np.searchsorted(rc, rec_thrs, side="left")
        precision[t] = np.where(inds < nd, pr[np.minimum(inds, nd - 1)], 0.0)
    return precision, recall


def _mean(xs: Iterable[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return float(np.mean(v)) if v else float("nan")


def _summarize(
    table: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray] | None],
    cat_ids: Sequence[int],
    categories: Mapping[int, str],
    params: Omni3DParams,
) -> dict[str, Any]:
    """Omni3D's summarize(): AP (all thresholds), AP15/25/50, APn/m/f, AR, per-category AP."""
    thrs = np.asarray(params.iou_thrs)

    def mean_prec(rng: str, t_idx: int | None = None) -> float:
        vals = []
        for c in cat_ids:
            pr = table.get((c, rng))
            if pr is None:
                continue
            vals.append(pr[0] if t_idx is None else pr[0][t_idx : t_idx + 1])
        return float(np.mean(np.concatenate([v.ravel() for v in vals]))) if vals else float("nan")

    def t_of(x: float) -> int:
        return int(np.nonzero(np.isclose(thrs, x))[0][0])

    out: dict[str, Any] = {
        "AP3D": mean_prec("all"),
        "AP15": mean_prec("all", t_of(0.15)),
        "AP25": mean_prec("all", t_of(0.25)),
        "AP50": mean_prec("all", t_of(0.50)),
        "APn": mean_prec("near"),
        "APm": mean_prec("medium"),
        "APf": mean_prec("far"),
    }
    recalls = [table[(c, "all")][1] for c in cat_ids if table.get((c, "all")) is not None]
    out["AR100"] = float(np.mean(np.concatenate(recalls))) if recalls else float("nan")
    per_cat = {}
    for c in cat_ids:
        pr = table.get((c, "all"))
        per_cat[categories[c]] = float(pr[0].mean()) if pr is not None else float("nan")
    out["per_category"] = per_cat
    out["n_categories_with_gt"] = sum(1 for c in cat_ids if table.get((c, "all")) is not None)
    return out


def _proximity_mask(dets: Sequence[Detection], gts: Sequence[GTInstance], thresh: float) -> np.ndarray:
    if any(d.bbox is None for d in dets) or any(g.bbox is None for g in gts):
        raise ValueError("proximity evaluation needs 2D boxes ('bbox', XYWH) on detections and ground truth")
    return iou_2d(xywh_to_xyxy([d.bbox for d in dets]), xywh_to_xyxy([g.bbox for g in gts])) > thresh


def _group_ious(
    groups: Sequence[tuple[int, int, list[Detection], list[GTInstance]]], batch_pairs: int = 20000
) -> list[np.ndarray]:
    """The (D, G) 3D IoU matrix of every group, computed in a few large vectorised calls.

    Degenerate boxes are counted once here (one warning), not once per pair.
    """
    out: list[np.ndarray] = [np.zeros((len(d), len(g))) for _, _, d, g in groups]
    dets = [d for _, _, dl, _ in groups for d in dl]
    gts = [g for _, _, _, gl in groups for g in gl]
    bad_d = int((~valid_boxes(np.stack([d.corners for d in dets]))).sum()) if dets else 0
    bad_g = int((~valid_boxes(np.stack([g.corners for g in gts]))).sum()) if gts else 0
    if bad_d or bad_g:
        warnings.warn(
            f"{bad_d} detection and {bad_g} ground-truth boxes are degenerate (non-planar or zero volume): IoU 0",
            DegenerateBoxWarning,
            stacklevel=3,
        )
    pending: list[int] = []
    n_pairs = 0

    def flush() -> None:
        nonlocal pending, n_pairs
        if not pending:
            return
        a = np.concatenate(
            [
                np.repeat(np.stack([d.corners for d in groups[i][2]]), len(groups[i][3]), axis=0)
                for i in pending
            ]
        )
        b = np.concatenate(
            [np.tile(np.stack([g.corners for g in groups[i][3]]), (len(groups[i][2]), 1, 1)) for i in pending]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateBoxWarning)
            flat = iou_3d_pairs(a, b)
        pos = 0
        for i in pending:
            D, G = len(groups[i][2]), len(groups[i][3])
            out[i] = flat[pos : pos + D * G].reshape(D, G)
            pos += D * G
        pending, n_pairs = [], 0

    for i, (_, _, d_list, g_list) in enumerate(groups):
        if d_list and g_list:
            pending.append(i)
            n_pairs += len(d_list) * len(g_list)
            if n_pairs >= batch_pairs:
                flush()
    flush()
    return out


def evaluate(
    gt: GroundTruthSet,
    detections: Iterable[Detection],
    params: Omni3DParams | None = None,
) -> dict[str, Any]:
    """Score detections against ground truth with the Omni3D protocol.

    Returns {"datasets": {name: metrics}, "overall": metrics, "omni3d": {"Omni3D", "Omni3D_In",
    "Omni3D_Out"}, "counts": {...}} where metrics holds AP3D, AP15, AP25, AP50, APn, APm, APf, AR100,
    per_category. Detections on images absent from the ground truth, or of a category outside the
    image's dataset vocabulary, are dropped and counted (Omni3D drops out-of-vocabulary ones too).
    """
    params = params or Omni3DParams()
    vocab = {ds: set(c) for ds, c in gt.dataset_categories.items()}
    gts_by: dict[tuple[int, int], list[GTInstance]] = defaultdict(list)
    for g in gt.instances:
        gts_by[(g.image_id, g.category_id)].append(g)
    dts_by: dict[tuple[int, int], list[Detection]] = defaultdict(list)
    n_unknown_image = n_out_of_vocab = n_dets = 0
    for d in detections:
        n_dets += 1
        ds = gt.image_dataset.get(d.image_id)
        if ds is None:
            n_unknown_image += 1
            continue
        if d.category_id not in vocab[ds]:
            n_out_of_vocab += 1
            continue
        dts_by[(d.image_id, d.category_id)].append(d)

    ranges = params.depth_ranges
    # Pass 1: per (image, category) its detections (sorted by score, cut to maxDets) and GT.
    groups: list[tuple[int, int, list[Detection], list[GTInstance]]] = []
    for img, cat in sorted(set(gts_by) | set(dts_by)):
        if cat not in vocab[gt.image_dataset[img]]:
            continue
        g_list = gts_by.get((img, cat), [])
        d_list = dts_by.get((img, cat), [])
        order = np.argsort([-d.score for d in d_list], kind="mergesort")[: params.max_dets]
        groups.append((img, cat, [d_list[i] for i in order], g_list))
    ious_of = _group_ious(groups)

    # Pass 2: match per depth range. Evals are kept per (dataset, category, range), images ascending
    # (COCOeval's imgIds order, which decides score ties in the accumulation).
    evals: dict[tuple[str, int, str], list[ImageEval]] = defaultdict(list)
    for (img, cat, d_list, g_list), ious in zip(groups, ious_of):
        ds = gt.image_dataset[img]
        prox = None
        if gt.proximity(ds) and d_list and g_list:
            prox = _proximity_mask(d_list, g_list, params.proximity_thresh)
        g_ignore = np.array([g.ignore for g in g_list], bool)
        g_depth = np.array([g.depth for g in g_list], np.float64)
        d_depth = np.array([d.depth for d in d_list], np.float64)
        d_scores = np.array([d.score for d in d_list], np.float64)
        for name, lo, hi in ranges:
            evals[(ds, cat, name)].append(
                evaluate_image(
                    ious, g_ignore, g_depth, d_depth, d_scores, (lo, hi), params.iou_thrs, prox, img, cat
                )
            )

    range_names = [r[0] for r in ranges]
    results: dict[str, Any] = {"datasets": {}}
    for ds in gt.datasets():
        table = {
            (c, r): accumulate(evals.get((ds, c, r), []), params) for c in vocab[ds] for r in range_names
        }
        m = _summarize(table, sorted(vocab[ds]), gt.categories, params)
        imgs = {i for i, d in gt.image_dataset.items() if d == ds}
        m["n_images"] = len(imgs)
        m["n_gt"] = sum(1 for g in gt.instances if g.image_id in imgs)
        m["n_gt_ignored"] = sum(1 for g in gt.instances if g.image_id in imgs and g.ignore)
        m["proximity"] = gt.proximity(ds)
        results["datasets"][ds] = m

    all_cats = sorted(set().union(*vocab.values())) if vocab else []
    table = {}
    for c in all_cats:
        for r in range_names:
            joined = [e for ds in gt.datasets() for e in evals.get((ds, c, r), [])]
            table[(c, r)] = accumulate(joined, params)
    overall = _summarize(table, all_cats, gt.categories, params)
    overall["n_images"] = len(gt.image_dataset)
    overall["n_gt"] = len(gt.instances)
    overall["n_gt_ignored"] = sum(1 for g in gt.instances if g.ignore)
    results["overall"] = overall

    # Omni3D's named summaries: defined only when every category of the list has an AP.
    per_cat = overall["per_category"]
    results["omni3d"] = {
        name: (
            _mean(per_cat[c] for c in cats)
            if all(not math.isnan(per_cat.get(c, math.nan)) for c in cats)
            else None
        )
        for name, cats in (
            ("Omni3D", OMNI3D_CATEGORIES),
            ("Omni3D_In", OMNI3D_IN_CATEGORIES),
            ("Omni3D_Out", OMNI3D_OUT_CATEGORIES),
        )
    }
    results["counts"] = {
        "detections": n_dets,
        "dropped_unknown_image": n_unknown_image,
        "dropped_out_of_vocabulary": n_out_of_vocab,
    }
    return results
