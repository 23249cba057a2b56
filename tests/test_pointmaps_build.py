"""`gr3d build pointmap` end to end: same bytes on the plain loop, Ray and Beam; resume; CLI; PLY export.

The input is a damaged copy of the sample world's RGB-D folder (good frames plus frames that must end as
reject rows at each stage), so the reject path is byte-compared too.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.corpora.pointmaps.builder import PointmapConfig, make_builder
from pipelines.corpora.pointmaps.sampling import SamplerConfig
from pipelines.engine.options import BuildOptions
from pipelines.engine.run import run_build
from shards.reader import iter_samples, read_sample
from shards.verify import verify_build

REASONS = {"bad_depth": 1, "unreadable_image": 1, "too_few_valid_pixels": 1}


@pytest.fixture(scope="module")
def damaged_rgbd(sample_world, tmp_path_factory) -> Path:
    """6 good frames + 3 bad ones: truncated depth PNG, broken image, empty depth."""
    root = tmp_path_factory.mktemp("pm_rgbd") / "rgbd"
    shutil.copytree(sample_world.rgbd_root, root)
    s = root / "scene0001"
    for i, what in enumerate(("trunc", "image", "empty")):
        stem = s / f"00010{i}"
        shutil.copy(s / "000000.json", f"{stem}.json")
        shutil.copy(s / "000000.png", f"{stem}.png")
        if what == "trunc":
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(1, 9000, (240, 320)).astype(np.uint16)).save(buf, "PNG")
            Path(f"{stem}.depth.png").write_bytes(buf.getvalue()[:5000])
        elif what == "image":
            Path(f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
            shutil.copy(s / "000000.depth.npy", f"{stem}.depth.npy")
        else:
            np.save(f"{stem}.depth.npy", np.zeros((240, 320), np.float32))
    return root


def _builder(root: Path, **kw):
    return make_builder(PointmapConfig("rgbd", rgbd=root, sampler=SamplerConfig(n=50, mode="edge_avoiding"), **kw))


def _digests(build: Path) -> dict[str, str]:
    files = sorted((build / "shards").glob("*.tar")) + [build / "index.parquet", build / "rejects.parquet"]
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    m = json.loads((build / "manifest.json").read_text())
    out["manifest.shards"] = json.dumps(m.get("shards"), sort_keys=True)
    return out


def test_same_bytes_on_local_ray_and_beam(damaged_rgbd, tmp_path, ray_session) -> None:
    digests = {}
    for executor, workers in (("local", None), ("ray", 2), ("beam", 1)):
        out = tmp_path / executor
        res = run_build(_builder(damaged_rgbd), out,
                        BuildOptions.on(executor, workers=workers, chunk_size=4, show_progress=False))
        assert res.manifest["rejects_by_reason"] == REASONS
        assert verify_build(out) == []
        digests[executor] = _digests(out)
    assert len(digests["local"]) == 3 + 2 + 1  # 9 inputs in chunks of 4: 3 shards
    assert digests["local"] == digests["ray"] == digests["beam"]
    samples = list(iter_samples(tmp_path / "ray"))
    assert len(samples) == 6 and all(s["points.npy"].shape == (50, 5) for s in samples)


def test_resume_redoes_only_the_unfinished_chunk(damaged_rgbd, tmp_path) -> None:
    out = tmp_path / "b"
    first = run_build(_builder(damaged_rgbd), out, BuildOptions.on("local", chunk_size=4, show_progress=False))
    assert first.processed == [0, 1, 2]
    before = _digests(out)
    (out / "shards" / "000001.stats.json").unlink()  # as if killed while writing chunk 1
    (out / "shards" / "000001.tar").write_bytes(b"torn")
    again = run_build(_builder(damaged_rgbd), out, BuildOptions.on("local", show_progress=False))
    assert again.processed == [1] and again.plan.done == [0, 2]
    assert _digests(out) == before
    assert json.loads((out / "run.json").read_text())["chunks_processed"] == [1]


def test_cli_build_show_and_ply_export(sample_world, tmp_path, capsys, monkeypatch) -> None:
    """EmbodiedScan source (160x120 depth, 320x240 colour) with --keep-depth, then `shards show --ply`."""
    import open3d as o3d

    from pipelines.cli import main
    from pipelines.corpora.pointmaps.export import cloud_of_sample
    from tests.test_pointmaps import surface_distance

    out = tmp_path / "es"
    rc = main(["build", "pointmaps", "--source", "embodiedscan", "--embodiedscan",
               *map(str, sample_world.embodiedscan_files), "--data-root", str(sample_world.root), "--out", str(out),
               "--executor", "local", "--quiet", "--points", "64", "--mode", "depth_stratified",
               "--conversations", "2", "--points-per-conversation", "8", "--keep-depth"])  # fmt: skip
    assert rc == 0
    assert "written: 6" in capsys.readouterr().out
    gt = sample_world.ground_truth["scenes"][0]
    view = gt["views"][0]
    key = "embodiedscan/sample_world/scene0000/000000"
    s = read_sample(out, key)
    rec = s["json"]
    assert rec["points"] == {"n": 64, "mode": "depth_stratified"} and rec["arrays"] == ["depth", "depth_k", "points"]
    assert [len(c["turns"]) for c in rec["conversations"]] == [16, 16]
    assert s["depth.npy"].shape == (120, 160) and np.allclose(s["depth_k.npy"], view["depth_K"])

    ply = tmp_path / "cloud.ply"
    assert main(["shards", "show", str(out), key, "--ply", str(ply)]) == 0
    pc = o3d.io.read_point_cloud(str(ply))
    xyz, rgb = np.asarray(pc.points), np.asarray(pc.colors)
    n_valid = int(np.count_nonzero(s["depth.npy"]))
    assert 0.5 * n_valid < len(xyz) <= n_valid  # the full cloud (minus what the colour camera does not see)
    assert surface_distance(xyz, gt, view)[0].max() <= 0.002
    assert rgb.shape == xyz.shape and rgb.std() > 0.05  # coloured from the image

    # without stored depth: re-read from the data root named in the record, else the sampled points
    s2 = {k: v for k, v in s.items() if k not in ("depth.npy", "depth_k.npy")}
    xyz2, _, what = cloud_of_sample(s2, data_root=sample_world.root)
    assert what == "source_depth" and np.allclose(np.sort(xyz2, axis=0), np.sort(xyz, axis=0), atol=1e-6)
    monkeypatch.chdir(tmp_path)
    xyz3, _, what = cloud_of_sample(s2)
    assert what == "sampled_points" and np.allclose(xyz3, s["points.npy"][:, 2:5])


def test_cli_reports_bad_options(tmp_path, capsys) -> None:
    from pipelines.cli import main

    rc = main(["build", "pointmaps", "--source", "omni3d", "--out", str(tmp_path / "x"), "--executor", "local"])
    assert rc == 2 and "needs --omni3d" in capsys.readouterr().err
