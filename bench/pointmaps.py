"""Point-map corpus throughput: the back-projection kernel against Open3D, and end-to-end samples/s per core.

1. Kernel, side by side in one run on the same 640x480 uint16 depth (the first view of a generated
   640x480 sample world; every pixel of that view is valid):
   - `open3d`: `PointCloud.create_from_depth_image(Image(uint16), intrinsic, depth_scale=1000)` plus
     `np.asarray(pc.points)` (float64 N x 3);
   - `ours_u16`: `pipelines.corpora.pointmaps.builder.backproject(uint16, K, scale=1000)` (float32 N x 3): the same input
     and work as Open3D's call (valid pixels converted to metres exactly as `depth_io` does);
   - `ours_m`: `backproject` alone on float32 metres;
   - `geometry.backproject_depth`: the shared float64 reference (N x 5), for scale.
   Timed interleaved (`--repeat` rounds of `--inner` calls each); the median round counts.
2. End to end: `run_build(..., BuildOptions.on("local"))` (one process, so per core) over `--n` inputs that cycle through
   the world's frames under distinct keys: PNG/NPY decode, sampling, back-projection, record and text,
   schema validation, tar + Parquet writing, manifest. Rates are given per wall second and per CPU second
   of the process (the box is shared; CPU time is what "per core" means when others load it).

Run: `.venv/bin/python -m bench.pointmaps [--n 600 --repeat 7]`. Results: bench/pointmaps.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1000.0


def kernel_bench(world: Any, repeat: int, inner: int) -> dict[str, Any]:
    import numpy as np
    import open3d as o3d
    from PIL import Image

    from pipelines.corpora.pointmaps.depth_io import DepthSpec, decode_depth
    from pipelines.corpora.pointmaps.geometry import backproject
    from schemas.geometry import backproject_depth

    view = world.ground_truth["scenes"][0]["views"][0]
    raw_png = (world.root / view["depth"]).read_bytes()
    d16 = np.asarray(Image.open(world.root / view["depth"])).astype(np.uint16)
    H, W = d16.shape
    K = np.asarray(view["K"])
    z = decode_depth(raw_png, DepthSpec("png_u16", 1000.0))
    intr = o3d.camera.PinholeCameraIntrinsic(W, H, K[0, 0], K[1, 1], K[0, 2], K[1, 2])
    img = o3d.geometry.Image(d16)

    fns = {
        "open3d": lambda: np.asarray(o3d.geometry.PointCloud.create_from_depth_image(
            img, intr, depth_scale=1000.0, depth_trunc=1e6).points),
        "ours_u16": lambda: backproject(d16, K, scale=1000.0),
        "ours_m": lambda: backproject(z, K),
        "geometry.backproject_depth": lambda: backproject_depth(z, K),
    }  # fmt: skip
    a, b = fns["open3d"](), fns["ours_u16"]()
    assert a.shape == b.shape, (a.shape, b.shape)
    max_diff = float(np.abs(a - b).max())
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            rounds[k].append(_time(f, inner))
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "size": f"{W}x{H}", "valid_points": int(a.shape[0]), "max_abs_diff_vs_open3d_m": max_diff,
        "ms_median": {k: round(v, 3) for k, v in med.items()},
        "ms_best": {k: round(min(v), 3) for k, v in rounds.items()},
        "speedup_vs_open3d": {k: round(med["open3d"] / v, 2) for k, v in med.items() if k != "open3d"},
    }  # fmt: skip


def e2e_bench(world: Any, source: str, n: int, chunk_size: int, mode: str, conversations: int,
              out_root: Path) -> dict[str, Any]:
    from pipelines.corpora.pointmaps.builder import PointmapConfig, list_inputs, make_builder
    from pipelines.corpora.pointmaps.sampling import SamplerConfig
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.plan import Builder
    from pipelines.engine.run import run_build

    kw: dict[str, Any] = {"sampler": SamplerConfig(n=100, mode=mode), "conversations": conversations}
    if source == "omni3d":
        cfg = PointmapConfig("omni3d", data_root=world.root, omni3d=world.omni3d_files, **kw)
    elif source == "embodiedscan":
        cfg = PointmapConfig("embodiedscan", data_root=world.root, embodiedscan=world.embodiedscan_files, **kw)
    else:
        cfg = PointmapConfig("rgbd", rgbd=world.rgbd_root, **kw)
    base = make_builder(cfg)
    frames = [it for it in list_inputs(base.config) if "read_reject" not in it]

    def cycled(_config: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**frames[i % len(frames)], "key": f"{frames[i % len(frames)]['key']}/c{i:06d}"} for i in range(n)]

    builder = Builder("pointmaps", base.config, cycled, base.stages)
    out = out_root / f"{source}_{mode}_{conversations}"
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = time.process_time(), time.perf_counter()
    res = run_build(builder, out, BuildOptions.on("local", chunk_size=chunk_size, show_progress=False))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    written = res.manifest["totals"]["n_samples"]
    assert written == n, res.manifest["totals"]
    stage_s: dict[str, float] = {}
    for p in (out / "shards").glob("*.stats.json"):
        t = json.loads(p.read_text()).get("timing", {})
        for k, v in (t.get("stages_s") or {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + v
        stage_s["write"] = stage_s.get("write", 0.0) + t.get("write_s", 0.0)
    tar_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))
    shutil.rmtree(out, ignore_errors=True)
    return {
        "source": source, "mode": mode, "conversations": conversations, "samples": n,
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "samples_per_s_wall": round(n / wall, 1), "samples_per_cpu_s": round(n / cpu, 1),
        "ms_per_sample_by_step": {k: round(v / n * 1000, 3) for k, v in sorted(stage_s.items())},
        "kib_per_sample": round(tar_bytes / n / 1024, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="samples per end-to-end run")
    ap.add_argument("--chunk-size", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7, help="kernel: interleaved rounds")
    ap.add_argument("--inner", type=int, default=20, help="kernel: calls per round")
    ap.add_argument("--world", type=Path, default=None, help="an existing 640x480 sample world (else generated)")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)

    from pipelines.sample_world import SampleWorld

    tmp = Path(tempfile.mkdtemp(prefix="gr3d_bench_pm_"))
    try:
        if args.world is None:
            from pipelines.sample_world.world import generate

            generate(tmp / "world", scenes=2, views=4, seed=0, width=640, height=480)
            world = SampleWorld.open(tmp / "world")
        else:
            world = SampleWorld.open(args.world)
        report: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
        report["kernel"] = kernel_bench(world, args.repeat, args.inner)
        print(json.dumps(report["kernel"], indent=1), flush=True)
        if not args.skip_e2e:
            report["e2e"] = []
            runs = (("omni3d", "uniform", 1), ("embodiedscan", "uniform", 1), ("rgbd", "uniform", 1),
                    ("omni3d", "edge_avoiding", 1), ("omni3d", "depth_stratified_edge_avoiding", 1),
                    ("omni3d", "uniform", 10))
            for source, mode, conv in runs:
                r = e2e_bench(world, source, args.n, args.chunk_size, mode, conv, tmp)
                print(json.dumps(r), flush=True)
                report["e2e"].append(r)
        report["load_avg_end"] = os.getloadavg()
        print(json.dumps({"load_avg": [report["load_avg_start"], report["load_avg_end"]]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
