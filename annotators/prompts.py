"""Every prompt the annotators send, in one place, under one version.

Why one file with a version: a corpus is only reproducible and auditable if we know exactly what
the models were asked. `PROMPT_VERSION` goes into the provenance of every built sample and into
the response-cache key, so editing any template below without bumping the version would mix
answers to different questions in one cache. Bump it on ANY change to a VLM template (the
`test_prompt_version_pins_templates` test fails until you do).

Coordinates in VLM prompts are integers in 0..1000 of the image width and height (x1, y1, x2,
y2, origin top-left). Why: the Qwen2-VL/Qwen3-VL families are trained on this convention, other
chat VLMs handle it as well as anything else, and it does not depend on how the serving stack
resizes the image (absolute pixels would). Candidate boxes are additionally drawn and numbered
on the image by default (set-of-mark prompting), which small VLMs follow far better than text
coordinates alone.

`TAGGER_VERSION` versions the Florence-2 side (task tokens, which requests are made), separately,
so that editing a VLM prompt does not invalidate cached Florence-2 outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "PROMPT_VERSION",
    "TAGGER_VERSION",
    "VERIFY_ONE",
    "VERIFY_MANY",
    "REWRITE",
    "REPAIR_SUFFIX",
    "MARKS_NOTE",
    "MARKS_NOTE_REWRITE",
    "TEMPLATES_SHA256",
    "to_milli",
    "format_box_milli",
    "verify_prompt",
    "rewrite_prompt",
    "repair_prompt",
]

PROMPT_VERSION = "vlm-v1"
TAGGER_VERSION = "florence2-v1"

VERIFY_ONE = (
    "You check object annotations in an image. Box coordinates are x1, y1, x2, y2 as integers "
    "from 0 to 1000 of the image width and height, origin at the top-left corner.\n"
    'A text mentions "{mention}". Candidate box:\n'
    "{candidates}\n"
    "{marks}"
    'Does box 0 show exactly the object "{mention}", tightly and completely? Answer null if it '
    "shows something else, several objects, or only a part of it.\n"
    "Answer with one JSON object and nothing else: "
    '{{"choice": 0 or null, "confidence": a number from 0 to 1}}'
)

VERIFY_MANY = (
    "You check object annotations in an image. Box coordinates are x1, y1, x2, y2 as integers "
    "from 0 to 1000 of the image width and height, origin at the top-left corner.\n"
    'A text mentions "{mention}". Candidate boxes:\n'
    "{candidates}\n"
    "{marks}"
    'Which candidate box shows exactly the object "{mention}", tightly and completely? Answer '
    "null if none does, or if a box shows several objects or only a part of one.\n"
    "Answer with one JSON object and nothing else: "
    '{{"choice": the candidate number or null, "confidence": a number from 0 to 1}}'
)

REWRITE = (
    "Box coordinates are x1, y1, x2, y2 as integers from 0 to 1000 of the image width and "
    "height, origin at the top-left corner.\n"
    'The object "{mention}" is in box {box}.\n'
    "{others}"
    "{marks}"
    "Write a short description (at most 12 words) of this one object that tells it apart from "
    "{contrast}, using its colour, material, size, position in the image or a nearby object. "
    "Do not mention boxes, numbers or coordinates.\n"
    'Answer with one JSON object and nothing else: {{"description": "..."}}'
)

REPAIR_SUFFIX = (
    "\nYour previous answer could not be used ({reason}). Reply again with only the JSON object "
    "described above, with no other text."
)

MARKS_NOTE = "The boxes are also drawn on the image, each labelled with its number.\n"
MARKS_NOTE_REWRITE = (
    "The object is drawn on the image as box T; other objects of its class as numbered boxes.\n"
)

TEMPLATES_SHA256 = hashlib.sha256(
    "\x00".join(
        [PROMPT_VERSION, VERIFY_ONE, VERIFY_MANY, REWRITE, REPAIR_SUFFIX, MARKS_NOTE, MARKS_NOTE_REWRITE]
    ).encode()
).hexdigest()
"""Fingerprint of the templates; a test pins it together with `PROMPT_VERSION`."""


def to_milli(box_xyxy_px: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box -> integer 0..1000 box (rounded, clamped), the prompt coordinate convention."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    x1, y1, x2, y2 = (float(v) for v in box_xyxy_px)
    out = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(1000, max(0, round(v * 1000))) for v in out)  # type: ignore[return-value]


def format_box_milli(box_xyxy_px: Sequence[float], width: int, height: int) -> str:
    """`[x1, y1, x2, y2]` in the 0..1000 convention, as written into prompts."""
    return "[{}, {}, {}, {}]".format(*to_milli(box_xyxy_px, width, height))


def _quote(text: str) -> str:
    # Mentions come from dataset text; keep them on one line and free of the quote that delimits them.
    return " ".join(text.replace('"', "'").split())


def verify_prompt(
    mention: str,
    boxes_px: Sequence[Sequence[float]],
    labels: Sequence[str | None] | None,
    width: int,
    height: int,
    marks: bool,
) -> str:
    """The verify question for one mention and its candidate boxes (0-based numbering)."""
    if not boxes_px:
        raise ValueError("verify needs at least one candidate box")
    lines = []
    for i, b in enumerate(boxes_px):
        label = labels[i] if labels is not None else None
        suffix = f" (proposed as: {_quote(label)})" if label else ""
        lines.append(f"{i}: {format_box_milli(b, width, height)}{suffix}")
    template = VERIFY_ONE if len(boxes_px) == 1 else VERIFY_MANY
    return template.format(
        mention=_quote(mention), candidates="\n".join(lines), marks=MARKS_NOTE if marks else ""
    )


def rewrite_prompt(
    mention: str,
    box_px: Sequence[float],
    others_px: Sequence[Sequence[float]],
    width: int,
    height: int,
    marks: bool,
) -> str:
    """The rewrite request: an instance-level description that separates the box from `others_px`."""
    if others_px:
        lines = "\n".join(f"{i}: {format_box_milli(b, width, height)}" for i, b in enumerate(others_px))
        others = f"Other objects of the same class are in boxes:\n{lines}\n"
        contrast = "the other objects of its class"
    else:
        others = ""
        contrast = "anything else in the image"
    return REWRITE.format(
        mention=_quote(mention),
        box=format_box_milli(box_px, width, height),
        others=others,
        contrast=contrast,
        marks=MARKS_NOTE_REWRITE if marks else "",
    )


def repair_prompt(prompt: str, reason: str) -> str:
    """The second-attempt prompt after unusable output: the original plus what was wrong."""
    return prompt + REPAIR_SUFFIX.format(reason=_quote(reason))
