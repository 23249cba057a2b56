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

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.audit.geometry_stats import boxes2d, det3d_stats, pointmap_stats, select_gallery
from pipelines.audit.load import BuildData
from pipelines.audit.stats import (
    GROUNDED,
    IOU_EDGES,
    IOU_THRESHOLD,
    MAX_LISTED,
    STAGE_ORDER,
    _json_list,
    _ok_rows,
    _ratio,
    histogram,
    summary,
    wilson_interval,
)
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
    "select_gallery",
    "summary",
    "written_mentions",
]


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
    # annotations left out of written samples (ignore rules, unusable boxes): record source.dropped
    dropped: Counter[str] = Counter()
    for r in b.records.values():
        dropped.update((r.get("source") or {}).get("dropped") or {})
    return {"n_input": n_input, "n_written": len(b.records), "n_rejected": int(totals.get("n_rejected", 0)),
            "n_reject_rows": len(b.rejects), "stages": stages, "rejects": rejects, "steps": steps,
            "mention_steps": mention_steps, "dropped_annotations": dict(sorted(dropped.items()))}


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
                           "tagger": None, "verifier": None, "verify_effect": None, "written_vs_tagger": None,
                           "histograms": {}}
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
            "w": int(r.get("image_width") or 0), "h": int(r.get("image_height") or 0), "cands": {}, "notes": {},
            "injected": r.get("injected")})
        if r.get("candidate_index") is not None and r.get("box_norm") is not None:
            e["cands"][int(r["candidate_index"])] = [float(v) for v in r["box_norm"]]
            e["notes"][int(r["candidate_index"])] = r.get("note")
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
        "precision_ci": list(wilson_interval(n_tp_w, len(rows))) if rows else None,
        "n_gt": len(gt_scope), "n_gt_recalled": n_rec, "recall": _ratio(n_rec, len(gt_scope)),
        "recall_ci": list(wilson_interval(n_rec, len(gt_scope))) if gt_scope else None,
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
    effect: dict[str, list[dict[str, Any]]] = {"caught": [], "missed": [], "lost": [], "kept": []}
    outcomes: dict[str, list[dict[str, Any]]] = {k: [] for k in effect}  # the same, with what drawing needs
    verified = "verify" in b.intermediates
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
        if cand_ious and (v is not None or not verified):
            # without a verify stage the builder writes the first candidate: it is the "choice"
            choice = (None if v.get("choice") is None else int(v["choice"])) if v is not None else 0
            iv_c = (box_iou([float(x) for x in v["chosen_box_norm"]], gb) if v.get("chosen_box_norm") is not None
                    else None) if v is not None else cand_ious[0]
            first_ok, chose_ok = cand_ious[0] >= thr, iv_c is not None and iv_c >= thr
            kind = ("kept" if chose_ok else "lost") if first_ok else ("missed" if iv_c is not None and not chose_ok
                                                                       else "caught")
            entry = {"key": ek[0], "mention_index": ek[1], "category": e["category"],
                     "text": e["spans"][0][3], "first_iou": round(cand_ious[0], 4),
                     "chosen_iou": None if iv_c is None else round(iv_c, 4),
                     "decision": v["decision"] if v is not None else "unverified", "n_candidates": len(cand_ious)}
            if v is not None:
                effect[kind].append(entry)
            order = sorted(e["cands"])
            outcomes[kind].append({**entry, "record_id": e["record_id"], "gt_row": j, "gt_box": gb,
                                   "boxes": [e["cands"][k] for k in order], "ious": cand_ious,
                                   "notes": [e["notes"].get(k) for k in order], "choice": choice,
                                   "injected": e["injected"]})
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
    out["_outcomes"] = {"basis": "verifier" if verified else "tagger", **outcomes} if tag else None
    if top1:
        out["tagger"] = {"n_entities": len(top1), "top1_acc": sum(x >= thr for x in top1) / len(top1),
                         "best_of_k_acc": sum(x >= thr for x in best) / len(best),
                         "mean_top1_iou": float(np.mean(top1)), "mean_best_iou": float(np.mean(best))}
        out["histograms"]["tagger_top1_vs_gt"] = histogram(top1, IOU_EDGES)
        out["histograms"]["tagger_best_vs_gt"] = histogram(best, IOU_EDGES)
    if v_n:
        out["verifier"] = {**(out["verifier"] or {}), "n_with_gt": v_n, "accuracy": v_correct / v_n,
                           "accuracy_ci": list(wilson_interval(v_correct, v_n)),
                           "precision": _ratio(v_chosen_ok, v_chosen), "recall": _ratio(v_possible_ok, v_possible)}
        out["histograms"]["verifier_vs_gt"] = histogram(verif, IOU_EDGES)
        n_eff = sum(len(x) for x in effect.values())
        n_first_ok = len(effect["kept"]) + len(effect["lost"])
        out["verify_effect"] = {
            "n": n_eff, "precision_before": _ratio(n_first_ok, n_eff),
            "precision_after": _ratio(v_chosen_ok, v_chosen),
            **{f"n_{k}": len(x) for k, x in effect.items()},
            **{k: x[:MAX_LISTED] for k, x in effect.items() if k != "kept"},
        }
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


# ============================================================================ everything
def compute_audit(b: BuildData, *, gallery_size: int = 12, seed: int = 0, error_gallery: int = 4) -> dict[str, Any]:
    """All sections of the audit (without figures): what `report.write_report` renders.

    `error_gallery`: how many caught / missed / lost errors to pick per stratum (`errors.py`).
    """
    from pipelines.audit.ambiguity import description_ambiguity
    from pipelines.audit.errors import select_error_gallery

    rows = written_mentions(b) if b.keys_of("cot") else []
    det = det3d_stats(b)
    agr = agreement(b, rows)
    outcomes = agr.pop("_outcomes", None) if agr else None
    rw = rewrite_stats(b)
    if rw is not None:
        rw["ambiguity"] = description_ambiguity(b, rows)
    return {
        "funnel": funnel(b),
        "agreement": agr,
        "rewrite": rw,
        "error_gallery": select_error_gallery(outcomes, error_gallery, seed) if outcomes else None,
        "boxes2d": boxes2d(b),
        "det3d": det,
        "pointmaps": pointmap_stats(b),
        "gallery": select_gallery(b, rows, gallery_size, seed, det),
        "_mentions": rows,
    }
