"""How much faster two processes do a det3d build's own work than one, on this machine, with no executor at all.

The ceiling any executor (Ray, Beam, a pool) can reach on 2 cores: the same det3d chunks (the real stages and
shard writer, `pipelines.engine.chunk.run_chunk`) run once in one process, then split between two forked
processes running at the same time; and, for comparison, a small pure-Python loop that fits in the cores'
caches, run the same two ways. Throughput ratio = one process's wall time for all the work / two processes'
wall time for the same work, half each: 2.0 means the cores share nothing.

Each repetition forks fresh processes from a warm parent (stages set up, file cache warm), alternating the two
ways; the ratio is the median. Output: one JSON line per repetition, then the medians.

Run: `PYTHONPATH=. .venv/bin/python -m bench.parallel_ceiling --omni3d FILE --data-root DIR --chunks 16 --repeat 9`
(results: bench/executors.md, "Why 1.6x is out of reach on this box"); the plumbing is tested on the sample
world by tests/test_bench_parallel_ceiling.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _loop(n: int) -> None:
    d: dict[int, float] = {}
    for i in range(n):
        d[i % 1000] = d.get(i % 1000, 0.0) + i * 0.5


def _chunks_job(job: tuple[list[Any], Any, list[Any], str]) -> None:
    from pipelines.engine.chunk import run_chunk

    stages, _plan, chunks, out = job
    for c in chunks:
        run_chunk(stages, c, out)


def _timed(fn: Any, jobs: list[Any]) -> float:
    """Wall seconds for `fn(job)` of every job, each job in its own forked process, all at once."""
    ctx = multiprocessing.get_context("fork")
    t = time.perf_counter()
    procs = [ctx.Process(target=fn, args=(j,)) for j in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a worker failed with exit code {p.exitcode}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--omni3d", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--chunks", type=int, default=16, help="det3d chunks (even)")
    ap.add_argument("--chunk-size", type=int, default=200, help="inputs per chunk")
    ap.add_argument("--loop", type=int, default=4_000_000, help="iterations of the reference loop per half")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)

    from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder
    from pipelines.engine.plan import make_plan

    b = make_builder(Det3dBuildConfig([a.omni3d], [], a.data_root))
    work = Path(tempfile.mkdtemp(prefix="gr3d-ceiling-"))
    plan = make_plan(b.name, b.config, b.list_inputs(b.config), work / "plan", a.chunk_size, limit=a.chunk_size * a.chunks,
                     ignore_existing=True)
    stages = [pickle.loads(pickle.dumps(s)) for s in b.stages]
    for s in stages:
        s.ensure_setup()
    chunks = [plan.chunks[i].materialized() for i in plan.todo]  # the items in memory, as a worker gets them
    half = len(chunks) // 2
    _chunks_job((stages, None, chunks[:2], str(work / "warm")))  # imports, caches
    rows = []
    try:
        for rep in range(a.repeat):
            out = work / f"r{rep}"
            row: dict[str, float] = {}
            for way in (("one", "two") if rep % 2 == 0 else ("two", "one")):
                shutil.rmtree(out, ignore_errors=True)
                if way == "one":
                    row["det3d_one_s"] = _timed(_chunks_job, [(stages, None, chunks, str(out))])
                    row["loop_one_s"] = _timed(_loop, [2 * a.loop])
                else:
                    row["det3d_two_s"] = _timed(_chunks_job, [(stages, None, chunks[:half], str(out)),
                                                              (stages, None, chunks[half:], str(out))])
                    row["loop_two_s"] = _timed(_loop, [a.loop, a.loop])
            row["det3d_ratio"] = row["det3d_one_s"] / row["det3d_two_s"]
            row["loop_ratio"] = row["loop_one_s"] / row["loop_two_s"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
    print(f"medians over {len(rows)} repetitions, {len(chunks)} chunks of {a.chunk_size} inputs, {os.cpu_count()} CPUs: "
          + json.dumps(med))
    return med


if __name__ == "__main__":
    main()
