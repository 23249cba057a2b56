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
from tests.test_executors_toy import compared_files

CHUNK = 4


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
        got[name] = compared_files(out)
    ref = got["local"]
    assert sum(k.endswith(".tar") for k in ref) == 3
    for name in ("ray", "beam"):
        assert got[name].keys() == ref.keys(), name
        assert [k for k in ref if got[name][k] != ref[k]] == [], f"{name} differs from local"
    man = json.loads(ref["manifest.json"])
    assert man["config"]["builder"] == "det3d" and man["config"]["convert"]["digits_3d"] == 2
