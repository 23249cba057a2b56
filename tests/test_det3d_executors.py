"""det3d on the three executors: the same sample-world build on Ray, Beam and the plain loop is byte-identical,
and `gr3d shards verify` passes on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder
from pipelines.engine.options import BuildOptions
from pipelines.engine.run import run_build
from shards.verify import verify_build

CHUNK = 4


def _compared(build_dir: Path) -> dict[str, bytes]:
    """Shard tars, per-shard and merged Parquet, stats without their `timing`, and manifest.json."""
    out: dict[str, bytes] = {}
    for p in sorted((build_dir / "shards").iterdir()):
        data = p.read_bytes()
        if p.name.endswith(".stats.json"):
            d = json.loads(data)
            d.pop("timing", None)
            data = json.dumps(d, sort_keys=True).encode()
        out[f"shards/{p.name}"] = data
    for name in ("manifest.json", "index.parquet", "rejects.parquet"):
        out[name] = (build_dir / name).read_bytes()
    return out


@pytest.mark.ray
def test_ray_beam_and_local_write_identical_det3d_shards(sample_world: Any, tmp_path: Path, ray_session: Any) -> None:
    b = make_builder(Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files, sample_world.root))
    runs = {"local": {}, "ray": {"workers": 2}, "beam": {"workers": 1}}
    got = {}
    for name, kw in runs.items():
        out = tmp_path / name
        res = run_build(b, out, BuildOptions.on(name, chunk_size=CHUNK, show_progress=False, **kw))
        n = res.manifest["totals"]["n_input"]
        assert n == 2 * sample_world.manifest["counts"]["views"] and res.processed == list(range(-(-n // CHUNK)))
        assert res.manifest["totals"]["n_samples"] == n
        assert not [str(p) for p in verify_build(out)], name
        got[name] = _compared(out)
    ref = got["local"]
    assert sum(k.endswith(".tar") for k in ref) == 3
    for name in ("ray", "beam"):
        assert got[name].keys() == ref.keys(), name
        assert [k for k in ref if got[name][k] != ref[k]] == [], f"{name} differs from local"
    man = json.loads(ref["manifest.json"])
    assert man["config"]["builder"] == "det3d" and man["config"]["convert"]["digits_3d"] == 2
