"""Where the wall time of one `gr3d build` goes: the driver's phases and the chunks' busy profile.

Runs the real CLI in this process (`pipelines.cli`), with marks on the driver's phase boundaries (listing
done, Ray's head node up, executor done, finalize done), then reads each shard's stats `timing` (its
`chunk_s` wall, `chunk_cpu_s` thread CPU and pid; its end is the stats file's mtime) and prints how many
chunks were running in every second. A busy figure below the worker count is time the workers waited:
for the driver, for Ray's start, or for the CPU (wall minus CPU per chunk says which).

Run: `.venv/bin/python -m bench.build_timeline build det3d --omni3d FILE --data-root DIR --out OUT
--executor ray --workers 2 --quiet` (the arguments are `gr3d`'s; OUT is left in place).
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.time()
MARKS: dict[str, float] = {}


def _mark(name: str) -> None:
    MARKS[name] = round(time.time() - T0, 3)


def _wrap(module: Any, attr: str, before: str | None = None, after: str | None = None) -> None:
    real = getattr(module, attr)

    def wrapped(*a: Any, **kw: Any) -> Any:
        if before:
            _mark(before)
        out = real(*a, **kw)
        if after:
            _mark(after)
        return out

    setattr(module, attr, wrapped)


def _instrument() -> None:
    import pipelines.engine.run as run

    _wrap(run, "encode_inputs", after="listing done")
    _wrap(run, "_plan_and_run", before="plan starts")
    _wrap(run, "_finalize", before="executor done", after="finalized")
    try:
        import ray

        import pipelines.engine.executors.ray_executor as rex
    except ImportError:
        return
    _wrap(rex, "prestart", before="Ray start requested", after="Ray up, workers warming")
    _wrap(rex, "_run_tasks", before="first chunk submitted")
    _wrap(ray, "init", before="ray.init starts", after="ray.init done")


def chunk_rows(out: Path) -> list[dict[str, Any]]:
    """Per shard: start/end (s since this process started), wall, CPU, pid."""
    rows = []
    for p in sorted((out / "shards").glob("*.stats.json")):
        t = json.loads(p.read_text()).get("timing") or {}
        if "chunk_s" not in t:
            continue
        end = os.stat(p).st_mtime - T0
        rows.append({"start": end - t["chunk_s"], "end": end, "wall": t["chunk_s"],
                     "cpu": t.get("chunk_cpu_s") or 0.0, "pid": t.get("pid")})
    return rows


def report(out: Path) -> None:
    rows = chunk_rows(out)
    print("driver marks (s):", json.dumps(MARKS))
    if not rows:
        return
    first, last = min(r["start"] for r in rows), max(r["end"] for r in rows)
    wall, cpu = sum(r["wall"] for r in rows), sum(r["cpu"] for r in rows)
    print(f"{len(rows)} chunks on {len({r['pid'] for r in rows})} process(es): first starts {first:.2f} s, "
          f"last ends {last:.2f} s; chunk wall {wall:.2f} s, chunk CPU {cpu:.2f} s")
    busy = []
    for b in range(int(last) + 1):
        busy.append(sum(max(0.0, min(r["end"], b + 1) - max(r["start"], b)) for r in rows))
    print("chunks running, per second:", " ".join(f"{x:.1f}" for x in busy))


def main() -> None:
    argv = sys.argv[1:]
    if "--out" not in argv:
        raise SystemExit("usage: python -m bench.build_timeline build CORPUS ... --out OUT [gr3d build flags]")
    out = Path(argv[argv.index("--out") + 1])
    _instrument()
    sys.argv = ["gr3d", *argv]
    try:
        runpy.run_module("pipelines.cli", run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    _mark("exit")
    report(out)


if __name__ == "__main__":
    main()
