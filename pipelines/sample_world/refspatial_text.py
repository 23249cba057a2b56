"""RefSpatial-style conversations about one rendered view, with every object mention tracked.

Each mention ("the red chair", "The lamp") is recorded with its character span, so the
ground-truth side file can say exactly which object and 2D box every phrase refers to: that is what
an audit of a grounding annotator (Florence-2 tagger, VLM verifier) is measured against.
Facts stated in the text (left/right, nearer/farther) come from the exact geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

POINT_SUFFIX = (
    "Your answer should be formatted as a list of tuples, i.e. [(x1, y1)], where each tuple contains the x and y "
    "coordinates of a point satisfying the conditions above. The coordinates should be between 0 and 1, indicating "
    "the normalized pixel locations of the points in the image."
)


@dataclass
class Referable:
    """A visible object of a view that text may mention."""

    index: int
    category: str
    colour: str
    depth: float  # camera-z of the box centre, metres
    centroid_u: float  # mean column of its visible pixels
    points: list[tuple[float, float]]  # interior pixels (u, v) usable as point answers, best first
    name: str = ""


@dataclass
class Mention:
    turn: int
    start: int
    end: int
    text: str
    index: int


@dataclass
class _Turn:
    parts: list[str] = field(default_factory=list)
    mentions: list[tuple[int, int, str, int]] = field(default_factory=list)
    length: int = 0

    def add(self, s: str) -> _Turn:
        self.parts.append(s)
        self.length += len(s)
        return self

    def ref(self, obj: Referable, capital: bool = False) -> _Turn:
        text = obj.name[0].upper() + obj.name[1:] if capital else obj.name
        self.mentions.append((self.length, self.length + len(text), text, obj.index))
        return self.add(text)

    def text(self) -> str:
        return "".join(self.parts)


def _conversation(turns: list[tuple[str, _Turn]]) -> tuple[list[dict], list[Mention]]:
    conv, mentions = [], []
    for k, (who, t) in enumerate(turns):
        conv.append({"from": who, "value": t.text()})
        mentions.extend(Mention(k, s, e, txt, i) for s, e, txt, i in t.mentions)
    return conv, mentions


def assign_names(objs: list[Referable], visible_categories: list[str], rng: np.random.Generator) -> None:
    """'the <colour> <category>' when the category repeats among the view's visible objects, else
    sometimes just 'the <category>' (colours are unique in a scene, so every name is unambiguous)."""
    counts: dict[str, int] = {}
    for c in visible_categories:
        counts[c] = counts.get(c, 0) + 1
    for o in objs:
        plain = counts[o.category] == 1 and rng.uniform() < 0.5
        o.name = f"the {o.category}" if plain else f"the {o.colour} {o.category}"


def _relation(a: Referable, b: Referable, width: int) -> str | None:
    """How a relates to b as seen in the image, or None when it is not clear-cut."""
    if a.centroid_u < b.centroid_u - 0.08 * width:
        return "to the left of"
    if a.centroid_u > b.centroid_u + 0.08 * width:
        return "to the right of"
    if a.depth < b.depth - 0.5:
        return "in front of"
    if a.depth > b.depth + 0.5:
        return "behind"
    return None


def _fmt_points(points: list[tuple[float, float]], width: int, height: int) -> str:
    """RoboRefer point list: normalised (x, y) such that floor(x * W), floor(y * H) is the pixel."""
    return "[" + ", ".join(f"({(u + 0.5) / width:.3f}, {(v + 0.5) / height:.3f})" for u, v in points) + "]"


def point_record(objs: list[Referable], rng: np.random.Generator, width: int, height: int
                 ) -> tuple[list[dict], list[Mention], int] | None:
    """'Point to X [that is <rel> Y].' with a reasoning answer that mentions 1-3 objects and ends in points."""
    cands = [o for o in objs if o.points]
    if not cands:
        return None
    t = cands[int(rng.integers(len(cands)))]
    others = [o for o in objs if o.index != t.index]
    rels = [(o, _relation(t, o, width)) for o in others]
    rels = [(o, r) for o, r in rels if r is not None]
    h, g = _Turn(), _Turn()
    h.add("<image>\nPoint to ").ref(t)
    if rels:
        a, rel = rels[int(rng.integers(len(rels)))]
        h.add(f" that is {rel} ").ref(a)
        h.add(". " + POINT_SUFFIX)
        g.ref(t, capital=True).add(f" is {rel} ").ref(a).add(".")
        further = [o for o in others if o.index != a.index and abs(o.depth - t.depth) > 0.5]
        if further:
            b = further[int(rng.integers(len(further)))]
            word = "farther from" if b.depth > t.depth else "closer to"
            g.add(" ").ref(b, capital=True).add(f" is {word} the camera than ").ref(t).add(".")
    else:
        h.add(". " + POINT_SUFFIX)
        g.ref(t, capital=True).add(f" is about {t.depth:.1f} m from the camera.")
    n_pts = 1 + int(rng.integers(min(3, len(t.points))))
    g.add(" " + _fmt_points(t.points[:n_pts], width, height))
    conv, mentions = _conversation([("human", h), ("gpt", g)])
    return conv, mentions, t.index


def choice_record(objs: list[Referable], rng: np.random.Generator, width: int) -> tuple[list[dict], list[Mention]] | None:
    """'Which is farther from the camera, A or B?' plus, when clear, 'Is A to the left of B?'."""
    pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :] if abs(a.depth - b.depth) > 0.4]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    if rng.uniform() < 0.5:
        a, b = b, a
    far, near = (a, b) if a.depth > b.depth else (b, a)
    h1, g1 = _Turn(), _Turn()
    h1.add("<image>\nWhich is farther from the camera, ").ref(a).add(" or ").ref(b).add("?")
    g1.ref(far, capital=True).add(" is farther from the camera than ").ref(near).add(".")
    turns = [("human", h1), ("gpt", g1)]
    lr = [(p, q) for i, p in enumerate(objs) for q in objs[i + 1 :] if abs(p.centroid_u - q.centroid_u) > 0.1 * width]
    if lr:
        p, q = lr[int(rng.integers(len(lr)))]
        h2, g2 = _Turn(), _Turn()
        h2.add("Is ").ref(p).add(" to the left of ").ref(q).add("?")
        if p.centroid_u < q.centroid_u:
            g2.add("Yes, ").ref(p).add(" is to the left of ").ref(q).add(".")
        else:
            g2.add("No, ").ref(p).add(" is to the right of ").ref(q).add(".")
        turns += [("human", h2), ("gpt", g2)]
    return _conversation(turns)
