"""bench/noise_impact.py's quick mode: the plumbing of the noise -> model-quality curve, not its numbers.

Two noise levels (0 = the learning bench's clean oracle corpus, 2 = twice the default) with and without the
verify stage, on the learning bench's tiny world, a few steps of the tiny preset: every noisy setting builds
its own cot corpus, audits it, trains and is scored on the held-out scenes; the clean level reuses the
learning bench's image run; the results are gathered with a plot; a re-run skips everything finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import noise_impact


def test_with_cot_swaps_only_the_cot_corpus(tmp_path: Path) -> None:
    mix = noise_impact.with_cot("det3d@0.55,pointmap@0.15,cot@0.3", tmp_path / "cot_L1")
    assert mix == f"det3d@0.55,pointmap@0.15,{tmp_path / 'cot_L1'}@0.3"
    with pytest.raises(SystemExit, match="no 'cot' corpus"):
        noise_impact.with_cot("det3d@1", tmp_path / "x")
    assert noise_impact.recipe_mix("small", []) == "det3d@0.55,pointmap@0.15,cot@0.3"
    assert noise_impact.recipe_mix("small", ["--data.mix", "a@1", "--seed", "3"]) == "a@1"


@pytest.mark.slow
def test_quick_mode_builds_audits_trains_scores_and_resumes(quick_learning_work: Path) -> None:
    work = quick_learning_work
    assert noise_impact.main(["--quick", "--work", str(work), "--parallel", "2", "--grounding-all"]) == 0
    doc = json.loads((work / "noise_impact.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert sorted(runs) == ["L0_nv_s0", "L0_v_s0", "L2_nv_s0", "L2_v_s0"]
    assert runs["L0_v_s0"]["run"] == runs["L0_nv_s0"]["run"] == "image_s0"  # the clean corpus is trained once
    assert runs["L0_v_s0"]["corpus"]["precision"] == 1.0
    assert runs["L2_nv_s0"]["corpus"]["precision"] < 1.0  # the injected noise reaches the corpus
    assert runs["L2_v_s0"]["run"] != runs["L2_nv_s0"]["run"]
    for r in runs.values():
        assert r["config"] == "tiny"
        assert r["ground2d"]["n"] > 0 and 0.0 <= r["ground2d"]["accuracy"] <= 1.0
        assert r["ground2d"]["n"] > r["ground2d_first"]["n"]  # --grounding-all: every held-out mention
        assert r["detect3d"]["AP15"] is None or 0.0 <= r["detect3d"]["AP15"] <= 100.0
        assert (work / "runs" / r["run"] / "final" / "gr3d_config.json").is_file()
    cfg = json.loads((work / "runs" / "noise_L2_v_s0" / "config.json").read_text())
    assert "cot_L2_v_s0@" in cfg["data"]["mix"] and "cot_L2_v_s0" not in json.dumps(
        json.loads((work / "runs" / "image_s0" / "config.json").read_text()))
    assert len(doc["table"]) == 4 and (work / "noise_impact.png").stat().st_size > 1000
    assert doc["blind"] == {} and doc["answer"]["verify"][0]["noise_scale"] == 2  # (no blind run in this folder)
    stamps = {p: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")}
    t0 = time.perf_counter()
    assert noise_impact.main(["--quick", "--work", str(work), "--parallel", "2"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")} == stamps  # skipped
    assert time.perf_counter() - t0 < 60


def _run(level: float, verify: bool, seed: int, precision: float, acc: float, ap: float | None = 1.0) -> dict:
    run = f"image_s{seed}" if level == 0 else f"noise_L{level:g}_{'v' if verify else 'nv'}_s{seed}"
    return {"run": run, "noise_scale": level, "verify": verify, "seed": seed,
            "corpus": {"precision": precision, "recall": 0.5},
            "ground2d": {"accuracy": acc}, "detect3d": {"AP15": ap}}


def test_answer_fits_the_slope_and_pairs_verify_by_seed() -> None:
    """Known lines: seed 0 gains 0.10 accuracy points per precision point, seed 1 0.20; verify adds +10
    precision points at level 1 and its grounding difference is paired by seed."""
    runs = []
    for seed, k in ((0, 0.10), (1, 0.20)):
        for level, verify, prec in ((0, True, 1.0), (0, False, 1.0), (1, False, 0.8), (1, True, 0.9),
                                    (4, False, 0.4)):
            runs.append(_run(level, verify, seed, prec, (10 - k * (100 - 100 * prec)) / 100, ap=prec / 10))
    a = noise_impact.answer(runs)
    g = a["ground2d_per_precision_point"]
    assert g["n_runs"] == 8  # the clean run once per seed, though it stands in both arms
    assert g["per_seed"] == pytest.approx({0: 0.10, 1: 0.20})
    assert g["min"] == pytest.approx(0.10) and g["max"] == pytest.approx(0.20)
    assert g["slope"] == pytest.approx(0.15)
    assert a["detect3d_ap15_per_precision_point"]["slope"] == pytest.approx(0.1)  # AP15 is a fraction: in points
    (v,) = a["verify"]  # level 4 has no verify-on run: no row
    assert v["noise_scale"] == 1 and v["seeds"] == [0, 1]
    assert v["precision"]["mean"] == pytest.approx(10.0)
    assert v["ground2d_acc"]["min"] == pytest.approx(1.0) and v["ground2d_acc"]["max"] == pytest.approx(2.0)
    assert v["detect3d_ap15"]["mean"] == pytest.approx(1.0)
    assert noise_impact._slope([(1.0, 2.0), (1.0, 3.0)]) is None
