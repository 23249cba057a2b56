"""Do the written descriptions single out their object? Measured against the sample world's truth.

Why: the rewrite stage turns "the chair" into an instance description so that a model can learn
which chair is meant; a description that fits two chairs in the image (ambiguous) or names another
chair (misdescribed) teaches the wrong thing even when the box is right. Neither shows in box
precision. The sample world knows every object visible in each view, with its category and colour,
so each written description can be resolved against the image.

A written mention's description is its rewrite when it has one, else the record's own words. It is
resolved among the objects visible in the mention's view (the ground truth's `views[].objects` with
visible pixels), as the sample world's descriptions are built:
- category: a known category phrase in the description (a trailing "s" allowed); when several occur,
  the true object's category if it is one of them, else the first;
- colour: known colour words before the category phrase keep the objects of that colour;
- position: a superlative before it (leftmost, rightmost, topmost, lowest, largest, smallest) keeps the
  one extreme object (by the visible box) among those left.
Other words (relations such as "on the table") are not read: on real descriptions this resolver can
only over-count ambiguity. Outcome: `unique` (matches exactly the true object), `ambiguous` (matches
more than one visible object), `misdescribed` (matches one other object, or none). `n_confusable`
counts the mentions whose object shares its category with another visible object: only those can be
ambiguous by the category alone (and only those can get a simulated ambiguous rewrite).

Per noise source: `rewriter` (descriptions the rewriter wrote) and `source_text` (the record's words
kept). On a simulated build the rewrite intermediate's raw answers say what the rewriter injected
(`injected` "ambiguous", with its `form`), so the measured outcome is tabulated against it.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.audit.load import BuildData
from pipelines.audit.stats import _ok_rows, _ratio, wilson_interval

__all__ = ["OUTCOMES", "description_ambiguity", "resolve_description", "visible_objects"]

OUTCOMES = ("unique", "ambiguous", "misdescribed")
SUPERLATIVES = ("leftmost", "rightmost", "topmost", "lowest", "largest", "smallest")
MAX_EXAMPLES = 20


def visible_objects(gt: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """view id -> the objects with visible pixels in that view: object_id, category, colour, box (px)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for scene in gt.get("scenes") or []:
        objs = {o["object_id"]: o for o in scene.get("objects", [])}
        for v in scene.get("views", []):
            vis = []
            for vo in v.get("objects", []):
                o = objs.get(vo.get("object_id"))
                if o is None or not vo.get("visible_pixels") or vo.get("bbox_visible") is None:
                    continue
                vis.append({"object_id": o["object_id"], "category": str(o["category"]).lower(),
                            "colour": (o.get("colour") or "").lower() or None,
                            "box": [float(x) for x in vo["bbox_visible"]]})
            out[str(v["view_id"])] = vis
    return out


def _find(tokens: Sequence[str], phrase: Sequence[str]) -> int | None:
    """Index of the first occurrence of `phrase` in `tokens` (its last word may carry a plural s)."""
    n = len(phrase)
    for i in range(len(tokens) - n + 1):
        if list(tokens[i:i + n - 1]) == list(phrase[:-1]) and tokens[i + n - 1] in (phrase[-1], phrase[-1] + "s"):
            return i
    return None


def resolve_description(text: str, objects: Sequence[Mapping[str, Any]], true_category: str | None = None,
                        colours: set[str] | None = None) -> list[str]:
    """Object ids among `objects` (one view's visible objects) that `text` describes (module docstring)."""
    tokens = re.findall(r"[a-z]+", text.lower())
    cats = sorted({o["category"] for o in objects} | ({true_category.lower()} if true_category else set()))
    found = {c: i for c in cats if (i := _find(tokens, c.split())) is not None}
    if not found:
        return []
    cat = true_category.lower() if true_category and true_category.lower() in found else min(found, key=found.get)
    head = tokens[:found[cat]]
    known = colours if colours is not None else {o["colour"] for o in objects if o["colour"]}
    cand = [o for o in objects if o["category"] == cat]
    said = {t for t in head if t in known}
    if said:
        cand = [o for o in cand if o["colour"] in said]
    sup = next((t for t in head if t in SUPERLATIVES), None)
    if sup and len(cand) > 1:
        def cx(o: Mapping[str, Any]) -> float:
            return (o["box"][0] + o["box"][2]) / 2

        def cy(o: Mapping[str, Any]) -> float:
            return (o["box"][1] + o["box"][3]) / 2

        def area(o: Mapping[str, Any]) -> float:
            return (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])

        key, pick = {"leftmost": (cx, min), "rightmost": (cx, max), "topmost": (cy, min), "lowest": (cy, max),
                     "largest": (area, max), "smallest": (area, min)}[sup]
        cand = [pick(cand, key=key)]
    return [o["object_id"] for o in cand]


def _share(counts: Mapping[str, int]) -> dict[str, Any]:
    n = sum(counts.get(k, 0) for k in OUTCOMES)
    amb, mis = counts.get("ambiguous", 0), counts.get("misdescribed", 0)
    return {"n": n, **{f"n_{k}": counts.get(k, 0) for k in OUTCOMES},
            "ambiguous_share": _ratio(amb, n), "ambiguous_ci": list(wilson_interval(amb, n)) if n else None,
            "not_unique_share": _ratio(amb + mis, n),
            "not_unique_ci": list(wilson_interval(amb + mis, n)) if n else None}


def _injected(b: BuildData) -> dict[tuple[str, int], str | None] | None:
    """(key, entity) -> what a simulated rewriter injected (None: nothing); None when nothing is recorded."""
    out: dict[tuple[str, int], str | None] = {}
    recorded = False
    for r in _ok_rows(b, "rewrite"):
        if r.get("mention_index") is None or not r.get("raw_text"):
            continue
        try:
            raw = json.loads(r["raw_text"])
        except ValueError:
            continue
        if not isinstance(raw, dict) or "injected" not in raw:
            continue
        recorded = True
        inj = raw["injected"]
        out[(r["key"], int(r["mention_index"]))] = None if inj is None else f"{inj}:{raw.get('form', 'unknown')}"
    return out if recorded else None


def description_ambiguity(b: BuildData, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Share of written descriptions that are ambiguous / do not single out their object, with Wilson
    intervals, overall and per source; None without a ground truth that lists each view's objects."""
    gt = b.ground_truth
    if gt is None or not gt.get("scenes") or not rows:
        return None
    views = visible_objects(gt)
    colours = {str(o["colour"]).lower() for s in gt["scenes"] for o in s.get("objects", []) if o.get("colour")}
    gt_rows = gt.get("refspatial_mentions") or []
    injected = _injected(b)
    overall: Counter[str] = Counter()
    by_source: dict[str, Counter[str]] = defaultdict(Counter)
    by_injection: dict[str, Counter[str]] = defaultdict(Counter)
    examples: list[dict[str, Any]] = []
    unmatched = confusable = 0
    for r in rows:
        g = gt_rows[r["gt_row"]] if r.get("gt_row") is not None else None
        vis = views.get(str(g.get("view_id"))) if g is not None else None
        if g is None or vis is None:
            unmatched += 1
            continue
        true_obj = next((o for o in vis if o["object_id"] == g["object_id"]), None)
        confusable += int(true_obj is not None
                          and sum(o["category"] == true_obj["category"] for o in vis) > 1)
        desc = r.get("rewritten") or r["text"]
        hits = resolve_description(desc, vis, str(g.get("category") or r["category"]), colours)
        outcome = ("unique" if hits == [g["object_id"]] else "ambiguous" if len(hits) > 1 else "misdescribed")
        source = "rewriter" if r.get("rewritten") else "source_text"
        overall[outcome] += 1
        by_source[source][outcome] += 1
        if injected is not None:
            inj = injected.get((r["key"], r["entity"])) if r.get("entity") is not None else None
            by_injection[inj or "none"][outcome] += 1
        if outcome != "unique" and len(examples) < MAX_EXAMPLES:
            examples.append({"key": r["key"], "index": r["index"], "text": r["text"], "description": desc,
                             "outcome": outcome, "n_matches": len(hits), "source": source})
    return {**_share(overall), "n_unmatched": unmatched, "n_confusable": confusable,
            "by_source": {k: _share(v) for k, v in sorted(by_source.items())},
            "by_injection": ({k: {f"n_{o}": v.get(o, 0) for o in OUTCOMES} for k, v in sorted(by_injection.items())}
                             if injected is not None else None),
            "examples": examples}
