"""Training-time rewrites of one example: 2D box jitter of region prompts, and direct-3D detection answers.

Both are train-config options (`data.box_jitter`, `data.det3d_answer`) applied in `model.data.build_example`;
evaluation never jitters, and it reads the answer form from the checkpoint's config
(`GR3DConfig.det3d_answer`: the grammar constraint and the parser follow it).

- Box jitter (the paper's supplement: augmentation of the 2D boxes that prompt a region): each side of a
  region-prompt box (a `<region>` in a human turn, the one the region encoder pools) moves by U(-j, j) x the
  box's width (x sides) or height (y sides), drawn from a generator seeded by (seed, epoch, sample key), so a
  sample jitters the same on any worker or rank and differently in each epoch. The text keeps the exact
  numbers; only the pooled box moves. Boxes stay valid: clipped to [0, 1], and j < 0.5 keeps x1 < x2; a box
  that would collapse keeps its original value. Boxes in assistant turns (detached targets) never move.
- Direct 3D: a detect_3d answer `<bbox>[..]</bbox><region> <3d_box ...></3d_box>` per line becomes
  `<3d_box ...></3d_box>` per line: the model answers without grounding a region first (the paper's
  "2D -> 3D vs direct 3D" ablation).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

__all__ = ["jitter_boxes", "direct_answer", "direct_turns", "MAX_JITTER"]

MAX_JITTER = 0.5
"""box_jitter must stay below this, so the jittered x1 < x2 (each side moves less than half the width)."""

_GROUNDED = re.compile(r"<bbox>\[[^\]]*\]</bbox>(?:<region>)? ?")

Box = tuple[float, float, float, float]


def jitter_boxes(boxes: Sequence[Box], in_response: Sequence[bool], fraction: float, key: str) -> list[Box]:
    """Region-prompt boxes jittered by `fraction` of their size (see the module docstring); others unchanged."""
    if not 0.0 <= fraction < MAX_JITTER:
        raise ValueError(f"box jitter must be in [0, {MAX_JITTER}), got {fraction}")
    rng = random.Random(f"gr3d-jitter:{key}")
    out: list[Box] = []
    for box, resp in zip(boxes, in_response):
        if resp or fraction == 0:
            out.append(tuple(box))  # type: ignore[arg-type]
            continue
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        d = [rng.uniform(-fraction, fraction) for _ in range(4)]
        nx1, nx2 = sorted(min(1.0, max(0.0, v)) for v in (x1 + d[0] * w, x2 + d[2] * w))
        ny1, ny2 = sorted(min(1.0, max(0.0, v)) for v in (y1 + d[1] * h, y2 + d[3] * h))
        if (w > 0 and nx2 <= nx1) or (h > 0 and ny2 <= ny1):
            out.append(tuple(box))  # type: ignore[arg-type]
        else:
            out.append((nx1, ny1, nx2, ny2))
    return out


def direct_answer(text: str) -> str:
    """A detect_3d answer without the grounded 2D prefix of each object."""
    return _GROUNDED.sub("", text)


def direct_turns(turns: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The conversation with every assistant turn's answer in the direct-3D form (human turns unchanged)."""
    out = []
    for t in turns:
        t = dict(t)
        role = t.get("from", t.get("role"))
        key = "value" if "value" in t else "content"
        if role in ("gpt", "assistant"):
            t[key] = direct_answer(t[key])
        out.append(t)
    return out
