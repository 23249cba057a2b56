"""EmbodiedScan info files (`embodiedscan_infos_{split}.pkl`): one item per posed RGB-D frame.

Written from the format notes (docs/formats.md, "EmbodiedScan"). The pkl is untrusted, so it is loaded through the
restricted unpickler. Per frame the item carries what a builder needs to put the scan's aligned-world
9-DoF boxes into the camera: colour K (per-image `cam2img` when present, as in Matterport3D, else
the scan's), depth K (`depth_cam2img`, falling back to `cam2img`), T = axis_align_matrix @ cam2global
(camera -> aligned world), image/depth paths, the depth scale, and the visible instances (resolved
from positions in `instances`, not `bbox_id`s) with category names from `metainfo.categories`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.sources.common import (
    MAX_CATEGORY_CHARS,
    PathEscapesRoot,
    ReadResult,
    SourceError,
    read_reject,
    relative_to_root,
    resolve_under,
)
from pipelines.sources.safe_pickle import safe_load
from schemas.camera import CameraError
from schemas.geometry import intrinsics_from_cam2img, pose_camera_to_world
from shards.keys import make_key

__all__ = ["depth_shift_for", "load_info", "read_embodiedscan"]


def depth_shift_for(sample_idx: str) -> float:
    """PNG value -> metres divisor: 4000 for Matterport3D (1/4 mm), 1000 (mm) for everything else."""
    return 4000.0 if str(sample_idx).split("/", 1)[0] == "matterport3d" else 1000.0


def load_info(path: str | os.PathLike) -> dict[str, Any]:
    """Load and shape-check an info pkl (raises `SourceError` / `UnsafePickleError` naming the file)."""
    info = safe_load(path)
    if not isinstance(info, dict):
        raise SourceError(path, f"top level must be a dict, got {type(info).__name__}")
    meta = info.get("metainfo")
    if not isinstance(meta, dict) or not isinstance(meta.get("categories"), dict):
        raise SourceError(path, "missing metainfo.categories (a dict name -> id)")
    if not isinstance(info.get("data_list"), list):
        raise SourceError(path, "missing 'data_list' list")
    return info


def _bbox9(x: object) -> np.ndarray | None:
    try:
        b = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return None
    if b.shape != (9,) or not np.all(np.isfinite(b)) or np.any(b[3:6] <= 0):
        return None
    return b


def read_embodiedscan(
    files: Sequence[str | os.PathLike],
    data_root: str | os.PathLike,
    check_files: bool = True,
) -> Iterator[ReadResult]:
    """Yield one item per posed frame of the info files, or a reject saying why not.

    Item fields: key, format="embodiedscan", source {dataset, file, id}, sample_idx, frame_index, image_path,
    img_path, depth_path (resolved), depth_rel, depth_shift, K, depth_K (3x3), axis_align_matrix, cam2global,
    T (4x4 camera -> aligned world), instances [{index, bbox_id, label, category, bbox_3d (9,)}] of the visible
    instances, invalid_instances [{index, reason}], warnings. Rejects: bad_scan, bad_intrinsics, bad_pose,
    path_escapes_root, missing_image, missing_depth, bad_visible_instance_id, malformed_frame, duplicate_key.
    """
    seen: set[str] = set()
    for f in files:
        path = Path(f)
        info = load_info(path)
        rel_file = relative_to_root(path, data_root)
        names: dict[int, str] = {}
        for name, cid in info["metainfo"]["categories"].items():
            # an empty or absurdly long name (a corrupt file) leaves its label unknown: its boxes are dropped
            nm = str(name)
            if nm.strip() and len(nm) <= MAX_CATEGORY_CHARS and isinstance(cid, int | np.integer) \
                    and not isinstance(cid, bool):
                names[int(cid)] = nm
        for si, scan in enumerate(info["data_list"]):
            yield from _read_scan(scan, si, rel_file, data_root, names, check_files, seen)


def _frames_or_reject(scan: dict, sidx: str, rel_file: str, reason: str, message: str) -> Iterator[ReadResult]:
    """Reject every frame of a scan whose scan-level fields are unusable (nothing is dropped silently)."""
    images = scan.get("images") if isinstance(scan.get("images"), list) else []
    if not images:
        yield read_reject(make_key("embodiedscan", *_idx_parts(sidx)), reason, f"{rel_file}: scan {sidx}: {message}")
    for fi, img in enumerate(images):
        yield read_reject(_frame_key(sidx, img, fi), reason, f"{rel_file}: scan {sidx}: {message}")


def _idx_parts(sidx: str) -> list[str]:
    return [p for p in str(sidx).split("/") if p] or ["_"]


def _frame_key(sidx: str, img: object, fi: int) -> str:
    p = img.get("img_path") if isinstance(img, dict) else None
    stem = Path(p).stem if isinstance(p, str) and p else f"frame{fi:05d}"
    return make_key("embodiedscan", *_idx_parts(sidx), stem)


def _read_scan(scan: object, si: int, rel_file: str, data_root: str | os.PathLike, names: dict[int, str],
               check_files: bool, seen: set[str]) -> Iterator[ReadResult]:
    if not isinstance(scan, dict):
        yield read_reject(make_key("embodiedscan", "scan", si), "bad_scan", f"{rel_file}: data_list[{si}] is not a dict")
        return
    sidx = scan.get("sample_idx")
    if not isinstance(sidx, str) or not sidx:
        sidx = f"scan{si:06d}"
    warnings: list[str] = []
    A = scan.get("axis_align_matrix")
    if A is None:
        A = np.eye(4)
        warnings.append("axis_align_matrix missing: identity used")
    try:
        K_scan = intrinsics_from_cam2img(scan["cam2img"]) if scan.get("cam2img") is not None else None
        dK_scan = intrinsics_from_cam2img(scan["depth_cam2img"]) if scan.get("depth_cam2img") is not None else None
    except CameraError as exc:
        yield from _frames_or_reject(scan, sidx, rel_file, "bad_intrinsics", str(exc))
        return
    if not isinstance(scan.get("images"), list):
        yield from _frames_or_reject(scan, sidx, rel_file, "bad_scan", "'images' is not a list")
        return
    instances = scan.get("instances") if isinstance(scan.get("instances"), list) else None
    if instances is None:
        yield from _frames_or_reject(scan, sidx, rel_file, "bad_scan", "'instances' is not a list")
        return
    parsed, invalid = {}, {}
    for ii, inst in enumerate(instances):
        b = _bbox9(inst.get("bbox_3d")) if isinstance(inst, dict) else None
        label = inst.get("bbox_label_3d") if isinstance(inst, dict) else None
        if b is None:
            invalid[ii] = "bbox_3d is not 9 finite values with positive sizes"
        elif isinstance(label, bool) or not isinstance(label, int | np.integer):
            invalid[ii] = f"bbox_label_3d is not an int: {label!r}"
        else:
            bid = inst.get("bbox_id")
            parsed[ii] = {"index": ii, "bbox_id": int(bid) if isinstance(bid, int | np.integer) else None,
                          "label": int(label), "category": names.get(int(label)), "bbox_3d": b}  # fmt: skip
    shift = depth_shift_for(sidx)
    for fi, img in enumerate(scan["images"]):
        key = _frame_key(sidx, img, fi)
        where = f"{rel_file}: scan {sidx} frame {fi}"
        if key in seen:
            yield read_reject(key, "duplicate_key", f"{where}: another frame already has key {key}")
            continue
        seen.add(key)
        if not isinstance(img, dict):
            yield read_reject(key, "malformed_frame", f"{where}: not a dict")
            continue
        try:
            K = intrinsics_from_cam2img(img["cam2img"]) if img.get("cam2img") is not None else K_scan
            if K is None:
                raise CameraError("no cam2img in the frame or the scan")
            dK = dK_scan if dK_scan is not None else K
        except CameraError as exc:
            yield read_reject(key, "bad_intrinsics", f"{where}: {exc}")
            continue
        try:
            T = pose_camera_to_world(A, img.get("cam2global"))
        except CameraError as exc:
            yield read_reject(key, "bad_pose", f"{where}: {exc}")
            continue
        try:
            image_path = resolve_under(data_root, img.get("img_path"))
            depth_path = resolve_under(data_root, img.get("depth_path"))
        except PathEscapesRoot as exc:
            yield read_reject(key, "path_escapes_root", f"{where}: {exc}")
            continue
        if check_files and not image_path.is_file():
            yield read_reject(key, "missing_image", f"{where}: no file at {img.get('img_path')}")
            continue
        if check_files and not depth_path.is_file():
            yield read_reject(key, "missing_depth", f"{where}: no file at {img.get('depth_path')}")
            continue
        vis = img.get("visible_instance_ids", [])
        if isinstance(vis, np.ndarray):
            vis = vis.tolist()
        if not isinstance(vis, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in vis):
            yield read_reject(key, "bad_visible_instance_id", f"{where}: visible_instance_ids is not a list of ints")
            continue
        vis_ids = [int(v) for v in vis]
        out_of_range = [v for v in vis_ids if not 0 <= v < len(instances)]
        if out_of_range:
            yield read_reject(key, "bad_visible_instance_id",
                              f"{where}: visible_instance_ids {out_of_range[:5]} are not positions in instances "
                              f"(0..{len(instances) - 1})")  # fmt: skip
            continue
        yield {
            "key": key,
            "format": "embodiedscan",
            "source": {"dataset": "embodiedscan", "file": rel_file, "id": f"{sidx}/{fi}"},
            "sample_idx": sidx,
            "frame_index": fi,
            "image_path": str(image_path),
            "img_path": img.get("img_path"),
            "depth_path": str(depth_path),
            "depth_rel": img.get("depth_path"),
            "depth_shift": shift,
            "K": K,
            "depth_K": dK,
            "axis_align_matrix": np.asarray(A, dtype=np.float64),
            "cam2global": np.asarray(img.get("cam2global"), dtype=np.float64),
            "T": T,
            "instances": [parsed[v] for v in sorted(set(vis_ids)) if v in parsed],
            "invalid_instances": [{"index": v, "reason": invalid[v]} for v in sorted(set(vis_ids)) if v in invalid],
            "warnings": list(warnings),
        }
