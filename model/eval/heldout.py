"""Held-out evaluation of a trained GR3D: region -> 3D, detect_3d (Omni3D protocol) and 2D grounding.

Everything is scored on scenes the model never trained on (the sample world's `val` split, or any
Omni3D JSON + a built cot corpus of held-out images):

- **region -> 3D**: per non-ignored ground-truth object, its 2D box is the region prompt
  (`schemas.prompts.REGION_TO_3D[0]`, the box as `<bbox>[..]</bbox><region>`); the first 3D box of the
  answer is a detection of the object's category scored by the answer's mean token log-probability;
  Omni3D AP3D / AP15 / AP25 over those detections, plus the median relative depth error
  |z_pred - z_gt| / z_gt (an answer without a parseable box counts as an infinite error);
- **detect_3d**: `model.eval.predict.predict_omni3d` (target-aware prompting) + the Omni3D protocol;
- **2D grounding Acc@0.5**: for every grounded mention in the first answer of a held-out grounded-CoT
  record, the question is asked and the answer up to the mention's `<bbox>` is given (teacher forcing),
  and the box the model then writes is compared with the corpus's box (IoU >= 0.5; no box = a miss).

`constrained=True` decodes with `model.constrained.GrammarConstraint` (a box always parses).
The category-prior baseline (`CategoryPrior`) answers the same questions without a model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.eval.omni3d_ap import Detection, GroundTruthSet
from schemas import grammar, prompts
from schemas.camera import box_corners, normalization_scale

__all__ = ["region3d_jobs", "score_region3d", "eval_region3d", "eval_detect3d", "grounding_items", "eval_grounding",
           "CategoryPrior", "summary"]

Progress = Callable[[int, int], None] | None


@dataclass
class RegionJob:
    image_id: int
    category_id: int
    category: str
    box: tuple[float, float, float, float]
    """Normalized xyxy 2D box of the object (the region prompt)."""
    bbox_px: tuple[float, float, float, float]
    depth: float


def region3d_jobs(gt: GroundTruthSet) -> list[RegionJob]:
    """One job per non-ignored ground-truth object with a 2D box, in image then GT order."""
    jobs = []
    for g in gt.instances:
        if g.ignore or g.bbox is None:
            continue
        w, h = gt.image_sizes[g.image_id]
        x, y, bw, bh = g.bbox
        box = (max(0.0, x / w), max(0.0, y / h), min(1.0, (x + bw) / w), min(1.0, (y + bh) / h))
        jobs.append(RegionJob(g.image_id, g.category_id, gt.categories[g.category_id], box, tuple(g.bbox), g.depth))
    return jobs


def _first_box3d(text: str) -> grammar.Box3D | None:
    from model.eval.predict import _scan

    found = _scan(text, grammar.BOX3D_OPEN, grammar.BOX3D_CLOSE, grammar.parse_box3d)
    return found[0][0] if found else None


def _corners(box: grammar.Box3D) -> np.ndarray:
    center, dims, R = grammar.box3d_to_pose(box)
    return box_corners(center, dims, R)


def score_region3d(gt: GroundTruthSet, jobs: Sequence[RegionJob],
                   answers: Sequence[tuple[np.ndarray | None, float]]) -> dict[str, Any]:
    """Omni3D AP of one answer (corners or None, score) per job, and the median relative depth error."""
    from model.eval.omni3d_ap import evaluate

    dets, errs = [], []
    for job, (corners, score) in zip(jobs, answers):
        if corners is None:
            errs.append(math.inf)
            continue
        d = Detection(job.image_id, job.category_id, float(score), corners, bbox=job.bbox_px)
        dets.append(d)
        errs.append(abs(float(d.depth) - job.depth) / job.depth)
    res = evaluate(gt, dets)
    o = res["overall"]
    return {"AP3D": o.get("AP3D"), "AP15": o.get("AP15"), "AP25": o.get("AP25"),
            "median_rel_depth_error": float(np.median(errs)) if errs else float("nan"),
            "n": len(jobs), "n_parsed": len(dets)}


def _open_rgb(root: Path, rel: str) -> Any:
    from PIL import Image

    with Image.open(root / rel) as f:
        return f.convert("RGB")


def _constraint(model: Any, kind: str, constrained: bool, max_items: int = 4) -> Any:
    if not constrained:
        return None
    from model.constrained import GrammarConstraint

    return GrammarConstraint(model.tokenizer, kind, max_items=max_items)


def eval_region3d(model: Any, gt: GroundTruthSet, image_root: str | Path, constrained: bool = True,
                  batch_size: int = 16, max_new_tokens: int = 100, progress: Progress = None) -> dict[str, Any]:
    """Region -> 3D on every non-ignored object of `gt` (restrict `gt` with `.subset` to go faster)."""
    from model.generate import generate

    jobs = region3d_jobs(gt)
    root = Path(image_root)
    answers: list[tuple[np.ndarray | None, float]] = []
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        images = [_open_rgb(root, gt.image_files[j.image_id]) for j in batch]
        scales = [normalization_scale(gt.image_K[j.image_id]) for j in batch]
        qs = [prompts.region_to_3d_prompt(grammar.format_grounded(j.box), variant=0) for j in batch]
        res = generate(model, images, qs, max_new_tokens=max_new_tokens, scales=scales,
                       logits_processor=_constraint(model, "box3d", constrained))
        for r in res:
            box = _first_box3d(r.text)
            answers.append((_corners(box) if box is not None else None, r.mean_logprob))
        if progress is not None:
            progress(min(b + batch_size, len(jobs)), len(jobs))
    return score_region3d(gt, jobs, answers)


def eval_detect3d(model: Any, gt: GroundTruthSet, image_root: str | Path, constrained: bool = True,
                  batch_size: int = 16, max_new_tokens: int = 300, max_items: int = 3,
                  progress: Progress = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """detect_3d with the Omni3D protocol: (metrics, per-image predictions)."""
    from model.constrained import detect_kind
    from model.eval.io import parse_predictions
    from model.eval.omni3d_ap import evaluate
    from model.eval.predict import predict_omni3d

    preds = predict_omni3d(model, gt.prediction_jobs(), image_root, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress,
                           logits_processor_factory=(lambda: _constraint(model, detect_kind(model.config), True, max_items))
                           if constrained else None)
    res = evaluate(gt, parse_predictions(preds, gt))
    o = res["overall"]
    n_inst = sum(len(p["instances"]) for p in preds)
    return {"AP3D": o.get("AP3D"), "AP15": o.get("AP15"), "AP25": o.get("AP25"), "n_images": len(preds),
            "n_predictions": n_inst}, preds


# ---------------------------------------------------------------------------------------------- grounding

@dataclass
class GroundingItem:
    id: str
    image: bytes
    question: str
    prefix: str
    reference: tuple[float, float, float, float]
    category: str | None


def _records_with_images(build_dir: Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, image bytes) of every sample of a build, in shard order (`shards.reader.iter_tar`)."""
    from shards.reader import iter_tar

    tars = sorted((build_dir / "shards").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards/*.tar under {build_dir}")
    for t in tars:
        for sample in iter_tar(t):
            img = next((sample[e] for e in ("png", "jpg", "jpeg") if e in sample), None)
            if "json" in sample and img is not None:
                yield sample["json"], img


def grounding_items(build_dir: str | Path, limit: int | None = None) -> list[GroundingItem]:
    """Every grounded mention of the first round of each record's grounded_cot conversation."""
    items: list[GroundingItem] = []
    for rec, img in _records_with_images(Path(build_dir)):
        conv = next((c for c in rec.get("conversations", []) if c.get("task") == "grounded_cot"), None)
        if conv is None or len(conv["turns"]) < 2:
            continue
        question = conv["turns"][0]["value"].replace("<image>\n", "").replace("<image>", "")
        answer = conv["turns"][1]["value"]
        mentions = rec.get("mentions") or []
        for i, g in enumerate(grammar.find_grounded(answer)):
            cat = mentions[i].get("category") if i < len(mentions) else None
            items.append(GroundingItem(f"{rec['key']}/{i}", img, question, answer[:g.start], g.box, cat))
            if limit is not None and len(items) >= limit:
                return items
    return items


def eval_grounding(model: Any, items: Sequence[GroundingItem], constrained: bool = True, batch_size: int = 16,
                   max_new_tokens: int = 48, progress: Progress = None) -> dict[str, Any]:
    """Acc@0.5 of the box written after the teacher-forced prefix of each item."""
    from PIL import Image

    from model.eval.ground2d import grounding_accuracy
    from model.eval.predict import _scan
    from model.generate import generate

    preds: dict[str, list[float] | None] = {}
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        images = [Image.open(io.BytesIO(it.image)).convert("RGB") for it in batch]
        res = generate(model, images, [it.question for it in batch], max_new_tokens=max_new_tokens,
                       prefixes=[it.prefix for it in batch], logits_processor=_constraint(model, "bbox", constrained))
        for it, r in zip(batch, res):
            found = _scan(r.text, grammar.BBOX_OPEN, grammar.BBOX_CLOSE, grammar.parse_bbox2d)
            preds[it.id] = list(found[0][0]) if found else None
        if progress is not None:
            progress(min(b + batch_size, len(items)), len(items))
    out = grounding_accuracy(preds, {it.id: list(it.reference) for it in items})
    return {"acc50": out["accuracy"], "mean_iou": out["mean_iou"], "n": out["n"], "n_missing": out["n_missing"]}


# ---------------------------------------------------------------------------------------------- prior

class CategoryPrior:
    """The no-model baseline: per category, the training set's mean camera-frame box at the mean depth.

    Region -> 3D: the mean box (camera-axis aligned, mean dimensions) moved along the ray through the 2D
    box's centre to the category's mean depth. detect_3d: one detection per (image, category present) at
    the mean centre. Grounding: the category's mean normalized 2D box over the training mentions.
    """

    def __init__(self, train_omni3d: str | Path, train_cot: str | Path | None = None) -> None:
        data = json.loads(Path(train_omni3d).read_text())
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        acc: dict[str, list[tuple[list[float], list[float]]]] = {}
        for a in data["annotations"]:
            if a.get("behind_camera") or not a.get("valid3D", True):
                continue
            acc.setdefault(names[int(a["category_id"])], []).append((a["center_cam"], a["dimensions"]))
        self.center = {c: np.mean([v[0] for v in vs], axis=0) for c, vs in acc.items()}
        self.dims = {c: np.mean([v[1] for v in vs], axis=0) for c, vs in acc.items()}
        self.box2d: dict[str | None, np.ndarray] = {}
        if train_cot is not None:
            boxes: dict[str | None, list[tuple[float, ...]]] = {}
            for it in grounding_items(train_cot):
                boxes.setdefault(it.category, []).append(it.reference)
                boxes.setdefault(None, []).append(it.reference)
            self.box2d = {c: np.mean(v, axis=0) for c, v in boxes.items()}

    def _box(self, center: np.ndarray, category: str) -> np.ndarray:
        return box_corners(center, self.dims[category], np.eye(3))

    def region3d(self, gt: GroundTruthSet) -> dict[str, Any]:
        jobs = region3d_jobs(gt)
        answers: list[tuple[np.ndarray | None, float]] = []
        for j in jobs:
            if j.category not in self.center:
                answers.append((None, 0.0))
                continue
            K = gt.image_K[j.image_id]
            w, h = gt.image_sizes[j.image_id]
            u, v = (j.box[0] + j.box[2]) / 2 * w, (j.box[1] + j.box[3]) / 2 * h
            z = float(self.center[j.category][2])
            ray = np.linalg.solve(K, np.array([u, v, 1.0]))
            answers.append((self._box(ray * z / ray[2], j.category), 1.0))
        return score_region3d(gt, jobs, answers)

    def detect3d(self, gt: GroundTruthSet) -> dict[str, Any]:
        from model.eval.omni3d_ap import evaluate

        dets = [Detection(int(im["id"]), cid, 1.0, self._box(self.center[name], name))
                for im in gt.prediction_jobs() for cid, name in im["categories"] if name in self.center]
        o = evaluate(gt, dets)["overall"]
        return {"AP3D": o.get("AP3D"), "AP15": o.get("AP15"), "AP25": o.get("AP25"), "n_predictions": len(dets)}

    def grounding(self, items: Sequence[GroundingItem]) -> dict[str, Any]:
        from model.eval.ground2d import grounding_accuracy

        fallback = self.box2d.get(None)
        preds = {}
        for it in items:
            b = self.box2d.get(it.category, fallback)
            preds[it.id] = None if b is None else [float(x) for x in b]
        out = grounding_accuracy(preds, {it.id: list(it.reference) for it in items})
        return {"acc50": out["accuracy"], "mean_iou": out["mean_iou"], "n": out["n"], "n_missing": out["n_missing"]}


def summary(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and spread (max - min) over seeds; None values (metric undefined) are left out."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {"mean": None, "spread": None, "n": 0}
    return {"mean": float(np.mean(v)), "spread": float(max(v) - min(v)), "n": len(v)}
