"""verify: passes a clean build; fails, naming file and cause, on each way a build can break."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import pytest

from pipelines.cli import main
from shards import jsonio, writer
from shards.layout import stats_path, tar_path
from shards.manifest import finalize
from shards.verify import verify, verify_build
from shards.writer import ShardWriter, tar_member_bytes, tar_trailer
from tests.test_shards_samples import det3d_record, image_bytes, make_sample, mixed_samples, write_build


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("clean")
    samples = mixed_samples(9)
    write_build(build, [samples[0:3], samples[3:6], samples[6:9]],
                [[{"key": "world/r1", "stage": "read", "reason": "bad_depth", "message": "m"}], [], []])
    finalize(build, {"corpus": "mixed"}, "gr3d test")
    return build


@pytest.fixture
def build(clean_build: Path, tmp_path: Path) -> Path:
    """A private copy of the clean build to break."""
    dst = tmp_path / "build"
    shutil.copytree(clean_build, dst)
    return dst


def _causes(build: Path, **kw: bool) -> list[str]:
    return [str(p) for p in verify_build(build, **kw)]


def test_clean_build_passes(clean_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = verify(clean_build)
    assert rep.problems == [] and rep.ok
    assert (rep.n_shards, rep.n_samples, rep.n_reject_rows) == (3, 9, 1)
    assert main(["shards", "verify", str(clean_build)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: ") and "3 shards, 9 samples, 1 reject rows" in out and out.count("\n") == 1


def test_flipped_byte_in_a_tar(build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tar_path(build, 1)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x01
    p.write_bytes(bytes(data))
    causes = _causes(build)
    assert any(c.startswith("shards/000001.tar: sha256") and "differs from stats.json" in c for c in causes), causes
    assert any(c.startswith("shards/000001.tar: sha256") and "differs from manifest.json" in c for c in causes), causes
    assert not any(c.startswith("shards/000000") or c.startswith("shards/000002") for c in causes)
    assert main(["shards", "verify", str(build)]) == 1
    out = capsys.readouterr()
    assert "shards/000001.tar: sha256" in out.out and "FAILED" in out.err


def test_damaged_member_header(build: Path) -> None:
    p = tar_path(build, 0)
    with tarfile.open(p) as tf:
        second = tf.getmembers()[2]  # header of the second sample's first member
    data = bytearray(p.read_bytes())
    data[second.offset + 10] ^= 0xFF  # inside the name field: header checksum now fails
    p.write_bytes(bytes(data))
    causes = "\n".join(_causes(build))
    assert f"shards/000000.tar: unreadable tar header at byte {second.offset}" in causes, causes
    assert "shards/000000.tar: holds 1 samples, stats.json says 3" in causes


def test_missing_stats_file(build: Path) -> None:
    stats_path(build, 2).unlink()
    causes = _causes(build)
    assert any(c.startswith("shards/000002.stats.json: missing: the shard did not finish") for c in causes), causes


def test_gap_in_numbering(build: Path) -> None:
    for suffix in (".tar", ".stats.json", ".index.parquet", ".rejects.parquet"):
        (build / "shards" / f"000001{suffix}").unlink()
    causes = _causes(build)
    assert any(c.startswith("shards/000001.tar: missing: gap in shard numbering") for c in causes), causes
    assert "shards/000001.tar: listed in manifest.json but missing or unreadable" in causes  # manifest disagrees


def test_record_breaking_its_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = make_sample("det3d", "world/bad")
    bad.record["objects"][1]["box3d"]["dimensions"][0] = -0.5
    monkeypatch.setattr(writer, "validate_record", lambda kind, rec: None)  # write it bypassing validation
    with ShardWriter(tmp_path, 0) as w:
        w.add(make_sample("cot", "world/good"))
        w.add(bad)
    monkeypatch.undo()
    causes = _causes(tmp_path, require_manifest=False)
    assert causes == ["shards/000000.tar:world/bad.json: invalid det3d record: objects[1].box3d.dimensions[0]: "
                      "-0.5 is less than or equal to the minimum of 0 [exclusiveMinimum]"]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    body = b"".join(tar_member_bytes(n, d) for n, d in members)
    path.write_bytes(body + tar_trailer(len(body)))


def test_dotted_key_in_a_hand_made_tar(build: Path) -> None:
    rec = det3d_record("scene0000_00.frame")  # breaks the key rule: webdataset would see key "scene0000_00"
    _write_tar(tar_path(build, 0), [("scene0000_00.frame.json", jsonio.dumps(rec)),
                                    ("scene0000_00.frame.jpg", image_bytes("jpg", 1))])
    causes = _causes(build)
    dotted = [c for c in causes if c.startswith("shards/000000.tar:scene0000_00.frame.")]
    assert dotted and all("a dot in the key?" in c for c in dotted), causes
    # webdataset's view: a sample "scene0000_00" with extensions "frame.json", "frame.jpg" and no record
    assert "shards/000000.tar:scene0000_00: no KEY.json record" in causes, causes


def test_members_not_contiguous_and_bad_metadata(build: Path) -> None:
    s = make_sample("cot", "world/a")
    t = make_sample("cot", "world/b")
    _write_tar(tar_path(build, 0), [("world/a.json", jsonio.dumps(s.record)), ("world/b.json", jsonio.dumps(t.record)),
                                    ("world/a.jpg", s.image_bytes), ("world/b.jpg", t.image_bytes)])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:  # a tar made by other tools: real mtime
        ti = tarfile.TarInfo("world/z.json")
        data = jsonio.dumps(make_sample("cot", "world/z").record)
        ti.size, ti.mtime = len(data), 1_700_000_000
        tf.addfile(ti, io.BytesIO(data))
    tar_path(build, 1).write_bytes(buf.getvalue())
    causes = "\n".join(_causes(build))
    assert "shards/000000.tar:world/a: members of the sample are not contiguous" in causes
    assert "shards/000000.tar:world/b: members of the sample are not contiguous" in causes
    assert "shards/000001.tar:world/z.json: tar metadata not fixed (mtime=1700000000" in causes
    assert "shards/000001.tar:world/z: expected exactly one image member" in causes


def test_duplicates_leftovers_and_index_mismatch(build: Path) -> None:
    shutil.copy(tar_path(build, 0), tar_path(build, 1))  # shard 1 now repeats shard 0's keys
    (build / "shards" / ".000002.tar.x1y2.tmp").write_bytes(b"")
    causes = "\n".join(_causes(build))
    assert "duplicate key: also in shards/000000.tar" in causes
    assert "shards/000001.index.parquet: row (key, shard, offset, size)" in causes
    assert "shards/.000002.tar.x1y2.tmp: leftover temp file" in causes


def test_manifest_required_unless_told(clean_build: Path, build: Path) -> None:
    (build / "manifest.json").unlink()
    assert _causes(build) == ["manifest.json: missing: the build was not finalized"]
    assert _causes(build, require_manifest=False) == []
    assert verify_build(build.parent / "nothing") and "no shards/ folder" in str(verify_build(build.parent / "nothing")[0])


def test_show_prints_the_record_and_ply_hook(clean_build: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["shards", "show", str(clean_build), "world/s0001"]) == 0
    out = capsys.readouterr().out
    assert '"key": "world/s0001"' in out and "# points.npy: array float32 [6, 5]" in out
    assert main(["shards", "show", str(clean_build), "world/none"]) == 2
    assert "not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pipelines.corpora.pointmaps.export", None)  # module absent
    assert main(["shards", "show", str(clean_build), "world/s0001", "--ply", "/tmp/x.ply"]) == 2
    assert "--ply needs the point-map exporter" in capsys.readouterr().err


def test_show_ply_says_which_points_it_exported(clean_build: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No depth in the shard nor under --data-root: the 6 sampled points, and the output says so."""
    out_ply = tmp_path / "x.ply"
    assert main(["shards", "show", str(clean_build), "world/s0001", "--ply", str(out_ply),
                 "--data-root", str(tmp_path)]) == 0
    cap = capsys.readouterr()
    assert f"# wrote {out_ply}: 6 points, the sampled points (KEY.points.npy)" in cap.out
    assert "no depth map for world/s0001" in cap.err and "exported the 6 sampled points only" in cap.err
    assert out_ply.stat().st_size > 0
