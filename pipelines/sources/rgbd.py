"""A generic posed-or-not RGB-D folder: one item per frame (image, metric depth, intrinsics).

The point-map corpus takes any RGB-D source, and most in-house captures are just folders. The layout
this reader accepts (recursively, sorted by path):
  STEM.jpg|jpeg|png      colour image (a file whose name ends in `.depth.png` is a depth map, not a frame)
  STEM.depth.npy         float depth in metres (0, negative or NaN = invalid), or
  STEM.depth.png         uint16 depth, metres = value / depth_scale (default 1000), 0 = invalid
  STEM.json              {"K": 3x3, optional "depth_K": 3x3, "depth_scale": float}; if absent, the nearest
                         `intrinsics.json` in the frame's folder or a parent (up to the root) is used.
When the depth map's size differs from the image's, a `depth_K` is required (else the frame is rejected):
the colour K does not apply to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.sources.common import ReadResult, SourceError, read_reject
from schemas.camera import CameraError, validate_intrinsics
from shards.keys import make_key

__all__ = ["IMAGE_EXTS", "read_rgbd"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _frames(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            low = name.lower()
            if low.endswith(IMAGE_EXTS) and not low.endswith(".depth.png"):
                out.append(Path(dirpath) / name)
    return sorted(out)


def _load_json(p: Path) -> dict[str, Any]:
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{p.name} must hold a JSON object")
    return data


def _intrinsics_file(frame_dir: Path, root: Path) -> Path | None:
    d = frame_dir
    while True:
        p = d / "intrinsics.json"
        if p.is_file():
            return p
        if d == root or root not in d.parents:
            return None
        d = d.parent


def _image_size(p: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(p) as im:  # reads the header only
        return int(im.width), int(im.height)


def _depth_shape(p: Path) -> tuple[int, ...]:
    if p.suffix == ".npy":
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
        if arr.dtype.kind != "f":
            raise ValueError(f"depth .npy must be float metres, got dtype {arr.dtype}")
        return tuple(int(s) for s in arr.shape)
    from PIL import Image

    with Image.open(p) as im:
        if im.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"depth .png must be 16-bit, got mode {im.mode}")
        return (int(im.height), int(im.width))


def read_rgbd(root: str | os.PathLike) -> Iterator[ReadResult]:
    """Yield one item per frame under `root`, or a reject saying why not.

    Item fields: key, format="rgbd", source {dataset, file, id}, image_path, depth_path, depth_format
    ("npy_m" | "png_mm"), depth_scale (png only), K, depth_K (3x3), width, height, depth_width, depth_height.
    Rejects: missing_depth, bad_intrinsics, bad_depth, unreadable_image, depth_size_mismatch. A missing `root`
    raises `SourceError`.
    """
    base = Path(os.path.abspath(root))
    if not base.is_dir():
        raise SourceError(base, "RGB-D folder not found" if not base.exists() else "not a folder")
    for img in _frames(base):
        rel = img.relative_to(base)
        stem_rel = rel.with_suffix("")
        key = make_key("rgbd", *stem_rel.parts)
        where = f"rgbd frame {rel.as_posix()}"
        stem = img.with_suffix("")
        depth_npy, depth_png = Path(f"{stem}.depth.npy"), Path(f"{stem}.depth.png")
        depth = depth_npy if depth_npy.is_file() else depth_png if depth_png.is_file() else None
        if depth is None:
            yield read_reject(key, "missing_depth", f"{where}: no {stem.name}.depth.npy or {stem.name}.depth.png")
            continue
        meta_path = Path(f"{stem}.json")
        if not meta_path.is_file():
            meta_path = _intrinsics_file(img.parent, base)
        if meta_path is None:
            yield read_reject(key, "bad_intrinsics", f"{where}: no {stem.name}.json and no intrinsics.json above it")
            continue
        try:
            meta = _load_json(meta_path)
            K = validate_intrinsics(meta.get("K"))
            depth_K = validate_intrinsics(meta["depth_K"]) if meta.get("depth_K") is not None else None
            scale = float(meta.get("depth_scale", 1000.0))
            if not np.isfinite(scale) or scale <= 0:
                raise CameraError(f"depth_scale must be a positive number, got {meta.get('depth_scale')!r}")
        except (OSError, ValueError, TypeError) as exc:  # CameraError and JSONDecodeError are ValueErrors
            yield read_reject(key, "bad_intrinsics", f"{where}: {meta_path.name}: {exc}")
            continue
        try:
            width, height = _image_size(img)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file
            yield read_reject(key, "unreadable_image", f"{where}: cannot read the image header: {exc}")
            continue
        try:
            shape = _depth_shape(depth)
        except Exception as exc:  # noqa: BLE001 - numpy/PIL raise many types for a damaged file
            yield read_reject(key, "bad_depth", f"{where}: {depth.name}: {exc}")
            continue
        if len(shape) != 2:
            yield read_reject(key, "bad_depth", f"{where}: depth must be 2-D, got shape {shape}")
            continue
        if shape != (height, width) and depth_K is None:
            yield read_reject(key, "depth_size_mismatch",
                              f"{where}: depth is {shape[1]}x{shape[0]}, image {width}x{height}, and no depth_K is given")
            continue
        yield {
            "key": key,
            "format": "rgbd",
            "source": {"dataset": "rgbd", "file": rel.as_posix(), "id": stem_rel.as_posix()},
            "image_path": str(img),
            "depth_path": str(depth),
            "depth_format": "npy_m" if depth.suffix == ".npy" else "png_mm",
            "depth_scale": None if depth.suffix == ".npy" else scale,
            "K": K,
            "depth_K": depth_K if depth_K is not None else K.copy(),
            "width": width,
            "height": height,
            "depth_width": shape[1],
            "depth_height": shape[0],
        }
