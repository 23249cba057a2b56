"""`gr3d sample-world` at scale: parallel scenes give the serial bytes, progress lines, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.sample_world.world import generate

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_parallel_scenes_write_the_serial_bytes(tmp_path):
    args = {"scenes": 3, "views": 1, "seed": 5, "width": 96, "height": 64}
    generate(tmp_path / "serial", workers=1, **args)
    generate(tmp_path / "parallel", workers=2, **args)
    a, b = _tree(tmp_path / "serial"), _tree(tmp_path / "parallel")
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "sample-world", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip


def test_cli_reports_progress_and_workers(tmp_path):
    r = _cli("--out", str(tmp_path / "w"), "--scenes", "2", "--views", "1", "--width", "64", "--height", "48",
             "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "[gr3d] sample-world: scene 2/2 100%" in r.stderr
    assert "2 workers" in r.stdout
    q = _cli("--out", str(tmp_path / "q"), "--scenes", "1", "--views", "1", "--width", "64", "--height", "48",
             "--quiet")
    assert q.returncode == 0 and q.stderr == ""


@pytest.mark.parametrize("argv, code, text", [
    (["--scenes", "1", "--seed", "-1"], 2, "seed >= 0"),
    (["--scenes", "1", "--width", "33"], 2, "even"),
    (["--scenes", "x"], 2, "--scenes"),
    (["--scenes", "0"], 2, "must be >= 1"),
    (["--workers", "0"], 2, "--workers"),
    (["--views", "1000"], 2, "views"),
    (["--out-of-place"], 2, "unrecognized"),
], ids=["seed", "width", "scenes-type", "scenes-zero", "workers", "views", "unknown"])  # fmt: skip
def test_cli_errors_are_one_line(tmp_path, argv, code, text):
    r = _cli("--out", str(tmp_path / "w"), "--views", "1", "--width", "64", "--height", "48", *argv)
    assert r.returncode == code
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("gr3d sample-world: error: ") and text in r.stderr


def test_cli_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("--out", str(blocker), "--scenes", "1", "--views", "1", "--width", "64", "--height", "48")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write the world to {blocker}" in r.stderr
    r = _cli("--scenes", "1")  # --out missing
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--out" in r.stderr
