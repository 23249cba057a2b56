"""Executors: run a builder's stages over its plan, chunk by chunk, and finalize the build.

`run_build(builder, out_dir, options)` is the one entry point (`options`: `engine.options.BuildOptions`).
It lists and plans the inputs (`pipelines.engine.plan`), hands the to-do chunks to an executor, checks
every chunk ended done, then calls `shards.manifest.finalize` and writes `run.json` (timings, executor,
which chunks this run processed).

- `local`: the plain in-process loop (the reference, and the benchmark baseline).
- `ray` (default): plain Ray tasks per chunk (Ray Data when a stage needs an actor pool); embedded local
  Ray, or a cluster via `RayOptions.address` / RAY_ADDRESS.
- `beam`: Apache Beam; in-process FnApiRunner locally, any portable runner through `BeamOptions.args`.

Each executor's `execute(stages, plan, options, progress=, progress_token=)` gets the run's
`ExecutorOptions` as they are and reads what concerns it.

All three run `pipelines.engine.chunk` on each chunk, so their shards are byte-identical. This module
imports nothing heavy; Ray and Beam are imported only by the executor that is used.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.engine import progress as progress_mod
from pipelines.engine import setup_error
from pipelines.engine.options import DEFAULT_CHUNK_SIZE, EXECUTORS, BuildOptions, ExecutorOptions
from pipelines.engine.plan import (
    Builder,
    BuildPlan,
    EncodedInputs,
    encode_inputs,
    make_plan,
    prepare_build_dir,
    recorded_chunk_size,
    remove_build_outputs,
)
from pipelines.engine.progress import Progress
from pipelines.engine.stage import Stage

# shards.writer is light (numpy, pyarrow, jsonschema); Ray and Beam are imported by their executors only.
from shards import interrupt
from shards.layout import clean_partial, is_done, remove_intermediate_temps, stats_path

# Ray is started during the listing (`_list_inputs`) only when the listing takes longer than this.
PRESTART_AFTER_S = 0.2


class BuildError(RuntimeError):
    """The run cannot complete (a stage's setup failed, a chunk was not written, bad options)."""


@dataclass
class BuildResult:
    build_dir: Path
    executor: str
    plan: BuildPlan
    processed: list[int] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    seconds: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        """What `gr3d build` prints: the plan, what this run did, and the manifest's counts by outcome."""
        lines = [self.plan.describe()]
        if self.dry_run:
            return "\n".join(["dry run: nothing written", *lines])
        lines.append(f"executor: {self.executor}  processed this run: {len(self.processed)} chunk(s) "
                     f"in {self.seconds:.1f} s")
        m = self.manifest or {}
        t = m.get("totals") or {}
        if t:
            lines.append(f"inputs: {t.get('n_input')}  written: {t.get('n_samples')}  rejected: {t.get('n_rejected')}"
                         f"  (reject rows: {t.get('n_reject_rows')})  shards: {m.get('n_shards')}")
        if m.get("rejects_by_reason"):
            lines.append("rejects by reason: " + ", ".join(f"{k}={v}" for k, v in m["rejects_by_reason"].items()))
        if m.get("dropped_by_reason"):
            lines.append("annotations dropped in written samples: "
                         + ", ".join(f"{k}={v}" for k, v in m["dropped_by_reason"].items()))
        agg = aggregate_stats(self.build_dir, len(self.plan.chunks))
        for name, c in agg["stages"].items():
            lines.append(f"  stage {name}: in={c.get('in', 0)} out={c.get('out', 0)} rejected={c.get('rejected', 0)}")
        if agg["error_histogram"]:
            lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in agg["error_histogram"].items()))
        lines.append(f"manifest: {self.build_dir / 'manifest.json'}")
        return "\n".join(lines)


def aggregate_stats(build_dir: str | Path, n_shards: int) -> dict[str, Any]:
    """Sum the executor's per-shard extras (per-stage counts, rejects by stage, error histogram)."""
    from shards import jsonio
    from shards.layout import stats_path

    out: dict[str, Any] = {"stages": {}, "rejects_by_stage": {}, "error_histogram": {}}
    for i in range(n_shards):
        try:
            extra = jsonio.loads(stats_path(build_dir, i).read_bytes()).get("extra") or {}
        except (OSError, ValueError):
            continue
        for name, c in (extra.get("stages") or {}).items():
            agg = out["stages"].setdefault(name, {})
            for k, v in c.items():
                agg[k] = agg.get(k, 0) + v
        for field_ in ("rejects_by_stage", "error_histogram"):
            for k, v in (extra.get(field_) or {}).items():
                out[field_][k] = out[field_].get(k, 0) + v
    return out


def _executor_fn(name: str) -> Callable[..., list[int]]:
    if name == "local":
        from pipelines.engine.executors.local import execute
    elif name == "ray":
        from pipelines.engine.executors.ray_executor import execute
    elif name == "beam":
        from pipelines.engine.executors.beam_executor import execute
    else:
        raise BuildError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
    return execute


def run_build(builder: Builder, out_dir: str | Path, options: BuildOptions | None = None) -> BuildResult:
    """Build (or resume) `builder` into `out_dir` and finalize its manifest.

    `options` (default: `BuildOptions()`, the Ray executor): resumes by default, so chunks whose shard is
    done are skipped and the others are redone from scratch. `chunk_size=None` takes the chunk size of the
    build being resumed, else DEFAULT_CHUNK_SIZE. `overwrite` deletes the previous build outputs first;
    `dry_run` only plans.
    Raises `StageSetupError` if a stage cannot set up, `BuildError` if the run cannot complete, and
    `shards.interrupt.Interrupted` on SIGINT / SIGTERM, after the executor stopped its workers and the
    unfinished chunks' partial files were removed (its message says how many shards are done).
    """
    with interrupt.stop_on_signals():
        try:
            return _run_build(builder, out_dir, options or BuildOptions())
        except interrupt.Interrupted as exc:
            if exc.told:
                raise
            # Stopped while listing, planning or finalizing: nothing half-written is left either way.
            raise exc.with_message(f"interrupted by {exc.signal_name}; run the same command again to resume") \
                from None


def _run_build(builder: Builder, out_dir: str | Path, options: BuildOptions) -> BuildResult:
    ex = options.executor
    if ex.name not in EXECUTORS:
        raise BuildError(f"unknown executor {ex.name!r}; choose one of {', '.join(EXECUTORS)}")
    if ex.workers is not None and ex.workers < 1:
        raise BuildError(f"--workers must be >= 1, got {ex.workers}")
    build_dir = Path(out_dir).resolve()
    t0 = time.perf_counter()
    prestarted = ex.name == "ray" and not options.dry_run
    try:
        inputs = _list_inputs(builder, ex.ray.address if prestarted else None, prestarted)
        return _plan_and_run(builder, build_dir, options, inputs, t0)
    finally:
        # A Ray started for this build that no executor took over (the build stopped early). Imported
        # only if the run imported it: a build that failed before Ray was touched does not pay for it.
        ray_ex = sys.modules.get("pipelines.engine.executors.ray_executor") if prestarted else None
        if ray_ex is not None:
            ray_ex.shutdown_prestarted()


def _list_inputs(builder: Builder, ray_address: str | None, prestart_ray: bool) -> EncodedInputs:
    """The listing, consumed item by item into sorted (key, blob) pairs (never every input as a dict).

    With `prestart_ray`, the listing runs in a thread while this one starts Ray and warms its workers
    (`ray_executor.prestart`): Ray's processes start and import in parallel with the driver's serial
    listing instead of after it (bench/executors.md, "Streamed plan").
    """
    if not prestart_ray:
        return encode_inputs(builder.list_inputs(builder.config))
    from pipelines.engine.executors.ray_executor import prestart

    box: dict[str, Any] = {}

    def listing() -> None:
        try:
            box["inputs"] = encode_inputs(builder.list_inputs(builder.config))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc

    th = threading.Thread(target=listing, name="gr3d-listing", daemon=True)
    th.start()
    th.join(PRESTART_AFTER_S)  # a short listing (small builds, tests, a listing that fails at once) starts nothing
    if th.is_alive():
        prestart(ray_address, builder.stages)
    # Not in a `finally`: a failed start or a SIGINT (`Interrupted`, raised in this thread) must not wait for
    # the listing; the daemon thread ends with the process, and `_run_build` shuts the prestarted Ray down.
    th.join()
    if "error" in box:
        raise box["error"]
    return box["inputs"]


def _plan_and_run(builder: Builder, build_dir: Path, options: BuildOptions, inputs: EncodedInputs,
                  t0: float) -> BuildResult:
    overwrite, dry_run, chunk_size = options.overwrite, options.dry_run, options.chunk_size
    if overwrite and not dry_run:
        remove_build_outputs(build_dir)
    if chunk_size is None:
        chunk_size = (None if overwrite else recorded_chunk_size(build_dir)) or DEFAULT_CHUNK_SIZE
    # A dry run with --overwrite shows what the overwrite would do: every chunk to do.
    plan = make_plan(builder.name, builder.config, inputs, build_dir, chunk_size, options.limit,
                     ignore_existing=overwrite and dry_run)
    del inputs  # the chunks hold the blobs now; drop the pairs list for the rest of the run
    result = BuildResult(build_dir, options.executor.name, plan, dry_run=dry_run)
    if dry_run:
        return result
    build_dir.mkdir(parents=True, exist_ok=True)
    prepare_build_dir(plan, builder.name, builder.config)

    prog = Progress([s.name for s in builder.stages], plan.todo_inputs, len(plan.todo),
                    interval=options.progress_interval, enabled=options.show_progress)
    token = uuid.uuid4().hex
    progress_mod.register(token, prog)
    try:
        if plan.todo:
            execute = _executor_fn(options.executor.name)
            setup_error.clear(build_dir)
            try:
                result.processed = sorted(execute(list(builder.stages), plan, options.executor, progress=prog,
                                                  progress_token=token))
            except interrupt.Interrupted as exc:
                raise _interrupted(exc, plan, prog) from None
            except Exception as exc:
                sig = interrupt.stopping()
                if sig is not None:  # the executor's own error (its workers got the signal too) came first
                    raise _interrupted(interrupt.Interrupted(sig), plan, prog) from None
                # A worker's setup failure comes back wrapped (or as text): the worker recorded it for us.
                # A local one is `exc` itself, unwrapped.
                err = setup_error.take(build_dir)
                if err is not None:
                    raise err from exc
                raise
            finally:
                setup_error.clear(build_dir)  # whatever happened, no record outlives the run
            prog.close()
    finally:
        progress_mod.unregister(token)

    missing = [c.index for c in plan.chunks if not is_done(build_dir, c.index)]
    if missing:
        raise BuildError(f"{len(missing)} chunk(s) not written after the run: {missing[:20]}")
    plan.release_all()  # plan.json complete (a no-op when the executor released every chunk)
    result.seconds = time.perf_counter() - t0
    result.manifest = _finalize(builder, result, options.executor)
    return result


def _interrupted(exc: interrupt.Interrupted, plan: BuildPlan, prog: Progress) -> interrupt.Interrupted:
    """After the executor stopped: drop the unfinished chunks' partial files; say where the build stands."""
    prog.enabled = False  # no progress line after the stop line
    for i in plan.todo:
        if not is_done(plan.build_dir, i):
            clean_partial(plan.build_dir, i)
    remove_intermediate_temps(plan.build_dir)
    done = sum(is_done(plan.build_dir, c.index) for c in plan.chunks)
    return exc.with_message(f"interrupted by {exc.signal_name} after {done} of {len(plan.chunks)} shards; "
                            "run the same command again to resume")


def _finalize(builder: Builder, result: BuildResult, ex: ExecutorOptions) -> dict[str, Any]:
    """`shards.manifest.finalize` with this run's facts for run.json (never compared between runs)."""
    from shards.manifest import code_version, finalize

    stage_s: dict[str, float] = {}
    for i in result.processed:
        try:
            t = json.loads(stats_path(result.build_dir, i).read_text()).get("timing", {})
        except (OSError, ValueError):
            continue
        for k, v in (t.get("stages_s") or {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + float(v)
    run_info = {
        "executor": result.executor,
        "workers": ex.workers,
        "ray_address": (ex.ray.address or os.environ.get("RAY_ADDRESS")) if result.executor == "ray" else None,
        "beam_options": list(ex.beam.args) if result.executor == "beam" else None,
        "seconds": round(result.seconds, 3),
        "chunks_total": len(result.plan.chunks),
        "chunks_skipped_done": list(result.plan.done),
        "chunks_processed": list(result.processed),
        "stage_seconds_sum": {k: round(v, 3) for k, v in stage_s.items()},
    }
    cfg = {"builder": builder.name, **builder.config}
    return finalize(result.build_dir, cfg, code_version(), run_info=run_info)


__all__ = ["DEFAULT_CHUNK_SIZE", "EXECUTORS", "BuildError", "BuildOptions", "BuildResult", "Builder",
           "ExecutorOptions", "Stage", "run_build"]
