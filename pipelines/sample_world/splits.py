"""Scene-disjoint train / held-out inputs of a generated sample world.

The world assigns whole scenes to splits (the last 20 % are `val`): Omni3D and EmbodiedScan already come
as one file per split, but the RefSpatial files mix all scenes (as the real dumps have no split). To
train on train scenes only and score on held-out ones, `refspatial_split` writes each RefSpatial file's
records of one split to `RefSpatial/3D/<split>/<name>.json` (same records, same image and depth roots,
so the CoT builder and the oracle annotators read them unchanged: the oracle keys on record ids).
`split_inputs` gives the three corpora's input files of a split. A record's scene is its image's
folder (`sceneNNNN/image/...`); a record whose scene is unknown is an error, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SPLITS", "scene_splits", "refspatial_split", "split_inputs"]

SPLITS = ("train", "val")
REFSPATIAL_FILES = ("reasoning_template_qa", "choice_qa")


def scene_splits(world: str | Path) -> dict[str, str]:
    """scene id -> split, from the world's `ground_truth.json`."""
    gt = json.loads((Path(world) / "ground_truth.json").read_text())
    return {s["scene_id"]: s["split"] for s in gt["scenes"]}


def _scene_of(record: dict[str, Any]) -> str:
    image = record["image"][0] if isinstance(record["image"], list) else record["image"]
    return str(image).split("/", 1)[0]


def refspatial_split(world: str | Path, split: str) -> list[str]:
    """Write the RefSpatial records of `split`'s scenes; return their paths relative to the world root."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(world)
    splits = scene_splits(root)
    out = []
    for name in REFSPATIAL_FILES:
        src = root / "RefSpatial" / "3D" / f"{name}.json"
        records = json.loads(src.read_text())
        kept = []
        for r in records:
            scene = _scene_of(r)
            if scene not in splits:
                raise ValueError(f"{src}: record {r.get('id')!r} is in scene {scene!r}, which ground_truth.json lacks")
            if splits[scene] == split:
                kept.append(r)
        rel = f"RefSpatial/3D/{split}/{name}.json"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in kept)
        (root / rel).write_text("[\n" + body + "\n]\n" if kept else "[]\n", encoding="utf-8")
        out.append(rel)
    return out


def split_inputs(world: str | Path, split: str) -> dict[str, Any]:
    """Input files of one split: {"omni3d": path, "embodiedscan": path, "refspatial": [paths rel. to world]}."""
    root = Path(world)
    omni = root / "Omni3D" / f"SampleWorld_{split}.json"
    es = root / "embodiedscan" / f"embodiedscan_infos_{split}.pkl"
    for p in (omni, es):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (a world of fewer than 2 scenes has no val split)")
    return {"omni3d": str(omni), "embodiedscan": str(es), "refspatial": refspatial_split(root, split)}
