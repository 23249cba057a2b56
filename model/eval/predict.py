"""GR3D detections for the Omni3D protocol: target-aware prompting and answer -> Omni3D instances.

GR3D has no detection head: per image it is asked, once per category present in the ground truth
(target-aware, as in the paper's Omni3D evaluation), to detect all objects of that category. Its
answer lists objects as `<bbox>[..]</bbox><region><3d_box ...></3d_box>`. Each 3D box becomes one
detection; its confidence is the mean log-probability of the tokens that spell the object (from its
2D box to the end of its 3D box), so objects the model is unsure of rank lower. A model trained on direct-3D
answers (`GR3DConfig.det3d_answer == "direct"`) writes only the 3D boxes; each then has no 2D box and
`answer_to_instances` uses its projected corners. When the token
pieces do not line up with the text (a tokenizer that does not decode piecewise), the answer-level
mean log-probability is used for all its objects.

The conversion is pure (text + token pieces in, instances out); `predict_omni3d` drives a model and
imports torch only when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from schemas import grammar, prompts
from schemas.camera import box_corners, normalization_scale

__all__ = ["DEFAULT_PROMPT", "ParsedObject", "parse_answer", "answer_to_instances", "predict_omni3d"]

DEFAULT_PROMPT = prompts.DETECT_3D[0]
"""The corpus's canonical detection question (schemas.prompts, variant 0); {plural}, {name}, {category} are filled."""
"""Must match the det3d corpus' detect_3d question; `{category}` is the Omni3D category name."""


class ParsedObject:
    """One object of an answer: 2D box (normalized xyxy) or None, the 3D box, its text span, its score."""

    __slots__ = ("bbox2d", "box3d", "start", "end", "score")

    def __init__(
        self, bbox2d: tuple[float, ...] | None, box3d: grammar.Box3D, start: int, end: int, score: float
    ) -> None:
        self.bbox2d, self.box3d, self.start, self.end, self.score = bbox2d, box3d, start, end, score


def _scan(
    text: str, open_tag: str, close_tag: str, parse: Callable[[str], Any]
) -> list[tuple[Any, int, int]]:
    """Every well-formed `open..close` element; malformed ones (e.g. cut off by the token limit) are skipped."""
    out = []
    pos = text.find(open_tag)
    while pos >= 0:
        end = text.find(close_tag, pos)
        if end < 0:
            break
        end += len(close_tag)
        try:
            out.append((parse(text[pos:end]), pos, end))
        except grammar.GrammarError:
            pass
        pos = text.find(open_tag, pos + 1)
    return out


def _span_scores(
    spans: Sequence[tuple[int, int]], text: str, pieces: Sequence[tuple[str, float | None]] | None
) -> list[float] | None:
    """Mean log-prob of the tokens overlapping each [start, end) span; None when pieces do not spell `text`."""
    if not pieces:
        return None
    offsets, pos = [], 0
    for s, lp in pieces:
        offsets.append((pos, pos + len(s), lp))
        pos += len(s)
    joined = "".join(s for s, _ in pieces)
    if not joined.startswith(text):
        return None
    scores = []
    for a, b in spans:
        lps = [lp for (s0, s1, lp) in offsets if lp is not None and s0 < b and s1 > a]
        scores.append(float(np.mean(lps)) if lps else -math.inf)
    return scores


def parse_answer(
    text: str, pieces: Sequence[tuple[str, float | None]] | None = None, fallback_score: float = 0.0
) -> list[ParsedObject]:
    """The objects of one detection answer, in order.

    `pieces` are the generated tokens as (decoded text, log-prob), region slots with log-prob None.
    A 3D box takes the last well-formed 2D box between the previous 3D box and itself.
    """
    boxes3d = _scan(text, grammar.BOX3D_OPEN, grammar.BOX3D_CLOSE, grammar.parse_box3d)
    boxes2d = _scan(text, grammar.BBOX_OPEN, grammar.BBOX_CLOSE, grammar.parse_bbox2d)
    objs: list[ParsedObject] = []
    prev_end = 0
    for box, s, e in boxes3d:
        cands = [(b, bs) for b, bs, be in boxes2d if be <= s and bs >= prev_end]
        b2, start = (cands[-1][0], cands[-1][1]) if cands else (None, s)
        objs.append(ParsedObject(b2, box, start, e, fallback_score))
        prev_end = e
    scores = _span_scores([(o.start, o.end) for o in objs], text, pieces)
    if scores is not None:
        for o, sc in zip(objs, scores):
            o.score = sc
    return objs


def answer_to_instances(
    objects: Iterable[ParsedObject], image_id: int, category_id: int, width: int, height: int,
    K: Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Omni3D prediction instances with every field Cube R-CNN's `instances_to_coco_json` writes.

    image_id, category_id, bbox (XYWH px: the answer's 2D box, else the projected 3D box clipped to the
    image; needs K), score = exp(mean log-probability) in [0, 1], depth (mean corner z), bbox3D (8 corners,
    camera frame, Omni3D order), center_cam, center_2D (projected center, px; needs K), dimensions [w, h, l]
    and pose (3x3 rotation, camera frame); plus `logprob`, the mean log-probability itself, and
    `bbox_source` ("answer" | "projected"). docs/det3d.md "Predictions" has the mapping.
    """
    from model.eval.io import projected_bbox

    Km = None if K is None else np.asarray(K, dtype=np.float64)
    out = []
    for o in objects:
        center, dims, R = grammar.box3d_to_pose(o.box3d)
        corners = box_corners(center, dims, R)
        center = np.asarray(center, dtype=np.float64)
        logprob = float(o.score)
        inst: dict[str, Any] = {
            "image_id": image_id,
            "category_id": category_id,
            "score": math.exp(min(logprob, 0.0)) if math.isfinite(logprob) else 0.0,
            "logprob": logprob,
            "depth": float(corners[:, 2].mean()),
            "bbox3D": corners.tolist(),
            "center_cam": center.tolist(),
            "dimensions": [float(v) for v in dims],
            "pose": np.asarray(R, dtype=np.float64).tolist(),
        }
        if Km is not None and center[2] > 1e-6:
            u, v, w = Km @ center
            inst["center_2D"] = [float(u / w), float(v / w)]
        if o.bbox2d is not None:
            x1, y1, x2, y2 = o.bbox2d
            inst["bbox"] = [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height]
            inst["bbox_source"] = "answer"
        elif (proj := projected_bbox(corners, Km, (width, height))) is not None:
            inst["bbox"] = list(proj)
            inst["bbox_source"] = "projected"
        out.append(inst)
    return out


def _pieces(result: Any, tokenizer: Any, region_id: int | None) -> list[tuple[str, float | None]]:
    """(decoded token, log-prob) per generated id; region slots carry no log-prob."""
    lps = iter(result.token_logprobs)
    out: list[tuple[str, float | None]] = []
    for tid in result.token_ids:
        piece = tokenizer.decode([tid], skip_special_tokens=False)
        out.append((piece, None if tid == region_id else next(lps, None)))
    return out


def predict_omni3d(
    model: Any,
    gt_images: Sequence[dict[str, Any]],
    image_root: str | Path,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    logits_processor_factory: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run GR3D target-aware on images and return Omni3D per-image predictions.

    `gt_images`: {"id", "file_path", "width", "height", "K", "categories": [(category_id, name), ...]},
    the categories present in that image's ground truth. The image is shown at scale 1000 / fx.
    `logits_processor_factory` makes one logits processor per generate call (grammar-constrained decoding:
    `model.constrained.GrammarConstraint`).
    """
    from PIL import Image

    from model.generate import generate

    tok = model.tokenizer
    region_id = tok.convert_tokens_to_ids(grammar.REGION)
    jobs: list[tuple[dict[str, Any], int, str]] = [
        (im, cid, prompt.format(category=name, name=name, plural=prompts.plural(name)))
        for im in gt_images
        for cid, name in im["categories"]
    ]
    per_image: dict[int, dict[str, Any]] = {
        int(im["id"]): {
            "image_id": int(im["id"]),
            "K": im["K"],
            "width": im["width"],
            "height": im["height"],
            "instances": [],
        }
        for im in gt_images
    }
    root = Path(image_root)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b : b + batch_size]
        images = []
        for im, _, _ in batch:
            with Image.open(root / im["file_path"]) as f:
                images.append(f.convert("RGB"))
        scales = [normalization_scale(im["K"]) for im, _, _ in batch]
        results = generate(
            model, images, [p for _, _, p in batch], max_new_tokens=max_new_tokens, scales=scales,
            logits_processor=logits_processor_factory() if logits_processor_factory is not None else None,
        )
        for (im, cid, _), res in zip(batch, results):
            objs = parse_answer(res.text, _pieces(res, tok, region_id), fallback_score=res.mean_logprob)
            per_image[int(im["id"])]["instances"] += answer_to_instances(
                objs, int(im["id"]), cid, int(im["width"]), int(im["height"]), im["K"]
            )
        if progress is not None:
            progress(min(b + batch_size, len(jobs)), len(jobs))
    return list(per_image.values())
