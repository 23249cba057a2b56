"""The error gallery and the description-ambiguity measure agree with what the simulated annotators recorded.

One noisy sim build of the sample world (every grounded mention rewritten, ambiguous rewrites on).
The caught / missed / lost / correct counts and the injected ambiguity are derived from the
intermediates' record alone (tag `injected`, verify choices, rewrite raw answers), without the
ground-truth file, and the audit (which measures against the ground truth) must find the same.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipelines.audit.report import write_report
from pipelines.cli import main
from schemas.records import validate
from tests.test_audit_sim import _build, _rows

GROUNDED = ("grounded", "coreferent")


@pytest.fixture(scope="module")
def noisy_build(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pipelines.corpora.cot.builder")
    return _build(sample_world, tmp_path_factory.mktemp("errors") / "cot", "--verifier", "sim", "--noise-scale", "2",
                  "--allow-partial", "--rewrite", "all", "--sim-ambiguous-rewrite", "0.3")


@pytest.fixture(scope="module")
def report(noisy_build: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("errors_report")
    doc = write_report(noisy_build, out, gallery_size=2, error_gallery=3)
    validate("audit", json.loads((out / "audit.json").read_text()))
    return doc, (out / "report.html").read_text()


def strata_from_records(build: Path) -> dict[str, int]:
    """caught / missed / lost / correct per mention, from the tagger's recorded candidate IoUs and the verifier's
    choice (right = IoU >= 0.5 with the truth, as the simulated annotators computed it)."""
    inj = {(r["key"], r["mention_index"]): json.loads(r["injected"]) for r in _rows(build, "tag") if r["injected"]}
    out = {"caught": 0, "missed": 0, "lost": 0, "correct": 0}
    for v in _rows(build, "verify"):
        ious = inj[(v["key"], v["mention_index"])]["candidate_ious"]
        if not ious:
            continue  # the tagger gave nothing: no verifier decision to judge
        first_ok = ious[0] >= 0.5
        chosen_ok = v["choice"] is not None and ious[v["choice"]] >= 0.5
        if first_ok:
            out["correct" if chosen_ok else "lost"] += 1
        else:
            out["missed" if v["choice"] is not None and not chosen_ok else "caught"] += 1
    return out


def test_error_gallery_counts_equal_the_recorded_errors(noisy_build: Path, report: tuple[dict[str, Any], str]) -> None:
    doc, _ = report
    eg = doc["error_gallery"]
    truth = strata_from_records(noisy_build)
    assert eg["counts"] == truth
    assert truth["caught"] > 0 and truth["missed"] > 0 and truth["correct"] > 0  # the noise is there to draw
    ve = doc["agreement"]["verify_effect"]
    assert (ve["n_caught"], ve["n_missed"], ve["n_lost"], ve["n_kept"]) == tuple(
        truth[k] for k in ("caught", "missed", "lost", "correct"))
    for s, n in truth.items():
        cap = 1 if s == "correct" else 3
        assert sum(c["stratum"] == s for c in eg["shown"]) == min(n, cap), s
    # every case is drawn from the world's own image (caught errors mostly sit in rejected samples)
    assert all(c["image"] == "ground_truth" and c["png_bytes"] > 0 for c in eg["shown"])
    # the caption's error kind is what the tagger recorded for the drawn box
    notes = {(r["key"], r["mention_index"], r["candidate_index"]): r["note"] for r in _rows(noisy_build, "tag")}
    words = {"wrong_instance": "wrong instance", "other_category": "other category", "duplicate": "duplicate",
             "hallucinated": "hallucination", "true_also": "true box (added)"}
    for c in eg["shown"]:
        main_box = c["boxes"][0]
        note = notes[(c["key"], c["mention_index"], main_box["candidate"])]
        assert c["error_kind"] == words.get(note, c["error_kind"]) and c["text"] in c["caption"]
        if note == "correct":
            assert c["error_kind"] in ("loose box", "tight box", "exact box")
        assert (main_box["iou"] >= 0.5) == (c["stratum"] in ("lost", "correct"))


def test_error_gallery_html_has_the_section_and_valid_pngs(report: tuple[dict[str, Any], str]) -> None:
    from PIL import Image

    doc, html = report
    i = html.index("<h2 id=error-gallery>")
    section = html[i:html.index("<h2", i + 10)]
    assert "Caught: the verifier refused a wrong box" in section and "Missed: a wrong box was accepted" in section
    pngs = re.findall(r'<figure class="error [a-z]+"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', section)
    assert len(pngs) == len(doc["error_gallery"]["shown"]) > 0
    for p in pngs:
        im = Image.open(io.BytesIO(base64.b64decode(p)))
        im.verify()
        assert im.format == "PNG" and im.size[0] > 0


def test_error_gallery_is_deterministic_and_capped_by_the_flag(noisy_build: Path, report: tuple[dict[str, Any], str],
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    doc, _ = report
    again = write_report(noisy_build, tmp_path / "again", gallery_size=0, error_gallery=3, verify=False)
    assert again["error_gallery"]["shown"] == doc["error_gallery"]["shown"]
    other = write_report(noisy_build, tmp_path / "seed1", gallery_size=0, error_gallery=3, seed=1, verify=False)
    assert other["error_gallery"]["counts"] == doc["error_gallery"]["counts"]
    assert main(["audit", str(noisy_build), "--out", str(tmp_path / "none"), "--no-verify", "--error-gallery", "0"]) == 0
    out = json.loads((tmp_path / "none" / "audit.json").read_text())["error_gallery"]
    assert out["shown"] == [] and out["counts"] == doc["error_gallery"]["counts"]
    assert "errors vs ground truth: caught" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # a usage error, as argparse reports every one
        main(["audit", str(noisy_build), "--out", str(tmp_path / "bad"), "--error-gallery", "-1"])
    assert exc.value.code == 2
    assert "--error-gallery: must be >= 0" in capsys.readouterr().err


def injected_ambiguity(build: Path) -> dict[str, int]:
    """Written mentions (spans of grounded mentions in kept samples) and, of them, those whose rewrite the
    simulated rewriter recorded as injected ambiguity, by form; from the intermediates alone."""
    rewrites = {(r["key"], r["mention_index"]): json.loads(r["raw_text"]) for r in _rows(build, "rewrite")
                if r["mention_index"] is not None and r["raw_text"]}
    out = {"n": 0, "category": 0, "other_colour": 0}
    for r in _rows(build, "assign"):
        if r["decision"] in GROUNDED and r["sample_decision"] == "kept":
            spans = len(json.loads(r["spans"]))
            out["n"] += spans
            raw = rewrites.get((r["key"], r["mention_index"])) or {}
            if raw.get("injected") == "ambiguous":
                out[raw["form"]] += spans
    return out


def test_measured_ambiguity_equals_the_injected_share(noisy_build: Path, report: tuple[dict[str, Any], str]) -> None:
    doc, html = report
    a = doc["rewrite"]["ambiguity"]
    truth = injected_ambiguity(noisy_build)
    assert a["n"] == truth["n"] > 10 and a["n_unmatched"] == 0
    assert truth["category"] > 0 and truth["other_colour"] > 0  # both forms were injected
    assert a["n_confusable"] >= truth["category"] + truth["other_colour"]  # only where another such object is seen
    lo, hi = a["ambiguous_ci"]
    assert lo <= truth["category"] / truth["n"] <= hi
    lo, hi = a["not_unique_ci"]
    assert lo <= (truth["category"] + truth["other_colour"]) / truth["n"] <= hi
    # the sample world names every object uniquely, so the counts agree exactly: "the chair" fits every chair in
    # view (ambiguous), another chair's colour names that chair (misdescribed), the rest are unique
    assert (a["n_ambiguous"], a["n_misdescribed"]) == (truth["category"], truth["other_colour"])
    assert a["by_injection"]["none"]["n_ambiguous"] == a["by_injection"]["none"]["n_misdescribed"] == 0
    assert a["by_source"]["rewriter"]["n"] == truth["n"]  # --rewrite all: every description is a rewrite
    assert "Do the descriptions single out their object?" in html
