"""Omni3D's category vocabularies (cubercnn/data/builtin.py): one copy for the builders, the sample world,
the mention extractor and the evaluator. The index in `OMNI3D_CATEGORIES` is the global category id."""

from __future__ import annotations

__all__ = ["OMNI3D_CATEGORIES", "OMNI3D_ID", "OMNI3D_IN_CATEGORIES", "OMNI3D_OUT_CATEGORIES"]

OMNI3D_CATEGORIES: tuple[str, ...] = (
    "chair", "table", "cabinet", "car", "lamp", "books", "sofa", "pedestrian", "picture", "window",
    "pillow", "truck", "door", "blinds", "sink", "shelves", "television", "shoes", "cup", "bottle",
    "bookcase", "laptop", "desk", "cereal box", "floor mat", "traffic cone", "mirror", "barrier", "counter",
    "camera", "bicycle", "toilet", "bus", "bed", "refrigerator", "trailer", "box", "oven", "clothes", "van",
    "towel", "motorcycle", "night stand", "stove", "machine", "stationery", "bathtub", "cyclist", "curtain",
    "bin",
)  # fmt: skip
OMNI3D_ID: dict[str, int] = {name: i for i, name in enumerate(OMNI3D_CATEGORIES)}

# omni3d_out (11) and omni3d_in (38, = the SUN RGB-D list)
OMNI3D_OUT_CATEGORIES: tuple[str, ...] = (
    "cyclist", "pedestrian", "trailer", "bus", "motorcycle", "car", "barrier", "truck", "van",
    "traffic cone", "bicycle",
)  # fmt: skip
OMNI3D_IN_CATEGORIES: tuple[str, ...] = (
    "bicycle", "books", "bottle", "chair", "cup", "laptop", "shoes", "towel", "blinds", "window", "lamp",
    "shelves", "mirror", "sink", "cabinet", "bathtub", "door", "toilet", "desk", "box", "bookcase",
    "picture", "table", "counter", "bed", "night stand", "pillow", "sofa", "television", "floor mat",
    "curtain", "clothes", "stationery", "refrigerator", "bin", "stove", "oven", "machine",
)  # fmt: skip
