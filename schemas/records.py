"""JSON Schemas of every record a build writes, and `validate(kind, record)`.

The schemas (`schemas/json/KIND.schema.json`, JSON Schema 2020-12, shared parts in
`common.schema.json#/$defs`) are the contract between the corpus builders, the shard writer,
the audit and the model's loader. The writer refuses any record that breaks them, and
`gr3d shards verify` re-checks every record in a finished build, so the model never meets a
record shape it was not written for.

A few rules cannot be said in JSON Schema (box corner order, `scale == 1000 / fx`, alternating
human/gpt turns, no NaN); they are checked here in Python after the schema and reported the
same way: the field path and the rule.

numpy + jsonschema only (see `schemas/__init__.py`).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
import orjson
from jsonschema.exceptions import best_match

__all__ = ["KINDS", "SAMPLE_KINDS", "SchemaError", "format_path", "schema", "validate"]

#: Sample records: the `corpus` field of a KEY.json equals its kind.
SAMPLE_KINDS: tuple[str, ...] = ("det3d", "pointmap", "cot")
#: Every kind `validate` knows.
KINDS: tuple[str, ...] = (*SAMPLE_KINDS, "reject", "shard_stats", "manifest", "audit")

_COMMON = "common"
_MAX_REPORTED = 5
_SCALE_RTOL = 1e-6


class SchemaError(ValueError):
    """A record breaks its schema. `path` is the first offending field (e.g. `objects[2].box3d.dimensions`),
    `problems` every (path, message) found (at most a few)."""

    def __init__(self, kind: str, problems: Sequence[tuple[str, str]]):
        self.kind = kind
        self.problems = list(problems)
        self.path = self.problems[0][0] if self.problems else ""
        shown = "; ".join(f"{p}: {m}" for p, m in self.problems[:_MAX_REPORTED])
        more = len(self.problems) - _MAX_REPORTED
        if more > 0:
            shown += f"; ... and {more} more"
        super().__init__(f"invalid {kind} record: {shown}")


def format_path(parts: Iterable[str | int]) -> str:
    """`["objects", 2, "box3d"]` -> `objects[2].box3d`; the root is `<record>`."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "<record>"


def _load_json(name: str) -> dict[str, Any]:
    ref = resources.files("schemas") / "json" / f"{name}.schema.json"
    try:
        return json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError as e:  # pragma: no cover - packaging error
        raise RuntimeError(f"schema file {name}.schema.json is missing from the schemas package") from e


def schema(kind: str) -> dict[str, Any]:
    """The (cached) schema document of `kind`; raises `SchemaError` for an unknown kind."""
    if kind not in KINDS:
        raise SchemaError(str(kind), [("<kind>", f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")])
    return _validator(kind).schema


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    # The schema documents themselves are checked against the 2020-12 metaschema by the test suite
    # (tests/test_records.py), not here: that check cost ~0.25 s of CPU in every process that writes.
    doc = _load_json(kind)
    # Validating every written record is on the builders' hot path; resolving `$ref`s through the
    # registry at each use costs about half the validation time, so they are inlined once here.
    return jsonschema.Draft202012Validator(_inline_refs(doc, doc))


@functools.cache
def _fast_validator(kind: str) -> Any:
    """A compiled (fastjsonschema) predicate equivalent to the kind's schema, or jsonschema's own check.

    fastjsonschema knows draft-07, not 2020-12: the inlined schema is translated (`prefixItems` -> a
    draft-07 `items` array, `$defs`/`$schema`/`$id` dropped). It only decides valid/invalid; an invalid
    record is then re-checked by jsonschema, whose error names the field. tests/test_records.py holds the
    two to the same verdict on every broken-record case.
    """
    try:
        import fastjsonschema
    except ImportError:  # pragma: no cover - a declared dependency; fall back to the slow exact check
        return _validator(kind).is_valid
    compiled = fastjsonschema.compile(_to_draft7(_validator(kind).schema), use_default=False)

    def is_valid(record: Any) -> bool:
        try:
            compiled(record)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return is_valid


def _to_draft7(node: Any) -> Any:
    if isinstance(node, list):
        return [_to_draft7(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_draft7(v) for k, v in node.items() if k not in ("$defs", "$schema", "$id", "prefixItems")}
    if "prefixItems" in node:
        out["items"] = [_to_draft7(x) for x in node["prefixItems"]]
        extra = node.get("items", True)
        out["additionalItems"] = _to_draft7(extra)
    out["$schema"] = "http://json-schema.org/draft-07/schema#" if "$schema" in node else None
    if out["$schema"] is None:
        del out["$schema"]
    return out


def _inline_refs(node: Any, root: dict[str, Any]) -> Any:
    """A copy of a schema with every `$ref` (local `#/...` or `common.schema.json#/...`) replaced by its target."""
    if isinstance(node, list):
        return [_inline_refs(x, root) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline_refs(v, root) for k, v in node.items() if k != "$ref"}
    ref = node.get("$ref")
    if ref is None:
        return out
    doc_name, _, pointer = ref.partition("#")
    doc = root if not doc_name else _load_json(doc_name.removesuffix(".schema.json"))
    target: Any = doc
    for part in filter(None, pointer.split("/")):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    target = _inline_refs(target, doc)
    if not out:
        return target
    return {**out, "allOf": [*out.get("allOf", []), target]}


def validate(kind: str, record: Any) -> None:
    """Check `record` against the schema of `kind` and the Python-side rules.

    Raises `SchemaError` whose message names the field path and the broken rule, e.g.
    `invalid det3d record: objects[2].box3d.dimensions[0]: -1.0 is less than or equal to the minimum of 0 [exclusiveMinimum]`.
    """
    v = _validator(kind) if kind in KINDS else schema(kind)  # schema() raises the unknown-kind error
    problems = [] if _surely_finite(record) else list(_non_finite(record, []))
    if problems:
        raise SchemaError(kind, problems)
    if _fast_validator(kind)(record):  # compiled check: the common case (valid) costs ~10x less
        errors = []
    else:
        errors = list(v.iter_errors(record))
    if errors:
        first = best_match(errors)
        rest = sorted((e for e in errors if e is not first), key=lambda e: [str(p) for p in e.absolute_path])
        raise SchemaError(kind, [_describe(e) for e in [first, *rest]])
    problems = list(_semantic(kind, record))
    if problems:
        raise SchemaError(kind, problems)


def _describe(err: jsonschema.ValidationError) -> tuple[str, str]:
    # Descend into anyOf/oneOf to the most relevant sub-error so the path points at the real field.
    while err.context:
        err = best_match(err.context)
    msg = err.message
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return format_path(err.absolute_path), f"{msg} [{err.validator}]"


def _surely_finite(record: Any) -> bool:
    """True when `record` is plain JSON data without NaN or infinities, found in C (~10x faster than walking it
    with `_non_finite`): orjson writes a NaN or infinity as `null`, which reads back unequal to it. False
    for anything orjson cannot write (numpy values, bad keys) or that reads back otherwise (tuples): then
    `_non_finite` walks the record and names the field."""
    try:
        return orjson.loads(orjson.dumps(record)) == record
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return False


def _non_finite(obj: Any, path: list[str | int]) -> Iterator[tuple[str, str]]:
    """NaN/Inf are not JSON and would make the schema's numeric rules silently pass or fail oddly."""
    if isinstance(obj, float | np.floating):
        if not math.isfinite(float(obj)):
            yield format_path(path), f"non-finite number {obj!r} [finite]"
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _non_finite(v, [*path, str(k)])
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _non_finite(v, [*path, i])
    elif isinstance(obj, np.ndarray) and obj.dtype.kind == "f" and not np.isfinite(obj).all():
        yield format_path(path), "array holds non-finite numbers [finite]"


def _semantic(kind: str, rec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Rules JSON Schema cannot express. Only called on records that passed the schema."""
    if kind not in SAMPLE_KINDS:
        return
    cam = rec.get("camera")
    if cam is not None:
        fx = float(cam["K"][0][0])
        expected = 1000.0 / fx
        if not math.isclose(float(cam["scale"]), expected, rel_tol=_SCALE_RTOL):
            yield "camera.scale", f"{cam['scale']} != 1000 / fx = {expected} [scale_is_1000_over_fx]"
    for list_name in ("objects", "mentions"):
        for i, item in enumerate(rec.get(list_name, [])):
            x1, y1, x2, y2 = item["bbox2d"]
            if x1 > x2 or y1 > y2:
                yield format_path([list_name, i, "bbox2d"]), f"{item['bbox2d']} is not x1 <= x2, y1 <= y2 [ordered_xyxy]"
    seen_detect: dict[str, int] = {}
    for ci, conv in enumerate(rec["conversations"]):
        for ti, turn in enumerate(conv["turns"]):
            want = "human" if ti % 2 == 0 else "gpt"
            if turn["from"] != want:
                yield (format_path(["conversations", ci, "turns", ti, "from"]),
                       f"{turn['from']!r} where {want!r} was expected: turns alternate human, gpt [alternating_turns]")
                break
        if len(conv["turns"]) % 2:
            yield format_path(["conversations", ci, "turns"]), "the last turn must be the gpt answer [alternating_turns]"
        if conv["task"] == "detect_3d":
            cat = conv["category"]
            if cat in seen_detect:
                yield (format_path(["conversations", ci, "category"]),
                       f"second detect_3d conversation for {cat!r} (first: conversations[{seen_detect[cat]}]) "
                       "[one_detect_3d_per_category]")
            seen_detect.setdefault(cat, ci)
