"""`pipelines.engine.spill`: the plan's encoded items in files, their references, and what the driver keeps."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from pipelines.engine import spill as spill_mod
from pipelines.engine.plan import EncodedItem, decode_item, encode_inputs, encode_item, make_plan
from pipelines.engine.spill import BlobRef, BlobSpill, active, blob_bytes, spilled, spilling


def _items(n: int, payload: int = 2000) -> list[dict[str, Any]]:
    return [{"key": f"k/{i:06d}", "x": [float(i)] * (payload // 9), "name": f"item {i}"} for i in range(n)]


def test_refs_read_back_the_bytes_and_compare_by_content() -> None:
    spill = BlobSpill()
    refs = [spill.put(b"abc"), spill.put(b""), spill.put(bytes(range(256)) * 40)]
    assert [blob_bytes(r) for r in refs] == [b"abc", b"", bytes(range(256)) * 40]
    assert [len(r) for r in refs] == [3, 0, 10240]
    assert refs[0] == b"abc" and refs[0] == spill.put(b"abc") and refs[0] != refs[2]
    again = pickle.loads(pickle.dumps(refs[2]))  # what a worker sends: found again by its directory
    assert again.spill is spill and again.read() == refs[2].read()
    d = spill.dir
    spill.close()
    assert not os.path.exists(d)
    with pytest.raises((RuntimeError, OSError)):
        BlobRef(None, os.path.join(d, "1.blobs"), 0, 3).read()


def test_the_directory_goes_with_the_last_reference() -> None:
    with spilling() as spill:
        assert active() is spill
        ref = spilled(b"payload")
    assert active() is None and spilled(b"x") == b"x"  # no listing under way: the bytes as they are
    d = spill.dir
    del spill
    gc.collect()
    assert os.path.isdir(d) and ref.read() == b"payload"  # the reference keeps its spill
    del ref
    gc.collect()
    assert not os.path.exists(d)


def _forked_put(conn: Any) -> None:
    conn.send([spilled(b"from the worker %d" % i) for i in range(3)])
    conn.close()


def test_a_forked_worker_writes_its_own_file_and_the_driver_reads_it() -> None:
    ctx = multiprocessing.get_context("fork")
    with spilling() as spill:
        mine = spill.put(b"from the driver")
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_forked_put, args=(send,))
        p.start()
        send.close()
        theirs = recv.recv()
        p.join()
    assert p.exitcode == 0
    assert [r.read() for r in theirs] == [b"from the worker %d" % i for i in range(3)]
    assert {r.path for r in theirs} != {mine.path} and all(r.spill is spill for r in theirs)
    assert mine.read() == b"from the driver"
    assert os.path.isdir(spill.dir)  # the worker's exit did not remove the driver's directory


def test_the_plan_keeps_under_half_a_kib_per_input(tmp_path: Path) -> None:
    """Issue 18's driver budget: what the plan holds per input after the listing (a key and a reference), not the
    ~2 KB encoded item; a released chunk carries the items themselves, as before."""
    items = _items(3000)
    assert len(encode_item(items[0])) > 1800
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        enc = encode_inputs(iter(items))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert kept / len(enc) < 512, kept / len(enc)
    plan = make_plan("toy", {}, enc, tmp_path / "b", 1000)
    c = plan.release(2)
    assert all(type(b) is bytes for b in c.items) and [decode_item(b) for b in c.items] == items[2000:]
    assert encode_inputs([EncodedItem(it["key"], encode_item(it)) for it in items[:3]]).pairs[0][1] == \
        encode_item(items[0])


def test_a_dry_run_leaves_no_spill_behind(sample_world: Any, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "build", "det3d", "--omni3d",
                          str(sample_world.omni3d_files[0]), "--data-root", str(sample_world.root), "--out",
                          str(tmp_path / "out"), "--dry-run", "--quiet"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(root)}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "to do" in res.stdout and list(tmp.iterdir()) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_dropped_plan_closes_its_files(tmp_path: Path) -> None:
    """An unlinked file still open keeps its disk space: the spill's finalizer closes every file it opened."""
    gc.collect()
    before = _open_fds()
    for k in range(4):
        plan = make_plan("toy", {}, iter(_items(300, 200)), tmp_path / f"b{k}", 100, ignore_existing=True)
        assert plan.release(0).items and plan.release(2).items
        d = plan.chunks[0].items[0].spill.dir
        del plan
        gc.collect()
        assert not os.path.exists(d)
    assert _open_fds() == before


def test_concurrent_writers_get_their_own_bytes() -> None:
    import threading

    spill = BlobSpill()
    out: list[list[tuple[bytes, BlobRef]]] = [[] for _ in range(4)]

    def write(t: int) -> None:
        for i in range(500):
            b = f"thread {t} item {i} ".encode() * (1 + i % 7)
            out[t].append((b, spill.put(b)))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(ref.read() == b for part in out for b, ref in part)
    spill.close()


def test_a_killed_drivers_spill_is_swept_by_the_next_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL leaves a spill behind; the next spill on the machine removes it once nobody holds its lock, and
    never a live process's."""
    import signal

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    root = Path(__file__).resolve().parents[1]
    code = ("import os, sys, time\n"
            "from pipelines.engine.spill import BlobSpill\n"
            "s = BlobSpill(); s.put(b'x' * 100); print(s.dir, flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(tmp_path)})
    left = Path(p.stdout.readline().strip())
    monkeypatch.setattr(spill_mod, "SWEEP_AFTER_S", 0.0)
    live = BlobSpill()  # while the other process runs: its spill stays (its lock is held)
    assert left.is_dir() and left.parent == tmp_path
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert left.is_dir()  # what SIGKILL leaves
    other = BlobSpill()
    assert not left.exists() and Path(live.dir).is_dir() and Path(other.dir).is_dir()
    monkeypatch.setattr(spill_mod, "SWEEP_AFTER_S", 3600.0)  # a young directory is never swept, lock or not
    young = tmp_path / "gr3d-plan-young"
    young.mkdir()
    (young / ".lock").touch()
    BlobSpill().close()
    assert young.is_dir()
    live.close()
    other.close()
