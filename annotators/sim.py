"""Simulated annotators: the oracle's ground truth with realistic, recorded errors.

Why: the oracle (`annotators/oracle.py`) makes a perfect corpus, so the audit of an oracle build
can only say 100 %, and nothing trains on realistic annotation noise. `SimTagger` and
`SimVerifier` answer like Florence-2 and a VLM verifier/rewriter, with the error modes those
models show, at rates set by flags (`--sim-*`, defaults and their sources in docs/annotators.md),
and record every error they inject, so the audit can be checked against what was injected and the
noise -> model-quality curve can be measured (bench/noise_impact.py).

Every draw is deterministic from (seed, role, the mention's ground-truth key): a rebuild, another
executor or another chunking gives the same corpus. `noise_scale` multiplies every rate and the box
deviation (0 = the oracle, 2 = twice the default noise; probabilities are capped at 1).

Tagger, per mention (the first outcome that fires, in this order, among those possible):
- `miss`: no candidate at all;
- `wrong_instance`: the first candidate is another object of the same category in the view
  (possible when the view has one);
- `other_category`: the first candidate is an object of another category in the view;
- otherwise `correct`: the true box, made loose (grown) or tight (shrunk) about its centre to an
  IoU of 1 - d with the truth, d ~ Beta(box_a, box_b) x noise_scale (so a few boxes fall below 0.5);
then, independently: with `true_also` a wrong first candidate is followed by the true box; with
`duplicate` a near-copy (IoU ~ 0.6-0.85 with the first box) is appended; with `hallucinated` a box
on no object is appended.

Verifier, per mention with candidates ("right" = IoU >= 0.5 with the truth): `refuse` -> no choice;
else, when a wrong candidate is shown, `accept_wrong` -> picks it; else a right candidate exists:
`reject_right` -> no choice, otherwise picks it; else (only wrong ones) -> no choice (a correct
refusal). Rewriter: when other objects of the category are in the view, `ambiguous_rewrite` ->
"the <category>" (form `category`: it fits every object of the category) or, half the time when another
object of the category has another colour, "the <that colour> <category>" (form `other_colour`: it names
that other object): a description that does not single the object out.

What was injected: per candidate in `Candidate.note` (the tag intermediate's `injected` column
holds the mention's draw as JSON); per verdict and rewrite in the `raw` JSON (`"injected"`), which the
verify/rewrite intermediates keep.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from annotators.common import Candidate, MentionLike, mention_text
from annotators.oracle import GroundTruthMention, OracleVerifier, _GroundTruth, box_iou
from annotators.parsing import ModelOutputError
from annotators.vlm import Rewrite, Verdict

__all__ = ["SIM_VERSION", "SIM_RATES", "SimRates", "SimTagger", "SimVerifier", "TaggerDraw", "perturb_box"]

SIM_VERSION = "sim-v1"
RIGHT_IOU = 0.5

# name -> (default, help). The defaults and their sources are explained in docs/annotators.md.
SIM_RATES: dict[str, tuple[float, str]] = {
    "miss": (0.04, "tagger: P(a mention gets no box)"),
    "wrong_instance": (0.07, "tagger: P(first box is another object of the same category), where one is in view"),
    "other_category": (0.03, "tagger: P(first box is an object of another category)"),
    "box_a": (1.2, "tagger: box deviation d = 1 - IoU ~ Beta(box_a, box_b) x noise scale (alpha)"),
    "box_b": (6.0, "tagger: box deviation Beta beta (mean d = a / (a + b))"),
    "loose": (0.5, "tagger: P(an imprecise box is loose, i.e. grown; else tight, i.e. shrunk)"),
    "true_also": (0.5, "tagger: P(a wrong first box is followed by the true box)"),
    "duplicate": (0.10, "tagger: P(a near-copy of the first box is added)"),
    "hallucinated": (0.05, "tagger: P(a box on no object is added)"),
    "refuse": (0.03, "verifier: P(it answers none whatever it is shown)"),
    "accept_wrong": (0.20, "verifier: P(it picks a wrong candidate when one is shown)"),
    "reject_right": (0.05, "verifier: P(it answers none although a right candidate is shown)"),
    "ambiguous_rewrite": (0.10, "rewriter: P(a rewrite does not single out the object among its category)"),
}
_NOT_SCALED = ("box_a", "box_b", "loose")  # shape parameters, not error rates


@dataclass(frozen=True)
class SimRates:
    """Error rates of the simulated annotators (see SIM_RATES) and the multiplier of all of them."""

    noise_scale: float = 1.0
    seed: int = 0
    rates: dict[str, float] = field(default_factory=lambda: {k: v for k, (v, _) in SIM_RATES.items()})

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(SIM_RATES)
        if unknown:
            raise ValueError(f"unknown sim rate(s) {sorted(unknown)}; known: {sorted(SIM_RATES)}")
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")
        for k, v in self.rates.items():
            if k in ("box_a", "box_b"):
                if not v > 0:
                    raise ValueError(f"sim rate {k} must be > 0, got {v}")
            elif not 0.0 <= v <= 1.0:
                raise ValueError(f"sim rate {k} must be in [0, 1], got {v}")

    def p(self, name: str) -> float:
        """The effective probability of an error (rate x noise_scale, capped at 1)."""
        v = self.rates.get(name, SIM_RATES[name][0])
        return v if name in _NOT_SCALED else min(1.0, v * self.noise_scale)

    def as_config(self) -> dict[str, Any]:
        return {"noise_scale": self.noise_scale, "seed": self.seed,
                "rates": {k: self.rates.get(k, SIM_RATES[k][0]) for k in SIM_RATES}}


def _rates(noise_scale: float, seed: int, rates: dict[str, float] | None) -> SimRates:
    full = {k: v for k, (v, _) in SIM_RATES.items()}
    full.update({k: float(v) for k, v in (rates or {}).items()})
    return SimRates(float(noise_scale), int(seed), full)


def _rng(seed: int, role: str, g: GroundTruthMention) -> np.random.Generator:
    h = hashlib.sha256(f"{SIM_VERSION}|{seed}|{role}|{g.record_id}|{g.turn}|{g.start}|{g.end}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _clip(box: Sequence[float], w: float, h: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def perturb_box(box: Sequence[float], iou: float, loose: bool, aspect: float,
                size: tuple[float, float]) -> tuple[float, float, float, float]:
    """`box` grown (loose) or shrunk (tight) about its centre to IoU `iou` with itself, clipped to the image.

    Why scaling about the centre: a box containing (or contained in) the truth has IoU = the area
    ratio, so the drawn IoU is met exactly before clipping; `aspect` in [-0.5, 0.5] splits the area
    change unevenly between width and height, so imprecise boxes are not all similar to the truth.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    s = 1.0 / math.sqrt(iou) if loose else math.sqrt(iou)  # linear factor, area factor s^2
    sx, sy = s ** (1 + aspect), s ** (1 - aspect)
    cx, cy, bw, bh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1), (y2 - y1)
    return _clip((cx - bw * sx / 2, cy - bh * sy / 2, cx + bw * sx / 2, cy + bh * sy / 2), *size)


@dataclass
class TaggerDraw:
    """What the simulated tagger did for one mention (the recorded truth of the tag stage)."""

    outcome: str  # miss | wrong_instance | other_category | correct
    first_object: str | None = None  # object id of the first box (None: miss)
    box_mode: str | None = None  # loose | tight (correct outcome only)
    first_iou: float | None = None  # IoU of the first box with the true box
    true_also: bool = False
    duplicate: bool = False
    hallucinated: bool = False
    candidates: list[tuple[tuple[float, float, float, float], str]] = field(default_factory=list)
    candidate_ious: list[float] = field(default_factory=list)  # each candidate's IoU with the true box

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [note for _, note in self.candidates]
        return d


class SimTagger(_GroundTruth):
    """Florence-2 stand-in: the ground-truth box with per-mention errors (module docstring)."""

    calls = 0

    def __init__(self, gt_path: str | Path, noise_scale: float = 1.0, seed: int = 0,
                 rates: dict[str, float] | None = None) -> None:
        super().__init__(gt_path)
        self.sim = _rates(noise_scale, seed, rates)
        self.model_id = f"sim:{self.model_id}|{json.dumps(self.sim.as_config(), sort_keys=True)}"
        self._draws: dict[tuple[str, int, int, int], TaggerDraw] = {}

    def setup(self) -> None:
        """Nothing to load; present for the stage interface."""

    def draw(self, m: MentionLike, size: tuple[float, float]) -> TaggerDraw | None:
        """The tagger's deterministic answer for one mention; None when the ground truth lacks it."""
        g = self.lookup(m)
        if g is None:
            return None
        key = (g.record_id, g.turn, g.start, g.end)
        if key in self._draws:
            return self._draws[key]
        s, rng = self.sim, _rng(self.sim.seed, "tag", g)
        u = rng.random(8)  # fixed number of draws per decision: the rates do not shift later draws
        same = sorted(self.siblings(g), key=lambda o: o.object_id)
        other: dict[str, GroundTruthMention] = {}
        for o in self._by_view.get(g.view_id, []) if g.view_id is not None else []:
            if o.category != g.category:
                other.setdefault(o.object_id, o)
        others = [other[k] for k in sorted(other)]
        d = TaggerDraw("correct")
        truth = g.box_xyxy_px
        if u[0] < s.p("miss"):
            d.outcome = "miss"
        elif same and u[1] < s.p("wrong_instance"):
            o = same[int(rng.integers(len(same)))]
            d.outcome, d.first_object = "wrong_instance", o.object_id
            d.candidates.append((o.box_xyxy_px, "wrong_instance"))
        elif others and u[2] < s.p("other_category"):
            o = others[int(rng.integers(len(others)))]
            d.outcome, d.first_object = "other_category", o.object_id
            d.candidates.append((o.box_xyxy_px, "other_category"))
        else:
            dev = float(rng.beta(s.p("box_a"), s.p("box_b"))) * s.noise_scale
            iou = max(0.05, 1.0 - min(dev, 0.95))
            d.box_mode = "loose" if u[3] < s.p("loose") else "tight"
            box = truth if iou >= 1.0 else perturb_box(truth, iou, d.box_mode == "loose",
                                                      float(rng.uniform(-0.5, 0.5)), size)
            d.first_object = g.object_id
            d.candidates.append((box, "correct"))
        if d.candidates:
            d.first_iou = round(box_iou(d.candidates[0][0], truth), 6)
            if d.outcome != "correct" and u[4] < s.p("true_also"):
                d.true_also = True
                d.candidates.append((truth, "true_also"))
            if u[5] < s.p("duplicate"):
                d.duplicate = True
                first = d.candidates[0][0]
                d.candidates.append((perturb_box(first, float(rng.uniform(0.6, 0.85)), bool(rng.random() < 0.5),
                                                 float(rng.uniform(-0.5, 0.5)), size), "duplicate"))
            if u[6] < s.p("hallucinated"):
                d.hallucinated = True
                d.candidates.append((self._hallucinate(g, rng, size), "hallucinated"))
        d.candidate_ious = [round(box_iou(b, truth), 6) for b, _ in d.candidates]
        self._draws[key] = d
        return d

    def _hallucinate(self, g: GroundTruthMention, rng: np.random.Generator,
                     size: tuple[float, float]) -> tuple[float, float, float, float]:
        """A box on no mentioned object of the view (IoU < 0.1 with each); best of 20 tries."""
        w, h = size
        objs = [o.box_xyxy_px for o in self._by_view.get(g.view_id, [])] if g.view_id else [g.box_xyxy_px]
        best, best_ov = None, 2.0
        for _ in range(20):
            bw, bh = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = (float(x), float(y), float(x + bw), float(y + bh))
            ov = max((box_iou(box, o) for o in objs), default=0.0)
            if ov < best_ov:
                best, best_ov = box, ov
            if ov < 0.1:
                break
        assert best is not None
        return best

    def tag(self, images: Sequence[Any], mentions: Sequence[Sequence[MentionLike]]) -> list[list[Candidate]]:
        if len(images) != len(mentions):
            raise ValueError(f"{len(images)} images but {len(mentions)} mention lists")
        out: list[list[Candidate]] = []
        for im, ms in zip(images, mentions):
            size = (float(im.size[0]), float(im.size[1])) if hasattr(im, "size") else (1e9, 1e9)
            cands: list[Candidate] = []
            for k, m in enumerate(ms):
                d = self.draw(m, size)
                if d is None:
                    continue
                g = self.lookup(m)
                assert g is not None
                for box, note in d.candidates:
                    cands.append(Candidate(mention_text(m), g.category, tuple(box), "sim", None, k, note))
            out.append(cands)
        return out

    def explain(self, m: MentionLike, size: tuple[float, float]) -> dict[str, Any] | None:
        """The recorded truth of one mention (JSON-able), for the tag intermediate."""
        d = self.draw(m, size)
        return None if d is None else d.record()

    def provenance(self) -> dict[str, Any]:
        return {"backend": "sim", "model_id": self.model_id, "prompt_version": SIM_VERSION}


class SimVerifier(OracleVerifier):
    """VLM verifier/rewriter stand-in: the oracle's judgement with per-mention errors (module docstring)."""

    def __init__(self, gt_path: str | Path, noise_scale: float = 1.0, seed: int = 0,
                 rates: dict[str, float] | None = None) -> None:
        super().__init__(gt_path, iou_threshold=RIGHT_IOU)
        self.sim = _rates(noise_scale, seed, rates)
        self.model_id = f"sim:{self.model_id}|{json.dumps(self.sim.as_config(), sort_keys=True)}"

    def verify(self, image: Any, mention: MentionLike,
               candidates: Sequence[Candidate | Sequence[float]]) -> Verdict:
        if not candidates:
            raise ValueError("verify needs at least one candidate")
        g = self.lookup(mention)
        if g is None:
            raw = json.dumps({"choice": None, "confidence": 0.0, "reason": "no ground truth", "injected": None})
            return Verdict(None, 0.0, raw, SIM_VERSION)
        boxes = [c.box_xyxy_px if isinstance(c, Candidate) else tuple(float(v) for v in c) for c in candidates]
        ious = [box_iou(b, g.box_xyxy_px) for b in boxes]
        right = [i for i, v in enumerate(ious) if v >= RIGHT_IOU]
        wrong = [i for i, v in enumerate(ious) if v < RIGHT_IOU]
        s, rng = self.sim, _rng(self.sim.seed, "verify", g)
        u = rng.random(4)
        conf = round(float(rng.uniform(0.6, 1.0)), 6)
        if u[0] < s.p("refuse"):
            choice, what = None, "refused"
        elif wrong and u[1] < s.p("accept_wrong"):
            choice, what = wrong[0], "accepted_wrong"  # the VLM takes the first plausible-looking box
        elif right:
            if u[2] < s.p("reject_right"):
                choice, what = None, "rejected_right"
            else:
                choice, what = max(right, key=lambda i: ious[i]), "chose_right"
        else:
            choice, what = None, "rejected_wrong"
        if choice is None:
            conf = 0.0
        raw = json.dumps({"choice": choice, "confidence": conf, "injected": what,
                          "right_shown": bool(right)})
        return Verdict(choice, conf, raw, SIM_VERSION)

    def rewrite(self, image: Any, mention: MentionLike, box: Sequence[float],
                others: Sequence[Sequence[float]] = ()) -> Rewrite:
        g = self.lookup(mention)
        if g is None:
            raise ModelOutputError("no ground truth for mention", "")
        good = super().rewrite(image, mention, box, others)
        sib = sorted(self.siblings(g), key=lambda o: o.object_id)
        u = _rng(self.sim.seed, "rewrite", g).random(2)
        if sib and u[0] < self.sim.p("ambiguous_rewrite"):
            colours = [o.colour for o in sib if o.colour and o.colour != g.colour]
            form = "other_colour" if colours and u[1] < 0.5 else "category"  # recorded: what the audit can tell
            text = f"the {colours[0]} {g.category}" if form == "other_colour" else f"the {g.category}"
            raw = {"description": text, "injected": "ambiguous", "form": form}
            return Rewrite(text, json.dumps(raw), SIM_VERSION)
        return Rewrite(good.text, json.dumps({"description": good.text, "injected": None}), SIM_VERSION)

    # verify_many / rewrite_many: OracleVerifier's, which call these verify / rewrite per request.
