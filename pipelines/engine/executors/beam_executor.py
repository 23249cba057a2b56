"""Beam executor: the same stages as DoFns, one element per chunk.

Pipeline: `Create([index])` (Create already ends in a Reshuffle that spreads the chunks over the workers;
a second, explicit one only copied every chunk through the runner once more) -> `ReadChunk` (the worker
reads the chunk's encoded inputs from `BUILD/.chunk_inputs/`, written by the driver just before the run)
-> one `ParDo` per
segment (runs of CPU stages fused into one DoFn; each model stage its own DoFn, with `setup()` in
`DoFn.setup`, so a model loads once per DoFn instance) -> the last DoFn writes shard i with the
shared chunk runner. Shards are written by the workers, so the output bytes equal the other executors'.

Runners:
- default (no `--runner` in `BeamOptions.args`, or DirectRunner): `FnApiRunner` in this process's control,
  never the Prism download that DirectRunner tries first (docs/formats.md, "Environment notes"). With more than one worker it
  uses `direct_running_mode=multi_processing` (Python SDK worker subprocesses: the GIL is not shared);
  with one worker it runs in-process.
- any other runner (FlinkRunner, SparkRunner, DataflowRunner, PortableRunner): `BeamOptions.args` pass
  through unchanged (e.g. `--runner=FlinkRunner --flink_master=host:8081 --environment_type=DOCKER`).
  The workers need this package installed and the build directory on a filesystem they all see.

Why the chunks go through storage, not `Create`: `Create` embeds its values in the pipeline itself, so
every chunk's encoded inputs (~1.9 KB per det3d input, 24 MB at 12,600 inputs) were pickled and
bz2-compressed into the pipeline proto by the driver, then decompressed and compressed again by every SDK
worker building its bundle processors: ~8 s of CPU per worker and ~9 s in the driver before the first
chunk at 12,600 inputs (py-spy; bench/executors.md, "Where the rest of Ray's and Beam's time went").

Progress: in-process, stages report rows live; otherwise the driver counts finished shards' per-stage
rows from their stats files (chunk granularity).
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from pipelines.engine import progress as progress_mod
from pipelines.engine import reaper, setup_error
from pipelines.engine.chunk import load_state, run_stage, segments, write_chunk
from pipelines.engine.options import ExecutorOptions
from pipelines.engine.plan import BuildPlan
from pipelines.engine.progress import Progress
from pipelines.engine.stage import Stage
from shards import interrupt
from shards.layout import CHUNK_INPUTS_DIR, shard_name

LOCAL_RUNNERS = {None, "DirectRunner", "FnApiRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner"}


class ReadChunk(beam.DoFn):
    """index -> (index, the plan's pickled Chunk), read from the file the driver wrote for it."""

    def __init__(self, inputs_dir: str):
        self.inputs_dir = inputs_dir

    def process(self, index: int) -> Iterator[tuple[int, bytes]]:
        yield index, (Path(self.inputs_dir) / f"{shard_name(index)}.chunk").read_bytes()


class SegmentDoFn(beam.DoFn):
    """Runs a segment's stages on a chunk; the last segment writes the shard and emits its index."""

    def __init__(self, stages: list[Stage], build_dir: str, write: bool, progress_token: str | None):
        self.stages = stages
        self.build_dir = build_dir
        self.write = write
        self.progress_token = progress_token

    def setup(self) -> None:
        with setup_error.reported(self.build_dir):
            for s in self.stages:
                s.ensure_setup()

    def _report(self, stage: str, n: int) -> None:
        progress_mod.report(self.progress_token, stage, n)

    def process(self, element: tuple[int, bytes]) -> Iterator[Any]:
        index, blob = element
        state = load_state(blob)  # the first DoFn gets the plan's Chunk, later ones a ChunkState
        with setup_error.reported(self.build_dir):  # a model that fails for good stops the run too
            for s in self.stages:
                run_stage(s, state, self.build_dir, self._report)
        if self.write:
            write_chunk(state, self.build_dir)
            progress_mod.report_shard(self.progress_token)
            yield index
        else:
            yield index, pickle.dumps(state, protocol=5)

    def teardown(self) -> None:
        for s in self.stages:
            s.teardown()


def pipeline_options(beam_options: Sequence[str], workers: int | None, n_chunks: int) -> tuple[PipelineOptions, bool]:
    """The options to run with, and whether the run is local (FnApiRunner) rather than a portable runner."""
    opts = PipelineOptions(list(beam_options))
    runner = opts.view_as(StandardOptions).runner
    local = runner in LOCAL_RUNNERS
    if local:
        d = opts.view_as(DirectOptions)
        explicit = any(a.startswith("--direct_num_workers") for a in beam_options)
        n = d.direct_num_workers if explicit else (workers or os.cpu_count() or 1)
        n = max(1, min(n, max(n_chunks, 1)))
        d.direct_num_workers = n
        if not any(a.startswith("--direct_running_mode") for a in beam_options):
            d.direct_running_mode = "multi_processing" if n > 1 else "in_memory"
        if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_options):
            opts.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"  # workers log INFO per bundle
    return opts, local


def execute(stages: Sequence[Stage], plan: BuildPlan, options: ExecutorOptions, *,
            progress: Progress | None = None, progress_token: str | None = None) -> list[int]:
    """Run the plan's to-do chunks as a Beam pipeline; returns the indices this run wrote.

    Reads `options.workers` and `options.beam` (the pipeline options)."""
    from shards.layout import is_done

    todo = list(plan.todo)
    opts, local = pipeline_options(options.beam.args, options.workers, len(todo))
    in_process = local and opts.view_as(DirectOptions).direct_running_mode == "in_memory"
    build_dir = str(plan.build_dir)
    token = progress_token if in_process else None

    plan.release_all()  # Create takes every chunk at once: record every digest in plan.json first
    inputs_dir = plan.build_dir / CHUNK_INPUTS_DIR
    try:
        _write_chunk_inputs(plan, todo, inputs_dir)
        p = beam.Pipeline(runner=FnApiRunner(), options=opts) if local else beam.Pipeline(options=opts)
        pcoll = (p | "chunks" >> beam.Create(todo)
                 | "read" >> beam.ParDo(ReadChunk(str(inputs_dir))))
        segs = segments(stages)
        for k, seg in enumerate(segs):
            write = k == len(segs) - 1
            label = "+".join(s.name for s in seg.stages)
            pcoll = pcoll | f"{k}:{label}" >> beam.ParDo(SegmentDoFn(list(seg.stages), build_dir, write, token))
        _run_pipeline(p, plan, todo, progress, in_process, local)
    finally:
        shutil.rmtree(inputs_dir, ignore_errors=True)
    if progress is not None and not in_process:
        _count_stats(plan, todo, progress)
    return [i for i in todo if is_done(plan.build_dir, i)]


def _write_chunk_inputs(plan: BuildPlan, todo: list[int], inputs_dir: Path) -> None:
    """One file per to-do chunk: the plan's pickled Chunk, which `ReadChunk` reads on a worker."""
    shutil.rmtree(inputs_dir, ignore_errors=True)
    inputs_dir.mkdir(parents=True)
    for i in todo:
        (inputs_dir / f"{shard_name(i)}.chunk").write_bytes(pickle.dumps(plan.chunks[i].materialized(), protocol=5))


def _run_pipeline(p: beam.Pipeline, plan: BuildPlan, todo: list[int], progress: Progress | None, in_process: bool,
                  local: bool) -> None:
    stop = threading.Event()
    poller = None
    if progress is not None and progress.enabled and not in_process:
        poller = threading.Thread(target=_poll_stats, args=(plan, todo, progress, stop), daemon=True,
                                  name="gr3d-progress")
        poller.start()
    # A local run's SDK worker processes are tagged and reaped when the block ends, even on SIGKILL of
    # this driver; a portable runner's workers are the cluster's (the job is cancelled on SIGINT/SIGTERM).
    guard = reaper.owned_processes() if local else nullcontext()
    try:
        with guard:
            result = p.run()
            try:
                result.wait_until_finish()
            except interrupt.Interrupted:
                _cancel(result)
                raise
    finally:
        stop.set()
        if poller is not None:
            poller.join()


def _cancel(result: Any) -> None:
    """Best effort: ask the runner to stop the job (not every runner can)."""
    try:
        result.cancel()
    except Exception:  # noqa: BLE001 - the job may be finished already or the runner may not cancel
        pass


def _count_stats(plan: BuildPlan, todo: list[int], progress: Progress) -> None:
    """Per-stage rows of the finished to-do shards, from their stats files."""
    from shards import jsonio
    from shards.layout import stats_path

    counts: dict[str, int] = {}
    shards = 0
    for i in todo:
        try:
            extra = jsonio.loads(stats_path(plan.build_dir, i).read_bytes()).get("extra") or {}
        except (OSError, ValueError):
            continue
        shards += 1
        for name, c in (extra.get("stages") or {}).items():
            counts[name] = counts.get(name, 0) + int(c.get("in", 0))
    progress.set_counts(counts, shards)


def _poll_stats(plan: BuildPlan, todo: list[int], progress: Progress, stop: threading.Event) -> None:
    while not stop.wait(progress.interval):
        _count_stats(plan, todo, progress)
