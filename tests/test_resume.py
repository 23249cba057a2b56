"""Crash resume: `gr3d build` SIGKILLed midway, then re-run, ends byte-identical to an uninterrupted run,
and the re-run redoes only the chunks that were not done (at most one of them had been started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shards.layout import is_done
from tests.test_executors_toy import compared_files

ROOT = Path(__file__).resolve().parents[1]
N, CS = 48, 4  # 12 chunks
ARGS = ["--n", str(N), "--chunk-size", str(CS), "--cost-ms", "25", "--executor", "local", "--quiet"]


def _gr3d(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, GR3D_BUILDERS="tests.test_executors_toy", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "build", "toy", "--out", str(out), *ARGS, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(out: Path) -> set[int]:
    return {i for i in range(N // CS) if is_done(out, i)}


def _started(out: Path) -> set[int]:
    """Chunks with any trace of work: model intermediate or writer temp files."""
    traces = {int(p.name[:6]) for p in (out / "intermediate").rglob("*.parquet")} if (out / "intermediate").exists() \
        else set()
    traces |= {int(p.name[1:7]) for p in (out / "shards").glob(".*.tmp")} if (out / "shards").exists() else set()
    return traces


def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    p = _gr3d(ref)
    assert p.wait(timeout=120) == 0, p.stderr.read()

    victim = _gr3d(out)
    deadline = time.monotonic() + 90
    while len(_done(out)) < 3 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done_at_kill = _done(out)
    in_flight = _started(out) - done_at_kill
    assert 3 <= len(done_at_kill) < N // CS and len(in_flight) <= 1
    assert not (out / "manifest.json").exists()

    started_before = _started(out)
    rerun = _gr3d(out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    run = json.loads((out / "run.json").read_text())
    processed = set(run["chunks_processed"])
    assert processed == set(range(N // CS)) - done_at_kill  # nothing done is redone
    assert set(run["chunks_skipped_done"]) == done_at_kill
    assert processed & started_before == in_flight  # the only chunk worked on twice is the one in flight
    assert compared_files(out) == compared_files(ref)
    assert f"inputs: {N}" in stdout
