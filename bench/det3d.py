"""det3d throughput: samples/s per core on the sample world, local executor and Ray (Ray start-up excluded).

The workload is the real builder (`pipelines.corpora.det3d.builder`) on a 20 scenes x 4 views, 640x480 sample world (both
sources: 160 inputs), replicated `--replicate` times under distinct keys so the timed part is long enough.
Images are read and passed through (no decode, no re-encode); real shards are written and finalized.

Reported per executor (the run with the least CPU of `--repeat` interleaved runs):
- wall rate = samples / wall s, and per core = wall rate / cores used (1 for local, `--workers` for Ray);
- samples / CPU s (local: this process; Ray: this process and its descendants, i.e. driver, raylet, GCS
  and workers, per pid), the per-core rate that does not depend on what else loads a shared box;
- the per-sample split from the shards' stats timings: listing (driver), det3d_read, det3d_convert and
  the shard writer (record validation, tar, parquet);
- `local-nocheck`: local with the writer's record validation swapped for a no-op (the module global
  `shards.writer.validate_record` exists for such swaps) to show what the writer's JSON Schema check costs.
  Informative only: real builds always validate.
Every executor's output is compared byte for byte with the local run's.

Run: `.venv/bin/python -m bench.det3d [--world DIR] [--replicate 20] [--chunk-size 200] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.test_executors_toy import compared_files  # what must be byte-identical, written once


def _tree_cpu() -> dict[int, float]:
    """CPU seconds per pid of this process and all its descendants (an embedded Ray's raylet, GCS, workers)."""
    import psutil

    me = psutil.Process()
    out: dict[int, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:  # exited between listing and reading
            continue
        out[p.pid] = t.user + t.system
    return out


def _cpu_since(before: dict[int, float]) -> float:
    """CPU spent since `before` by the processes alive now (a process that exited meanwhile is not counted,
    so for Ray this can only under-count CPU, i.e. flatter the rate a little)."""
    now = _tree_cpu()
    return sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in now.items())


def _split(build_dir: Path, n: int) -> dict[str, float]:
    """Milliseconds per sample in each stage and in the writer, summed over the shards' stats timings."""
    acc: dict[str, float] = {}
    for p in (build_dir / "shards").glob("*.stats.json"):
        t = json.loads(p.read_text()).get("timing", {})
        for k, v in (t.get("stages_s") or {}).items():
            acc[k] = acc.get(k, 0.0) + v
        acc["write"] = acc.get("write", 0.0) + t.get("write_s", 0.0)
        acc["chunk"] = acc.get("chunk", 0.0) + t.get("chunk_s", 0.0)
    return {k: 1000.0 * v / n for k, v in acc.items()}


def _replicated(builder: Any, times: int) -> tuple[Any, float, float]:
    """The builder with its listing replicated under distinct keys; driver CPU ms per input of the real
    listing (readers + trimming, best of 5) and of planning (sort + chunk digests)."""
    from pipelines.engine.plan import decoded, make_plan

    list(builder.list_inputs(builder.config))  # imports and file cache warm
    list_ms = []
    for _ in range(5):
        c0 = time.process_time()
        base = list(decoded(builder.list_inputs(builder.config)))  # builders yield their listing
        list_ms.append(1000 * (time.process_time() - c0) / len(base))
    items = [{**it, "key": f"{it['key']}/r{r:03d}"} for r in range(times) for it in base]
    c0 = time.process_time()
    make_plan(builder.name, builder.config, items, Path(tempfile.gettempdir()) / "gr3d-no-such-build", 200)
    plan_ms = 1000 * (time.process_time() - c0) / len(items)
    builder.list_inputs = lambda config: items
    return builder, min(list_ms), plan_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="reuse a generated sample world (else a 20x4 one is made)")
    ap.add_argument("--replicate", type=int, default=20)
    ap.add_argument("--chunk-size", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--executors", default="local,local-nocheck,ray")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.run import run_build
    from pipelines.sample_world import SampleWorld, generate

    tmp = Path(tempfile.mkdtemp(prefix="gr3d-bench-det3d-"))
    ray_started = False
    try:
        world_dir = args.world
        if world_dir is None:
            world_dir = tmp / "world"
            t0 = time.perf_counter()
            generate(world_dir, scenes=20, views=4, seed=0)
            print(f"sample world 20x4 640x480: {time.perf_counter() - t0:.1f} s")
        world = SampleWorld.open(world_dir)
        builder, list_ms, plan_ms = _replicated(
            make_builder(Det3dBuildConfig(world.omni3d_files, world.embodiedscan_files, world.root)), args.replicate)
        n = len(builder.list_inputs(builder.config))
        print(f"inputs: {n} ({n // args.replicate} x {args.replicate}); driver CPU per input: listing "
              f"{list_ms:.3f} ms, plan {plan_ms:.3f} ms")
        executors = args.executors.split(",")
        if "ray" in executors:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
            ray_started = True
            print(f"ray.init (excluded): {time.perf_counter() - t0:.2f} s")
        best: dict[str, dict[str, Any]] = {}
        outputs: dict[str, dict[str, bytes]] = {}
        for rep in range(args.repeat):
            for ex in executors:
                out = tmp / ex
                shutil.rmtree(out, ignore_errors=True)
                real = "local" if ex.startswith("local") else ex
                import shards.writer as sw

                saved = sw.validate_record
                if ex == "local-nocheck":
                    sw.validate_record = lambda kind, rec: None
                try:
                    c0, p0, t0 = _tree_cpu(), time.process_time(), time.perf_counter()
                    res = run_build(builder, out, BuildOptions.on(real, chunk_size=args.chunk_size,
                                    workers=args.workers if real != "local" else None, show_progress=False))
                    wall = time.perf_counter() - t0
                    cpu = time.process_time() - p0 if real == "local" else _cpu_since(c0)
                finally:
                    sw.validate_record = saved
                assert res.manifest["totals"]["n_samples"] == n, res.manifest["totals"]
                outputs[ex] = compared_files(out)
                cores = 1 if real == "local" else min(args.workers, os.cpu_count() or 1)
                row = {"wall": wall, "cpu": cpu, "rate": n / wall, "per_core": n / wall / cores,
                       "cpu_rate": n / cpu, "split": _split(out, n), "cores": cores}
                print(f"{ex:14s} rep {rep}: {wall:6.2f} s wall  {n / wall:7.1f} samples/s  {row['per_core']:7.1f} "
                      f"/s/core  {n / cpu:7.1f} /s/CPU-s  loadavg {os.getloadavg()[0]:.2f}", flush=True)
                if ex not in best or cpu < best[ex]["cpu"]:
                    best[ex] = row
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    ref = outputs.get("local")
    print(f"\n{datetime.date.today()}  {platform.processor() or platform.machine()}  cpus={os.cpu_count()}  "
          f"loadavg={os.getloadavg()[0]:.2f}  n={n}  chunk={args.chunk_size}")
    print("| executor | cores | wall s | samples/s | samples/s/core (wall) | samples per CPU-s "
          "| read ms | convert ms | writer ms | output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ex, r in best.items():
        s = r["split"]
        same = "reference" if ex == "local" else ("identical" if outputs[ex] == ref else "DIFFERENT")
        cpu = f"{r['cpu_rate']:.0f}"
        print(f"| {ex} | {r['cores']} | {r['wall']:.2f} | {r['rate']:.0f} | {r['per_core']:.0f} | {cpu} "
              f"| {s.get('det3d_read', 0):.3f} | {s.get('det3d_convert', 0):.3f} | {s.get('write', 0):.3f} | {same} |")
    if "local" in best:
        per_core = best["local"]["cpu_rate"]
        print(f"780K samples on 2 cores at the local CPU rate: {780_000 / (2 * per_core) / 60:.1f} min "
              f"(+ listing and plan {780_000 * (list_ms + plan_ms) / 1000 / 60:.1f} min in the driver)")
        if "local-nocheck" in best:
            nc = best["local-nocheck"]["cpu_rate"]
            print(f"  with a free record validation: {780_000 / (2 * nc) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
