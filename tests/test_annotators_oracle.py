"""Oracle tagger/verifier on a real (tiny) sample world's ground_truth.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotators.common import Mention
from annotators.factory import make_tagger, make_verifier
from annotators.oracle import OracleTagger, OracleVerifier, load_ground_truth
from annotators.vlm import RewriteRequest, VerifyRequest, VLMClient
from schemas.boxes import box_iou


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.sample_world import generate

    out = tmp_path_factory.mktemp("sample_world")
    generate(out, scenes=2, views=2, seed=0, width=160, height=120)
    return out


def _records(world: Path) -> dict[str, dict[str, Any]]:
    recs: dict[str, dict[str, Any]] = {}
    for f in sorted((world / "RefSpatial" / "3D").glob("*.json")):
        for r in json.loads(f.read_text()):
            recs[r["id"]] = r
    return recs


def test_tagger_proposes_exactly_the_true_boxes(world: Path) -> None:
    gt_path = world / "ground_truth.json"
    gt = load_ground_truth(gt_path)
    recs = _records(world)
    assert len(gt) > 10
    by_rec: dict[str, list[Mention]] = {}
    for (rid, turn, s, e), g in sorted(gt.items()):
        assert recs[rid]["conversations"][turn]["value"][s:e] == g.text  # spans index the written text
        by_rec.setdefault(rid, []).append(Mention(g.text, rid, turn, s, e))
    rids = sorted(by_rec)
    images = []
    for rid in rids:
        im = recs[rid]["image"]
        images.append(Image.open(world / "sample_world" / (im[0] if isinstance(im, list) else im)))
    tagger = make_tagger("oracle", gt_path=gt_path)
    assert isinstance(tagger, OracleTagger)
    out = tagger.tag(images, [by_rec[r] for r in rids])
    for rid, cands in zip(rids, out):
        assert [c.mention_index for c in cands] == list(range(len(by_rec[rid])))
        for c in cands:
            m = by_rec[rid][c.mention_index]
            g = gt[(rid, m.turn, m.start, m.end)]
            assert (c.mention, c.label, c.box_xyxy_px, c.source) == (
                m.text,
                g.category,
                g.box_xyxy_px,
                "oracle",
            )
            x1, y1, x2, y2 = c.box_xyxy_px
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 120
    with pytest.raises(TypeError, match="Mention"):
        tagger.tag([images[0]], [["the box"]])


def test_verifier_picks_the_true_box_and_rewrites(world: Path) -> None:
    gt_path = world / "ground_truth.json"
    gt = load_ground_truth(gt_path)
    ver = make_verifier("oracle", gt_path=gt_path)
    assert isinstance(ver, OracleVerifier) and isinstance(ver, VLMClient)
    (rid, turn, s, e), g = sorted(gt.items())[0]
    m = Mention(g.text, rid, turn, s, e)
    img = np.zeros((120, 160, 3), np.uint8)
    x1, y1, x2, y2 = g.box_xyxy_px
    w = x2 - x1
    shifted = (x1 + w, y1, x2 + w, y2)  # IoU 0 with the truth
    nudged = (x1 + 0.1 * w, y1, x2 + 0.1 * w, y2)  # IoU ~0.82
    assert box_iou(nudged, g.box_xyxy_px) > 0.8
    v = ver.verify(img, m, [shifted, nudged])
    assert v.choice == 1 and v.confidence == pytest.approx(box_iou(nudged, g.box_xyxy_px), abs=1e-6)
    assert json.loads(v.raw)["choice"] == 1
    assert ver.verify(img, m, [shifted]).choice is None
    # a mention cut differently by the builder ("orange box" without the article) still resolves
    assert ver.lookup(Mention(g.text[4:], rid, turn, s + 4, e)) == g
    same_text = [x for x in gt.values() if (x.record_id, x.turn, x.text) == (rid, turn, g.text)]
    assert ver.lookup(Mention(g.text, rid, turn)) == (g if len(same_text) == 1 else None)
    (rw,) = ver.rewrite_many([RewriteRequest(img, m, g.box_xyxy_px, [])])
    assert rw.text in (f"the {g.colour} {g.category}", f"the {g.category}")  # type: ignore[union-attr]
    (vv,) = ver.verify_many([VerifyRequest(img, m, [g.box_xyxy_px])])
    assert vv.choice == 0 and vv.confidence == 1.0  # type: ignore[union-attr]


def test_rewrite_separates_objects_of_one_class(tmp_path: Path) -> None:
    rows = [
        dict(record_id="r", turn=1, start=0, end=9, text="the chair", object_id="o1", category="chair",
             colour="red", view_id="v", bbox_px=[0, 0, 10, 10]),
        dict(record_id="r", turn=1, start=20, end=29, text="the chair", object_id="o2", category="chair",
             colour="red", view_id="v", bbox_px=[50, 0, 60, 10]),
        dict(record_id="r", turn=3, start=0, end=14, text="the blue chair", object_id="o3", category="chair",
             colour="blue", view_id="v", bbox_px=[90, 0, 99, 10]),
        dict(record_id="r", turn=3, start=20, end=25, text="a mug", object_id="o4", category="mug",
             colour="red", view_id="v", bbox_px=None),
    ]  # fmt: skip
    p = tmp_path / "ground_truth.json"
    p.write_text(json.dumps({"refspatial_mentions": rows}))
    ver = OracleVerifier(p)
    assert len(ver.rows) == 3  # the row without a visible box is skipped
    img = np.zeros((10, 100, 3), np.uint8)
    red_left = ver.rewrite(
        img, Mention("the chair", "r", 1, 0, 9), (0, 0, 10, 10), [(50, 0, 60, 10), (90, 0, 99, 10)]
    )
    assert red_left.text == "the leftmost chair"  # colour shared with o2: position decides
    blue = ver.rewrite(img, Mention("the blue chair", "r", 3, 0, 14), (90, 0, 99, 10), [(0, 0, 10, 10)])
    assert blue.text == "the blue chair"  # unique colour among the chairs of the view
    rows[1]["bbox_px"] = [1, 1, 2, 2]
    rows.append(dict(rows[1], bbox_px=[5, 5, 6, 6]))
    p.write_text(json.dumps({"refspatial_mentions": rows}))
    with pytest.raises(ValueError, match="repeats mention"):
        load_ground_truth(p)
    with pytest.raises(ValueError, match="unknown"):
        make_tagger("florence3")
