"""Read built shards: plain iteration, random access by key, and the torch-DataLoader pipeline.

Every path yields the same sample dict, webdataset-style:
`{"__key__": KEY, "__url__": TAR, "json": record dict, "jpg"|"png": original bytes, "NAME.npy": array}`.
Only JSON and NPY are decoded (NPY with `allow_pickle=False`); images stay raw bytes because the
camera normalization (resize to 1000/fx) happens in the model's loader, and nothing else in a
shard may be decoded with pickle.

webdataset (and with it torch) is imported inside the functions, so `shards` stays cheap to
import for the CLI.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shards.layout import shards_dir, tar_path
from shards.writer import tar_trailer

__all__ = ["decode_sample", "iter_samples", "iter_tar", "make_webdataset", "node_info", "read_sample", "shard_urls"]

_TAR_NAME = re.compile(r"^[0-9]{6}\.tar$")


def shard_urls(build_dir: str | os.PathLike[str]) -> list[str]:
    """Paths of `build_dir/shards/NNNNNN.tar`, in shard order (temp and side files excluded)."""
    d = shards_dir(build_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{build_dir} is not a build directory: {d} does not exist")
    return [str(p) for p in sorted(d.iterdir()) if _TAR_NAME.match(p.name)]


def _as_urls(src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    if isinstance(src, str | os.PathLike):
        p = Path(src)
        if p.is_dir():
            urls = shard_urls(p)
            if not urls:
                raise FileNotFoundError(f"no shards in {shards_dir(p)}")
            return urls
        return [str(src)]
    urls = [str(u) for u in src]
    if not urls:
        raise ValueError("no shard urls given")
    return urls


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode `json` to a dict and `*.npy` to arrays; leave everything else as bytes."""
    out: dict[str, Any] = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
        elif k == "json":
            out[k] = json.loads(v)
        elif k.endswith("npy"):
            out[k] = np.load(io.BytesIO(v), allow_pickle=False)
        else:
            out[k] = v
    return out


def iter_tar(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The samples of one shard tar, decoded as `decode_sample` does (json and npy decoded, the rest bytes).

    Plain `tarfile`, no webdataset (which pulls in torch, ~2 s): for tools that read a build in this
    process (audit, evaluation). Members of a sample are contiguous (the writer's contract), so a sample
    ends where the key changes; KEY has no dots, so the extension is everything after the first one.
    """
    cur: dict[str, Any] | None = None
    with tarfile.open(path, mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            if f is None:
                continue
            ext = m.name.rpartition("/")[2].partition(".")[2]
            key = m.name[: len(m.name) - len(ext) - 1]
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    yield cur
                cur = {"__key__": key, "__url__": str(path)}
            data = f.read()
            if ext == "json":
                cur["json"] = json.loads(data)
            elif ext.endswith("npy"):
                cur[ext] = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                cur[ext] = data
    if cur is not None:
        yield cur


def iter_samples(build_dir_or_urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Every sample of a build (or of the given tars), in shard then key order, in this process.

    Not split by rank or worker: for training use `make_webdataset`.
    """
    import webdataset as wds

    urls = _as_urls(build_dir_or_urls)
    ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.map(decode_sample))
    yield from ds


def read_sample(build_dir: str | os.PathLike[str], key: str) -> dict[str, Any]:
    """Random access to one sample via the index (`index.parquet`, else the per-shard indexes)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    build = Path(build_dir)
    merged = build / "index.parquet"
    files = [merged] if merged.is_file() else sorted(shards_dir(build).glob("[0-9]*.index.parquet"))
    for f in files:
        t = pq.read_table(f, columns=["key", "shard", "offset", "size"])
        hit = t.filter(pc.equal(t["key"], key))
        if hit.num_rows:
            row = hit.to_pylist()[0]
            tar = tar_path(build, row["shard"])
            with open(tar, "rb") as fh:
                fh.seek(row["offset"])
                blob = fh.read(row["size"])
            return _sample_from_blob(blob + tar_trailer(len(blob)), str(tar))
    raise KeyError(f"key {key!r} not found in the index of {build}")


def _sample_from_blob(blob: bytes, url: str) -> dict[str, Any]:
    sample: dict[str, Any] = {"__url__": url}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        for m in tf:
            f = tf.extractfile(m)
            if f is None:
                continue
            ext = m.name.rpartition("/")[2].partition(".")[2]
            sample["__key__"] = m.name[: len(m.name) - len(ext) - 1]
            sample[ext.lower()] = f.read()
    return decode_sample(sample)


# ---------------------------------------------------------------- DataLoader path


def node_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments if given, else RANK/WORLD_SIZE (torchrun), else
    torch.distributed if initialized, else (0, 1)."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        rank, world_size = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
    return rank, world_size


def _worker_info() -> tuple[int, int]:
    import torch.utils.data

    wi = torch.utils.data.get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def _split_by_node(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    yield from itertools.islice(src, rank, None, world_size)


def _shuffle_shards(src: Iterable[dict[str, Any]], seed: int, epoch: int) -> Iterator[dict[str, Any]]:
    # Same permutation on every rank and worker (seeded by seed and epoch only), so the later
    # rank/worker split still gives each shard to exactly one of them.
    items = list(src)
    random.Random(f"gr3d-shards:{seed}:{epoch}").shuffle(items)
    yield from items


def _shuffle_samples(src: Iterable[Any], bufsize: int, seed: int, epoch: int, rank: int) -> Iterator[Any]:
    worker, _ = _worker_info()
    rng = random.Random(f"gr3d-samples:{seed}:{epoch}:{rank}:{worker}")
    buf: list[Any] = []
    for s in src:
        buf.append(s)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _resample_seed(seed: int, epoch: int, rank: int) -> int:
    worker, _ = _worker_info()
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + worker) & 0x7FFFFFFF


def make_webdataset(urls: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, shuffle: bool = False,
                    resampled: bool = False, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 1000,
                    rank: int | None = None, world_size: int | None = None) -> Any:
    """A webdataset `DataPipeline` of decoded samples, to wrap in a torch DataLoader.

    Not resampled: shards are split first by rank (`node_info`), then by DataLoader worker, so
    over all ranks and workers each sample is seen exactly once per epoch. With `shuffle` the
    shard order is permuted by (seed, epoch), identically everywhere, and samples go through a
    shuffle buffer seeded by (seed, epoch, rank, worker): reproducible, never seeded by time.
    Pass a new `epoch` each epoch for a new order. Needs at least world_size x num_workers shards
    for every worker to get data.

    Resampled: every rank/worker draws shards with replacement from its own seeded stream,
    endlessly; bound it with `.with_epoch(n)`.
    """
    import webdataset as wds

    url_list = _as_urls(urls)
    r, w = node_info(rank, world_size)
    if resampled:
        stages: list[Any] = [wds.ResampledShards(url_list, seed=seed, deterministic=True,
                                                 worker_seed=functools.partial(_resample_seed, seed, epoch, r))]
    else:
        if len(url_list) < w:
            raise ValueError(f"{len(url_list)} shards cannot be split over {w} ranks: some ranks would get no data")
        stages = [wds.SimpleShardList(url_list)]
        if shuffle:
            stages.append(functools.partial(_shuffle_shards, seed=seed, epoch=epoch))
        stages += [functools.partial(_split_by_node, rank=r, world_size=w), wds.split_by_worker]
    stages.append(wds.tarfile_to_samples())
    if shuffle and shuffle_buffer > 1:
        stages.append(functools.partial(_shuffle_samples, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=r))
    stages.append(wds.map(decode_sample))
    return wds.DataPipeline(*stages)
