"""The point-map corpus: images with N sampled surface points (u, v, X, Y, Z) and point questions.

`gr3d build pointmap --source embodiedscan|omni3d|rgbd ...` reads posed RGB-D frames with the
real-format readers of `pipelines.sources`, decodes their depth (`pipelines.corpora.pointmaps.depth_io`), samples N valid
pixels seeded by the sample key (`pipelines.corpora.pointmaps.sampling`), back-projects them and writes one sample per
frame: the original image bytes, `KEY.points.npy` (float32 N x 5: u, v in colour pixels, X, Y, Z in
metres in the colour camera, OpenCV axes) and a record whose `point_3d` conversations ask
"Please detect the 3D location of point <bbox>[u, v, u, v]</bbox><region>" -> "x: .., y: .., z: ..".

Depth and colour cameras. Sensors such as ScanNet's have their own depth intrinsics and resolution
(640x480 vs 1296x968 colour) but, as EmbodiedScan assumes, the same pose. A depth pixel is therefore
back-projected with the depth K, and its point is already in the colour camera's frame; its colour
pixel is the projection with the colour K. Both maps are pinhole with the same centre, so colour pixel =
`A @ (u_d, v_d, 1)` with A = K_colour K_depth^-1 (affine, depth-independent): whether a depth pixel lands
inside the colour image is decided per row and column before sampling, and points outside are never
candidates. (u, v) follow the OpenCV convention: pixel i is centred at coordinate i.

Text. Each record carries `conversations` point_3d conversations of `points_per_conversation` rounds,
over disjoint rows of the point array (conversation c uses rows c*K .. c*K+K-1; the rows are in random
order already). The trainer picks one conversation per sample and epoch, so several conversations show
different points over epochs at no cost in sequence length; every point stays in `points.npy` for
other uses. A point's region is `format_point2d(u / W, v / H)` + `<region>` (the same u / W normalization
as the projected boxes of the det3d corpus); the answer is `format_point3d` (2 decimals).

Nothing heavy is imported at module level (the module registers the builder on import).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.corpora.options import add_options, option, options_from_args
from pipelines.corpora.pointmaps.depth_io import (
    DEPTH_FORMATS,
    DepthError,
    DepthSpec,
    decode_depth,
    embodiedscan_spec,
)
from pipelines.corpora.pointmaps.geometry import sample_frame
from pipelines.corpora.pointmaps.sampling import SamplerConfig, SamplingError
from pipelines.engine.build_cli import register_builder
from pipelines.engine.stage import Item, Reject, Resources, Stage
from pipelines.sample_world.paths import add_sample_world_argument, sample_world_of

__all__ = [
    "SOURCES",
    "OMNI3D_DEPTH_RULES",
    "sample_frame",
    "verbalize",
    "build_record",
    "iter_inputs",
    "list_inputs",
    "make_builder",
    "PointmapConfig",
    "ReadFrame",
    "SamplePoints",
    "Verbalize",
]

SOURCES: tuple[str, ...] = ("embodiedscan", "omni3d", "rgbd")
# Omni3D has no depth paths: a sibling folder of the image folder holds the depth, per dataset.
# (image folder name, depth folder name, format, units per metre); others use the CLI's default rule.
OMNI3D_DEPTH_RULES: dict[str, tuple[str, str, str, float]] = {
    "SUNRGBD": ("image", "depth_bfx", "png_sunrgbd", 1000.0),
}


# ---------------------------------------------------------------- geometry kernels


# ---------------------------------------------------------------- text and record


def verbalize(points: np.ndarray, width: int, height: int, key: str, points_per_conversation: int = 10,
              conversations: int = 1) -> list[dict[str, Any]]:
    """`point_3d` conversations over disjoint rows of `points` (see the module docstring).

    Prompt templates vary per round, chosen by a stable hash of (key, row).
    """
    from schemas.grammar import format_grounded, format_point3d
    from schemas.prompts import point_prompt

    n = points.shape[0]
    k = max(1, min(points_per_conversation, n))
    out = []
    for c in range(max(1, conversations)):
        rows = list(range(c * k, min(n, (c + 1) * k)))
        if not rows:
            break
        turns = []
        for r in rows:
            u, v, X, Y, Z = (float(x) for x in points[r])
            x_n, y_n = min(max(u / width, 0.0), 1.0), min(max(v / height, 0.0), 1.0)
            turns.append({"from": "human", "value": point_prompt(format_grounded((x_n, y_n, x_n, y_n)), key=key,
                                                                 salt=f"point{r}")})
            turns.append({"from": "gpt", "value": format_point3d((X, Y, Z))})
        out.append({"task": "point_3d", "turns": turns, "point_rows": rows})
    return out


def build_record(item: Item, points: np.ndarray, cfg: SamplerConfig, points_per_conversation: int,
                 conversations: int, arrays: Sequence[str] = ("points",)) -> dict[str, Any]:
    """The `pointmap` record (KEY.json) of a frame; validated by the shard writer against its schema."""
    from schemas.camera import normalization_scale

    K = np.asarray(item["K"], dtype=np.float64)
    return {
        "key": item["key"],
        "corpus": "pointmap",
        "source": dict(item["source"]),
        "image": {"ext": item["image_ext"], "width": int(item["width"]), "height": int(item["height"])},
        "camera": {"K": K.tolist(), "scale": normalization_scale(K)},
        "arrays": sorted(arrays),
        "points": {"n": int(points.shape[0]), "mode": cfg.mode},
        "conversations": verbalize(points, int(item["width"]), int(item["height"]), item["key"],
                                   points_per_conversation, conversations),
    }


# ---------------------------------------------------------------- inputs


def _listify(K: Any) -> list[list[float]]:
    return np.asarray(K, dtype=np.float64).tolist()


def _rel(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    from pipelines.sources.common import relative_to_root

    return relative_to_root(path, root)


def _omni3d_depth(item: Item, config: dict[str, Any]) -> tuple[str | None, str, float]:
    """(depth path or None, format, units per metre) of an Omni3D image, by the dataset's rule."""
    rule = OMNI3D_DEPTH_RULES.get(item["source"]["dataset"])
    if rule is None:
        rule = (config["omni3d_image_dir"], config["omni3d_depth_dir"], config["omni3d_depth_format"],
                config["omni3d_depth_scale"])
    image_dir, depth_dir, fmt, scale = rule
    p = Path(item["image_path"])
    parts = list(p.parts)
    hits = [i for i, part in enumerate(parts[:-1]) if part == image_dir]
    if not hits:
        return None, fmt, scale
    parts[hits[-1]] = depth_dir
    ext = ".npy" if fmt == "npy_m" else ".pgm" if fmt == "pgm_u16" else ".png"
    return str(Path(*parts).with_name(p.stem + ext)), fmt, scale


def _reader_items(config: dict[str, Any]):
    """The reader's items and rejects, file by file: a whole file that cannot be read (an unsafe or truncated
    pickle, invalid JSON) becomes one `bad_source_file` reject and the other files are still read, as in det3d.
    """
    from pipelines.sources.common import read_each, relative_to_root
    from shards.keys import make_key

    src = config["source"]
    if src == "embodiedscan":
        from pipelines.sources.embodiedscan import read_embodiedscan

        files, read = config["embodiedscan"], lambda f: read_embodiedscan([f], config["data_root"])
    elif src == "omni3d":
        from pipelines.sources.omni3d import read_omni3d

        files, read = config["omni3d"], lambda f: read_omni3d([f], config["data_root"], rules="none")
    elif src == "rgbd":
        from pipelines.sources.rgbd import read_rgbd

        yield from read_rgbd(config["rgbd"])
        return
    else:
        raise ValueError(f"unknown point-map source {src!r}; choose one of {', '.join(SOURCES)}")
    yield from read_each(files, read, lambda f: make_key("pointmap", "source_file",
                                                         relative_to_root(f, config["data_root"])))


def _input_of(it: Item, config: dict[str, Any]) -> Item:
    """A reader item reduced to what the stages need (small, JSON-able: it is digested into plan.json)."""
    src, root = config["source"], config.get("data_root") or config.get("rgbd")
    source = dict(it["source"])
    depth_K = it.get("depth_K", it["K"])
    width, height = it.get("width"), it.get("height")
    if src == "embodiedscan":
        spec = embodiedscan_spec(it["depth_path"], it["depth_shift"])
        depth_path, fmt, scale = it["depth_path"], spec.format, spec.units_per_metre
        source["scene"] = it["sample_idx"]
    elif src == "omni3d":
        depth_path, fmt, scale = _omni3d_depth(it, config)
        source["split"] = it.get("split", "")
    else:  # rgbd
        depth_path = it["depth_path"]
        fmt = "npy_m" if it["depth_format"] == "npy_m" else "png_u16"
        scale = 1.0 if fmt == "npy_m" else float(it["depth_scale"])
    if depth_path is not None:
        source["depth"] = _rel(depth_path, root)
    source["depth_format"] = fmt
    source["depth_scale"] = float(scale)
    if not np.array_equal(np.asarray(depth_K, dtype=np.float64), np.asarray(it["K"], dtype=np.float64)):
        source["depth_K"] = _listify(depth_K)
    return {
        "key": it["key"], "source": source, "image_path": it["image_path"], "depth_path": depth_path,
        "depth_format": fmt, "depth_scale": float(scale), "K": _listify(it["K"]), "depth_K": _listify(depth_K),
        "width": width, "height": height,
    }  # fmt: skip


def list_inputs(config: dict[str, Any]) -> list[Item]:
    """`iter_inputs` as a list (tests and tools that index or reuse the listing; builds stream it)."""
    return list(iter_inputs(config))


def iter_inputs(config: dict[str, Any]) -> Iterator[Item]:
    """Every frame of the configured source as a small input dict, yielded as read (the plan encodes
    each one as it comes, so the listing never exists as a list of dicts); read rejects travel as inputs too.

    A reader reject becomes an input `{"key", "read_reject": {reason, message}}` that the first stage
    turns back into a reject row, so it is counted in the manifest like any other (a whole unreadable
    annotation file is one `bad_source_file` row; the other files are still read). A reject whose key
    repeats an earlier input key (EmbodiedScan's `duplicate_key`) gets a `-dupN` suffix: keys must stay
    unique.
    """
    from pipelines.sources.common import is_reject, reject_item

    seen: dict[str, int] = {}
    for r in _reader_items(config):
        if is_reject(r):
            key = r.key
            if key in seen:
                seen[key] += 1
                key = f"{key}-dup{seen[key]}"
            seen.setdefault(key, 0)
            yield reject_item(key, r)
        else:
            if r["key"] in seen:
                seen[r["key"]] += 1
                yield {"key": f"{r['key']}-dup{seen[r['key']]}",
                       "read_reject": {"reason": "duplicate_key", "message": f"frame key {r['key']} repeats"}}
                continue
            seen[r["key"]] = 0
            yield _input_of(r, config)


# ---------------------------------------------------------------- stages

class ReadFrame(Stage):
    """Read the image bytes (kept, not re-encoded) and decode the depth map into float32 metres.

    Rejects: the reader's own reasons (stage `read`), `missing_image`, `unsupported_image_format`,
    `unreadable_image` (also a file cut short, `shards.writer.image_problem`), `image_size_mismatch`, the depth reasons of `pipelines.corpora.pointmaps.depth_io`, and
    `depth_size_mismatch` (a depth map of another size than the image with no depth intrinsics of its own).
    """

    name = "read_frame"
    batch_size = 16
    resources = Resources(cpus=1)

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        from pipelines.sources.common import item_reject

        out, rejects = [], []
        for it in batch:
            r = item_reject(it)
            if r is not None:
                rejects.append(r)
                continue
            try:
                out.append(self._read(it))
            except (DepthError, _FrameError) as exc:
                rejects.append(Reject(it["key"], self.name, exc.reason, str(exc)))
        return out, rejects

    def _read(self, it: Item) -> Item:
        from PIL import Image

        from shards.writer import image_problem, sniff_image_ext

        try:
            data = Path(it["image_path"]).read_bytes()
        except FileNotFoundError:
            raise _FrameError("missing_image", f"no image at {it['source'].get('file')}: {it['image_path']}") from None
        ext = sniff_image_ext(data)
        if ext is None:
            raise _FrameError("unsupported_image_format", f"{Path(it['image_path']).name}: neither PNG nor JPEG")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged header
            raise _FrameError("unreadable_image", f"{Path(it['image_path']).name}: {exc}") from None
        why = image_problem(data, ext)
        if why is not None:
            raise _FrameError("unreadable_image", f"{Path(it['image_path']).name}: {why}")
        if it.get("width") is not None and (w, h) != (it["width"], it["height"]):
            raise _FrameError("image_size_mismatch",
                              f"image is {w}x{h} but the annotation says {it['width']}x{it['height']}")
        if it["depth_path"] is None:
            raise DepthError("missing_depth", f"no depth rule matches {it['image_path']} "
                                              "(see --omni3d-image-dir / --omni3d-depth-dir)")
        try:
            raw = Path(it["depth_path"]).read_bytes()
        except FileNotFoundError:
            raise DepthError("missing_depth", f"no depth file at {it['depth_path']}") from None
        depth = decode_depth(raw, DepthSpec(it["depth_format"], it["depth_scale"]), what=Path(it["depth_path"]).name)
        if depth.shape != (h, w) and it["depth_K"] == it["K"]:
            raise _FrameError("depth_size_mismatch", f"depth is {depth.shape[1]}x{depth.shape[0]}, image {w}x{h}, "
                                                     "and the source gives no depth intrinsics of its own")
        return {**it, "image_bytes": data, "image_ext": ext, "width": w, "height": h, "depth": depth}


class _FrameError(ValueError):
    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):
        return (_FrameError, (self.reason, str(self)))


class SamplePoints(Stage):
    """Sample N valid surface points per frame and back-project them (see `sample_frame`)."""

    name = "sample_points"
    batch_size = 16
    resources = Resources(cpus=1)

    def __init__(self, sampler: SamplerConfig):
        self.sampler = sampler

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out, rejects = [], []
        for it in batch:
            try:
                pts, counts = sample_frame(it["depth"], it["depth_K"], it["K"], it["width"], it["height"], it["key"],
                                           self.sampler)
            except SamplingError as exc:
                rejects.append(Reject(it["key"], self.name, exc.reason, str(exc)))
                continue
            out.append({**it, "points": pts, "counts": counts})
        return out, rejects


class Verbalize(Stage):
    """Turn the points into the record and its `point_3d` conversations; emit what the writer takes."""

    name = "verbalize"
    batch_size = 16
    resources = Resources(cpus=1)

    def __init__(self, sampler: SamplerConfig, points_per_conversation: int = 10, conversations: int = 1,
                 keep_depth: bool = False):
        self.sampler = sampler
        self.points_per_conversation = points_per_conversation
        self.conversations = conversations
        self.keep_depth = keep_depth

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out = []
        for it in batch:
            arrays = {"points": it["points"]}
            if self.keep_depth:
                arrays["depth"] = np.ascontiguousarray(it["depth"], dtype=np.float32)
                arrays["depth_k"] = np.asarray(it["depth_K"], dtype=np.float64)
            rec = build_record(it, it["points"], self.sampler, self.points_per_conversation, self.conversations,
                               arrays=list(arrays))
            out.append({"key": it["key"], "image_bytes": it["image_bytes"], "image_ext": it["image_ext"],
                        "record": rec, "arrays": arrays})
        return out, []


# ---------------------------------------------------------------- builder and CLI


_GROUPS = {"pm": "point maps"}


@dataclass(frozen=True)
class PointmapConfig:
    """Every option of `gr3d build pointmap` (flags derived from the fields, `pipelines.corpora.options`).

    Validated on construction; the sample world and the rgbd data-root default are folded in by
    `resolved()`; the manifest's config (everything that decides the output, so it guards resumes) is
    `manifest_config()`.
    """

    source: str = option(group="pm", choices=SOURCES, required=True, help="which reader the frames come from")
    embodiedscan: Sequence[str | os.PathLike[str]] = option((), group="pm", nargs="+", cli_default=[], metavar="FILE",
                                                            help="embodiedscan_infos_*.pkl files")
    omni3d: Sequence[str | os.PathLike[str]] = option((), group="pm", nargs="+", cli_default=[], metavar="FILE",
                                                      help="Omni3D {Dataset}_{split}.json files")
    rgbd: str | os.PathLike[str] | None = option(None, group="pm", metavar="DIR",
                                                 help="a generic RGB-D folder (see pipelines.sources.rgbd)")
    data_root: str | os.PathLike[str] | None = option(
        None, group="pm", metavar="DIR",
        help="root the EmbodiedScan / Omni3D paths are relative to (rgbd: defaults to --rgbd)")
    sample_world: str | os.PathLike[str] | None = option(None, group="pm", add=add_sample_world_argument)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    points_per_conversation: int = option(10, group="pm", type=int, help="rounds per point_3d conversation")
    conversations: int = option(1, group="pm", type=int,
                                help="point_3d conversations per record, over disjoint points (default 1)")
    keep_depth: bool = option(False, group="pm", action="store_true",
                              help="also store the depth map (KEY.depth.npy, float32 m) and its K (KEY.depth_k.npy)")
    omni3d_image_dir: str = option("image", group="pm", help="Omni3D: image folder name replaced by ...")
    omni3d_depth_dir: str = option("depth", group="pm", help="... this depth folder name (default depth)")
    omni3d_depth_format: str = option("png_u16", group="pm", choices=DEPTH_FORMATS,
                                      help="Omni3D: how the depth files are stored (docs/pointmaps.md)")
    omni3d_depth_scale: float | None = option(None, group="pm", type=float,
                                              help="stored units per metre (default 1000)")

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown point-map source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.points_per_conversation < 1 or self.conversations < 1:
            raise ValueError("points per conversation and conversations must be >= 1")
        if self.omni3d_depth_format not in DEPTH_FORMATS:
            raise ValueError(f"unknown depth format {self.omni3d_depth_format!r}; "
                             f"choose one of {', '.join(DEPTH_FORMATS)}")

    def resolved(self) -> PointmapConfig:
        """The sample world's files and roots added (for this config's source), the rgbd data root defaulted;
        a ValueError names a missing input."""
        src, world = self.source, sample_world_of(self)
        embodiedscan, omni3d, rgbd, data_root = list(self.embodiedscan), list(self.omni3d), self.rgbd, self.data_root
        if world is not None:
            embodiedscan += [str(p) for p in world.embodiedscan_files] if src == "embodiedscan" else []
            omni3d += [str(p) for p in world.omni3d_files] if src == "omni3d" else []
            rgbd = rgbd or (str(world.rgbd_root) if src == "rgbd" else None)
            data_root = data_root or (str(world.root) if src != "rgbd" else None)
        data_root = data_root or (rgbd if src == "rgbd" else None)
        if src == "embodiedscan" and not embodiedscan:
            raise ValueError("--source embodiedscan needs --embodiedscan FILE...")
        if src == "omni3d" and not omni3d:
            raise ValueError("--source omni3d needs --omni3d FILE...")
        if src == "rgbd" and rgbd is None:
            raise ValueError("--source rgbd needs --rgbd DIR")
        if src in ("embodiedscan", "omni3d") and data_root is None:
            raise ValueError(f"--source {src} needs --data-root DIR")
        return dataclasses.replace(self, embodiedscan=embodiedscan, omni3d=omni3d, rgbd=rgbd, data_root=data_root,
                                   sample_world=None)

    def manifest_config(self) -> dict[str, Any]:
        """The builder config (JSON) of a resolved config: what the stages read and the manifest records."""
        s = self.sampler
        return {
            "source": self.source,
            "data_root": str(Path(self.data_root).resolve()) if self.data_root is not None else None,
            "embodiedscan": [str(Path(f).resolve()) for f in self.embodiedscan],
            "omni3d": [str(Path(f).resolve()) for f in self.omni3d],
            "rgbd": str(Path(self.rgbd).resolve()) if self.rgbd is not None else None,
            "sampler": {"n": s.n, "mode": s.mode, "min_valid_fraction": s.min_valid_fraction, "max_depth": s.max_depth,
                        "depth_bins": s.depth_bins, "edge_threshold": s.edge_threshold, "edge_radius": s.edge_radius,
                        "seed": s.seed},
            "points_per_conversation": self.points_per_conversation,
            "conversations": self.conversations,
            "keep_depth": self.keep_depth,
            "omni3d_image_dir": self.omni3d_image_dir,
            "omni3d_depth_dir": self.omni3d_depth_dir,
            "omni3d_depth_format": self.omni3d_depth_format,
            "omni3d_depth_scale": float(self.omni3d_depth_scale or DepthSpec(self.omni3d_depth_format).units_per_metre),
        }  # fmt: skip


def make_builder(config: PointmapConfig):
    """A `pipelines.engine.plan.Builder` for a point-map config (resolved here; ValueError on a missing input)."""
    from pipelines.engine.plan import Builder

    cfg = config.resolved().manifest_config()
    sampler = SamplerConfig(**cfg["sampler"])
    return Builder("pointmap", cfg, iter_inputs, [
        ReadFrame(), SamplePoints(sampler),
        Verbalize(sampler, cfg["points_per_conversation"], cfg["conversations"], cfg["keep_depth"]),
    ])  # fmt: skip


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PointmapConfig, _GROUPS)


def _make(args: argparse.Namespace):
    """`gr3d build pointmap`: option errors surface as `PlanError` (printed cleanly, exit 2)."""
    from pipelines.engine.plan import PlanError

    try:
        return make_builder(options_from_args(PointmapConfig, args))
    except ValueError as exc:
        raise PlanError(f"pointmaps: {exc}") from None


register_builder("pointmap", _make, aliases=("pointmaps",), help="point-map corpus: images with sampled surface points (u, v, X, Y, Z)",
                 add_arguments=_add_arguments)
