"""What an embedded Ray costs a build before and after its chunks: `ray.init()` against `ray_node.start()`.

Each repetition runs one variant in a fresh process: start Ray, run one warm-up task per CPU (importing the
det3d stages, as `ray_executor.prestart` does), stay idle `--idle` seconds (the agents' steady cost), stop.
Prints the wall time of start, warm-up and stop, the driver's CPU and every other process's CPU by name
(polled every 0.1 s with psutil), variants interleaved.

- `ray.init`: `ray.init(include_dashboard=False)` + `ray.shutdown()` (what builds did before).
- `ray_node`: `pipelines.engine.executors.ray_node.start()` + `stop()` (no autoscaler monitor, no API server,
  no graceful waits at the end).

Run: `.venv/bin/python -m bench.ray_start --repeat 3`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def one(variant: str, idle: float) -> dict[str, object]:
    import psutil

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpu: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    me = psutil.Process()

    def poll() -> None:
        while not stop.is_set():
            for p in me.children(recursive=True):
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = (p.name()[:24], t.user + t.system)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    c0, t0 = time.process_time(), time.perf_counter()
    import ray

    from pipelines.engine.executors import ray_node

    if variant == "ray.init":
        ray.init(include_dashboard=False)
    else:
        ray_node.start()
    t_start = time.perf_counter() - t0

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import pipelines.corpora.det3d.builder  # noqa: F401 - what the warm-up task imports

        return os.getpid()

    ray.get([warm.remote() for _ in range(int(ray.cluster_resources().get("CPU", 1)))])
    t_warm = time.perf_counter() - t0
    time.sleep(idle)
    t1 = time.perf_counter()
    if variant == "ray.init":
        ray.shutdown()
    else:
        ray_node.stop()
    t_stop = time.perf_counter() - t1
    time.sleep(1.0)
    stop.set()
    th.join()
    by: dict[str, float] = {}
    for name, c in cpu.values():
        by[name] = by.get(name, 0.0) + c
    return {"variant": variant, "start_s": round(t_start, 2), "warm_s": round(t_warm, 2), "stop_s": round(t_stop, 2),
            "driver_cpu_s": round(time.process_time() - c0, 2), "others_cpu_s": round(sum(by.values()), 2),
            "by_process": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--idle", type=float, default=8.0, help="seconds between the warm-up and the stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.idle)))
        return
    rows: dict[str, list[dict[str, object]]] = {}
    for rep in range(a.repeat):
        for v in ("ray.init", "ray_node"):
            out = subprocess.run([sys.executable, "-m", "bench.ray_start", "--one", v, "--idle", str(a.idle)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            rows.setdefault(v, []).append(r)
            print(f"rep {rep} {json.dumps(r)}", flush=True)
    print("\n| variant | start s | start + warm-up s | stop s | driver CPU s | other processes CPU s |")
    print("|---|---|---|---|---|---|")
    for v, rs in rows.items():
        med = {k: statistics.median(float(r[k]) for r in rs)  # type: ignore[arg-type]
               for k in ("start_s", "warm_s", "stop_s", "driver_cpu_s", "others_cpu_s")}
        print(f"| {v} | {med['start_s']:.2f} | {med['warm_s']:.2f} | {med['stop_s']:.2f} | {med['driver_cpu_s']:.2f} "
              f"| {med['others_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
