"""Pure conversion for the 3D-detection corpus: one image's annotations -> objects -> record + conversations.

No I/O, no executor: a reader item (Omni3D image or EmbodiedScan frame, as `pipelines/corpora/det3d/builder.py` trims it)
plus the image's size and extension go in; a schema-valid `det3d` record comes out, or `ConvertReject`
with a snake_case reason. Kept apart from the builder so the geometry and the text can be tested against
the sample world's exact ground truth without running a build.

Both sources end in the same Omni3D camera-frame box (center, dims [w, h, l], R object->camera):
- Omni3D: `center_cam`, `dimensions`, `R_cam` as given; 2D box = `bbox2D_trunc`, else `bbox2D_proj`
  clipped to the image (never a -1 field); objects the reader marked ignored are dropped (counted).
- EmbodiedScan: world 9-DoF box -> camera (`axis_align_matrix @ cam2global`, ZXY Euler) -> Omni3D axes
  (`schemas.geometry.es_box_to_omni_camera`); dropped when a corner has z <= min_z or when its projection
  misses the image; 2D box = the tight box of the projected silhouette (hull of the 8 projected corners)
  clipped to the image, which is what Omni3D's `bbox2D_trunc` is, so both sources give the same 2D box.
Every box is canonicalized (`schemas.grammar.box3d_from_pose`) and verbalized with the grammar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.corpora.options import option
from schemas.camera import box_corners, normalization_scale
from schemas.geometry import es_box_to_omni_camera
from schemas.grammar import Box3D, box3d_from_pose, format_box3d, format_grounded
from schemas.omni3d import box4
from schemas.prompts import PROMPTS_VERSION, detect_prompt, region_to_3d_prompt

__all__ = [
    "Det3dConfig",
    "parse_rule",
    "omni3d_rules",
    "ConvertReject",
    "DetObject",
    "clipped_silhouette_box",
    "omni3d_objects",
    "embodiedscan_objects",
    "text_box",
    "box3d_text",
    "detect_answer",
    "region_conversations",
    "detect_conversations",
    "make_record",
    "convert_item",
    "image_header",
]

# Omni3D ignore reasons that mean "not a usable object" whatever its geometry: the count of a dropped box
# goes under the first of these it has, else under its first reason.
_HARD_IGNORE = ("invalid_3d", "ignore_category", "behind_camera")
# Drop reason of an annotation whose numbers cannot make a box (and that no ignore rule flagged): the
# annotation is dropped and counted, its image keeps its other objects.
DEGENERATE = "degenerate_box"
_EYE = np.eye(3)


@dataclass(frozen=True)
class Det3dConfig:
    """Conversion settings; all of them go into the build config (and so the manifest), each a flag of
    `gr3d build det3d` (`pipelines.corpora.options`).

    `omni3d_ignore` is a preset of `pipelines.sources.omni3d` ("train" = Cube R-CNN's Base.yaml training
    thresholds, the default: this is training data; "eval"; "none"), `omni3d_rules` overrides single
    thresholds of it. `min_z`: a corner at z <= min_z (m) is "behind the camera" (Omni3D's rule).
    """

    omni3d_ignore: str = option("train", group="conversion", choices=("train", "eval", "none"),
                                help="Omni3D ignore-rule preset: train (Cube R-CNN Base.yaml, default), eval, none")
    omni3d_rules: dict[str, Any] = option(
        default_factory=dict, group="conversion", flag="--omni3d-rule", action="append", cli_default=[],
        metavar="NAME=VALUE", from_args=lambda a: dict(parse_rule(r) for r in a.omni3d_rules),
        help="override one ignore threshold, e.g. visibility_thres=0.1 or max_depth=none (repeatable)")
    min_z: float = option(0.2, group="conversion", type=float,
                          help="EmbodiedScan: drop boxes with a corner at z <= this (m)")
    digits_2d: int = option(3, group="conversion", type=int, help="decimals of 2D boxes in the text")
    digits_3d: int = option(2, group="conversion", type=int, help="decimals of 3D boxes in the text")
    max_rounds: int = option(10, group="conversion", type=int, help="region->3D rounds per conversation (<= 10)")
    max_detect: int = option(20, group="conversion", type=int, help="objects per detection answer (<= 20)")
    prompt_salt: str = option("", group="conversion", help="changes which template phrasing each sample gets")

    def __post_init__(self) -> None:
        if self.omni3d_ignore not in ("train", "eval", "none"):
            raise ValueError(f"omni3d_ignore must be train, eval or none, got {self.omni3d_ignore!r}")
        if not 1 <= self.max_rounds <= 10:
            raise ValueError(f"max_rounds must be in 1..10 (the record schema allows 20 turns), got {self.max_rounds}")
        if not 1 <= self.max_detect <= 20:
            raise ValueError(f"max_detect must be in 1..20 (the paper's limit), got {self.max_detect}")
        if self.digits_2d < 1 or self.digits_3d < 1:
            raise ValueError("digits_2d and digits_3d must be >= 1")
        if not (math.isfinite(self.min_z) and self.min_z >= 0):
            raise ValueError(f"min_z must be a finite number >= 0, got {self.min_z}")
        try:
            omni3d_rules(self.omni3d_ignore, self.omni3d_rules)  # unknown rule names fail here, not in a worker
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["omni3d_rules"] = dict(sorted(self.omni3d_rules.items()))
        d["prompts_version"] = PROMPTS_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Det3dConfig:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_rule(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` of an Omni3D ignore-rule override: a float, `none`/`off` (rule disabled) or true/false."""
    from pipelines.sources.omni3d import IgnoreRules

    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(IgnoreRules)}
    if not sep or name not in fields or name == "ignore_names":
        allowed = ", ".join(n for n in fields if n != "ignore_names")
        raise ValueError(f"ignore-rule override must be NAME=VALUE with NAME one of {allowed}; got {text!r}")
    v = value.strip().lower()
    if name.startswith("require_") or name == "use_trunc_box":
        if v not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} takes true or false, got {value!r}")
        return name, v in ("true", "1")
    if v in ("none", "off"):
        return name, None
    try:
        return name, float(v)
    except ValueError:
        raise ValueError(f"{name} takes a number or none, got {value!r}") from None


def omni3d_rules(preset: str, overrides: dict[str, Any] | None = None) -> Any:
    """The reader's `IgnoreRules`: a preset (train | eval | none) with single thresholds replaced."""
    from pipelines.sources.omni3d import EVAL_RULES, NO_RULES, TRAIN_RULES

    base = {"train": TRAIN_RULES, "eval": EVAL_RULES, "none": NO_RULES}[preset]
    return dataclasses.replace(base, **(overrides or {}))


class ConvertReject(Exception):
    """This image cannot become a sample; `reason` is the snake_case code of its reject row."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class DetObject:
    """One kept object: Omni3D camera-frame pose and the 2D box in pixels of the original image."""

    category: str
    center: np.ndarray
    dims: np.ndarray
    R: np.ndarray
    bbox2d_px: tuple[float, float, float, float]
    object_id: str | None = None
    truncation: float | None = None
    visibility: float | None = None


# ---------------------------------------------------------------------------------------------- 2D boxes

def _hull(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull (Andrew's monotone chain), counter-clockwise in a y-up sense, no repeated point."""
    p = sorted(set(pts))
    if len(p) <= 2:
        return p

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for q in p:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    upper: list[tuple[float, float]] = []
    for q in reversed(p):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return lower[:-1] + upper[:-1]


def _clip(poly: list[tuple[float, float]], axis: int, bound: float, keep_below: bool) -> list[tuple[float, float]]:
    """Sutherland-Hodgman against one axis-aligned half-plane (coordinate `axis` <= or >= `bound`)."""
    out: list[tuple[float, float]] = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina = a[axis] <= bound if keep_below else a[axis] >= bound
        inb = b[axis] <= bound if keep_below else b[axis] >= bound
        if ina:
            out.append(a)
        if ina != inb:
            t = (bound - a[axis]) / (b[axis] - a[axis])
            q = (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
            out.append((bound, q[1]) if axis == 0 else (q[0], bound))
    return out


def clipped_silhouette_box(uv: np.ndarray, width: float, height: float) -> tuple[float, float, float, float] | None:
    """Tight [x1, y1, x2, y2] of the convex hull of projected points, clipped to [0, W] x [0, H].

    That is the box of the part of a cuboid's silhouette inside the image (every corner in front of the
    camera). Merely clipping the projected min/max box would be too big for an object that leaves the image
    across a corner. None when the silhouette misses the image or covers no area.
    """
    pts = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        return None
    x1, y1 = pts.min(axis=0)
    x2, y2 = pts.max(axis=0)
    if x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height:  # fully inside: nothing to clip
        box = (float(x1), float(y1), float(x2), float(y2))
    else:
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            return None
        poly = _hull([(float(a), float(b)) for a, b in pts])
        for axis, bound, below in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True)):
            if len(poly) < 3:
                return None
            poly = _clip(poly, axis, bound, below)
        if len(poly) < 3:
            return None
        xs = [q[0] for q in poly]
        ys = [q[1] for q in poly]
        box = (min(xs), min(ys), max(xs), max(ys))
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        return None
    return box


def _clip_box(b: Sequence[float], width: float, height: float) -> tuple[float, float, float, float] | None:
    x1, y1 = min(max(b[0], 0.0), width), min(max(b[1], 0.0), height)
    x2, y2 = min(max(b[2], 0.0), width), min(max(b[3], 0.0), height)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return None
    return (x1, y1, x2, y2)


# ---------------------------------------------------------------------------------------------- 3D boxes

def _degenerate(center: object, dims: object, R: object) -> str | None:
    """Why a pose cannot be a box (NaN, non-positive dims, R not a rotation), or None."""
    try:
        c = np.asarray(center, dtype=np.float64)
        d = np.asarray(dims, dtype=np.float64)
        m = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError):
        return "non-numeric pose"
    if c.shape != (3,) or d.shape != (3,) or m.shape != (3, 3):
        return f"pose has shapes center {c.shape}, dimensions {d.shape}, R {m.shape}"
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(d)) and np.all(np.isfinite(m))):
        return "pose holds NaN or Inf"
    if np.any(d <= 0):
        return f"non-positive dimensions {d.tolist()}"
    if float(np.abs(m.T @ m - _EYE).max()) > 1e-3 or float(np.linalg.det(m)) < 0.999:
        return "R is not a rotation (orthonormal, det +1, within 1e-3)"
    return None


def omni3d_objects(item: Mapping[str, Any], width: int, height: int) -> tuple[list[DetObject], Counter, list[str]]:
    """Objects of an Omni3D image: (kept, dropped counts by reason, degenerate-box messages).

    Drops what the reader's ignore rules flagged (one count per object, under its first hard reason, else
    its first reason), as Cube R-CNN's `is_ignore` ignores the object, not the image (a zero dimension is
    `nonpositive_dimensions`). An unflagged annotation whose numbers cannot make a box is dropped as
    `degenerate_box` and its message kept; the image keeps its other objects.
    """
    kept: list[DetObject] = []
    dropped: Counter = Counter()
    degenerate: list[str] = []
    for a in item.get("annotations", []):
        reasons = list(a.get("ignore_reasons") or [])
        hard = [r for r in reasons if r in _HARD_IGNORE]
        if a.get("valid3D") is False and "invalid_3d" not in hard:
            hard.append("invalid_3d")
        if hard or reasons:
            dropped[(hard or reasons)[0]] += 1
            continue
        why = _degenerate(a.get("center_cam"), a.get("dimensions"), a.get("R_cam"))
        if why is not None:
            dropped[DEGENERATE] += 1
            degenerate.append(f"annotation {a.get('id')!r}: {why}")
            continue
        if not isinstance(a.get("category_name"), str):
            dropped["malformed_category_name"] += 1
            continue
        trunc = box4(a.get("bbox2D_trunc"))
        box = _clip_box(trunc, width, height) if trunc is not None else None
        if box is None:
            proj = box4(a.get("bbox2D_proj"))
            box = _clip_box(proj, width, height) if proj is not None else None
        if box is None:
            dropped["no_visible_projection"] += 1
            continue
        tr, vis = a.get("truncation"), a.get("visibility")
        kept.append(DetObject(
            category=a["category_name"], center=np.asarray(a["center_cam"], dtype=np.float64),
            dims=np.asarray(a["dimensions"], dtype=np.float64), R=np.asarray(a["R_cam"], dtype=np.float64),
            bbox2d_px=box, object_id=None if a.get("id") is None else str(a["id"]),
            truncation=float(tr) if _unit(tr) else None, visibility=float(vis) if _unit(vis) else None,
        ))  # fmt: skip
    return kept, dropped, degenerate


def _unit(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and -1 <= x <= 1


def embodiedscan_objects(item: Mapping[str, Any], width: int, height: int,
                         min_z: float = 0.2) -> tuple[list[DetObject], Counter, list[str]]:
    """Objects of an EmbodiedScan frame: (kept, dropped counts by reason, degenerate-box messages).

    Each visible instance's world box is moved into the camera (T = axis_align_matrix @ cam2global) in
    Omni3D axes; dropped when its label is not in `metainfo.categories`, when a corner has z <= min_z
    (behind the camera) or when its silhouette misses the image. A box whose numbers cannot make a box
    is dropped as `degenerate_box` (message kept), not its frame.
    """
    K = np.asarray(item["K"], dtype=np.float64)
    T = np.asarray(item["T"], dtype=np.float64)
    kept: list[DetObject] = []
    dropped: Counter = Counter()
    degenerate: list[str] = []
    for b in item.get("invalid_instances", []):  # visible, but the reader could not use them
        if str(b.get("reason", "")).startswith("bbox_3d"):
            dropped[DEGENERATE] += 1
            degenerate.append(f"instance {b.get('index')}: {b['reason']}")
        else:  # a label that is not an int: like an unknown category, the object is dropped
            dropped["bad_label"] += 1
    for inst in item.get("instances", []):
        if inst.get("category") is None:
            dropped["unknown_category"] += 1
            continue
        try:
            center, dims, R = es_box_to_omni_camera(inst["bbox_3d"], T)
        except ValueError as exc:
            dropped[DEGENERATE] += 1
            degenerate.append(f"instance {inst.get('index')}: {exc}")
            continue
        corners = box_corners(center, dims, R)
        if corners[:, 2].min() <= min_z:
            dropped["behind_camera"] += 1
            continue
        uvw = corners @ K.T
        box = clipped_silhouette_box(uvw[:, :2] / uvw[:, 2:3], width, height)
        if box is None:
            dropped["no_visible_projection"] += 1
            continue
        bid = inst.get("bbox_id")
        kept.append(DetObject(category=str(inst["category"]), center=center, dims=dims, R=R, bbox2d_px=box,
                              object_id=str(bid) if bid is not None else f"position{inst.get('index')}"))
    return kept, dropped, degenerate


# ---------------------------------------------------------------------------------------------- text

def text_box(box: Box3D, ndigits: int) -> Box3D:
    """The box as it is written: dimensions below the text's resolution are raised to one unit of it.

    A 3 mm thick object would otherwise be written `0.00`, which the grammar (rightly) refuses to parse.
    """
    unit = 10.0 ** -ndigits
    if min(box.dimensions) >= unit / 2:
        return box
    return Box3D(box.center, tuple(max(d, unit) for d in box.dimensions), box.rotation)  # type: ignore[arg-type]


def _order_key(o: dict[str, Any]) -> tuple:
    c = o["box3d"]["center"]
    return (c[2], o["category"], c[0], c[1], o["object_id"] or "")


def box3d_text(obj: Mapping[str, Any], digits_3d: int = 2) -> str:
    """`<3d_box ...></3d_box>` of a record object (its canonical box, rounded by the grammar)."""
    b = obj["box3d"]
    box = text_box(Box3D(tuple(b["center"]), tuple(b["dimensions"]), tuple(b["rotation"])), digits_3d)
    return format_box3d(box, digits_3d)


def detect_answer(objects: Sequence[Mapping[str, Any]], digits_2d: int = 3, digits_3d: int = 2) -> str:
    """Detection answer: per object (in the given order) its grounded 2D box, a space, its 3D box; one per line."""
    return "\n".join(format_grounded(o["bbox2d"], digits_2d) + " " + box3d_text(o, digits_3d) for o in objects)


def _rank(key: str, tag: str) -> bytes:
    return hashlib.sha256(f"{key}|{tag}".encode()).digest()


def _texts(objects: Sequence[Mapping[str, Any]], cfg: Det3dConfig) -> list[tuple[str, str]]:
    """(grounded 2D box, 3D box) text of each object, formatted once for both conversation kinds."""
    return [(format_grounded(o["bbox2d"], cfg.digits_2d), box3d_text(o, cfg.digits_3d)) for o in objects]


def region_conversations(key: str, objects: Sequence[Mapping[str, Any]], cfg: Det3dConfig,
                         texts: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Stage-1 region->3D dialogues: every object once, in a key-seeded order, <= max_rounds rounds each.

    n objects give ceil(n / max_rounds) conversations of near-equal length (12 -> 6 + 6, not 10 + 2).
    The question phrasing is chosen per (key, object) with `schemas.prompts.choose`. `texts` are the
    objects' `_texts` when the caller has them already.
    """
    texts = _texts(objects, cfg) if texts is None else texts
    order = sorted(range(len(objects)), key=lambda i: _rank(key, f"{cfg.prompt_salt}r3d/{i}"))
    n = len(order)
    if n == 0:
        return []
    k = -(-n // cfg.max_rounds)
    sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
    convs, pos = [], 0
    for size in sizes:
        turns = []
        for i in order[pos:pos + size]:
            grounded, box = texts[i]
            q = region_to_3d_prompt(grounded, key=key, salt=f"{cfg.prompt_salt}r3d/{i}")
            turns.append({"from": "human", "value": q})
            turns.append({"from": "gpt", "value": box})
        convs.append({"task": "region_to_3d", "turns": turns})
        pos += size
    return convs


def detect_conversations(key: str, objects: Sequence[Mapping[str, Any]], cfg: Det3dConfig,
                         texts: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """Stage-2 detection dialogues, one per category (sorted by name): the nearest max_detect objects.

    `objects` are already near to far, so each category's list is too. A conversation records how many
    objects of its category the image has (`n_objects`) when the answer had to leave some out. The answer
    is `detect_answer`'s format: one object per line, grounded 2D box, a space, 3D box.
    """
    texts = _texts(objects, cfg) if texts is None else texts
    by_cat: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        by_cat.setdefault(o["category"], []).append(i)
    convs = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        q = detect_prompt(cat, variant=None, key=key, salt=f"{cfg.prompt_salt}detect/{cat}")
        answer = "\n".join(texts[i][0] + " " + texts[i][1] for i in idx[:cfg.max_detect])
        conv: dict[str, Any] = {"task": "detect_3d", "category": cat,
                                "turns": [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]}
        if len(idx) > cfg.max_detect:
            conv["n_objects"] = len(idx)
        convs.append(conv)
    return convs


def _object_record(o: DetObject, width: int, height: int) -> dict[str, Any]:
    b = box3d_from_pose(o.center, o.dims, o.R)
    x1, y1, x2, y2 = o.bbox2d_px
    rec: dict[str, Any] = {
        "category": o.category,
        "bbox2d": [min(1.0, max(0.0, x1 / width)), min(1.0, max(0.0, y1 / height)),
                   min(1.0, max(0.0, x2 / width)), min(1.0, max(0.0, y2 / height))],
        "box3d": {"center": list(b.center), "dimensions": list(b.dimensions), "rotation": list(b.rotation)},
        "object_id": o.object_id,
    }  # fmt: skip
    if o.truncation is not None:
        rec["truncation"] = o.truncation
    if o.visibility is not None:
        rec["visibility"] = o.visibility
    return rec


def make_record(key: str, source: Mapping[str, Any], image_ext: str, width: int, height: int, K: object,
                objects: Sequence[DetObject], cfg: Det3dConfig) -> dict[str, Any]:
    """The `det3d` record: canonical unrounded objects (near to far), camera (K, s = 1000/fx), conversations."""
    Km = np.asarray(K, dtype=np.float64)
    objs = sorted((_object_record(o, width, height) for o in objects), key=_order_key)
    texts = _texts(objs, cfg)
    return {
        "key": key,
        "corpus": "det3d",
        "source": dict(source),
        "image": {"ext": image_ext, "width": int(width), "height": int(height)},
        "camera": {"K": Km.tolist(), "scale": normalization_scale(Km)},
        "arrays": [],
        "objects": objs,
        "conversations": region_conversations(key, objs, cfg, texts) + detect_conversations(key, objs, cfg, texts),
    }


def convert_item(item: Mapping[str, Any], image_ext: str, width: int, height: int,
                 cfg: Det3dConfig) -> dict[str, Any]:
    """One reader item (format omni3d | embodiedscan) -> its `det3d` record, or raise `ConvertReject`.

    An annotation that the ignore rules drop or whose numbers cannot make a box is dropped and counted;
    the image is rejected only when nothing usable remains. Rejects: no_objects (the image has no
    annotation), degenerate_box (every annotation's numbers are unusable as a box), all_boxes_ignored
    (every annotation was dropped, for other reasons too); their messages count the drops by reason.
    `source` of the record gets `n_annotations` and `dropped` (counts by reason), so no object is lost
    without a trace.
    """
    fmt = item.get("format")
    if fmt == "omni3d":
        objects, dropped, degenerate = omni3d_objects(item, width, height)
    elif fmt == "embodiedscan":
        objects, dropped, degenerate = embodiedscan_objects(item, width, height, cfg.min_z)
    else:
        raise ConvertReject("unknown_format", f"item format {fmt!r} is neither omni3d nor embodiedscan")
    n_ann = len(objects) + sum(dropped.values())
    if not objects:
        if n_ann == 0:
            raise ConvertReject("no_objects", "the image has no annotated object")
        why = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()))
        if dropped[DEGENERATE] == n_ann:
            more = f" (+{len(degenerate) - 3} more)" if len(degenerate) > 3 else ""
            raise ConvertReject(DEGENERATE, f"none of the {n_ann} boxes is usable: "
                                            + "; ".join(degenerate[:3]) + more)
        detail = f"; {degenerate[0]}" if degenerate else ""
        raise ConvertReject("all_boxes_ignored", f"all {n_ann} boxes were dropped: {why}{detail}")
    source = dict(item["source"])
    source["n_annotations"] = n_ann
    source["dropped"] = dict(sorted(dropped.items()))
    return make_record(item["key"], source, image_ext, width, height, item["K"], objects, cfg)


# ---------------------------------------------------------------------------------------------- image header

def image_header(data: bytes) -> tuple[str, int, int]:
    """(ext, width, height) from a PNG or JPEG file's first bytes, without decoding pixels.

    Raises ValueError naming what is wrong (unknown format, truncated header).
    """
    # imported here: the writer imports pyarrow, which the driver's listing never needs
    from shards.writer import sniff_image_ext

    ext = sniff_image_ext(data)
    if ext == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("truncated PNG header")
        return "png", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if ext == "jpg":
        pos, n = 2, len(data)
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                raise ValueError(f"JPEG marker expected at byte {pos}")
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            seg = int.from_bytes(data[pos + 2:pos + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                if pos + 9 > n:
                    break
                h = int.from_bytes(data[pos + 5:pos + 7], "big")
                w = int.from_bytes(data[pos + 7:pos + 9], "big")
                return "jpg", w, h
            if marker == 0xDA:
                break
            pos += 2 + seg
        raise ValueError("no JPEG frame header (SOF) before the image data")
    raise ValueError(f"not a PNG or JPEG file (first bytes {bytes(data[:8])!r})")
