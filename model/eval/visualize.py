"""Predicted and ground-truth 3D boxes projected on their images (PNG), to see what a model does.

Ground truth is drawn green (ignored objects grey), predictions red with their score; only corners in
front of the camera are joined (an edge crossing the camera plane is clipped to z = 0.05 m).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from model.eval.omni3d_ap import Detection, GroundTruthSet

__all__ = ["EDGES", "project_edges", "draw_detections"]

EDGES = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))
"""The 12 edges of a box in Omni3D / pytorch3d corner order (faces 0-1-2-3 and 4-5-6-7)."""


def project_edges(corners: np.ndarray, K: np.ndarray, near: float = 0.05) -> list[tuple[float, float, float, float]]:
    """Pixel segments (u1, v1, u2, v2) of the box edges, clipped to z >= near."""
    segs = []
    for i, j in EDGES:
        a, b = np.asarray(corners[i], float), np.asarray(corners[j], float)
        if a[2] < near and b[2] < near:
            continue
        if a[2] < near or b[2] < near:
            t = (near - a[2]) / (b[2] - a[2])
            p = a + t * (b - a)
            a, b = (p, b) if a[2] < near else (a, p)
        pa, pb = K @ a, K @ b
        segs.append((pa[0] / pa[2], pa[1] / pa[2], pb[0] / pb[2], pb[1] / pb[2]))
    return segs


def draw_detections(gt: GroundTruthSet, dets: Iterable[Detection], image_root: str | Path, out_dir: str | Path,
                    n: int, image_ids: Sequence[int] | None = None) -> list[Path]:
    """Draw the first `n` images (or `image_ids`); returns the written PNG paths."""
    from PIL import Image, ImageDraw

    by_image: dict[int, list[Detection]] = {}
    for d in dets:
        by_image.setdefault(d.image_id, []).append(d)
    ids = list(image_ids) if image_ids is not None else sorted(gt.image_dataset)[:n]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = gt.categories
    paths = []
    for iid in ids:
        K = gt.image_K.get(iid)
        if K is None or iid not in gt.image_files:
            continue
        with Image.open(Path(image_root) / gt.image_files[iid]) as f:
            im = f.convert("RGB")
        draw = ImageDraw.Draw(im)
        for g in (g for g in gt.instances if g.image_id == iid):
            for s in project_edges(g.corners, K):
                draw.line(s, fill=(150, 150, 150) if g.ignore else (0, 220, 0), width=2)
        for d in sorted(by_image.get(iid, []), key=lambda d: d.score):
            segs = project_edges(d.corners, K)
            for s in segs:
                draw.line(s, fill=(230, 30, 30), width=1)
            if segs:
                draw.text((segs[0][0], segs[0][1]), f"{names.get(d.category_id, d.category_id)} {d.score:.2f}",
                          fill=(230, 30, 30))
        path = out / f"{iid}.png"
        im.save(path)
        paths.append(path)
    return paths
