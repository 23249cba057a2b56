"""Question and answer templates of the 3D corpora: the one file where their phrasing lives.

They are part of the contract: the builders write them, the trainer learns them, and the evaluator
prompts the model with the same words (`detect_prompt(category, variant=0)` is the canonical phrasing).
Variants are chosen per sample key by a stable hash, so a rebuild writes the same text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = [
    "PROMPTS_VERSION",
    "REGION_TO_3D",
    "DETECT_3D",
    "POINT_3D",
    "plural",
    "choose",
    "region_to_3d_prompt",
    "detect_prompt",
    "point_prompt",
]

PROMPTS_VERSION = "1"

# {region} is a grounded 2D box: `<bbox>[..]</bbox><region>`.
REGION_TO_3D: tuple[str, ...] = (
    "What is the 3D box of {region}?",
    "Give the 3D bounding box of the object in {region}.",
    "Predict the 3D box of {region} in camera coordinates.",
    "Where is {region} in 3D? Answer with its 3D box.",
)

# {plural} is the category's plural ("chairs", "night stands").
DETECT_3D: tuple[str, ...] = (
    "Detect the 3D bounding boxes of all {plural}.",
    "Find every {name} in the image and give its 2D box and 3D box.",
    "Locate all {plural} in 3D, nearest first.",
)

# {region} is a point written as a zero-size box.
POINT_3D: tuple[str, ...] = (
    "Please detect the 3D location of point {region}.",
    "What are the 3D camera coordinates of point {region}?",
    "Give the 3D position of the surface at {region}.",
)

_PLURALS = {
    "books": "books", "blinds": "blinds", "shelves": "shelves", "clothes": "clothes", "shoes": "shoes",
    "bus": "buses", "glass": "glasses", "stationery": "stationery", "pedestrian": "pedestrians",
    "bookcase": "bookcases", "box": "boxes", "bench": "benches", "couch": "couches",
}


def plural(name: str) -> str:
    """English plural of a category name, good enough for the Omni3D and EmbodiedScan vocabularies."""
    if name in _PLURALS:
        return _PLURALS[name]
    head, _, last = name.rpartition(" ")
    if last in _PLURALS:
        return (head + " " if head else "") + _PLURALS[last]
    if last.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    if last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def choose(templates: Sequence[str], key: str, salt: str = "") -> str:
    """The template for a sample, picked by a stable hash of its key (never Python's salted hash())."""
    h = int.from_bytes(hashlib.sha256(f"{key}|{salt}".encode()).digest()[:8], "big")
    return templates[h % len(templates)]


def region_to_3d_prompt(region: str, key: str = "", salt: str = "", variant: int | None = None) -> str:
    t = REGION_TO_3D[variant] if variant is not None else choose(REGION_TO_3D, key, salt)
    return t.format(region=region)


def detect_prompt(category: str, variant: int | None = 0, key: str = "", salt: str = "") -> str:
    """Detection question for one category; variant 0 is what the evaluator asks."""
    t = DETECT_3D[variant] if variant is not None else choose(DETECT_3D, key, salt)
    return t.format(plural=plural(category), name=category)


def point_prompt(region: str, key: str = "", salt: str = "", variant: int | None = None) -> str:
    t = POINT_3D[variant] if variant is not None else choose(POINT_3D, key, salt)
    return t.format(region=region)
