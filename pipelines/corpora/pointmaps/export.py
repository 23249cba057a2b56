"""`gr3d shards show DIR KEY --ply OUT`: a point-map sample as a coloured point cloud, for inspection.

The cloud is the sample's *full* back-projection when its depth is at hand, else its N sampled points:
1. the depth stored in the shard (`KEY.depth.npy` + `KEY.depth_k.npy`, written with `--keep-depth`);
2. else the source depth file named in the record (`source.depth`, `depth_format`, `depth_scale`,
   `depth_K`), found under `data_root` (argument, else the GR3D_DATA_ROOT environment variable, else
   the current directory);
3. else the sampled points (`KEY.points.npy`).
Every point is coloured by the image pixel it projects to (colour K; the depth camera shares the
colour camera's pose), and full-cloud points outside the colour image are left out, as in sampling.
Open3D writes the file (binary PLY) and is imported only when this runs.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_ROOT_ENV", "cloud_of_sample", "export_ply"]

DATA_ROOT_ENV = "GR3D_DATA_ROOT"


def _image_rgb(sample: dict[str, Any], rec: dict[str, Any]) -> np.ndarray:
    from PIL import Image

    ext = rec["image"]["ext"]
    data = sample.get(ext)
    if data is None:
        raise ValueError(f"sample {rec['key']!r} has no {ext} image member")
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _source_depth(rec: dict[str, Any], data_root: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray] | None:
    from pipelines.corpora.pointmaps.depth_io import DepthError, DepthSpec, read_depth
    from pipelines.sources.common import PathEscapesRoot, resolve_under

    src = rec.get("source", {})
    rel = src.get("depth")
    if not rel or "depth_format" not in src:
        return None
    root = data_root if data_root is not None else os.environ.get(DATA_ROOT_ENV, ".")
    try:
        depth = read_depth(resolve_under(root, rel), DepthSpec(src["depth_format"], src.get("depth_scale")))
    except (DepthError, PathEscapesRoot):
        return None
    return depth, np.asarray(src.get("depth_K", rec["camera"]["K"]), dtype=np.float64)


def cloud_of_sample(sample: dict[str, Any], data_root: str | os.PathLike[str] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, str]:
    """(xyz float64 (M, 3), rgb float64 (M, 3) in [0, 1], what) of a decoded point-map sample.

    `what` says which cloud it is: `stored_depth`, `source_depth` or `sampled_points`.
    """
    from pipelines.corpora.pointmaps.geometry import backproject, colour_view_mask

    rec = sample["json"]
    if rec.get("corpus") != "pointmap":
        raise ValueError(f"sample {rec.get('key')!r} is a {rec.get('corpus')!r} record, not a point map")
    K = np.asarray(rec["camera"]["K"], dtype=np.float64)
    W, H = rec["image"]["width"], rec["image"]["height"]
    rgb = _image_rgb(sample, rec)
    if "depth.npy" in sample and "depth_k.npy" in sample:
        found: tuple[np.ndarray, np.ndarray] | None = (sample["depth.npy"], sample["depth_k.npy"])
        what = "stored_depth"
    else:
        found = _source_depth(rec, data_root)
        what = "source_depth"
    if found is not None:
        depth, dK = found
        xyz, idx = backproject(depth, dK, return_index=True)
        view = colour_view_mask(depth.shape, K, dK, W, H)
        if view is not None:
            keep = view.reshape(-1)[idx]
            xyz = xyz[keep]
        xyz = xyz.astype(np.float64)
        uvw = xyz @ K.T
        uv = uvw[:, :2] / uvw[:, 2:3]
    else:
        pts = np.asarray(sample["points.npy"], dtype=np.float64)
        xyz, uv = pts[:, 2:5], pts[:, 0:2]
        what = "sampled_points"
    cols = np.clip(np.rint(uv[:, 0]).astype(np.int64), 0, W - 1)
    rows = np.clip(np.rint(uv[:, 1]).astype(np.int64), 0, H - 1)
    colours = rgb[rows, cols].astype(np.float64) / 255.0
    return xyz, colours, what


def export_ply(sample: dict[str, Any], path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None
               ) -> dict[str, Any]:
    """Write the sample's coloured cloud (see the module docstring) as a binary PLY via Open3D.

    Returns {"points": M, "cloud": what}. Raises ValueError for a sample that is not a point map.
    """
    import open3d as o3d

    xyz, colours, what = cloud_of_sample(sample, data_root)
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(xyz)
    pcd.colors = o3d.utility.Vector3dVector(colours)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not o3d.io.write_point_cloud(str(out), pcd, write_ascii=False):
        raise OSError(f"Open3D could not write {out}")
    return {"points": int(xyz.shape[0]), "cloud": what}
