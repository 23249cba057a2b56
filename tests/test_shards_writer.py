"""ShardWriter: round trip, byte-identical output whatever the add order, the completion marker."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shards import jsonio
from shards.layout import clean_partial, index_path, is_done, rejects_path, shards_dir, stats_path, tar_path
from shards.reader import iter_samples, read_sample, shard_urls
from shards.writer import SampleError, ShardWriter
from tests.test_shards_samples import make_sample, mixed_samples

REJECTS = [
    {"key": "world/s9001", "stage": "florence", "reason": "no_objects", "message": "nothing detected"},
    {"key": "world/s0001", "stage": "verify", "reason": "object_dropped", "message": "object 3 failed the VLM check"},
    {"key": "world/s9000", "stage": "read", "reason": "bad_depth", "message": "depth all zero"},
]


def _write(build: Path, samples: list, rejects: list | None = None, **close_kw: object) -> dict:
    with ShardWriter(build, 0) as w:
        for s in samples:
            w.add(s)
        return w.close(rejects=rejects or [], **close_kw)


def test_round_trip_jpg_png_npy(tmp_path: Path) -> None:
    samples = mixed_samples(6)
    stats = _write(tmp_path, samples)
    assert shard_urls(tmp_path) == [str(tar_path(tmp_path, 0))]
    got = list(iter_samples(tmp_path))
    by_key = {s.key: s for s in samples}
    assert [g["__key__"] for g in got] == sorted(by_key)  # sorted by key
    for g in got:
        s = by_key[g["__key__"]]
        assert g["json"] == s.record  # record as written
        assert g[s.image_ext] == s.image_bytes  # original image bytes, unchanged
        for name, arr in s.arrays.items():
            back = g[f"{name}.npy"]
            assert back.dtype == arr.dtype and np.array_equal(back, arr)
        assert set(g) - {"__key__", "__url__"} == {"json", s.image_ext} | {f"{n}.npy" for n in s.arrays}
    assert stats["n_samples"] == 6 and stats["by_corpus"] == {"cot": 2, "det3d": 2, "pointmap": 2}
    # random access through the per-shard index gives the same sample
    one = read_sample(tmp_path, "world/s0004")
    assert one["json"] == by_key["world/s0004"].record
    assert np.array_equal(one["points.npy"], by_key["world/s0004"].arrays["points"])
    with pytest.raises(KeyError, match="nope"):
        read_sample(tmp_path, "nope")


def test_same_input_any_add_order_gives_identical_bytes(tmp_path: Path) -> None:
    samples = mixed_samples(9)
    shuffled = samples[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != samples
    _write(tmp_path / "a", samples, REJECTS, stats_extra={"florence_candidates": 12})
    _write(tmp_path / "b", shuffled, list(reversed(REJECTS)), stats_extra={"florence_candidates": 12})
    for f in (tar_path, index_path, rejects_path, stats_path):
        a, b = f(tmp_path / "a", 0).read_bytes(), f(tmp_path / "b", 0).read_bytes()
        assert a == b, f(tmp_path / "a", 0).name
        assert len(a) > 0


def test_tar_layout_and_fixed_metadata(tmp_path: Path) -> None:
    samples = mixed_samples(4)
    _write(tmp_path, samples)
    with tarfile.open(tar_path(tmp_path, 0)) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[:2] == ["world/s0000.json", "world/s0000.jpg"]
    assert names[2:5] == ["world/s0001.json", "world/s0001.png", "world/s0001.points.npy"]
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
    # index offsets point at each sample's first member
    idx = pq.read_table(index_path(tmp_path, 0)).to_pylist()
    assert [r["key"] for r in idx] == sorted(s.key for s in samples)
    first = {m.name: m.offset for m in members}
    for r in idx:
        assert first[f"{r['key']}.json"] == r["offset"]
    assert idx[1]["n_points"] == samples[1].record["points"]["n"] and idx[1]["n_objects"] is None
    assert idx[0]["n_objects"] == 2 and idx[2]["n_mentions"] == 2 and idx[0]["dataset"] == "sample_world/omni3d"
    assert sum(r["size"] for r in idx) + 1024 <= tar_path(tmp_path, 0).stat().st_size


def test_stats_and_rejects(tmp_path: Path) -> None:
    stats = _write(tmp_path, mixed_samples(3), REJECTS, n_input=5, stats_extra={"timing": {"write_s": 0.1}, "k": 1})
    on_disk = jsonio.loads(stats_path(tmp_path, 0).read_bytes())
    assert on_disk == stats
    assert stats["n_input"] == 5 and stats["n_samples"] == 3
    assert stats["n_rejected"] == 2  # s9000, s9001; s0001's reject is a dropped object of a kept sample
    assert stats["n_reject_rows"] == 3
    assert stats["rejects_by_reason"] == {"bad_depth": 1, "no_objects": 1, "object_dropped": 1}
    assert stats["timing"] == {"write_s": 0.1} and stats["extra"] == {"k": 1}
    assert stats["sha256"] == hashlib.sha256(tar_path(tmp_path, 0).read_bytes()).hexdigest()
    rows = pq.read_table(rejects_path(tmp_path, 0)).to_pylist()
    assert [r["key"] for r in rows] == ["world/s0001", "world/s9000", "world/s9001"]
    assert set(rows[0]) == {"key", "shard", "stage", "reason", "message"}


def test_dropped_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 inputs were dropped silently"):
        _write(tmp_path, mixed_samples(3), REJECTS, n_input=6)
    assert not is_done(tmp_path, 0)


def test_bad_samples_are_refused_naming_the_key(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 0)
    good = make_sample("det3d", "world/a")
    w.add(good)
    with pytest.raises(SampleError, match="duplicate key 'world/a'"):
        w.add(make_sample("det3d", "world/a"))
    bad = make_sample("det3d", "world/b")
    bad.record["objects"][0]["box3d"]["dimensions"][2] = -1
    with pytest.raises(SampleError, match=r"world/b.*objects\[0\]\.box3d\.dimensions\[2\]"):
        w.add(bad)
    with pytest.raises(SampleError, match="contains a dot"):
        w.add(dataclasses.replace(make_sample("cot", "x"), key="x.y"))
    s = make_sample("cot", "world/c")
    with pytest.raises(SampleError, match="differs from the sample key"):
        w.add(dataclasses.replace(s, key="world/d"))
    s = make_sample("cot", "world/e")
    s.record["image"]["width"] = 33
    with pytest.raises(SampleError, match="image is 32x24 but the record says 33x24"):
        w.add(s)
    s = make_sample("pointmap", "world/f")
    with pytest.raises(SampleError, match="not a png file"):
        w.add(dataclasses.replace(s, image_bytes=make_sample("det3d", "q").image_bytes))
    s = make_sample("pointmap", "world/g")
    s.arrays["points"] = s.arrays["points"].astype(np.float64)
    with pytest.raises(SampleError, match="float32"):
        w.add(s)
    s = make_sample("pointmap", "world/h")
    s.arrays["depth"] = np.zeros((2, 2), np.float16)
    with pytest.raises(SampleError, match=r"record arrays \['points'\] != sample arrays \['depth', 'points'\]"):
        w.add(s)
    with pytest.raises(ValueError, match=r"reason"):
        w.add_reject({"key": "k", "stage": "s", "reason": "Bad Reason", "message": ""})
    stats = w.close()
    assert stats["n_samples"] == 1  # only the good one went in


def test_reject_dataclass_is_accepted(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Reject:
        key: str
        stage: str
        reason: str
        message: str

    with ShardWriter(tmp_path, 3) as w:
        w.add_reject(Reject("world/z", "read", "missing_image", "no such file"))
    assert is_done(tmp_path, 3)
    assert jsonio.loads(stats_path(tmp_path, 3).read_bytes())["n_rejected"] == 1
    assert list(iter_samples(str(tar_path(tmp_path, 3)))) == []  # an empty shard is still a valid tar


def test_completion_marker_and_cleanup(tmp_path: Path) -> None:
    assert not is_done(tmp_path, 0)
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, 0) as w:
        w.add(make_sample("cot", "world/a"))
        raise RuntimeError("boom")
    assert not is_done(tmp_path, 0)
    assert sorted(p.name for p in shards_dir(tmp_path).iterdir()) == []  # nothing left: not even temp files
    _write(tmp_path, mixed_samples(2))
    assert is_done(tmp_path, 0)
    # a crash between tar and stats leaves a tar without marker (+ a temp file): clean_partial removes both
    stats_path(tmp_path, 0).unlink()
    (shards_dir(tmp_path) / ".000000.tar.abc123.tmp").write_bytes(b"partial")
    assert not is_done(tmp_path, 0)
    removed = {p.name for p in clean_partial(tmp_path, 0)}
    assert removed == {".000000.tar.abc123.tmp", "000000.tar", "000000.index.parquet", "000000.rejects.parquet"}
    # a done chunk is left alone unless forced
    _write(tmp_path, mixed_samples(2))
    assert clean_partial(tmp_path, 0) == [] and is_done(tmp_path, 0)
    # a torn stats file does not count as done
    stats_path(tmp_path, 0).write_bytes(b'{"version": 1, "sha')
    assert not is_done(tmp_path, 0)


def test_npy_members_are_plain_npy(tmp_path: Path) -> None:
    s = make_sample("pointmap", "world/p", seed=2)
    s.arrays["points"] = np.asfortranarray(s.arrays["points"])
    _write(tmp_path, [s])
    with tarfile.open(tar_path(tmp_path, 0)) as tf:
        data = tf.extractfile("world/p.points.npy").read()
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    assert arr.flags.c_contiguous and np.array_equal(arr, s.arrays["points"])


def test_index_dataset_column_is_lower_case(tmp_path: Path) -> None:
    """Sources spell datasets their own way (SUNRGBD, SampleWorld, embodiedscan); the index uses one case."""
    samples = mixed_samples(3)
    for s, name in zip(samples, ("SampleWorld", "SUNRGBD", "embodiedscan"), strict=True):
        s.record["source"]["dataset"] = name
    _write(tmp_path, samples)
    idx = pq.read_table(index_path(tmp_path, 0)).to_pylist()
    assert sorted(r["dataset"] for r in idx) == ["embodiedscan", "sampleworld", "sunrgbd"]
    assert {g["json"]["source"]["dataset"] for g in iter_samples(tmp_path)} == {"SampleWorld", "SUNRGBD", "embodiedscan"}
