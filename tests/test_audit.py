"""The audit on builds written straight from the sample world's ground truth (no builder involved).

A fabricated cot build whose mention boxes are the ground-truth boxes must agree 100%; its
perturbed copies must lose exactly the agreement that `perturbations.parquet` says was injected
(counted, not estimated). Also: review sheet + score (Wilson), corrupt inputs named, schema.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.audit import metrics, stats
from pipelines.audit.load import AuditInputError, load_build
from pipelines.audit.perturb import PerturbError, perturb_build, perturb_record
from pipelines.audit.review import ScoreError, allocate, sample_for_review, score_sheet
from schemas.grammar import find_grounded, format_bbox2d, format_grounded
from schemas.records import SchemaError, validate
from shards.manifest import finalize
from shards.reader import iter_samples
from shards.verify import verify_build
from shards.writer import Sample, ShardWriter

N_FAB_REJECTS = 2


def gt_answer_rows(world: Any) -> list[dict[str, Any]]:
    """Ground-truth mentions of answer (gpt, odd) turns that are visible: what a cot build grounds."""
    return [r for r in world.ground_truth["refspatial_mentions"] if r["turn"] % 2 == 1 and r.get("bbox_px") is not None]


def fabricate_cot_build(world: Any, out: Path, n_shards: int = 2) -> Path:
    """A cot build written with ShardWriter whose mentions are exactly the ground truth's (text, box)."""
    from PIL import Image

    by_rec: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in gt_answer_rows(world):
        by_rec[r["record_id"]].append(r)
    rids = sorted(by_rec)
    for shard in range(n_shards):
        w = ShardWriter(out, shard)
        mine = rids[shard::n_shards]
        for rid in mine:
            ms = sorted(by_rec[rid], key=lambda r: (r["turn"], r["start"]))
            data = (world.root / ms[0]["image"]).read_bytes()
            with Image.open(world.root / ms[0]["image"]) as im:
                W, H = im.size
            turns, mentions = [], []
            for t in range(max(r["turn"] for r in ms) + 1):
                if t % 2 == 0:
                    turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + f"Question {t}?"})
                    continue
                parts = []
                for r in (m for m in ms if m["turn"] == t):
                    px = r["bbox_px"]
                    box = [px[0] / W, px[1] / H, px[2] / W, px[3] / H]
                    parts.append(r["text"] + format_grounded(box))
                    mentions.append({"text": r["text"], "bbox2d": box, "category": r["category"], "rewritten": None,
                                     "object_id": r["object_id"]})
                turns.append({"from": "gpt", "value": "; ".join(parts) + "." if parts else "Nothing to ground."})
            key = f"fab/{rid}"
            rec = {"key": key, "corpus": "cot", "source": {"dataset": "RefSpatial", "file": ms[0]["file"], "id": rid},
                   "image": {"ext": "png", "width": W, "height": H}, "camera": None, "arrays": [],
                   "mentions": mentions, "conversations": [{"task": "grounded_cot", "turns": turns}]}
            w.add(Sample(key, data, "png", rec))
        rej = [{"key": f"fab/rejected_{shard}", "stage": "read", "reason": "no_mentions", "message": "fabricated"}]
        w.close({"stages": {"read": {"in": len(mine) + 1, "out": len(mine), "rejected": 1},
                            "compose": {"in": len(mine), "out": len(mine), "rejected": 0}}},
                rejects=rej, n_input=len(mine) + 1)
    assert N_FAB_REJECTS == n_shards
    finalize(out, {"builder": "fabricated_cot", "data_root": str(world.root)}, "test")
    return out


@pytest.fixture(scope="module")
def fab(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fabricate_cot_build(sample_world, tmp_path_factory.mktemp("audit_fab") / "build")


def perturbations(build: Path) -> list[dict[str, Any]]:
    return pq.read_table(build / "perturbations.parquet").to_pylist()


def expected_agreement(n_units: int, rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(written, correct written, ground-truth units) implied by the perturbation record of a build
    whose unperturbed boxes equal the ground truth: a unit stays correct iff it is not dropped and
    its recorded IoU to its original (= ground-truth) box is >= 0.5."""
    dropped = sum(r["dropped"] for r in rows)
    bad = sum(1 for r in rows if not r["dropped"] and r["iou"] < 0.5)
    return n_units - dropped, n_units - dropped - bad, n_units


# ============================================================================ agreement
def test_fabricated_build_agrees_fully_with_ground_truth(fab: Path, sample_world: Any) -> None:
    b = load_build(fab)
    assert b.ground_truth_path == (sample_world.root / "ground_truth.json").resolve()  # found via config data_root
    n_gt = len(gt_answer_rows(sample_world))
    assert n_gt >= 20
    a = metrics.agreement(b)
    g = a["ground_truth"]
    assert (g["n_written"], g["n_gt"], g["n_written_correct"], g["n_gt_recalled"]) == (n_gt, n_gt, n_gt, n_gt)
    assert g["precision"] == 1.0 and g["recall"] == 1.0 and g["mean_iou"] == pytest.approx(1.0, abs=1e-12)
    assert all(c["precision"] == 1.0 and c["recall"] == 1.0 for c in g["per_category"])
    assert sum(c["n_gt"] for c in g["per_category"]) == n_gt
    assert a["histograms"]["written_vs_gt"]["counts"][-1] == n_gt  # every IoU in the top bin
    f = metrics.funnel(b)
    assert f["n_input"] == len(b.records) + N_FAB_REJECTS and f["n_written"] == len(b.records)
    assert f["rejects"] == [{"stage": "read", "reason": "no_mentions", "count": N_FAB_REJECTS}]
    assert [s["stage"] for s in f["stages"]] == ["read", "compose"]
    assert f["stages"][0]["rejected"] == N_FAB_REJECTS


def test_swap_lowers_agreement_by_exactly_the_injected_amount(fab: Path, tmp_path: Path) -> None:
    out = tmp_path / "swap"
    summary = perturb_build(fab, out, swap=0.25, seed=7)
    rows = perturbations(out)
    n_units = summary["units"]["cot"]
    assert len(rows) == summary["counts"]["rows"] == summary["counts"]["swapped"]
    assert all(r["swapped_with"] is not None and not r["jittered"] and not r["dropped"] for r in rows)
    assert 0.1 <= len(rows) / n_units <= 0.45  # ~P (this seed); the exact rate is tested on a large record
    n_w, n_ok, n_gt = expected_agreement(n_units, rows)
    assert n_ok < n_w, "the seed must inject at least one wrong box"
    g = metrics.agreement(load_build(out))["ground_truth"]
    assert (g["n_written"], g["n_written_correct"], g["n_gt"], g["n_gt_recalled"]) == (n_w, n_ok, n_gt, n_ok)
    assert g["precision"] == pytest.approx(n_ok / n_w, abs=1e-12)
    assert g["recall"] == pytest.approx(n_ok / n_gt, abs=1e-12)
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["perturbation"]["swap"] == 0.25 and m["config"]["perturbation"]["counts"] == summary["counts"]


def test_jitter_and_drop_are_measured_exactly(fab: Path, tmp_path: Path) -> None:
    out = tmp_path / "jd"
    summary = perturb_build(fab, out, box_jitter=0.3, drop=0.2, seed=3)
    rows = perturbations(out)
    n_units = summary["units"]["cot"]
    alive = [r for r in rows if not r["dropped"]]
    assert summary["counts"]["dropped"] > 0 and summary["counts"]["iou_below_0_5"] > 0
    assert all(r["jittered"] for r in alive) and len(rows) == n_units  # every unit is jittered or dropped
    n_w, n_ok, n_gt = expected_agreement(n_units, rows)
    b = load_build(out)
    mrows = metrics.written_mentions(b)
    g = metrics.agreement(b, mrows)["ground_truth"]
    assert (g["n_written"], g["n_written_correct"], g["n_gt_recalled"]) == (n_w, n_ok, n_ok)
    assert g["recall"] == pytest.approx((n_gt - summary["counts"]["dropped"] - summary["counts"]["iou_below_0_5"]) / n_gt)
    # ground truth = original box, so the measured IoU of each written mention is the recorded one
    rec_iou = {(r["key"], r["new_index"]): r["iou"] for r in alive}
    got = {(r["key"], r["index"]): r["iou_gt"] for r in mrows}
    assert got.keys() == rec_iou.keys()
    assert max(abs(got[k] - rec_iou[k]) for k in got) < 1e-9
    assert g["mean_iou"] == pytest.approx(float(np.mean(list(rec_iou.values()))), abs=1e-12)


def test_perturbed_copy_is_a_valid_deterministic_build(fab: Path, tmp_path: Path) -> None:
    a, b_, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    perturb_build(fab, a, box_jitter=0.1, drop=0.2, swap=0.3, seed=11)
    perturb_build(fab, b_, box_jitter=0.1, drop=0.2, swap=0.3, seed=11)
    perturb_build(fab, c, box_jitter=0.1, drop=0.2, swap=0.3, seed=12)
    assert verify_build(a) == []
    for name in ("shards/000000.tar", "shards/000001.tar", "perturbations.parquet", "index.parquet"):
        assert (a / name).read_bytes() == (b_ / name).read_bytes()
    assert (a / "shards/000000.tar").read_bytes() != (c / "shards/000000.tar").read_bytes()
    src = {s["json"]["key"]: s["json"] for s in iter_samples(fab)}
    n_checked = 0
    for s in iter_samples(a):
        rec = s["json"]
        boxes = [g.box for t in rec["conversations"][0]["turns"] if t["from"] == "gpt"
                 for g in find_grounded(t["value"]) if g.has_region]
        assert len(boxes) == len(rec["mentions"])  # the text and the record stay in step
        for tb, m in zip(boxes, rec["mentions"]):
            assert format_bbox2d(tb) == format_bbox2d(m["bbox2d"])
            n_checked += 1
        # words stay: the perturbed text minus its boxes equals the source text minus its boxes
        strip = [t["value"] for t in rec["conversations"][0]["turns"]]
        orig = [t["value"] for t in src[rec["key"]]["conversations"][0]["turns"]]
        assert [_no_boxes(x) for x in strip] == [_no_boxes(x) for x in orig]
    assert n_checked > 0
    assert json.loads((a / "manifest.json").read_text())["totals"] == json.loads((fab / "manifest.json").read_text())["totals"]
    with pytest.raises(PerturbError, match="not empty"):
        perturb_build(fab, a, swap=0.1)
    with pytest.raises(PerturbError, match="probability"):
        perturb_build(fab, tmp_path / "d", drop=1.5)


def _no_boxes(text: str) -> str:
    for g in reversed(find_grounded(text)):
        end = g.end + (len("<region>") if g.has_region else 0)
        text = text[:g.start] + text[end:]
    return text


def test_perturb_rates_match_the_probabilities_on_a_large_record() -> None:
    n = 2000
    rng = np.random.default_rng(0)
    mentions, parts = [], []
    for i in range(n):
        x, y = rng.uniform(0, 0.8, 2)
        box = [float(x), float(y), float(x + 0.1 + 0.05 * (i % 3)), float(y + 0.15)]
        mentions.append({"text": f"the box {i}", "bbox2d": box, "category": "box", "rewritten": None, "object_id": None})
        parts.append(f"the box {i}" + format_grounded(box))
    rec = {"key": "big", "corpus": "cot", "mentions": mentions,
           "conversations": [{"task": "grounded_cot", "turns": [{"from": "human", "value": "q"},
                                                                {"from": "gpt", "value": " ".join(parts)}]}]}
    out, rows = perturb_record(rec, drop=0.2, swap=0.25, seed=5)
    n_drop = sum(r["dropped"] for r in rows)
    n_swap = sum(r["swapped_with"] is not None for r in rows if not r["dropped"])
    # binomial: 4 sigma bands
    assert abs(n_drop - 0.2 * n) < 4 * np.sqrt(n * 0.2 * 0.8)
    alive = n - n_drop
    assert abs(n_swap - 0.25 * alive) < 4 * np.sqrt(alive * 0.25 * 0.75) + 2
    assert len(out["mentions"]) == alive
    # a swapped mention carries another mention's (original) box, and no two take the same one
    src = {tuple(r["old_box"]) for r in rows}
    got = [tuple(r["new_box"]) for r in rows if r["swapped_with"] is not None and not r["dropped"]]
    assert all(b in src for b in got) and len(set(got)) == len(got)
    assert all(r["new_box"] != r["old_box"] for r in rows if r["swapped_with"] is not None and not r["dropped"])


# ============================================================================ review
def test_wilson_interval_values() -> None:
    from scipy.stats import binomtest

    lo, hi = stats.wilson_interval(191, 200)  # the paper's 95.5% of 200
    assert (lo, hi) == (pytest.approx(0.916703, abs=1e-6), pytest.approx(0.976147, abs=1e-6))
    for k, n in ((191, 200), (7, 29), (1, 3), (50, 50)):  # against scipy's independent implementation
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert stats.wilson_interval(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))
    z = 1.959963984540054
    assert stats.wilson_interval(0, 10) == (0.0, pytest.approx(z * z / (10 + z * z)))
    assert stats.wilson_interval(10, 10) == (pytest.approx(10 / (10 + z * z)), pytest.approx(1.0, abs=1e-12))
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_allocate_is_proportional_with_one_per_stratum() -> None:
    q = allocate({"a": 1000, "b": 100, "c": 3, "d": 0}, 50)
    assert sum(q.values()) == 50 and q["d"] == 0 and q["c"] >= 1 and q["b"] >= 4
    assert q["a"] > 8 * q["b"] / 2
    assert allocate({"a": 2, "b": 1}, 10) == {"a": 2, "b": 1}  # never more than a stratum holds
    assert sum(allocate({f"s{i}": 7 + i for i in range(30)}, 200).values()) == 200


def test_review_sheet_and_score(fab: Path, tmp_path: Path) -> None:
    pert = tmp_path / "p"
    perturb_build(fab, pert, box_jitter=0.4, swap=0.3, seed=2)
    sheet_dir = tmp_path / "sheet"
    s = sample_for_review(pert, sheet_dir, n=30, seed=4)
    assert s["sampled"] == 30 and s["units"] > 30
    again = sample_for_review(pert, tmp_path / "sheet2", n=30, seed=4)
    assert again["sampled"] == 30
    assert (sheet_dir / "sheet.csv").read_text() == (tmp_path / "sheet2" / "sheet.csv").read_text()
    import csv

    with open(sheet_dir / "sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["unit_id"] for r in rows}) == 30 and all((sheet_dir / r["crop"]).read_bytes()[:4] == b"\x89PNG" for r in rows)
    t = pq.read_table(sheet_dir / "sheet.parquet").to_pylist()
    assert [r["unit_id"] for r in t] == [r["unit_id"] for r in rows] and t[0]["crop_png"][:4] == b"\x89PNG"
    # a "reviewer" who knows the truth: correct iff the written box overlaps the ground truth at IoU >= 0.5
    truth = {(m["key"], m["index"]): m["iou_gt"] >= 0.5 for m in metrics.written_mentions(load_build(pert))}
    marks = [truth[(r["key"], int(r["index"]))] for r in rows]
    for r, ok in zip(rows, marks):
        r["verdict"] = "yes" if ok else "0"
    rows[0]["verdict"] = "?"  # unsure: not counted
    with open(sheet_dir / "marked.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    res = score_sheet(sheet_dir / "marked.csv")
    k, n = sum(marks[1:]), 29
    assert 0 < k < n, "the perturbed sample must hold both correct and wrong boxes"
    assert (res["marked"], res["correct"], res["unmarked"]) == (n, k, 1)
    assert res["accuracy"] == pytest.approx(k / n)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx(stats.wilson_interval(k, n))
    assert res["ci_low"] < res["accuracy"] < res["ci_high"]
    assert res["weighted"] is not None and 0 <= res["weighted"]["ci_low"] <= res["weighted"]["accuracy"] <= 1
    rows[3]["verdict"] = "maybe"
    with open(sheet_dir / "bad.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    with pytest.raises(ScoreError, match=r"bad\.csv: row 5: verdict 'maybe'"):
        score_sheet(sheet_dir / "bad.csv")
    with pytest.raises(ScoreError, match="no row is marked"):
        score_sheet(sheet_dir)  # the untouched sheet.csv in that directory


# ============================================================================ corrupt inputs, schema, CLI
def test_corrupt_inputs_name_the_file(fab: Path, tmp_path: Path) -> None:
    from pipelines.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(fab, bad)
    tar = bad / "shards" / "000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(AuditInputError, match=r"fails `gr3d shards verify`[\s\S]*shards/000001\.tar"):
        load_build(bad)
    assert main(["audit", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r" / "report.html").exists()

    nomani = tmp_path / "nomani"
    shutil.copytree(fab, nomani)
    (nomani / "manifest.json").unlink()
    with pytest.raises(AuditInputError, match=r"nomani/manifest\.json: missing"):
        load_build(nomani)
    with pytest.raises(AuditInputError, match=r"ground-truth file not found"):
        load_build(fab, ground_truth=tmp_path / "nope.json")
    with pytest.raises(AuditInputError, match="not a build directory"):
        load_build(tmp_path)


def test_cot_build_with_missing_or_corrupt_intermediate(fab: Path, tmp_path: Path) -> None:
    """A cot build's config implies its intermediates; a missing/garbled one is named."""
    from shards.writer import write_parquet

    b = tmp_path / "cotlike"
    shutil.copytree(fab, b)
    m = json.loads((b / "manifest.json").read_text())
    cfg = {**m["config"], "builder": "cot", "verifier": "none", "rewrite": "none"}
    finalize(b, cfg, "test")
    with pytest.raises(AuditInputError, match=r"intermediate/tag/000000\.parquet: missing intermediate file"):
        load_build(b)
    import pyarrow as pa

    for stage in ("tag", "assign"):
        for i in (0, 1):
            (b / "intermediate" / stage).mkdir(parents=True, exist_ok=True)
            write_parquet(b / "intermediate" / stage / f"{i:06d}.parquet", pa.table({"key": pa.array([], pa.string())}))
    assert load_build(b).intermediate_files["assign"] == ["intermediate/assign/000000.parquet",
                                                         "intermediate/assign/000001.parquet"]
    (b / "intermediate" / "assign" / "000001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AuditInputError, match=r"intermediate/assign/000001\.parquet: unreadable intermediate"):
        load_build(b)
    assert load_build(b, intermediates=False).intermediates == {}


def test_audit_json_schema_and_report(fab: Path, tmp_path: Path) -> None:
    from pipelines.audit.report import write_report

    doc = write_report(fab, tmp_path / "rep", gallery_size=4)
    on_disk = json.loads((tmp_path / "rep" / "audit.json").read_text())
    validate("audit", on_disk)
    assert on_disk["agreement"]["ground_truth"]["precision"] == 1.0 and doc["version"] == 1
    assert {f["id"] for f in on_disk["figures"]} >= {"funnel-samples", "funnel-rejects", "agreement-iou",
                                                      "agreement-per-category", "boxes2d-cot"}
    assert len(on_disk["gallery"]) == 4 and all(g["stratum"].startswith("cot/RefSpatial/") for g in on_disk["gallery"])
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count('<img alt=') == len(on_disk["figures"]) + 4
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    broken = json.loads(json.dumps(on_disk))
    broken["agreement"]["ground_truth"]["precision"] = 1.5
    with pytest.raises(SchemaError, match=r"agreement\.ground_truth\.precision"):
        validate("audit", broken)
    del broken["figures"]
    with pytest.raises(SchemaError, match="figures"):
        validate("audit", broken)
