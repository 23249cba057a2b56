"""The CPU stages of the cot build: read, assign, compose."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.corpora.cot.assign import assign_boxes
from pipelines.corpora.cot.common import (
    DEFAULT_MAX_TURN_CHARS,
    GRAMMAR_TOKENS,
    TASK,
    Row,
    RowsPerSample,
    by_mention,
)
from pipelines.corpora.cot.text import _clean_human, _norm_box, _truncate, compose_turn, find_point_lists
from pipelines.engine.stage import Item, Reject, Resources, Stage
from pipelines.sources.common import item_reject


class ReadStage(Stage):
    """Record checks, image header, mention extraction and point lists; rejects what cannot be a sample."""

    name = "read"
    batch_size = 32
    resources = Resources(cpus=1.0)

    def __init__(self, extra_nouns: Sequence[str] = (), question_only: bool = False,
                 max_turn_chars: int = DEFAULT_MAX_TURN_CHARS) -> None:
        self.extra_nouns = list(extra_nouns)
        self.question_only = question_only
        self.max_turn_chars = max_turn_chars

    def _check(self, it: Item) -> tuple[Item | None, Reject | None]:
        from pipelines.corpora.cot.mentions import (
            DEFAULT_VOCABULARY,
            Vocabulary,
            extract_mentions,
            group_entities,
        )

        key = it["key"]

        def rej(reason: str, msg: str) -> tuple[None, Reject]:
            return None, Reject(key, self.name, reason, msg)

        read_rej = item_reject(it, self.name)
        if read_rej is not None:
            return None, read_rej
        if len(it["image_paths"]) != 1:
            return rej("multi_image", f"{len(it['image_paths'])} images; a cot sample grounds in one image")
        turns = it["conversations"]
        for k, t in enumerate(turns):
            want = "human" if k % 2 == 0 else "gpt"
            if t["from"] != want or not t["value"].strip():
                return rej("malformed_conversation", f"turn {k}: expected a non-empty {want} turn")
        if len(turns) % 2:
            return rej("malformed_conversation", "the last turn is not a gpt answer")
        for k, t in enumerate(turns):
            if len(t["value"]) > self.max_turn_chars:
                return rej("turn_too_long", f"turn {k} has {len(t['value'])} characters (> {self.max_turn_chars})")
            tok = next((g for g in GRAMMAR_TOKENS if g in t["value"]), None)
            if tok is not None:
                return rej("grammar_tokens_in_text", f"turn {k} contains {tok!r}")
        path = it["image_paths"][0]
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return rej("unreadable_image", f"{type(exc).__name__}: {exc}")
        from shards.writer import image_problem, sniff_image_ext

        head = data[:8]
        ext = sniff_image_ext(head)
        if ext is None:
            return rej("unsupported_image_format", f"{Path(path).name}: not PNG or JPEG (first bytes {head[:4]!r})")

        why = image_problem(data, ext)  # a file cut short passes PIL's header checks (verify() skips JPEG data)
        if why is not None:
            return rej("unreadable_image", f"{Path(path).name}: {why}")
        try:
            from PIL import Image

            with Image.open(path) as im:
                width, height = im.size
                im.verify()
        except Exception as exc:  # noqa: BLE001 - any decoder complaint means the same thing
            return rej("unreadable_image", f"{Path(path).name}: {type(exc).__name__}: {exc}")
        points = []
        for k, t in enumerate(turns):
            if t["from"] != "gpt":
                continue
            for s, e, pts in find_point_lists(t["value"]):
                bad = [p for p in pts if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[1] <= 1.0)]
                if bad:
                    return rej("point_out_of_range", f"turn {k}: point {bad[0]} outside [0, 1]")
                points.append([k, s, e, [list(p) for p in pts]])
        if getattr(self, "_vocab", None) is None:
            self._vocab = Vocabulary.of([*DEFAULT_VOCABULARY, *self.extra_nouns])
        ments = extract_mentions(turns, it["id"], vocabulary=self._vocab, question_only=self.question_only)
        if not ments:
            return rej("no_mentions", "no object mention in the answer turns")
        entities = [{"key": g.key, "category": g.category, "text": g.first.text,
                     "spans": [[m.turn, m.start, m.end, m.text] for m in g.mentions]}
                    for g in group_entities(ments)]
        return {
            "key": key, "id": it["id"], "source": it["source"], "image_path": path, "image_ext": ext,
            "width": int(width), "height": int(height), "turns": turns, "points": points, "entities": entities,
        }, None

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out, rejects = [], []
        for it in batch:
            o, r = self._check(it)
            if r is not None:
                rejects.append(r)
            else:
                out.append(o)
        return out, rejects


class AssignStage(RowsPerSample, Stage):
    """One-to-one mention <-> box (`assign_boxes`) and the sample's verdict; never rejects itself.

    A failed sample travels on with `failure` set (Compose turns it into the reject row), so its
    per-mention decisions still reach assign/NNNNNN.parquet for the audit.
    """

    name = "assign"
    batch_size = 64
    persist_intermediate = True
    resources = Resources(cpus=1.0)

    def __init__(self, verified: bool = True, min_confidence: float = 0.5, allow_partial: bool = False) -> None:
        self.verified = verified
        self.min_confidence = min_confidence
        self.allow_partial = allow_partial

    def _decide(self, it: Item) -> Item:
        res = assign_boxes(it["entities"], it["candidates"], it.get("verdicts") if self.verified else None,
                           self.min_confidence)
        assigned = []
        for r in res:
            r = dict(r)
            r["box_norm"] = _norm_box(r["box_px"], it["width"], it["height"]) if r["box_px"] else None
            assigned.append(r)
        ok = [r["decision"] in ("grounded", "coreferent") for r in assigned]
        failure = None
        if not all(ok):
            detail = "; ".join(
                f"{e['text']!r}: {r['decision']}"
                + (f" (raw: {_truncate(v.get('raw') or '', 300)!r})"
                   if self.verified and (v := it["verdicts"][i]).get("error") else "")
                for i, (e, r) in enumerate(zip(it["entities"], assigned)))
            failed = [r for r, g in zip(assigned, ok) if not g]
            if self.allow_partial:
                if not any(ok):
                    failure = {"reason": "no_mention_grounded", "message": _truncate(detail, 1800)}
            else:
                first = next((r for r in failed if r["reason"] == "verifier_malformed_output"), failed[0])
                failure = {"reason": first["reason"], "message": _truncate(detail, 1800)}
        return {**it, "assigned": assigned, "failure": failure}

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        return [self._decide(it) for it in batch], []

    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        rows = []
        for it in outputs:
            f = it["failure"]
            for i, (e, r) in enumerate(zip(it["entities"], it["assigned"])):
                rows.append({
                    "key": it["key"], "record_id": it["id"], "mention_index": i, "mention_text": e["text"],
                    "category": e["category"], "spans": json.dumps(e["spans"]), "decision": r["decision"],
                    "reason": r["reason"], "box_px": r["box_px"], "box_norm": r["box_norm"], "score": r["score"],
                    "source": r["source"], "sample_decision": "rejected" if f else "kept",
                    "sample_reason": f["reason"] if f else None, "sample_message": f["message"] if f else None,
                })
        return rows

    @staticmethod
    def sample_from_rows(it: Item, rows: list[Row]) -> Item:
        got = by_mention(rows)
        assigned = [{k: got[i][k] for k in ("decision", "box_px", "score", "source", "reason", "box_norm")}
                    for i in range(len(it["entities"]))]
        for a in assigned:
            for k in ("box_px", "box_norm"):
                if a[k] is not None:
                    a[k] = [float(v) for v in a[k]]
        r0 = got[0]
        failure = ({"reason": r0["sample_reason"], "message": r0["sample_message"]}
                   if r0["sample_decision"] == "rejected" else None)
        return {**it, "assigned": assigned, "failure": failure}


class ComposeStage(Stage):
    """Grounded text and the cot record; a failed sample becomes its reject row here."""

    name = "compose"
    batch_size = 32
    resources = Resources(cpus=1.0)

    def __init__(self, ndigits: int = 3) -> None:
        self.ndigits = ndigits

    def _compose(self, it: Item) -> Item:
        from schemas.grammar import check_regions, find_grounded

        w, h = it["width"], it["height"]
        rewrites = it.get("rewrites") or [None] * len(it["entities"])
        per_turn: dict[int, list[tuple[int, int, str, list[float], dict[str, Any]]]] = {}
        for e, a, rw in zip(it["entities"], it["assigned"], rewrites):
            if a["decision"] not in ("grounded", "coreferent"):
                continue
            new = rw["text"] if rw and rw.get("text") else None
            for turn, start, end, text in e["spans"]:
                shown = text
                if new:
                    shown = (new[0].upper() + new[1:]) if text[:1].isupper() else new
                mention = {"text": text, "bbox2d": a["box_norm"], "category": e["category"], "rewritten": new,
                           "object_id": None}
                per_turn.setdefault(turn, []).append((start, end, shown, a["box_norm"], mention))
        points_by_turn: dict[int, list[tuple[int, int, list[tuple[float, float]]]]] = {}
        for turn, s, e_, pts in it["points"]:
            points_by_turn.setdefault(turn, []).append((s, e_, [(float(x), float(y)) for x, y in pts]))
        turns, mentions = [], []
        first_human = True
        for k, t in enumerate(it["turns"]):
            if t["from"] == "human":
                answer_has_points = (k + 1) in points_by_turn
                turns.append({"from": "human", "value": _clean_human(t["value"], first_human, answer_has_points)})
                first_human = False
                continue
            edits = sorted(per_turn.get(k, []), key=lambda x: x[0])
            value = compose_turn(t["value"], [(s, e_, shown, box) for s, e_, shown, box, _ in edits],
                                 points_by_turn.get(k, []), self.ndigits)
            check_regions(value)
            n_regions = sum(g.has_region for g in find_grounded(value))
            if n_regions != len(edits):
                raise ValueError(f"turn {k}: {n_regions} regions written for {len(edits)} grounded mentions")
            turns.append({"from": "gpt", "value": value})
            mentions += [m for *_, m in edits]
        record = {
            "key": it["key"], "corpus": "cot", "source": it["source"],
            "image": {"ext": it["image_ext"], "width": w, "height": h},
            "camera": None, "arrays": [], "mentions": mentions,
            "conversations": [{"task": TASK, "turns": turns}],
        }
        with open(it["image_path"], "rb") as fh:
            image_bytes = fh.read()
        return {"key": it["key"], "image_bytes": image_bytes, "image_ext": it["image_ext"], "record": record,
                "arrays": {}}

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out, rejects = [], []
        for it in batch:
            f = it.get("failure")
            if f:
                rejects.append(Reject(it["key"], f.get("stage", "assign"), f["reason"], f["message"]))
                continue
            out.append(self._compose(it))
        return out, rejects
