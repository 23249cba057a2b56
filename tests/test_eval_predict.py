"""GR3D answers -> Omni3D predictions (`model.eval.predict`), and `gr3d eval det3d --checkpoint` wiring.

The model is replaced by a scripted fake (answers per prompt, token pieces with chosen log-probs), so
these tests check prompting, parsing, scoring and evaluation, not model quality.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.eval.predict import answer_to_instances, parse_answer
from pipelines.cli import main
from tests.test_eval_cli import write_gt

B2D = "<bbox>[0.156, 0.208, 0.469, 0.625]</bbox>"
B3D_1 = (
    '<3d_box center="0.00, 0.00, 3.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, 0.00"></3d_box>'
)
B3D_2 = (
    '<3d_box center="5.00, 0.00, 3.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, 0.00"></3d_box>'
)
# (piece, log-prob); None = a region slot (no log-prob). The last object is cut off by the token limit.
PIECES = [
    (B2D, -0.2),
    ("<region>", None),
    (B3D_1, -0.4),
    (" and ", -3.0),
    (B3D_2, -1.0),
    (' <3d_box center="1', -0.5),
]
TEXT = "".join(p for p, _ in PIECES)
UNIT = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float
)


def test_parse_answer_pairs_boxes_and_scores_each_object() -> None:
    objs = parse_answer(TEXT, PIECES, fallback_score=-9.0)
    assert len(objs) == 2  # the truncated third box is skipped
    assert objs[0].bbox2d == pytest.approx((0.156, 0.208, 0.469, 0.625))
    assert objs[1].bbox2d is None  # no 2D box between the previous 3D box and this one
    assert objs[0].score == pytest.approx((-0.2 - 0.4) / 2)  # its 2D and 3D box tokens, not the region slot
    assert objs[1].score == pytest.approx(-1.0)
    # pieces that do not spell the text: every object falls back to the answer-level score
    assert [o.score for o in parse_answer(TEXT, [("xx", -1.0)], fallback_score=-9.0)] == [-9.0, -9.0]
    assert parse_answer("no boxes here", PIECES) == []


def test_answer_to_instances_corners_bbox_and_depth() -> None:
    objs = parse_answer(TEXT, PIECES)
    inst = answer_to_instances(objs, image_id=7, category_id=10, width=640, height=480)
    np.testing.assert_allclose(inst[0]["bbox3D"], UNIT - 0.5 + [0, 0, 3], atol=1e-12)
    assert inst[0]["bbox"] == pytest.approx([0.156 * 640, 0.208 * 480, 0.313 * 640, 0.417 * 480])
    assert inst[0]["depth"] == pytest.approx(3.0)
    assert (inst[0]["image_id"], inst[0]["category_id"]) == (7, 10)
    assert "bbox" not in inst[1]
    # yaw 0.5 (= 90 deg about y), dims w=1, h=2, l=3: local x (length 3) turns onto -z, local z onto +x.
    rot = '<3d_box center="0.00, 0.00, 10.00" dimensions="1.00, 2.00, 3.00" rotation="0.00, 0.00, 0.50"></3d_box>'
    c = np.array(answer_to_instances(parse_answer(rot), 1, 1, 10, 10)[0]["bbox3D"])
    np.testing.assert_allclose(c.min(0), [-0.5, -1.0, 8.5], atol=1e-12)
    np.testing.assert_allclose(c.max(0), [0.5, 1.0, 11.5], atol=1e-12)
    np.testing.assert_allclose(c[1], [-0.5, -1.0, 8.5], atol=1e-12)  # local (+l/2, -h/2, -w/2)


class _FakeTokenizer:
    """Ids are indices into a growing piece list; id 0 is `<region>`."""

    def __init__(self) -> None:
        self.pieces = ["<region>"]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.pieces.index(token)

    def add(self, piece: str) -> int:
        self.pieces.append(piece)
        return len(self.pieces) - 1

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids)


class _FakeModel:
    def __init__(self) -> None:
        self.tokenizer = _FakeTokenizer()

    def to(self, device: str) -> _FakeModel:
        return self


def test_det3d_with_checkpoint_prompts_each_category_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gt = write_gt(tmp_path)
    Image.new("RGB", (640, 480)).save(tmp_path / "a.jpg")
    Image.new("RGB", (1242, 375)).save(tmp_path / "b.png")
    model = _FakeModel()
    calls: list[tuple[str, float, tuple[int, int]]] = []

    def fake_generate(
        m: _FakeModel,
        images: list,
        prompts: list[str],
        max_new_tokens: int = 256,
        scales: list | None = None,
        **kw: object,
    ) -> list[types.SimpleNamespace]:
        out = []
        for im, p, s in zip(images, prompts, scales or []):
            calls.append((p, s, im.size))
            pieces = PIECES[:3] if "chair" in p else [("nothing", -0.1)]
            ids = [0 if lp is None else m.tokenizer.add(t) for t, lp in pieces]
            lps = [lp for _, lp in pieces if lp is not None]
            out.append(
                types.SimpleNamespace(
                    text="".join(t for t, _ in pieces),
                    token_ids=ids,
                    token_logprobs=lps,
                    mean_logprob=float(np.mean(lps)),
                )
            )
        return out

    monkeypatch.setitem(sys.modules, "model.generate", types.SimpleNamespace(generate=fake_generate))
    monkeypatch.setitem(
        sys.modules, "model.checkpoint", types.SimpleNamespace(build_tiny_model=lambda: model)
    )
    rc = main(
        [
            "eval",
            "det3d",
            "--gt",
            *gt,
            "--checkpoint",
            "tiny",
            "--image-root",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0
    # one prompt per category present in each image's GT (dontcare is not evaluated), shown at 1000 / fx = 2
    assert calls == [
        ("Detect the 3D bounding boxes of all chairs.", 2.0, (640, 480)),
        ("Detect the 3D bounding boxes of all tables.", 2.0, (640, 480)),
        ("Detect the 3D bounding boxes of all cars.", 2.0, (1242, 375)),
    ]
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [1, 2]
    (chair,) = preds[0]["instances"]
    assert chair["logprob"] == pytest.approx(-0.3) and chair["category_id"] == 10
    assert chair["score"] == pytest.approx(math.exp(-0.3)) and CUBERCNN_FIELDS <= set(chair)
    assert preds[1]["instances"] == []
    r = json.loads((tmp_path / "o" / "det3d_eval.json").read_text())
    sun = r["datasets"]["SUNRGBD_test"]
    assert sun["per_category"] == {"chair": pytest.approx(1.0), "table": 0.0}
    assert r["datasets"]["KITTI_test"]["AP3D"] == 0.0
    assert math.isclose(r["overall"]["AP3D"], 1 / 3, abs_tol=1e-12)


CUBERCNN_FIELDS = {"image_id", "category_id", "bbox", "score", "depth", "bbox3D", "center_cam", "center_2D",
                   "dimensions", "pose"}  # what Cube R-CNN's instances_to_coco_json writes per instance


def test_instances_carry_every_cubercnn_field_and_a_probability_score() -> None:
    K = [[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]]
    objs = parse_answer(TEXT, PIECES)
    inst = answer_to_instances(objs, image_id=7, category_id=10, width=640, height=480, K=K)
    for i in inst:
        assert CUBERCNN_FIELDS <= set(i), CUBERCNN_FIELDS - set(i)
        assert 0.0 <= i["score"] <= 1.0 and i["score"] == pytest.approx(np.exp(i["logprob"]))
        assert np.asarray(i["pose"]).shape == (3, 3) and len(i["dimensions"]) == 3
        # center_2D is the projection of center_cam; depth is the mean corner z
        u, v, w = np.asarray(K) @ np.asarray(i["center_cam"])
        assert i["center_2D"] == pytest.approx([u / w, v / w])
        assert i["depth"] == pytest.approx(np.asarray(i["bbox3D"])[:, 2].mean())
    assert inst[0]["logprob"] == pytest.approx((-0.2 - 0.4) / 2) and inst[0]["bbox_source"] == "answer"
    # the second object has no 2D box in the answer: its bbox is the projected 3D box, clipped to the image
    c = np.asarray(inst[1]["bbox3D"])
    uv = (c @ np.asarray(K).T)[:, :2] / c[:, 2:3]
    x1, y1 = np.clip(uv.min(0), 0, [640, 480])
    x2, y2 = np.clip(uv.max(0), 0, [640, 480])
    assert inst[1]["bbox_source"] == "projected" and inst[1]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    # an object without any log-probability scores 0, not NaN
    objs[0].score = float("-inf")
    assert answer_to_instances(objs[:1], 7, 10, 640, 480, K=K)[0]["score"] == 0.0
