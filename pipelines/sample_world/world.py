"""Generate a sample world: render every scene and write it in the real on-disk formats.

Layout under OUT (all paths in the format files are relative to OUT, the data root):
  sample_world.json                       manifest: arguments, counts, where each format's files are
  ground_truth.json                       exact truth: world boxes, cameras, per-view object analysis, mentions
  sample_world/sceneNNNN/image/VVVVVV.png colour (RGB)
  sample_world/sceneNNNN/depth/VVVVVV.png uint16 depth in mm at colour resolution and colour K (0 = invalid)
  sample_world/sceneNNNN/instance/VVVVVV.png  uint8 instance label: object index + 1, 0 = room / nothing
  sample_world/sceneNNNN/depth_half/VVVVVV.png  uint16 mm from the half-resolution depth sensor (depth_cam2img)
  Omni3D/SampleWorld_{train,val}.json     Omni3D annotation files
  embodiedscan/embodiedscan_infos_{train,val}.pkl  EmbodiedScan info files (pickle protocol 2, like mmengine)
  RefSpatial/3D/{reasoning_template_qa,choice_qa}.json + RefSpatial/3D/depth/*.png (8-bit relative depth)
  rgbd/sceneNNNN/VVVVVV.{png,depth.npy,json}  generic RGB-D folder (float32 metres, K json)
Same arguments give byte-identical files: each scene depends only on (seed, scene index).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipelines.sample_world import refspatial_text as rt
from pipelines.sample_world.catalog import ES_CATEGORIES, OMNI3D_ID
from pipelines.sample_world.render import (
    build_raycaster,
    camera_rays,
    depth_to_mm,
    ray_box_entry,
    rect_intersection_area,
    relative_depth_vis,
    render,
    silhouette_box,
)
from pipelines.sample_world.scene import Obj, Scene, View, make_scene
from schemas.camera import box_corners, project
from schemas.geometry import invert_pose

FORMAT_VERSION = 1
DATASET = "SampleWorld"
DATASET_IDS = {"train": 100, "val": 101}
MIN_Z = 0.2  # Omni3D's behind-camera rule: a corner with z <= 0.2 m
LIDAR_TOL = 0.02  # a depth point counts for `lidar_pts` within 2 cm of the box
_BITS = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64)


def _r(x: Any, nd: int = 8) -> Any:
    """JSON-ready copy with floats rounded to `nd` decimals (stable text, 10 nm resolution)."""
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_r(v, nd) for v in x]
    if isinstance(x, np.ndarray):
        return _r(x.tolist(), nd)
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        v = round(float(x), nd)
        return 0.0 if v == 0 else v
    return x


def _dump_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=4)
    path.write_bytes(buf.getvalue())


def omni_pose(o: Obj, w2c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Omni3D camera-frame (center, dims [w, h, l], R_cam) of an upright object, from first principles.

    Omni3D's local x is the object's length axis, local y points down (world -z), local z = x cross y is
    then the object's width axis; so dims = [width, height, length].
    """
    R_obj = np.stack([o.R[:, 0], np.array([0.0, 0.0, -1.0]), o.R[:, 1]], axis=1)
    center = w2c[:3, :3] @ o.center + w2c[:3, 3]
    return center, np.array([o.size[1], o.size[2], o.size[0]]), w2c[:3, :3] @ R_obj


def _interior_points(mask: np.ndarray, x0: int, y0: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Pixels deep inside a mask (best first): point answers that stay inside under any rounding."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if dist.max() < 3.0:
        return []
    vs, us = np.nonzero(dist >= 3.0)
    best = int(np.argmax(dist))
    out = [(float(best % mask.shape[1] + x0), float(best // mask.shape[1] + y0))]
    for k in rng.permutation(len(us))[:2]:
        out.append((float(us[k] + x0), float(vs[k] + y0)))
    return out


def analyse_view(scene: Scene, view: View, label: np.ndarray, depth_mm: np.ndarray,
                 rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per object seen by the view (silhouette touches the image): Omni3D fields and exact 2D facts."""
    W, H, K = view.width, view.height, view.K
    w2c = np.linalg.inv(view.cam2world)
    dirs, origin = camera_rays(K, view.cam2world, W, H)
    counts = np.bincount(label.ravel(), minlength=len(scene.objects) + 1)
    depth_q = depth_mm.astype(np.float64) / 1000.0
    out = []
    for o in scene.objects:
        center, dims, R_cam = omni_pose(o, w2c)
        corners = box_corners(center, dims, R_cam)
        bits_cam = (((_BITS - 0.5) * o.size) @ o.R.T + o.center) @ w2c[:3, :3].T + w2c[:3, 3]
        trunc = silhouette_box(bits_cam, K, W, H)
        if trunc is None:
            continue
        i0, i1 = max(0, math.ceil(trunc[0])), min(W - 1, math.floor(trunc[2]))
        j0, j1 = max(0, math.ceil(trunc[1])), min(H - 1, math.floor(trunc[3]))
        visible = int(counts[o.index + 1])
        if i1 < i0 or j1 < j0:
            if visible == 0:
                continue
            i0, i1, j0, j1 = 0, W - 1, 0, H - 1
        entry = ray_box_entry(dirs[j0 : j1 + 1, i0 : i1 + 1], origin, o.center, o.R, o.size / 2)
        sil = np.isfinite(entry)
        n_sil = int(sil.sum())
        if n_sil == 0 and visible == 0:
            continue
        behind = bool(np.any(corners[:, 2] <= MIN_Z))
        if behind:
            proj, truncation = [-1.0] * 4, -1.0
        else:
            uv = project(K, corners)
            proj = [float(uv[:, 0].min()), float(uv[:, 1].min()), float(uv[:, 0].max()), float(uv[:, 1].max())]
            area = (proj[2] - proj[0]) * (proj[3] - proj[1])
            truncation = 1.0 - rect_intersection_area(proj, [0.0, 0.0, float(W), float(H)]) / area
        dq = depth_q[j0 : j1 + 1, i0 : i1 + 1]
        good = sil & (dq > 0)
        depth_error = float(np.median(np.abs(dq[good] - entry[good]))) if good.any() else -1.0
        # lidar_pts: valid depth pixels of the region whose back-projected point lies in the (2 cm grown) box
        sub = dirs[j0 : j1 + 1, i0 : i1 + 1]
        pts = sub * dq[..., None]  # camera-z-normalised world directions: point = origin + dir * z
        local = (pts + (origin - o.center)) @ o.R
        inside = np.all(np.abs(local) <= o.size / 2 + LIDAR_TOL, axis=-1) & (dq > 0)
        obj_mask = label == o.index + 1
        vis_box = None
        points: list[tuple[float, float]] = []
        centroid_u = -1.0
        if visible:
            vs, us = np.nonzero(obj_mask)
            vis_box = [max(0.0, us.min() - 0.5), max(0.0, vs.min() - 0.5),
                       min(float(W), us.max() + 0.5), min(float(H), vs.max() + 0.5)]  # fmt: skip
            centroid_u = float(us.mean())
            y0, x0 = int(vs.min()), int(us.min())
            points = _interior_points(obj_mask[y0 : vs.max() + 1, x0 : us.max() + 1], x0, y0, rng)
        out.append({
            "object": o, "center_cam": center, "dimensions": dims, "R_cam": R_cam, "bbox3D_cam": corners,
            "bbox2D_proj": proj, "bbox2D_trunc": trunc, "behind_camera": behind,
            "visibility": min(1.0, visible / n_sil) if n_sil else (1.0 if visible else 0.0),
            "truncation": truncation, "segmentation_pts": visible, "silhouette_pts": n_sil,
            "lidar_pts": int(inside.sum()), "depth_error": depth_error, "bbox_visible": vis_box,
            "centroid_u": centroid_u, "points": points,
        })  # fmt: skip
    return out


def _split_of(index: int, n: int) -> str:
    n_val = max(1, round(0.2 * n)) if n >= 2 else 0
    return "val" if index >= n - n_val else "train"


def _pad4(K: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = K
    return m


def generate(out: str | Path, scenes: int = 20, views: int = 4, seed: int = 0, width: int = 640,
             height: int = 480, workers: int = 1, progress: TextIO | None = None) -> dict[str, Any]:
    """Write a sample world to `out` and return its manifest (also written as `sample_world.json`).

    Deterministic: the same arguments give byte-identical files, whatever `workers` is. Scenes are
    rendered by `workers` processes (each scene depends only on (seed, index) and writes its own
    folders); the format files that span scenes are assembled here in scene order. Existing generated
    folders in `out` are replaced, other files are left alone. `progress`: a stream for progress lines.
    """
    if scenes < 1 or views < 1 or views > 999:
        raise ValueError(f"need scenes >= 1 and 1 <= views <= 999, got scenes={scenes}, views={views}")
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 32, got {width}x{height}")
    if workers < 1:
        raise ValueError(f"need workers >= 1, got {workers}")
    if seed < 0:
        raise ValueError(f"need seed >= 0, got {seed}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for d in ("sample_world", "Omni3D", "embodiedscan", "RefSpatial", "rgbd"):
        shutil.rmtree(out / d, ignore_errors=True)

    cats = sorted({c for c in OMNI3D_ID if c in _world_categories()}, key=OMNI3D_ID.get)
    omni: dict[str, dict[str, Any]] = {}
    es: dict[str, list[dict[str, Any]]] = {}
    rs_files: dict[str, list[dict[str, Any]]] = {"reasoning_template_qa": [], "choice_qa": []}
    mentions_gt: list[dict[str, Any]] = []
    gt_scenes = []
    n_ann = 0
    meter = _SceneProgress(scenes, progress)
    for part in _render_scenes(str(out), seed, scenes, views, width, height, workers):
        split = part["split"]
        f = omni.setdefault(split, {
            "info": {"id": DATASET_IDS[split], "source": DATASET_IDS[split], "name": f"{DATASET} {split}",
                     "split": split, "version": "0.1", "url": ""},
            "images": [], "categories": [{"id": OMNI3D_ID[c], "name": c, "supercategory": ""} for c in cats],
            "annotations": [],
        })  # fmt: skip
        f["images"].extend(part["omni_images"])
        f["annotations"].extend(part["omni_annotations"])
        n_ann += len(part["omni_annotations"])
        for fname, rid, rs_image, rs_depth, conv, ments in part["refspatial"]:
            recs = rs_files[fname]
            as_list = len(recs) % 2 == 0  # both layouts of real dumps: list and plain str
            recs.append({"id": rid, "image": [rs_image] if as_list else rs_image,
                         "depth": [rs_depth] if as_list else rs_depth, "conversations": conv})  # fmt: skip
            for m in ments:
                m["record_index"] = len(recs) - 1
                mentions_gt.append(m)
        es.setdefault(split, []).append(part["embodiedscan"])
        gt_scenes.append(part["ground_truth"])
        meter.done()

    files: dict[str, Any] = {"omni3d": [], "embodiedscan": [], "refspatial": [], "rgbd": "rgbd"}
    for split in ("train", "val"):
        if split in omni:
            p = f"Omni3D/{DATASET}_{split}.json"
            _dump_json(out / p, omni[split])
            files["omni3d"].append(p)
            p = f"embodiedscan/embodiedscan_infos_{split}.pkl"
            info = {"metainfo": {"categories": dict(ES_CATEGORIES), "dataset": "sample_world", "info_version": "1.0"},
                    "data_list": es[split]}
            (out / p).parent.mkdir(parents=True, exist_ok=True)
            (out / p).write_bytes(pickle.dumps(info, protocol=2))  # mmengine's PickleHandler default
            files["embodiedscan"].append(p)
    for fname, recs in rs_files.items():
        p = f"RefSpatial/3D/{fname}.json"
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in recs)
        (out / p).write_text("[\n" + body + "\n]\n" if recs else "[]\n", encoding="utf-8")
        files["refspatial"].append({"json": p, "image_root": "sample_world", "depth_root": "RefSpatial/3D/depth"})
    args = {"scenes": scenes, "views": views, "seed": seed, "width": width, "height": height}
    _dump_json(out / "ground_truth.json", {
        "version": FORMAT_VERSION, "args": args, "conventions": CONVENTIONS, "scenes": gt_scenes,
        "refspatial_mentions": mentions_gt,
    })  # fmt: skip
    manifest = {
        "generator": "gr3d sample-world", "version": FORMAT_VERSION, "args": args, "data_root": ".",
        "files": files, "ground_truth": "ground_truth.json",
        "counts": {"scenes": scenes, "views": scenes * views, "objects": sum(len(s["objects"]) for s in gt_scenes),
                   "omni3d_annotations": n_ann, "refspatial_records": sum(len(v) for v in rs_files.values()),
                   "refspatial_mentions": len(mentions_gt)},
    }  # fmt: skip
    _dump_json(out / "sample_world.json", manifest, indent=1)
    return manifest


def _render_scenes(out: str, seed: int, scenes: int, views: int, width: int, height: int,
                   workers: int) -> Iterator[dict[str, Any]]:
    """Each scene's part (see `_scene_part`), in scene order; rendered in `workers` processes when > 1.

    Worker processes are spawned, not forked: the parent may already hold Open3D/Embree threads (a
    script calling `generate(workers > 1)` therefore needs the usual `if __name__ == "__main__":` guard).
    In-process parts make the same pickle round trip as a worker's: the EmbodiedScan pickle writes shared
    objects once and then by reference, so its bytes follow object identity, which must not depend on
    where a scene was rendered.
    """
    jobs = [(out, seed, si, scenes, views, width, height) for si in range(scenes)]
    n = min(workers, scenes)
    if n <= 1:
        yield from (pickle.loads(pickle.dumps(_scene_part(*j))) for j in jobs)
        return
    with mp.get_context("spawn").Pool(n) as pool:
        yield from pool.imap(_scene_part_star, jobs, chunksize=1)


def _scene_part_star(job: tuple) -> dict[str, Any]:
    return _scene_part(*job)


def _scene_part(out_s: str, seed: int, si: int, scenes: int, views: int, width: int, height: int) -> dict[str, Any]:
    """Render scene `si`, write its own files (images, depth, RGB-D folder) and return its share of the
    files that span scenes: Omni3D images/annotations, its EmbodiedScan entry, its RefSpatial records
    as (file, id, image, depth, conversations, mentions) -- the record layout and `record_index` depend
    on the records before it and are set by the caller -- and its ground truth."""
    out = Path(out_s)
    scene = make_scene(seed, si, views, width, height)
    split = _split_of(si, scenes)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), si, 1]))
    rc = build_raycaster(scene)
    omni_images: list[dict[str, Any]] = []
    omni_anns: list[dict[str, Any]] = []
    refspatial: list[tuple] = []
    es_images, gt_views = [], []
    for view in scene.views:
        rel = f"sample_world/{scene.scene_id}/{{}}/{view.index:06d}.png"
        rend = render(rc, view.K, view.cam2world, view.width, view.height)
        dmm = depth_to_mm(rend.depth)
        half = render(rc, view.depth_K, view.cam2world, view.depth_width, view.depth_height, colour=False)
        _save_png(out / rel.format("image"), rend.rgb)
        _save_png(out / rel.format("depth"), dmm)
        _save_png(out / rel.format("instance"), rend.label)
        _save_png(out / rel.format("depth_half"), depth_to_mm(half.depth))
        rs_depth = f"{scene.scene_id}_{view.index:06d}_depth.png"
        _save_png(out / "RefSpatial/3D/depth" / rs_depth, relative_depth_vis(rend.depth))
        rgbd_dir = out / "rgbd" / scene.scene_id
        rgbd_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / rel.format("image"), rgbd_dir / f"{view.index:06d}.png")
        np.save(rgbd_dir / f"{view.index:06d}.depth.npy", rend.depth.astype(np.float32))
        _dump_json(rgbd_dir / f"{view.index:06d}.json", {"K": _r(view.K)})

        objs = analyse_view(scene, view, rend.label, dmm, rng)
        image_id = 1 + si * 1000 + view.index
        omni_images.append({
            "id": image_id, "dataset_id": DATASET_IDS[split], "width": view.width, "height": view.height,
            "file_path": rel.format("image"), "K": _r(view.K), "src_90_rotate": 0, "src_flagged": False,
        })  # fmt: skip
        for a in objs:
            o = a["object"]
            omni_anns.append(_r({
                "id": image_id * 100 + o.index, "image_id": image_id, "dataset_id": DATASET_IDS[split],
                "category_id": OMNI3D_ID[o.category], "category_name": o.category, "valid3D": True,
                "bbox2D_tight": [-1, -1, -1, -1], "bbox2D_proj": a["bbox2D_proj"], "bbox2D_trunc": a["bbox2D_trunc"],
                "bbox3D_cam": a["bbox3D_cam"], "center_cam": a["center_cam"], "dimensions": a["dimensions"],
                "R_cam": a["R_cam"], "behind_camera": a["behind_camera"], "visibility": a["visibility"],
                "truncation": a["truncation"], "segmentation_pts": a["segmentation_pts"],
                "lidar_pts": a["lidar_pts"], "depth_error": a["depth_error"],
            }))  # fmt: skip
        img_entry: dict[str, Any] = {
            "img_path": rel.format("image"), "depth_path": rel.format("depth_half"),
            "cam2global": invert_pose(scene.axis_align_matrix) @ view.cam2world,
            "visible_instance_ids": [a["object"].index for a in objs if a["segmentation_pts"] > 0],
        }  # fmt: skip
        if scene.per_view_intrinsics:
            img_entry["cam2img"] = _pad4(view.K)
        es_images.append(img_entry)

        # RefSpatial: objects big enough to talk about (and to find again in the image)
        min_px = max(40, int(0.0005 * view.width * view.height))
        refs = [rt.Referable(a["object"].index, a["object"].category, a["object"].colour,
                             float(a["center_cam"][2]), a["centroid_u"], a["points"])
                for a in objs if a["segmentation_pts"] >= min_px]  # fmt: skip
        rt.assign_names(refs, [a["object"].category for a in objs if a["segmentation_pts"] > 0], rng)
        by_index = {a["object"].index: a for a in objs}
        rs_image = f"{scene.scene_id}/image/{view.index:06d}.png"
        made = [("reasoning_template_qa", rt.point_record(refs, rng, view.width, view.height))]
        made.append(("choice_qa", rt.choice_record(refs, rng, view.width)))
        for fname, res in made:
            if res is None:
                continue
            conv, ments = res[0], res[1]
            rid = f"sw_{scene.scene_id}_{view.index:06d}_{fname.split('_')[0]}"
            rows = []
            for m in ments:
                a = by_index[m.index]
                bx = a["bbox_visible"]
                rows.append(_r({
                    "file": f"RefSpatial/3D/{fname}.json", "record_index": None, "record_id": rid,
                    "turn": m.turn, "start": m.start, "end": m.end, "text": m.text,
                    "object_id": _object_id(scene, a["object"]), "object_index": m.index,
                    "category": a["object"].category, "colour": a["object"].colour,
                    "view_id": f"{scene.scene_id}/{view.index:06d}", "image": rel.format("image"),
                    "bbox_px": bx, "bbox_norm": [bx[0] / view.width, bx[1] / view.height,
                                                 bx[2] / view.width, bx[3] / view.height],
                }))  # fmt: skip
            refspatial.append((fname, rid, rs_image, rs_depth, conv, rows))
        gt_views.append(_gt_view(scene, view, rel, rs_depth, image_id, objs))
    es_entry = {
        "sample_idx": f"sample_world/{scene.scene_id}",
        "axis_align_matrix": scene.axis_align_matrix.copy(),
        "cam2img": _pad4(scene.views[0].K), "depth_cam2img": _pad4(scene.views[0].depth_K),
        "images": es_images,
        "instances": [{"bbox_3d": o.es_bbox_3d(), "bbox_label_3d": ES_CATEGORIES[o.category], "bbox_id": o.bbox_id}
                      for o in scene.objects],
    }  # fmt: skip
    return {"split": split, "omni_images": omni_images, "omni_annotations": omni_anns, "refspatial": refspatial,
            "embodiedscan": es_entry, "ground_truth": _gt_scene(scene, split, gt_views)}


class _SceneProgress:
    """`[gr3d] sample-world: scene 120/1000 12% 1.90/s ETA 0:07:43` on a stream, at most every 5 s and at the end."""

    def __init__(self, total: int, stream: TextIO | None, interval: float = 5.0):
        self.total, self.stream, self.interval = total, stream, interval
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def done(self) -> None:
        self.n += 1
        now = time.monotonic()
        if self.stream is None or (now - self.last < self.interval and self.n < self.total):
            return
        self.last = now
        rate = self.n / max(now - self.t0, 1e-6)
        eta = int((self.total - self.n) / rate)
        print(f"[gr3d] sample-world: scene {self.n}/{self.total} {100 * self.n / self.total:.0f}% {rate:.2f}/s "
              f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}", file=self.stream, flush=True)


CONVENTIONS = {
    "world": "EmbodiedScan aligned frame: z up, metres, room centred on the origin, floor at z=0",
    "camera": "OpenCV: x right, y down, z forward; cam2world maps camera to aligned world",
    "pixels": "pixel (i, j) is centred at continuous coordinate (i, j); its ray is K^-1 [i, j, 1]",
    "boxes_2d": "pixel coordinates [x1, y1, x2, y2] clipped to [0, W] x [0, H]; bbox_visible is the extent of the "
                "visible pixels (+-0.5 around their centres); normalised = divided by (W, H)",
    "points": "RefSpatial point answers (x, y) = ((i + 0.5) / W, (j + 0.5) / H): floor(x * W) = i, as RoboRefer scores",
    "depth_png": "uint16 millimetres along camera z, 0 = invalid (ray left the room)",
    "instance_png": "uint8: object index + 1, 0 = room or nothing",
    "object_size": "size = (length, width, height) along the object's local x, y, z (z up), yaw about world z",
}  # fmt: skip


def _object_id(scene: Scene, o: Obj) -> str:
    return f"{scene.scene_id}/obj{o.index:02d}"


def _world_categories() -> set[str]:
    from pipelines.sample_world.catalog import FLOOR_CATEGORIES, TOP_CATEGORIES

    return {c.name for c in FLOOR_CATEGORIES + TOP_CATEGORIES}


def _gt_scene(scene: Scene, split: str, gt_views: list[dict[str, Any]]) -> dict[str, Any]:
    return _r({
        "scene_id": scene.scene_id, "index": scene.index, "split": split, "room": scene.room,
        "axis_align_matrix": scene.axis_align_matrix, "per_view_intrinsics": scene.per_view_intrinsics,
        "objects": [{
            "object_id": _object_id(scene, o), "index": o.index, "instance_value": o.index + 1,
            "category": o.category, "colour": o.colour, "rgb": list(o.rgb), "center": o.center, "size_lwh": o.size,
            "yaw": o.yaw, "support": o.support, "touching": o.touching, "bbox_id": o.bbox_id,
            "es_bbox_3d": o.es_bbox_3d(), "es_position": o.index,
        } for o in scene.objects],
        "views": gt_views,
    })  # fmt: skip


def _gt_view(scene: Scene, view: View, rel: str, rs_depth: str, image_id: int, objs: list[dict]) -> dict[str, Any]:
    W, H = view.width, view.height
    return {
        "view_id": f"{scene.scene_id}/{view.index:06d}", "index": view.index, "omni3d_image_id": image_id,
        "image": rel.format("image"), "depth": rel.format("depth"), "instance": rel.format("instance"),
        "depth_half": rel.format("depth_half"), "refspatial_depth": f"RefSpatial/3D/depth/{rs_depth}",
        "rgbd": f"rgbd/{scene.scene_id}/{view.index:06d}",
        "width": W, "height": H, "K": view.K, "depth_width": view.depth_width, "depth_height": view.depth_height,
        "depth_K": view.depth_K, "cam2world": view.cam2world,
        "objects": [{
            "object_id": _object_id(scene, a["object"]), "index": a["object"].index,
            "omni3d_annotation_id": image_id * 100 + a["object"].index, "visible_pixels": a["segmentation_pts"], "silhouette_pixels": a["silhouette_pts"],
            "bbox_visible": a["bbox_visible"],
            "bbox_visible_norm": None if a["bbox_visible"] is None else [
                a["bbox_visible"][0] / W, a["bbox_visible"][1] / H, a["bbox_visible"][2] / W, a["bbox_visible"][3] / H],
            "bbox2D_trunc": a["bbox2D_trunc"], "behind_camera": a["behind_camera"],
        } for a in objs],
    }  # fmt: skip


def load_manifest(out: str | Path) -> dict[str, Any]:
    """Read `sample_world.json` of a generated world (raises FileNotFoundError with the path)."""
    p = Path(out) / "sample_world.json"
    if not p.is_file():
        raise FileNotFoundError(f"no sample world at {out}: {p} is missing (run `gr3d sample-world --out {out}`)")
    return json.loads(p.read_text(encoding="utf-8"))
