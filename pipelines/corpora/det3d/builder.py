"""`gr3d build det3d`: the 3D-detection corpus from Omni3D JSON and EmbodiedScan info pkl files.

    gr3d build det3d --omni3d FILE... --embodiedscan FILE... --data-root DIR --out DIR [--executor ray|beam]

The listing (`iter_inputs`, a generator) runs the real-format readers in the driver and yields, per image,
only what the conversion needs (intrinsics, pose, boxes, the image path) as small JSON-able dicts, which
the plan encodes one by one, so chunks are cheap to digest and to ship to workers; readers' rejects travel as items too and become reject rows in the
first stage, so every input ends as a sample or a reject. Two CPU stages follow:
`det3d_read` reads the image bytes (never decoded: format and size come from the file header) and
`det3d_convert` turns the annotations into canonical boxes, the record and its conversations
(`pipelines.corpora.det3d.convert`). Keys come from the readers (`omni3d/DATASET/ID`, `embodiedscan/SCAN/FRAME`),
so both sources share one build.

This module registers the builder and imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.engine.build_cli import register_builder
from pipelines.engine.plan import Builder
from pipelines.engine.stage import Item, Reject, Stage
from pipelines.sample_world.paths import add_sample_world_argument, sample_world_of

__all__ = ["BUILDER_NAME", "Det3dRead", "Det3dConvert", "make_builder", "iter_inputs", "list_inputs", "omni3d_rules",
           "parse_rule"]

BUILDER_NAME = "det3d"
READ_STAGE = "read"  # stage of the readers' rejects (as pipelines.sources.read_reject writes them)

# What the conversion reads from an Omni3D annotation (bbox3D_cam and the rest are left behind).
_OMNI3D_FIELDS = ("id", "category_name", "valid3D", "center_cam", "dimensions", "R_cam", "bbox2D_trunc",
                  "bbox2D_proj", "truncation", "visibility", "ignore_reasons")


# ---------------------------------------------------------------------------------------------- listing

def parse_rule(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` of an Omni3D ignore-rule override: a float, `none`/`off` (rule disabled) or true/false."""
    from pipelines.sources.omni3d import IgnoreRules

    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(IgnoreRules)}
    if not sep or name not in fields or name == "ignore_names":
        allowed = ", ".join(n for n in fields if n != "ignore_names")
        raise ValueError(f"ignore-rule override must be NAME=VALUE with NAME one of {allowed}; got {text!r}")
    v = value.strip().lower()
    if name.startswith("require_") or name == "use_trunc_box":
        if v not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} takes true or false, got {value!r}")
        return name, v in ("true", "1")
    if v in ("none", "off"):
        return name, None
    try:
        return name, float(v)
    except ValueError:
        raise ValueError(f"{name} takes a number or none, got {value!r}") from None


def omni3d_rules(preset: str, overrides: dict[str, Any] | None = None) -> Any:
    """The reader's `IgnoreRules`: a preset (train | eval | none) with single thresholds replaced."""
    from pipelines.sources.omni3d import EVAL_RULES, NO_RULES, TRAIN_RULES

    base = {"train": TRAIN_RULES, "eval": EVAL_RULES, "none": NO_RULES}[preset]
    return dataclasses.replace(base, **(overrides or {}))


def _lean(x: Any) -> Any:
    """numpy -> lists, so items are JSON-able (plan digests) and small to pickle."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _omni3d_item(it: dict[str, Any]) -> Item:
    return {
        "key": it["key"], "format": "omni3d", "source": it["source"], "image_path": it["image_path"],
        "width": it["width"], "height": it["height"], "K": _lean(it["K"]),
        "annotations": [{f: _lean(a.get(f)) for f in _OMNI3D_FIELDS if f in a} for a in it["annotations"]],
    }  # fmt: skip


def _es_item(it: dict[str, Any]) -> Item:
    source = dict(it["source"])
    source["scene"] = it["sample_idx"]
    return {
        "key": it["key"], "format": "embodiedscan", "source": source, "image_path": it["image_path"],
        "K": _lean(it["K"]), "T": _lean(it["T"]),
        "instances": [{"index": i["index"], "bbox_id": i["bbox_id"], "category": i["category"],
                       "bbox_3d": _lean(i["bbox_3d"])} for i in it["instances"]],
        "invalid_instances": list(it["invalid_instances"]),
    }  # fmt: skip


def list_inputs(config: dict[str, Any]) -> list[Item]:
    """`iter_inputs` as a list (tests and tools that index or reuse the listing; builds stream it)."""
    return list(iter_inputs(config))


def iter_inputs(config: dict[str, Any]) -> Iterator[Item]:
    """One item per Omni3D image and per EmbodiedScan frame, plus one per reader reject, yielded as read.

    A generator, so the build's plan encodes each item as it comes (`pipelines.engine.plan.encode_inputs`) and
    the listing never exists as a list of dicts (bench/memory.md).

    A reader reject becomes `{"key", "read_reject": {"reason", "message"}}` (emitted as a reject row by
    `det3d_read`); a reject whose key repeats an earlier one (a duplicate image id) gets a `dup-N` suffix,
    since plan keys must be unique. Image files are not checked here (`det3d_read` finds missing images,
    in parallel). A whole unusable annotation file (truncated JSON, unsafe pickle) becomes one
    `bad_source_file` reject row instead of stopping the build.
    """
    from pipelines.engine.stage import Reject as _Reject
    from pipelines.sources import SourceError, read_embodiedscan, read_omni3d
    from shards.keys import make_key

    root = config["data_root"]
    seen: set[str] = set()

    def entry(r: Any, lean: Any) -> Item:
        if isinstance(r, _Reject):
            key, n = r.key, 0
            while key in seen:
                n += 1
                key = make_key(*r.key.split("/"), f"dup-{n}")
            seen.add(key)
            return {"key": key, "read_reject": {"reason": r.reason, "message": r.message}}
        if r["key"] in seen:  # readers never repeat an item key; a reject may have taken it first
            return entry(_Reject(r["key"], READ_STAGE, "duplicate_key", f"another input already has key {r['key']}"),
                         lean)
        seen.add(r["key"])
        return lean(r)

    def read_file(path: str, reader: Any, lean: Any) -> Iterator[Item]:
        try:
            for r in reader(path):
                yield entry(r, lean)
        except SourceError as exc:  # the file as a whole is unusable: one reject row says so
            yield entry(_Reject(make_key("det3d", "source_file", path), READ_STAGE, "bad_source_file", str(exc)), lean)

    conv = config.get("convert", {})
    rules = omni3d_rules(conv.get("omni3d_ignore", "train"), conv.get("omni3d_rules"))
    for f in config.get("omni3d", []):
        yield from read_file(f, lambda p: read_omni3d([p], root, rules, check_files=False), _omni3d_item)
    for f in config.get("embodiedscan", []):
        yield from read_file(f, lambda p: read_embodiedscan([p], root, check_files=False), _es_item)


# ---------------------------------------------------------------------------------------------- stages

class Det3dRead(Stage):
    """Read each image's bytes as they are (no decode, no re-encode); format and size from the header.

    Rejects: the readers' (stage `read`), missing_image, unreadable_image (also a file cut short: the
    header is intact but the pixel data is not all there, `shards.writer.image_problem`),
    unsupported_image_format, image_size_mismatch (Omni3D's width/height disagree with the file; K and
    boxes would not fit it).
    """

    name = "det3d_read"
    batch_size = 64

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        from pipelines.corpora.det3d.convert import image_header
        from shards.writer import image_problem

        outs: list[Item] = []
        rejects: list[Reject] = []
        for it in batch:
            key = it["key"]
            rr = it.get("read_reject")
            if rr is not None:
                rejects.append(Reject(key, READ_STAGE, rr["reason"], rr["message"]))
                continue
            path = it["image_path"]
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:
                rejects.append(Reject(key, self.name, "missing_image", f"no image file at {path}"))
                continue
            except OSError as exc:
                rejects.append(Reject(key, self.name, "unreadable_image", f"{path}: {exc.strerror or exc}"))
                continue
            if not data:
                rejects.append(Reject(key, self.name, "unreadable_image", f"{path}: empty file"))
                continue
            try:
                ext, w, h = image_header(data)
            except ValueError as exc:
                rejects.append(Reject(key, self.name, "unsupported_image_format", f"{path}: {exc}"))
                continue
            if w < 1 or h < 1:
                rejects.append(Reject(key, self.name, "unsupported_image_format", f"{path}: header says {w}x{h}"))
                continue
            why = image_problem(data, ext)
            if why is not None:
                rejects.append(Reject(key, self.name, "unreadable_image", f"{path}: {why}"))
                continue
            if it.get("width") is not None and (it["width"], it["height"]) != (w, h):
                rejects.append(Reject(key, self.name, "image_size_mismatch",
                                      f"{path}: the file is {w}x{h}, the annotation says {it['width']}x{it['height']}"))
                continue
            o = dict(it)
            o.update(image_bytes=data, image_ext=ext, width=w, height=h)
            outs.append(o)
        return outs, rejects


class Det3dConvert(Stage):
    """Annotations -> canonical boxes -> the `det3d` record and its two kinds of conversations.

    Rejects: degenerate_box, no_objects, all_boxes_ignored, unknown_format (`pipelines.corpora.det3d.convert`).
    """

    name = "det3d_convert"
    batch_size = 64

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = dict(config or {})

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        from pipelines.corpora.det3d.convert import ConvertReject, Det3dConfig, convert_item

        cfg = Det3dConfig.from_dict(self.config)
        outs: list[Item] = []
        rejects: list[Reject] = []
        for it in batch:
            try:
                rec = convert_item(it, it["image_ext"], it["width"], it["height"], cfg)
            except ConvertReject as exc:
                rejects.append(Reject(it["key"], self.name, exc.reason, exc.message))
                continue
            outs.append({"key": it["key"], "image_bytes": it["image_bytes"], "image_ext": it["image_ext"],
                         "record": rec, "arrays": {}})
        return outs, rejects


# ---------------------------------------------------------------------------------------------- builder

def make_builder(omni3d: Sequence[str | Path] = (), embodiedscan: Sequence[str | Path] = (),
                 data_root: str | Path = ".", **convert: Any) -> Builder:
    """The det3d `Builder`: config (files, data root, conversion settings), listing and the two stages.

    `convert` holds `pipelines.corpora.det3d.convert.Det3dConfig` fields (omni3d_ignore, omni3d_rules, min_z,
    digits_2d, digits_3d, max_rounds, max_detect, prompt_salt); they are validated here.
    """
    from pipelines.corpora.det3d.convert import Det3dConfig
    from pipelines.engine.plan import PlanError

    if not omni3d and not embodiedscan:
        raise PlanError("det3d needs at least one --omni3d or --embodiedscan file")
    missing = [str(p) for p in [*omni3d, *embodiedscan] if not Path(p).is_file()]
    if missing:  # a mistyped path is a usage error, not bad data: stop before writing anything
        raise PlanError(f"det3d: no such annotation file: {', '.join(missing[:5])}")
    if not Path(data_root).is_dir():
        raise PlanError(f"det3d: --data-root {data_root} is not a directory")
    try:
        cfg = Det3dConfig(**convert).to_dict()
        omni3d_rules(cfg["omni3d_ignore"], cfg["omni3d_rules"])  # unknown rule names fail here, not in a worker
    except (TypeError, ValueError) as exc:
        raise PlanError(f"det3d: {exc}") from None
    config = {
        "omni3d": [str(p) for p in omni3d],
        "embodiedscan": [str(p) for p in embodiedscan],
        "data_root": str(data_root),
        "convert": cfg,
    }
    return Builder(BUILDER_NAME, config, iter_inputs, [Det3dRead(), Det3dConvert(cfg)])


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("det3d inputs")
    g.add_argument("--omni3d", nargs="+", action="extend", default=[], metavar="FILE",
                   help="Omni3D annotation JSON files ({Dataset}_{split}.json)")
    g.add_argument("--embodiedscan", nargs="+", action="extend", default=[], metavar="FILE",
                   help="EmbodiedScan info pkl files (embodiedscan_infos_{split}.pkl)")
    g.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="root that Omni3D file_path and EmbodiedScan img_path are relative to")
    add_sample_world_argument(g)
    c = p.add_argument_group("det3d conversion")
    c.add_argument("--omni3d-ignore", choices=("train", "eval", "none"), default="train",
                   help="Omni3D ignore-rule preset: train (Cube R-CNN Base.yaml, default), eval, none")
    c.add_argument("--omni3d-rule", action="append", default=[], metavar="NAME=VALUE",
                   help="override one ignore threshold, e.g. visibility_thres=0.1 or max_depth=none (repeatable)")
    c.add_argument("--min-z", type=float, default=0.2, help="EmbodiedScan: drop boxes with a corner at z <= this (m)")
    c.add_argument("--digits-2d", type=int, default=3, help="decimals of 2D boxes in the text")
    c.add_argument("--digits-3d", type=int, default=2, help="decimals of 3D boxes in the text")
    c.add_argument("--max-rounds", type=int, default=10, help="region->3D rounds per conversation (<= 10)")
    c.add_argument("--max-detect", type=int, default=20, help="objects per detection answer (<= 20)")
    c.add_argument("--prompt-salt", default="", help="changes which template phrasing each sample gets")


def _make(args: argparse.Namespace) -> Builder:
    from pipelines.engine.plan import PlanError

    omni, es, root = list(args.omni3d), list(args.embodiedscan), args.data_root
    try:
        world = sample_world_of(args)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if world is not None:
        omni += [str(p) for p in world.omni3d_files]
        es += [str(p) for p in world.embodiedscan_files]
        root = root or world.root
    if root is None:
        raise PlanError("--data-root is required (or --sample-world)")
    try:
        rules = dict(parse_rule(r) for r in args.omni3d_rule)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return make_builder(omni, es, Path(root).resolve(), omni3d_ignore=args.omni3d_ignore, omni3d_rules=rules,
                        min_z=args.min_z, digits_2d=args.digits_2d, digits_3d=args.digits_3d,
                        max_rounds=args.max_rounds, max_detect=args.max_detect, prompt_salt=args.prompt_salt)


register_builder(BUILDER_NAME, _make, help="3D detection corpus from Omni3D and EmbodiedScan",
                 add_arguments=_add_arguments)
