"""Benchmark `gr3d sample-world`: wall time of the CLI for N scenes x K views, as a user runs it.

Runs the real command in a fresh interpreter (imports included), `--repeat` times for each worker
count in `--workers` (the serial baseline side by side with the parallel run, in the same session),
and prints the figures for bench/sample_world.md, with the load average. Usage:
    .venv/bin/python bench/sample_world.py --scenes 20 --views 4 --repeat 3 --workers 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_digest(root: Path) -> tuple[str, int, int]:
    h = hashlib.sha256()
    n = size = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
            n += 1
            size += len(data)
    return h.hexdigest()[:16], n, size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=20)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    args = ap.parse_args()
    gr3d = Path(sys.executable).with_name("gr3d")
    cmd = [str(gr3d)] if gr3d.exists() else [sys.executable, "-m", "pipelines.cli"]
    digests: set[str] = set()
    medians: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            times = []
            for i in range(args.repeat):
                out = Path(tmp) / f"w{workers}_{i}"
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                t0 = time.perf_counter()
                subprocess.run([*cmd, "sample-world", "--out", str(out), "--scenes", str(args.scenes), "--views",
                                str(args.views), "--width", str(args.width), "--height", str(args.height),
                                "--workers", str(workers), "--quiet"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                times.append(time.perf_counter() - t0)
                digest, n_files, size = _tree_digest(out)
                digests.add(digest)
                shutil.rmtree(out)
                print(f"  workers {workers} run {i}: {times[-1]:.1f} s (load average before ~{load:.1f})", flush=True)
            medians[workers] = statistics.median(times)
            print(f"sample-world {args.scenes} scenes x {args.views} views at {args.width}x{args.height}, "
                  f"{workers} workers: best {min(times):.1f} s, median {medians[workers]:.1f} s, worst {max(times):.1f} s "
                  f"over {args.repeat} runs; {n_files} files, {size / 2**20:.1f} MiB", flush=True)  # fmt: skip
    base = medians[args.workers[0]]
    for w, m in medians.items():
        print(f"workers {w}: median {m:.1f} s = {m / args.scenes:.2f} s/scene, speed-up x{base / m:.2f}")
    print(f"identical bytes across all runs and worker counts: {len(digests) == 1}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average now {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
