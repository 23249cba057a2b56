"""Builds load in Hugging Face `datasets` (the real package) whatever their contents.

The failure this guards against: `load_dataset("webdataset", ...)` infers column types from the first
five samples, so a field null there and set later (`camera`, `object_id`) fails to cast, and
`points.npy` (N, 5) comes back as a list of lists. Every finalized build writes `features.json` and a
dataset card (shards/hf_card.py) computed over all its samples.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets  # a test dependency (pyproject dev, requirements.lock): missing it fails, never skips
import numpy as np
import pytest

from shards.hf_card import build_features, features_to_dict, features_to_yaml
from shards.layout import CARD_FILE, FEATURES_FILE, tar_path
from shards.manifest import finalize
from shards.writer import ShardWriter
from tests.test_shards_samples import FX, K, make_sample

LONG_KEY = "world/" + "long_scene_name_" * 10 + "x"


def _late_fields_build(root: Path) -> Path:
    """cot samples whose camera / object_id are null in the first six and set after; point maps of 7 points."""
    build = root / "late"
    samples = []
    for i in range(10):
        s = make_sample("cot", f"world/c{i:04d}", seed=i)
        if i >= 6:
            s.record["camera"] = {"K": copy.deepcopy(K), "scale": 1000.0 / FX}
            s.record["mentions"][1]["object_id"] = f"obj{i}"
        else:
            for m in s.record["mentions"]:
                m["object_id"] = None
        samples.append(s)
    for i in range(4):
        s = make_sample("pointmap", f"world/p{i:04d}", seed=3)  # seed 3: 5 + 3 % 4 = 8 points each
        samples.append(s)
    samples.append(make_sample("det3d", LONG_KEY))  # member names over 100 bytes: a PAX path header
    for shard, part in enumerate((samples[:7], samples[7:])):
        with ShardWriter(build, shard) as w:
            for s in part:
                w.add(s)
            w.close()
    finalize(build, {"builder": "test"}, "gr3d test")
    return build


@pytest.fixture(scope="module")
def late(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _late_fields_build(tmp_path_factory.mktemp("hf"))


def _load(**kw: Any) -> Any:
    return datasets.load_dataset(split="train", **kw)


def test_inference_alone_breaks_on_late_fields(late: Path, tmp_path: Path) -> None:
    """The bug: without the build's features, inference from the first samples fails (or loses types)."""
    files = [str(tar_path(late, 0)), str(tar_path(late, 1))]
    with pytest.raises(Exception) as ei:  # noqa: B017 - datasets wraps the cast error in its own
        _load(path="webdataset", data_files=files, cache_dir=str(tmp_path / "c"))
    chain, e = [], ei.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("cast" in m.lower() for m in chain), chain


def test_build_dir_loads_with_its_card(late: Path, tmp_path: Path) -> None:
    ds = _load(path=str(late), cache_dir=str(tmp_path / "c"))
    assert len(ds) == 15
    by_key = {r["__key__"]: r for r in ds}
    assert by_key["world/c0000"]["json"]["camera"] is None
    assert by_key["world/c0007"]["json"]["camera"]["K"] == K
    assert by_key["world/c0008"]["json"]["mentions"][1]["object_id"] == "obj8"
    assert by_key["world/c0001"]["json"]["mentions"][0]["object_id"] is None
    assert by_key[LONG_KEY]["json"]["objects"][1]["object_id"] == "t1"
    # the point maps keep their (N, 5) shape and float32 values
    feat = ds.features["points.npy"]
    assert isinstance(feat, datasets.Array2D) and feat.shape == (None, 5) and feat.dtype == "float32"
    arr = ds.with_format("numpy")[[i for i, r in enumerate(ds) if r["__key__"] == "world/p0002"][0]]["points.npy"]
    want = make_sample("pointmap", "world/p0002", seed=3).arrays["points"]
    assert arr.shape == (8, 5) and np.array_equal(arr, want)


def test_features_json_with_the_webdataset_loader(late: Path, tmp_path: Path) -> None:
    feats = datasets.Features.from_dict(json.loads((late / FEATURES_FILE).read_text()))
    files = [str(tar_path(late, 0)), str(tar_path(late, 1))]
    ds = _load(path="webdataset", data_files=files, features=feats, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 15 and ds.features == feats
    assert isinstance(feats["png"], datasets.Image) and isinstance(feats["jpg"], datasets.Image)


def test_our_serializations_are_what_datasets_reads(late: Path) -> None:
    """features.json (to_dict form) and the card's YAML list describe the same Features."""
    f = build_features([tar_path(late, 0), tar_path(late, 1)])
    from_dict = datasets.Features.from_dict(features_to_dict(f))
    from_yaml = datasets.Features._from_yaml_list(features_to_yaml(f))
    assert from_dict == from_yaml
    assert (late / CARD_FILE).read_text().startswith("---\nconfigs:")


def test_a_real_pointmap_build_loads(sample_world: Any, tmp_path: Path) -> None:
    from pipelines.cli import main

    out = tmp_path / "pm"
    assert main(["build", "pointmap", "--source", "rgbd", "--rgbd", str(sample_world.rgbd_root), "--out", str(out),
                 "--executor", "local", "--quiet", "--limit", "3"]) == 0
    from shards.reader import iter_samples

    ds = _load(path=str(out), cache_dir=str(tmp_path / "c")).with_format("numpy")
    assert len(ds) == 3
    want = {s["__key__"]: s["points.npy"] for s in iter_samples(out)}
    for row in ds:
        got = row["points.npy"]
        assert got.ndim == 2 and got.shape[1] == 5 and np.array_equal(got, want[row["__key__"]])


def test_member_walk_matches_tarfile(late: Path) -> None:
    """The header walk that reads records and npy headers sees what `tarfile` sees, long names included."""
    import tarfile

    from shards.hf_card import _tar_members

    for i in (0, 1):
        mine = [(f"{k}.{e}", d) for k, e, d in _tar_members(tar_path(late, i))]
        with tarfile.open(tar_path(late, i)) as tf:
            ref = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]  # type: ignore[union-attr]
        assert [n for n, _ in mine] == [n for n, _ in ref]
        assert all(d is None or d == r for (_, d), (_, r) in zip(mine, ref, strict=True))
        assert any(len(n) > 100 for n, _ in mine) == (i == 1)


# ---------------------------------------------------------------------- the other readers stay working
def test_webdataset_and_pandas_read_the_same_build(late: Path) -> None:
    import pandas as pd

    from shards.reader import iter_samples, shard_urls

    got = {s["__key__"]: s for s in iter_samples(late)}  # the webdataset library
    assert len(got) == 15 and got["world/p0001"]["points.npy"].shape == (8, 5)
    idx = pd.read_parquet(late / "index.parquet")
    assert sorted(idx["key"]) == sorted(got) and set(idx["corpus"]) == {"cot", "det3d", "pointmap"}
    assert len(shard_urls(late)) == 2


@pytest.mark.ray
def test_ray_data_read_webdataset(late: Path, ray_session: Any) -> None:
    import ray.data

    from shards.reader import shard_urls

    ds = ray.data.read_webdataset(shard_urls(late), decoder=None)
    rows = ds.take_all()
    assert len(rows) == 15
    keys = {r["__key__"] for r in rows}
    assert "world/c0007" in keys and LONG_KEY in keys
    rec = json.loads(next(r for r in rows if r["__key__"] == "world/c0007")["json"])
    assert rec["camera"]["K"] == K


# ---------------------------------------------------------------------- features typed by the writer
def test_writer_features_equal_the_tar_walk(late: Path) -> None:
    """Each shard's stats carry what reading its tar gives (records typed in tar order, npy headers, images)."""
    from shards.hf_card import ShardFeatures
    from shards.manifest import read_stats

    for i in (0, 1):
        entry = read_stats(late, i)["features"]
        assert entry == ShardFeatures.of_tar(tar_path(late, i)).to_json()
        back = ShardFeatures.from_json(json.loads(json.dumps(entry)))
        assert back.to_json() == entry
    assert read_stats(late, 1)["features"]["npy"]["points.npy"] == [[2, [5], "float32"]]


def test_finalize_from_stats_equals_finalize_from_tars(late: Path, tmp_path: Path) -> None:
    """features.json and the card are byte-identical whether finalize merges the stats or reads every tar
    (shards written before the stats carried features)."""
    import shutil

    from shards import jsonio
    from shards.layout import stats_path

    old = tmp_path / "old"
    shutil.copytree(late, old)
    for i in (0, 1):
        p = stats_path(old, i)
        st = jsonio.loads(p.read_bytes())
        del st["features"]
        p.write_bytes(jsonio.dumps(st) + b"\n")
    finalize(old, {"builder": "test"}, "gr3d test")
    for name in (FEATURES_FILE, CARD_FILE):
        assert (old / name).read_bytes() == (late / name).read_bytes()
    # mixed: one shard from its stats, one from its tar
    shutil.copy(stats_path(late, 0), stats_path(old, 0))
    finalize(old, {"builder": "test"}, "gr3d test")
    assert (old / FEATURES_FILE).read_bytes() == (late / FEATURES_FILE).read_bytes()


def test_struct_field_order_survives_the_stats(tmp_path: Path) -> None:
    """Arrow orders struct fields by first appearance across a shard's records (not sorted): the stats keep it."""
    from shards.hf_card import ShardFeatures, merge_features

    sf = ShardFeatures()
    for rec in ({"a": 1, "c": {"z": 1.5}}, {"a": 2, "b": None, "c": {"y": "s", "z": 2}}, {"b": [1, 2.5]}):
        sf.add_record(rec)
    entry = sf.to_json()
    assert entry["json"][0] == "struct" and [k for k, _ in entry["json"][1]] == ["a", "c", "b"]
    direct = merge_features([sf])
    via = merge_features([ShardFeatures.from_json(json.loads(json.dumps(entry)))])
    assert features_to_dict(via) == features_to_dict(direct)
    assert list(features_to_dict(direct)["json"]) == ["a", "c", "b"]
    assert features_to_dict(direct)["json"]["b"] == {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "List"}


def test_a_malformed_features_entry_is_named(late: Path, tmp_path: Path) -> None:
    import shutil

    from shards import jsonio
    from shards.layout import stats_path
    from shards.manifest import FinalizeError

    bad = tmp_path / "bad"
    shutil.copytree(late, bad)
    p = stats_path(bad, 1)
    st = jsonio.loads(p.read_bytes())
    st["features"]["json"] = ["value", "no_such_dtype"]
    p.write_bytes(jsonio.dumps(st) + b"\n")
    with pytest.raises(FinalizeError, match=r"000001\.stats\.json.*not a shard features entry"):
        finalize(bad, {"builder": "test"}, "gr3d test")
