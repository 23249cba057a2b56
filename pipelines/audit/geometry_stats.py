"""Audit metrics of the geometric corpora: 2D box checks, det3d size/depth outliers, point-map coverage, the gallery."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.audit.load import BuildData
from pipelines.audit.stats import (
    IOU_EDGES,
    IOU_THRESHOLD,
    LOG_MIN_MAD,
    LOG_VOLUME_MIN_MAD,
    MAX_LISTED,
    MAX_SCATTER,
    MIN_GROUP_FOR_Z,
    ROBUST_Z,
    auto_edges,
    histogram,
    robust_z,
    summary,
)
from schemas.boxes import box_iou


def _box_units(b: BuildData) -> dict[str, list[tuple[str, int, str, list[float]]]]:
    units: dict[str, list[tuple[str, int, str, list[float]]]] = {}
    for key, rec in sorted(b.records.items()):
        items = rec.get("mentions") if rec["corpus"] == "cot" else rec.get("objects") if rec["corpus"] == "det3d" else None
        for i, it in enumerate(items or []):
            units.setdefault(rec["corpus"], []).append((key, i, it["category"], [float(v) for v in it["bbox2d"]]))
    return units


def boxes2d(b: BuildData) -> dict[str, Any] | None:
    """Size and position distributions of 2D boxes (cot mentions, det3d objects), normalized coordinates."""
    units = _box_units(b)
    if not units:
        return None
    out: dict[str, Any] = {}
    for corpus, us in units.items():
        a = np.asarray([u[3] for u in us], dtype=np.float64)
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        area = w * h
        cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
        pos = (w > 0) & (h > 0)
        log_aspect = np.log2(w[pos] / h[pos])
        heat, _, _ = np.histogram2d(cy, cx, bins=10, range=[[0, 1], [0, 1]])
        border = (a[:, 0] <= 1e-6) | (a[:, 1] <= 1e-6) | (a[:, 2] >= 1 - 1e-6) | (a[:, 3] >= 1 - 1e-6)
        cats = Counter(u[2] for u in us)
        out[corpus] = {
            "n": len(us), "width": summary(w), "height": summary(h), "area": summary(area),
            "log2_aspect": summary(log_aspect),
            "n_degenerate": int(((w <= 0) | (h <= 0)).sum()), "n_tiny": int((area < 1e-3).sum()),
            "n_huge": int((area > 0.9).sum()), "n_touching_border": int(border.sum()),
            "hist_width": histogram(w, IOU_EDGES), "hist_height": histogram(h, IOU_EDGES),
            "hist_sqrt_area": histogram(np.sqrt(np.clip(area, 0, None)), IOU_EDGES),
            "center_heatmap": [[int(x) for x in row] for row in heat],  # rows: y (top first), cols: x
            "categories": [{"category": c, "count": n} for c, n in sorted(cats.items(), key=lambda x: (-x[1], x[0]))],
        }
    return out


# ============================================================================ det3d
def _projected_box(box3d: Mapping[str, Any], K: Sequence[Sequence[float]], w: int, h: int) -> list[float] | None:
    """The normalized 2D extent of the 3D box's projected corners, clipped to the image; None when a
    corner is behind (or within 5 cm of) the camera plane or the projection misses the image."""
    from schemas.camera import box_corners, project
    from schemas.grammar import Box3D, box3d_to_pose

    c, d, R = box3d_to_pose(Box3D(tuple(box3d["center"]), tuple(box3d["dimensions"]), tuple(box3d["rotation"])))
    corners = box_corners(c, d, R)
    if (corners[:, 2] <= 0.05).any():
        return None
    uv = project(K, corners)
    x1, y1 = max(0.0, float(uv[:, 0].min())), max(0.0, float(uv[:, 1].min()))
    x2, y2 = min(float(w), float(uv[:, 0].max())), min(float(h), float(uv[:, 1].max()))
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1 / w, y1 / h, x2 / w, y2 / h]


def det3d_stats(b: BuildData) -> dict[str, Any] | None:
    """Depth, size and orientation distributions of det3d objects, 2D/3D consistency, and outliers.

    Outliers: per category (>= MIN_GROUP_FOR_Z objects) a robust z-score beyond ROBUST_Z of the log
    smallest side, largest side or volume (sorted extents: the canonical form may permute w, h, l of
    one object between views), a robust z of the log depth over all objects, and hard rules (depth < 0.2 m
    or > 30 m, a side > 10 m or < 1 cm, |pitch| or |roll| > 45 degrees, the 2D box overlapping the
    projected 3D box by IoU < 0.25). Each listed object says which rule and value.
    """
    keys = b.keys_of("det3d")
    if not keys:
        return None
    objs = []
    for key in keys:
        rec = b.records[key]
        K = rec["camera"]["K"]
        w, h = rec["image"]["width"], rec["image"]["height"]
        for i, o in enumerate(rec.get("objects", [])):
            bx = o["box3d"]
            proj = _projected_box(bx, K, w, h)
            objs.append({"key": key, "index": i, "category": o["category"], "dataset": rec["source"]["dataset"],
                         "x": float(bx["center"][0]), "y": float(bx["center"][1]), "z": float(bx["center"][2]),
                         "w": float(bx["dimensions"][0]), "h": float(bx["dimensions"][1]), "l": float(bx["dimensions"][2]),
                         "pitch": float(bx["rotation"][0]) * 180.0, "roll": float(bx["rotation"][1]) * 180.0,
                         "yaw": float(bx["rotation"][2]) * 180.0,
                         "consistency_iou": box_iou([float(v) for v in o["bbox2d"]], proj) if proj else None})
    out: dict[str, Any] = {"n_samples": len(keys), "n_objects": len(objs)}
    if not objs:
        return out
    z = np.asarray([o["z"] for o in objs])
    out["depth"] = summary(z)
    out["hist_depth"] = histogram(z, auto_edges(z, 30, lo=0.0))
    for k in ("pitch", "roll", "yaw"):
        v = [o[k] for o in objs]
        out[k] = summary(v)
        out[f"hist_{k}"] = histogram(v, [float(x) for x in range(-180, 181, 10)])
    cons = [o["consistency_iou"] for o in objs if o["consistency_iou"] is not None]
    out["consistency_iou"] = summary(cons)
    out["hist_consistency_iou"] = histogram(cons, IOU_EDGES)
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in objs:
        by_cat[o["category"]].append(o)
    out["per_category"] = [{"category": c, "n": len(os_),
                            "w": summary([o["w"] for o in os_]), "h": summary([o["h"] for o in os_]),
                            "l": summary([o["l"] for o in os_]), "depth": summary([o["z"] for o in os_])}
                           for c, os_ in sorted(by_cat.items(), key=lambda x: (-len(x[1]), x[0]))]
    flags: list[dict[str, Any]] = []

    def flag(o: dict[str, Any], rule: str, value: float, score: float | None = None) -> None:
        flags.append({"key": o["key"], "index": o["index"], "category": o["category"], "rule": rule,
                      "value": float(value), "robust_z": None if score is None else float(score)})

    zz = robust_z(np.log(np.clip(z, 1e-3, None)), LOG_MIN_MAD)
    if len(objs) >= MIN_GROUP_FOR_Z:
        for o, s in zip(objs, zz):
            if abs(s) > ROBUST_Z:
                flag(o, "depth_robust_z", o["z"], s)
    for os_ in by_cat.values():
        if len(os_) < MIN_GROUP_FOR_Z:
            continue
        # sorted extents, not w/h/l: canonicalization may permute the dimensions of the same object
        ext = np.sort(np.asarray([[o["w"], o["h"], o["l"]] for o in os_]), axis=1)
        for name, vals, floor in (("smallest_side", ext[:, 0], LOG_MIN_MAD), ("largest_side", ext[:, 2], LOG_MIN_MAD),
                                  ("volume", ext.prod(axis=1), LOG_VOLUME_MIN_MAD)):
            for o, v, s in zip(os_, vals, robust_z(np.log(vals), floor)):
                if abs(s) > ROBUST_Z:
                    flag(o, f"{name}_robust_z", v, s)
    for o in objs:
        if o["z"] < 0.2:
            flag(o, "depth_below_0_2m", o["z"])
        if o["z"] > 30:
            flag(o, "depth_above_30m", o["z"])
        for dim in ("w", "h", "l"):
            if o[dim] > 10:
                flag(o, f"{dim}_above_10m", o[dim])
            if o[dim] < 0.01:
                flag(o, f"{dim}_below_1cm", o[dim])
        for ang in ("pitch", "roll"):
            if abs(o[ang]) > 45:
                flag(o, f"{ang}_above_45deg", o[ang])
        if o["consistency_iou"] is not None and o["consistency_iou"] < 0.25:
            flag(o, "bbox2d_vs_projection_iou_below_0_25", o["consistency_iou"])
    flags.sort(key=lambda f: (-(abs(f["robust_z"]) if f["robust_z"] is not None else 1e9), f["key"], f["index"], f["rule"]))
    out["n_outliers"] = len({(f["key"], f["index"]) for f in flags})
    out["outlier_rules"] = dict(sorted(Counter(f["rule"] for f in flags).items()))
    out["outliers"] = flags[:MAX_LISTED]
    step = max(1, math.ceil(len(objs) / MAX_SCATTER))  # a deterministic thinning keeps audit.json small
    out["scatter"] = {"z": [o["z"] for o in objs[::step]], "volume": [o["w"] * o["h"] * o["l"] for o in objs[::step]],
                      "category": [o["category"] for o in objs[::step]], "every": step}
    return out


# ============================================================================ point maps
def pointmap_stats(b: BuildData) -> dict[str, Any] | None:
    """Depth of the sampled points, per-sample depth, image coverage, invalid points, outlier samples."""
    keys = [k for k in b.keys_of("pointmap") if k in b.point_stats]
    if not keys:
        return None
    z = np.concatenate([b.points[k][:, 4] for k in keys if b.points[k].ndim == 2 and b.points[k].shape[0]])
    z = z[np.isfinite(z)]
    med = np.asarray([b.point_stats[k].get("z_median", np.nan) for k in keys], dtype=np.float64)
    uv = []
    for k in keys:
        p = b.points[k]
        rec = b.records[k]
        if p.ndim == 2 and p.shape[0]:
            uv.append(np.stack([p[:, 0] / rec["image"]["width"], p[:, 1] / rec["image"]["height"]], axis=1))
    uv_a = np.concatenate(uv) if uv else np.zeros((0, 2))
    heat, _, _ = np.histogram2d(np.clip(uv_a[:, 1], 0, 1), np.clip(uv_a[:, 0], 0, 1), bins=10, range=[[0, 1], [0, 1]])
    ok = np.isfinite(med)
    scores = np.full(med.shape, np.nan)
    if ok.sum() >= MIN_GROUP_FOR_Z:
        scores[ok] = robust_z(np.log(np.clip(med[ok], 1e-3, None)), LOG_MIN_MAD)
    outliers = [{"key": k, "rule": "median_depth_robust_z", "value": float(m), "robust_z": float(s)}
                for k, m, s in zip(keys, med, scores) if np.isfinite(s) and abs(s) > ROBUST_Z]
    outliers += [{"key": k, "rule": "invalid_points", "value": b.point_stats[k]["n_invalid"], "robust_z": None}
                 for k in keys if b.point_stats[k]["n_invalid"] > 0]
    outliers += [{"key": k, "rule": "points_outside_image", "value": b.point_stats[k].get("n_outside_image", 0.0),
                  "robust_z": None} for k in keys if b.point_stats[k].get("n_outside_image", 0.0) > 0]
    n_pts = [b.point_stats[k]["n"] for k in keys]
    return {
        "n_samples": len(keys), "n_points": int(sum(n_pts)), "points_per_sample": summary(n_pts),
        "n_invalid_points": int(sum(b.point_stats[k]["n_invalid"] for k in keys)),
        "depth": summary(z), "hist_depth": histogram(z, auto_edges(z, 30, lo=0.0)),
        "median_depth_per_sample": summary(med), "hist_median_depth": histogram(med, auto_edges(med[ok], 20, lo=0.0)),
        "uv_heatmap": [[int(x) for x in row] for row in heat],
        "n_outliers": len({o["key"] for o in outliers}), "outliers": outliers[:MAX_LISTED],
        "modes": dict(sorted(Counter(b.records[k]["points"]["mode"] for k in keys).items())),
    }


# ============================================================================ gallery
def select_gallery(b: BuildData, rows: list[dict[str, Any]] | None, n: int = 12, seed: int = 0,
                   det3d: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Up to `n` samples spread over strata, deterministic in (`seed`, key).

    Strata: corpus x dataset, and for cot with ground truth "all mentions agree" vs "a mention
    disagrees", for det3d "has an outlier" vs not: the gallery shows the bad cases next to typical
    ones instead of whatever sorts first.
    """
    import hashlib

    bad_cot = {r["key"] for r in rows or [] if r["iou_gt"] is not None and r["iou_gt"] < IOU_THRESHOLD}
    bad_det = {o["key"] for o in (det3d or {}).get("outliers", [])}
    strata: dict[str, list[str]] = defaultdict(list)
    for key, rec in b.records.items():
        s = f"{rec['corpus']}/{rec['source']['dataset']}"
        if rec["corpus"] == "cot" and rows is not None and b.ground_truth is not None:
            s += "/disagrees" if key in bad_cot else "/agrees"
        if rec["corpus"] == "det3d" and det3d is not None:
            s += "/outlier" if key in bad_det else "/typical"
        strata[s].append(key)

    def rank(k: str) -> str:
        return hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()

    queues = {s: sorted(ks, key=rank) for s, ks in sorted(strata.items())}
    out: list[dict[str, Any]] = []
    while len(out) < n and any(queues.values()):
        for s, q in queues.items():
            if q and len(out) < n:
                out.append({"key": q.pop(0), "stratum": s})
    return out
