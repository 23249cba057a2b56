"""The sqlite response cache: keys, counters, persistence, several processes at once."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from annotators.cache import ResponseCache, cache_key
from annotators.images import image_sha256


def test_key_depends_on_every_field_and_cannot_collide_by_concatenation() -> None:
    base = cache_key("m", "v1", "prompt", "abc")
    assert len(base) == 64 and base == cache_key("m", "v1", "prompt", "abc")
    others = {
        cache_key("m2", "v1", "prompt", "abc"),
        cache_key("m", "v2", "prompt", "abc"),
        cache_key("m", "v1", "prompt!", "abc"),
        cache_key("m", "v1", "prompt", "abd"),
        cache_key("mv", "1", "prompt", "abc"),  # same concatenation, different split
    }
    assert base not in others and len(others) == 5


def test_image_hash_is_of_rgb_pixels() -> None:
    arr = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    pil = Image.fromarray(arr)
    assert image_sha256(arr) == image_sha256(pil) == image_sha256(pil.convert("RGBA"))
    arr2 = arr.copy()
    arr2[0, 0, 0] ^= 1
    assert image_sha256(arr2) != image_sha256(arr)
    assert image_sha256(arr[:, :15]) != image_sha256(arr)


def test_get_put_counters_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.sqlite"
    c = ResponseCache(path)
    assert c.get("k1") is None
    assert c.put("k1", '{"a": 1}', model_id="m", prompt_version="v") is True
    assert c.put("k1", "other") is False  # first writer wins
    assert c.get("k1") == '{"a": 1}'
    assert c.stats() == {"hits": 1, "misses": 1, "puts": 1}
    assert "k1" in c and "k2" not in c and len(c) == 1
    c.close()
    again = ResponseCache(path)
    assert again.get("k1") == '{"a": 1}' and again.stats()["hits"] == 1
    # picklable for Ray/Beam workers: reopens the same file
    clone = pickle.loads(pickle.dumps(again))
    assert clone.get("k1") == '{"a": 1}' and clone.stats() == {"hits": 1, "misses": 0, "puts": 0}


def _writer(path: str, worker: int, n: int) -> None:
    c = ResponseCache(path)
    for i in range(n):
        c.put(f"shared-{i}", f"from-{worker}")  # every worker writes the same keys
        c.put(f"own-{worker}-{i}", str(i))
    c.close()


def test_several_processes_write_concurrently(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.sqlite")
    ResponseCache(path).close()
    ctx = mp.get_context("spawn")  # no fork: other tests may have started torch threads
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = ResponseCache(path)
    assert len(c) == 40 + 3 * 40
    assert all(c.get(f"own-{w}-{i}") == str(i) for w in range(3) for i in range(40))
    assert {c.get(f"shared-{i}") for i in range(40)} <= {"from-0", "from-1", "from-2"}
