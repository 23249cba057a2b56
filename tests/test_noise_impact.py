"""bench/noise_impact.py's quick mode: the plumbing of the noise -> model-quality curve, not its numbers.

Two noise levels (0 = oracle, 2 = twice the default) with and without the verify stage, on tiny worlds,
4 steps of the tiny preset each: every run builds, audits, trains and is scored on the held-out world;
the results are gathered with a plot; a re-run skips the finished runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import noise_impact


@pytest.mark.slow
def test_quick_mode_builds_audits_trains_scores_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "noise"
    assert noise_impact.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "noise_impact.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert sorted(runs) == ["L0_nv_s0", "L0_v_s0", "L2_nv_s0", "L2_v_s0"]
    assert runs["L0_v_s0"]["corpus"]["precision"] == 1.0 == runs["L0_nv_s0"]["corpus"]["precision"]
    assert runs["L2_nv_s0"]["corpus"]["precision"] < 1.0  # the injected noise reaches the corpus
    for r in runs.values():
        assert r["preset"] == "tiny" and r["steps"] == 4
        assert r["ground2d"]["n"] > 0 and 0.0 <= r["ground2d"]["accuracy"] <= 1.0
        assert r["detect3d"]["AP15"] is None or 0.0 <= r["detect3d"]["AP15"] <= 100.0
        assert (out / "runs" / r["name"] / "train" / "final").is_dir()
    assert len(doc["table"]) == 4 and (out / "noise_impact.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")}
    t0 = time.perf_counter()
    assert noise_impact.main(["--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/result.json")} == stamps  # skipped
    assert time.perf_counter() - t0 < 60
