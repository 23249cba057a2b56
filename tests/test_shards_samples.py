"""Example records and samples of the three corpora, shared by the shard tests.

The records follow docs/interfaces.md ("Sample record"); the tests here check that they satisfy
the schemas, so every other shard test works with records a real builder could emit.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas import records
from shards.writer import Sample, ShardWriter

FX = 500.0
K = [[FX, 0.0, 16.0], [0.0, FX, 12.0], [0.0, 0.0, 1.0]]


def image_bytes(ext: str, seed: int, w: int = 32, h: int = 24) -> bytes:
    """A small real image (gradient + seeded noise) encoded as jpg or png."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if ext == "jpg" else "PNG")
    return buf.getvalue()


def _common(key: str, corpus: str, ext: str = "jpg", camera: bool = True) -> dict[str, Any]:
    return {
        "key": key, "corpus": corpus,
        "source": {"dataset": "sample_world/omni3d", "file": "annotations/val.json", "id": key.rsplit("/", 1)[-1]},
        "image": {"ext": ext, "width": 32, "height": 24},
        "camera": {"K": copy.deepcopy(K), "scale": 1000.0 / FX} if camera else None,
        "arrays": [],
    }


def det3d_record(key: str = "world/det_000001", ext: str = "jpg") -> dict[str, Any]:
    rec = _common(key, "det3d", ext)
    rec["objects"] = [
        {"category": "chair", "bbox2d": [0.1, 0.2, 0.45, 0.9],
         "box3d": {"center": [-0.4, 0.3, 2.5], "dimensions": [0.5, 0.9, 0.55], "rotation": [0.0, 0.0, 0.25]}},
        {"category": "table", "bbox2d": [0.5, 0.4, 0.95, 0.95], "object_id": "t1",
         "box3d": {"center": [0.6, 0.4, 3.1], "dimensions": [1.2, 0.75, 0.8], "rotation": [0.01, -0.02, 1.0]}},
    ]
    rec["conversations"] = [
        {"task": "detect_3d", "category": "chair",
         "turns": [{"from": "human", "value": "<image>\nDetect all chairs in 3D."},
                   {"from": "gpt", "value": "<bbox>[0.100, 0.200, 0.450, 0.900]</bbox><region><3d_box center=\"-0.40, "
                                            "0.30, 2.50\" dimensions=\"0.50, 0.90, 0.55\" rotation=\"0.00, 0.00, 0.25\">"
                                            "</3d_box>"}]},
        {"task": "region_to_3d",
         "turns": [{"from": "human", "value": "What is the 3D box of <bbox>[0.500, 0.400, 0.950, 0.950]</bbox><region>?"},
                   {"from": "gpt", "value": "<3d_box center=\"0.60, 0.40, 3.10\" dimensions=\"1.20, 0.75, 0.80\" "
                                            "rotation=\"0.01, -0.02, 1.00\"></3d_box>"}]},
    ]
    return rec


def pointmap_record(key: str = "world/pm_000001", n: int = 7, ext: str = "png") -> dict[str, Any]:
    rec = _common(key, "pointmap", ext)
    rec["arrays"] = ["points"]
    rec["points"] = {"n": n, "mode": "random_valid"}
    rec["conversations"] = [{"task": "point_3d", "turns": [
        {"from": "human", "value": "<image>\nWhere is <bbox>[0.250, 0.500, 0.250, 0.500]</bbox> in 3D?"},
        {"from": "gpt", "value": "x: -0.10, y: 0.05, z: 2.31"}]}]
    return rec


def cot_record(key: str = "world/cot_000001", ext: str = "jpg") -> dict[str, Any]:
    rec = _common(key, "cot", ext, camera=False)
    rec["mentions"] = [
        {"text": "the red mug", "bbox2d": [0.2, 0.3, 0.35, 0.5], "category": "mug", "rewritten": None, "object_id": "3"},
        {"text": "the laptop", "bbox2d": [0.5, 0.5, 0.5, 0.5], "category": "laptop", "rewritten": "laptop",
         "object_id": None},
    ]
    rec["conversations"] = [{"task": "grounded_cot", "source_question_id": 17, "turns": [
        {"from": "human", "value": "<image>\nIs the mug left of the laptop?"},
        {"from": "gpt", "value": "The red mug <bbox>[0.200, 0.300, 0.350, 0.500]</bbox><region> is left of the laptop "
                                 "<bbox>[0.500, 0.500, 0.500, 0.500]</bbox><region>. Yes."}]}]
    return rec


def points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uv = rng.uniform(0, [32, 24], (n, 2))
    xyz = rng.uniform([-1, -1, 0.5], [1, 1, 4], (n, 3))
    return np.concatenate([uv, xyz], axis=1).astype(np.float32)


def make_sample(corpus: str, key: str, seed: int = 0) -> Sample:
    """A consistent Sample (record, real image bytes, arrays) of the given corpus."""
    if corpus == "det3d":
        rec = det3d_record(key)
        return Sample(key, image_bytes("jpg", seed), "jpg", rec, {})
    if corpus == "pointmap":
        rec = pointmap_record(key, n=5 + seed % 4)
        return Sample(key, image_bytes("png", seed), "png", rec, {"points": points(rec["points"]["n"], seed)})
    if corpus == "cot":
        rec = cot_record(key)
        return Sample(key, image_bytes("jpg", seed), "jpg", rec, {})
    raise ValueError(corpus)


def mixed_samples(n: int, prefix: str = "world") -> list[Sample]:
    corpora = ("det3d", "pointmap", "cot")
    return [make_sample(corpora[i % 3], f"{prefix}/s{i:04d}", seed=i) for i in range(n)]


def write_build(build: Path, per_shard: list[list[Sample]], rejects: list[list[dict[str, Any]]] | None = None) -> None:
    """Write one shard per list of samples (shard i <- per_shard[i])."""
    for i, samples in enumerate(per_shard):
        with ShardWriter(build, i) as w:
            for s in samples:
                w.add(s)
            w.close(rejects=(rejects[i] if rejects else ()))


@pytest.mark.parametrize("kind,factory", [("det3d", det3d_record), ("pointmap", pointmap_record), ("cot", cot_record)])
def test_example_records_satisfy_their_schema(kind: str, factory: Any) -> None:
    rec = factory()
    records.validate(kind, rec)
    # and they are not trivially valid: the wrong kind's schema refuses them
    other = {"det3d": "cot", "pointmap": "det3d", "cot": "pointmap"}[kind]
    with pytest.raises(records.SchemaError):
        records.validate(other, rec)


def test_mixed_samples_are_consistent_with_their_images() -> None:
    for s in mixed_samples(6):
        records.validate(s.record["corpus"], s.record)
        with Image.open(io.BytesIO(s.image_bytes)) as im:
            assert im.size == (s.record["image"]["width"], s.record["image"]["height"])
            assert im.format == {"jpg": "JPEG", "png": "PNG"}[s.image_ext]
