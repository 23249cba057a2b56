"""Omni3D annotation files (`{Dataset}_{split}.json`): one item per image, with its annotations.

Written from the format notes (docs/formats.md, "Omni3D"). Each annotation keeps its raw fields and gets `ignore` plus the
list of `ignore_reasons` from the selectable ignore rules (default: the evaluation settings of
`tools/train_net.py` + `configs/Base.yaml`), so a builder can drop ignored objects and the audit can
count why. Several files are read as one dataset, as `cubercnn.data.Omni3D` concatenates them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.engine.stage import Reject
from pipelines.sources.common import (
    MAX_CATEGORY_CHARS,
    PathEscapesRoot,
    ReadResult,
    SourceError,
    read_reject,
    relative_to_root,
    resolved_path,
)
from pipelines.sources.json_fast import load_json_path
from pipelines.sources.json_stream import load_object
from schemas.camera import CameraError, validate_intrinsics
from schemas.omni3d import (
    EVAL_RULES,
    NO_RULES,
    RULE_PRESETS,
    TRAIN_RULES,
    IgnoreRules,
    box4,
    ignore_rule_reasons,
)
from shards.keys import make_key

__all__ = ["IgnoreRules", "EVAL_RULES", "TRAIN_RULES", "NO_RULES", "box4", "ignore_reasons", "read_omni3d", "load_omni3d_json"]

_FILE_RE = re.compile(r"^(?P<dataset>.+)_(?P<split>train|val|test)\.json$")


_SHAPES = {"bbox3D_cam": (8, 3), "center_cam": (3,), "dimensions": (3,), "R_cam": (3, 3)}

CHECKED_BOX3D: list[list[float]] = [[0.0, 0.0, 0.0] for _ in range(8)]
"""Stands in for a `bbox3D_cam` already known to be 8x3 finite numbers (`omni3d_lean` checks the field's text
without making its floats); `_malformed` accepts this very object without looking at it. Never kept in an item."""


def _finite_numbers(xs: object) -> bool:
    """True when every element of the iterable `xs` is certainly a finite number (int, float or bool).

    One C-level float sum instead of a Python check per element (the listing checks ~40 numbers per
    annotation): the sum raises TypeError for a non-number (str, None, list, dict) and OverflowError for an
    int too large for a float, and is inf or NaN whenever an element is. A finite sum of numbers therefore
    means every element converts to a finite float64. False means "not sure" (finite values whose sum
    overflows, huge ints): the caller's numpy check then decides.
    """
    try:
        return math.isfinite(sum(xs, 0.0))  # type: ignore[call-overload]
    except (TypeError, OverflowError):
        return False


def _plainly_shaped(x: object, shape: tuple[int, ...]) -> bool:
    """True when `x` is certainly a finite float array of `shape`: (nested) lists of finite numbers.

    The fast path of `_malformed` (the driver lists every annotation; numpy per field cost ~40 % of the
    listing, bench/executors.md). False means "not sure": numpy then decides, so verdicts never change.
    """
    if x is CHECKED_BOX3D:
        return shape == (8, 3)
    if type(x) is not list or len(x) != shape[0]:
        return False
    if len(shape) == 1:
        return _finite_numbers(x)
    n = shape[1]
    return all(type(r) is list and len(r) == n for r in x) and _finite_numbers(chain.from_iterable(x))


def _malformed(ann: dict[str, Any]) -> str | None:
    """Name of the first geometric field that cannot be used, or None."""
    for name, shape in _SHAPES.items():
        if _plainly_shaped(ann.get(name), shape):
            continue
        try:
            a = np.asarray(ann.get(name), dtype=np.float64)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float64's range
            return name
        if a.shape != shape or not np.all(np.isfinite(a)):
            return name
    cat = ann.get("category_name")
    if not isinstance(cat, str) or not cat.strip() or len(cat) > MAX_CATEGORY_CHARS:
        return "category_name"
    return None


def ignore_reasons(ann: dict[str, Any], image_height: float, rules: IgnoreRules = EVAL_RULES) -> list[str]:
    """Why this annotation is ignored: a malformed geometric field, else `schemas.omni3d`'s rule (empty: keep)."""
    bad = _malformed(ann)
    if bad:
        return [f"malformed_{bad}"]
    return ignore_rule_reasons(ann, image_height, rules)


MAX_IMAGE_SIDE = 1 << 20
"""Largest width or height taken as real (pixels): a larger one is a corrupt value (a 400-digit integer once
ended the listing when the height became a float), rejected as `bad_image_size`."""

# Files larger than this are parsed streaming (`pipelines.sources.json_stream`): json.load would hold the whole
# text besides the parsed objects. Smaller ones use `json_fast` (orjson in pieces, else json.load), faster per
# image by ~1.5x (json.load) to ~2x (orjson) (bench/executors.md).
STREAM_ABOVE_BYTES = 256 << 20


def load_omni3d_json(path: str | os.PathLike) -> dict[str, Any]:
    """json.load's value (`json_fast`, or `json_stream` above `STREAM_ABOVE_BYTES`), with a clear `SourceError`
    for unreadable, truncated or wrongly shaped files."""
    try:
        if os.stat(path).st_size > STREAM_ABOVE_BYTES:  # the text is never held whole (json_stream)
            with open(path, encoding="utf-8") as fh:
                data = load_object(fh, ("images", "annotations"))
        else:  # json.load's values, with orjson's parser when it is certain to agree (json_fast)
            data = load_json_path(path, split="annotations")
    except OSError as exc:
        raise SourceError(path, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(path, f"not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SourceError(path, f"invalid or truncated JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (sys.get_int_max_str_digits)
        raise SourceError(path, f"unreadable JSON: {exc}") from None
    except RecursionError:
        raise SourceError(path, "JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise SourceError(path, f"top level must be an object, got {type(data).__name__}")
    if not isinstance(data.get("images"), list):
        raise SourceError(path, "missing 'images' list")
    if not isinstance(data.get("annotations", []), list):
        raise SourceError(path, "'annotations' must be a list")
    return data


def _dataset_and_split(path: Path, data: dict[str, Any]) -> tuple[str, str]:
    m = _FILE_RE.match(path.name)
    if m:
        return m.group("dataset"), m.group("split")
    info = data.get("info")
    info = info[0] if isinstance(info, list) and info else info
    split = str(info.get("split", "")) if isinstance(info, dict) else ""
    return path.stem, split


def read_omni3d(
    files: Sequence[str | os.PathLike],
    data_root: str | os.PathLike,
    rules: IgnoreRules | str = "eval",
    check_files: bool = True,
    ann_fields: Sequence[str] | None = None,
) -> Iterator[ReadResult]:
    """Yield one item per image of the Omni3D files (in file order), or a reject saying why not.

    `data_root` is the `datasets/` folder that `file_path` is relative to. `rules` is an `IgnoreRules`
    or a preset name: "eval" (default), "train" (Base.yaml) or "none".
    Item fields: key, format="omni3d", source {dataset, file, id}, image_path (resolved), file_path, image_id,
    dataset_id, split, width, height, K (3x3 float64), src_90_rotate, src_flagged, annotations (raw fields +
    ignore, ignore_reasons). Rejects: path_escapes_root, missing_image, bad_intrinsics, bad_image_size,
    malformed_image, duplicate_image_id, orphan_annotation.
    `ann_fields`: keep only these annotation fields (in this order; "ignore" and "ignore_reasons" may be among
    them), as `{f: ann[f] for f in ann_fields if f in ann}` of the full annotation would: a builder that needs
    a few fields gets them without a second copy of every annotation (the driver's listing, bench/executors.md).
    """
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown ignore-rule preset {rules!r}; choose from {sorted(RULE_PRESETS)}")
        rules = RULE_PRESETS[rules]
    seen: dict[int, str] = {}
    for f in files:
        path = Path(f)
        data = load_omni3d_json(path)
        dataset, split = _dataset_and_split(path, data)
        rel_file = relative_to_root(path, data_root)
        anns_by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in data.get("annotations", []):
            iid = a.get("image_id") if isinstance(a, dict) else None
            anns_by_image.setdefault(iid, []).append(a)
        image_ids = {img.get("id") for img in data["images"] if isinstance(img, dict) and isinstance(img.get("id"), int)}
        # an id used by several images of one file: annotations point at images by id, so which boxes belong to
        # which image cannot be told; every image with that id is rejected (none silently gets the others' boxes)
        in_file = Counter(img.get("id") for img in data["images"] if isinstance(img, dict))
        for pos, img in enumerate(data["images"]):
            yield _read_image(img, pos, dataset, split, rel_file, data_root, rules, check_files, anns_by_image, seen,
                              in_file, ann_fields)
        for iid, anns in anns_by_image.items():
            if iid in image_ids and not isinstance(iid, bool):
                continue
            for a in anns:
                aid = a.get("id") if isinstance(a, dict) else None
                yield read_reject(make_key("omni3d", dataset, "annotation", str(aid)), "orphan_annotation",
                                  f"{rel_file}: annotation {aid!r} refers to image_id {iid!r}, which is not in the file")


def _read_image(img: object, pos: int, dataset: str, split: str, rel_file: str, data_root: str | os.PathLike,
                rules: IgnoreRules, check_files: bool, anns_by_image: dict, seen: dict[int, str],
                in_file: Counter, ann_fields: Sequence[str] | None = None) -> ReadResult:
    head = image_head(img, pos, dataset, split, rel_file, data_root, check_files, seen, in_file)
    if isinstance(head, Reject):
        return head
    head["annotations"] = image_annotations(anns_by_image.get(head["image_id"], []), float(head["height"]), rules,
                                            ann_fields)
    return head


def image_head(img: object, pos: int, dataset: str, split: str, rel_file: str, data_root: str | os.PathLike,
               check_files: bool, seen: dict[int, str], in_file: Counter) -> ReadResult:
    """One image's item without its "annotations" (added last, as the item's last field), or its reject."""
    if not isinstance(img, dict) or isinstance(img.get("id"), bool) or not isinstance(img.get("id"), int):
        return read_reject(make_key("omni3d", dataset, "position", pos), "malformed_image",
                           f"{rel_file}: images[{pos}] has no integer 'id'")
    iid = img["id"]
    key = make_key("omni3d", dataset, str(iid))
    if in_file[iid] > 1:
        seen[iid] = rel_file
        return read_reject(key, "duplicate_image_id", f"{rel_file}: image id {iid} is used by {in_file[iid]} images "
                                                      "of the file: its annotations cannot be attributed")
    if iid in seen:
        return read_reject(key, "duplicate_image_id", f"{rel_file}: image id {iid} already read from {seen[iid]}")
    seen[iid] = rel_file
    fp = img.get("file_path")
    try:
        image_path = resolved_path(data_root, fp)
    except PathEscapesRoot as exc:
        return read_reject(key, "path_escapes_root", f"{rel_file}: image {iid}: {exc}")
    try:
        K = validate_intrinsics(img.get("K"))
    except CameraError as exc:
        return read_reject(key, "bad_intrinsics", f"{rel_file}: image {iid}: {exc}")
    w, h = img.get("width"), img.get("height")
    if any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 or x > MAX_IMAGE_SIDE for x in (w, h)):
        return read_reject(key, "bad_image_size", f"{rel_file}: image {iid}: width/height must be positive ints (at most {MAX_IMAGE_SIDE}), got {w!r}x{h!r}")
    if check_files and not os.path.isfile(image_path):
        return read_reject(key, "missing_image", f"{rel_file}: image {iid}: no file at {fp}")
    return {
        "key": key,
        "format": "omni3d",
        "source": {"dataset": dataset, "file": rel_file, "id": str(iid)},
        "image_path": image_path,
        "file_path": fp,
        "image_id": iid,
        "dataset_id": img.get("dataset_id"),
        "split": split,
        "width": w,
        "height": h,
        "K": K,
        "src_90_rotate": int(img.get("src_90_rotate") or 0),
        "src_flagged": bool(img.get("src_flagged", False)),
    }


def image_annotations(anns: Iterable[object], image_height: float, rules: IgnoreRules,
                      ann_fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """An image's annotations as its item holds them: each with `ignore` and `ignore_reasons`, trimmed to
    `ann_fields` when given (non-dict entries are skipped)."""
    out = []
    for a in anns:
        if not isinstance(a, dict):
            continue
        reasons = ignore_reasons(a, image_height, rules)
        if ann_fields is None:
            out.append({**a, "ignore": bool(reasons), "ignore_reasons": reasons})
        else:  # the same fields, values and order as trimming the full annotation above
            ours = {"ignore": bool(reasons), "ignore_reasons": reasons}
            out.append({f: ours[f] if f in ours else a[f] for f in ann_fields if f in ours or f in a})
    return out
