"""The text side of the cot corpus: RefSpatial point lists, grounded-turn composition, question suffixes."""

from __future__ import annotations

import re
from collections.abc import Sequence

POINT_SUFFIX_ROBOPOINT = (
    "Your answer should be formatted as a list of tuples, i.e. [(x1, y1)], where each tuple contains the x and y "
    "coordinates of a point satisfying the conditions above. The coordinates should be between 0 and 1, indicating "
    "the normalized pixel locations of the points in the image."
)
POINT_SUFFIX_GR3D = (
    "Your answer should give each point as a zero-size 2D box [x, y, x, y] in bbox tags, where x and y are "
    "between 0 and 1, normalized by the image width and height."
)
"""Replaces the RoboPoint suffix in questions whose answer points were converted to the grammar: the
question must ask for the format the answer now has."""


_NUM = r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_PAIR = rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
_POINT_LIST = re.compile(rf"\[\s*{_PAIR}(?:\s*,\s*{_PAIR})*\s*\]")
_PAIR_RE = re.compile(_PAIR)


def find_point_lists(text: str) -> list[tuple[int, int, list[tuple[float, float]]]]:
    """RoboRefer point lists `[(x, y), ...]` in a text: (start, end, points), left to right."""
    out = []
    for m in _POINT_LIST.finditer(text):
        pts = [(float(a), float(b)) for a, b in _PAIR_RE.findall(m.group(0))]
        out.append((m.start(), m.end(), pts))
    return out


def _norm_box(box_px: Sequence[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box_px)
    return [min(1.0, max(0.0, x1 / width)), min(1.0, max(0.0, y1 / height)),
            min(1.0, max(0.0, x2 / width)), min(1.0, max(0.0, y2 / height))]


def _truncate(text: str, n: int = 600) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def compose_turn(value: str, grounded: Sequence[tuple[int, int, str, Sequence[float]]],
                 points: Sequence[tuple[int, int, Sequence[tuple[float, float]]]], ndigits: int = 3) -> str:
    """A gpt turn with `format_grounded` after each grounded mention and point lists as grammar boxes.

    `grounded`: (start, end, text to write for the mention, normalized box); `points`: (start, end,
    [(x, y), ...]) spans of RoboRefer point lists, written as zero-size boxes joined by ", ".
    """
    from schemas.grammar import format_grounded, format_point2d

    edits: list[tuple[int, int, str]] = [(s, e, text + format_grounded(box, ndigits)) for s, e, text, box in grounded]
    edits += [(s, e, ", ".join(format_point2d(x, y, ndigits) for x, y in pts)) for s, e, pts in points]
    edits.sort()
    parts, pos = [], 0
    for s, e, rep in edits:
        if s < pos:
            raise ValueError(f"overlapping edits at character {s}")
        parts += [value[pos:s], rep]
        pos = e
    parts.append(value[pos:])
    return "".join(parts)


def _clean_human(value: str, first: bool, replace_suffix: bool) -> str:
    """A question turn: one `<image>` placeholder (first turn only), RoboPoint suffix replaced."""
    text = re.sub(r"<(?:image|depth)>\s*", "", value).strip()
    if replace_suffix:
        text = text.replace(POINT_SUFFIX_ROBOPOINT, POINT_SUFFIX_GR3D)
    return ("<image>\n" + text) if first else text
