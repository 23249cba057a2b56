"""The shared chunk runner: what every executor does to one chunk, so their outputs cannot differ.

Ray, Beam and the plain loop only decide *where* these functions run. A chunk's life:
`new_state(chunk)` -> `run_stage(stage, state)` for each stage in order (in batches of the stage's
batch size; per-sample exceptions become rejects) -> `write_chunk(state)` (checks that every input
key ended as exactly one sample or at least one reject, then writes shard i with `ShardWriter`, whose
stats file, written last, marks the chunk done).

`ChunkState` is a plain picklable object, so a chunk can move between workers between stages (Ray
actor pools, Beam DoFns) with its accumulated rejects, per-stage counts and timings.
"""

from __future__ import annotations

import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.engine.plan import Chunk
from pipelines.engine.stage import Item, Reject, Stage, StageSetupError
from shards.layout import intermediate_path

EXECUTOR_STAGE = "executor"  # the `stage` of rejects the executor itself emits (lost, duplicate, ...)
MAX_MESSAGE = 2000
# Reserved columns of intermediate Parquet files (stage columns come from Stage.to_rows).
OUTCOME_COL, MESSAGE_COL, STAGE_COL = "_outcome", "_message", "_stage"

Report = Callable[[str, int], None]


@dataclass
class ChunkState:
    index: int
    keys: list[str]
    items: list[Item]
    rejects: list[Reject] = field(default_factory=list)
    stage_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # stages whose intermediate was reused (run-dependent)
    started: float = 0.0  # perf_counter when a worker first touched the chunk (timing only)
    started_cpu: tuple[int, float] = (0, 0.0)  # (pid, thread CPU clock) then: wall minus CPU is waiting


@dataclass
class Segment:
    stages: list[Stage]
    actors: bool  # a single model/GPU stage on an actor pool


def segments(stages: Sequence[Stage]) -> list[Segment]:
    """Group the stage list: runs of CPU stages fuse into one task segment; each model stage stands alone."""
    out: list[Segment] = []
    for s in stages:
        if s.runs_on_actors:
            out.append(Segment([s], True))
        elif out and not out[-1].actors:
            out[-1].stages.append(s)
        else:
            out.append(Segment([s], False))
    return out


def new_state(chunk: Chunk) -> ChunkState:
    """The chunk's starting state: its items decoded here, where the chunk runs (the plan holds blobs)."""
    return ChunkState(chunk.index, chunk.keys, chunk.decode())


def load_state(blob: bytes) -> ChunkState:
    """Unpickle what an executor ships between steps: a `ChunkState`, or on the first hop a `Chunk`.

    Ray and Beam send the plan's compact `Chunk` (encoded items) to the first worker, which decodes it
    with `new_state`; so the driver never holds every chunk's items as dicts.
    """
    obj = pickle.loads(blob)
    return new_state(obj) if isinstance(obj, Chunk) else obj


def exception_message(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= MAX_MESSAGE else msg[: MAX_MESSAGE - 3] + "..."


def _checked(stage: Stage, result: Any) -> tuple[list[Item], list[Reject]]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{type(stage).__name__}.process must return (outputs, rejects), got {type(result).__name__}")
    outputs, rejects = list(result[0]), list(result[1])
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("key"), str):
            raise TypeError(f"{type(stage).__name__}.process returned an output without a string 'key': {o!r:.200}")
    for r in rejects:
        if not isinstance(r, Reject):
            raise TypeError(f"{type(stage).__name__}.process returned a reject that is not a Reject: {r!r:.200}")
    return outputs, rejects


def process_batch(stage: Stage, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
    """`stage.process(batch)`, with failures isolated to the samples that cause them.

    If the batch raises, each sample is retried alone; a sample that still raises becomes a reject
    with reason `exception` and the exception's type and message. So one bad sample costs one sample,
    never the run (stages must be deterministic per sample for this retry to be sound).
    """
    try:
        return _checked(stage, stage.process(batch))
    except StageSetupError:
        raise
    except Exception as exc:  # noqa: BLE001 - isolate, see docstring
        if len(batch) == 1:
            return [], [Reject(batch[0]["key"], stage.name, "exception", exception_message(exc))]
    outputs: list[Item] = []
    rejects: list[Reject] = []
    for item in batch:
        try:
            o, r = _checked(stage, stage.process([item]))
        except StageSetupError:
            raise
        except Exception as exc:  # noqa: BLE001
            rejects.append(Reject(item["key"], stage.name, "exception", exception_message(exc)))
            continue
        outputs.extend(o)
        rejects.extend(r)
    return outputs, rejects


def _write_parquet_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list[Any]] = {"key": []}
    for r in rows:  # union of columns in first-seen order (from_pylist would only use the first row's keys)
        for k in r:
            cols.setdefault(k, [])
    for c in (OUTCOME_COL, MESSAGE_COL, STAGE_COL):
        cols.setdefault(c, [])
    for k, v in cols.items():
        v.extend(r.get(k) for r in rows)
    table = pa.table({k: pa.array(v, type=pa.string() if not v or all(x is None for x in v) else None)
                      for k, v in cols.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save_intermediate(stage: Stage, path: Path, outputs: list[Item], rejects: list[Reject]) -> None:
    rows = [dict(r) for r in stage.to_rows(outputs)]
    for r in rows:
        if not isinstance(r.get("key"), str):
            raise TypeError(f"{type(stage).__name__}.to_rows returned a row without a string 'key'")
        if any(c in r for c in (OUTCOME_COL, MESSAGE_COL, STAGE_COL)):
            raise ValueError(f"{type(stage).__name__}.to_rows used a reserved column ({OUTCOME_COL}, ...)")
        r[OUTCOME_COL] = "ok"
    rows += [{"key": r.key, OUTCOME_COL: r.reason, MESSAGE_COL: r.message, STAGE_COL: r.stage} for r in rejects]
    _write_parquet_atomic(path, rows)


def _load_intermediate(stage: Stage, path: Path, inputs: list[Item]) -> tuple[list[Item], list[Reject]] | None:
    """Rebuild (outputs, rejects) from a stored intermediate, or None if it does not match `inputs`."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception:  # noqa: BLE001 - a torn or foreign file is recomputed, not trusted
        return None
    if {r["key"] for r in rows} - {it["key"] for it in inputs}:
        return None
    ok, rejects = [], []
    for r in rows:
        if r[OUTCOME_COL] == "ok":
            ok.append({k: v for k, v in r.items() if k not in (OUTCOME_COL, MESSAGE_COL, STAGE_COL)})
        else:
            rejects.append(Reject(r["key"], r[STAGE_COL] or stage.name, r[OUTCOME_COL], r[MESSAGE_COL] or ""))
    accounted = {r["key"] for r in rows}
    if accounted != {it["key"] for it in inputs}:
        return None
    return _checked(stage, (stage.from_rows(inputs, ok), rejects))


def run_stage(stage: Stage, state: ChunkState, build_dir: str | Path | None = None,
              report: Report | None = None) -> ChunkState:
    """Run one stage over the chunk's current items, in batches; updates `state` in place and returns it."""
    t0 = time.perf_counter()
    if not state.started:
        state.started = t0
        state.started_cpu = (os.getpid(), time.thread_time())
    inputs = state.items
    result = None
    ipath = intermediate_path(build_dir, stage.name, state.index) if (
        stage.persist_intermediate and build_dir is not None) else None
    if ipath is not None and ipath.exists():
        result = _load_intermediate(stage, ipath, inputs)
        if result is not None:
            state.reused.append(stage.name)
            if report is not None:
                report(stage.name, len(inputs))
    if result is None:
        outputs: list[Item] = []
        rejects: list[Reject] = []
        if inputs:
            stage.ensure_setup()
        for s in range(0, len(inputs), stage.batch_size):
            batch = inputs[s:s + stage.batch_size]
            o, r = process_batch(stage, batch)
            outputs.extend(o)
            rejects.extend(r)
            if report is not None:
                report(stage.name, len(batch))
        if ipath is not None:
            _save_intermediate(stage, ipath, outputs, rejects)
        result = (outputs, rejects)
    outputs, rejects = result
    state.items = outputs
    state.rejects.extend(rejects)
    state.stage_counts[stage.name] = {"in": len(inputs), "out": len(outputs), "rejected": len(rejects)}
    state.timing[stage.name] = state.timing.get(stage.name, 0.0) + (time.perf_counter() - t0)
    return state


def _to_sample(item: Item):
    from shards.writer import Sample

    return Sample(key=item["key"], image_bytes=item["image_bytes"], image_ext=item["image_ext"],
                  record=item["record"], arrays=dict(item.get("arrays") or {}))


def _valid_key(key: str) -> str:
    from shards.keys import InvalidKey, make_key, validate_key

    try:
        return validate_key(key)
    except InvalidKey:
        return make_key(key)


def account(state: ChunkState) -> tuple[list[Item], list[Reject]]:
    """The accounting invariant: every input key ends as exactly one sample or at least one reject.

    Outputs whose key is not an input, duplicate outputs and outputs of a key that was also rejected are
    not written; inputs with neither output nor reject get a `lost` reject. Returns what to write, sorted.
    """
    inputs = set(state.keys)
    rejects = list(state.rejects)
    rejected = {r.key for r in rejects}
    by_key: dict[str, list[Item]] = {}
    for o in state.items:
        by_key.setdefault(o["key"], []).append(o)
    written: list[Item] = []
    for key, outs in by_key.items():
        if key not in inputs:
            rejects.append(Reject(_valid_key(key), EXECUTOR_STAGE, "unknown_key",
                                  f"a stage emitted {len(outs)} output(s) for a key that is not an input of the chunk"))
        elif len(outs) > 1:
            if key not in rejected:
                rejects.append(Reject(key, EXECUTOR_STAGE, "duplicate_output",
                                      f"the stages emitted {len(outs)} outputs for one input"))
        elif key not in rejected:
            written.append(outs[0])
    for key in state.keys:
        if key not in by_key and key not in rejected:
            rejects.append(Reject(key, EXECUTOR_STAGE, "lost", "the stages emitted neither an output nor a reject"))
    written.sort(key=lambda o: o["key"])
    rejects.sort(key=lambda r: r.key)  # stable: a key's rejects keep their stage order
    return written, rejects


def chunk_stats(state: ChunkState, rejects: Sequence[Reject]) -> dict[str, Any]:
    """Deterministic per-chunk extras for the stats file (the writer adds the counts by outcome).

    Per-stage in/out/rejected counts, rejects by stage, and a histogram of exception types per stage.
    """
    errors = Counter(f"{r.stage}: {r.message.split(':', 1)[0]}" for r in rejects if r.reason == "exception")
    return {
        "stages": {k: dict(v) for k, v in state.stage_counts.items()},
        "rejects_by_stage": dict(sorted(Counter(r.stage for r in rejects).items())),
        "error_histogram": dict(sorted(errors.items())),
    }


def write_chunk(state: ChunkState, build_dir: str | Path) -> dict[str, Any]:
    """Write shard `state.index` (tar, index, rejects, then the stats marker) and return its stats."""
    from shards.writer import ShardWriter

    t0 = time.perf_counter()
    written, rejects = account(state)
    with ShardWriter(build_dir, state.index) as w:
        for o in written:
            try:
                w.add(_to_sample(o))
            except Exception as exc:  # noqa: BLE001 - the writer refused this sample (record, image, arrays)
                rejects.append(Reject(o["key"], EXECUTOR_STAGE, "invalid_sample", exception_message(exc)))
        rejects.sort(key=lambda r: r.key)
        extra = chunk_stats(state, rejects)
        extra["timing"] = {
            "stages_s": {k: round(v, 6) for k, v in state.timing.items()},
            "write_s": round(time.perf_counter() - t0, 6),
            "chunk_s": round(time.perf_counter() - state.started, 6),
            # CPU of the thread that ran the chunk, when one process ran it all (not across actor hops)
            "chunk_cpu_s": (round(time.thread_time() - state.started_cpu[1], 6)
                            if state.started_cpu[0] == os.getpid() else None),
            "reused_intermediate": list(state.reused),
            "pid": os.getpid(),
        }
        return w.close(extra, rejects=[r.to_dict() for r in rejects], n_input=len(state.keys))


def run_chunk(stages: Sequence[Stage], chunk: Chunk, build_dir: str | Path, report: Report | None = None) -> dict[str, Any]:
    """The whole life of one chunk in one process (the plain loop, and fused CPU-only pipelines)."""
    state = new_state(chunk)
    for stage in stages:
        run_stage(stage, state, build_dir, report)
    return write_chunk(state, build_dir)
