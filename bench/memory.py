"""Peak memory of a build over 1x and 4x the input: does it stream, or does it grow with the corpus?

The workload is the real `gr3d build det3d|pointmaps` command, run as a subprocess, over the sample world's
annotation files replicated into `scale x --inputs` entries in their real formats (an Omni3D JSON with more
images, an EmbodiedScan info pkl with more scans, each replica deep-copied so the files and their loaded
objects really are `scale` times larger; every replica points at the same image and depth files, under keys
of its own). So the listing runs the real readers on files of the size the scale says.

Measured per run:
- `driver maxrss`: `ru_maxrss` of the build process from `os.wait4` (exact, kernel-tracked). With the local
  executor the whole build runs in that process; with Ray it is the largest of the driver and the Ray
  processes it reaped (GCS, raylet), so Ray workers are covered by the next figure only;
- `tree peak`: the largest sum, over the build process and all its descendants (Ray's GCS, raylet,
  workers), of their proportional set size (PSS: shared pages split between the processes that map them,
  so Ray's shared object store is not counted once per process), sampled every `--interval` s;
- the slope `(peak 4x - peak 1x) / (3 * inputs 1x)`: what each more input costs, and the same extrapolated to
  780K inputs (the paper's detection corpus).
Target (the issue): the 4x peak within 1.3x of the 1x peak.

Run: `.venv/bin/python -m bench.memory [--world DIR] [--inputs 1000] [--scales 1,4] [--executors local,ray]`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ID_STRIDE = 10_000_000  # replica r's Omni3D ids and annotation ids are r * ID_STRIDE + the original


def replicate_omni3d(world: Path, times: int, out: Path) -> Path:
    """All the world's Omni3D images (train + val), `times` times under new ids, in one `Bench_train.json`."""
    man = json.loads((world / "sample_world.json").read_text())
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    for rel in man["files"]["omni3d"]:
        d = json.loads((world / rel).read_text())
        base = d
        images += d["images"]
        anns += d["annotations"]
    out_images, out_anns = [], []
    for r in range(times):
        off = r * ID_STRIDE
        out_images += [{**img, "id": img["id"] + off} for img in images]
        out_anns += [{**a, "id": a["id"] + off, "image_id": a["image_id"] + off} for a in anns]
    path = out / "Bench_train.json"
    path.write_text(json.dumps({"info": base["info"], "categories": base["categories"], "images": out_images,
                                "annotations": out_anns}))
    return path


def replicate_embodiedscan(world: Path, times: int, out: Path) -> Path:
    """All the world's EmbodiedScan scans, `times` times (deep copies, sample_idx `..._rNNNN`), in one pkl."""
    man = json.loads((world / "sample_world.json").read_text())
    scans: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for rel in man["files"]["embodiedscan"]:
        info = pickle.loads((world / rel).read_bytes())  # our own generated file: trusted
        scans += info["data_list"]
    data_list = []
    for r in range(times):
        for s in scans:
            c = copy.deepcopy(s)  # no shared objects: the pickle and its loaded form really grow
            c["sample_idx"] = f"{s['sample_idx']}_r{r:04d}"
            data_list.append(c)
    path = out / "bench_infos_train.pkl"
    path.write_bytes(pickle.dumps({"metainfo": info["metainfo"], "data_list": data_list}, protocol=2))
    return path


def per_replica(world: Path, builder: str) -> int:
    man = json.loads((world / "sample_world.json").read_text())
    views = int(man["counts"]["views"])
    return 2 * views if builder == "det3d" else views


def command(builder: str, files: dict[str, Path], world: Path, out: Path, executor: str, chunk: int,
            workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "pipelines.cli", "build", builder, "--out", str(out), "--executor", executor,
           "--chunk-size", str(chunk), "--quiet", "--overwrite"]
    if executor != "local":
        cmd += ["--workers", str(workers)]
    if builder == "det3d":
        cmd += ["--omni3d", str(files["omni3d"]), "--embodiedscan", str(files["embodiedscan"]),
                "--data-root", str(world)]
    else:
        cmd += ["--source", "embodiedscan", "--embodiedscan", str(files["embodiedscan"]), "--data-root", str(world)]
    return cmd


class TreeSampler(threading.Thread):
    """Samples the summed PSS (and RSS) of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            pss = rss = 0
            for p in procs:
                try:
                    m = p.memory_full_info()
                except psutil.Error:  # exited between listing and reading
                    continue
                pss += getattr(m, "pss", m.rss)
                rss += m.rss
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.max_procs = max(self.max_procs, len(procs))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_one(cmd: list[str], interval: float, log: Path) -> dict[str, Any]:
    """Run the build, sampling its process tree; returns wall s, driver maxrss and the tree peaks (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child (and what it reaped)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall": wall, "maxrss": usage.ru_maxrss / 1024, "tree_pss": sampler.peak_pss / 2**20,
            "tree_rss": sampler.peak_rss / 2**20, "procs": sampler.max_procs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None, help="a generated sample world (else 8 scenes x 4 views)")
    ap.add_argument("--inputs", type=int, default=1000, help="inputs per build at scale 1 (rounded up to replicas)")
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--builders", default="det3d,pointmaps")
    ap.add_argument("--executors", default="local,ray")
    ap.add_argument("--chunk-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between process-tree samples")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    scales = [int(s) for s in args.scales.split(",")]

    tmp = args.keep or Path(tempfile.mkdtemp(prefix="gr3d-bench-memory-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        world = args.world
        if world is None:
            from pipelines.sample_world import generate

            world = tmp / "world"
            if not (world / "sample_world.json").is_file():
                generate(world, scenes=8, views=4, seed=0)
        world = world.resolve()
        for builder in args.builders.split(","):
            reps = -(-args.inputs // per_replica(world, builder))
            for scale in scales:
                d = tmp / f"inputs-{builder}-x{scale}"
                d.mkdir(exist_ok=True)
                files = {"omni3d": replicate_omni3d(world, reps * scale, d) if builder == "det3d" else None,
                         "embodiedscan": replicate_embodiedscan(world, reps * scale, d)}
                sizes = {k: round(v.stat().st_size / 2**20, 1) for k, v in files.items() if v is not None}
                for ex in args.executors.split(","):
                    out = tmp / f"out-{builder}-{ex}-x{scale}"
                    r = run_one(command(builder, files, world, out, ex, args.chunk_size, args.workers),
                                args.interval, tmp / f"log-{builder}-{ex}-x{scale}.txt")
                    man = json.loads((out / "manifest.json").read_text())
                    r.update(builder=builder, executor=ex, scale=scale, inputs=man["totals"]["n_input"],
                             samples=man["totals"]["n_samples"], file_mib=sizes)
                    rows.append(r)
                    print(f"{builder:9s} {ex:5s} x{scale}: {r['inputs']} inputs {r['wall']:6.1f} s  driver maxrss "
                          f"{r['maxrss']:7.1f} MiB  tree PSS {r['tree_pss']:7.1f} MiB  (RSS sum {r['tree_rss']:7.1f}, "
                          f"{r['procs']} procs)  files {sizes} MiB", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)

    lo, hi = min(scales), max(scales)
    print(f"\n{datetime.date.today()}  {platform.processor() or platform.machine()}  cpus={os.cpu_count()}  "
          f"python {platform.python_version()}  loadavg={os.getloadavg()[0]:.2f}  chunk={args.chunk_size}")
    print(f"| builder | executor | inputs x{lo} | inputs x{hi} | driver maxrss x{lo} MiB | x{hi} | ratio "
          f"| tree PSS x{lo} MiB | x{hi} | ratio | KiB per input | at 780K inputs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in args.builders.split(","):
        for ex in args.executors.split(","):
            a = next(r for r in rows if (r["builder"], r["executor"], r["scale"]) == (b, ex, lo))
            z = next(r for r in rows if (r["builder"], r["executor"], r["scale"]) == (b, ex, hi))
            peak = "maxrss" if ex == "local" else "tree_pss"
            slope = (z[peak] - a[peak]) * 1024 / max(1, z["inputs"] - a["inputs"])
            print(f"| {b} | {ex} | {a['inputs']} | {z['inputs']} | {a['maxrss']:.0f} | {z['maxrss']:.0f} "
                  f"| {z['maxrss'] / a['maxrss']:.2f} | {a['tree_pss']:.0f} | {z['tree_pss']:.0f} "
                  f"| {z['tree_pss'] / a['tree_pss']:.2f} | {slope:.1f} | {(a[peak] + slope * 780_000 / 1024) / 1024:.1f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
