"""Ray executor (the default): plain Ray tasks per chunk, or Ray Data when a stage needs an actor pool.

CPU-only stage lists (det3d, pointmaps, most builds) run as one plain Ray task per chunk
(`_chunk_task`): the task gets the plan's encoded chunk, runs every stage and writes the shard; the
driver keeps a bounded window of tasks submitted (`_run_tasks`), so the raylet always has the next
chunk queued when a worker frees up. Streamed plan: each chunk is taken with `plan.release(i)` (its
digest recorded in plan.json first), and the next chunk's digest is computed while the driver waits on
the running ones, so the digests overlap the workers. `run_build` may have started Ray and warmed the
workers during the listing (`prestart`). A chunk is one row, so Ray Data's block machinery (a pyarrow table
per chunk, operator scheduling, the chunk state pickled into a column) only cost time there
(bench/executors.md, "Where the time went"). Each worker process keeps the stages it unpickled for the
run (keyed by a run token), so a stage's `setup()` runs once per worker process, not once per chunk.
Image bytes never pass through the object store: the workers read the images from storage.

Stage lists with a model stage (Ray Data): `from_items([{index, state}])` with one block per chunk, then one operator per
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

Cluster: `RayOptions.address` (or RAY_ADDRESS) joins an existing cluster; otherwise `ray_node.start()` starts an
embedded local Ray (a head node without the autoscaler monitor and API server) and stops it at the end. Workers write the shards themselves, so on a cluster
the build directory must be a path every node sees (shared filesystem).

Progress: workers report rows per stage to a zero-CPU progress actor, which the driver polls.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import pyarrow as pa
import ray

from pipelines.engine import reaper, setup_error
from pipelines.engine.chunk import ChunkState, Segment, load_state, run_stage, segments, write_chunk
from pipelines.engine.executors import ray_node
from pipelines.engine.options import ExecutorOptions
from pipelines.engine.plan import BuildPlan
from pipelines.engine.progress import Progress
from pipelines.engine.run import BuildError
from pipelines.engine.stage import Stage
from shards import interrupt

# Ray Data path only: tasks in flight per worker slot, each asking 1/this of the slot's CPU, so one
# computes while another waits on Ray Data's scheduling round trip between chunks (~0.1-0.3 s).
TASKS_PER_SLOT = 2
# Plain-task path: chunks submitted ahead per running task (queued in the raylet, started the moment a
# worker frees up; only the encoded chunk, ~1 KiB per input, waits in the object store).
QUEUED_PER_SLOT = 2


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
            with setup_error.reported(self.build_dir):
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
        self.failed_setup: BaseException | None = None
        try:
            for s in self.stages:
                s.ensure_setup()
        except Exception as exc:  # noqa: BLE001 - re-raised from __call__ as a task error with its message
            self.failed_setup = exc

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.failed_setup is not None:
            with setup_error.reported(self.build_dir):
                raise self.failed_setup
        return super().__call__(table)


# ------------------------------------------------------------------------------- plain-task path

_WORKER_STAGES: dict[str, list[Stage]] = {}  # run token -> this worker process's stages (latest run only)


def _worker_stages(token: str, stages_ref: list[Any]) -> list[Stage]:
    """The run's stages in this worker process: unpickled (and later set up) once per process and run."""
    stages = _WORKER_STAGES.get(token)
    if stages is None:
        _WORKER_STAGES.clear()  # a long-lived worker serves one build's stages at a time
        stages = pickle.loads(ray.get(stages_ref[0]))
        _WORKER_STAGES[token] = stages
    return stages


@ray.remote(max_retries=3)
def _chunk_task(token: str, stages_ref: list[Any], build_dir: str, chunk_blob: bytes, progress_actor: Any) -> int:
    """One chunk's whole life in one worker: decode, every stage, write the shard. Returns the index.

    `stages_ref` is a one-element list so Ray does not resolve the reference per task: the stages are
    fetched only by a worker process that does not hold them yet. A worker killed mid-chunk is retried
    (max_retries) from scratch: the writer's stats marker is written last, so a torn shard is redone.
    """
    stages = _worker_stages(token, stages_ref)
    state = load_state(chunk_blob)
    report = _reporter(progress_actor)
    with setup_error.reported(build_dir):
        for s in stages:
            run_stage(s, state, build_dir, report)
    write_chunk(state, build_dir)
    if progress_actor is not None:
        progress_actor.shard_done.remote()
    return state.index


@ray.remote(num_cpus=1)
def _warm_task(token: str, stages_ref: list[Any]) -> int:
    """Unpickle the run's stages in a worker (importing their modules) while the driver is still listing."""
    _worker_stages(token, stages_ref)
    return os.getpid()


# Ray started by `prestart` (this process owns it and must shut it down), and the run's stages already
# shipped to the workers: (token, [stages ref]).
_PRESTARTED: dict[str, Any] = {}


def prestart(ray_address: str | None, stages: Sequence[Stage]) -> None:
    """Start (or join) Ray and warm its workers, so that this start-up overlaps the driver's listing.

    `run_build` calls it while the listing runs in another thread: GCS, raylet and worker processes start
    in processes of their own, and each worker imports the stages' modules (~0.5 s CPU each) before the
    plan exists. `execute` then takes Ray over (and shuts it down if this call started it).
    """
    import uuid

    pre_guard = ExitStack()
    try:
        started = _init_ray(ray_address, pre_guard)
    except BaseException:
        pre_guard.close()
        raise
    _PRESTARTED["started"] = started or _PRESTARTED.get("started", False)
    _PRESTARTED["guard"] = pre_guard
    if not any(s.runs_on_actors for s in stages):  # the plain-task path (`_run_tasks`) will use them
        token = uuid.uuid4().hex
        stages_ref = [ray.put(pickle.dumps(list(stages), protocol=5))]
        slots = max(1, int(float(ray.cluster_resources().get("CPU", 1.0))))
        _PRESTARTED["warm"] = (token, stages_ref, [_warm_task.remote(token, stages_ref) for _ in range(slots)])


def _take_prestarted() -> tuple[bool, tuple[str, list[Any]] | None, ExitStack | None]:
    started = bool(_PRESTARTED.pop("started", False))
    warm = _PRESTARTED.pop("warm", None)
    return started, (warm[0], warm[1]) if warm else None, _PRESTARTED.pop("guard", None)


def shutdown_prestarted() -> None:
    """Shut down a Ray that `prestart` started and no `execute` took over (the build stopped before)."""
    started, _, pre_guard = _take_prestarted()
    try:
        if started and ray.is_initialized():
            ray_node.stop()
    finally:
        if pre_guard is not None:
            pre_guard.close()


def _run_tasks(stages: Sequence[Stage], plan: BuildPlan, todo: list[int], cpus: float, workers: int | None,
               pactor: Any, warm: tuple[str, list[Any]] | None = None) -> list[int]:
    """Submit one `_chunk_task` per to-do chunk, at most `window` at a time; returns the indices written.

    Each task asks the stages' declared CPUs (capped at the cluster's), so Ray runs as many at once as
    the CPUs allow. With an explicit `workers`, at most `workers` tasks are in flight (a hard cap);
    otherwise QUEUED_PER_SLOT per slot, so a freed worker never waits for the driver.
    """
    import uuid

    num_cpus = min(max(s.resources.cpus for s in stages), cpus)
    slots = max(1, int(cpus // num_cpus)) if num_cpus > 0 else max(1, int(cpus))
    window = workers if workers else QUEUED_PER_SLOT * slots
    token, stages_ref = warm or (uuid.uuid4().hex, [ray.put(pickle.dumps(list(stages), protocol=5))])
    task = _chunk_task.options(num_cpus=num_cpus)
    build_dir = str(plan.build_dir)
    pending: list[Any] = []
    written: list[int] = []
    pos = 0
    try:
        while True:
            while pos < len(todo) and len(pending) < window:
                pending.append(task.remote(token, stages_ref, build_dir,
                                           pickle.dumps(plan.release(todo[pos]), protocol=5), pactor))
                pos += 1
            if not pending:
                return written
            if pos < len(todo):  # the streamed plan: digest the next chunk now, while the workers are busy
                plan.prepare(todo[pos])
            ready, pending = ray.wait(pending, num_returns=1)
            written.extend(ray.get(ready))  # a failed chunk raises here (RayTaskError with its cause)
    except BaseException:
        for ref in pending:  # stop the rest of the build's tasks; their chunks stay to do (resume)
            ray.cancel(ref, force=False)
        raise


def _init_ray(ray_address: str | None, guard: ExitStack) -> bool:
    """Connect to Ray; returns True when this call started it (and so must shut it down).

    An embedded Ray is started inside `reaper.owned_processes()` (entered on `guard`): its processes
    are tagged and killed by a watchdog if this driver dies without shutting them down. A joined cluster
    is never guarded: its processes are not ours. Either way our SIGINT/SIGTERM handlers go back on top
    of Ray's (`interrupt.rearm`), which would otherwise print a native stack dump and exit.
    """
    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # embedded local Ray: no token file in ~/.ray
        guard.enter_context(reaper.owned_processes())
        ray_node.start(log_to_driver=True)  # no autoscaler monitor, no API server (ray_node docstring)
    interrupt.rearm()
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
    task_conc = max(1, min(TASKS_PER_SLOT * (workers or max(1, int(cpus))), n_chunks))
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


def execute(stages: Sequence[Stage], plan: BuildPlan, options: ExecutorOptions, *,
            progress: Progress | None = None, progress_token: str | None = None) -> list[int]:
    """Run the plan's to-do chunks on Ray; returns the indices written by this run.

    Plain tasks when no stage needs an actor pool (`_run_tasks`), else the Ray Data pipeline. Reads
    `options.workers` and `options.ray` (cluster address, GPUs per model actor).
    """
    guard = ExitStack()
    with guard:
        return _execute(stages, plan, guard, options, progress=progress)


def _execute(stages: Sequence[Stage], plan: BuildPlan, guard: ExitStack, options: ExecutorOptions, *,
             progress: Progress | None) -> list[int]:
    workers = options.workers
    prestarted, warm, pre_guard = _take_prestarted()
    if pre_guard is not None:  # the reaper of a Ray that `prestart` started: ours to close from now on
        guard.enter_context(pre_guard)
    started = _init_ray(options.ray.address, guard) or prestarted
    stop = threading.Event()
    poller = None
    try:
        res = ray.cluster_resources()
        cpus = float(res.get("CPU", 1.0))
        todo = list(plan.todo)
        rplan = resource_plan(stages, len(todo), cpus, float(res.get("GPU", 0.0)), workers,
                              options.ray.num_gpus)
        pactor = _ProgressActor.remote() if progress is not None and progress.enabled else None
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

        if any(rp["segment"].actors for rp in rplan):
            written = _run_dataset(rplan, plan, todo, pactor)
        else:
            written = _run_tasks(stages, plan, todo, cpus, workers, pactor, warm)
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
            ray_node.stop()  # stops this run's workers and actors (interrupted or not), then the local Ray


def _run_dataset(rplan: list[dict[str, Any]], plan: BuildPlan, todo: list[int], pactor: Any) -> list[int]:
    """The Ray Data pipeline (a model stage on an actor pool): one row and one block per chunk."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours are per stage in rows; Ray's would count chunks
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # consume Ray's one-time "progress bars disabled" warning
    ctx.print_on_execution_start = False
    # One row and one block per chunk: each chunk is an independent unit of scheduling. A row carries
    # the plan's Chunk (encoded items); the first worker decodes it (`load_state`).
    plan.release_all()  # every chunk is handed to Ray Data at once: record every digest first
    ds = ray.data.from_items(
        [{"index": i, "state": pickle.dumps(plan.chunks[i].materialized(), protocol=5), "done": ""} for i in todo],
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
    written: list[int] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        written.extend(int(i) for i in batch.column("index").to_pylist())
    return written
