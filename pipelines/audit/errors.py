"""The error gallery: caught, missed and lost annotation errors drawn on their images.

Why: the verifier's effect (`agreement.verify_effect`) is a few counts; a reviewer trusts or doubts
them by looking at cases. A caught error usually ends in a rejected sample, which has no shard image,
so the images come from the ground truth's own image paths (the sample world's view images) and only
then from the shards.

Strata, per mention (entity) with candidates and a ground-truth box, "right" meaning IoU >= 0.5 with
the truth (the same classification as `verify_effect`, from `metrics.agreement`):
- caught: the first candidate was wrong, and the verifier refused it or chose a right box;
- missed: the verifier chose a wrong box (what the build writes unless a later stage drops the sample);
- lost: the first candidate was right, and the verifier refused it or chose a wrong box;
- correct: the first candidate was right and the verifier chose a right box.
Without a verify stage the tagger's first box (the one the assignment prefers) is judged: missed or correct.
A mention the tagger gave no box has nothing to draw; the funnel counts it.

Selection: per stratum, the mentions ranked by sha256(seed, stratum, key, mention index), the first
`cap` (correct ones: cap // 2, at least 1): the same build and seed always show the same cases, and
a rebuild that changes one mention does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.audit.load import BuildData
from pipelines.audit.stats import IOU_THRESHOLD

__all__ = ["STRATA", "draw_error_gallery", "error_kind", "select_error_gallery"]

#: report stratum <- the outcome's name in `agreement` (`kept` there, `correct` here)
STRATA = {"caught": "caught", "missed": "missed", "lost": "lost", "correct": "kept"}
_KINDS = {"wrong_instance": "wrong instance", "other_category": "other category", "duplicate": "duplicate",
          "hallucinated": "hallucination", "true_also": "true box (added)"}
_RIGHT, _WRONG = (60, 180, 75), (230, 25, 75)


def _cap(stratum: str, cap: int) -> int:
    return 0 if cap <= 0 else max(1, cap // 2) if stratum == "correct" else cap


def error_kind(note: str | None, injected: str | None, iou: float) -> str | None:
    """What made a candidate box, in words (None: not recorded, i.e. not a simulated build).

    The tagger's note (`Candidate.note`) names wrong boxes; a `correct` note is the true box made
    loose or tight (the mention's recorded `box_mode`), or exact.
    """
    if note is None:
        return None
    if note != "correct":
        return _KINDS.get(note, note.replace("_", " "))
    mode = None
    if injected:
        try:
            mode = json.loads(injected).get("box_mode")
        except (ValueError, AttributeError):
            mode = None
    return "exact box" if iou >= 1.0 - 1e-6 or mode is None else f"{mode} box"


def _boxes(o: Mapping[str, Any], stratum: str) -> list[dict[str, Any]]:
    """The boxes drawn for one case: (role, box, IoU with the truth, error kind), main box first."""
    out = []

    def add(role: str, k: int) -> None:
        out.append({"role": role, "candidate": k, "box": o["boxes"][k], "iou": round(float(o["ious"][k]), 4),
                    "kind": error_kind(o["notes"][k], o["injected"], float(o["ious"][k]))})

    c = o["choice"]
    if stratum in ("caught", "lost"):  # the first box was refused: c is None or another candidate
        add("rejected", 0)
        if c is not None:
            add("chosen", c)
    elif c is not None:
        add("written" if stratum == "missed" else "chosen", c)
    return out


def _caption(o: Mapping[str, Any], stratum: str, boxes: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for bx in boxes:
        kind = f"{bx['kind']}, " if bx["kind"] else ""
        parts.append(f"{bx['role']} box: {kind}IoU {bx['iou']:.2f} with the truth")
    if o["injected"]:
        try:
            outcome = json.loads(o["injected"]).get("outcome")
        except (ValueError, AttributeError):
            outcome = None
        if outcome:
            parts.append(f"tagger outcome: {outcome.replace('_', ' ')}")
    parts.append(f"verifier: {o['decision']}")
    return f"\u201c{o['text']}\u201d ({o['category']}), {stratum}: " + "; ".join(parts)


def select_error_gallery(outcomes: Mapping[str, Any], cap: int, seed: int) -> dict[str, Any]:
    """Counts per stratum and the deterministic pick of at most `cap` cases per stratum (module docstring)."""
    counts = {s: len(outcomes.get(k, [])) for s, k in STRATA.items()}
    shown: list[dict[str, Any]] = []
    for s, k in STRATA.items():
        ranked = sorted(outcomes.get(k, []), key=lambda o: hashlib.sha256(
            f"{seed}:{s}:{o['key']}:{o['mention_index']}".encode()).hexdigest())
        for o in ranked[:_cap(s, cap)]:
            boxes = _boxes(o, s)
            shown.append({"stratum": s, "key": o["key"], "mention_index": o["mention_index"],
                          "record_id": o["record_id"], "text": o["text"], "category": o["category"],
                          "decision": o["decision"], "first_iou": o["first_iou"], "chosen_iou": o["chosen_iou"],
                          "boxes": boxes, "gt_box": o["gt_box"], "gt_row": o["gt_row"],
                          "error_kind": boxes[0]["kind"] if boxes else None, "caption": _caption(o, s, boxes)})
    return {"basis": outcomes.get("basis", "verifier"), "cap": cap, "seed": seed, "iou_threshold": IOU_THRESHOLD,
            "counts": counts, "shown": shown}


def _image(b: BuildData, case: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    """The case's image: the ground truth's path for its mention (rejected samples too), else the shard's."""
    gt = b.ground_truth or {}
    rows = gt.get("refspatial_mentions") or []
    j = case.get("gt_row")
    rel = rows[j].get("image") if j is not None and j < len(rows) else None
    if rel and b.ground_truth_path is not None:
        p = Path(b.ground_truth_path).parent / rel
        if p.is_file():
            return p.read_bytes(), "ground_truth"
    if case["key"] in b.records:
        s = b.read_sample(case["key"])
        return s.get(s["json"]["image"]["ext"]), "shard"
    return None, None


def draw_error_gallery(b: BuildData, gallery: Mapping[str, Any], max_width: int = 360) -> list[dict[str, Any]]:
    """Each shown case drawn (red: wrong box, green: right box, white: the truth); adds `image` and
    `png_bytes` to the case (audit.json) and returns the cases with their PNG for the HTML."""
    from pipelines.audit.plots import draw_gallery_image

    out = []
    for case in gallery["shown"]:
        raw, where = _image(b, case)
        case["image"] = where
        case["png_bytes"] = 0
        if raw is None:
            continue
        sample = {"json": {"corpus": "cot", "image": {"ext": "img"},
                           "mentions": [{"bbox2d": bx["box"], "text": f"{bx['role']}: {bx['kind'] or ''}".rstrip(": ")}
                                        for bx in case["boxes"]]}, "img": raw}
        colours = [_RIGHT if bx["iou"] >= IOU_THRESHOLD else _WRONG for bx in case["boxes"]]
        png, _ = draw_gallery_image(sample, gt_boxes=[case["gt_box"]], max_width=max_width, colours=colours)
        case["png_bytes"] = len(png)
        out.append({**case, "png": png})
    return out
