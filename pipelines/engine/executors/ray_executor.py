"""Ray executor (the default): Ray Data streaming over chunks, one row per chunk.

Dataset shape: `from_items([{index, state}])` with one block per chunk, then one operator per
*segment* of the stage list:
- consecutive CPU stages are fused into one `map_batches` of plain Ray tasks (a task runs every stage of
  the segment on its chunk; stage setup is per task, so CPU stages must set up cheaply);
- a model stage (`is_model` or `resources.gpus > 0`) gets its own `map_batches` on an actor pool
  (`ActorPoolStrategy(size=workers)`, `num_gpus`), so `setup()` loads the model once per actor;
- the shard is written by the last CPU segment (or a final write task when the last stage is a model).
`state` is the pickled plan `Chunk` (encoded items) on the first hop, then the pickled `ChunkState`:
items, rejects and counts travel with the chunk between operators.

No deadlock on small machines: actors hold their CPUs for the whole run, so actor and task CPU requests
are scaled down to fractions such that the actor pools plus at least one task always fit in the
cluster's CPUs (docs/formats.md, "Environment notes": 2 actors with 1 CPU each starve the read step forever on 2 cores).

Cluster: `ray_address` (or RAY_ADDRESS) joins an existing cluster; otherwise `ray.init()` starts an
embedded local Ray and shuts it down at the end. Workers write the shards themselves, so on a cluster
the build directory must be a path every node sees (shared filesystem).

Progress: workers report rows per stage to a zero-CPU progress actor, which the driver polls.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import ray

from pipelines.engine.chunk import ChunkState, Segment, load_state, run_stage, segments, write_chunk
from pipelines.engine.plan import BuildPlan
from pipelines.engine.progress import Progress
from pipelines.engine.run import BuildError
from pipelines.engine.stage import Stage

TASK_OVERSUBSCRIPTION = int(os.environ.get("GR3D_RAY_TASK_OVERSUB", "2"))


@ray.remote(num_cpus=0)
class _ProgressActor:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.shards = 0

    def update(self, stage: str, n: int) -> None:
        self.counts[stage] = self.counts.get(stage, 0) + n

    def shard_done(self) -> None:
        self.shards += 1

    def snapshot(self) -> tuple[dict[str, int], int]:
        return dict(self.counts), self.shards


def _reporter(actor: Any):
    if actor is None:
        return None

    def report(stage: str, n: int) -> None:
        actor.update.remote(stage, n)

    return report


def _rows(table: pa.Table) -> list[tuple[int, ChunkState]]:
    return [(int(i), load_state(s)) for i, s in zip(table.column("index").to_pylist(),
                                                      table.column("state").to_pylist())]


def _table(states: list[tuple[int, ChunkState | None, str]]) -> pa.Table:
    return pa.table({
        "index": pa.array([i for i, _, _ in states], pa.int64()),
        "state": pa.array([pickle.dumps(st, protocol=5) if st is not None else b"" for _, st, _ in states],
                          pa.large_binary()),
        "done": pa.array([d for _, _, d in states], pa.string()),
    })


class _SegmentFn:
    """Runs a segment's stages on each chunk of a batch; writes the shard when it is the last segment."""

    def __init__(self, stages: list[Stage], build_dir: str, write: bool, progress_actor: Any):
        self.stages = stages
        self.build_dir = build_dir
        self.write = write
        self.progress_actor = progress_actor
        self.report = _reporter(progress_actor)

    def __call__(self, table: pa.Table) -> pa.Table:
        out = []
        for index, state in _rows(table):
            for s in self.stages:
                run_stage(s, state, self.build_dir, self.report)
            if self.write:
                write_chunk(state, self.build_dir)
                if self.progress_actor is not None:
                    self.progress_actor.shard_done.remote()
                out.append((index, None, "written"))
            else:
                out.append((index, state, ""))
        return _table(out)


class _ActorSegment(_SegmentFn):
    """The actor-pool flavour: stage setup once per actor (a setup failure fails the first task cleanly)."""

    def __init__(self, stages: list[Stage], build_dir: str, write: bool, progress_actor: Any):
        super().__init__(stages, build_dir, write, progress_actor)
        self.setup_error: BaseException | None = None
        try:
            for s in self.stages:
                s.ensure_setup()
        except Exception as exc:  # noqa: BLE001 - re-raised from __call__ as a task error with its message
            self.setup_error = exc

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.setup_error is not None:
            raise self.setup_error
        return super().__call__(table)


def _init_ray(ray_address: str | None) -> bool:
    """Connect to Ray; returns True when this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded local Ray: no token file in ~/.ray
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def resource_plan(stages: Sequence[Stage], n_chunks: int, cpus: float, gpus: float, workers: int | None,
                  num_gpus: float | None) -> list[dict[str, Any]]:
    """Per segment: actor-pool size, num_cpus, num_gpus; sized so the pools never starve the tasks.

    Actor segments take `min(declared cpus, C / (size * (n_actor_segments + 1)))` each, which leaves at
    least a share of the cluster's C CPUs for task segments; tasks take `min(declared, free / tasks)`.
    Explicit `workers` caps both pool sizes and task concurrency.
    """
    segs = segments(stages)
    n_actor = sum(s.actors for s in segs)
    plans: list[dict[str, Any]] = []
    actor_cpus_total = 0.0
    for seg in segs:
        if not seg.actors:
            continue
        st = seg.stages[0]
        g = st.resources.gpus if num_gpus is None else num_gpus
        if g > 0:
            if gpus < g:
                raise BuildError(f"stage {st.name!r} needs {g} GPU(s) per worker but the Ray cluster has {gpus}; "
                                   "pass --num-gpus 0 to run it on CPU")
            size = workers or max(1, int(gpus // g))
        else:
            size = workers or max(1, int(cpus))
        size = max(1, min(size, n_chunks))
        c = min(st.resources.cpus, cpus / (size * (n_actor + 1)))
        actor_cpus_total += c * size
        plans.append({"segment": seg, "size": size, "num_cpus": round(max(c, 0.01), 4), "num_gpus": g})
    free = max(cpus - actor_cpus_total, 0.01)
    # Two tasks in flight per worker slot, each asking half the CPU: while one waits on Ray's scheduling
    # round trip between chunks (~0.1-0.3 s, more under load), the other computes.
    task_conc = max(1, min(TASK_OVERSUBSCRIPTION * (workers or max(1, int(cpus))), n_chunks))
    out = []
    it = iter(plans)
    for seg in segs:
        if seg.actors:
            out.append(next(it))
        else:
            declared = max(s.resources.cpus for s in seg.stages)
            c = min(declared, free / task_conc) if n_actor else min(declared, cpus / task_conc)
            out.append({"segment": seg, "size": task_conc, "num_cpus": round(max(c, 0.01), 4), "num_gpus": 0})
    return out


def execute(stages: Sequence[Stage], plan: BuildPlan, *, progress: Progress | None = None, workers: int | None = None,
            ray_address: str | None = None, num_gpus: float | None = None, **_ignored: Any) -> list[int]:
    """Run the plan's to-do chunks on Ray Data; returns the indices written by this run."""
    started = _init_ray(ray_address)
    stop = threading.Event()
    poller = None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours are per stage in rows; Ray's would count chunks
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # consume Ray's one-time "progress bars disabled" warning
        ctx.print_on_execution_start = False
        res = ray.cluster_resources()
        todo = list(plan.todo)
        rplan = resource_plan(stages, len(todo), float(res.get("CPU", 1.0)), float(res.get("GPU", 0.0)),
                              workers, num_gpus)
        pactor = _ProgressActor.remote() if progress is not None and progress.enabled else None

        # One row and one block per chunk: each chunk is an independent unit of scheduling. A row carries
        # the plan's Chunk (encoded items); the first worker decodes it (`load_state`).
        ds = ray.data.from_items(
            [{"index": i, "state": pickle.dumps(plan.chunks[i], protocol=5), "done": ""} for i in todo],
            override_num_blocks=len(todo))
        build_dir = str(plan.build_dir)
        last = len(rplan) - 1
        for k, rp in enumerate(rplan):
            seg: Segment = rp["segment"]
            write = k == last and not seg.actors
            if seg.actors:
                ds = ds.map_batches(_ActorSegment, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                                    compute=ray.data.ActorPoolStrategy(size=rp["size"]),
                                    fn_constructor_kwargs={"stages": seg.stages, "build_dir": build_dir,
                                                           "write": write, "progress_actor": pactor},
                                    num_cpus=rp["num_cpus"], num_gpus=rp["num_gpus"] or None)
            else:
                ds = ds.map_batches(_SegmentFn(seg.stages, build_dir, write, pactor), batch_size=1,
                                    batch_format="pyarrow", zero_copy_batch=True,
                                    compute=ray.data.TaskPoolStrategy(size=rp["size"]), num_cpus=rp["num_cpus"])
        if rplan[last]["segment"].actors:  # the last stage is a model: write the shards in plain tasks
            ds = ds.map_batches(_SegmentFn([], build_dir, True, pactor), batch_size=1, batch_format="pyarrow",
                                zero_copy_batch=True, num_cpus=min(rplan[last]["num_cpus"], 0.5))

        if pactor is not None and progress is not None:
            def poll() -> None:
                while not stop.wait(min(progress.interval, 1.0)):
                    try:
                        counts, shards = ray.get(pactor.snapshot.remote(), timeout=30)
                    except Exception:  # noqa: BLE001 - progress is best effort
                        continue
                    progress.set_counts(counts, shards)

            poller = threading.Thread(target=poll, name="gr3d-progress", daemon=True)
            poller.start()

        written: list[int] = []
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            written.extend(int(i) for i in batch.column("index").to_pylist())
        stop.set()
        if poller is not None:
            poller.join()
        if pactor is not None and progress is not None:
            counts, shards = ray.get(pactor.snapshot.remote())
            progress.set_counts(counts, shards)
        return written
    finally:
        stop.set()
        if started:
            ray.shutdown()
