"""The embedded Ray of a build (pipelines/engine/executors/ray_node.py), started for real in a fresh process:
no autoscaler monitor nor dashboard API server, daemons outside the driver's process group, nothing left
after `stop()`; and the plain `ray.init()` fallback when Ray's private node API is not the expected one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import psutil
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from pipelines.engine.executors import ray_node

    if sys.argv[1] == "fallback":
        ray_node._node_class = lambda: None  # as when Ray's private API changed
    lean = ray_node.start(log_to_driver=False)

    @ray.remote
    def where():
        return os.getpid(), os.getpgid(0)

    pid, pgid = ray.get(where.remote())
    kids = psutil.Process().children(recursive=True)
    cmds = []
    for p in kids:
        try:
            cmds.append((p.pid, " ".join(p.cmdline()), os.getpgid(p.pid)))
        except (psutil.Error, OSError):
            pass
    ray_node.stop()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in kids):
        time.sleep(0.1)
    left = [p.pid for p in kids if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps({"lean": lean, "worker_pgid": pgid, "driver_pgid": os.getpgrp(), "cmds": cmds, "left": left}))
""")


def _run(variant: str, tmp_path: Path) -> dict:
    script = tmp_path / "node.py"
    script.write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, str(script), variant], capture_output=True, text=True, env=env,
                         timeout=180, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lean_node_has_no_monitor_nor_api_server_and_its_own_process_group(tmp_path: Path) -> None:
    r = _run("lean", tmp_path)
    assert r["lean"] is True
    cmds = " | ".join(c for _, c, _ in r["cmds"])
    assert "gcs_server" in cmds and "raylet" in cmds, cmds
    assert "autoscaler/_private/monitor.py" not in cmds and "monitor.py" not in cmds, cmds
    assert "dashboard/dashboard.py" not in cmds, cmds
    # a group SIGTERM to the driver reaches none of Ray's daemons, agents or workers
    assert all(pg != r["driver_pgid"] for _, _, pg in r["cmds"]), r["cmds"]
    assert r["worker_pgid"] != r["driver_pgid"]
    assert r["left"] == [], r  # stop() ends every process it started


def test_plain_ray_init_when_the_private_api_is_not_the_expected_one(tmp_path: Path) -> None:
    r = _run("fallback", tmp_path)
    assert r["lean"] is False
    cmds = " | ".join(c for _, c, _ in r["cmds"])
    assert "gcs_server" in cmds and "raylet" in cmds, cmds
    assert r["left"] == [], r
