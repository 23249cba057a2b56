"""Oracle annotators: answers read from the sample world's ground-truth side file.

Why: the audit measures the noise of the real annotators (Florence-2 tagger, VLM verifier)
against a reference. On the sample world that reference is exact, because the generator knows
which object every phrase names and its exact 2D box. `OracleTagger` and `OracleVerifier` have
the same interfaces as `Florence2Tagger` and the VLM clients, so the CoT builder switches with
`--tagger oracle` (and `--verifier oracle`) and nothing else changes.

Ground-truth file: `ground_truth.json` written by `pipelines.sample_world` (`gr3d sample-world`).
The oracle reads its `"refspatial_mentions"` list, one row per mention of the written RefSpatial
records:
    {"record_id": str, "turn": int, "start": int, "end": int, "text": str,
     "object_id": str, "category": str, "colour": str, "view_id": str,
     "bbox_px": [x1, y1, x2, y2], ...}
`turn` indexes the record's `conversations`; `start`/`end` are the character span of `text` in
that turn's `value`; `bbox_px` is the extent of the object's visible pixels in the image. Other
row keys are ignored. (Also accepted, for hand-written files: the rows under `"mentions"`, or a
top-level list; `bbox_xyxy_px`/`bbox` for the box; `id` for the record id.)

Mentions must be passed as `annotators.common.Mention` with record id, turn and span: the text
alone can name different objects in different places.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotators.common import Candidate, Mention, MentionLike, mention_text
from annotators.parsing import ModelOutputError
from annotators.vlm import Rewrite, RewriteRequest, Verdict, VerifyRequest
from schemas.boxes import box_iou

__all__ = [
    "GroundTruthMention",
    "load_ground_truth",
    "OracleTagger",
    "OracleVerifier",
    "ORACLE_VERSION",
]

log = logging.getLogger(__name__)

ORACLE_VERSION = "oracle-v1"
_ROW_KEYS = ("refspatial_mentions", "mentions")
_ALIASES = {
    "record_id": ("record_id", "id"),
    "bbox": ("bbox_px", "bbox_xyxy_px", "bbox"),
    "object_id": ("object_id", "object_index"),
}


@dataclass(frozen=True)
class GroundTruthMention:
    """One ground-truth row: where a phrase is and what it names."""

    record_id: str
    turn: int
    start: int
    end: int
    text: str
    object_id: str
    category: str
    box_xyxy_px: tuple[float, float, float, float]
    colour: str | None = None
    view_id: str | None = None
    description: str | None = None


def _pick(row: dict[str, Any], name: str) -> Any:
    for k in _ALIASES.get(name, (name,)):
        if k in row:
            return row[k]
    raise KeyError(name)


def _rows(data: Any) -> Iterable[dict[str, Any]]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for k in _ROW_KEYS:
            if isinstance(data.get(k), list):
                return data[k]
    raise ValueError(f"no mention rows under any of {_ROW_KEYS}")


def load_ground_truth(path: str | Path) -> dict[tuple[str, int, int, int], GroundTruthMention]:
    """Rows of the ground-truth file keyed by (record_id, turn, start, end); errors name the row."""
    data = json.loads(Path(path).read_text())
    out: dict[tuple[str, int, int, int], GroundTruthMention] = {}
    for n, row in enumerate(_rows(data)):
        try:
            raw_box = _pick(row, "bbox")
            if raw_box is None:  # object not visible in this view: nothing to propose
                log.info("%s: ground-truth row %d has no box; skipped", path, n)
                continue
            box = tuple(float(v) for v in raw_box)
            if len(box) != 4:
                raise ValueError("box needs 4 numbers")
            g = GroundTruthMention(
                record_id=str(_pick(row, "record_id")),
                turn=int(row["turn"]),
                start=int(row["start"]),
                end=int(row["end"]),
                text=str(row["text"]),
                object_id=str(_pick(row, "object_id")),
                category=str(row["category"]),
                box_xyxy_px=box,  # type: ignore[arg-type]
                colour=row.get("colour"),
                view_id=row.get("view_id"),
                description=row.get("description"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad ground-truth row {n}: {exc!r}") from None
        key = (g.record_id, g.turn, g.start, g.end)
        if key in out and out[key] != g:
            raise ValueError(f"{path}: ground-truth row {n} repeats mention {key} with different truth")
        out[key] = g
    return out


class _GroundTruth:
    def __init__(self, gt_path: str | Path) -> None:
        self.gt_path = Path(gt_path)
        self.rows = load_ground_truth(self.gt_path)
        self._by_turn: dict[tuple[str, int], list[GroundTruthMention]] = {}
        self._by_view: dict[str, list[GroundTruthMention]] = {}
        for g in self.rows.values():
            self._by_turn.setdefault((g.record_id, g.turn), []).append(g)
            if g.view_id is not None:
                self._by_view.setdefault(g.view_id, []).append(g)
        digest = hashlib.sha256(self.gt_path.read_bytes()).hexdigest()[:12]
        self.model_id = f"oracle:{self.gt_path.name}:{digest}"

    def lookup(self, m: MentionLike) -> GroundTruthMention | None:
        """The row of a structured mention; None when the file has no such mention.

        Exact span first. Otherwise (the builder's mention extractor may cut a phrase
        differently, e.g. without the article) the row of the same record and turn whose span
        overlaps the mention's most; without a span, the row with the same text if unique.
        """
        if not isinstance(m, Mention) or m.record_id is None or m.turn is None:
            raise TypeError(
                "oracle annotators need annotators.common.Mention(text, record_id, turn, start, end), "
                f"got {m!r}"
            )
        if m.start is not None and m.end is not None:
            exact = self.rows.get((m.record_id, m.turn, m.start, m.end))
            if exact is not None:
                return exact
            best, best_ov = None, 0
            for g in self._by_turn.get((m.record_id, m.turn), []):
                ov = min(g.end, m.end) - max(g.start, m.start)
                if ov > best_ov:
                    best, best_ov = g, ov
            return best
        hits = [g for g in self._by_turn.get((m.record_id, m.turn), []) if g.text == m.text]
        return hits[0] if len(hits) == 1 else None

    def siblings(self, g: GroundTruthMention) -> list[GroundTruthMention]:
        """Rows of other objects of the same category in the same view (one row per object)."""
        seen: dict[str, GroundTruthMention] = {}
        for o in self._by_view.get(g.view_id, []) if g.view_id is not None else []:
            if o.category == g.category and o.object_id != g.object_id:
                seen.setdefault(o.object_id, o)
        return list(seen.values())

    def provenance(self) -> dict[str, Any]:
        return {"backend": "oracle", "model_id": self.model_id, "prompt_version": ORACLE_VERSION}


class OracleTagger(_GroundTruth):
    """Tagger that proposes exactly the ground-truth box of each mention (source "oracle").

    Same call shape as `Florence2Tagger.tag`; a mention absent from the file gets no candidate
    (the builder rejects it as it would an untagged mention).
    """

    calls = 0

    def setup(self) -> None:
        """Nothing to load; present for the stage interface."""

    def tag(self, images: Sequence[Any], mentions: Sequence[Sequence[MentionLike]]) -> list[list[Candidate]]:
        if len(images) != len(mentions):
            raise ValueError(f"{len(images)} images but {len(mentions)} mention lists")
        out: list[list[Candidate]] = []
        for ms in mentions:
            cands: list[Candidate] = []
            for k, m in enumerate(ms):
                g = self.lookup(m)
                if g is None:
                    log.warning("no ground truth for mention %r", m)
                    continue
                cands.append(Candidate(mention_text(m), g.category, g.box_xyxy_px, "oracle", 1.0, k))
            out.append(cands)
        return out


class OracleVerifier(_GroundTruth):
    """Verifier/rewriter answering from the ground truth.

    verify: the candidate with the highest IoU with the true box, if that IoU reaches
    `iou_threshold` (else None); confidence = that IoU. rewrite: the row's `description` when
    the file has one; else "the <colour> <category>" when no other object of its category in
    the view has that colour; else "the <category>" with the first qualifier true of `box` and
    of none of `others` (leftmost, rightmost, topmost, lowest, largest, smallest).
    `raw` holds the decision as JSON, like a model's answer.
    """

    calls = 0

    def __init__(self, gt_path: str | Path, iou_threshold: float = 0.5) -> None:
        super().__init__(gt_path)
        self.iou_threshold = iou_threshold

    def verify(
        self, image: Any, mention: MentionLike, candidates: Sequence[Candidate | Sequence[float]]
    ) -> Verdict:
        if not candidates:
            raise ValueError("verify needs at least one candidate")
        g = self.lookup(mention)
        if g is None:
            raw = json.dumps({"choice": None, "confidence": 0.0, "reason": "no ground truth"})
            return Verdict(None, 0.0, raw, ORACLE_VERSION)
        boxes = [
            c.box_xyxy_px if isinstance(c, Candidate) else tuple(float(v) for v in c) for c in candidates
        ]
        ious = [box_iou(b, g.box_xyxy_px, identical_degenerate=0.0) for b in boxes]
        best = max(range(len(ious)), key=lambda i: ious[i])
        choice = best if ious[best] >= self.iou_threshold else None
        conf = round(ious[best], 6)
        return Verdict(choice, conf, json.dumps({"choice": choice, "confidence": conf}), ORACLE_VERSION)

    def rewrite(
        self, image: Any, mention: MentionLike, box: Sequence[float], others: Sequence[Sequence[float]] = ()
    ) -> Rewrite:
        g = self.lookup(mention)
        if g is None:
            raise ModelOutputError("no ground truth for mention", "")
        if g.description:
            text = g.description
        else:
            others_colours = {o.colour for o in self.siblings(g)}
            if g.colour and g.colour not in others_colours:
                text = f"the {g.colour} {g.category}"
            else:
                q = _qualifier(tuple(float(v) for v in box), [tuple(float(v) for v in o) for o in others])
                text = f"the {q} {g.category}" if q else f"the {g.category}"
        return Rewrite(text, json.dumps({"description": text}), ORACLE_VERSION)

    def verify_many(self, requests: Sequence[VerifyRequest]) -> list[Verdict | ModelOutputError]:
        return [self.verify(r.image, r.mention, r.candidates) for r in requests]

    def rewrite_many(self, requests: Sequence[RewriteRequest]) -> list[Rewrite | ModelOutputError]:
        out: list[Rewrite | ModelOutputError] = []
        for r in requests:
            try:
                out.append(self.rewrite(r.image, r.mention, r.box, r.others))
            except ModelOutputError as exc:
                out.append(exc)
        return out


def _qualifier(box: tuple[float, ...], others: list[tuple[float, ...]]) -> str | None:
    if not others:
        return None
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    area = (box[2] - box[0]) * (box[3] - box[1])
    ocx = [(o[0] + o[2]) / 2 for o in others]
    ocy = [(o[1] + o[3]) / 2 for o in others]
    oarea = [(o[2] - o[0]) * (o[3] - o[1]) for o in others]
    tests = [
        ("leftmost", all(cx < v for v in ocx)),
        ("rightmost", all(cx > v for v in ocx)),
        ("topmost", all(cy < v for v in ocy)),
        ("lowest", all(cy > v for v in ocy)),
        ("largest", all(area > v for v in oarea)),
        ("smallest", all(area < v for v in oarea)),
    ]
    return next((name for name, ok in tests if ok), None)
