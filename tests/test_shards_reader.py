"""Reader: the DataLoader path splits by rank and worker so every key is seen exactly once."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data

from shards.reader import iter_samples, make_webdataset, node_info, shard_urls
from tests.test_shards_samples import mixed_samples, write_build

N_SHARDS, PER_SHARD = 5, 3


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = tmp_path_factory.mktemp("reader")
    samples = mixed_samples(N_SHARDS * PER_SHARD)
    write_build(b, [samples[i * PER_SHARD:(i + 1) * PER_SHARD] for i in range(N_SHARDS)])
    (b / "shards" / ".000009.tar.zz.tmp").write_bytes(b"")  # temp files are never read as shards
    return b


def _keys_per_rank(build: Path, world: int, workers: int, **kw: object) -> list[list[str]]:
    out = []
    for rank in range(world):
        ds = make_webdataset(shard_urls(build), rank=rank, world_size=world, **kw)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        out.append([s["__key__"] for s in loader])
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_cover_every_key_once(build: Path, shuffle: bool) -> None:
    all_keys = {s["__key__"] for s in iter_samples(build)}
    assert len(all_keys) == N_SHARDS * PER_SHARD
    per_rank = _keys_per_rank(build, world=2, workers=2, shuffle=shuffle, seed=7)
    seen = Counter(itertools.chain.from_iterable(per_rank))
    assert set(seen) == all_keys and set(seen.values()) == {1}
    assert all(per_rank)  # both ranks got data
    if shuffle:  # reproducible (same seed, same order), and actually shuffled
        assert per_rank == _keys_per_rank(build, world=2, workers=2, shuffle=True, seed=7)
        assert per_rank != _keys_per_rank(build, world=2, workers=2, shuffle=False)


def test_decoded_fields(build: Path) -> None:
    s = next(iter(make_webdataset(build, rank=0, world_size=1)))
    assert isinstance(s["json"], dict) and s["json"]["key"] == s["__key__"]
    assert isinstance(s["jpg"], bytes) and s["jpg"][:3] == b"\xff\xd8\xff"  # image not decoded


def test_resampled_is_seeded_and_endless(build: Path) -> None:
    def take(seed: int) -> list[str]:
        ds = make_webdataset(build, resampled=True, seed=seed, rank=0, world_size=1)
        return [s["__key__"] for s in itertools.islice(iter(ds), 40)]

    a, b = take(1), take(1)
    assert a == b and len(a) == 40 and take(2) != a


def test_rank_resolution(monkeypatch: pytest.MonkeyPatch, build: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert node_info() == (1, 2)
    assert node_info(0, 4) == (0, 4)
    with pytest.raises(ValueError, match="bad rank"):
        node_info(2, 2)
    with pytest.raises(ValueError, match="cannot be split over 8 ranks"):
        make_webdataset(build, rank=0, world_size=8)
    # iter_samples is never split: it reads the whole build even under torchrun env vars
    assert len(list(iter_samples(build))) == N_SHARDS * PER_SHARD
    pts = [s["points.npy"] for s in iter_samples(shard_urls(build)[:1]) if "points.npy" in s]
    assert pts and all(p.dtype == np.float32 and p.shape[1] == 5 for p in pts)


def test_iter_tar_reads_what_webdataset_reads(build: Path) -> None:
    """`iter_tar` (plain tarfile: the audit and the evaluator) and `iter_samples` (webdataset) agree."""
    from shards.reader import iter_tar

    plain = [s for u in shard_urls(build) for s in iter_tar(u)]
    wds = list(iter_samples(build))
    assert [s["__key__"] for s in plain] == [s["__key__"] for s in wds] and len(plain) == N_SHARDS * PER_SHARD
    for a, b in zip(plain, wds):
        assert set(a) - {"__url__"} == set(b) - {"__url__", "__local_path__"}, a["__key__"]
        for k, v in a.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(v, b[k])
            elif k != "__url__":
                assert v == b[k], (a["__key__"], k)
