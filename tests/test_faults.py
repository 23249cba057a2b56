"""Faults: a build survives them and still writes the same bytes.

On a real two-node Ray cluster (`tests/ray_cluster.py`), drivers as subprocesses joined with
`--ray-address`:
- a Ray worker process SIGKILLed in the middle of a CPU stage: Ray retries the task (a fresh worker
  process redoes the whole chunk) and the build is byte-identical to a clean run;
- the model stage's actor SIGKILLed in the middle of a chunk: Ray Data restarts the actor
  (`max_restarts=-1`) and retries the chunk on it (`max_task_retries=-1`); byte-identical again;
- the driver SIGKILLed mid-run: its job dies with it; re-running the command resumes byte-identical.
And the driver SIGKILLed at five seeded random points of a plain-loop build (a Ray driver costs
~10 s of start-up on this shared 2-core box; the plain loop ~2 s): each re-run ends byte-identical,
redoing only chunks that were not done.

The faults are real: the stages kill their own process with SIGKILL (no exception, no cleanup), once,
claimed through a marker file created with O_EXCL (so the retry, in another process, passes), and the
driver is a subprocess killed with SIGKILL. The builder `faulty` is the toy builder of
`tests/test_executors_toy.py` plus those kill switches; the switches stay out of the builder config, so
the clean reference (the plain loop, in this process) has the same manifest.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.engine.build_cli import register_builder
from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import Builder, remove_build_outputs
from pipelines.engine.run import run_build
from pipelines.engine.stage import Item, Reject, Resources, Stage
from shards.layout import is_done
from shards.verify import verify_build
from tests.ray_cluster import RayCluster, finish, gr3d_subprocess, ray_cluster, reap_drivers
from tests.test_executors_toy import Finalize, Render, ToyModel, _Score, compared_files, toy_inputs

N, CS = 48, 8  # 6 chunks of 8 inputs
FAIL_MOD = 7   # Render rejects values % 7 == 1: chunk 1 (s00008..s00015) reaches the model as s00009..s00014
CPU_VICTIM = "toy/s00019"    # chunk 2, mid-stage: Render has run on the chunk, the later stages have not
MODEL_VICTIM = "toy/s00013"  # chunk 1, in the model's 2nd batch of 4: its 1st batch (s00009..s00012) is done
BUILDER_ENV = {"GR3D_BUILDERS": "tests.test_faults"}

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def claim_once(marker: str) -> bool:
    """Create `marker` (holding this pid) if it does not exist yet: True for exactly one caller, ever."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
        fh.flush()
        os.fsync(fh.fileno())
    return True


def die_once(batch: list[Item], victim: str | None, marker: str | None) -> None:
    """SIGKILL this process the first time (across all processes) a batch holding `victim` arrives."""
    if victim and marker and any(it["key"] == victim for it in batch) and claim_once(marker):
        os.kill(os.getpid(), signal.SIGKILL)


class KillOnce(Stage):
    """CPU stage that passes items through, and kills its worker process once on the victim key."""

    name = "kill_once"
    batch_size = 4
    resources = Resources(cpus=1)

    def __init__(self, victim: str | None = None, marker: str | None = None):
        self.victim = victim
        self.marker = marker

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        die_once(batch, self.victim, self.marker)
        return [dict(it) for it in batch], []


class DyingModel(ToyModel):
    """The toy model stage (actor pool, persisted intermediate) that kills its actor once on the victim key."""

    batch_size = 4

    def __init__(self, victim: str | None = None, marker: str | None = None, calls_dir: str | None = None):
        super().__init__(calls_dir=calls_dir)
        self.victim = victim
        self.marker = marker

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        die_once(batch, self.victim, self.marker)
        return super().process(batch)


def faulty_builder(n: int = N, *, with_model: bool = True, kill_cpu: str | None = None, kill_model: str | None = None,
                   marker_dir: str | None = None, calls_dir: str | None = None, cost_ms: float = 0.0) -> Builder:
    """Render -> KillOnce -> DyingModel (or a CPU score) -> Finalize.

    The kill switches and the CPU cost per sample change no output, so they stay out of the config.
    """
    def marker(kind: str) -> str | None:
        return os.path.join(marker_dir, f"{kind}.killed") if marker_dir else None

    stages: list[Stage] = [Render(cost_ms=cost_ms, fail_mod=FAIL_MOD), KillOnce(kill_cpu, marker("cpu"))]
    stages.append(DyingModel(kill_model, marker("model"), calls_dir) if with_model else _Score())
    stages.append(Finalize())
    return Builder("faulty", {"n": n, "fail_mod": FAIL_MOD, "with_model": with_model}, toy_inputs, stages)


def _add_arguments(p: Any) -> None:
    p.add_argument("--n", type=int, default=N)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--kill-cpu", default=None, help="key whose first CPU-stage batch SIGKILLs its worker")
    p.add_argument("--kill-model", default=None, help="key whose first model batch SIGKILLs its actor")
    p.add_argument("--marker-dir", default=None)
    p.add_argument("--calls-dir", default=None)
    p.add_argument("--cost-ms", type=float, default=0.0, help="CPU time per sample in Render")


def _make(args: Any) -> Builder:
    return faulty_builder(args.n, with_model=not args.no_model, kill_cpu=args.kill_cpu, kill_model=args.kill_model,
                          marker_dir=args.marker_dir, calls_dir=args.calls_dir, cost_ms=args.cost_ms)


register_builder("faulty", _make, help="toy builder with kill switches (fault tests)", add_arguments=_add_arguments)


# --- helpers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """One two-node cluster for the module; torn down (and checked gone) after."""
    with ray_cluster() as c:
        yield c


def _build(cluster: RayCluster, out: Path, *extra: str) -> Any:
    """`gr3d build faulty` as a driver subprocess joined to the cluster (not yet waited on)."""
    return cluster.driver("build", "faulty", "--out", str(out), "--chunk-size", str(CS), "--quiet",
                          "--ray-address", cluster.address, *extra, **BUILDER_ENV)


def _finish(proc: Any) -> str:
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-4000:]
    return stdout


@pytest.fixture(autouse=True)
def _no_stray_drivers() -> Iterator[None]:
    """A test that fails while a driver runs must not leave it running."""
    yield
    reap_drivers()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _temp_files(build_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(build_dir)) for p in build_dir.rglob("*.tmp"))


def _chunk_pid(build_dir: Path, index: int) -> int:
    return int(json.loads((build_dir / "shards" / f"{index:06d}.stats.json").read_text())["timing"]["pid"])


def _assert_identical(out: Path, ref: Path) -> None:
    got, want = compared_files(out), compared_files(ref)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert not [str(p) for p in verify_build(out)]


# --- the faults --------------------------------------------------------------------------------------

def test_worker_sigkilled_mid_stage_is_retried_byte_identical(cluster: RayCluster, tmp_path: Path) -> None:
    ref, out, markers = tmp_path / "ref", tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    run_build(faulty_builder(with_model=False), ref,
              BuildOptions.on("local", chunk_size=CS, show_progress=False))

    _finish(_build(cluster, out, "--no-model", "--kill-cpu", CPU_VICTIM, "--marker-dir", str(markers)))
    killed = int((markers / "cpu.killed").read_text())
    assert cluster.node_of_pid(killed) in ("head", "worker")  # a Ray worker process of the cluster died...
    assert not _alive(killed)
    assert _chunk_pid(out, 2) != killed  # ...and another worker process redid its chunk and wrote it
    run = json.loads((out / "run.json").read_text())
    assert run["chunks_processed"] == list(range(N // CS))
    _assert_identical(out, ref)
    assert _temp_files(out) == []


def test_model_actor_killed_mid_chunk_is_restarted_and_chunk_redone(cluster: RayCluster, tmp_path: Path) -> None:
    ref, out, markers, calls = tmp_path / "ref", tmp_path / "out", tmp_path / "markers", tmp_path / "calls"
    markers.mkdir()
    calls.mkdir()
    run_build(faulty_builder(), ref, BuildOptions.on("local", chunk_size=CS, show_progress=False))

    _finish(_build(cluster, out, "--kill-model", MODEL_VICTIM, "--marker-dir", str(markers),
                   "--calls-dir", str(calls)))
    killed = int((markers / "model.killed").read_text())
    assert cluster.node_of_pid(killed) in ("head", "worker") and not _alive(killed)
    # The model's call log per process: the killed actor had done the chunk's first batch, never its second;
    # a later actor process redid the whole chunk.
    log = {int(p.stem): p.read_text().split() for p in calls.glob("*.log")}
    first = ["toy/s00009", "toy/s00010", "toy/s00011", "toy/s00012"]
    assert log[killed][-4:] == first and MODEL_VICTIM not in log[killed]
    redone = [pid for pid, keys in log.items() if pid != killed and MODEL_VICTIM in keys]
    assert len(redone) == 1 and set(first) <= set(log[redone[0]])
    assert sum(keys.count(MODEL_VICTIM) for keys in log.values()) == 1  # the model ran it once, after the restart
    # Ray restarted the dead model actor (Ray Data's max_restarts=-1), once: no other actor of this module's
    # jobs ever restarts (a killed driver's actors die with its job).
    restarts = cluster.actor_restarts()
    model_actors = {k: v for k, v in restarts.items() if "_ActorSegment" in k}
    assert model_actors and sorted(v for v in model_actors.values() if v) == [1], restarts
    inter = "intermediate/dying_model/000001.parquet"
    assert (out / inter).read_bytes() == (ref / inter).read_bytes()
    _assert_identical(out, ref)
    assert _temp_files(out) == []


def _kill_after(proc: Any, delay: float) -> None:
    """SIGKILL `proc` after `delay` s (or as soon as it ends on its own, which the caller then sees)."""
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _local_driver(out: Path) -> Any:
    """`gr3d build faulty` on the plain loop as a subprocess (no Ray: ~2 s, so five trials stay cheap)."""
    return gr3d_subprocess("build", "faulty", "--out", str(out), "--chunk-size", str(CS), "--cost-ms", "25",
                           "--executor", "local", "--quiet", **BUILDER_ENV)


def _check_resumed(out: Path, ref: Path, done_at_kill: set[int], stdout: str) -> None:
    """The re-run skipped every chunk done at the kill, did the rest, and wrote the reference's bytes."""
    run = json.loads((out / "run.json").read_text())
    skipped, processed = set(run["chunks_skipped_done"]), set(run["chunks_processed"])
    assert done_at_kill <= skipped and not skipped & processed
    assert skipped | processed == set(range(N // CS))
    assert f"inputs: {N}" in stdout
    _assert_identical(out, ref)
    assert _temp_files(out) == []


def _kill_when_done(proc: Any, out: Path, min_done: int, extra: float) -> None:
    """SIGKILL `proc` `extra` s after `min_done` shards exist (or at once if it ended on its own).

    Kill points keyed to progress, not to a wall-clock fraction of a reference run, so a loaded machine
    (a slow reference, a fast victim, or the reverse) cannot make the kill miss the run.
    """
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(is_done(out, i) for i in range(N // CS)) >= min_done:
            break
        time.sleep(0.01)
    _kill_after(proc, extra)


def test_driver_sigkilled_at_random_points_then_resumed_is_byte_identical(tmp_path: Path) -> None:
    """Five seeded random kill points over the run (start-up, model calls, shard writes)."""
    ref = tmp_path / "ref"
    _finish(_local_driver(ref))
    rng = random.Random(20261124)
    done_counts = []
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        # Trial 0 dies in start-up; trial k >= 1 dies at a random moment after k - 1 shards are written,
        # so the five points spread over start-up, chunks and writes.
        for attempt in range(4):
            victim = _local_driver(out)
            if trial == 0:
                _kill_after(victim, rng.uniform(0.05, 0.5) / (attempt + 1))
            else:
                _kill_when_done(victim, out, trial - 1, rng.uniform(0.0, 0.15) / (attempt + 1))
            if victim.returncode == -signal.SIGKILL:
                break
            remove_build_outputs(out)  # it finished before the kill point: try that trial again, sooner
        assert victim.returncode == -signal.SIGKILL, f"trial {trial}: the build always ended before the kill"
        assert not (out / "manifest.json").exists()
        done = {i for i in range(N // CS) if is_done(out, i)}
        done_counts.append(len(done))
        _check_resumed(out, ref, done, _finish(_local_driver(out)))
    assert len(set(done_counts)) >= 2, done_counts  # the kills landed at different points of the build


def test_driver_sigkilled_on_cluster_mid_run_then_resumed_is_byte_identical(cluster: RayCluster,
                                                                            tmp_path: Path) -> None:
    """The Ray flavour: the killed driver's job (its tasks, its model actors) dies with it on the cluster,
    and the re-run, a new job, resumes from the shards and model intermediates already written."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_build(faulty_builder(), ref, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    victim = _build(cluster, out)
    deadline = time.monotonic() + 120
    while victim.poll() is None and time.monotonic() < deadline and not any(is_done(out, i) for i in range(N // CS)):
        time.sleep(0.05)  # kill right after the first shard is written: mid-run, model actors busy
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    done = {i for i in range(N // CS) if is_done(out, i)}
    assert 1 <= len(done) < N // CS
    _check_resumed(out, ref, done, _finish(_build(cluster, out)))
