"""What the sample world is made of: categories with realistic sizes, colours, dataset ids.

Sizes are metres (length along the object's local x, width along local y, height along z-up),
ranges taken from common furniture dimensions so that the apparent size of an object in an image
says something true about its distance: that is what intrinsics normalization is for.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.categories import OMNI3D_CATEGORIES, OMNI3D_ID  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Category:
    """A furniture-like cuboid category: size ranges (min, max) in metres and where it may stand."""

    name: str
    length: tuple[float, float]
    width: tuple[float, float]
    height: tuple[float, float]
    support: bool = False  # other objects may stand on its top
    on_top: bool = False  # stands on a supporting object, not on the floor
    against_wall: float = 0.0  # probability of being placed with its back touching a wall


FLOOR_CATEGORIES: tuple[Category, ...] = (
    Category("chair", (0.45, 0.60), (0.45, 0.60), (0.80, 1.05)),
    Category("table", (1.00, 1.80), (0.70, 1.00), (0.70, 0.78), support=True),
    Category("desk", (1.10, 1.60), (0.60, 0.80), (0.72, 0.78), support=True, against_wall=0.7),
    Category("cabinet", (0.60, 1.20), (0.40, 0.60), (0.80, 1.00), support=True, against_wall=0.8),
    Category("sofa", (1.60, 2.30), (0.80, 1.00), (0.75, 0.95), against_wall=0.6),
    Category("bed", (1.90, 2.10), (0.90, 1.80), (0.45, 0.65), against_wall=0.8),
    Category("bookcase", (0.70, 1.00), (0.30, 0.40), (1.50, 2.00), against_wall=0.9),
    Category("night stand", (0.40, 0.55), (0.35, 0.45), (0.50, 0.65), support=True),
    Category("refrigerator", (0.60, 0.80), (0.60, 0.75), (1.60, 1.90), against_wall=0.9),
    Category("bin", (0.25, 0.40), (0.25, 0.40), (0.30, 0.60)),
    Category("box", (0.30, 0.60), (0.30, 0.50), (0.20, 0.50)),
    Category("lamp", (0.30, 0.45), (0.30, 0.45), (1.30, 1.70)),
    Category("stove", (0.60, 0.76), (0.60, 0.65), (0.85, 0.95), against_wall=0.9),
)
TOP_CATEGORIES: tuple[Category, ...] = (
    Category("television", (0.90, 1.30), (0.08, 0.15), (0.55, 0.80), on_top=True),
    Category("laptop", (0.30, 0.38), (0.22, 0.26), (0.02, 0.03), on_top=True),
    Category("books", (0.15, 0.25), (0.20, 0.30), (0.04, 0.10), on_top=True),
    Category("cup", (0.07, 0.10), (0.07, 0.10), (0.09, 0.12), on_top=True),
    Category("bottle", (0.07, 0.09), (0.07, 0.09), (0.20, 0.30), on_top=True),
    Category("box", (0.15, 0.30), (0.12, 0.25), (0.10, 0.25), on_top=True),
)

# EmbodiedScan-style `metainfo.categories`: name -> id, ids from 1, alphabetical (like the real file),
# over a vocabulary larger than what the world uses, so ids are not contiguous in the data.
_ES_VOCAB = sorted(
    {c.name for c in FLOOR_CATEGORIES + TOP_CATEGORIES}
    | {"adhesive tape", "air conditioner", "backpack", "basket", "ceiling", "curtain", "door", "floor",
       "mirror", "pillow", "plant", "shelf", "sink", "toilet", "wall", "window"}
)  # fmt: skip
ES_CATEGORIES: dict[str, int] = {name: i + 1 for i, name in enumerate(_ES_VOCAB)}

# Distinct, nameable object colours (sRGB 0..255); names are used in the referring expressions.
COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (200, 30, 30)),
    ("green", (40, 160, 60)),
    ("blue", (40, 70, 200)),
    ("yellow", (225, 200, 40)),
    ("orange", (235, 120, 20)),
    ("purple", (120, 50, 160)),
    ("cyan", (40, 190, 200)),
    ("pink", (235, 130, 170)),
    ("brown", (120, 75, 40)),
    ("black", (35, 35, 35)),
    ("magenta", (200, 40, 160)),
    ("lime", (150, 220, 50)),
)
FLOOR_RGB = (150, 140, 125)
WALL_RGB = (215, 210, 200)
MAX_OBJECTS = 12
