"""The audit on real builds of the sample world: the oracle cot build (100% agreement, then exactly
the injected loss on a perturbed copy), det3d and point-map distributions with planted outliers,
the CLI, and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.audit import geometry_stats, metrics
from pipelines.audit.load import load_build
from pipelines.audit.perturb import perturb_build
from pipelines.audit.report import write_report
from pipelines.cli import main
from schemas.records import validate
from tests.test_audit import expected_agreement

CHROMIUM = Path("/usr/bin/chromium")
COT_FILES = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]


def _build(argv: list[str]) -> None:
    assert main(["build", *argv, "--executor", "local", "--quiet"]) == 0


@pytest.fixture(scope="module")
def builds(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("pipelines.corpora.cot.builder")
    root = tmp_path_factory.mktemp("audit_builds")
    sw = str(sample_world.root)
    out = {k: root / k for k in ("cot", "cot_noverifier", "cot_rejected", "det3d", "pointmaps")}
    _build(["cot", "--out", str(out["cot"]), "--refspatial", *COT_FILES, "--data-root", sw,
            "--tagger", "oracle", "--verifier", "oracle"])
    _build(["cot", "--out", str(out["cot_noverifier"]), "--refspatial", *COT_FILES, "--data-root", sw,
            "--tagger", "oracle", "--verifier", "none"])
    _build(["cot", "--out", str(out["cot_rejected"]), "--refspatial", *COT_FILES, "--data-root", sw,
            "--tagger", "oracle", "--verifier", "oracle", "--min-confidence", "1.01", "--limit", "4"])
    _build(["det3d", "--out", str(out["det3d"]), "--sample-world", sw])
    _build(["pointmaps", "--out", str(out["pointmaps"]), "--source", "rgbd", "--rgbd", str(sample_world.rgbd_root)])
    return out


def test_oracle_cot_build_report_shows_full_agreement(builds: dict[str, Path], tmp_path: Path) -> None:
    doc = write_report(builds["cot"], tmp_path / "rep", gallery_size=3)
    validate("audit", json.loads((tmp_path / "rep" / "audit.json").read_text()))
    a = doc["agreement"]
    g = a["ground_truth"]
    assert g["n_written"] == g["n_gt"] > 20
    assert g["precision"] == 1.0 and g["recall"] == 1.0 and g["category_agreement"] == 1.0
    assert a["tagger"]["top1_acc"] == 1.0 and a["tagger"]["n_entities"] > 0
    assert a["verifier"]["accuracy"] == 1.0 and a["verifier"]["decisions"] == {"chosen": a["verifier"]["n"]}
    assert a["written_vs_tagger"]["identical"] == 1.0
    assert set(doc["inputs"]["intermediates"]) == {"tag", "verify", "assign", "rewrite"}
    steps = {s["step"]: s["count"] for s in doc["funnel"]["steps"]}
    assert steps["inputs"] == steps["written"] == doc["build"]["corpora"]["cot"]
    r = doc["rewrite"]
    assert r["n_rewritten"] > 0 and r["words_rewritten"]["mean"] > r["words_original"]["mean"]
    assert r["intermediate"]["decisions"]["rewritten"] > 0
    # the oracle's rewrites name colours: every added word is one
    colours = {o["colour"] for s in builds_gt(builds) for o in s["objects"]}
    assert {w["word"] for w in r["words_added"]} <= colours
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "precision@0.5 vs GT" in html and "100.0%" in html

    # a --verifier none build has only tag/assign intermediates and still agrees fully
    b2 = load_build(builds["cot_noverifier"])
    assert set(b2.intermediates) == {"tag", "assign"}
    a2 = metrics.agreement(b2)
    assert a2["ground_truth"]["precision"] == a2["ground_truth"]["recall"] == 1.0 and a2["verifier"] is None


def test_funnel_of_a_build_that_rejects_everything(builds: dict[str, Path]) -> None:
    """The oracle verifier is right but below an impossible confidence cut: every sample is rejected at
    assign; the funnel says where, recall is 0, and the verifier's own choices still score 100%."""
    b = load_build(builds["cot_rejected"])
    f = metrics.funnel(b)
    steps = {s["step"]: s["count"] for s in f["steps"]}
    assert steps["inputs"] == steps["candidates for every mention"] == 4
    assert steps["verifier chose for every mention"] == steps["written"] == 0
    assert f["rejects"] == [{"stage": "assign", "reason": "low_confidence", "count": 4}]
    a = metrics.agreement(b)
    g = a["ground_truth"]
    assert g["n_written"] == 0 and g["precision"] is None and g["recall"] == 0.0 and g["n_gt"] > 4
    assert a["verifier"]["accuracy"] == 1.0 and set(a["verifier"]["decisions"]) == {"low_confidence"}


def builds_gt(builds: dict[str, Path]) -> list[dict[str, Any]]:
    b = load_build(builds["cot"], verify=False, intermediates=False)
    assert b.ground_truth is not None
    return b.ground_truth["scenes"]


def test_perturbed_oracle_build_loses_exactly_what_was_injected(builds: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p"
    assert main(["audit", "perturb", str(builds["cot"]), "--out", str(out), "--box-jitter", "0.15",
                 "--swap", "0.25", "--seed", "1"]) == 0
    rows = pq.read_table(out / "perturbations.parquet").to_pylist()
    n_units = sum(len(r.get("mentions", [])) for r in load_build(builds["cot"], verify=False).records.values())
    n_w, n_ok, n_gt = expected_agreement(n_units, rows)
    assert sum(r["swapped_with"] is not None for r in rows) > 0 and n_ok < n_w
    b = load_build(out)  # intermediates were copied: the audit still reads the tagger's and verifier's output
    a = metrics.agreement(b)
    g = a["ground_truth"]
    assert (g["n_written"], g["n_written_correct"], g["n_gt"], g["n_gt_recalled"]) == (n_w, n_ok, n_gt, n_ok)
    # the oracle tagger proposed the true boxes, so written-vs-tagger drops by the same count
    assert a["written_vs_tagger"]["agree_at_0_5"] == pytest.approx(n_ok / n_w)
    assert a["tagger"]["top1_acc"] == 1.0 and a["verifier"]["accuracy"] == 1.0  # upstream answers unchanged
    assert b.config["perturbation"]["box_jitter"] == 0.15


def test_det3d_distributions_outliers_and_jitter(builds: dict[str, Path], tmp_path: Path) -> None:
    b = load_build(builds["det3d"])
    d = geometry_stats.det3d_stats(b)
    objs = [o for r in b.records.values() for o in r["objects"]]
    z = np.array([o["box3d"]["center"][2] for o in objs])
    assert d["n_objects"] == len(objs) > 10
    assert d["depth"]["median"] == pytest.approx(float(np.median(z))) and d["depth"]["max"] == pytest.approx(z.max())
    assert sum(d["hist_depth"]["counts"]) == len(objs)
    yaw = np.array([o["box3d"]["rotation"][2] * 180 for o in objs])
    assert d["yaw"]["mean"] == pytest.approx(float(yaw.mean()))
    assert d["consistency_iou"]["median"] > 0.95  # sample-world 2D boxes are the projections' visible part
    assert d["outliers"] == [] or all(o["rule"] != "h_above_10m" for o in d["outliers"])
    # plant an outlier: one object of the commonest category 14 m tall -> per-category robust z and the 10 m rule
    cat = max({o["category"] for o in objs}, key=lambda c: sum(o["category"] == c for o in objs))
    key, i = next((k, j) for k, r in sorted(b.records.items()) for j, o in enumerate(r["objects"]) if o["category"] == cat)
    b.records[key]["objects"][i]["box3d"]["dimensions"][1] = 14.0
    d2 = geometry_stats.det3d_stats(b)
    rules = {o["rule"] for o in d2["outliers"] if (o["key"], o["index"]) == (key, i)}
    assert {"largest_side_robust_z", "volume_robust_z", "h_above_10m"} <= rules
    # jittered 2D boxes agree less with their 3D boxes' projections
    out = tmp_path / "pj"
    s = perturb_build(builds["det3d"], out, box_jitter=0.4, seed=0)
    assert s["counts"]["jittered"] == len(objs)
    d3 = geometry_stats.det3d_stats(load_build(out))
    assert d3["consistency_iou"]["mean"] < d["consistency_iou"]["mean"] - 0.1
    assert d3["depth"] == d["depth"]  # 3D boxes untouched


def test_pointmap_distribution_and_outlier(builds: dict[str, Path]) -> None:
    b = load_build(builds["pointmaps"])
    p = geometry_stats.pointmap_stats(b)
    pts = [r for r in b.points.values()]
    assert p["n_samples"] == len(pts) > 0 and p["n_points"] == sum(int(v["n"]) for v in b.point_stats.values())
    allz = np.concatenate([x[:, 4] for x in pts])
    assert p["depth"]["median"] == pytest.approx(float(np.median(allz)), rel=1e-6)
    assert p["n_invalid_points"] == 0 and p["n_outliers"] == 0
    assert sum(sum(r) for r in p["uv_heatmap"]) == allz.size
    key = sorted(b.point_stats)[0]
    b.point_stats[key]["z_median"] *= 10.0
    p2 = geometry_stats.pointmap_stats(b)
    assert [o["key"] for o in p2["outliers"] if o["rule"] == "median_depth_robust_z"] == [key]


def test_cli_forms(builds: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["audit", "--help"])
    assert e.value.code == 0 and "gr3d audit perturb" in capsys.readouterr().out
    assert main(["audit", str(builds["det3d"]), "--out", str(tmp_path / "r"), "--gallery", "2"]) == 0
    doc = json.loads((tmp_path / "r" / "audit.json").read_text())
    assert doc["det3d"]["n_objects"] > 0 and doc["agreement"] is None and doc["pointmaps"] is None
    assert main(["audit", "sample", str(builds["det3d"]), "--n", "5", "--seed", "1", "--out", str(tmp_path / "s")]) == 0
    sheet = (tmp_path / "s" / "sheet.csv").read_text().splitlines()
    assert len(sheet) == 6
    marked = [sheet[0]] + [re.sub(r",,$", ",1,", ln) if i % 2 else re.sub(r",,$", ",0,", ln)
                           for i, ln in enumerate(sheet[1:])]
    (tmp_path / "s" / "marked.csv").write_text("\n".join(marked) + "\n")
    capsys.readouterr()
    assert main(["audit", "score", str(tmp_path / "s" / "marked.csv"), "--json", str(tmp_path / "score.json")]) == 0
    res = json.loads((tmp_path / "score.json").read_text())
    assert (res["marked"], res["correct"]) == (5, 2)
    assert "accuracy 2/5 = 40.0%" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(builds["cot"], bad)
    (bad / "intermediate" / "verify" / "000000.parquet").unlink()
    assert main(["audit", str(bad), "--out", str(tmp_path / "r2"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "intermediate/verify/000000.parquet: missing intermediate file" in err


def _png_stats(png: bytes) -> tuple[tuple[int, int], float, np.ndarray]:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    nonwhite = float((img.min(axis=2) < 235).mean())
    return (img.shape[1], img.shape[0]), nonwhite, img


@pytest.mark.chromium
def test_report_renders_in_headless_chromium(builds: dict[str, Path], tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (installed by `make sysdeps`)")
    write_report(builds["cot"], tmp_path / "rep", gallery_size=4)
    html = (tmp_path / "rep" / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) >= 8
    for u in uris:  # every embedded image is a real PNG with content
        size, nonwhite, img = _png_stats(base64.b64decode(u))
        assert size[0] >= 100 and size[1] >= 60 and nonwhite > 0.02 and img.std() > 10
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,3000",
             (tmp_path / "rep" / "report.html").as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot: rc={proc.returncode} {proc.stderr[-2000:]}"
    size, nonwhite, img = _png_stats(shot.read_bytes())
    assert size == (1200, 3000)
    assert nonwhite > 0.08, f"screenshot nearly blank ({nonwhite:.3f} non-white)"
    # the plots drew: the funnel's bar blue (#4c72b0) and the mention funnel's green (#55a868) are on screen
    for rgb in ((0x4C, 0x72, 0xB0), (0x55, 0xA8, 0x68)):
        hits = int((np.abs(img.astype(int) - np.array(rgb)).max(axis=2) <= 6).sum())
        assert hits > 5000, f"plot colour {rgb} covers only {hits} px of the screenshot"
