"""det3d end to end on a large Omni3D input, baseline code against candidate code, interleaved.

Each run is the real CLI in a fresh process (`python -m pipelines.cli build det3d ...`), so start-up
(imports, Ray start, Beam workers) is included, as a user sees it. `--trees NAME=DIR,...` names code
trees (a checkout of the baseline commit, e.g. `git archive BASE | tar -x -C DIR`, and this one); each
run gets `PYTHONPATH=DIR`. Per run: wall seconds, CPU seconds of the whole process tree, peak driver RSS (polled
every 0.1 s).

Tree CPU: the larger of two lower bounds, neither of which counts a process twice. (1) `RUSAGE_CHILDREN` of
this bench, made a child subreaper (`prctl(PR_SET_CHILD_SUBREAPER)`) that waits for the run's orphans: each
process's CPU exactly once, but only for processes reaped inside the tree; with Ray it catches about a third
(Ray's daemons are killed and some of their children are reaped outside the chain). (2) The sum of every
process's own CPU (user + system, not its children's) as last polled every 0.1 s over all of this bench's
descendants (the driver, Ray's GCS, raylet, agents and workers, Beam's SDK workers, inherited orphans): misses
each process's last < 0.1 s (about 1 s for Ray's ~11 processes). Each run prints both. Until 2026-12-03 the
bench added (1) to the polled CPU *including each process's reaped children*, which counted part of Ray's and
Beam's CPU twice: Ray and Beam CPU figures in bench/executors.md before "Tree CPU counted once" are too high.

Outputs are compared byte for byte with the first tree's local run. Prints medians over `--repeat` interleaved repetitions, ratios to the first tree's local run, and the
load average before every run.

Run: `.venv/bin/python -m bench.det3d_big --omni3d FILE --data-root DIR --trees base=/tmp/base,cand=.`
(make FILE with `bench.omni3d_big`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.test_executors_toy import compared_files  # what must be byte-identical, written once

_PR_SET_CHILD_SUBREAPER = 36


def _without_stats_keys(files: dict[str, bytes], keys: str) -> dict[str, bytes]:
    """`compared_files` with the top-level `keys` (comma-separated) removed from every shard stats file."""
    drop = [k for k in keys.split(",") if k]
    if not drop:
        return files
    out = dict(files)
    for name, data in files.items():
        if name.endswith(".stats.json"):
            d = json.loads(data)
            for k in drop:
                d.pop(k, None)
            out[name] = json.dumps(d, sort_keys=True).encode()
    return out


def _become_subreaper() -> bool:
    """Make this process inherit the run's orphans (Linux), so their CPU can be waited for and counted."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans(tree: set[int], timeout: float) -> None:
    """Wait for the run's processes: reap every exited child (orphans reparented to this bench) until no pid of
    `tree` (the run's descendants as polled) is still running and no child is left, or `timeout` s.

    A descendant may still be running, under a parent that is itself dying, when the driver has exited; it
    becomes this bench's child only later, so an empty child list does not mean the run is over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
            has_children = True
        except ChildProcessError:
            has_children = False
        if not has_children and not any(_running(pid) for pid in tree):
            return
        time.sleep(0.05)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def run_once(tree: str, args: list[str]) -> tuple[float, float, float, str]:
    """(wall s, tree CPU s, driver peak RSS MiB, stdout) of one CLI run with PYTHONPATH=tree."""
    env = {**os.environ, "PYTHONPATH": tree, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    wrapper = ("import resource, runpy, sys; sys.argv = ['gr3d'] + sys.argv[1:]\n"
               "try:\n    runpy.run_module('pipelines.cli', run_name='__main__')\n"
               "finally:\n    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    import psutil

    subreaper = _become_subreaper()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tree)
    seen: dict[int, float] = {}  # pid -> its own CPU seconds as last polled, every process under this bench
    peak = [0]  # the driver's RSS, polled: its ru_maxrss starts at this bench's own RSS when it is forked
    stop = threading.Event()
    me = psutil.Process()

    def poll() -> None:
        while not stop.wait(0.1):
            if subreaper:  # reap orphans as they exit: an unreaped zombie still "exists" to whoever waits on it
                for k in me.children():
                    if k.pid != proc.pid:
                        try:
                            os.waitpid(k.pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
            try:
                peak[0] = max(peak[0], psutil.Process(proc.pid).memory_info().rss)
            except psutil.Error:
                pass
            for k in me.children(recursive=True):  # the driver, its descendants and the orphans we inherited
                try:
                    t = k.cpu_times()
                    seen[k.pid] = max(seen.get(k.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    pass

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if subreaper:
        _reap_orphans(set(seen), timeout=30.0)
    stop.set()
    th.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {args}: rc {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}")
    # Two lower bounds of the tree's CPU, neither counting a process twice: the rusage of every process reaped
    # in the tree (exact for each; complete when the subreaper caught every orphan), and the sum of every
    # process's own CPU as last polled (misses each process's last < 0.1 s). The larger is reported.
    reaped = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    polled = sum(seen.values())
    cpu = max(reaped, polled)
    print(f"  CPU s: reaped {reaped:.2f}, polled {polled:.2f} ({len(seen)} processes)", file=sys.stderr, flush=True)
    p = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    # ru_maxrss of the driver is not used: a forked child's high-water mark starts at the parent's RSS (this
    # bench holds the reference build's bytes), which inflated every later run's figure.
    rss = peak[0] / 2**20
    return wall, cpu, rss, p.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--omni3d", required=True, nargs="+")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--trees", required=True, help="NAME=DIR,NAME=DIR (the first is the baseline)")
    ap.add_argument("--executors", default="local,ray,beam")
    ap.add_argument("--dry-run-too", action="store_true", help="also time `--dry-run` (listing + plan)")
    ap.add_argument("--chunk-size", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stats-ignore", default="", help="KEY,... left out of the shard stats files when comparing "
                    "outputs: for trees of which one adds a stats entry (e.g. `features`); every other byte compared")
    a = ap.parse_args(argv)
    trees = [(t.split("=", 1)[0], str(Path(t.split("=", 1)[1]).resolve())) for t in a.trees.split(",")]
    execs = [e for e in a.executors.split(",") if e] + (["dry-run"] if a.dry_run_too else [])
    tmp = Path(tempfile.mkdtemp(prefix="gr3d-bench-big-"))
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    same: dict[tuple[str, str], bool] = {}
    ref: dict[str, bytes] | None = None
    n = None
    try:
        for rep in range(a.repeat):
            for ex in execs:
                for name, tree in trees:
                    out = tmp / f"{name}-{ex}"
                    shutil.rmtree(out, ignore_errors=True)
                    cli = ["build", "det3d", "--omni3d", *a.omni3d, "--data-root", a.data_root, "--out", str(out),
                           "--chunk-size", str(a.chunk_size), "--quiet"]
                    if ex == "dry-run":
                        cli += ["--dry-run"]
                    else:
                        cli += ["--executor", ex] + (["--workers", str(a.workers)] if ex != "local" else [])
                    load = os.getloadavg()[0]
                    wall, cpu, rss, stdout = run_once(tree, cli)
                    rows.setdefault((name, ex), []).append((wall, cpu, rss))
                    if ex != "dry-run":
                        got = _without_stats_keys(compared_files(out, with_plan=True), a.stats_ignore)
                        if ref is None:
                            ref = got
                            n = json.loads((out / "manifest.json").read_text())["totals"]["n_input"]
                        same[(name, ex)] = same.get((name, ex), True) and got == ref
                        shutil.rmtree(out, ignore_errors=True)
                    print(f"rep {rep} {name:6s} {ex:8s} {wall:7.2f} s wall {cpu:7.2f} s CPU  peak RSS {rss:6.0f} MiB"
                          f"  load before {load:.2f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base_local = statistics.median(w for w, _, _ in rows[(trees[0][0], "local")]) if (trees[0][0], "local") in rows else None
    print(f"\ninputs {n}  chunk {a.chunk_size}  workers {a.workers}  cpus {os.cpu_count()}  "
          f"loadavg now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| tree | executor | median wall s | vs baseline local | samples/s | median CPU s | samples per CPU-s "
          "| peak driver RSS MiB | output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, ex), rs in rows.items():
        w = statistics.median(r[0] for r in rs)
        c = statistics.median(r[1] for r in rs)
        m = statistics.median(r[2] for r in rs)
        ratio = f"{base_local / w:.2f}x" if base_local and ex != "dry-run" else "-"
        rate = f"{n / w:.0f}" if n else "-"
        cr = f"{n / c:.0f}" if n else "-"
        if ex == "dry-run" and n:  # the driver's figure: ms per input, start-up included
            cr = f"{1e3 * c / n:.3f} ms CPU/input, {1e3 * w / n:.3f} ms wall/input"
        o = "-" if ex == "dry-run" else ("identical" if same.get((name, ex)) else "DIFFERENT")
        print(f"| {name} | {ex} | {w:.2f} | {ratio} | {rate} | {c:.2f} | {cr} | {m:.0f} | {o} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
