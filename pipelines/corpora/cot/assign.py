"""One-to-one assignment of candidate boxes to mentions (Hungarian on the verifier's scores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from schemas.boxes import box_iou

SAME_BOX_IOU = 0.9  # candidates of different mentions this close are the same box (one-to-one check)


def _coreferent(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two mentions that may name one object: same category, one's words contain the other's.

    "the chair" and "the red chair" in one record are most likely the same chair, so the verifier
    picking the same box for both is agreement, not a conflict.
    """
    if a["category"] != b["category"]:
        return False
    wa, wb = set(a["key"].split()), set(b["key"].split())
    return wa <= wb or wb <= wa


def assign_boxes(entities: Sequence[dict[str, Any]], candidates: Sequence[Sequence[dict[str, Any]]],
                 verdicts: Sequence[dict[str, Any]] | None, min_confidence: float) -> list[dict[str, Any]]:
    """One-to-one mention <-> box assignment: Hungarian (scipy `linear_sum_assignment`) on scores.

    Boxes of all mentions are pooled (boxes with IoU >= SAME_BOX_IOU are one box). Score of
    (mention, box): the verifier's confidence for the candidate it chose (no score for the others:
    an unchosen candidate is unverified); without a verifier (`verdicts=None`), the tagger's score
    (1 when it gives none) divided by 1 + the candidate's rank. A mention that loses its box to
    another mention is `ambiguous_alignment`, unless the two are coreferent (`_coreferent`), when it
    shares the box (`coreferent`). Returns per mention {decision, box_px, score, source, reason}.
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    n = len(entities)
    cols: list[list[float]] = []

    def col_of(box: Sequence[float]) -> int:
        for k, c in enumerate(cols):
            if box_iou(c, box) >= SAME_BOX_IOU:
                return k
        cols.append([float(v) for v in box])
        return len(cols) - 1

    out: list[dict[str, Any]] = [{"decision": None, "box_px": None, "score": None, "source": None, "reason": None}
                                 for _ in range(n)]
    prefs: list[dict[int, tuple[float, dict[str, Any]]]] = [{} for _ in range(n)]
    for e in range(n):
        cands = candidates[e]
        if not cands:
            out[e].update(decision="no_candidates", reason="no_candidates")
            continue
        if verdicts is not None:
            v = verdicts[e]
            if v.get("error"):
                out[e].update(decision="verifier_malformed_output", reason="verifier_malformed_output")
            elif v.get("choice") is None:
                out[e].update(decision="verifier_none", reason="verifier_none")
            elif float(v["confidence"]) < min_confidence:
                out[e].update(decision="low_confidence", reason="low_confidence")
            else:
                c = cands[int(v["choice"])]
                prefs[e][col_of(c["box_px"])] = (max(float(v["confidence"]), 1e-6), c)
            continue
        for rank, c in enumerate(cands):
            s = (1.0 if c.get("score") is None else float(c["score"])) / (1 + rank)
            k = col_of(c["box_px"])
            if s > prefs[e].get(k, (0.0, None))[0]:
                prefs[e][k] = (max(s, 1e-6), c)
    rows = [e for e in range(n) if prefs[e]]
    if rows:
        score = np.zeros((len(rows), len(cols)))
        for r, e in enumerate(rows):
            for k, (s, _) in prefs[e].items():
                score[r, k] = s
        ri, ci = linear_sum_assignment(score, maximize=True)
        won: dict[int, int] = {}
        for r, k in zip(ri.tolist(), ci.tolist()):
            e = rows[r]
            if score[r, k] > 0:
                s, c = prefs[e][k]
                out[e].update(decision="grounded", box_px=[float(v) for v in c["box_px"]], score=s,
                              source=c.get("source"))
                won[k] = e
        for e in rows:
            if out[e]["decision"] is not None:
                continue
            k = max(prefs[e], key=lambda kk: (prefs[e][kk][0], -kk))
            holder = won.get(k)
            if holder is not None and _coreferent(entities[e], entities[holder]):
                out[e].update(decision="coreferent", box_px=list(out[holder]["box_px"]), score=prefs[e][k][0],
                              source=prefs[e][k][1].get("source"))
            else:
                out[e].update(decision="ambiguous_alignment", reason="ambiguous_alignment")
    return out
