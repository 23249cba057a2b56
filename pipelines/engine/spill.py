"""The plan's encoded items kept in files, not in the driver's memory: `BlobSpill` writes them, `BlobRef` finds one.

Why: a plan needs every input's encoded item from the listing until its chunk runs (digests, resume, the
chunk's worker), and held in memory that was ~1.9 KB per det3d input, ~1.5 GB at 780K inputs, against issue
18's budget of 0.5 KiB per input beyond the parsed source file. Spilled, the driver keeps per input its key and
a `BlobRef` (~0.25 KB together); a chunk's items are read back (one `pread` each) when it is released to an
executor, and dropped with it.

One spill per listing (`pipelines.engine.plan.encode_inputs` opens it): a temporary directory with one
append-only file per process that writes to it. A listing's forked workers inherit the active spill
(`active()`), write their items to their own file, and send the driver `BlobRef`s instead of the bytes, so a
whole file's items never cross a pipe or sit in the driver at once. A `BlobRef` unpickled in the driver finds
its spill again by directory. The directory is removed when the last reference to its spill goes (every
`BlobRef` holds one), or at exit; a driver killed by SIGKILL leaves it in the temporary directory
(`gr3d-plan-*`) until the next listing on the machine removes it (nobody holds its lock any more). The directory is under `TMPDIR`: where that is a tmpfs (memory), point `TMPDIR` at a disk
for a large build, or the items only move from the driver's heap to shared memory. The Ray Data pipeline (a
build with a model stage on an actor pool) takes every chunk at once and holds them all encoded while it hands
them over; the other executors read one chunk back at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["BlobSpill", "BlobRef", "spilling", "spilled", "active", "blob_bytes"]

_SPILLS: weakref.WeakValueDictionary[str, BlobSpill] = weakref.WeakValueDictionary()  # dir -> spill (this process)
_ACTIVE: list[BlobSpill] = []  # the spill of the listing under way, if any (inherited by forked workers)


class BlobSpill:
    """Append-only files of encoded items in a temporary directory (module docstring). One writer thread per
    process (a lock orders concurrent writers); a forked process writes a file of its own."""

    def __init__(self) -> None:
        import fcntl

        _sweep_orphans()
        self.dir = tempfile.mkdtemp(prefix=PREFIX)
        self._fds = _Fds()
        self._fds.lock = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fds.lock, fcntl.LOCK_EX)  # held while the spill lives (`_sweep_orphans`)
        self._pid = -1
        self._path = ""
        self._pos = 0
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        _SPILLS[self.dir] = self
        self._finalizer = weakref.finalize(self, _remove, self.dir, os.getpid(), self._fds)

    def put(self, blob: bytes) -> BlobRef:
        """Write `blob` to this process's file; its reference."""
        if self._lock_pid != os.getpid():  # a forked process: a lock of its own (a thread may have held ours)
            self._lock, self._lock_pid = threading.Lock(), os.getpid()
        with self._lock:
            if self._pid != os.getpid():  # first write in this process: a file of its own
                self._pid = os.getpid()
                self._path = os.path.join(self.dir, f"{self._pid}.blobs")
                self._fds.writer = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._fds.writer_pid = self._pid
                self._pos = os.lseek(self._fds.writer, 0, os.SEEK_END)
            off = self._pos
            view = memoryview(blob)
            while view:  # unbuffered: a worker's item is readable by the driver as soon as it sends the reference
                view = view[os.write(self._fds.writer, view):]
            self._pos += len(blob)
        return BlobRef(self, self._path, off, len(blob))

    def read(self, path: str, off: int, n: int) -> bytes:
        fd = self._fds.readers.get(path)
        if fd is None:
            fd = self._fds.readers[path] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, n, off)
        if len(data) != n:
            raise OSError(f"{path}: spilled plan item cut short ({len(data)} of {n} bytes at {off})")
        return data

    def close(self) -> None:
        """Close the files and remove the directory (also done when the spill is no longer referenced)."""
        self._finalizer()


PREFIX = "gr3d-plan-"


SWEEP_AFTER_S = 60.0
"""A spill directory younger than this is never swept (its owner may be between creating it and locking it)."""


def _sweep_orphans() -> None:
    """Remove the spills of drivers that died without removing theirs (SIGKILL, a crash): a `gr3d-plan-*`
    directory in the temporary folder whose lock file nobody holds. A live spill's owner holds an exclusive
    `flock` on it for the spill's life (its forked workers share that lock); a lock works across processes
    and PID namespaces sharing the folder, where a PID test would not."""
    import fcntl
    import time

    root = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(root) if n.startswith(PREFIX)]
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(root, name)
        try:
            if now - os.stat(path).st_mtime < SWEEP_AFTER_S:
                continue
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR)
        except OSError:  # gone meanwhile, no lock file (not a spill of ours), or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


LOCK_FILE = ".lock"


class _Fds:
    """The spill's open files, apart from it so that its finalizer can close them (an unlinked file still open
    keeps its disk space)."""

    def __init__(self) -> None:
        self.writer = -1
        self.writer_pid = -1
        self.lock = -1
        self.readers: dict[str, int] = {}


def _remove(path: str, owner: int, fds: _Fds) -> None:
    if os.getpid() != owner:  # a forked worker that inherited the spill: the driver's to remove
        return
    for fd in fds.readers.values():
        os.close(fd)
    fds.readers.clear()
    if fds.writer >= 0 and fds.writer_pid == owner:
        os.close(fds.writer)
        fds.writer = -1
    shutil.rmtree(path, ignore_errors=True)
    if fds.lock >= 0:  # after the removal: until then the directory is visibly in use
        os.close(fds.lock)
        fds.lock = -1


class BlobRef:
    """Where one encoded item is: a file of a `BlobSpill`, an offset and a length."""

    __slots__ = ("spill", "path", "off", "n")

    def __init__(self, spill: BlobSpill | None, path: str, off: int, n: int) -> None:
        self.spill, self.path, self.off, self.n = spill, path, off, n

    def read(self) -> bytes:
        spill = self.spill if self.spill is not None else _SPILLS.get(os.path.dirname(self.path))
        if spill is None:
            raise RuntimeError(f"spilled plan item {self.path}@{self.off} read after its spill was closed")
        return spill.read(self.path, self.off, self.n)

    def __reduce__(self) -> tuple[Any, ...]:  # a worker's reference, unpickled in the driver: its spill by directory
        return (_ref, (self.path, self.off, self.n))

    def __len__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:  # the same encoded item, wherever it is kept
        if isinstance(other, BlobRef | bytes):
            return self.read() == blob_bytes(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.read())

    def __repr__(self) -> str:
        return f"BlobRef({self.path!r}, {self.off}, {self.n})"


def _ref(path: str, off: int, n: int) -> BlobRef:
    return BlobRef(_SPILLS.get(os.path.dirname(path)), path, off, n)


def blob_bytes(blob: bytes | BlobRef) -> bytes:
    """The encoded item itself, read back if it was spilled."""
    return blob if type(blob) is bytes else blob.read()  # type: ignore[union-attr]


def spilled(blob: bytes) -> bytes | BlobRef:
    """`blob` written to the active spill (a listing worker's items), or as it is when no listing is under way."""
    spill = active()
    return spill.put(blob) if spill is not None else blob


def active() -> BlobSpill | None:
    """The spill of the listing under way in this process (or the driver a worker was forked from), if any."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def spilling() -> Iterator[BlobSpill]:
    """A new spill, active while the block runs (the listing); it lives on as long as references to it do."""
    spill = BlobSpill()
    _ACTIVE.append(spill)
    try:
        yield spill
    finally:
        _ACTIVE.remove(spill)
