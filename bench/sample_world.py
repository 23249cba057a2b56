"""Benchmark `gr3d sample-world`: wall time of the CLI for N scenes x K views, as a user runs it.

Runs the real command in a fresh interpreter (imports included), `--repeat` times, and prints the
figures for bench/sample_world.md. Usage:
    .venv/bin/python bench/sample_world.py --scenes 20 --views 4 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
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
    args = ap.parse_args()
    gr3d = Path(sys.executable).with_name("gr3d")
    cmd = [str(gr3d)] if gr3d.exists() else [sys.executable, "-m", "pipelines.cli"]
    times, digests = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            out = Path(tmp) / f"w{i}"
            t0 = time.perf_counter()
            subprocess.run([*cmd, "sample-world", "--out", str(out), "--scenes", str(args.scenes), "--views",
                            str(args.views), "--width", str(args.width), "--height", str(args.height)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            times.append(time.perf_counter() - t0)
            digest, n_files, size = _tree_digest(out)
            digests.add(digest)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sample-world {args.scenes} scenes x {args.views} views at {args.width}x{args.height}: "
          f"best {min(times):.1f} s, median {sorted(times)[len(times) // 2]:.1f} s, worst {max(times):.1f} s "
          f"over {args.repeat} runs; {n_files} files, {size / 2**20:.1f} MiB; "
          f"identical bytes across runs: {len(digests) == 1}")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load average before the last run ~{load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
