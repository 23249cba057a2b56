"""finalize: merged index/rejects, a manifest comparable byte for byte, timing kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas.records import validate
from shards import jsonio
from shards.layout import stats_path, tar_path
from shards.manifest import FinalizeError, code_version, finalize
from shards.writer import ShardWriter
from tests.test_shards_samples import mixed_samples, write_build

CONFIG = {"corpus": "mixed", "chunk_size": 4, "precision": {"bbox": 3, "box3d": 2}}


def _build(build: Path, order_seed: int = 0) -> dict:
    samples = mixed_samples(10)
    chunks = [samples[0:4], samples[4:8], samples[8:10]]
    if order_seed:
        chunks = [list(reversed(c)) for c in chunks]
    rejects = [[{"key": "world/r1", "stage": "read", "reason": "bad_depth", "message": "m"}], [],
               [{"key": "world/r2", "stage": "verify", "reason": "vlm_rejected", "message": "m"},
                {"key": "world/r3", "stage": "verify", "reason": "vlm_rejected", "message": "m"}]]
    write_build(build, chunks, rejects)
    return finalize(build, CONFIG, "gr3d test", run_info={"executor": "local", "wall_s": 1.23})


def test_finalize_merges_and_counts(tmp_path: Path) -> None:
    man = _build(tmp_path)
    validate("manifest", man)
    assert json.loads((tmp_path / "manifest.json").read_text()) == man
    assert man["n_shards"] == 3 and man["config"] == CONFIG and man["code_version"] == "gr3d test"
    assert man["totals"] == {"n_input": 13, "n_samples": 10, "n_rejected": 3, "n_reject_rows": 3}
    assert man["rejects_by_reason"] == {"bad_depth": 1, "vlm_rejected": 2}
    assert man["by_corpus"] == {"cot": 3, "det3d": 4, "pointmap": 3}
    for i, entry in enumerate(man["shards"]):
        assert entry["sha256"] == jsonio.loads(stats_path(tmp_path, i).read_bytes())["sha256"]
        assert entry["tar"] == f"shards/{i:06d}.tar"
    idx = pq.read_table(tmp_path / "index.parquet")
    assert idx.num_rows == 10 and idx.column("shard").to_pylist() == [0] * 4 + [1] * 4 + [2] * 2
    assert pq.read_table(tmp_path / "rejects.parquet").column("key").to_pylist() == ["world/r1", "world/r2", "world/r3"]
    assert man["files"]["index.parquet"]["rows"] == 10
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["executor"] == "local" and run["hostname"] and "finished_at_utc" in run
    text = (tmp_path / "manifest.json").read_text()
    for leak in (run["hostname"], "finished", "wall_s", "1.23"):
        assert leak not in text


def test_two_runs_give_identical_manifest_and_files(tmp_path: Path) -> None:
    _build(tmp_path / "a")
    _build(tmp_path / "b", order_seed=1)
    for name in ("manifest.json", "index.parquet", "rejects.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "run.json").exists()


def test_finalize_refuses_gaps_unfinished_shards_and_duplicate_keys(tmp_path: Path) -> None:
    samples = mixed_samples(6)
    write_build(tmp_path, [samples[:2], samples[2:4], samples[4:]])
    stats_path(tmp_path, 1).unlink()
    tar_path(tmp_path, 0).rename(tmp_path / "elsewhere.tar")
    with pytest.raises(FinalizeError) as ei:
        finalize(tmp_path, CONFIG, "v")
    msg = str(ei.value)
    assert "000000.tar is missing (gap" in msg and "000001.stats.json is missing" in msg
    assert not (tmp_path / "manifest.json").exists()

    dup = tmp_path / "dup"
    with ShardWriter(dup, 0) as w:
        w.add(samples[0])
    with ShardWriter(dup, 1) as w:
        w.add(samples[0])
    with pytest.raises(FinalizeError, match="more than one shard.*world/s0000"):
        finalize(dup, CONFIG, "v")


def test_code_version_is_stable() -> None:
    a, b = code_version(), code_version()
    assert a == b and a.startswith("gr3d 0.1.0 git:")
