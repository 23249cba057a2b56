"""det3d on a real multi-node Ray cluster on this machine: 1, 2 and 4 nodes (`ray start`), same input.

Each node is a `ray start` process with its own temp dir (`tests.ray_cluster.ray_cluster`, which never calls
`ray stop`); the driver is the CLI with `--ray-address`. Per node count: node start-up time, build wall
time (the driver's `run.json` seconds: listing, plan, run, finalize), the shards each node wrote (from the
stats files' worker pid and the nodes' worker logs), and whether the output equals a local build's bytes.
Logical CPUs per node are `--cpus-per-node` (an int: `ray start --num-cpus` takes whole CPUs), so 4 nodes of
1 CPU oversubscribe a 2-core box on purpose: what is measured is what each extra node costs (raylet,
workers, scheduling), not compute scaling, which this box cannot show. The model is in bench/scaling.md.

Run: `.venv/bin/python -m bench.scaling --omni3d FILE --data-root DIR [--nodes 1,2,4]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.test_executors_toy import compared_files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--omni3d", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--cpus-per-node", default="2,1,1", help="per entry of --nodes")
    ap.add_argument("--chunk-size", type=int, default=200)
    a = ap.parse_args(argv)
    from tests.ray_cluster import cluster_env, ray_cluster

    tmp = Path(tempfile.mkdtemp(prefix="gr3d-bench-scaling-"))
    common = ["build", "det3d", "--omni3d", a.omni3d, "--data-root", a.data_root, "--chunk-size", str(a.chunk_size),
              "--quiet"]
    try:
        ref_dir = tmp / "local"
        subprocess.run([sys.executable, "-m", "pipelines.cli", *common, "--out", str(ref_dir), "--executor", "local"],
                       check=True, env=cluster_env(), capture_output=True)
        ref = compared_files(ref_dir, with_plan=True)
        n = json.loads((ref_dir / "manifest.json").read_text())["totals"]["n_input"]
        local_s = json.loads((ref_dir / "run.json").read_text())["seconds"]
        print(f"inputs {n}; local reference build {local_s:.1f} s; loadavg {os.getloadavg()[0]:.2f}", flush=True)
        rows = []
        for nn, cpn in zip((int(x) for x in a.nodes.split(",")), (int(x) for x in a.cpus_per_node.split(","))):
            t0 = time.perf_counter()
            with ray_cluster(num_cpus=cpn, n_nodes=nn, timeout=180) as c:
                up = time.perf_counter() - t0
                out = tmp / f"n{nn}"
                load = os.getloadavg()[0]
                t1 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "pipelines.cli", *common, "--out", str(out), "--executor",
                                    "ray", "--ray-address", c.address], env=c.env, capture_output=True, text=True)
                wall = time.perf_counter() - t1
                if p.returncode != 0:
                    raise RuntimeError(p.stderr[-3000:])
                per_node: Counter[str] = Counter()
                for st in (out / "shards").glob("*.stats.json"):
                    pid = json.loads(st.read_text())["timing"]["pid"]
                    per_node[c.node_of_pid(pid) or "?"] += 1
                run_s = json.loads((out / "run.json").read_text())["seconds"]
                same = compared_files(out, with_plan=True) == ref
            rows.append((nn, cpn, up, wall, run_s, dict(per_node), same, load))
            print(f"{nn} node(s) x {cpn} CPU: start {up:.1f} s, driver wall {wall:.1f} s (run.json {run_s:.1f} s), "
                  f"shards per node {dict(per_node)}, output {'identical' if same else 'DIFFERENT'}, "
                  f"load {load:.2f}", flush=True)
        print("\n| nodes | CPUs per node | cluster start s | driver wall s | build s (run.json) | shards per node "
              "| output | load before |")
        print("|---|---|---|---|---|---|---|---|")
        for nn, cpn, up, wall, run_s, pn, same, load in rows:
            print(f"| {nn} | {cpn} | {up:.1f} | {wall:.1f} | {run_s:.1f} | {pn} | {'identical' if same else 'DIFFERENT'} "
                  f"| {load:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
