"""Executor overhead: samples/s of the Ray and Beam executors against the plain in-process loop.

The workload is the tests' toy builder with a CPU stage of realistic cost: `Render` burns `--cost-ms`
of CPU per sample holding the GIL (so threads cannot help; only processes can), then a tiny PNG, a
score and a `cot` record written to real shards. Two pipelines:
- `cpu`: CPU stages only (Ray fuses them into one task per chunk);
- `model`: the same plus the toy "model" stage on an actor pool (a second operator, chunk states
  crossing process boundaries).
Every executor's output is checked byte-identical to the loop's before its rate is reported.

Run: `.venv/bin/python -m bench.executors [--n 2000 --cost-ms 5 --chunk-size 50 --workers 2]`.
Ray is started once before timing (its ~3 s start-up is reported apart); Beam's SDK worker processes
start inside the timed run, as they do in every real run.
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


def _run(builder: Any, out: Path, executor: str, chunk_size: int, workers: int) -> tuple[float, float]:
    """(wall seconds of the whole build, steady-state samples/s).

    Steady state: inputs of the shards completed after the first one, divided by the time between the
    first and the last completion (stats-file mtimes), i.e. the rate once start-up costs are paid.
    """
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.run import run_build

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_build(builder, out,
              BuildOptions.on(executor, chunk_size=chunk_size, workers=workers, show_progress=False))
    secs = time.perf_counter() - t0
    done = sorted((p.stat().st_mtime, json.loads(p.read_text())["n_input"])
                  for p in (out / "shards").glob("*.stats.json"))
    span = done[-1][0] - done[0][0]
    steady = sum(n for _, n in done[1:]) / span if len(done) > 1 and span > 0 else float("nan")
    return secs, steady


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--cost-ms", type=float, default=5.0)
    ap.add_argument("--chunk-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pipelines", default="cpu,model")
    ap.add_argument("--executors", default="local,ray,beam")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; the best time counts")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from tests.test_executors_toy import compared_files, toy_builder

    tmp = Path(tempfile.mkdtemp(prefix="gr3d-bench-"))
    ray_started = False
    rows = []
    try:
        executors = args.executors.split(",")
        if "ray" in executors:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ray_started = True
            print(f"ray.init: {time.perf_counter() - t0:.2f} s")
        for pipe in args.pipelines.split(","):
            builder = toy_builder(args.n, fail_mod=0, cost_ms=args.cost_ms, with_model=(pipe == "model"))
            times: dict[str, list[float]] = {ex: [] for ex in executors}
            steadies: dict[str, list[float]] = {ex: [] for ex in executors}
            outputs: dict[str, dict[str, bytes]] = {}
            for rep in range(args.repeat):  # interleaved, so a burst of load from elsewhere hits all alike
                for ex in executors:
                    out = tmp / f"{pipe}-{ex}"
                    secs, steady = _run(builder, out, ex, args.chunk_size, args.workers)
                    times[ex].append(secs)
                    steadies[ex].append(steady)
                    outputs[ex] = compared_files(out)
                    print(f"{pipe:6s} {ex:6s} rep {rep}: {secs:7.2f} s  {args.n / secs:8.1f} samples/s "
                          f"steady {steady:8.1f}/s  loadavg {os.getloadavg()[0]:.2f}", flush=True)
            base = min(times["local"]) if "local" in times else float("nan")
            base_steady = max(steadies["local"]) if "local" in times else float("nan")
            for ex in executors:
                best, med, st = min(times[ex]), statistics.median(times[ex]), max(steadies[ex])
                diff = sorted(k for k in outputs[ex] if outputs.get("local", {}).get(k) != outputs[ex][k])
                same = "reference" if ex == "local" else ("identical" if not diff else f"DIFFERENT: {diff[:4]}")
                rows.append((pipe, ex, best, med, args.n / best, base / best, st, st / base_steady, same))
    finally:
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nn={args.n} cost={args.cost_ms} ms/sample chunk={args.chunk_size} workers={args.workers} "
          f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}")
    print("| pipeline | executor | best s | median s | samples/s (best) | vs loop | steady samples/s | vs loop "
          "| output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pipe, ex, best, med, rate, ratio, st, st_ratio, same in rows:
        print(f"| {pipe} | {ex} | {best:.2f} | {med:.2f} | {rate:.1f} | {ratio:.2f}x | {st:.1f} | {st_ratio:.2f}x "
              f"| {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
