"""The build plan: a deterministic input listing cut into chunks, and which chunks are already done.

Output shard i is a function of input chunk i alone (docs/architecture.md). So the plan is what makes a build
resumable and executor-independent: chunk i is always `inputs[i*cs:(i+1)*cs]` of the sorted listing,
a chunk is done when its shard's stats file exists (the writer writes it last), and a re-run skips done
chunks and redoes the others from scratch.

`plan.json` in the build directory records the chunk size, the builder config's digest and one digest
per chunk (its items), so a re-run with the same inputs resumes, a re-run whose inputs changed redoes
only the chunks whose items changed, and a re-run with another chunk size or config refuses to mix
outputs unless `--overwrite` is given.

Streaming: the listing may be any iterable (builders yield their items). Each item is validated and
encoded into a compact blob (`encode_item`) as it arrives and written to the listing's spill file
(`pipelines.engine.spill`), so the driver never holds every input as a dict or as a blob: a plan keeps per
chunk only the keys, references to the blobs and the digest; a chunk's blobs are read back when it is
released to an executor, and the items are decoded where the chunk runs
(`pipelines.engine.chunk.new_state`). A det3d input costs ~0.35 KiB in the plan, ~2 KiB encoded, ~7.5 KiB
as a dict (bench/memory.md, bench/executors.md "The plan spilled").
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.engine.spill import BlobRef, blob_bytes, spilling
from pipelines.engine.stage import Item, Stage
from shards.jsonio import exact_orjson
from shards.layout import (
    CHUNK_INPUTS_DIR,
    INTERMEDIATE_DIR,
    PLAN_FILE,
    BuildLayout,
    remove_intermediate_temps,
    shards_dir,
)


class PlanError(ValueError):
    """The inputs or the build directory cannot give a consistent plan (message says how to fix it)."""


@dataclass
class Builder:
    """What a corpus builder hands to an executor: a config, an input listing and its stages.

    `list_inputs(config)` must return an iterable of small dicts (each with a unique `"key"`; items may
    carry paths, not big payloads), deterministically; a generator is best, since the plan encodes each
    item as it comes and never needs them all as dicts at once. An item may also come already encoded, as an
    `EncodedItem` (a listing that encodes in worker processes); the plan keeps its blob as it is. The plan
    sorts them by key, so the listing
    order does not matter but the content must not depend on time or machine. `config` must be
    JSON-serialisable: it is recorded in the manifest and its digest guards resumes.
    """

    name: str
    config: dict[str, Any]
    list_inputs: Callable[[dict[str, Any]], Iterable[Item]]
    stages: Sequence[Stage]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"builder {self.name!r} has no stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"builder {self.name!r}: stage names must be unique, got {names}")


def encode_item(item: Item) -> bytes:
    """An input as a compact blob: pickle (exact round trip, so tuples, numpy values and paths come back as
    they were and the stages see what they saw before).

    Not compressed: zlib level 1 made det3d blobs ~33 % smaller (1.9 -> 1.3 KB) but cost ~0.06 ms per input,
    more than the pickling and half the 0.1 ms driver budget per input (bench/executors.md, "Driver per
    input (session 4)"). The blobs are made by this process's plan and travel only to this build's
    workers, so unpickling them is as safe as the executors' own pickled chunk states.
    """
    return pickle.dumps(item, protocol=5)


def decode_item(blob: bytes | BlobRef) -> Item:
    """The item `encode_item` encoded (a fresh dict each call, so stages cannot alter the plan's copy); a spilled
    one is read back first (`pipelines.engine.spill`)."""
    return pickle.loads(blob_bytes(blob))


@dataclass(frozen=True)
class EncodedItem:
    """An input already encoded by `encode_item`, with its key: what a listing that lists in worker processes
    yields (det3d's per-file listing), so the driver neither decodes nor re-encodes the item."""

    key: str
    blob: bytes | BlobRef  # a BlobRef: written to the listing's spill by the worker that made it


def decoded(listing: Iterable[Item | EncodedItem]) -> Iterator[Item]:
    """A builder's listing as dicts: its `EncodedItem`s decoded (tools and tests that feed items to stages)."""
    for it in listing:
        yield decode_item(it.blob) if type(it) is EncodedItem else it


@dataclass(frozen=True)
class Chunk:
    """Input chunk `index`: the items that make output shard `index`, held encoded until the chunk runs.

    `items` are `encode_item` blobs, or references to them in the listing's spill (`BlobRef`: the plan's
    chunks; `materialized()` reads them back, as `BuildPlan.release` does), so a plan (and every Ray row or
    Beam element made from it) costs the blobs, not the dicts; `decode()` gives the dicts back where the chunk
    is run. `item_keys` are the
    items' keys in order (`keys` as a list). `digest` is `digest(list of the decoded items)`: exactly what plan.json has always
    recorded per chunk (pickle restores equal values, and the digest reads only values), so builds
    planned by earlier versions still resume. A Chunk may also be made from dicts (tests, tools): they are
    encoded and keyed here.
    """

    index: int
    items: tuple[bytes | BlobRef, ...]
    item_keys: tuple[str, ...] = ()
    digest: str = field(default="", compare=False)  # a function of the items: equal items, equal digest
    lazy: InitVar[bool] = False  # leave `digest` empty until `ensure_digest()` (the plan's streamed record)

    def __post_init__(self, lazy: bool = False) -> None:
        items = tuple(self.items)
        dicts: list[Item] | None = None
        if not all(isinstance(b, bytes | BlobRef) for b in items):
            if not all(isinstance(it, dict) for it in items):
                raise TypeError("Chunk items must be all encoded blobs (bytes) or all dicts")
            dicts = list(items)
            items = tuple(encode_item(it) for it in dicts)
            object.__setattr__(self, "item_keys", tuple(it["key"] for it in dicts))
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "item_keys", tuple(self.item_keys))
        if len(self.item_keys) != len(items):
            raise ValueError(f"chunk {self.index}: {len(self.item_keys)} keys for {len(items)} items")
        if dicts is not None and not self.digest:
            object.__setattr__(self, "digest", digest(dicts))
        elif not lazy:
            self.ensure_digest()

    def ensure_digest(self) -> str:
        """The chunk's digest, computed (decoding the items) the first time it is asked for."""
        if not self.digest:
            object.__setattr__(self, "digest", digest(self.decode()))
        return self.digest

    def materialized(self) -> Chunk:
        """This chunk with its spilled items read back (what is shipped to a worker); itself when none are."""
        if all(type(b) is bytes for b in self.items):
            return self
        return Chunk(self.index, tuple(blob_bytes(b) for b in self.items), self.item_keys, digest=self.digest,
                     lazy=True)

    @property
    def keys(self) -> list[str]:
        return list(self.item_keys)

    def decode(self) -> list[Item]:
        """The chunk's items as dicts (fresh ones each call)."""
        return [decode_item(b) for b in self.items]


@dataclass
class BuildPlan:
    build_dir: Path
    chunk_size: int
    n_inputs: int
    chunks: list[Chunk]
    done: list[int] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)  # done once, but their inputs changed: redone
    # Set by `prepare_build_dir`: (builder name, config) to rewrite plan.json as digests become known.
    _record_for: tuple[str, dict[str, Any]] | None = field(default=None, repr=False, compare=False)
    _released: int = field(default=0, repr=False, compare=False)
    _todo_pos: dict[int, int] | None = field(default=None, repr=False, compare=False)

    def release(self, i: int) -> Chunk:
        """Chunk `i`, to be run now: its digest is computed and recorded in plan.json first. It comes back with its
        items read from the listing's spill (`pipelines.engine.spill`); the plan keeps only their references.

        The streamed plan (bench/executors.md): `make_plan` digests only the chunks already done on disk
        (the resume decision needs those), so the first chunk can start while the driver still has the
        others' digests to compute. A chunk's digest must be in plan.json before its shard can exist, or
        a crashed run's finished shard could not be matched to its inputs on resume (it would be redone,
        or worse, pass for another listing's): so an executor asks for each chunk here, just before
        handing it to a worker. Digests are computed and written in batches of the next to-do chunks
        (growing from one chunk to ~`RECORD_BATCH_INPUTS` inputs), so plan.json is rewritten O(n / batch)
        times and the driver never stalls the workers for long.
        """
        self.prepare(i)
        return self.chunks[i].materialized()

    def prepare(self, i: int) -> None:
        """What `release(i)` does first: chunk `i`'s digest (and a batch of the next to-do chunks') computed and
        recorded in plan.json, without reading its items back for a worker (the streamed plan digests the next
        chunk while the workers run)."""
        c = self.chunks[i]
        if c.digest:
            return
        if self._todo_pos is None:
            self._todo_pos = {j: k for k, j in enumerate(self.todo)}
        pos = self._todo_pos.get(i)
        nxt = [i] if pos is None else self.todo[pos:]
        cap = max(1, min(self._released, RECORD_BATCH_INPUTS // max(1, self.chunk_size)))
        batch = [j for j in nxt if not self.chunks[j].digest][:cap]
        for j in batch:
            self.chunks[j].ensure_digest()
        self._released += len(batch)
        self._write_record()

    def release_all(self) -> None:
        """Every chunk's digest computed and recorded (executors that hand all chunks over at once)."""
        missing = [c for c in self.chunks if not c.digest]
        for c in missing:
            c.ensure_digest()
        if missing:
            self._write_record()

    def _write_record(self) -> None:
        if self._record_for is not None:
            write_plan_file(self.build_dir, plan_record(*self._record_for, self.chunk_size, self.chunks,
                                                        complete=False))

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
    """JSON used for digests: sorted keys, no whitespace; non-JSON values by `str()`. The definition:
    `canonical_bytes` writes the same text faster."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _canonical_value(obj: Any) -> bytes:
    """`canonical_json(obj).encode()` for one value: orjson's text when it is certain to be the same
    (`shards.jsonio.exact_orjson`, ASCII only since `canonical_json` escapes non-ASCII), else `json.dumps`'s.
    On det3d items this costs ~0.4x `json.dumps`'s CPU, the checks included, and a chunk's digest
    (unpickling its items too) 0.57x (bench/executors.md, "Chunk digests by orjson")."""
    fast = exact_orjson(obj, ascii_only=True)
    return fast[0] if fast is not None else canonical_json(obj).encode()


def canonical_bytes(obj: Any) -> bytes:
    """`canonical_json(obj).encode()`, byte for byte, in a fraction of its CPU: a list is written element by
    element (`json.dumps` joins elements with ","), so one odd element sends only itself to `json.dumps`."""
    if type(obj) is list:
        return b"[" + b",".join(_canonical_value(x) for x in obj) + b"]"
    return _canonical_value(obj)


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON: what plan.json has always recorded (a chunk's items, the config)."""
    return hashlib.sha256(canonical_bytes(obj)).hexdigest()


def _checked_key(it: Any) -> str:
    """The input's key, if `it` is a dict with a valid sample key (else PlanError saying how to fix it)."""
    from shards.keys import InvalidKey, validate_key

    if not isinstance(it, dict) or not isinstance(it.get("key"), str):
        raise PlanError(f"every input must be a dict with a string 'key', got {it!r:.200}")
    try:
        validate_key(it["key"])
    except InvalidKey as exc:
        raise PlanError(f"input key is not a valid sample key (make it with shards.keys.make_key): {exc}") from exc
    return it["key"]


def _check_unique(keys: Sequence[str]) -> None:
    for a, b in zip(keys, keys[1:]):
        if a == b:
            raise PlanError(f"duplicate input key {a!r}: keys must be unique")


def sort_inputs(inputs: Iterable[Item]) -> list[Item]:
    """Sort by key and check keys are unique valid sample keys: the listing every chunk boundary depends on."""
    out = list(inputs)
    for it in out:
        _checked_key(it)
    out.sort(key=lambda it: it["key"])
    _check_unique([it["key"] for it in out])
    return out


@dataclass(frozen=True)
class EncodedInputs:
    """A listing consumed and encoded: `(key, encode_item blob)` pairs, sorted by key, keys valid and unique."""

    pairs: list[tuple[str, bytes | BlobRef]]

    def __len__(self) -> int:
        return len(self.pairs)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a listing: it makes millions of acyclic objects (parsed JSON, items,
    blobs), which reference counting frees, and each generation-2 collection walks all of them; ~25 % of a det3d
    listing's CPU (bench/executors.md, "A typed parse in pieces (session 7)"). Workers forked meanwhile inherit
    it off, so their collections do not write to pages shared with the driver either."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def encode_inputs(inputs: Iterable[Item] | EncodedInputs) -> EncodedInputs:
    """Consume a listing (any iterable, typically a builder's generator) item by item.

    Each item is checked and encoded as soon as it is yielded and only `(key, blob)` is kept, the blob written
    to the listing's spill file (`pipelines.engine.spill`; a listing worker spills its own), so the driver's
    memory for the listing is a key and a reference per input, never the dicts or the encoded items at once. A listing that is already
    encoded is returned as it is (a tool or test can list once and build several times).
    """
    if isinstance(inputs, EncodedInputs):
        return inputs
    with gc_paused(), spilling() as spill:
        pairs: list[tuple[str, bytes | BlobRef]] = []
        for it in inputs:
            if type(it) is EncodedItem:
                blob = it.blob
                pairs.append((_checked_key({"key": it.key}), blob if type(blob) is BlobRef else spill.put(blob)))
            else:
                pairs.append((_checked_key(it), spill.put(encode_item(it))))
        pairs.sort(key=lambda kb: kb[0])
    _check_unique([k for k, _ in pairs])
    return EncodedInputs(pairs)


def make_chunks(inputs: Sequence[Item], chunk_size: int) -> list[Chunk]:
    """Cut sorted dicts into chunks of `chunk_size` (chunk i is `inputs[i*cs:(i+1)*cs]`)."""
    if chunk_size < 1:
        raise PlanError(f"chunk size must be >= 1, got {chunk_size}")
    return [Chunk(i, tuple(inputs[s:s + chunk_size])) for i, s in enumerate(range(0, len(inputs), chunk_size))]


def _encoded_chunks(pairs: Sequence[tuple[str, bytes | BlobRef]], chunk_size: int, *, lazy: bool = False) -> list[Chunk]:
    """`make_chunks` over encoded pairs: each chunk's digest decodes only that chunk, one at a time
    (`lazy`: not now, when `Chunk.ensure_digest` is first called)."""
    if chunk_size < 1:
        raise PlanError(f"chunk size must be >= 1, got {chunk_size}")
    out = []
    for i, s in enumerate(range(0, len(pairs), chunk_size)):
        part = pairs[s:s + chunk_size]
        out.append(Chunk(i, tuple(b for _, b in part), tuple(k for k, _ in part), lazy=lazy))
    return out


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


# Inputs digested per plan.json rewrite once a run is under way (`BuildPlan.release`).
RECORD_BATCH_INPUTS = 1024


def plan_record(builder_name: str, config: dict[str, Any], chunk_size: int, chunks: list[Chunk], *,
                complete: bool = True) -> dict[str, Any]:
    """What plan.json holds. `complete=False` leaves the digests not computed yet as "" (a run under way:
    "" never matches a digest, so a shard found done under it is redone, never trusted)."""
    return {
        "builder": builder_name,
        "config_digest": digest(config),
        "chunk_size": chunk_size,
        "n_chunks": len(chunks),
        "chunk_digests": [c.ensure_digest() if complete else c.digest for c in chunks],
    }


def write_plan_file(build_dir: Path, record: dict[str, Any]) -> None:
    """plan.json, replaced atomically (a reader sees the old record or the new one, never a torn one)."""
    tmp = build_dir / (PLAN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, build_dir / PLAN_FILE)


def make_plan(builder_name: str, config: dict[str, Any], inputs: Iterable[Item] | EncodedInputs,
              build_dir: str | Path, chunk_size: int, limit: int | None = None, *,
              ignore_existing: bool = False) -> BuildPlan:
    """Sort and cut `inputs` (first `limit` after sorting), then mark which chunks are done.

    `inputs` is a listing (any iterable of dicts, consumed once) or `encode_inputs` of one.
    Reads the build directory but writes nothing (so `--dry-run` is safe). A done chunk stays done only
    if `plan.json` says it was made from the same items under the same config and chunk size.
    """
    from shards.layout import is_done

    build_dir = Path(build_dir)
    if limit is not None and limit < 0:
        raise PlanError(f"--limit must be >= 0, got {limit}")
    pairs = encode_inputs(inputs).pairs
    if limit is not None:
        pairs = pairs[:limit]
    chunks = _encoded_chunks(pairs, chunk_size, lazy=True)
    plan = BuildPlan(build_dir, chunk_size, len(pairs), chunks)
    new = plan_record(builder_name, config, chunk_size, chunks, complete=False)
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
        if is_done(build_dir, c.index):  # only these need their digest before the run
            if c.index < len(old_digests) and old_digests[c.index] == c.ensure_digest():
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
    from shards.layout import clean_partial

    d = plan.build_dir
    shards_dir(d).mkdir(parents=True, exist_ok=True)
    for i in plan.todo:  # before plan.json is rewritten, so a stale marker can never pass for a new one
        clean_partial(d, i, force=i in plan.stale)
    n = len(plan.chunks)
    for p in sorted(shards_dir(d).iterdir()):
        head = p.name.split(".", 1)[0]
        if head.isdigit() and int(head) >= n:
            p.unlink()
    remove_intermediate_temps(d)
    shutil.rmtree(d / CHUNK_INPUTS_DIR, ignore_errors=True)  # a killed Beam run's chunk inputs
    inter = d / INTERMEDIATE_DIR
    if inter.is_dir():
        for stage_dir in inter.iterdir():
            for p in stage_dir.glob("*.parquet"):
                head = p.name.split(".", 1)[0]
                if head.isdigit() and (int(head) >= n or int(head) in plan.stale):
                    p.unlink()
    # The digests known so far (the done chunks'); the executors add the others as they release chunks
    # (`BuildPlan.release`), and the run ends with the complete record, byte for byte what it always was.
    plan._record_for = (builder_name, config)
    plan._write_record()


def remove_build_outputs(build_dir: str | Path) -> None:
    """`--overwrite`: delete what a previous build wrote (only the known output paths)."""
    BuildLayout(build_dir).remove_outputs()
