"""bench/ablations.py: the row definitions (mixtures, the half point-map build) and the quick plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ablations
from shards.layout import BuildLayout


def test_mix_without_drops_or_swaps_one_corpus() -> None:
    mix = "det3d@0.55,pointmap@0.15,cot@0.3"
    assert ablations._mix_without(mix, "pointmap") == "det3d@0.55,cot@0.3"
    assert ablations._mix_without(mix, "pointmap", "/b/pm_half", 0.5) == "det3d@0.55,/b/pm_half@0.075,cot@0.3"


def _res(ap15: float, depth: float) -> dict:
    return {"region3d": {"AP3D": 0.0, "AP15": ap15, "median_rel_depth_error": depth}, "detect3d": {},
            "grounding": {}}


def test_report_says_whether_a_difference_exceeds_the_seed_spread() -> None:
    rows = {"baseline": [_res(0.001, 0.271), _res(0.017, 0.313)],
            "pointmap_0": [_res(0.0, 0.409), _res(0.010, 0.431)],  # depth: +0.128, ranges 0.042 / 0.022
            "camera_norm": [_res(0.013, 0.441), _res(0.040, 0.257)]}  # depth: +0.057 within its 0.184 range
    md = ablations.render(rows, ["# t"])
    line = {r.split(" | ")[0].strip("| "): r for r in md.splitlines() if r.startswith("| ")}
    assert line["pointmap_0"].endswith("| -0.4 (within the seed spread 1.6) | +0.128 (beyond the seed spread 0.042) |")
    assert line["camera_norm"].endswith("| +0.057 (within the seed spread 0.184) |")
    assert line["baseline"].endswith("| - | - |")


@pytest.mark.slow
def test_quick_rows_train_score_and_report(quick_learning_work: Path) -> None:
    work = quick_learning_work
    rows = ",".join(ablations.ROWS)
    assert ablations.main(["--quick", "--work", str(work), "--seeds", "0", "--rows", rows, "--parallel", "2"]) == 0
    builds = work / "builds"
    full, half = list(BuildLayout(builds / "pointmap").done_shards()), list(BuildLayout(builds / "pointmap_half").done_shards())
    assert half == full[: max(1, len(full) // 2)]
    for i in half:  # hard links of the original shards, not copies
        assert (builds / "pointmap_half" / "shards" / f"{i:06d}.tar").stat().st_ino == \
            (builds / "pointmap" / "shards" / f"{i:06d}.tar").stat().st_ino
    cfg0 = json.loads((work / "runs" / "abl_pointmap_0_s0" / "config.json").read_text())
    cfg50 = json.loads((work / "runs" / "abl_pointmap_50_s0" / "config.json").read_text())
    assert "pointmap" not in cfg0["data"]["mix"] and "pointmap_half@" in cfg50["data"]["mix"]
    focal = json.loads((work / "runs" / "abl_camera_norm_s0" / "final" / "gr3d_config.json").read_text())
    assert focal["image_mode"] == "focal" and focal["canvas_focal"] == pytest.approx(69.2)
    direct = json.loads((work / "runs" / "abl_direct_3d_s0" / "final" / "gr3d_config.json").read_text())
    assert direct["det3d_answer"] == "direct"
    base = json.loads((work / "runs" / "image_s0" / "final" / "gr3d_config.json").read_text())
    assert base["image_mode"] == "letterbox" and base["det3d_answer"] == "grounded"
    report = (work / "ablations.md").read_text()
    for row in rows.split(","):
        assert f"| {row} |" in report
    doc = json.loads((work / "ablations.json").read_text())
    assert sorted(doc) == sorted(rows.split(",")) and all(len(v) == 1 for v in doc.values())
