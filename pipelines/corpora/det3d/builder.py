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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.corpora.det3d.convert import Det3dConfig, omni3d_rules, parse_rule
from pipelines.corpora.options import add_options, option, options_from_args
from pipelines.engine.build_cli import register_builder
from pipelines.engine.plan import Builder, EncodedItem
from pipelines.engine.stage import Item, Reject, Stage
from pipelines.sample_world.paths import add_sample_world_argument, sample_world_of

__all__ = ["BUILDER_NAME", "Det3dBuildConfig", "Det3dConfig", "Det3dRead", "Det3dConvert", "make_builder", "iter_inputs",
           "iter_encoded_inputs", "list_inputs", "omni3d_rules", "parse_rule"]

BUILDER_NAME = "det3d"
READ_STAGE = "read"  # stage of the readers' rejects (as pipelines.sources.read_reject writes them)

# What the conversion reads from an Omni3D annotation (bbox3D_cam and the rest are left behind).
_OMNI3D_FIELDS = ("id", "category_name", "valid3D", "center_cam", "dimensions", "R_cam", "bbox2D_trunc",
                  "bbox2D_proj", "truncation", "visibility", "ignore_reasons")


# ---------------------------------------------------------------------------------------------- listing

def _lean(x: Any) -> Any:
    """numpy -> lists, so items are JSON-able (plan digests) and small to pickle."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _omni3d_item(it: dict[str, Any], trimmed: bool = False) -> Item:
    """The work item of one Omni3D image. `trimmed`: the reader already kept only `_OMNI3D_FIELDS` of each
    annotation (`read_omni3d(ann_fields=...)`, the listing's path); their values are parsed JSON, never numpy."""
    anns = it["annotations"] if trimmed else \
        [{f: _lean(a.get(f)) for f in _OMNI3D_FIELDS if f in a} for a in it["annotations"]]
    return {
        "key": it["key"], "format": "omni3d", "source": it["source"], "image_path": it["image_path"],
        "width": it["width"], "height": it["height"], "K": _lean(it["K"]), "annotations": anns,
    }  # fmt: skip


def _omni3d_trimmed_item(it: dict[str, Any]) -> Item:
    return _omni3d_item(it, trimmed=True)


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
    keys = _UniqueKeys()
    for kind, path in _sources(config):
        for r in _file_results(kind, path, config):
            yield keys.entry(r)


# Several source files are listed in worker processes, one file each, when they hold at least this much JSON /
# pickle together (~6,000 Omni3D images at ~0.3 ms each): enough to pay a worker's start-up (a forked one costs
# little, a spawned one ~0.3 s of CPU for its imports, bench/executors.md "Driver per input (session 4)").
PARALLEL_LISTING_MIN_BYTES = 32 << 20
_FORK_OK = True  # False: always spawn (bench/det3d_listing.py compares the two)


def iter_encoded_inputs(config: dict[str, Any]) -> Iterator[Item | EncodedItem]:
    """The build's listing: `iter_inputs`'s items, encoded where they are made (`EncodedItem`: the plan keeps the
    blob as it is).

    Several large source files (`PARALLEL_LISTING_MIN_BYTES`) are listed each in its own worker process, on up
    to one process per CPU; one large Omni3D file is cut into pieces listed in forked processes
    (`pipelines.sources.omni3d_lean`, `PIECES_MIN_BYTES`). Either way the driver applies the cross-file rules of
    `iter_inputs` (unique keys, `dup-N` rejects) to the results, file by file in the same order, so the listing,
    and every plan byte made from it, is the serial one's. Memory: each worker holds its own file parsed (up to
    one file per worker at once, in the workers, not in the driver); the driver holds the encoded items, as the
    serial listing's plan does.
    """
    sources = _sources(config)
    n = _listing_workers(sources)
    keys = _UniqueKeys()
    if n < 2:
        for kind, path in sources:
            for r in _file_results(kind, path, config, encode=True, workers=_piece_workers(kind, path)):
                yield keys.entry(r)
        return
    import multiprocessing

    from pipelines.sources.common import listing_worker_init

    # fork when this process runs no other thread: the workers start with every module imported (a spawned
    # worker re-imports the pipeline, ~0.3 s of CPU each, bench/executors.md). spawn when the listing runs
    # beside Ray's start-up (`run_build` lists in a thread then): a fork would copy another thread's locks.
    method = "fork" if _fork_safe() else "spawn"
    pool = multiprocessing.get_context(method).Pool(n, initializer=listing_worker_init)
    finished = False
    try:
        for results in pool.imap(_encoded_file_results, [(kind, path, config) for kind, path in sources]):
            for r in results:
                yield keys.entry(r)
        finished = True
    finally:  # an error, an interrupt or a consumer that stops early: the workers are stopped, not awaited
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


# One Omni3D file at least this large is listed in pieces by forked worker processes (one per CPU), when the
# driver runs no other thread (bench/executors.md, "A typed parse in pieces (session 7)").
PIECES_MIN_BYTES = 16 << 20


def _fork_safe() -> bool:
    import threading

    return threading.active_count() == 1 and _FORK_OK


def _piece_workers(kind: str, path: str) -> int:
    """How many forked processes list this one file's pieces (1: this process lists it)."""
    import os

    from pipelines.sources import omni3d_lean

    if kind != "omni3d" or not omni3d_lean.available() or not _fork_safe():
        return 1
    try:
        if os.path.getsize(path) < PIECES_MIN_BYTES:
            return 1
    except OSError:
        return 1
    return max(1, len(os.sched_getaffinity(0)))


def _sources(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(reader kind, file) of every source file, in the listing's order: Omni3D files, then EmbodiedScan files."""
    return [("omni3d", str(f)) for f in config.get("omni3d", [])] + \
        [("embodiedscan", str(f)) for f in config.get("embodiedscan", [])]


def _listing_workers(sources: list[tuple[str, str]]) -> int:
    """How many worker processes list the source files (1: the driver lists them itself)."""
    import os

    if len(sources) < 2:
        return 1
    try:
        if sum(os.path.getsize(f) for _, f in sources) < PARALLEL_LISTING_MIN_BYTES:
            return 1
    except OSError:  # the serial listing reports an unreadable file as it always has
        return 1
    return max(1, min(len(sources), len(os.sched_getaffinity(0))))


def _file_results(kind: str, path: str, config: dict[str, Any], encode: bool = False,
                  workers: int = 1) -> Iterator[Item | EncodedItem | Reject]:
    """One source file's work items (trimmed; `encode`: as `EncodedItem`s) and read rejects, in the file's order.

    Omni3D files go through `omni3d_lean` (the same results as `read_omni3d`, faster; `workers` forked
    processes list its pieces)."""
    from pipelines.sources import read_embodiedscan
    from pipelines.sources.common import read_each
    from pipelines.sources.omni3d_lean import read_omni3d_lean
    from shards.keys import make_key

    root = config["data_root"]
    bad_file = lambda p: make_key("det3d", "source_file", p)  # noqa: E731
    if kind == "omni3d":
        conv = config.get("convert", {})
        rules = omni3d_rules(conv.get("omni3d_ignore", "train"), conv.get("omni3d_rules"))
        item = _encoded_omni3d_item if encode else _omni3d_trimmed_item
        yield from read_each([path], lambda p: read_omni3d_lean(p, root, rules, _OMNI3D_FIELDS, item, workers),
                             bad_file)
        return
    for r in read_each([path], lambda p: read_embodiedscan([p], root, check_files=False), bad_file):
        yield r if isinstance(r, Reject) else _encoded(_es_item(r)) if encode else _es_item(r)


def _encoded(item: Item) -> EncodedItem:
    """The item encoded, and written to the listing's spill when one is under way (a forked listing worker then
    sends the driver a reference, not the bytes: `pipelines.engine.spill`)."""
    from pipelines.engine.plan import encode_item
    from pipelines.engine.spill import spilled

    return EncodedItem(item["key"], spilled(encode_item(item)))


def _encoded_omni3d_item(it: dict[str, Any]) -> EncodedItem:
    """An Omni3D image's work item, encoded where it is made (a listing worker, or the driver)."""
    return _encoded(_omni3d_item(it, trimmed=True))


def _encoded_file_results(job: tuple[str, str, dict[str, Any]]) -> list[EncodedItem | Reject]:
    """`_file_results` in a listing worker, each item encoded there (what the driver's plan would encode)."""
    return list(_file_results(*job, encode=True))


class _UniqueKeys:
    """The listing's cross-file rule: every key once. A reject whose key was taken gets a `dup-N` suffix; an
    item whose key was taken (by a reject of an earlier file) becomes a `duplicate_key` reject."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def entry(self, r: Item | EncodedItem | Reject) -> Item | EncodedItem:
        from pipelines.sources.common import reject_item
        from shards.keys import make_key

        if isinstance(r, Reject):
            key, n = r.key, 0
            while key in self.seen:
                n += 1
                key = make_key(*r.key.split("/"), f"dup-{n}")
            self.seen.add(key)
            return reject_item(key, r)
        key = r.key if isinstance(r, EncodedItem) else r["key"]
        if key in self.seen:  # readers never repeat an item key; a reject may have taken it first
            return self.entry(Reject(key, READ_STAGE, "duplicate_key", f"another input already has key {key}"))
        self.seen.add(key)
        return r


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
        from pipelines.sources.common import item_reject
        from shards.writer import image_problem

        outs: list[Item] = []
        rejects: list[Reject] = []
        for it in batch:
            key = it["key"]
            rr = item_reject(it, READ_STAGE)
            if rr is not None:
                rejects.append(rr)
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

_GROUPS = {"inputs": "det3d inputs", "conversion": "det3d conversion"}


@dataclass(frozen=True)
class Det3dBuildConfig:
    """Every option of `gr3d build det3d` (flags derived from the fields, `pipelines.corpora.options`).

    Input files (explicit ones first, then a sample world's), the data root their paths are relative
    to, and the conversion settings (`Det3dConfig`, validated on construction). The manifest's config
    is `manifest_config()` of the resolved config.
    """

    omni3d: Sequence[str | Path] = option((), group="inputs", nargs="+", action="extend", cli_default=[], metavar="FILE",
                                          help="Omni3D annotation JSON files ({Dataset}_{split}.json)")
    embodiedscan: Sequence[str | Path] = option(
        (), group="inputs", nargs="+", action="extend", cli_default=[], metavar="FILE",
        help="EmbodiedScan info pkl files (embodiedscan_infos_{split}.pkl)")
    data_root: str | Path | None = option(None, group="inputs", type=Path, metavar="DIR",
                                          help="root that Omni3D file_path and EmbodiedScan img_path are relative to")
    sample_world: str | Path | None = option(None, group="inputs", add=add_sample_world_argument)
    convert: Det3dConfig = field(default_factory=Det3dConfig)

    def resolved(self) -> Det3dBuildConfig:
        """The sample world folded into the files and the data root (resolved); PlanError if inputs are missing."""
        from pipelines.engine.plan import PlanError

        omni, es, root = list(self.omni3d), list(self.embodiedscan), self.data_root
        try:
            world = sample_world_of(self)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        if world is not None:
            omni += [str(p) for p in world.omni3d_files]
            es += [str(p) for p in world.embodiedscan_files]
            root = root or world.root
        if root is None:
            raise PlanError("--data-root is required (or --sample-world)")
        if not omni and not es:
            raise PlanError("det3d needs at least one --omni3d or --embodiedscan file")
        missing = [str(p) for p in [*omni, *es] if not Path(p).is_file()]
        if missing:  # a mistyped path is a usage error, not bad data: stop before writing anything
            raise PlanError(f"det3d: no such annotation file: {', '.join(missing[:5])}")
        if not Path(root).is_dir():
            raise PlanError(f"det3d: --data-root {root} is not a directory")
        return dataclasses.replace(self, omni3d=omni, embodiedscan=es, data_root=Path(root).resolve(), sample_world=None)

    def manifest_config(self) -> dict[str, Any]:
        """The builder config (manifest, resume digest): files, data root, conversion settings."""
        return {
            "omni3d": [str(p) for p in self.omni3d],
            "embodiedscan": [str(p) for p in self.embodiedscan],
            "data_root": str(self.data_root),
            "convert": self.convert.to_dict(),
        }


def make_builder(config: Det3dBuildConfig) -> Builder:
    """The det3d `Builder`: config (files, data root, conversion settings), listing and the two stages."""
    c = config.resolved()
    cfg = c.manifest_config()
    return Builder(BUILDER_NAME, cfg, iter_encoded_inputs, [Det3dRead(), Det3dConvert(cfg["convert"])])


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, Det3dBuildConfig, _GROUPS)


def _make(args: argparse.Namespace) -> Builder:
    from pipelines.engine.plan import PlanError

    try:
        config = options_from_args(Det3dBuildConfig, args)
    except ValueError as exc:
        raise PlanError(f"det3d: {exc}") from None
    return make_builder(config)


register_builder(BUILDER_NAME, _make, help="3D detection corpus from Omni3D and EmbodiedScan",
                 add_arguments=_add_arguments)
