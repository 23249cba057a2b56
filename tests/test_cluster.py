"""A build on a real two-node Ray cluster (`ray start` head + worker, 1 CPU each) joined with
`--ray-address` writes the same bytes as the plain loop, and its chunks really ran on both nodes.

The driver is a subprocess (`python -m pipelines.cli build det3d ... --ray-address ADDR`), exactly as a
user runs it against a cluster; the pytest process never joins the cluster, so its own Ray session
(if another test started one) is untouched. See `tests/ray_cluster.py` for how the nodes are started
and torn down without `ray stop`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.cli import main as gr3d
from shards.verify import verify_build
from tests.ray_cluster import RayCluster, finish, ray_cluster
from tests.test_executors_toy import compared_files

CHUNK = 2  # 12 sample-world views -> 6 chunks: enough in-flight tasks that both 1-CPU nodes get some

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """One two-node cluster for the module (starting one costs ~8 s); torn down, and checked gone, after."""
    with ray_cluster() as c:
        yield c


def _stats(build_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((build_dir / "shards").glob("*.stats.json"))]


def test_det3d_on_two_node_cluster_is_byte_identical_to_local(cluster: RayCluster, sample_world: Any,
                                                               tmp_path: Path) -> None:
    ref, out = tmp_path / "local", tmp_path / "cluster"
    common = ["build", "det3d", "--sample-world", str(sample_world.root), "--chunk-size", str(CHUNK), "--quiet"]
    assert gr3d([*common, "--out", str(ref), "--executor", "local"]) == 0

    assert cluster.alive_nodes() == 2
    p = cluster.driver(*common, "--out", str(out), "--ray-address", cluster.address)
    stdout, stderr = finish(p)
    assert p.returncode == 0, stderr[-4000:]
    assert "Connected to Ray cluster" in stderr  # joined the running cluster, did not start its own Ray

    n_views = sample_world.manifest["counts"]["views"] * 2
    assert f"inputs: {n_views}" in stdout
    assert not [str(x) for x in verify_build(out)]
    got, want = compared_files(out), compared_files(ref)
    assert sum(k.endswith(".tar") for k in want) == -(-n_views // CHUNK)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []

    run = json.loads((out / "run.json").read_text())
    assert run["executor"] == "ray" and run["ray_address"] == cluster.address
    assert run["chunks_processed"] == list(range(-(-n_views // CHUNK)))
    # Which node wrote each shard: the writing worker's pid (stats timing) against each node's worker logs.
    nodes = [cluster.node_of_pid(s["timing"]["pid"]) for s in _stats(out)]
    assert None not in nodes, nodes
    assert set(nodes) == {"head", "worker"}, nodes
    assert cluster.alive_nodes() == 2  # the run left the cluster as it found it
