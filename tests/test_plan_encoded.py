"""The plan streams its listing: items are encoded as they are yielded, and chunks hold blobs, not dicts.

Why it matters: the driver of a 780K-input build used to keep every input as a dict (~7.5 KiB each for
det3d) for the whole run, so its peak grew with the corpus (bench/memory.md). The plan now keeps per input
a key and a compact blob, decodes a chunk only where it runs, and still records the very same chunk
digests in plan.json, so builds planned by earlier versions resume instead of being redone.
"""

from __future__ import annotations

import inspect
import pickle
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.engine.chunk import ChunkState, load_state, new_state
from pipelines.engine.plan import (
    Chunk,
    EncodedInputs,
    EncodedItem,
    PlanError,
    decode_item,
    decoded,
    digest,
    encode_inputs,
    make_chunks,
    make_plan,
    plan_record,
    sort_inputs,
)
from pipelines.engine.spill import BlobRef

# Chunk digests of `_example()` at chunk size 3, recorded with the dict-based plan (before the plan
# encoded its items). plan.json of existing builds holds digests made that way: they must not change.
OLD_DIGESTS = [
    "efa3b9d6d13e8f420f82bc9baf7a6fe4c4836db09352ced973cc70902a129266",
    "eb92d667865cada4aaa7a144539d430cf313fe24e88a2ba4718246ae17f41c94",
    "e42aba0cbe679d0c04cf5db088a53e95bbbbe577f56cf4adf149ab3b5450ce31",
]


def _example() -> list[dict[str, Any]]:
    """Seven items, listed out of order, with the value kinds listings carry (floats, tuples, None, Paths)."""
    return [{"key": f"src/scene{i % 3}/{i:04d}", "image_path": f"/data/img/{i}.jpg",
             "K": [[500.0 + i / 7, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]],
             "pose": (0.1 * i, -2.5e-7, 3), "mask": None, "ok": i % 2 == 0, "path": Path(f"/p/{i}"),
             "read_reject": {"reason": "bad", "message": "caf\u00e9 \u00b5"} if i == 4 else None}
            for i in range(7)][::-1]  # fmt: skip


def test_chunk_digests_are_those_of_the_dict_based_plan(tmp_path: Path) -> None:
    items = _example()
    plan = make_plan("toy", {"a": 1}, iter(items), tmp_path / "b", 3)
    rec = plan_record("toy", {"a": 1}, 3, plan.chunks)
    assert rec["chunk_digests"] == OLD_DIGESTS
    by_key = sorted(items, key=lambda it: it["key"])
    assert rec["chunk_digests"] == [digest(by_key[s:s + 3]) for s in (0, 3, 6)]
    # Chunks made from dicts (the old make_chunks API) are the same chunks: blobs, keys and digests.
    assert make_chunks(sort_inputs(items), 3) == plan.chunks


def test_plan_chunks_hold_blobs_that_decode_to_the_items(tmp_path: Path) -> None:
    items = _example()
    plan = make_plan("toy", {}, (dict(it) for it in items), tmp_path / "b", 3)
    want = sorted(items, key=lambda it: it["key"])
    assert plan.n_inputs == 7 and [len(c.items) for c in plan.chunks] == [3, 3, 1]
    # the plan keeps references to its spill file; a released chunk carries the encoded items themselves
    assert all(isinstance(b, BlobRef) for c in plan.chunks for b in c.items)
    assert all(isinstance(b, bytes) for b in plan.release(0).items) and plan.release(0) == plan.chunks[0]
    assert [k for c in plan.chunks for k in c.keys] == [it["key"] for it in want]
    decoded = [it for c in plan.chunks for it in c.decode()]
    assert decoded == want
    assert type(decoded[0]["pose"]) is tuple and isinstance(decoded[0]["path"], Path)  # exact round trip
    # --limit takes the first items after sorting, as before
    lim = make_plan("toy", {}, items, tmp_path / "c", 3, limit=4)
    assert [it["key"] for c in lim.chunks for it in c.decode()] == [it["key"] for it in want[:4]]


def test_a_chunk_is_decoded_where_it_runs_into_fresh_dicts(tmp_path: Path) -> None:
    plan = make_plan("toy", {}, _example(), tmp_path / "b", 3)
    c = plan.release(0)  # what an executor ships: the items read back from the spill
    st = new_state(c)
    assert st.keys == c.keys and st.items == c.decode()
    st.items[0]["K"][0][0] = -1.0  # a stage mutating its input cannot alter the plan's copy
    assert c.decode()[0]["K"][0][0] != -1.0
    # What Ray rows and Beam elements carry: the pickled Chunk on the first hop, a ChunkState afterwards.
    blob = pickle.dumps(c, protocol=5)
    assert all(b in blob for b in c.items)  # items travel as their encoded blobs, verbatim, not re-pickled dicts
    first = load_state(blob)
    assert isinstance(first, ChunkState) and first.items == c.decode() and first.index == 0
    later = load_state(pickle.dumps(first, protocol=5))
    assert later.items == first.items and later.keys == first.keys


class _Tracked:
    """A payload whose live instances a weak set can count (to see whether the plan keeps the dicts)."""

    def __repr__(self) -> str:
        return "_Tracked()"


def test_the_plan_consumes_the_listing_one_item_at_a_time(tmp_path: Path) -> None:
    alive: weakref.WeakSet[_Tracked] = weakref.WeakSet()
    most = 0

    def listing() -> Iterator[dict[str, Any]]:
        nonlocal most
        for i in range(200):
            t = _Tracked()
            alive.add(t)
            most = max(most, len(alive))
            yield {"key": f"k/{199 - i:04d}", "payload": t, "n": i}
            del t

    plan = make_plan("toy", {}, listing(), tmp_path / "b", 16)
    assert plan.n_inputs == 200 and len(plan.chunks) == 13
    assert most <= 2, f"{most} listed items alive at once: the plan kept the dicts"
    assert len(alive) == 0  # nothing the listing yielded survives in the plan
    items = plan.chunks[0].decode()  # decoding makes new objects, one per item
    assert [it["n"] for it in items] == list(range(199, 183, -1)) and isinstance(items[0]["payload"], _Tracked)


def test_encoded_listing_checks_keys_like_the_dict_plan(tmp_path: Path) -> None:
    enc = encode_inputs(iter([{"key": "b"}, {"key": "a", "x": 1}]))
    assert isinstance(enc, EncodedInputs) and [k for k, _ in enc.pairs] == ["a", "b"]
    assert decode_item(enc.pairs[0][1]) == {"key": "a", "x": 1}
    assert make_plan("toy", {}, enc, tmp_path / "b", 1).n_inputs == 2
    with pytest.raises(PlanError, match="duplicate input key 'a'"):
        encode_inputs(iter([{"key": "a"}, {"key": "b"}, {"key": "a"}]))
    with pytest.raises(PlanError, match="not a valid sample key"):
        encode_inputs(iter([{"key": "frame.0001"}]))
    with pytest.raises(PlanError, match="string 'key'"):
        encode_inputs(iter([{"name": "a"}]))
    with pytest.raises(TypeError, match="all encoded blobs"):
        Chunk(0, ({"key": "a"}, b"x"))  # type: ignore[arg-type]


def test_builders_yield_their_listing(sample_world: Any) -> None:
    from pipelines.corpora.cot import builder as cot
    from pipelines.corpora.det3d import builder as det3d
    from pipelines.corpora.pointmaps import builder as pointmaps

    for mod in (det3d, pointmaps, cot):
        assert inspect.isgeneratorfunction(mod.iter_inputs), mod.__name__
    b = det3d.make_builder(det3d.Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files,
                                                   sample_world.root))
    assert b.list_inputs is det3d.iter_encoded_inputs  # iter_inputs, or its files listed in worker processes
    assert inspect.isgeneratorfunction(det3d.iter_encoded_inputs)
    listed = b.list_inputs(b.config)
    assert not isinstance(listed, list)
    items = list(listed)
    assert all(type(it) is EncodedItem for it in items)  # encoded where listed
    assert list(decoded(items)) == det3d.list_inputs(b.config) and len(items) == 12
