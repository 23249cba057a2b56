"""One Omni3D ignore rule: the det3d reader and the evaluator call `schemas.omni3d`, so they agree.

The thresholds and the box choice are Cube R-CNN's (`cubercnn/data/datasets.py` `is_ignore`,
`configs/Base.yaml` TEST section); before this module the reader used 0.3333 and its own box order.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from model.eval.io import gt_bbox_xywh, is_ignore, load_omni3d_gt
from pipelines.sources import read_omni3d, split_results
from pipelines.sources.omni3d import ignore_reasons
from schemas.omni3d import EVAL_RULES, TRAIN_RULES, height_box, stored_box


def _ann(**change: Any) -> dict[str, Any]:
    a = {"id": 1, "image_id": 1, "category_id": 1, "category_name": "chair", "valid3D": True,
         "behind_camera": False, "center_cam": [0.0, 0.0, 3.0], "dimensions": [1.0, 1.0, 1.0],
         "R_cam": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "bbox3D_cam": [[0.0, 0.0, 3.0]] * 8,
         "bbox2D_trunc": [100, 100, 300, 300], "bbox2D_proj": [100, 100, 300, 300],
         "bbox2D_tight": [-1, -1, -1, -1], "truncation": 0.0, "visibility": 1.0, "lidar_pts": 10,
         "segmentation_pts": 10, "depth_error": 0.1}
    a.update(change)
    return a


def _random_ann(rng: random.Random) -> dict[str, Any]:
    def box() -> list[float]:
        if rng.random() < 0.2:
            return [-1, -1, -1, -1]
        x, y = rng.uniform(0, 600), rng.uniform(-100, 400)
        return [x, y, x + rng.uniform(0, 300), y + rng.uniform(0, 800)]

    return _ann(
        behind_camera=rng.random() < 0.1, valid3D=rng.random() > 0.1,
        dimensions=[rng.choice([0.0, 0.5, 2.0]) for _ in range(3)],
        center_cam=[0.0, 0.0, rng.choice([1.0, 5.0, 2e8])],
        bbox2D_trunc=box(), bbox2D_proj=box(), bbox2D_tight=box(),
        truncation=rng.choice([-1, 0.0, 0.3333, 0.33333, 0.33333333, 0.5, 0.9]),
        visibility=rng.choice([-1, 0.1, 0.3333, 0.33333, 0.33333333, 0.34, 1.0]),
        lidar_pts=rng.choice([-1, 0, 5]), segmentation_pts=rng.choice([-1, 0, 5]),
        depth_error=rng.choice([-1, 0.2, 0.6]),
        category_name=rng.choice(["chair", "table", "dontcare", "void"]),
    )


def test_reader_and_evaluator_agree_on_random_annotations() -> None:
    rng = random.Random(0)
    ignored = 0
    for _ in range(3000):
        a = _random_ann(rng)
        got = is_ignore(a, 480.0)
        assert got == bool(ignore_reasons(a, 480.0, EVAL_RULES)), a
        ignored += got
    assert 0 < ignored < 3000  # both outcomes were exercised


@pytest.mark.parametrize("value", [0.33333, 0.33333333])
def test_cube_rcnn_thresholds(value: float) -> None:
    """0.3333 (the reader's old copy) would keep these; Cube R-CNN's 0.33333333 ignores them."""
    assert ignore_reasons(_ann(visibility=value), 480.0) == ["occluded"]
    assert ignore_reasons(_ann(truncation=0.33333), 480.0) == []  # truncation >= 0.33333333 only
    assert ignore_reasons(_ann(truncation=0.33333333), 480.0) == ["truncated"]
    assert is_ignore(_ann(visibility=value), 480.0)


def test_negative_visibility_is_unavailable() -> None:
    """Cube R-CNN tests `visibility >= 0`; any negative value means not annotated."""
    assert ignore_reasons(_ann(visibility=-0.5), 480.0) == []


def test_box_choice() -> None:
    a = _ann(bbox2D_trunc=[-1, -1, -1, -1], bbox2D_proj=[0, 0, 10, 20], bbox2D_tight=[0, 0, 10, 400])
    assert height_box(a) == [0, 0, 10, 20]  # trunc unset: proj decides the height test
    assert "too_short" in ignore_reasons(a, 480.0)
    a = _ann(bbox2D_trunc=[-1, -1, -1, -1], bbox2D_proj=[-1, -1, -1, -1], bbox2D_tight=[0, 0, 10, 400])
    assert height_box(a) is None and ignore_reasons(a, 480.0) == ["no_2d_box"]  # proj exists but unset
    assert stored_box(a) == [0, 0, 10, 400] and gt_bbox_xywh(a) == (0, 0, 10, 400)
    del a["bbox2D_proj"]
    assert height_box(a) == [0, 0, 10, 400]  # no proj field: the loader's stored box
    assert TRAIN_RULES.visibility_thres == 0.25 and EVAL_RULES.visibility_thres == 0.33333333


def test_sample_world_reader_and_evaluator_agree(sample_world: Any) -> None:
    files = [str(p) for p in sample_world.omni3d_files]
    items, _ = split_results(read_omni3d(files, sample_world.root, rules="eval"))
    reader = {a["id"]: a["ignore"] for it in items for a in it["annotations"]}
    gt = load_omni3d_gt(files)
    evaluator = {g.id: g.ignore for g in gt.instances}
    assert evaluator and set(evaluator) <= set(reader)
    assert {i: reader[i] for i in evaluator} == evaluator
