"""The text grammar that corpora write and the model reads and emits.

Every element has one `format_*` and one strict `parse_*`. Parsing never guesses: a missing tag,
a wrong count of numbers, NaN, or trailing text raises `GrammarError` saying what was expected and at
which character, so a malformed model output can never turn into a wrong value.

- 2D box:   `<bbox>[x1, y1, x2, y2]</bbox>`, floats in [0, 1] of the original image size, 3 decimals.
- region:   `<region>` directly after `</bbox>`; the model swaps its embedding for the pooled box feature.
- 3D box:   `<3d_box center="x, y, z" dimensions="w, h, l" rotation="pitch, roll, yaw"></3d_box>`,
            metres and angles / pi, 2 decimals; canonical pose (schemas.camera.canonicalize_box).
- 3D point: `x: X, y: Y, z: Z`, metres, 2 decimals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from schemas.camera import canonicalize_box, euler_to_matrix, matrix_to_euler

__all__ = [
    "GrammarError",
    "BBOX_OPEN",
    "BBOX_CLOSE",
    "REGION",
    "BOX3D_OPEN",
    "BOX3D_CLOSE",
    "SPECIAL_TOKENS",
    "format_number",
    "format_bbox2d",
    "parse_bbox2d",
    "format_point2d",
    "format_region",
    "format_grounded",
    "Box3D",
    "format_box3d",
    "parse_box3d",
    "box3d_from_pose",
    "box3d_to_pose",
    "format_point3d",
    "parse_point3d",
    "Grounded",
    "find_grounded",
    "find_box3d",
    "check_regions",
]

BBOX_OPEN = "<bbox>"
BBOX_CLOSE = "</bbox>"
REGION = "<region>"
BOX3D_OPEN = "<3d_box"
BOX3D_CLOSE = "</3d_box>"
SPECIAL_TOKENS: tuple[str, ...] = (BBOX_OPEN, BBOX_CLOSE, REGION, BOX3D_OPEN, BOX3D_CLOSE)
"""Strings the model's tokenizer must keep as single tokens."""

_NUM = r"-?\d+(?:\.\d+)?"
_NUM_RE = re.compile(_NUM)


class GrammarError(ValueError):
    """A grammar string does not match its element; the message says what and where."""

    def __init__(self, message: str, text: str = "", pos: int | None = None):
        where = ""
        if pos is not None:
            snippet = text[max(0, pos - 15) : pos + 15]
            where = f" at char {pos} (near {snippet!r})"
        super().__init__(message + where)
        self.pos = pos


def format_number(x: float, ndigits: int) -> str:
    """Fixed-point text of x; never '-0.00' (so equal values have equal text)."""
    xf = float(x)
    if not math.isfinite(xf):
        raise GrammarError(f"cannot format non-finite number {x!r}")
    s = f"{xf:.{ndigits}f}"
    if s.startswith("-") and float(s) == 0.0:
        s = s[1:]
    return s


def _expect(text: str, pos: int, literal: str, what: str) -> int:
    if not text.startswith(literal, pos):
        got = text[pos : pos + len(literal)] or "end of text"
        raise GrammarError(f"expected {literal!r} ({what}), got {got!r}", text, pos)
    return pos + len(literal)


def _numbers(text: str, pos: int, count: int, what: str) -> tuple[list[float], int]:
    """Parse `count` comma+space separated numbers starting at pos."""
    vals: list[float] = []
    for i in range(count):
        if i:
            if text[pos : pos + 1] in ("]", '"'):
                raise GrammarError(f"expected {count} numbers in {what}, got {i}", text, pos)
            pos = _expect(text, pos, ", ", f"separator between {what} numbers")
        m = _NUM_RE.match(text, pos)
        if not m:
            raise GrammarError(f"expected number {i + 1} of {count} in {what}", text, pos)
        vals.append(float(m.group()))
        pos = m.end()
    return vals, pos


def _end(text: str, pos: int, what: str) -> None:
    if pos != len(text):
        raise GrammarError(f"unexpected text after {what}", text, pos)


# ---------------------------------------------------------------- 2D box and region

def format_bbox2d(box: Sequence[float], ndigits: int = 3) -> str:
    """`<bbox>[x1, y1, x2, y2]</bbox>` from a normalized (x1, y1, x2, y2); values clipped to [0, 1]."""
    vals = [float(v) for v in box]
    if len(vals) != 4:
        raise GrammarError(f"a 2D box has 4 numbers, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise GrammarError(f"2D box has a non-finite value: {vals}")
    if any(v < -1e-6 or v > 1 + 1e-6 for v in vals):
        raise GrammarError(f"2D box values must be normalized to [0, 1], got {vals}")
    if vals[2] < vals[0] or vals[3] < vals[1]:
        raise GrammarError(f"2D box must have x1 <= x2 and y1 <= y2, got {vals}")
    clipped = [min(1.0, max(0.0, v)) for v in vals]
    return BBOX_OPEN + "[" + ", ".join(format_number(v, ndigits) for v in clipped) + "]" + BBOX_CLOSE


def _parse_bbox_at(text: str, pos: int) -> tuple[tuple[float, float, float, float], int]:
    pos = _expect(text, pos, BBOX_OPEN, "2D box opening tag")
    pos = _expect(text, pos, "[", "2D box list start")
    vals, pos = _numbers(text, pos, 4, "2D box")
    pos = _expect(text, pos, "]", "2D box list end after 4 numbers")
    pos = _expect(text, pos, BBOX_CLOSE, "2D box closing tag")
    x1, y1, x2, y2 = vals
    if any(v < 0 or v > 1 for v in vals):
        raise GrammarError(f"2D box values must be in [0, 1], got {vals}", text, pos)
    if x2 < x1 or y2 < y1:
        raise GrammarError(f"2D box must have x1 <= x2 and y1 <= y2, got {vals}", text, pos)
    return (x1, y1, x2, y2), pos


def parse_bbox2d(s: str) -> tuple[float, float, float, float]:
    """Strict inverse of `format_bbox2d` (the whole string must be one box)."""
    box, pos = _parse_bbox_at(s, 0)
    _end(s, pos, "2D box")
    return box


def format_point2d(u: float, v: float, ndigits: int = 3) -> str:
    """A 2D point is a zero-size box."""
    return format_bbox2d((u, v, u, v), ndigits)


def format_region() -> str:
    return REGION


def format_grounded(box: Sequence[float], ndigits: int = 3) -> str:
    """A grounded mention's suffix: its 2D box, then the region token."""
    return format_bbox2d(box, ndigits) + REGION


class Grounded(NamedTuple):
    """One `<bbox>..</bbox>` found in a text: the box, its [start, end) span, and whether `<region>` follows."""

    box: tuple[float, float, float, float]
    start: int
    end: int
    has_region: bool


def find_grounded(text: str) -> list[Grounded]:
    """Every 2D box in a free text, strictly parsed; raises on a malformed one."""
    out: list[Grounded] = []
    pos = 0
    while True:
        start = text.find(BBOX_OPEN, pos)
        if start < 0:
            break
        box, end = _parse_bbox_at(text, start)
        out.append(Grounded(box, start, end, text.startswith(REGION, end)))
        pos = end
    stray = text.find(BBOX_CLOSE, 0)
    while stray >= 0:
        if not any(g.start < stray < g.end for g in out):
            raise GrammarError("closing </bbox> without an opening <bbox>", text, stray)
        stray = text.find(BBOX_CLOSE, stray + 1)
    return out


def check_regions(text: str) -> None:
    """Raise unless every `<region>` directly follows a `</bbox>` (the model pools that box into it)."""
    pos = text.find(REGION)
    while pos >= 0:
        if not text.endswith(BBOX_CLOSE, 0, pos):
            raise GrammarError("<region> must directly follow </bbox>", text, pos)
        pos = text.find(REGION, pos + 1)


# ---------------------------------------------------------------- 3D box

class Box3D(NamedTuple):
    """A verbalized 3D box: camera-frame center (m), dims [w, h, l] (m), rotation (pitch, roll, yaw) / pi."""

    center: tuple[float, float, float]
    dimensions: tuple[float, float, float]
    rotation: tuple[float, float, float]


def _angle_text(v: float, ndigits: int) -> str:
    """Normalized angle in (-1, 1]; -1 after rounding is the same angle as +1."""
    s = format_number(v, ndigits)
    if float(s) <= -1.0:
        s = format_number(float(s) + 2.0, ndigits)
    return s


def format_box3d(box: Box3D, ndigits: int = 2) -> str:
    """`<3d_box center=".." dimensions=".." rotation=".."></3d_box>`."""
    c, d, r = (tuple(float(x) for x in part) for part in box)
    if len(c) != 3 or len(d) != 3 or len(r) != 3:
        raise GrammarError("3D box needs 3 numbers each for center, dimensions and rotation")
    if any(not math.isfinite(x) for x in (*c, *d, *r)):
        raise GrammarError(f"3D box has a non-finite value: {box}")
    if any(x <= 0 for x in d):
        raise GrammarError(f"3D box dimensions must be positive, got {d}")
    if any(x <= -1 - 1e-9 or x > 1 + 1e-9 for x in r):
        raise GrammarError(f"3D box rotation must be angles / pi in (-1, 1], got {r}")
    cs = ", ".join(format_number(x, ndigits) for x in c)
    ds = ", ".join(format_number(x, ndigits) for x in d)
    rs = ", ".join(_angle_text(x, ndigits) for x in r)
    return f'{BOX3D_OPEN} center="{cs}" dimensions="{ds}" rotation="{rs}">{BOX3D_CLOSE}'


def _parse_box3d_at(text: str, pos: int) -> tuple[Box3D, int]:
    pos = _expect(text, pos, BOX3D_OPEN, "3D box opening tag")
    parts = []
    for attr in ("center", "dimensions", "rotation"):
        pos = _expect(text, pos, f' {attr}="', f"3D box attribute {attr}")
        vals, pos = _numbers(text, pos, 3, f"3D box {attr}")
        pos = _expect(text, pos, '"', f"end of 3D box {attr} after 3 numbers")
        parts.append(tuple(vals))
    pos = _expect(text, pos, ">" + BOX3D_CLOSE, "3D box closing tag")
    c, d, r = parts
    if any(x <= 0 for x in d):
        raise GrammarError(f"3D box dimensions must be positive, got {list(d)}", text, pos)
    if any(x <= -1 or x > 1 for x in r):
        raise GrammarError(f"3D box rotation must be in (-1, 1], got {list(r)}", text, pos)
    return Box3D(c, d, r), pos  # type: ignore[arg-type]


def parse_box3d(s: str) -> Box3D:
    """Strict inverse of `format_box3d`."""
    box, pos = _parse_box3d_at(s, 0)
    _end(s, pos, "3D box")
    return box


def find_box3d(text: str) -> list[tuple[Box3D, int, int]]:
    """Every 3D box in a free text with its [start, end) span; raises on a malformed one."""
    out = []
    pos = text.find(BOX3D_OPEN)
    while pos >= 0:
        box, end = _parse_box3d_at(text, pos)
        out.append((box, pos, end))
        pos = text.find(BOX3D_OPEN, end)
    return out


def box3d_from_pose(center: Sequence[float], dims_whl: Sequence[float], R: object) -> Box3D:
    """Canonicalize an Omni3D pose and express it as the grammar's Box3D (angles divided by pi)."""
    dims, Rc = canonicalize_box(dims_whl, R)
    pitch, roll, yaw = matrix_to_euler(Rc)
    c = tuple(float(x) for x in np.asarray(center, dtype=np.float64).reshape(3))
    return Box3D(c, tuple(float(x) for x in dims), (pitch / math.pi, roll / math.pi, yaw / math.pi))  # type: ignore[arg-type]


def box3d_to_pose(box: Box3D) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(center, dims_whl, R) of a Box3D, for corners via schemas.camera.box_corners."""
    p, r, y = (float(a) * math.pi for a in box.rotation)
    return np.asarray(box.center, dtype=np.float64), np.asarray(box.dimensions, dtype=np.float64), euler_to_matrix(p, r, y)


# ---------------------------------------------------------------- 3D point

def format_point3d(xyz: Sequence[float], ndigits: int = 2) -> str:
    """`x: X, y: Y, z: Z` in metres."""
    vals = [float(v) for v in xyz]
    if len(vals) != 3:
        raise GrammarError(f"a 3D point has 3 numbers, got {len(vals)}")
    x, y, z = (format_number(v, ndigits) for v in vals)
    return f"x: {x}, y: {y}, z: {z}"


def parse_point3d(s: str) -> tuple[float, float, float]:
    """Strict inverse of `format_point3d`."""
    pos = 0
    vals = []
    for i, name in enumerate("xyz"):
        if i:
            pos = _expect(s, pos, ", ", "separator between point coordinates")
        pos = _expect(s, pos, f"{name}: ", f"label of coordinate {name}")
        m = _NUM_RE.match(s, pos)
        if not m:
            raise GrammarError(f"expected a number for coordinate {name}", s, pos)
        vals.append(float(m.group()))
        pos = m.end()
    _end(s, pos, "3D point")
    return vals[0], vals[1], vals[2]
