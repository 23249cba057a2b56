"""The model stages of the cot build: tag, verify, rewrite."""

from __future__ import annotations

import json
from typing import Any

from pipelines.corpora.cot.annotation import AnnotatorSpec, _ModelStage
from pipelines.corpora.cot.common import Row, _load_rgb, _mention_of, by_mention
from pipelines.corpora.cot.text import _norm_box, _truncate
from pipelines.engine.stage import Item, Reject, StageSetupError
from schemas.boxes import box_iou


class TagStage(_ModelStage):
    """Candidate boxes per mention (entity) from the tagger; every candidate goes to tag/NNNNNN.parquet."""

    name = "tag"
    batch_size = 8
    kind = "tagger"

    def __init__(self, spec: AnnotatorSpec, cache_path: str | None = None, gpus: float = 0.0,
                 torch_threads: int | None = None, batch_size: int | None = None, max_candidates: int = 8) -> None:
        super().__init__(spec, cache_path, gpus, torch_threads, batch_size)
        self.max_candidates = max_candidates

    def _tag(self, images: list[Any], mentions: list[list[Any]]) -> list[Any]:
        try:
            return self.annotator.tag(images, mentions)
        except StageSetupError:
            raise
        except (OSError, ImportError) as exc:  # a lazily loaded model that cannot load: fatal
            raise self._unavailable(exc) from exc

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        """Tag the batch; when the model fails on it, tag each sample alone so that only the samples
        whose own request fails become `model_error` rejects (with the model's message), not the batch."""
        images = [_load_rgb(it["image_path"]) for it in batch]
        mentions = [[_mention_of(it, e) for e in it["entities"]] for it in batch]
        rejects: list[Reject] = []
        try:
            tagged = self._tag(images, mentions)
        except StageSetupError:
            raise
        except Exception:  # noqa: BLE001 - a model error: find the samples it belongs to
            tagged = []
            for it, im, ms in zip(batch, images, mentions):
                try:
                    tagged.append(self._tag([im], [ms])[0])
                except StageSetupError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the model failed on this sample's requests
                    tagged.append(None)
                    rejects.append(Reject(it["key"], self.name, "model_error", f"tagger: {type(exc).__name__}: {exc}"))
        explain = getattr(self.annotator, "explain", None)  # simulated taggers say what they injected
        out = []
        for it, cands, ms in zip(batch, tagged, mentions):
            if cands is None:
                continue
            per: list[list[dict[str, Any]]] = [[] for _ in it["entities"]]
            for c in cands:
                box = [float(v) for v in c.box_xyxy_px]
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue  # zero-area box: no region to pool, never a grounding
                lst = per[c.mention_index]
                if len(lst) < self.max_candidates and all(d["box_px"] != box for d in lst):
                    lst.append({"label": str(c.label), "box_px": box, "source": str(c.source),
                                "score": None if c.score is None else float(c.score),
                                "note": getattr(c, "note", None)})
            injected = None
            if explain is not None:
                size = (float(it["width"]), float(it["height"]))
                injected = [None if (x := explain(m, size)) is None else json.dumps(x, sort_keys=True) for m in ms]
            out.append({**it, "candidates": per, "injected": injected})
        return out, rejects

    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        rows = []
        for it in outputs:
            for i, (e, cands) in enumerate(zip(it["entities"], it["candidates"])):
                inj = it.get("injected")
                base = {"key": it["key"], "record_id": it["id"], "mention_index": i, "mention_text": e["text"],
                        "category": e["category"], "spans": json.dumps(e["spans"]), "n_candidates": len(cands),
                        "image_width": it["width"], "image_height": it["height"],
                        "injected": inj[i] if inj else None}
                if not cands:
                    rows.append({**base, "candidate_index": None, "label": None, "box_px": None, "box_norm": None,
                                 "source": None, "score": None, "note": None})
                for j, c in enumerate(cands):
                    rows.append({**base, "candidate_index": j, "label": c["label"], "box_px": c["box_px"],
                                 "box_norm": _norm_box(c["box_px"], it["width"], it["height"]),
                                 "source": c["source"], "score": c["score"], "note": c.get("note")})
        return rows

    @staticmethod
    def sample_from_rows(it: Item, rows: list[Row]) -> Item:
        per: list[list[dict[str, Any]]] = [[] for _ in it["entities"]]
        for r in sorted(rows, key=lambda r: (r["mention_index"], r["candidate_index"] or 0)):
            if r["candidate_index"] is not None:
                per[r["mention_index"]].append({"label": r["label"], "box_px": [float(v) for v in r["box_px"]],
                                                "source": r["source"], "score": r["score"], "note": r.get("note")})
        return {**it, "candidates": per}


class VerifyStage(_ModelStage):
    """The verifier's choice per mention among its candidates; every verdict (raw text included) is kept."""

    name = "verify"
    batch_size = 16
    kind = "verifier"

    def __init__(self, spec: AnnotatorSpec, cache_path: str | None = None, gpus: float = 0.0,
                 torch_threads: int | None = None, batch_size: int | None = None,
                 min_confidence: float = 0.5) -> None:
        super().__init__(spec, cache_path, gpus, torch_threads, batch_size)
        self.min_confidence = min_confidence

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        from annotators.common import Candidate
        from annotators.parsing import ModelOutputError
        from annotators.vlm import VerifyRequest, VLMTransportError

        requests, where = [], []
        images: dict[int, Any] = {}
        for b, it in enumerate(batch):
            for i, (e, cands) in enumerate(zip(it["entities"], it["candidates"])):
                if not cands:
                    continue
                if b not in images:
                    images[b] = _load_rgb(it["image_path"])
                cs = [Candidate(e["text"], c["label"], tuple(c["box_px"]), c["source"], c["score"], i) for c in cands]
                requests.append(VerifyRequest(images[b], _mention_of(it, e), cs))
                where.append((b, i))
        try:
            results = self.annotator.verify_many(requests) if requests else []
        except (VLMTransportError, OSError, ImportError) as exc:  # an endpoint down for good, a model that cannot load
            raise self._unavailable(exc) from exc
        verdicts: list[list[dict[str, Any]]] = [
            [{"choice": None, "confidence": None, "raw": None, "attempts": None, "error": None,
              "decision": "no_candidates", "reason": "no_candidates", "prompt_version": None}
             for _ in it["entities"]] for it in batch]
        for (b, i), res in zip(where, results):
            if isinstance(res, ModelOutputError):
                verdicts[b][i] = {"choice": None, "confidence": None, "raw": res.raw, "attempts": list(res.attempts),
                                  "error": res.reason, "decision": "malformed_output",
                                  "reason": "verifier_malformed_output", "prompt_version": None}
                continue
            conf = float(res.confidence)
            if res.choice is None:
                decision, reason = "none", "verifier_none"
            elif conf < self.min_confidence:
                decision, reason = "low_confidence", "low_confidence"
            else:
                decision, reason = "chosen", None
            verdicts[b][i] = {"choice": None if res.choice is None else int(res.choice), "confidence": conf,
                              "raw": res.raw, "attempts": [res.raw], "error": None, "decision": decision,
                              "reason": reason, "prompt_version": res.prompt_version}
        return [{**it, "verdicts": v} for it, v in zip(batch, verdicts)], []

    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        rows = []
        model_id = getattr(self.annotator, "model_id", None)
        for it in outputs:
            w, h = it["width"], it["height"]
            for i, (e, cands, v) in enumerate(zip(it["entities"], it["candidates"], it["verdicts"])):
                chosen = cands[v["choice"]] if v["choice"] is not None else None
                rows.append({
                    "key": it["key"], "record_id": it["id"], "mention_index": i, "mention_text": e["text"],
                    "category": e["category"], "n_candidates": len(cands),
                    "candidate_boxes_px": json.dumps([c["box_px"] for c in cands]),
                    "candidate_boxes_norm": json.dumps([_norm_box(c["box_px"], w, h) for c in cands]),
                    "choice": v["choice"], "confidence": v["confidence"],
                    "chosen_box_px": chosen["box_px"] if chosen else None,
                    "chosen_box_norm": _norm_box(chosen["box_px"], w, h) if chosen else None,
                    "source": chosen["source"] if chosen else None,
                    "raw_text": v["raw"], "attempts": None if v["attempts"] is None else json.dumps(v["attempts"]),
                    "parse_error": v["error"], "decision": v["decision"], "reason": v["reason"],
                    "prompt_version": v["prompt_version"], "model_id": model_id,
                })
        return rows

    @staticmethod
    def sample_from_rows(it: Item, rows: list[Row]) -> Item:
        got = by_mention(rows)
        vs = []
        for i in range(len(it["entities"])):
            r = got[i]
            vs.append({"choice": r["choice"], "confidence": r["confidence"], "raw": r["raw_text"],
                       "attempts": None if r["attempts"] is None else json.loads(r["attempts"]),
                       "error": r["parse_error"], "decision": r["decision"], "reason": r["reason"],
                       "prompt_version": r["prompt_version"]})
        return {**it, "verdicts": vs}


class RewriteStage(_ModelStage):
    """Instance-level descriptions for grounded mentions (generic ones by default), from the VLM.

    "the chair" becomes e.g. "the blue chair by the window" when other chairs are about: the text
    then names one object. The other boxes of the same class (other mentions' boxes, the mention's
    unchosen candidates) go into the prompt as contrast.
    """

    name = "rewrite"
    batch_size = 16
    kind = "verifier"

    def __init__(self, spec: AnnotatorSpec, cache_path: str | None = None, gpus: float = 0.0,
                 torch_threads: int | None = None, batch_size: int | None = None, policy: str = "generic",
                 max_others: int = 5) -> None:
        if policy not in ("generic", "all"):
            raise ValueError(f"rewrite policy must be generic|all, got {policy!r}")
        super().__init__(spec, cache_path, gpus, torch_threads, batch_size)
        self.policy = policy
        self.max_others = max_others

    def _wanted(self, e: dict[str, Any], a: dict[str, Any]) -> bool:
        if a["decision"] not in ("grounded", "coreferent"):
            return False
        return self.policy == "all" or e["key"] == e["category"]  # generic: no modifier words

    def _others(self, it: Item, i: int) -> list[list[float]]:
        box = it["assigned"][i]["box_px"]
        cat = it["entities"][i]["category"]
        others: list[list[float]] = []
        for j, (e, a) in enumerate(zip(it["entities"], it["assigned"])):
            if j != i and e["category"] == cat and a["box_px"] and box_iou(a["box_px"], box) < 0.5:
                others.append(a["box_px"])
        for c in it["candidates"][i]:
            if box_iou(c["box_px"], box) < 0.5 and all(box_iou(c["box_px"], o) < 0.5 for o in others):
                others.append(c["box_px"])
        return others[: self.max_others]

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        from annotators.parsing import ModelOutputError
        from annotators.vlm import RewriteRequest, VLMTransportError

        requests, where = [], []
        images: dict[int, Any] = {}
        rewrites: list[list[dict[str, Any] | None]] = [[None] * len(it["entities"]) for it in batch]
        for b, it in enumerate(batch):
            if it["failure"]:
                continue
            for i, (e, a) in enumerate(zip(it["entities"], it["assigned"])):
                if not self._wanted(e, a):
                    continue
                if b not in images:
                    images[b] = _load_rgb(it["image_path"])
                others = self._others(it, i)
                requests.append(RewriteRequest(images[b], _mention_of(it, e), tuple(a["box_px"]),
                                               tuple(tuple(o) for o in others)))
                where.append((b, i, others))
        try:
            results = self.annotator.rewrite_many(requests) if requests else []
        except (VLMTransportError, OSError, ImportError) as exc:  # an endpoint down for good, a model that cannot load
            raise self._unavailable(exc) from exc
        out = []
        failures: dict[int, dict[str, str]] = {}
        for (b, i, others), res in zip(where, results):
            if isinstance(res, ModelOutputError):
                rewrites[b][i] = {"text": None, "raw": res.raw, "error": res.reason, "others": others}
                failures.setdefault(b, {
                    "reason": "rewrite_malformed_output",
                    "message": _truncate(f"{batch[b]['entities'][i]['text']!r}: {res.reason}; raw: {res.raw!r}", 1800),
                    "stage": self.name})
            else:
                rewrites[b][i] = {"text": res.text, "raw": res.raw, "error": None, "others": others}
        for b, it in enumerate(batch):
            o = {**it, "rewrites": rewrites[b]}
            if b in failures:
                o["failure"] = failures[b]
            out.append(o)
        return out, []

    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        rows = []
        for it in outputs:
            emitted = False
            for i, (e, r) in enumerate(zip(it["entities"], it["rewrites"])):
                if r is None:
                    continue
                box = it["assigned"][i]["box_px"]
                rows.append({"key": it["key"], "record_id": it["id"], "mention_index": i, "mention_text": e["text"],
                             "category": e["category"], "box_px": box,
                             "box_norm": _norm_box(box, it["width"], it["height"]),
                             "others_px": json.dumps(r["others"]), "rewritten": r["text"], "raw_text": r["raw"],
                             "parse_error": r["error"], "decision": "malformed_output" if r["error"] else "rewritten",
                             "failure": json.dumps(it["failure"]) if it["failure"] else None})
                emitted = True
            if not emitted:  # one row per sample at least, so a re-run can tell the chunk is complete
                rows.append({"key": it["key"], "record_id": it["id"], "mention_index": None, "mention_text": None,
                             "decision": "nothing_to_rewrite",
                             "failure": json.dumps(it["failure"]) if it["failure"] else None})
        return rows

    @staticmethod
    def sample_from_rows(it: Item, rows: list[Row]) -> Item:
        rewrites: list[dict[str, Any] | None] = [None] * len(it["entities"])
        for r in rows:
            if r["mention_index"] is not None:
                rewrites[r["mention_index"]] = {"text": r["rewritten"], "raw": r["raw_text"],
                                                "error": r["parse_error"], "others": json.loads(r["others_px"])}
        failure = json.loads(rows[0]["failure"]) if rows[0]["failure"] else None
        return {**it, "rewrites": rewrites, "failure": failure}
