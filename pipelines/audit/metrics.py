"""The audit's numbers: funnel, annotator agreement, rewrites, box / 3D / point-map distributions.

Every function takes a `load.BuildData` and returns plain JSON-able dicts (they go to `audit.json`
as they are, and the plots draw exactly these numbers).

Agreement with ground truth (cot on the sample world). A written mention is matched to its
ground-truth row by (record id, mention span): the span comes from the assign intermediate (the
entity spans the builder grounded) or, without intermediates, from the ground truth's own spans
of that turn, aligned in text order; a span that is not in the ground truth takes the row of the
same turn it overlaps most (the oracle's own rule). Then:
- precision@0.5: written mentions whose box has IoU >= 0.5 with their ground-truth box / written
  mentions (a written mention without a ground-truth row counts as wrong: it grounds something the
  world does not call an object);
- recall@0.5: ground-truth mentions of answer (gpt) turns of the records the build saw (written, or
  present in an intermediate) that have a written mention with IoU >= 0.5 / all of those;
- per category, and the IoU histograms of the written boxes, of the tagger's candidates (first and
  best) and of the verifier's choice, all against the ground truth, plus the written boxes against
  the tagger's candidates (how far the corpus moved from the raw Florence-2 output).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.audit.load import BuildData
from schemas.boxes import box_iou

__all__ = [
    "IOU_THRESHOLD",
    "agreement",
    "boxes2d",
    "compute_audit",
    "det3d_stats",
    "funnel",
    "histogram",
    "mention_turns",
    "pointmap_stats",
    "rewrite_stats",
    "robust_z",
    "select_gallery",
    "summary",
    "wilson_interval",
    "wilson_score",
    "written_mentions",
]

IOU_THRESHOLD = 0.5
ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
# MAD floors on log values. A category's sizes naturally vary by tens of percent, and a build often
# holds the same few objects seen from many views (MAD ~ 0): without a floor a 10% larger desk would
# be an "outlier". With these floors a flag needs a side ~2.8x (volume ~13x, depth ~2.8x) off the median.
LOG_MIN_MAD = 0.2
LOG_VOLUME_MIN_MAD = 0.5
MIN_GROUP_FOR_Z = 5  # fewer values than this: a MAD is meaningless, no z-score outliers
IOU_EDGES = [round(0.05 * i, 2) for i in range(21)]
STAGE_ORDER = ["read", "det3d_read", "read_frame", "tag", "verify", "assign", "rewrite", "det3d_convert",
               "sample_points", "verbalize", "compose"]
GROUNDED = ("grounded", "coreferent")
MAX_LISTED = 200  # outliers / worst examples listed per table in audit.json
MAX_SCATTER = 20000  # objects drawn in the depth/volume scatter


# ============================================================================ small helpers
def robust_z(x: Sequence[float] | np.ndarray, min_mad: float = 0.0) -> np.ndarray:
    """Modified z-score 0.6745 (x - median) / MAD: outlier scores that a few outliers cannot mask.

    `min_mad` floors the MAD: the same object seen in many views has nearly identical sizes, and a
    MAD of float noise would make a 1 mm difference an "outlier" (see LOG_MIN_MAD). With
    MAD = 0 and no floor the mean absolute deviation stands in (x 1.2533, the normal-consistent
    factor); if that is 0 too every score is 0.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return a
    med = np.median(a)
    mad = max(float(np.median(np.abs(a - med))), min_mad)
    if mad > 0:
        return 0.6745 * (a - med) / mad
    meanad = np.mean(np.abs(a - med))
    if meanad > 0:
        return (a - med) / (1.2533 * meanad)
    return np.zeros_like(a)


def histogram(values: Iterable[float], edges: Sequence[float]) -> dict[str, list[float] | list[int]]:
    """Counts per bin [e_i, e_i+1) (the last bin closed), values outside counted in the end bins."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    v = np.clip(v, e[0], e[-1])
    counts, _ = np.histogram(v, bins=e)
    return {"edges": [float(x) for x in e], "counts": [int(c) for c in counts]}


def auto_edges(values: Sequence[float], bins: int = 30, lo: float | None = None, hi: float | None = None) -> list[float]:
    """Bin edges over [lo or p0.5, hi or p99.5] so one wild value does not flatten the histogram."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return [0.0, 1.0]
    a = float(np.quantile(v, 0.005)) if lo is None else lo
    b = float(np.quantile(v, 0.995)) if hi is None else hi
    if b <= a:
        b = a + 1.0
    return [float(x) for x in np.linspace(a, b, bins + 1)]


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, mean, min, p05, median, p95, max of the finite values (None when there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "min": None, "p05": None, "median": None, "p95": None, "max": None}
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return {"n": int(v.size), "mean": float(v.mean()), "min": float(v.min()), "p05": float(q[0]),
            "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def _ratio(k: int, n: int) -> float | None:
    return None if n == 0 else k / n


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (default 95%); (0, 1) when n = 0.

    Why Wilson: with accuracies near 1 (the paper: 95.5% of 200) the normal interval overshoots 1
    and collapses to zero width at 100%; Wilson's stays inside [0, 1] and keeps its coverage.
    """
    if n <= 0:
        return 0.0, 1.0
    return wilson_score(k / n, n, z)


def wilson_score(p: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson interval for an observed proportion `p` over `n` (n may be an effective, fractional size)."""
    z2 = z * z
    den = 1 + z2 / n
    center = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z2 / (4 * n * n)) / den
    return max(0.0, center - half), min(1.0, center + half)


def _json_list(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def _ok_rows(b: BuildData, stage: str) -> list[dict[str, Any]]:
    return [r for r in b.intermediates.get(stage, []) if r.get("_outcome", "ok") == "ok"]


# ============================================================================ funnel
def _stage_order(names: Iterable[str], counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    known = [s for s in STAGE_ORDER if s in names]
    rest = sorted((s for s in names if s not in STAGE_ORDER), key=lambda s: (-counts[s]["in"], s))
    return known + rest


def funnel(b: BuildData) -> dict[str, Any]:
    """Inputs -> each stage -> written, rejects by (stage, reason); for cot, sample and mention steps.

    Stage counts come from the shards' stats (every builder records them); the cot steps come from
    the intermediates: samples whose mentions all got candidates, all a verifier choice, that were
    kept by the one-to-one assignment, that survived the rewrite, and that were written.
    """
    totals = dict(b.manifest.get("totals") or {})
    stage_counts: dict[str, dict[str, int]] = {}
    for st in b.stats:
        for name, c in ((st.get("extra") or {}).get("stages") or {}).items():
            acc = stage_counts.setdefault(name, {"in": 0, "out": 0, "rejected": 0})
            for k in acc:
                acc[k] += int(c.get(k, 0))
    stages = [{"stage": s, **stage_counts[s]} for s in _stage_order(stage_counts, stage_counts)]
    rej = Counter((r["stage"], r["reason"]) for r in b.rejects)
    rejects = [{"stage": s, "reason": r, "count": c} for (s, r), c in sorted(rej.items(), key=lambda x: (-x[1], x[0]))]
    n_input = int(totals.get("n_input", len(b.records) + len({r["key"] for r in b.rejects})))
    steps = [{"step": "inputs", "count": n_input}]
    mention_steps: list[dict[str, Any]] | None = None
    if "tag" in b.intermediates:
        tag = _ok_rows(b, "tag")
        ents: dict[tuple[str, int], int] = {}
        for r in tag:
            ents[(r["key"], int(r["mention_index"]))] = int(r["n_candidates"] or 0)
        keys_read = {k for k, _ in ents}
        with_cands = {k for k in keys_read if all(n > 0 for (kk, _), n in ents.items() if kk == k)}
        steps += [{"step": "mentions found", "count": len(keys_read)},
                  {"step": "candidates for every mention", "count": len(with_cands)}]
        mention_steps = [{"step": "mentions (entities)", "count": len(ents)},
                         {"step": "with candidates", "count": sum(1 for n in ents.values() if n > 0)}]
        if "verify" in b.intermediates:
            ver = _ok_rows(b, "verify")
            by_key: dict[str, list[str]] = defaultdict(list)
            for r in ver:
                by_key[r["key"]].append(r["decision"])
            steps.append({"step": "verifier chose for every mention",
                          "count": sum(1 for d in by_key.values() if d and all(x == "chosen" for x in d))})
            mention_steps.append({"step": "verifier chose a box", "count": sum(1 for r in ver if r["decision"] == "chosen")})
        if "assign" in b.intermediates:
            asg = _ok_rows(b, "assign")
            kept = {r["key"] for r in asg if r["sample_decision"] == "kept"}
            steps.append({"step": "assigned one-to-one (kept)", "count": len(kept)})
            mention_steps.append({"step": "grounded (assigned)", "count": sum(1 for r in asg if r["decision"] in GROUNDED)})
            mention_steps.append({"step": "grounded in kept samples",
                                  "count": sum(1 for r in asg if r["decision"] in GROUNDED and r["key"] in kept)})
        if "rewrite" in b.intermediates:
            rw = _ok_rows(b, "rewrite")
            failed = {r["key"] for r in rw if r.get("failure")}
            passed = {r["key"] for r in rw} - failed
            steps.append({"step": "rewrite ok", "count": len(passed)})
            mention_steps.append({"step": "rewritten", "count": sum(1 for r in rw if r.get("decision") == "rewritten")})
        mention_steps.append({"step": "written mentions (spans)",
                              "count": sum(len(r.get("mentions", [])) for r in b.records.values())})
    steps.append({"step": "written", "count": len(b.records)})
    for s in steps:
        s["fraction"] = _ratio(s["count"], n_input)
    return {"n_input": n_input, "n_written": len(b.records), "n_rejected": int(totals.get("n_rejected", 0)),
            "n_reject_rows": len(b.rejects), "stages": stages, "rejects": rejects, "steps": steps,
            "mention_steps": mention_steps}


# ============================================================================ cot: matching to ground truth
def mention_turns(record: Mapping[str, Any]) -> list[int] | None:
    """The turn index (over the concatenated turns of all conversations) of each record mention.

    The cot builder writes one `<bbox>..</bbox><region>` per mention, in mention order, in gpt
    turns; None when the counts disagree (a record this function cannot explain).
    """
    from schemas.grammar import find_grounded

    out: list[int] = []
    t = 0
    for conv in record.get("conversations", []):
        for turn in conv["turns"]:
            if turn["from"] == "gpt":
                out += [t] * sum(1 for g in find_grounded(turn["value"]) if g.has_region)
            t += 1
    return out if len(out) == len(record.get("mentions", [])) else None


def _align(mentions: Sequence[tuple[int, str]], spans: Sequence[tuple[int, int, str]]) -> dict[int, tuple[int, int]]:
    """Mentions (index, text) of one turn -> spans (start, end, text) of that turn, in text order.

    Equal text first (case-insensitive), then one text containing the other; a mention that finds
    nothing after the previous match stays unaligned (e.g. a mention the perturbation dropped
    leaves its span unused, and the next mention still finds its own).
    """
    out: dict[int, tuple[int, int]] = {}
    ptr = 0
    for idx, text in mentions:
        t = text.lower()
        hit = next((j for j in range(ptr, len(spans)) if spans[j][2].lower() == t), None)
        if hit is None:
            hit = next((j for j in range(ptr, len(spans))
                        if t in spans[j][2].lower() or spans[j][2].lower() in t), None)
        if hit is not None:
            out[idx] = (spans[hit][0], spans[hit][1])
            ptr = hit + 1
    return out


class _GT:
    """The ground truth's mention rows indexed by span and by (record, turn)."""

    def __init__(self, gt: Mapping[str, Any]) -> None:
        self.rows: list[dict[str, Any]] = []
        self.by_span: dict[tuple[str, int, int, int], int] = {}
        self.by_turn: dict[tuple[str, int], list[int]] = defaultdict(list)
        for r in gt.get("refspatial_mentions", []):
            i = len(self.rows)
            self.rows.append(r)
            rid = str(r.get("record_id", r.get("id")))
            self.by_span[(rid, int(r["turn"]), int(r["start"]), int(r["end"]))] = i
            self.by_turn[(rid, int(r["turn"]))].append(i)
        for v in self.by_turn.values():
            v.sort(key=lambda i: int(self.rows[i]["start"]))

    def lookup(self, rid: str, turn: int, start: int, end: int) -> int | None:
        i = self.by_span.get((rid, turn, start, end))
        if i is not None:
            return i
        best, best_ov = None, 0
        for j in self.by_turn.get((rid, turn), []):
            r = self.rows[j]
            ov = min(end, int(r["end"])) - max(start, int(r["start"]))
            if ov > best_ov:
                best, best_ov = j, ov
        return best

    def box_norm(self, i: int, width: int, height: int) -> list[float] | None:
        r = self.rows[i]
        px = r.get("bbox_px")
        if px is None:
            return None
        return [float(px[0]) / width, float(px[1]) / height, float(px[2]) / width, float(px[3]) / height]


def _entity_spans(b: BuildData) -> tuple[dict[tuple[str, int, int, int], tuple[str, int]],
                                         dict[str, dict[int, list[tuple[int, int, str]]]]]:
    """From the tag (else assign) intermediate: span -> (key, entity index), and per key the spans
    of grounded entities by turn (what the record's mentions were written from)."""
    span_to_entity: dict[tuple[str, int, int, int], tuple[str, int]] = {}
    grounded: dict[str, dict[int, list[tuple[int, int, str]]]] = defaultdict(lambda: defaultdict(list))
    for stage in ("tag", "assign"):
        for r in _ok_rows(b, stage):
            spans = _json_list(r.get("spans")) or []
            for turn, start, end, _text in spans:
                span_to_entity.setdefault((str(r["record_id"]), int(turn), int(start), int(end)),
                                          (r["key"], int(r["mention_index"])))
    for r in _ok_rows(b, "assign"):
        if r["decision"] in GROUNDED:
            for turn, start, end, text in _json_list(r.get("spans")) or []:
                grounded[r["key"]][int(turn)].append((int(start), int(end), str(text)))
    for per in grounded.values():
        for v in per.values():
            v.sort()
    return span_to_entity, grounded


def written_mentions(b: BuildData) -> list[dict[str, Any]]:
    """One row per written cot mention: its box, span, ground-truth row and IoUs (None where unknown)."""
    gt = _GT(b.ground_truth) if b.ground_truth is not None else None
    span_to_entity, grounded = _entity_spans(b)
    cands: dict[tuple[str, int], list[list[float]]] = defaultdict(list)
    for r in _ok_rows(b, "tag"):
        if r.get("box_norm") is not None:
            cands[(r["key"], int(r["mention_index"]))].append([float(v) for v in r["box_norm"]])
    out = []
    for key in b.keys_of("cot"):
        rec = b.records[key]
        rid = str(rec["source"].get("id", ""))
        w, h = rec["image"]["width"], rec["image"]["height"]
        turns = mention_turns(rec)
        mentions = rec.get("mentions", [])
        if turns is None:
            b.warnings.append(f"{key}: the region boxes of its gpt turns do not match its {len(mentions)} mentions; "
                              "its mentions could not be matched to spans")
        spans_of: dict[int, tuple[int, int]] = {}
        if turns is not None:
            by_turn: dict[int, list[tuple[int, str]]] = defaultdict(list)
            for i, (m, t) in enumerate(zip(mentions, turns)):
                by_turn[t].append((i, m["text"]))
            for t, ms in by_turn.items():
                if key in grounded:
                    spans = grounded[key].get(t, [])
                elif gt is not None:
                    spans = [(int(gt.rows[j]["start"]), int(gt.rows[j]["end"]), str(gt.rows[j]["text"]))
                             for j in gt.by_turn.get((rid, t), [])]
                else:
                    spans = []
                spans_of.update(_align(ms, spans))
        for i, m in enumerate(mentions):
            box = [float(v) for v in m["bbox2d"]]
            row: dict[str, Any] = {"key": key, "index": i, "record_id": rid, "text": m["text"],
                                   "category": m["category"], "rewritten": m.get("rewritten"), "box": box,
                                   "turn": turns[i] if turns is not None else None, "start": None, "end": None,
                                   "gt_row": None, "gt_box": None, "gt_category": None, "iou_gt": None,
                                   "entity": None, "iou_tagger": None}
            if i in spans_of:
                row["start"], row["end"] = spans_of[i]
                ent = span_to_entity.get((rid, row["turn"], row["start"], row["end"]))
                if ent is not None:
                    row["entity"] = ent[1]
                    cs = cands.get(ent, [])
                    row["iou_tagger"] = max((box_iou(box, c) for c in cs), default=0.0)
                if gt is not None:
                    j = gt.lookup(rid, row["turn"], row["start"], row["end"])
                    if j is not None:
                        row["gt_row"] = j
                        row["gt_category"] = gt.rows[j].get("category")
                        gb = gt.box_norm(j, w, h)
                        row["gt_box"] = gb
                        row["iou_gt"] = box_iou(box, gb) if gb is not None else 0.0
            if gt is not None and row["iou_gt"] is None:
                row["iou_gt"] = 0.0  # no ground-truth row: grounds something the world does not name
            out.append(row)
    return out


def _seen_records(b: BuildData) -> set[str]:
    ids = {str(r["source"].get("id", "")) for r in b.records.values() if r["corpus"] == "cot"}
    for stage_rows in b.intermediates.values():
        for r in stage_rows:
            if r.get("record_id") is not None:
                ids.add(str(r["record_id"]))
    return ids


def agreement(b: BuildData, rows: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """Tagger vs verifier vs written vs ground truth (see the module docstring); None without cot samples."""
    if not b.keys_of("cot") and "tag" not in b.intermediates:
        return None
    rows = written_mentions(b) if rows is None else rows
    out: dict[str, Any] = {"iou_threshold": IOU_THRESHOLD, "n_written": len(rows), "ground_truth": None,
                           "tagger": None, "verifier": None, "written_vs_tagger": None, "histograms": {}}
    thr = IOU_THRESHOLD
    # -- written vs tagger (no ground truth needed)
    wt = [r["iou_tagger"] for r in rows if r["iou_tagger"] is not None]
    if wt:
        out["written_vs_tagger"] = {"n": len(wt), "mean_iou": float(np.mean(wt)),
                                    "agree_at_0_5": sum(v >= thr for v in wt) / len(wt),
                                    "identical": sum(v >= 0.999 for v in wt) / len(wt)}
        out["histograms"]["written_vs_tagger"] = histogram(wt, IOU_EDGES)
    # -- tagger / verifier at entity level
    tag = _ok_rows(b, "tag")
    ver = {(r["key"], int(r["mention_index"])): r for r in _ok_rows(b, "verify")}
    ents: dict[tuple[str, int], dict[str, Any]] = {}
    for r in tag:
        e = ents.setdefault((r["key"], int(r["mention_index"])), {
            "record_id": str(r["record_id"]), "category": r["category"], "spans": _json_list(r.get("spans")) or [],
            "w": int(r.get("image_width") or 0), "h": int(r.get("image_height") or 0), "cands": {}})
        if r.get("candidate_index") is not None and r.get("box_norm") is not None:
            e["cands"][int(r["candidate_index"])] = [float(v) for v in r["box_norm"]]
    if ver:
        chosen = [v for v in ver.values() if v.get("choice") is not None]
        dec = Counter(v["decision"] for v in ver.values())
        first = [v for v in chosen if v.get("choice") == 0]
        confs = [float(v["confidence"]) for v in chosen if v.get("confidence") is not None]
        out["verifier"] = {"n": len(ver), "decisions": dict(sorted(dec.items())),
                           "chose_first_candidate": _ratio(len(first), len(chosen)),
                           "mean_confidence": float(np.mean(confs)) if confs else None}
    gt = _GT(b.ground_truth) if b.ground_truth is not None else None
    if gt is None:
        return out

    # -- written vs ground truth
    scope_ids = _seen_records(b)
    gt_scope = [j for j, r in enumerate(gt.rows)
                if str(r.get("record_id")) in scope_ids and int(r["turn"]) % 2 == 1 and r.get("bbox_px") is not None]
    hit_rows = {r["gt_row"] for r in rows if r["gt_row"] is not None and (r["iou_gt"] or 0) >= thr}
    n_tp_w = sum(1 for r in rows if (r["iou_gt"] or 0) >= thr)
    n_rec = sum(1 for j in gt_scope if j in hit_rows)
    per_cat: dict[str, dict[str, int]] = defaultdict(lambda: {"n_written": 0, "tp_written": 0, "n_gt": 0, "tp_gt": 0})
    for r in rows:
        c = per_cat[r["category"]]
        c["n_written"] += 1
        c["tp_written"] += int((r["iou_gt"] or 0) >= thr)
    for j in gt_scope:
        c = per_cat[str(gt.rows[j]["category"])]
        c["n_gt"] += 1
        c["tp_gt"] += int(j in hit_rows)
    ious = [r["iou_gt"] for r in rows if r["iou_gt"] is not None]
    worst = sorted((r for r in rows), key=lambda r: (r["iou_gt"] if r["iou_gt"] is not None else 2.0, r["key"], r["index"]))
    out["ground_truth"] = {
        "file": str(b.ground_truth_path) if b.ground_truth_path else None,
        "n_written": len(rows), "n_written_matched": sum(1 for r in rows if r["gt_row"] is not None),
        "n_written_correct": n_tp_w, "precision": _ratio(n_tp_w, len(rows)),
        "n_gt": len(gt_scope), "n_gt_recalled": n_rec, "recall": _ratio(n_rec, len(gt_scope)),
        "mean_iou": float(np.mean(ious)) if ious else None,
        "category_agreement": _ratio(sum(1 for r in rows if r["gt_category"] == r["category"]),
                                     sum(1 for r in rows if r["gt_category"] is not None)),
        "per_category": [{"category": c, **v, "precision": _ratio(v["tp_written"], v["n_written"]),
                          "recall": _ratio(v["tp_gt"], v["n_gt"])} for c, v in sorted(per_cat.items())],
        "worst": [{"key": r["key"], "index": r["index"], "text": r["text"], "category": r["category"],
                   "iou_gt": r["iou_gt"], "box": r["box"], "gt_box": r["gt_box"]}
                  for r in worst[:20] if (r["iou_gt"] or 0) < 1.0 - 1e-9],
    }
    out["histograms"]["written_vs_gt"] = histogram(ious, IOU_EDGES)

    # -- tagger and verifier vs ground truth, per entity
    top1, best, verif = [], [], []
    v_correct = v_n = v_chosen_ok = v_chosen = v_possible = v_possible_ok = 0
    for ek, e in ents.items():
        if not e["spans"] or not e["w"]:
            continue
        t, s, en, _ = e["spans"][0]
        j = gt.lookup(e["record_id"], int(t), int(s), int(en))
        if j is None:
            continue
        gb = gt.box_norm(j, e["w"], e["h"])
        if gb is None:
            continue
        cand_ious = [box_iou(e["cands"][k], gb) for k in sorted(e["cands"])]
        top1.append(cand_ious[0] if cand_ious else 0.0)
        best.append(max(cand_ious, default=0.0))
        v = ver.get(ek)
        if v is not None:
            possible = any(x >= thr for x in cand_ious)
            v_n += 1
            v_possible += int(possible)
            if v.get("chosen_box_norm") is not None:  # chose a box (even below the builder's confidence cut)
                iv = box_iou([float(x) for x in v["chosen_box_norm"]], gb)
                verif.append(iv)
                v_chosen += 1
                v_chosen_ok += int(iv >= thr)
                v_correct += int(iv >= thr)
                v_possible_ok += int(iv >= thr and possible)
            elif v.get("choice") is None and v["decision"] in ("none", "no_candidates") and not possible:
                v_correct += 1  # a correct refusal: no candidate was the object
    if top1:
        out["tagger"] = {"n_entities": len(top1), "top1_acc": sum(x >= thr for x in top1) / len(top1),
                         "best_of_k_acc": sum(x >= thr for x in best) / len(best),
                         "mean_top1_iou": float(np.mean(top1)), "mean_best_iou": float(np.mean(best))}
        out["histograms"]["tagger_top1_vs_gt"] = histogram(top1, IOU_EDGES)
        out["histograms"]["tagger_best_vs_gt"] = histogram(best, IOU_EDGES)
    if v_n:
        out["verifier"] = {**(out["verifier"] or {}), "n_with_gt": v_n, "accuracy": v_correct / v_n,
                           "precision": _ratio(v_chosen_ok, v_chosen), "recall": _ratio(v_possible_ok, v_possible)}
        out["histograms"]["verifier_vs_gt"] = histogram(verif, IOU_EDGES)
    return out


# ============================================================================ rewrites
def rewrite_stats(b: BuildData, n_examples: int = 12) -> dict[str, Any] | None:
    """How often mentions were rewritten, how long the rewrites are, what words they add, examples."""
    ms = [(k, i, m) for k in b.keys_of("cot") for i, m in enumerate(b.records[k].get("mentions", []))]
    if not ms and "rewrite" not in b.intermediates:
        return None
    rw = [(k, i, m) for k, i, m in ms if m.get("rewritten")]
    orig_words = [len(m["text"].split()) for _, _, m in rw]
    new_words = [len(m["rewritten"].split()) for _, _, m in rw]
    added: Counter[str] = Counter()
    for _, _, m in rw:
        old = {w.lower().strip(".,") for w in m["text"].split()}
        added.update(w.lower().strip(".,") for w in m["rewritten"].split() if w.lower().strip(".,") not in old)
    out: dict[str, Any] = {
        "n_mentions": len(ms), "n_rewritten": len(rw), "rate": _ratio(len(rw), len(ms)),
        "n_unchanged_text": sum(1 for _, _, m in rw if m["rewritten"].strip().lower() == m["text"].strip().lower()),
        "words_original": summary(orig_words), "words_rewritten": summary(new_words),
        "chars_original": summary([len(m["text"]) for _, _, m in rw]),
        "chars_rewritten": summary([len(m["rewritten"]) for _, _, m in rw]),
        "words_added": [{"word": w, "count": c} for w, c in sorted(added.items(), key=lambda x: (-x[1], x[0]))[:20]],
        "length_histogram": histogram(new_words, [float(x) + 0.5 for x in range(0, 13)]),
        "examples": [{"key": k, "index": i, "text": m["text"], "rewritten": m["rewritten"]} for k, i, m in rw[:n_examples]],
        "intermediate": None,
    }
    rows = [r for r in _ok_rows(b, "rewrite") if r.get("mention_index") is not None]
    if "rewrite" in b.intermediates:
        dec = Counter(r["decision"] for r in rows)
        out["intermediate"] = {"n_requests": len(rows), "decisions": dict(sorted(dec.items())),
                               "malformed_rate": _ratio(dec.get("malformed_output", 0), len(rows))}
    return out


# ============================================================================ 2D boxes
def _box_units(b: BuildData) -> dict[str, list[tuple[str, int, str, list[float]]]]:
    units: dict[str, list[tuple[str, int, str, list[float]]]] = {}
    for key, rec in sorted(b.records.items()):
        items = rec.get("mentions") if rec["corpus"] == "cot" else rec.get("objects") if rec["corpus"] == "det3d" else None
        for i, it in enumerate(items or []):
            units.setdefault(rec["corpus"], []).append((key, i, it["category"], [float(v) for v in it["bbox2d"]]))
    return units


def boxes2d(b: BuildData) -> dict[str, Any] | None:
    """Size and position distributions of 2D boxes (cot mentions, det3d objects), normalized coordinates."""
    units = _box_units(b)
    if not units:
        return None
    out: dict[str, Any] = {}
    for corpus, us in units.items():
        a = np.asarray([u[3] for u in us], dtype=np.float64)
        w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
        area = w * h
        cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
        pos = (w > 0) & (h > 0)
        log_aspect = np.log2(w[pos] / h[pos])
        heat, _, _ = np.histogram2d(cy, cx, bins=10, range=[[0, 1], [0, 1]])
        border = (a[:, 0] <= 1e-6) | (a[:, 1] <= 1e-6) | (a[:, 2] >= 1 - 1e-6) | (a[:, 3] >= 1 - 1e-6)
        cats = Counter(u[2] for u in us)
        out[corpus] = {
            "n": len(us), "width": summary(w), "height": summary(h), "area": summary(area),
            "log2_aspect": summary(log_aspect),
            "n_degenerate": int(((w <= 0) | (h <= 0)).sum()), "n_tiny": int((area < 1e-3).sum()),
            "n_huge": int((area > 0.9).sum()), "n_touching_border": int(border.sum()),
            "hist_width": histogram(w, IOU_EDGES), "hist_height": histogram(h, IOU_EDGES),
            "hist_sqrt_area": histogram(np.sqrt(np.clip(area, 0, None)), IOU_EDGES),
            "center_heatmap": [[int(x) for x in row] for row in heat],  # rows: y (top first), cols: x
            "categories": [{"category": c, "count": n} for c, n in sorted(cats.items(), key=lambda x: (-x[1], x[0]))],
        }
    return out


# ============================================================================ det3d
def _projected_box(box3d: Mapping[str, Any], K: Sequence[Sequence[float]], w: int, h: int) -> list[float] | None:
    """The normalized 2D extent of the 3D box's projected corners, clipped to the image; None when a
    corner is behind (or within 5 cm of) the camera plane or the projection misses the image."""
    from schemas.camera import box_corners, project
    from schemas.grammar import Box3D, box3d_to_pose

    c, d, R = box3d_to_pose(Box3D(tuple(box3d["center"]), tuple(box3d["dimensions"]), tuple(box3d["rotation"])))
    corners = box_corners(c, d, R)
    if (corners[:, 2] <= 0.05).any():
        return None
    uv = project(K, corners)
    x1, y1 = max(0.0, float(uv[:, 0].min())), max(0.0, float(uv[:, 1].min()))
    x2, y2 = min(float(w), float(uv[:, 0].max())), min(float(h), float(uv[:, 1].max()))
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1 / w, y1 / h, x2 / w, y2 / h]


def det3d_stats(b: BuildData) -> dict[str, Any] | None:
    """Depth, size and orientation distributions of det3d objects, 2D/3D consistency, and outliers.

    Outliers: per category (>= MIN_GROUP_FOR_Z objects) a robust z-score beyond ROBUST_Z of the log
    smallest side, largest side or volume (sorted extents: the canonical form may permute w, h, l of
    one object between views), a robust z of the log depth over all objects, and hard rules (depth < 0.2 m
    or > 30 m, a side > 10 m or < 1 cm, |pitch| or |roll| > 45 degrees, the 2D box overlapping the
    projected 3D box by IoU < 0.25). Each listed object says which rule and value.
    """
    keys = b.keys_of("det3d")
    if not keys:
        return None
    objs = []
    for key in keys:
        rec = b.records[key]
        K = rec["camera"]["K"]
        w, h = rec["image"]["width"], rec["image"]["height"]
        for i, o in enumerate(rec.get("objects", [])):
            bx = o["box3d"]
            proj = _projected_box(bx, K, w, h)
            objs.append({"key": key, "index": i, "category": o["category"], "dataset": rec["source"]["dataset"],
                         "x": float(bx["center"][0]), "y": float(bx["center"][1]), "z": float(bx["center"][2]),
                         "w": float(bx["dimensions"][0]), "h": float(bx["dimensions"][1]), "l": float(bx["dimensions"][2]),
                         "pitch": float(bx["rotation"][0]) * 180.0, "roll": float(bx["rotation"][1]) * 180.0,
                         "yaw": float(bx["rotation"][2]) * 180.0,
                         "consistency_iou": box_iou([float(v) for v in o["bbox2d"]], proj) if proj else None})
    out: dict[str, Any] = {"n_samples": len(keys), "n_objects": len(objs)}
    if not objs:
        return out
    z = np.asarray([o["z"] for o in objs])
    out["depth"] = summary(z)
    out["hist_depth"] = histogram(z, auto_edges(z, 30, lo=0.0))
    for k in ("pitch", "roll", "yaw"):
        v = [o[k] for o in objs]
        out[k] = summary(v)
        out[f"hist_{k}"] = histogram(v, [float(x) for x in range(-180, 181, 10)])
    cons = [o["consistency_iou"] for o in objs if o["consistency_iou"] is not None]
    out["consistency_iou"] = summary(cons)
    out["hist_consistency_iou"] = histogram(cons, IOU_EDGES)
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in objs:
        by_cat[o["category"]].append(o)
    out["per_category"] = [{"category": c, "n": len(os_),
                            "w": summary([o["w"] for o in os_]), "h": summary([o["h"] for o in os_]),
                            "l": summary([o["l"] for o in os_]), "depth": summary([o["z"] for o in os_])}
                           for c, os_ in sorted(by_cat.items(), key=lambda x: (-len(x[1]), x[0]))]
    flags: list[dict[str, Any]] = []

    def flag(o: dict[str, Any], rule: str, value: float, score: float | None = None) -> None:
        flags.append({"key": o["key"], "index": o["index"], "category": o["category"], "rule": rule,
                      "value": float(value), "robust_z": None if score is None else float(score)})

    zz = robust_z(np.log(np.clip(z, 1e-3, None)), LOG_MIN_MAD)
    if len(objs) >= MIN_GROUP_FOR_Z:
        for o, s in zip(objs, zz):
            if abs(s) > ROBUST_Z:
                flag(o, "depth_robust_z", o["z"], s)
    for os_ in by_cat.values():
        if len(os_) < MIN_GROUP_FOR_Z:
            continue
        # sorted extents, not w/h/l: canonicalization may permute the dimensions of the same object
        ext = np.sort(np.asarray([[o["w"], o["h"], o["l"]] for o in os_]), axis=1)
        for name, vals, floor in (("smallest_side", ext[:, 0], LOG_MIN_MAD), ("largest_side", ext[:, 2], LOG_MIN_MAD),
                                  ("volume", ext.prod(axis=1), LOG_VOLUME_MIN_MAD)):
            for o, v, s in zip(os_, vals, robust_z(np.log(vals), floor)):
                if abs(s) > ROBUST_Z:
                    flag(o, f"{name}_robust_z", v, s)
    for o in objs:
        if o["z"] < 0.2:
            flag(o, "depth_below_0_2m", o["z"])
        if o["z"] > 30:
            flag(o, "depth_above_30m", o["z"])
        for dim in ("w", "h", "l"):
            if o[dim] > 10:
                flag(o, f"{dim}_above_10m", o[dim])
            if o[dim] < 0.01:
                flag(o, f"{dim}_below_1cm", o[dim])
        for ang in ("pitch", "roll"):
            if abs(o[ang]) > 45:
                flag(o, f"{ang}_above_45deg", o[ang])
        if o["consistency_iou"] is not None and o["consistency_iou"] < 0.25:
            flag(o, "bbox2d_vs_projection_iou_below_0_25", o["consistency_iou"])
    flags.sort(key=lambda f: (-(abs(f["robust_z"]) if f["robust_z"] is not None else 1e9), f["key"], f["index"], f["rule"]))
    out["n_outliers"] = len({(f["key"], f["index"]) for f in flags})
    out["outlier_rules"] = dict(sorted(Counter(f["rule"] for f in flags).items()))
    out["outliers"] = flags[:MAX_LISTED]
    step = max(1, math.ceil(len(objs) / MAX_SCATTER))  # a deterministic thinning keeps audit.json small
    out["scatter"] = {"z": [o["z"] for o in objs[::step]], "volume": [o["w"] * o["h"] * o["l"] for o in objs[::step]],
                      "category": [o["category"] for o in objs[::step]], "every": step}
    return out


# ============================================================================ point maps
def pointmap_stats(b: BuildData) -> dict[str, Any] | None:
    """Depth of the sampled points, per-sample depth, image coverage, invalid points, outlier samples."""
    keys = [k for k in b.keys_of("pointmap") if k in b.point_stats]
    if not keys:
        return None
    z = np.concatenate([b.points[k][:, 4] for k in keys if b.points[k].ndim == 2 and b.points[k].shape[0]])
    z = z[np.isfinite(z)]
    med = np.asarray([b.point_stats[k].get("z_median", np.nan) for k in keys], dtype=np.float64)
    uv = []
    for k in keys:
        p = b.points[k]
        rec = b.records[k]
        if p.ndim == 2 and p.shape[0]:
            uv.append(np.stack([p[:, 0] / rec["image"]["width"], p[:, 1] / rec["image"]["height"]], axis=1))
    uv_a = np.concatenate(uv) if uv else np.zeros((0, 2))
    heat, _, _ = np.histogram2d(np.clip(uv_a[:, 1], 0, 1), np.clip(uv_a[:, 0], 0, 1), bins=10, range=[[0, 1], [0, 1]])
    ok = np.isfinite(med)
    scores = np.full(med.shape, np.nan)
    if ok.sum() >= MIN_GROUP_FOR_Z:
        scores[ok] = robust_z(np.log(np.clip(med[ok], 1e-3, None)), LOG_MIN_MAD)
    outliers = [{"key": k, "rule": "median_depth_robust_z", "value": float(m), "robust_z": float(s)}
                for k, m, s in zip(keys, med, scores) if np.isfinite(s) and abs(s) > ROBUST_Z]
    outliers += [{"key": k, "rule": "invalid_points", "value": b.point_stats[k]["n_invalid"], "robust_z": None}
                 for k in keys if b.point_stats[k]["n_invalid"] > 0]
    outliers += [{"key": k, "rule": "points_outside_image", "value": b.point_stats[k].get("n_outside_image", 0.0),
                  "robust_z": None} for k in keys if b.point_stats[k].get("n_outside_image", 0.0) > 0]
    n_pts = [b.point_stats[k]["n"] for k in keys]
    return {
        "n_samples": len(keys), "n_points": int(sum(n_pts)), "points_per_sample": summary(n_pts),
        "n_invalid_points": int(sum(b.point_stats[k]["n_invalid"] for k in keys)),
        "depth": summary(z), "hist_depth": histogram(z, auto_edges(z, 30, lo=0.0)),
        "median_depth_per_sample": summary(med), "hist_median_depth": histogram(med, auto_edges(med[ok], 20, lo=0.0)),
        "uv_heatmap": [[int(x) for x in row] for row in heat],
        "n_outliers": len({o["key"] for o in outliers}), "outliers": outliers[:MAX_LISTED],
        "modes": dict(sorted(Counter(b.records[k]["points"]["mode"] for k in keys).items())),
    }


# ============================================================================ gallery
def select_gallery(b: BuildData, rows: list[dict[str, Any]] | None, n: int = 12, seed: int = 0,
                   det3d: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Up to `n` samples spread over strata, deterministic in (`seed`, key).

    Strata: corpus x dataset, and for cot with ground truth "all mentions agree" vs "a mention
    disagrees", for det3d "has an outlier" vs not: the gallery shows the bad cases next to typical
    ones instead of whatever sorts first.
    """
    import hashlib

    bad_cot = {r["key"] for r in rows or [] if r["iou_gt"] is not None and r["iou_gt"] < IOU_THRESHOLD}
    bad_det = {o["key"] for o in (det3d or {}).get("outliers", [])}
    strata: dict[str, list[str]] = defaultdict(list)
    for key, rec in b.records.items():
        s = f"{rec['corpus']}/{rec['source']['dataset']}"
        if rec["corpus"] == "cot" and rows is not None and b.ground_truth is not None:
            s += "/disagrees" if key in bad_cot else "/agrees"
        if rec["corpus"] == "det3d" and det3d is not None:
            s += "/outlier" if key in bad_det else "/typical"
        strata[s].append(key)

    def rank(k: str) -> str:
        return hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()

    queues = {s: sorted(ks, key=rank) for s, ks in sorted(strata.items())}
    out: list[dict[str, Any]] = []
    while len(out) < n and any(queues.values()):
        for s, q in queues.items():
            if q and len(out) < n:
                out.append({"key": q.pop(0), "stratum": s})
    return out


# ============================================================================ everything
def compute_audit(b: BuildData, *, gallery_size: int = 12, seed: int = 0) -> dict[str, Any]:
    """All sections of the audit (without figures): what `report.write_report` renders."""
    rows = written_mentions(b) if b.keys_of("cot") else []
    det = det3d_stats(b)
    return {
        "funnel": funnel(b),
        "agreement": agreement(b, rows),
        "rewrite": rewrite_stats(b),
        "boxes2d": boxes2d(b),
        "det3d": det,
        "pointmaps": pointmap_stats(b),
        "gallery": select_gallery(b, rows, gallery_size, seed, det),
        "_mentions": rows,
    }
