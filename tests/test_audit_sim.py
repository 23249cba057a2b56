"""The audit measures what the simulated annotators injected.

A sim build of the sample world records, per mention, what the tagger and the verifier did (tag
intermediate `injected`/`note`, the verdicts' raw JSON). From that record alone (no ground-truth file)
this test derives the corpus precision and recall and the verifier's accuracy, and requires the
audit's estimates (computed against the ground truth) to hold them within their 95 % intervals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.audit.report import write_report
from pipelines.cli import main
from schemas.records import validate

COT_FILES = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]
GROUNDED = ("grounded", "coreferent")


def _rows(build: Path, stage: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted((build / "intermediate" / stage).glob("*.parquet")):
        out += pq.read_table(f).to_pylist()
    return out


def _build(sample_world: Any, out: Path, *extra: str) -> Path:
    argv = ["build", "cot", "--out", str(out), "--refspatial", *COT_FILES, "--data-root", str(sample_world.root),
            "--tagger", "sim", "--executor", "local", "--quiet", *extra]
    assert main(argv) == 0
    return out


def truth_from_records(build: Path) -> dict[str, float]:
    """Precision, correct written mentions and verifier accuracy from the injected-error record alone."""
    tag = _rows(build, "tag")
    inj = {(r["key"], r["mention_index"]): json.loads(r["injected"]) for r in tag if r["injected"]}
    cand_iou: dict[str, list[tuple[list[float], float]]] = {}
    for r in tag:
        if r["candidate_index"] is not None:
            d = inj[(r["key"], r["mention_index"])]
            cand_iou.setdefault(r["key"], []).append((r["box_px"], d["candidate_ious"][r["candidate_index"]]))
    n_written = n_correct = 0
    for r in _rows(build, "assign"):
        if r["decision"] in GROUNDED and r["sample_decision"] == "kept":
            iou = next(v for box, v in cand_iou[r["key"]] if box == r["box_px"])  # the candidate written
            spans = len(json.loads(r["spans"]))
            n_written += spans
            n_correct += spans * (iou >= 0.5)
    verify = _rows(build, "verify")
    right = 0
    for r in verify:
        if r["decision"] == "no_candidates":
            right += 1  # nothing shown, nothing chosen: a correct refusal
            continue
        v = json.loads(r["raw_text"])
        right += v["injected"] in ("chose_right", "rejected_wrong") or (v["injected"] == "refused"
                                                                        and not v["right_shown"])
    first = [d["candidate_ious"][0] >= 0.5 for d in inj.values() if d["candidate_ious"]]
    return {"n_written": n_written, "n_correct": n_correct, "precision": n_correct / n_written,
            "verifier_accuracy": right / len(verify), "precision_first": sum(first) / len(first)}


@pytest.fixture(scope="module")
def sim_build(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pipelines.corpora.cot.builder")
    return _build(sample_world, tmp_path_factory.mktemp("sim") / "cot", "--verifier", "sim", "--noise-scale", "2",
                  "--allow-partial")


def test_audit_equals_injected_truth_within_its_intervals(sim_build: Path, tmp_path: Path) -> None:
    doc = write_report(sim_build, tmp_path / "rep", gallery_size=3)
    validate("audit", json.loads((tmp_path / "rep" / "audit.json").read_text()))
    truth = truth_from_records(sim_build)
    g, v = doc["agreement"]["ground_truth"], doc["agreement"]["verifier"]
    assert g["n_written"] == truth["n_written"] > 10
    assert g["n_written_correct"] == truth["n_correct"]  # on this world the two counts agree exactly
    assert truth["precision"] < 0.99 and v["accuracy"] < 0.99  # the noise is there to measure
    lo, hi = g["precision_ci"]
    assert lo <= truth["precision"] <= hi
    lo, hi = g["recall_ci"]
    assert lo <= truth["n_correct"] / g["n_gt"] <= hi
    lo, hi = v["accuracy_ci"]
    assert lo <= truth["verifier_accuracy"] <= hi
    ve = doc["agreement"]["verify_effect"]
    assert ve["precision_before"] == pytest.approx(truth["precision_first"], abs=0.05)
    assert ve["n_caught"] > 0 and ve["precision_after"] > ve["precision_before"]  # the verifier helped here
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "What the verifier did" in html and "Caught errors" in html and "Simulated annotators" in html


def test_sim_build_is_deterministic_and_recorded_in_the_manifest(sim_build: Path, sample_world: Any,
                                                                tmp_path: Path) -> None:
    again = _build(sample_world, tmp_path / "again", "--verifier", "sim", "--noise-scale", "2", "--allow-partial",
                   "--chunk-size", "3")
    a = [{k: v for k, v in r.items() if not k.startswith("_")} for r in _rows(sim_build, "tag")]
    b = [{k: v for k, v in r.items() if not k.startswith("_")} for r in _rows(again, "tag")]
    key = lambda r: (r["key"], r["mention_index"], r["candidate_index"] or 0)  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)
    cfg = json.loads((sim_build / "manifest.json").read_text())["config"]
    assert cfg["tagger"] == "sim" and cfg["sim"]["noise_scale"] == 2.0 and cfg["sim"]["rates"]["miss"] == 0.04


def test_bad_sim_flag_is_a_usage_error(sample_world: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["build", "cot", "--out", str(tmp_path / "x"), "--refspatial", *COT_FILES, "--data-root",
            str(sample_world.root), "--tagger", "sim", "--verifier", "none", "--sim-miss", "2"]
    assert main(argv) == 2
    assert "sim rate miss must be in [0, 1]" in capsys.readouterr().err
