"""The det3d driver's listing + plan (`gr3d build det3d --dry-run`) with its source files listed serially, in
forked worker processes, or in spawned ones: fresh CLI processes, interleaved, medians.

Run: `PYTHONPATH=. .venv/bin/python -m bench.det3d_listing --data-root DIR --repeat 3 FILE...` (several files:
`bench.omni3d_big --split`). Prints wall and CPU (the driver and its listing workers) per mode.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

MODES = {  # what the wrapper sets in pipelines.corpora.det3d.builder before running the CLI
    "serial": "b.PARALLEL_LISTING_MIN_BYTES = 1 << 62",
    "fork": "b.PARALLEL_LISTING_MIN_BYTES = 0",
    "spawn": "b.PARALLEL_LISTING_MIN_BYTES = 0; b._FORK_OK = False",
}


def run(mode: str, files: list[str], root: str, out: str) -> tuple[float, float]:
    code = ("import runpy, sys; import pipelines.corpora.det3d.builder as b; " + MODES[mode] +
            "; sys.argv = ['gr3d'] + sys.argv[1:]; runpy.run_module('pipelines.cli', run_name='__main__')")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "build", "det3d", "--omni3d", *files, "--data-root", root,
                    "--out", out, "--dry-run", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI and its reaped listing workers
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="serial,fork,spawn")
    a = ap.parse_args(argv)
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gr3d-listing-") as tmp:
        for rep in range(a.repeat):
            for mode in a.modes.split(","):
                load = os.getloadavg()[0]
                w, c = run(mode, a.files, a.data_root, os.path.join(tmp, "out"))
                rows.setdefault(mode, []).append((w, c))
                print(f"rep {rep} {mode:6s} {w:6.2f} s wall {c:6.2f} s CPU  load before {load:.2f}", flush=True)
    print(f"\ncpus {os.cpu_count()}  loadavg now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| mode | median wall s | median CPU s |\n|---|---|---|")
    for mode, rs in rows.items():
        print(f"| {mode} | {statistics.median(r[0] for r in rs):.2f} | {statistics.median(r[1] for r in rs):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
