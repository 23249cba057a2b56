"""The build plan: a deterministic input listing cut into chunks, and which chunks are already done.

Output shard i is a function of input chunk i alone (DESIGN.md). So the plan is what makes a build
resumable and executor-independent: chunk i is always `inputs[i*cs:(i+1)*cs]` of the sorted listing,
a chunk is done when its shard's stats file exists (the writer writes it last), and a re-run skips done
chunks and redoes the others from scratch.

`plan.json` in the build directory records the chunk size, the builder config's digest and one digest
per chunk (its items), so a re-run with the same inputs resumes, a re-run whose inputs changed redoes
only the chunks whose items changed, and a re-run with another chunk size or config refuses to mix
outputs unless `--overwrite` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.stage import Item, Stage

PLAN_FILE = "plan.json"
# What `--overwrite` deletes: only the paths a build writes, never anything else in the directory.
BUILD_OUTPUTS = ("shards", "intermediate", "index.parquet", "rejects.parquet", "manifest.json", "run.json",
                 PLAN_FILE)


class PlanError(ValueError):
    """The inputs or the build directory cannot give a consistent plan (message says how to fix it)."""


@dataclass
class Builder:
    """What a corpus builder hands to an executor: a config, an input listing and its stages.

    `list_inputs(config)` must return small dicts (each with a unique `"key"`; items may carry paths,
    not big payloads), deterministically. The executor sorts them by key, so the listing order does not
    matter but the content must not depend on time or machine. `config` must be JSON-serialisable: it is
    recorded in the manifest and its digest guards resumes.
    """

    name: str
    config: dict[str, Any]
    list_inputs: Callable[[dict[str, Any]], list[Item]]
    stages: Sequence[Stage]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"builder {self.name!r} has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"builder {self.name!r}: stage names must be unique, got {names}")


@dataclass(frozen=True)
class Chunk:
    """Input chunk `index`: the items that make output shard `index`."""

    index: int
    items: tuple[Item, ...]

    @property
    def keys(self) -> list[str]:
        return [it["key"] for it in self.items]


@dataclass
class BuildPlan:
    build_dir: Path
    chunk_size: int
    n_inputs: int
    chunks: list[Chunk]
    done: list[int] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)  # done once, but their inputs changed: redone

    @property
    def todo_inputs(self) -> int:
        return sum(len(self.chunks[i].items) for i in self.todo)

    def describe(self) -> str:
        """Human summary for `--dry-run` and the start of a run."""
        lines = [
            f"build dir: {self.build_dir}",
            f"inputs: {self.n_inputs}  chunk size: {self.chunk_size}  chunks: {len(self.chunks)}",
            f"done: {len(self.done)}  to do: {len(self.todo)} ({self.todo_inputs} inputs)"
            + (f"  (of which {len(self.stale)} redone because their inputs changed)" if self.stale else ""),
        ]
        if self.todo:
            lines.append("to do: " + _ranges(self.todo))
        return "\n".join(lines)


def _ranges(ix: list[int]) -> str:
    out, start, prev = [], None, None
    for i in [*ix, None]:
        if start is None:
            start = prev = i
        elif i is not None and i == prev + 1:
            prev = i
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    return ", ".join(out)


def canonical_json(obj: Any) -> str:
    """JSON used for digests: sorted keys, no whitespace; non-JSON values by `str()`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sort_inputs(inputs: Sequence[Item]) -> list[Item]:
    """Sort by key and check keys are unique valid sample keys: the listing every chunk boundary depends on."""
    from shards.keys import InvalidKey, validate_key

    for it in inputs:
        if not isinstance(it, dict) or not isinstance(it.get("key"), str):
            raise PlanError(f"every input must be a dict with a string 'key', got {it!r:.200}")
        try:
            validate_key(it["key"])
        except InvalidKey as exc:
            raise PlanError(f"input key is not a valid sample key (make it with shards.keys.make_key): {exc}") from exc
    out = sorted(inputs, key=lambda it: it["key"])
    for a, b in zip(out, out[1:]):
        if a["key"] == b["key"]:
            raise PlanError(f"duplicate input key {a['key']!r}: keys must be unique")
    return out


def make_chunks(inputs: Sequence[Item], chunk_size: int) -> list[Chunk]:
    if chunk_size < 1:
        raise PlanError(f"chunk size must be >= 1, got {chunk_size}")
    return [Chunk(i, tuple(inputs[s:s + chunk_size])) for i, s in enumerate(range(0, len(inputs), chunk_size))]


def _read_plan_file(build_dir: Path) -> dict[str, Any] | None:
    p = build_dir / PLAN_FILE
    if not p.exists():
        return None
    return json.loads(p.read_text())


def recorded_chunk_size(build_dir: str | Path) -> int | None:
    """The chunk size of the build in `build_dir` (from plan.json), so a resume need not repeat it."""
    try:
        rec = _read_plan_file(Path(build_dir))
    except (OSError, ValueError):
        return None
    cs = (rec or {}).get("chunk_size")
    return cs if isinstance(cs, int) and cs > 0 else None


def plan_record(builder_name: str, config: dict[str, Any], chunk_size: int, chunks: list[Chunk]) -> dict[str, Any]:
    return {
        "builder": builder_name,
        "config_digest": digest(config),
        "chunk_size": chunk_size,
        "n_chunks": len(chunks),
        "chunk_digests": [digest(list(c.items)) for c in chunks],
    }


def make_plan(builder_name: str, config: dict[str, Any], inputs: Sequence[Item], build_dir: str | Path,
              chunk_size: int, limit: int | None = None, *, ignore_existing: bool = False) -> BuildPlan:
    """Sort and cut `inputs` (first `limit` after sorting), then mark which chunks are done.

    Reads the build directory but writes nothing (so `--dry-run` is safe). A done chunk stays done only
    if `plan.json` says it was made from the same items under the same config and chunk size.
    """
    from shards.writer import is_done

    build_dir = Path(build_dir)
    items = sort_inputs(inputs)
    if limit is not None:
        if limit < 0:
            raise PlanError(f"--limit must be >= 0, got {limit}")
        items = items[:limit]
    chunks = make_chunks(items, chunk_size)
    plan = BuildPlan(build_dir, chunk_size, len(items), chunks)
    new = plan_record(builder_name, config, chunk_size, chunks)
    if ignore_existing:
        plan.todo = [c.index for c in chunks]
        return plan
    old = _read_plan_file(build_dir)
    if old is not None:
        for what in ("builder", "config_digest", "chunk_size"):
            if old.get(what) != new[what]:
                raise PlanError(
                    f"{build_dir} holds a build with another {what.replace('_', ' ')} "
                    f"({old.get(what)!r} vs {new[what]!r}); use --overwrite to replace it or choose another --out")
    old_digests = (old or {}).get("chunk_digests", [])
    for c in chunks:
        if is_done(build_dir, c.index):
            if c.index < len(old_digests) and old_digests[c.index] == new["chunk_digests"][c.index]:
                plan.done.append(c.index)
                continue
            plan.stale.append(c.index)
        plan.todo.append(c.index)
    return plan


def prepare_build_dir(plan: BuildPlan, builder_name: str, config: dict[str, Any]) -> None:
    """Make the directory ready for the to-do chunks: drop partial/stale shards, extra shards, write plan.json.

    Shards past the new last chunk (the input listing shrank) are deleted too, so the manifest never
    merges outputs of another plan.
    """
    from shards.writer import clean_partial

    d = plan.build_dir
    (d / "shards").mkdir(parents=True, exist_ok=True)
    for i in plan.todo:  # before plan.json is rewritten, so a stale marker can never pass for a new one
        clean_partial(d, i, force=i in plan.stale)
    n = len(plan.chunks)
    for p in sorted((d / "shards").iterdir()):
        head = p.name.split(".", 1)[0]
        if head.isdigit() and int(head) >= n:
            p.unlink()
    inter = d / "intermediate"
    if inter.is_dir():
        for stage_dir in inter.iterdir():
            for p in stage_dir.glob(".*.tmp"):  # torn writes of a killed run
                p.unlink(missing_ok=True)
            for p in stage_dir.glob("*.parquet"):
                head = p.name.split(".", 1)[0]
                if head.isdigit() and (int(head) >= n or int(head) in plan.stale):
                    p.unlink()
    tmp = d / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(plan_record(builder_name, config, plan.chunk_size, plan.chunks), indent=1,
                              sort_keys=True) + "\n")
    os.replace(tmp, d / PLAN_FILE)


def remove_build_outputs(build_dir: str | Path) -> None:
    """`--overwrite`: delete what a previous build wrote (only the known output paths)."""
    d = Path(build_dir)
    for name in BUILD_OUTPUTS:
        p = d / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def intermediate_path(build_dir: str | Path, stage_name: str, index: int) -> Path:
    """Where a model stage's raw outputs for chunk `index` live: BUILD/intermediate/STAGE/NNNNNN.parquet."""
    return Path(build_dir) / "intermediate" / stage_name / f"{index:06d}.parquet"
