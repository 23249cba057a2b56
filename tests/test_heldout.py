"""Held-out evaluation path: scene-disjoint splits, train-only builds, scoring on held-out scenes.

Not timed: the end-to-end check runs `bench/learning.py --quick` (tiny world, tiny model, 3 steps) and
then again to check that finished runs and evaluations are skipped.
"""

from __future__ import annotations

import json
import shutil

import pytest

from model.eval.heldout import CategoryPrior, region3d_jobs, score_region3d
from model.eval.io import load_omni3d_gt
from pipelines.sample_world.splits import refspatial_split, scene_splits, split_inputs


@pytest.fixture()
def world(sample_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(sample_world.root, root)
    return root


def _scenes_of(path):
    return {(r["image"][0] if isinstance(r["image"], list) else r["image"]).split("/")[0]
            for r in json.loads(path.read_text())}


def test_refspatial_split_is_scene_disjoint_and_complete(world):
    splits = scene_splits(world)
    assert set(splits.values()) == {"train", "val"}
    train, val = refspatial_split(world, "train"), refspatial_split(world, "val")
    for t, v in zip(train, val):
        st, sv = _scenes_of(world / t), _scenes_of(world / v)
        assert st and sv and not st & sv
        assert all(splits[s] == "train" for s in st) and all(splits[s] == "val" for s in sv)
        name = t.rsplit("/", 1)[1]
        n_all = len(json.loads((world / "RefSpatial" / "3D" / name).read_text()))
        assert len(json.loads((world / t).read_text())) + len(json.loads((world / v).read_text())) == n_all
    inputs = split_inputs(world, "val")
    assert inputs["omni3d"].endswith("SampleWorld_val.json")


def test_refspatial_record_of_unknown_scene_is_an_error(world):
    p = world / "RefSpatial" / "3D" / "choice_qa.json"
    recs = json.loads(p.read_text())
    recs[0]["image"] = "scene9999/image/000000.png"
    p.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match="scene9999"):
        refspatial_split(world, "train")


def test_region3d_scoring_exact_answers_and_prior(world):
    gt = load_omni3d_gt([world / "Omni3D" / "SampleWorld_val.json"])
    jobs = region3d_jobs(gt)
    assert jobs
    by_id = {(g.image_id, g.category_id, g.depth): g for g in gt.instances}
    exact = [(by_id[(j.image_id, j.category_id, j.depth)].corners, 1.0) for j in jobs]
    res = score_region3d(gt, jobs, exact)
    assert res["AP3D"] == pytest.approx(1.0) and res["median_rel_depth_error"] < 1e-6
    none = score_region3d(gt, jobs, [(None, 0.0)] * len(jobs))
    assert none["AP3D"] == 0.0 and none["n_parsed"] == 0 and none["median_rel_depth_error"] == float("inf")
    prior = CategoryPrior(world / "Omni3D" / "SampleWorld_train.json").region3d(gt)
    assert prior["n_parsed"] <= prior["n"] and 0.0 <= prior["median_rel_depth_error"] < 1.0


def test_learning_bench_quick_end_to_end(quick_learning_work):
    from bench import learning

    work = quick_learning_work
    assert learning.main(["--quick", "--work", str(work), "--seeds", "0"]) == 0
    res = work / "results"
    names = sorted(p.name for p in res.glob("*.json"))
    assert names == ["blind_s0_constrained.json", "image_s0_constrained.json", "image_s0_free.json", "prior.json"]
    r = json.loads((res / "image_s0_constrained.json").read_text())
    # constrained decoding: every region->3D answer parses, even from a 3-step model
    assert r["region3d"]["n_parsed"] == r["region3d"]["n"] > 0
    assert r["grounding"]["n_missing"] == 0 and r["grounding"]["n"] > 0
    # the model trained on train scenes only: no held-out scene in any training build
    from model.eval.cli import _iter_shard_records

    val_scenes = {s for s, sp in scene_splits(work / "world").items() if sp == "val"}
    val_images = {str(i) for i in load_omni3d_gt([work / "world" / "Omni3D" / "SampleWorld_val.json"]).image_dataset}
    seen = {"det3d": set(), "pointmap": set(), "cot": set()}
    for build in seen:
        for rec in _iter_shard_records(work / "builds" / build):
            src = rec["source"]
            seen[build].add(src["id"] if build == "det3d" else src["id"].split("/")[1] if build == "pointmap"
                            else src["id"].split("_")[1])
    assert seen["det3d"] and not seen["det3d"] & val_images
    assert seen["pointmap"] and not seen["pointmap"] & val_scenes
    assert seen["cot"] and not seen["cot"] & val_scenes
    report = (work / "learning.md").read_text()
    assert "| image (constrained) | 1 |" in report and "| category prior | 1 |" in report
    # a re-run skips finished runs and evaluations
    stamp = (work / "runs" / "image_s0" / "final" / "gr3d_config.json").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in res.glob("*.json")}
    assert learning.main(["--quick", "--work", str(work), "--seeds", "0"]) == 0
    assert (work / "runs" / "image_s0" / "final" / "gr3d_config.json").stat().st_mtime_ns == stamp
    assert {p.name: p.stat().st_mtime_ns for p in res.glob("*.json")} == before
    # another budget on the same run names is refused, not silently reported with the 3-step runs
    with pytest.raises(SystemExit, match="finished run of 3 steps, not 5"):
        learning.main(["--quick", "--work", str(work), "--seeds", "0", "--steps", "5"])
    with pytest.raises(SystemExit):
        learning.main(["--quick", "--work", str(work), "--seeds", "0", "--tag", "x_s"])
    # ... and a tagged budget trains beside them, in its own runs, results and report
    assert learning.main(["--quick", "--work", str(work), "--seeds", "0", "--steps", "4", "--tag", "4",
                          "--variants", "image"]) == 0
    assert json.loads((work / "runs" / "image-4_s0" / "config.json").read_text())["max_steps"] == 4
    assert (res / "image-4_s0_constrained.json").is_file() and not (work / "runs" / "blind-4_s0").exists()
    assert "| image (constrained) | 1 |" in (work / "learning-4.md").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in res.glob("*.json") if p.name in before} == before
    # every held-out mention, not the first few: one more column, from cached per-run results
    assert learning.main(["--quick", "--work", str(work), "--seeds", "0", "--report-only", "--grounding-all"]) == 0
    for name in ("image_s0", "blind_s0", "prior"):
        g = json.loads((res / f"{name}_grounding_all.json").read_text())["grounding"]
        assert g["n"] >= r["grounding"]["n"] and 0.0 <= g["acc50"] <= 1.0
    head = next(ln for ln in (work / "learning.md").read_text().splitlines() if ln.startswith("| system |"))
    assert head.endswith(f"| ground Acc@0.5, all {g['n']} |")
