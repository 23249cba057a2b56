"""`gr3d audit perturb`: a copy of a build with controlled, recorded annotation noise.

Why: the audit says how noisy a corpus is; what that noise costs is a training question. Train
on a copy with known extra noise (box jitter, dropped annotations, boxes swapped between objects)
and compare. Every change is recorded per unit in `OUT/perturbations.parquet` and summarized in
the copy's manifest config (`perturbation`), so the injected noise is known exactly, not just its
rate: the audit of the copy must measure precisely what the table says was injected.

Units: the mentions of cot samples and the objects of det3d samples (their 2D boxes). Point-map
samples are copied unchanged. Per sample, with an RNG seeded by (seed, key) (so the result does
not depend on shard order or workers):
1. drop (probability `drop` per unit): a cot mention loses its `<bbox>..</bbox><region>` and its
   `mentions` entry (the words stay); a det3d object leaves `objects`, its region_to_3d round and
   its detect_3d answer line (an emptied conversation goes; at least one object is kept);
2. swap (share `swap` of the remaining units, in expectation, in samples with two or more): k ~
   Binomial(n, swap) units (k = 1 becomes 2 or 0 with equal odds: one unit cannot swap alone)
   pass their boxes round in a random cycle, so each gets another unit's box;
3. jitter (every remaining unit, when `box_jitter` > 0): each corner coordinate moves by
   N(0, box_jitter x box width or height), clipped to the image and re-ordered.
Text boxes are rewritten with the same number of decimals, so text and record always agree. The
copy is written through `ShardWriter` and `finalize`, carries the source's rejects and
intermediates, and passes `gr3d shards verify`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.audit.load import AuditInputError, _iter_tar
from schemas.boxes import box_iou
from shards.layout import BUILD_OUTPUTS, BuildLayout, stats_path, tar_path

__all__ = ["PERTURB_VERSION", "PERTURBATIONS_FILE", "PerturbError", "perturb_build", "perturb_record"]

PERTURB_VERSION = "perturb-v1"
PERTURBATIONS_FILE = "perturbations.parquet"
_OUTPUTS = (*BUILD_OUTPUTS, PERTURBATIONS_FILE)


class PerturbError(ValueError):
    """A record whose text and annotations cannot be perturbed consistently (names the key), or bad arguments."""


def _rng(seed: int, key: str) -> np.random.Generator:
    h = hashlib.sha256(f"gr3d-perturb:{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _decimals(box_text: str) -> int:
    """Decimals of the first number in `<bbox>[0.123, ...]</bbox>` (3 when it has none)."""
    inner = box_text[box_text.index("[") + 1:].split(",")[0].strip()
    return len(inner.split(".")[1]) if "." in inner else 3


def _jitter(box: Sequence[float], sigma: float, rng: np.random.Generator) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    n = rng.normal(0.0, 1.0, 4)
    nx1, nx2 = x1 + n[0] * sigma * w, x2 + n[2] * sigma * w
    ny1, ny2 = y1 + n[1] * sigma * h, y2 + n[3] * sigma * h
    xs = sorted(min(1.0, max(0.0, v)) for v in (nx1, nx2))
    ys = sorted(min(1.0, max(0.0, v)) for v in (ny1, ny2))
    return [xs[0], ys[0], xs[1], ys[1]]


def _plan(n: int, drop: float, swap: float, sigma: float, rng: np.random.Generator,
          boxes: Sequence[Sequence[float]], eligible: Sequence[bool], keep_one: bool
          ) -> tuple[list[bool], list[int | None], list[list[float]], list[bool]]:
    """(dropped, swapped_with, new boxes, jittered) for n units; draws happen in a fixed order."""
    u_drop = rng.random(n)
    dropped = [bool(eligible[i] and u_drop[i] < drop) for i in range(n)]
    if keep_one and n and all(dropped):  # ineligible units are never dropped, so all() means none would be left
        dropped[0] = False
    alive = [i for i in range(n) if not dropped[i] and eligible[i]]
    # k ~ Binomial(alive, swap); a lone swap is impossible, so k = 1 becomes 2 or 0 with equal odds
    # (same expectation): the swapped share stays `swap` in samples with two or more units.
    k = int(rng.binomial(len(alive), swap)) if alive else 0
    if k == 1:
        k = 2 if rng.random() < 0.5 else 0
    if len(alive) < 2:
        k = 0
    sel = sorted(int(i) for i in rng.choice(alive, size=k, replace=False)) if k else []
    swapped: list[int | None] = [None] * n
    new = [[float(v) for v in b] for b in boxes]
    if len(sel) >= 2:
        order = [sel[int(j)] for j in rng.permutation(len(sel))]
        for a, b in zip(order, order[1:] + order[:1]):
            swapped[a] = b
            new[a] = [float(v) for v in boxes[b]]
    jittered = [False] * n
    if sigma > 0:
        for i in alive:
            new[i] = _jitter(new[i], sigma, rng)
            jittered[i] = True
    return dropped, swapped, new, jittered


def _grounded_in(text: str) -> list[Any]:
    from schemas.grammar import find_grounded

    return find_grounded(text)


def _perturb_cot(rec: dict[str, Any], params: Mapping[str, float], rng: np.random.Generator
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from schemas.grammar import REGION, format_bbox2d

    key = rec["key"]
    mentions = rec.get("mentions", [])
    where: list[tuple[int, int, Any]] = []  # (conversation, turn, Grounded) of each region box, in order
    for ci, conv in enumerate(rec["conversations"]):
        for ti, t in enumerate(conv["turns"]):
            if t["from"] == "gpt":
                where += [(ci, ti, g) for g in _grounded_in(t["value"]) if g.has_region]
    if len(where) != len(mentions):
        raise PerturbError(f"{key}: {len(where)} region boxes in the gpt turns but {len(mentions)} mentions; "
                           "cannot tell which box belongs to which mention")
    n = len(mentions)
    boxes = [m["bbox2d"] for m in mentions]
    dropped, swapped, new, jittered = _plan(n, params["drop"], params["swap"], params["box_jitter"], rng, boxes,
                                            [True] * n, keep_one=False)
    out = {**rec, "conversations": [dict(c, turns=[dict(t) for t in c["turns"]]) for c in rec["conversations"]]}
    edits: dict[tuple[int, int], list[tuple[int, int, str]]] = {}
    for i, (ci, ti, g) in enumerate(where):
        text = rec["conversations"][ci]["turns"][ti]["value"]
        nd = _decimals(text[g.start:g.end])
        if dropped[i]:
            edits.setdefault((ci, ti), []).append((g.start, g.end + len(REGION), ""))
        elif new[i] != [float(v) for v in boxes[i]]:
            edits.setdefault((ci, ti), []).append((g.start, g.end, format_bbox2d(new[i], nd)))
    for (ci, ti), es in edits.items():
        v = out["conversations"][ci]["turns"][ti]["value"]
        for s, e, rep in sorted(es, reverse=True):
            v = v[:s] + rep + v[e:]
        out["conversations"][ci]["turns"][ti]["value"] = v
    new_mentions, rows, j = [], [], 0
    for i, m in enumerate(mentions):
        changed = dropped[i] or swapped[i] is not None or jittered[i]
        if not dropped[i]:
            new_mentions.append({**m, "bbox2d": new[i]})
        if changed:
            rows.append(_row(key, "cot", "mention", i, None if dropped[i] else j, m["category"], dropped[i],
                             swapped[i], jittered[i], boxes[i], None if dropped[i] else new[i]))
        if not dropped[i]:
            j += 1
    out["mentions"] = new_mentions
    return out, rows


def _perturb_det3d(rec: dict[str, Any], params: Mapping[str, float], rng: np.random.Generator,
                   attempt_drop: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from schemas.grammar import format_bbox2d

    key = rec["key"]
    objs = rec.get("objects", [])
    n = len(objs)
    texts = [t["value"] for c in rec["conversations"] for t in c["turns"]]
    box_texts = [t[g.start:g.end] for t in texts for g in _grounded_in(t)]
    nd = _decimals(box_texts[0]) if box_texts else 3
    strings = [format_bbox2d(o["bbox2d"], nd) for o in objs]
    count = Counter(strings)
    eligible = [count[s] == 1 for s in strings]  # two objects with one text box: cannot tell them apart
    boxes = [o["bbox2d"] for o in objs]
    drop = params["drop"] if attempt_drop else 0.0
    dropped, swapped, new, jittered = _plan(n, drop, params["swap"], params["box_jitter"], rng, boxes, eligible,
                                            keep_one=True)
    unit_of = {s: i for i, s in enumerate(strings) if eligible[i]}

    def rewrite(text: str) -> tuple[str, bool]:
        """Text with every known box replaced; True when it names a dropped object."""
        hit_dropped = False
        parts, pos = [], 0
        for g in _grounded_in(text):
            i = unit_of.get(text[g.start:g.end])
            if i is None:
                continue
            if dropped[i]:
                hit_dropped = True
                continue
            parts.append(text[pos:g.start] + format_bbox2d(new[i], nd))
            pos = g.end
        parts.append(text[pos:])
        return "".join(parts), hit_dropped

    convs = []
    for c in rec["conversations"]:
        turns = c["turns"]
        if c["task"] == "detect_3d":
            ans, keep_lines = turns[1]["value"].split("\n"), []
            for line in ans:
                new_line, gone = rewrite(line)
                if not gone:
                    keep_lines.append(new_line)
            if keep_lines:
                convs.append({**c, "turns": [dict(turns[0]), {**turns[1], "value": "\n".join(keep_lines)}]})
        else:
            kept: list[dict[str, Any]] = []
            for k in range(0, len(turns), 2):
                pair = turns[k:k + 2]
                new_pair, gone = [], False
                for t in pair:
                    v, g = rewrite(t["value"])
                    gone |= g
                    new_pair.append({**t, "value": v})
                if not gone:
                    kept += new_pair
            if kept:
                convs.append({**c, "turns": kept})
    if not convs:
        if attempt_drop and any(dropped):  # every conversation named a dropped object: keep them all instead
            return _perturb_det3d(rec, params, _rng(int(params["seed"]), key), attempt_drop=False)
        raise PerturbError(f"{key}: perturbing left no conversation")
    out = {**rec, "conversations": convs,
           "objects": [{**o, "bbox2d": new[i]} for i, o in enumerate(objs) if not dropped[i]]}
    rows, j = [], 0
    for i, o in enumerate(objs):
        if dropped[i] or swapped[i] is not None or jittered[i]:
            rows.append(_row(key, "det3d", "object", i, None if dropped[i] else j, o["category"], dropped[i],
                             swapped[i], jittered[i], boxes[i], None if dropped[i] else new[i]))
        if not dropped[i]:
            j += 1
    return out, rows


def _row(key: str, corpus: str, unit: str, index: int, new_index: int | None, category: str, dropped: bool,
         swapped_with: int | None, jittered: bool, old: Sequence[float], new: Sequence[float] | None) -> dict[str, Any]:
    old_l = [float(v) for v in old]
    new_l = None if new is None else [float(v) for v in new]
    return {"key": key, "corpus": corpus, "unit": unit, "index": index, "new_index": new_index, "category": category,
            "dropped": dropped, "swapped_with": swapped_with, "jittered": jittered, "old_box": old_l, "new_box": new_l,
            "iou": 0.0 if new_l is None else box_iou(old_l, new_l)}


def perturb_record(rec: dict[str, Any], *, box_jitter: float = 0.0, drop: float = 0.0, swap: float = 0.0,
                   seed: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(perturbed copy of one record, one row per changed unit); pure and deterministic in (seed, key)."""
    params = {"box_jitter": float(box_jitter), "drop": float(drop), "swap": float(swap), "seed": int(seed)}
    rng = _rng(seed, rec["key"])
    if rec["corpus"] == "cot":
        return _perturb_cot(rec, params, rng)
    if rec["corpus"] == "det3d":
        return _perturb_det3d(rec, params, rng)
    return rec, []


def _check_args(box_jitter: float, drop: float, swap: float) -> None:
    if not (box_jitter >= 0 and np.isfinite(box_jitter)):
        raise PerturbError(f"--box-jitter must be a finite number >= 0, got {box_jitter}")
    for name, p in (("drop", drop), ("swap", swap)):
        if not 0.0 <= p <= 1.0:
            raise PerturbError(f"--{name} must be a probability in [0, 1], got {p}")


def perturb_build(src: str | os.PathLike[str], out: str | os.PathLike[str], *, box_jitter: float = 0.0,
                  drop: float = 0.0, swap: float = 0.0, seed: int = 0, overwrite: bool = False,
                  verify: bool = True) -> dict[str, Any]:
    """Write the perturbed copy of build `src` to `out`; returns the `perturbation` summary of its manifest.

    Refuses to write into `src` or over a non-empty `out` (unless `overwrite`, which removes only
    build outputs there). With `verify`, the source must pass `shards.verify` and so must the copy.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import jsonio
    from shards.layout import rejects_path
    from shards.manifest import code_version, finalize
    from shards.verify import verify_build
    from shards.writer import Sample, ShardWriter, write_parquet

    _check_args(box_jitter, drop, swap)
    src_p, out_p = Path(src).resolve(), Path(out).resolve()
    if src_p == out_p or src_p in out_p.parents:
        raise PerturbError(f"--out {out_p} must not be the source build or inside it")
    manifest_path = src_p / "manifest.json"
    if not manifest_path.is_file():
        raise AuditInputError(f"{manifest_path}: missing: {src_p} is not a finalized build")
    src_manifest = jsonio.loads(manifest_path.read_bytes())
    if verify:
        problems = verify_build(src_p)
        if problems:
            shown = "\n  ".join(str(src_p / str(p)) for p in problems[:20])
            raise AuditInputError(f"{src_p} fails `gr3d shards verify` ({len(problems)} problems):\n  {shown}")
    if out_p.exists() and any(out_p.iterdir()):
        if not overwrite:
            raise PerturbError(f"{out_p} is not empty; pass --overwrite to replace the build there")
        BuildLayout(out_p).remove_outputs(_OUTPUTS)
    out_p.mkdir(parents=True, exist_ok=True)

    params = {"box_jitter": float(box_jitter), "drop": float(drop), "swap": float(swap), "seed": int(seed)}
    all_rows: list[dict[str, Any]] = []
    n_units: Counter[str] = Counter()
    for sh in src_manifest["shards"]:
        i = int(sh["shard"])
        tar = tar_path(src_p, i)
        stats = jsonio.loads(stats_path(src_p, i).read_bytes())
        rej = pq.read_table(rejects_path(src_p, i)).to_pylist()
        w = ShardWriter(out_p, i)
        shard_rows: list[dict[str, Any]] = []
        try:
            for s in _iter_tar(tar):
                rec = s["json"]
                n_units[rec["corpus"]] += len(rec.get("mentions") or rec.get("objects") or [])
                new_rec, rows = perturb_record(rec, **params)
                for r in rows:
                    r["shard"] = i
                shard_rows += rows
                ext = rec["image"]["ext"]
                arrays = {name: s[f"{name}.npy"] for name in rec.get("arrays", [])}
                w.add(Sample(rec["key"], s[ext], ext, new_rec, arrays))
            extra = {"stages": (stats.get("extra") or {}).get("stages", {}),
                     "perturbation": _counts(shard_rows)}
            w.close(extra, rejects=[{k: r[k] for k in ("key", "stage", "reason", "message")} for r in rej],
                    n_input=int(stats["n_input"]))
        except BaseException:
            w.abort()
            raise
        all_rows += shard_rows

    inter = src_p / "intermediate"
    if inter.is_dir():
        shutil.copytree(inter, out_p / "intermediate", ignore=shutil.ignore_patterns(".*"))
    table = pa.Table.from_pylist(sorted(all_rows, key=lambda r: (r["shard"], r["key"], r["unit"], r["index"])),
                                 schema=_ROWS_SCHEMA())
    rows_sha = write_parquet(out_p / PERTURBATIONS_FILE, table)
    summary = {"version": PERTURB_VERSION, **params, "source": str(src_p),
               "source_manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest(),
               "units": dict(sorted(n_units.items())), "counts": _counts(all_rows),
               "file": PERTURBATIONS_FILE, "file_sha256": rows_sha}
    config = {**dict(src_manifest.get("config") or {}), "perturbation": summary}
    finalize(out_p, config, code_version(), run_info={"perturbed_from": str(src_p)})
    if verify:
        problems = verify_build(out_p)
        if problems:  # pragma: no cover - would be a bug here, not bad input
            raise PerturbError(f"the perturbed copy {out_p} fails verification: {problems[:5]}")
    return summary


def _counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    alive = [r for r in rows if not r["dropped"]]
    return {"rows": len(rows), "dropped": sum(r["dropped"] for r in rows),
            "swapped": sum(r["swapped_with"] is not None for r in alive),
            "jittered": sum(bool(r["jittered"]) for r in alive),
            "iou_below_0_5": sum(r["iou"] < 0.5 for r in alive)}


def _ROWS_SCHEMA() -> Any:
    import pyarrow as pa

    box = pa.list_(pa.float64())
    return pa.schema([
        pa.field("shard", pa.int32(), nullable=False), pa.field("key", pa.string(), nullable=False),
        pa.field("corpus", pa.string(), nullable=False), pa.field("unit", pa.string(), nullable=False),
        pa.field("index", pa.int32(), nullable=False), pa.field("new_index", pa.int32()),
        pa.field("category", pa.string(), nullable=False), pa.field("dropped", pa.bool_(), nullable=False),
        pa.field("swapped_with", pa.int32()), pa.field("jittered", pa.bool_(), nullable=False),
        pa.field("old_box", box, nullable=False), pa.field("new_box", box), pa.field("iou", pa.float64(), nullable=False),
    ])
