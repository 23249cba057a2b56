"""One Omni3D file listed fast for a builder that keeps a few annotation fields (det3d): a typed parse of only
those fields, its `annotations` array cut into pieces that worker processes list in parallel.

Why: the det3d driver lists every image before any chunk can run, and parsing the file was most of that
serial listing: creating ~270 Python floats per image that the listing then drops (each annotation's 24
`bbox3D_cam` corners are only checked, never kept). msgspec parses the file against a schema of the fields
the listing reads (`TypedDict`, unknown fields skipped without making objects), takes `bbox3D_cam` as its raw
text (checked below) and, at ~0.4x orjson's CPU for the whole document, removes most of the parse
(bench/executors.md, "A typed parse in pieces (session 7)").

Same results. `read_omni3d_lean(path, ..., ann_fields=F, transform=t)` yields exactly what
`t(r) for r in read_omni3d([path], ..., check_files=False, ann_fields=F)` yields (rejects passed as they are),
in the same order; the tests compare both on the sample world and on hostile files. Whenever it cannot be
sure of that it reads the file that way instead:
- msgspec missing, the file too large to hold (`STREAM_ABOVE_BYTES`, streamed by `read_omni3d`), not a JSON
  object with a top-level `annotations` array it can split off (`json_fast.split_top_array`), or any text
  msgspec refuses (NaN literals, numbers beyond float64, lone surrogates, invalid JSON: `read_omni3d` then
  gives `json.load`'s value or its exact error);
- an annotation that is not an object, an annotation or image id that is not a plain int (bools and floats
  compare equal to ints and group with them in ways pieces cannot reproduce), or an image id whose
  annotations were listed as complete by one piece but also occur in another (files that do not keep an
  image's annotations together; real Omni3D files do).

msgspec gives `json.load`'s values for the JSON both accept (correctly rounded floats, integers of any size,
a repeated key's last value); what it refuses goes to `read_omni3d`, as above, and it is given less nesting
depth than `json.load` (`RECURSION_MARGIN`). One known difference: an integer of more than 4,300 digits in a
field the listing skips. `json.load` refuses the whole file (Python's limit on converting digits,
`sys.get_int_max_str_digits`; `read_omni3d` reports `bad_source_file`); msgspec skips the field and the file is
listed. Finding such a run would cost a scan of the whole text on every file.

`bbox3D_cam`, when not kept, is checked from its text: after deleting digits, ".", signs and whitespace it
must read `[[,,],...]` (8 rows of 3; no exponent, no literal), and no run of 309 digits may occur (a number
beyond float64, which `_malformed` calls malformed). msgspec has checked the text is valid JSON, so such a
field is certainly 8x3 finite numbers: `_malformed`'s verdict on it is known without making its floats.
Anything else (an exponent, `true`, a short row) is parsed by `json.loads` and checked as before.
msgspec skips unknown fields without checking their strings' UTF-8, so a file that is not ASCII is decoded
as UTF-8 first (an error: `read_omni3d` reports it).

Pieces: each worker parses one piece of the `annotations` array (`json_fast.cut_points`; a piece that does
not parse alone makes the whole file "not sure"), groups its annotations by image, and builds (and
`transform`s) the complete item of every image whose annotations all lie inside its piece. The annotations
of the images at a piece's two ends (which may continue in the next piece) come back trimmed, and the driver
joins them in piece order. Every image is yielded in the file's order, then the orphan annotations' rejects
in the order of first appearance, as `read_omni3d` does. Workers are forked (the file's bytes and parsed
images are inherited; nothing large crosses a pipe but the items), so only from a process running no other
thread. Otherwise the pieces, of ~`SERIAL_PIECE_BYTES`, run one after the other in this process, so another
thread (Ray's start-up beside a Ray build's listing) gets the GIL between them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from pipelines.engine.stage import Reject
from pipelines.sources.common import listing_worker_init, read_reject, relative_to_root
from pipelines.sources.json_fast import cut_points, split_top_array
from pipelines.sources.omni3d import (
    CHECKED_BOX3D,
    STREAM_ABOVE_BYTES,
    IgnoreRules,
    _dataset_and_split,
    image_annotations,
    image_head,
    read_omni3d,
)
from shards.keys import make_key

try:
    import msgspec
except ImportError:  # optional: read_omni3d gives the same results
    msgspec = None  # type: ignore[assignment]

__all__ = ["read_omni3d_lean", "available", "RULE_FIELDS"]

RULE_FIELDS = ("id", "image_id", "category_name", "valid3D", "center_cam", "dimensions", "R_cam", "bbox3D_cam",
               "bbox2D_trunc", "bbox2D_proj", "bbox2D_tight", "truncation", "visibility", "behind_camera",
               "lidar_pts", "segmentation_pts", "depth_error")
"""Every annotation field the reader itself reads: grouping, `_malformed` and Cube R-CNN's ignore rules."""

_NUMBER_TEXT = b"0123456789.+- \t\n\r"  # no exponents: msgspec does not range-check a raw value's "1e400"
_BOX_SKELETON = b"[" + b",".join([b"[,,]"] * 8) + b"]"
_HUGE_INT = re.compile(rb"[0-9]{309}")
_SHORTEST_HUGE = 309 + 23 + 8 * 4 + 7 + 2  # no 309-digit token fits in a shorter 8x3 array text


def available() -> bool:
    """True when the fast path can run (msgspec is installed); else every file takes `read_omni3d`."""
    return msgspec is not None


@dataclass
class _File:
    """What every piece's worker needs (a forked worker inherits it)."""

    raw: bytes
    pieces: list[tuple[int, int]]
    images: list[Any]
    dataset: str
    split: str
    rel_file: str
    data_root: str | os.PathLike
    rules: IgnoreRules
    ann_fields: Sequence[str]
    transform: Callable[[dict[str, Any]], Any]
    in_file: Counter
    image_ids: set
    by_id: dict[int, tuple[int, Any]]  # id -> (position, image) of the images whose id is used once
    decoder: Any = None


@dataclass
class _Piece:
    built: dict[int, Any] = field(default_factory=dict)  # id -> transformed item or reject: annotations all here
    present: list[int] = field(default_factory=list)  # every image id of this piece's annotations
    edges: dict[int, list[dict[str, Any]] | None] = field(default_factory=dict)  # id -> trimmed annotations
    orphans: list[tuple[int, list[Any]]] = field(default_factory=list)  # (image id, annotation ids), in order


SERIAL_PIECE_BYTES = 4 << 20
"""Pieces listed one after the other in this process are about this large: msgspec holds the GIL while it parses
a piece, and a Ray build lists in a thread beside Ray's start-up, which a whole-file parse stalled for ~0.5 s
(bench/executors.md, "A typed parse in pieces (session 7)")."""


def _decoder(ann_fields: Sequence[str]) -> Any:
    keep = set(ann_fields) - {"ignore", "ignore_reasons"}
    fields = {f: Any for f in (*RULE_FIELDS, *sorted(keep - set(RULE_FIELDS)))}
    if "bbox3D_cam" not in keep:
        fields["bbox3D_cam"] = msgspec.Raw
    lean = TypedDict("LeanAnnotation", fields, total=False)  # type: ignore[misc]
    return msgspec.json.Decoder(list[lean])  # type: ignore[valid-type]


RECURSION_MARGIN = 200
"""Levels of JSON nesting fewer than `json.load` gets that msgspec is given (`_decode`)."""


def _decode(decode: Callable[[bytes], Any], text: bytes) -> Any:
    """msgspec's parse with `RECURSION_MARGIN` fewer levels of nesting than `json.load` gets (both count against
    the interpreter's recursion limit): a file nested near that limit is refused here, then read by
    `read_omni3d`, rather than read here and refused there."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(64, limit - RECURSION_MARGIN))
    try:
        return decode(text)
    finally:
        sys.setrecursionlimit(limit)


def _box_checked(a: dict[str, Any]) -> None:
    """Replace a raw `bbox3D_cam` by what `_malformed` needs to see (module docstring)."""
    raw = a.get("bbox3D_cam")
    if raw is None:
        return
    text = bytes(raw)
    if text.translate(None, _NUMBER_TEXT) == _BOX_SKELETON and (len(text) < _SHORTEST_HUGE or not _HUGE_INT.search(text)):
        a["bbox3D_cam"] = CHECKED_BOX3D
    else:
        a["bbox3D_cam"] = json.loads(text.decode())  # json.load's value (inf for 1e400), checked as before


def _piece(ctx: _File, k: int) -> _Piece | None:
    """Piece `k` of the file's annotations, listed (module docstring); None: not sure, read the file serially."""
    s, e = ctx.pieces[k]
    try:
        anns = _decode(ctx.decoder.decode, b"[" + ctx.raw[s:e] + b"]")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    groups: dict[int, list[dict[str, Any]]] = {}
    box = "bbox3D_cam" not in ctx.ann_fields
    for a in anns:
        iid = a.get("image_id")
        if type(iid) is not int:
            return None
        if box:
            _box_checked(a)
        groups.setdefault(iid, []).append(a)
    out = _Piece(present=list(groups))
    ends = {anns[0]["image_id"], anns[-1]["image_id"]} if anns else set()
    for iid, group in groups.items():
        if iid not in ctx.image_ids:
            out.orphans.append((iid, [a.get("id") for a in group]))
            continue
        found = ctx.by_id.get(iid)
        if found is None:  # an id several images use: each is rejected, with no annotations
            out.edges[iid] = None
            continue
        pos, img = found
        # the image first, as read_omni3d does: a rejected image's annotations are never looked at
        head = image_head(img, pos, ctx.dataset, ctx.split, ctx.rel_file, ctx.data_root, False, {}, ctx.in_file)
        if isinstance(head, Reject):
            if iid in ends:
                out.edges[iid] = None
            else:
                out.built[iid] = head
            continue
        anns_of = image_annotations(group, float(head["height"]), ctx.rules, ctx.ann_fields)
        if iid in ends:
            out.edges[iid] = anns_of
            continue
        head["annotations"] = anns_of
        out.built[iid] = ctx.transform(head)
    return out


def read_omni3d_lean(path: str | os.PathLike, data_root: str | os.PathLike, rules: IgnoreRules,
                     ann_fields: Sequence[str], transform: Callable[[dict[str, Any]], Any],
                     workers: int = 1, fork: bool = True) -> Iterator[Any]:
    """`transform(r)` of each of `read_omni3d([path], data_root, rules, check_files=False, ann_fields=...)`'s
    items and its rejects as they are, in its order. `workers` > 1 cuts the annotations into that many pieces,
    listed in forked processes (`fork=False`: one after the other here, the same results; tests)."""
    results = _lean_results(Path(path), data_root, rules, ann_fields, transform, workers, fork) if available() else None
    if results is None:
        for r in read_omni3d([path], data_root, rules, check_files=False, ann_fields=ann_fields):
            yield r if isinstance(r, Reject) else transform(r)
        return
    yield from results


def _lean_results(path: Path, data_root: str | os.PathLike, rules: IgnoreRules, ann_fields: Sequence[str],
                  transform: Callable[[dict[str, Any]], Any], workers: int, fork: bool = True) -> list[Any] | None:
    """Everything `read_omni3d_lean` yields, or None when not sure (module docstring)."""
    try:
        if os.stat(path).st_size > STREAM_ABOVE_BYTES:
            return None
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None  # read_omni3d reports it
    if not raw.isascii():  # msgspec skips unknown fields without checking their UTF-8; json.load would refuse
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    parts = split_top_array(raw, "annotations")
    if parts is None:
        return None
    skeleton, sentinel, start, end = parts
    try:
        data = _decode(msgspec.json.decode, skeleton)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("annotations") != sentinel or not isinstance(data.get("images"), list):
        return None
    images = data["images"]
    if any(isinstance(img, dict) and isinstance(img.get("id"), bool) for img in images):
        return None
    dataset, split = _dataset_and_split(path, data)
    in_file = Counter(img.get("id") for img in images if isinstance(img, dict))
    image_ids = {img.get("id") for img in images if isinstance(img, dict) and isinstance(img.get("id"), int)}
    by_id = {img["id"]: (pos, img) for pos, img in enumerate(images)
             if isinstance(img, dict) and type(img.get("id")) is int and in_file[img["id"]] == 1}
    forked = fork and workers > 1
    n = workers if forked else max(1, workers, -(-(end - start) // SERIAL_PIECE_BYTES))
    ctx = _File(raw, cut_points(raw, start, end, n), images, dataset, split,
                relative_to_root(path, data_root), data_root, rules, ann_fields, transform, in_file, image_ids, by_id,
                _decoder(ann_fields))
    pieces = _run_pieces(ctx) if forked else [_piece(ctx, k) for k in range(len(ctx.pieces))]
    if any(p is None for p in pieces):
        return None
    return _merge(ctx, pieces)  # type: ignore[arg-type]


def _run_pieces(ctx: _File) -> list[_Piece | None]:
    """Every piece's result: piece 0 in this process while forked processes list the others (one each).

    Plain forked processes with a pipe each, not a `Pool`: a pool hands tasks over in a thread of this
    process, which waited for the GIL while this process parsed piece 0 (msgspec holds it), so the other
    pieces started ~0.5 s late. A forked child gets `ctx` as it is in this process's memory (fork does not
    pickle a Process's arguments). A worker that dies gives None (not sure: the file is read serially, where
    the same failure is reported as itself)."""
    import multiprocessing

    mp = multiprocessing.get_context("fork")
    procs = []
    try:
        for k in range(1, len(ctx.pieces)):
            recv, send = mp.Pipe(duplex=False)
            proc = mp.Process(target=_piece_worker, args=(ctx, k, send), daemon=True, name=f"gr3d-listing-{k}")
            proc.start()
            send.close()
            procs.append((proc, recv))
        out = [_piece(ctx, 0)]
        for proc, recv in procs:
            try:
                out.append(recv.recv())
            except EOFError:
                out.append(None)
            proc.join()
        return out
    finally:  # an error or an interrupt here: the workers are stopped, not awaited
        for proc, recv in procs:
            recv.close()
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _piece_worker(ctx: _File, k: int, send: Any) -> None:
    listing_worker_init()
    try:
        send.send(_piece(ctx, k))
    finally:
        send.close()


def _merge(ctx: _File, pieces: list[_Piece]) -> list[Any] | None:
    """The file's results in `read_omni3d`'s order, or None when an image's "complete" annotations were not."""
    count = Counter(iid for p in pieces for iid in p.present)
    built: dict[int, Any] = {}
    for p in pieces:
        if any(count[iid] != 1 for iid in p.built):
            return None
        built.update(p.built)
    edges: dict[int, list[dict[str, Any]]] = {}
    orphans: dict[int, list[Any]] = {}
    for p in pieces:
        for iid, anns in p.edges.items():
            edges.setdefault(iid, []).extend(anns or ())
        for iid, aids in p.orphans:
            orphans.setdefault(iid, []).extend(aids)
    out: list[Any] = []
    for pos, img in enumerate(ctx.images):
        iid = img.get("id") if isinstance(img, dict) else None
        if type(iid) is int and iid in built:
            out.append(built[iid])
            continue
        head = image_head(img, pos, ctx.dataset, ctx.split, ctx.rel_file, ctx.data_root, False, {}, ctx.in_file)
        if isinstance(head, Reject):
            out.append(head)
            continue
        head["annotations"] = edges.get(iid, [])
        out.append(ctx.transform(head))
    for iid, aids in orphans.items():
        for aid in aids:
            out.append(read_reject(make_key("omni3d", ctx.dataset, "annotation", str(aid)), "orphan_annotation",
                                   f"{ctx.rel_file}: annotation {aid!r} refers to image_id {iid!r}, which is not in "
                                   "the file"))
    return out
