"""The record schemas catch real mistakes and say where: field path + rule."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from importlib import resources
from typing import Any

import jsonschema
import numpy as np
import pytest

from schemas import records
from schemas.records import SchemaError, validate
from tests.test_shards_samples import cot_record, det3d_record, pointmap_record


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def f(rec: dict[str, Any]) -> None:
        obj = rec
        for p in path[:-1]:
            obj = obj[p]
        obj[path[-1]] = value
    return f


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def f(rec: dict[str, Any]) -> None:
        obj = rec
        for p in path[:-1]:
            obj = obj[p]
        del obj[path[-1]]
    return f


DET3D_BREAKS = [
    # (mutation, path named in the message, rule named in the message)
    (_set(["objects", 1, "box3d", "dimensions", 0], -0.2), "objects[1].box3d.dimensions[0]", "exclusiveMinimum"),
    (_set(["objects", 1, "box3d", "dimensions", 0], 0), "objects[1].box3d.dimensions[0]", "exclusiveMinimum"),
    (_set(["objects", 0, "box3d", "rotation", 2], -1.0), "objects[0].box3d.rotation[2]", "exclusiveMinimum"),
    (_set(["objects", 0, "box3d", "rotation", 2], 1.5), "objects[0].box3d.rotation[2]", "maximum"),
    (_set(["objects", 0, "box3d", "center"], [1, 2]), "objects[0].box3d.center", "minItems"),
    (_set(["objects", 0, "bbox2d"], [0.1, 0.2, 0.3]), "objects[0].bbox2d", "minItems"),
    (_set(["objects", 0, "bbox2d", 2], 1.01), "objects[0].bbox2d[2]", "maximum"),
    (_set(["objects", 0, "bbox2d"], [0.5, 0.2, 0.4, 0.9]), "objects[0].bbox2d", "ordered_xyxy"),
    (_set(["objects", 0, "box3d", "extra"], 1), "objects[0].box3d", "additionalProperties"),
    (_set(["objects", 0, "bbox_2d"], [0, 0, 1, 1]), "objects[0]", "additionalProperties"),
    (_del(["objects", 0, "category"]), "objects[0]", "required"),
    (_set(["camera", "K"], [[500, 0, 16], [0, 500, 12]]), "camera.K", "minItems"),
    (_set(["camera", "K", 2], [0, 0, 2]), "camera.K[2][2]", "const"),
    (_set(["camera", "K", 0, 0], -500.0), "camera.K[0][0]", "exclusiveMinimum"),
    (_set(["camera", "scale"], 1.0), "camera.scale", "scale_is_1000_over_fx"),
    (_set(["camera"], None), "camera", "type"),
    (_set(["image", "ext"], "jpeg"), "image.ext", "enum"),
    (_set(["image", "width"], 32.5), "image.width", "type"),
    (_set(["key"], "a.b"), "key", "pattern"),
    (_set(["corpus"], "pointmap"), "corpus", "const"),
    (_del(["source", "id"]), "source", "required"),
    (_set(["conversations", 0, "task"], "detect3d"), "conversations[0].task", "enum"),
    (_del(["conversations", 0, "category"]), "conversations[0]", "required"),
    (_set(["conversations", 1, "turns", 0, "from"], "system"), "conversations[1].turns[0].from", "enum"),
    (_set(["conversations", 1, "turns", 0, "from"], "gpt"), "conversations[1].turns[0].from", "alternating_turns"),
    (_set(["conversations", 1, "turns", 1, "value"], ""), "conversations[1].turns[1].value", "minLength"),
    (_set(["conversations", 1, "turns"], [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}] * 11),
     "conversations[1].turns", "maxItems"),
    (_set(["conversations", 1, "task"], "detect_3d") , "conversations[1]", "required"),
    (_set(["arrays"], ["Points"]), "arrays[0]", "pattern"),
    (_set(["unexpected"], 1), "<record>", "additionalProperties"),
    (_set(["objects", 0, "box3d", "center", 2], float("nan")), "objects[0].box3d.center[2]", "finite"),
]


@pytest.mark.parametrize("mutate,path,rule", DET3D_BREAKS, ids=[f"{p}:{r}" for _, p, r in DET3D_BREAKS])
def test_det3d_errors_name_path_and_rule(mutate: Callable[[dict[str, Any]], None], path: str, rule: str) -> None:
    rec = det3d_record()
    mutate(rec)
    with pytest.raises(SchemaError) as ei:
        validate("det3d", rec)
    assert ei.value.path == path, str(ei.value)
    assert f"{path}:" in str(ei.value) and f"[{rule}]" in str(ei.value)


@pytest.mark.parametrize("mutate,path,rule", [b for b in DET3D_BREAKS if b[2] not in ("finite",)],
                         ids=[f"{p}:{r}" for _, p, r in DET3D_BREAKS if r not in ("finite",)])
def test_compiled_fast_path_agrees_with_jsonschema(mutate: Callable[[dict[str, Any]], None], path: str,
                                                   rule: str) -> None:
    """The compiled validator on the writers' hot path must refuse what jsonschema refuses (and pass the rest)."""
    from schemas.records import _fast_validator, _validator

    good = det3d_record()
    assert _fast_validator("det3d")(good) and _validator("det3d").is_valid(good)
    rec = det3d_record()
    mutate(rec)
    assert _fast_validator("det3d")(rec) == _validator("det3d").is_valid(rec)
    for kind, make in (("pointmap", pointmap_record), ("cot", cot_record)):
        assert _fast_validator(kind)(make())


def test_two_detect_3d_for_one_category_is_refused() -> None:
    rec = det3d_record()
    rec["conversations"].append(copy.deepcopy(rec["conversations"][0]))
    with pytest.raises(SchemaError, match=r"conversations\[2\]\.category.*one_detect_3d_per_category"):
        validate("det3d", rec)


def test_pointmap_and_cot_rules() -> None:
    pm = pointmap_record()
    pm["arrays"] = []
    with pytest.raises(SchemaError, match=r"arrays: .*\[contains\]"):
        validate("pointmap", pm)
    pm = pointmap_record()
    pm["points"]["n"] = 0
    with pytest.raises(SchemaError, match=r"points\.n: .*\[minimum\]"):
        validate("pointmap", pm)
    cot = cot_record()
    validate("cot", cot)  # camera may be null for cot
    assert cot["conversations"][0]["source_question_id"] == 17  # extras in conversations are allowed
    cot["source"]["split"] = "train"  # and in source
    validate("cot", cot)
    cot["mentions"][0]["rewritten"] = 3
    with pytest.raises(SchemaError, match=r"mentions\[0\]\.rewritten: .*\[type\]"):
        validate("cot", cot)
    cot = cot_record()
    cot["camera"] = {"K": [[500.0, 0, 16], [0, 500.0, 12], [0, 0, 1]], "scale": 2.0}
    validate("cot", cot)  # or a real camera


def test_numpy_values_validate_like_plain_ones() -> None:
    rec = det3d_record()
    rec["objects"][0]["box3d"]["center"] = [np.float32(0.5), np.float64(0.1), 2.0]
    rec["image"]["width"] = int(np.int64(32))
    validate("det3d", rec)


def test_side_records() -> None:
    validate("reject", {"key": "a/b", "stage": "florence", "reason": "no_objects", "message": "nothing detected"})
    with pytest.raises(SchemaError, match=r"reason: .*\[pattern\]"):
        validate("reject", {"key": "a/b", "stage": "s", "reason": "No Objects", "message": ""})
    with pytest.raises(SchemaError, match=r"\[additionalProperties\]"):
        validate("reject", {"key": "a/b", "stage": "s", "reason": "x", "message": "", "extra": 1})
    with pytest.raises(SchemaError, match=r"'version' is a required property"):
        validate("audit", {})
    with pytest.raises(SchemaError, match=r"unknown record kind 'det3D'"):
        validate("det3D", {})
    with pytest.raises(SchemaError, match=r"<record>: .*\[type\]"):
        validate("det3d", [])


def test_every_schema_file_is_valid_2020_12_and_loaded_once() -> None:
    names = sorted(p.name for p in (resources.files("schemas") / "json").iterdir() if p.name.endswith(".schema.json"))
    assert names == sorted(f"{k}.schema.json" for k in (*records.KINDS, "common"))
    for name in names:
        doc = json.loads((resources.files("schemas") / "json" / name).read_text())
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(doc)
    assert records.schema("det3d") is records.schema("det3d")  # cached


def test_many_problems_are_all_reported() -> None:
    rec = det3d_record()
    rec["objects"][0]["bbox2d"][0] = 2.0
    rec["objects"][1]["box3d"]["dimensions"][1] = -1.0
    with pytest.raises(SchemaError) as ei:
        validate("det3d", rec)
    paths = [p for p, _ in ei.value.problems]
    assert "objects[0].bbox2d[0]" in paths and "objects[1].box3d.dimensions[1]" in paths
