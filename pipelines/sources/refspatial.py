"""RefSpatial LLaVA-style JSON arrays: one item per record, streamed.

Written from the format notes (docs/formats.md, "RefSpatial"). The released files are multi-GB single JSON arrays, so they
are parsed record by record with bounded memory (`iter_json_array`). `image`/`depth` may be a str
or a list; paths are bare names relative to a per-file image root and depth root (the table in the
format notes, `default_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.sources.common import PathEscapesRoot, ReadResult, SourceError, read_reject, resolve_under
from shards.keys import make_key

__all__ = ["RefSpatialFile", "DEFAULT_LAYOUT", "default_files", "iter_json_array", "read_refspatial"]

_CHUNK = 1 << 20
MAX_RECORD_CHARS = 64 << 20


@dataclass(frozen=True)
class RefSpatialFile:
    """One JSON file with the roots its `image` and `depth` paths are relative to.

    `tag` names the file in keys and `source.file` (default: "<parent dir>/<stem>", e.g. "3D/choice_qa").
    """

    json_path: str | os.PathLike
    image_root: str | os.PathLike
    depth_root: str | os.PathLike | None = None
    tag: str | None = None

    def file_tag(self) -> str:
        p = Path(self.json_path)
        return self.tag or f"{p.parent.name}/{p.stem}"


# json (relative to the RefSpatial root) -> (image_root, depth_root), from the RoboRefer README mapping.
DEFAULT_LAYOUT: dict[str, tuple[str, str]] = {
    "2D/choice_qa.json": ("2D/image", "2D/depth"),
    "2D/reasoning_template_qa.json": ("2D/image", "2D/depth"),
    "3D/choice_qa.json": ("3D/image", "3D/depth"),
    "3D/reasoning_template_qa.json": ("3D/image", "3D/depth"),
    "3D/vacant_qa.json": ("3D/image", "3D/depth"),
    "3D/multi_view_qa.json": ("3D/image_multi_view", "3D/depth_multi_view"),
    "3D/visual_choice_qa.json": ("3D/image_visual_choice", "3D/depth"),
    "Simulator/metadata.json": ("Simulator/image", "Simulator/depth"),
}


def default_files(refspatial_root: str | os.PathLike) -> list[RefSpatialFile]:
    """The files of the released layout that exist under `refspatial_root`, with their roots."""
    root = Path(refspatial_root)
    return [RefSpatialFile(root / j, root / i, root / d, tag=j[: -len(".json")])
            for j, (i, d) in DEFAULT_LAYOUT.items() if (root / j).is_file()]  # fmt: skip


def iter_json_array(path: str | os.PathLike, chunk_chars: int = _CHUNK) -> Iterator[Any]:
    """Stream the elements of a top-level JSON array with bounded memory.

    Raises `SourceError` naming the file for a non-array, invalid or truncated file (after yielding
    the elements before the damage), or for one element larger than MAX_RECORD_CHARS.
    """
    dec = json.JSONDecoder()
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed in finally
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from None
    buf, pos, consumed, eof, n = "", 0, 0, False, 0

    def fill() -> bool:
        nonlocal buf, pos, consumed, eof
        if eof:
            return False
        try:
            chunk = fh.read(chunk_chars)
        except UnicodeDecodeError as exc:
            raise SourceError(path, f"not UTF-8 text: {exc}") from None
        if not chunk:
            eof = True
            return False
        if pos:
            consumed += pos
            buf, pos = buf[pos:], 0
        buf += chunk
        return True

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return ""

    try:
        if skip_ws() != "[":
            raise SourceError(path, "not a JSON array (the file must start with '[')")
        pos += 1
        expect_value = True
        first = True
        while True:
            ch = skip_ws()
            if ch == "":
                raise SourceError(path, f"truncated JSON: the array ends without ']' after {n} elements "
                                        f"(character {consumed + pos})")  # fmt: skip
            if ch == "]" and (first or not expect_value):
                pos += 1
                if skip_ws() != "":
                    raise SourceError(path, f"unexpected data after the closing ']' (character {consumed + pos})")
                return
            if not expect_value:
                if ch != ",":
                    raise SourceError(path, f"invalid JSON: expected ',' or ']' after element {n - 1} "
                                            f"(character {consumed + pos})")  # fmt: skip
                pos += 1
                expect_value = True
                continue
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as exc:
                    if eof:
                        raise SourceError(path, f"invalid or truncated JSON in element {n} (character "
                                                f"{consumed + exc.pos}): {exc.msg}") from None  # fmt: skip
                if len(buf) - pos > MAX_RECORD_CHARS:
                    raise SourceError(path, f"element {n} is invalid or longer than {MAX_RECORD_CHARS} characters "
                                            f"(character {consumed + pos})")  # fmt: skip
                if not fill():
                    continue  # eof now set: one more decode decides
            pos = end
            n += 1
            first = False
            expect_value = False
            yield obj
    finally:
        fh.close()


def _as_list(x: object) -> list[str] | None:
    if isinstance(x, str):
        return [x]
    if isinstance(x, list) and all(isinstance(p, str) for p in x):
        return list(x)
    return None


def _check_conversations(conv: object) -> str | None:
    if not isinstance(conv, list) or not conv:
        return "'conversations' must be a non-empty list"
    for k, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in ("human", "gpt"):
            return f"conversations[{k}] must be {{'from': 'human'|'gpt', 'value': str}}"
    return None


def read_refspatial(
    files: Sequence[RefSpatialFile],
    check_files: bool = True,
    require_depth: bool = False,
) -> Iterator[ReadResult]:
    """Yield one item per record (in file order), or a reject saying why not.

    Item fields: key, format="refspatial", source {dataset, file, id}, id, record_index, image_path (first image),
    image_paths, image_rels, depth_paths, depth_rels, conversations, warnings. A listed depth file that is
    missing is a reject when `require_depth`, else a warning (depth is only read for RGB-D training).
    Rejects: malformed_record, path_escapes_root, missing_image, missing_depth.
    """
    for spec in files:
        tag = spec.file_tag()
        for idx, rec in enumerate(iter_json_array(spec.json_path)):
            yield _read_record(rec, idx, tag, spec, check_files, require_depth)


def _read_record(rec: object, idx: int, tag: str, spec: RefSpatialFile, check_files: bool,
                 require_depth: bool) -> ReadResult:
    key = make_key("refspatial", *tag.split("/"), f"{idx:08d}")
    where = f"{tag}.json record {idx}"
    if not isinstance(rec, dict):
        return read_reject(key, "malformed_record", f"{where}: not an object")
    images = _as_list(rec.get("image"))
    if not images:
        return read_reject(key, "malformed_record", f"{where}: 'image' must be a str or a non-empty list of str")
    depths = _as_list(rec["depth"]) if rec.get("depth") is not None else []
    if depths is None:
        return read_reject(key, "malformed_record", f"{where}: 'depth' must be a str or a list of str")
    bad = _check_conversations(rec.get("conversations"))
    if bad:
        return read_reject(key, "malformed_record", f"{where}: {bad}")
    rid = rec.get("id")
    rid = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else f"{idx}"
    warnings: list[str] = []
    try:
        image_paths = [resolve_under(spec.image_root, p) for p in images]
        if depths and spec.depth_root is None:
            raise PathEscapesRoot("the record lists depth files but no depth root was given")
        depth_paths = [resolve_under(spec.depth_root, p) for p in depths] if depths else []
    except PathEscapesRoot as exc:
        return read_reject(key, "path_escapes_root", f"{where}: {exc}")
    if check_files:
        missing = [p for p, rel in zip(image_paths, images) if not p.is_file()]
        if missing:
            return read_reject(key, "missing_image", f"{where}: no image file at {missing[0]}")
        dmiss = [rel for p, rel in zip(depth_paths, depths) if not p.is_file()]
        if dmiss:
            if require_depth:
                return read_reject(key, "missing_depth", f"{where}: no depth file {dmiss[0]}")
            warnings.append(f"missing depth: {', '.join(dmiss)}")
            depth_paths, depths = [], []
    return {
        "key": key,
        "format": "refspatial",
        "source": {"dataset": "RefSpatial", "file": f"{tag}.json", "id": rid},
        "id": rid,
        "record_index": idx,
        "image_path": str(image_paths[0]),
        "image_paths": [str(p) for p in image_paths],
        "image_rels": images,
        "depth_paths": [str(p) for p in depth_paths],
        "depth_rels": depths,
        "conversations": [{"from": t["from"], "value": t["value"]} for t in rec["conversations"]],
        "warnings": warnings,
    }
