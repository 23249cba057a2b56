"""The shard writer: one chunk of inputs -> one byte-reproducible WebDataset tar plus its side files.

Output of chunk `i` (NNNNNN = i zero-padded to 6 digits), all under `build_dir/shards/`:
`NNNNNN.tar`, `NNNNNN.index.parquet` (one row per sample), `NNNNNN.rejects.parquet` and, LAST,
`NNNNNN.stats.json`: a chunk is done exactly when its stats file exists, so an interrupted run is
resumed by redoing every chunk without one (`shards.layout`: `is_done`, `clean_partial`).

Determinism (docs/formats.md, "Shards"): the tar's bytes depend only on the samples' content. Samples are sorted
by key at close whatever the order of `add`; every member has mtime 0, uid/gid 0, empty
uname/gname, mode 0o644, PAX format; records are canonical JSON (`shards.jsonio`); arrays are
`np.save` of C-ordered data; the Parquet files have a fixed Arrow schema and writer options.
Each file is written to a temp name in the same directory, fsynced and renamed, so a reader
never sees half a file.

While adding, each sample's tar bytes are spooled to an anonymous temp file (not kept in RAM);
`close` copies them in key order into the final tar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import records
from shards import hf_card, jsonio
from shards.keys import InvalidKey, validate_key
from shards.layout import (
    clean_partial,
    index_path,
    rejects_path,
    shard_name,
    shards_dir,
    stats_path,
    tar_path,
)

__all__ = [
    "IMAGE_EXTS", "INDEX_SCHEMA", "REJECTS_SCHEMA", "Sample", "SampleError", "ShardWriter", "atomic_write", "check_sample",
    "dataset_id", "image_problem", "member_names", "sniff_image_ext", "tar_member_bytes", "tar_trailer", "write_parquet",
]

IMAGE_EXTS = ("jpg", "png")
ARRAY_NAME = re.compile(r"[a-z0-9_]+")
TAR_FORMAT = tarfile.PAX_FORMAT
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads archives to this, so do we
_MAGIC = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}


def sniff_image_ext(data: bytes) -> str | None:
    """"png" or "jpg" from a file's first bytes, else None. Shards keep original bytes, so only these two."""
    return next((ext for ext, magic in _MAGIC.items() if bytes(data[:8]).startswith(magic)), None)
# A module global, looked up at each call, so a test can swap it to write a deliberately broken record.
validate_record: Callable[[str, Any], None] = records.validate



def dataset_id(name: str) -> str:
    """The index's `dataset` column: the record's `source.dataset` in lower case (one convention).

    Sources name datasets their own way (Omni3D's `SUNRGBD`, `ARKitScenes`, our `embodiedscan`, `rgbd`);
    the record keeps that spelling for provenance, the index lower-cases it so filters and group-bys on
    `index.parquet` see one convention (docs/interfaces.md).
    """
    return name.lower()


INDEX_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("corpus", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("image_ext", pa.string(), nullable=False),
    pa.field("image_bytes", pa.int64(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("n_objects", pa.int32()),
    pa.field("n_points", pa.int64()),
    pa.field("n_mentions", pa.int32()),
    pa.field("offset", pa.int64(), nullable=False),  # byte offset of the sample's first member header in the tar
    pa.field("size", pa.int64(), nullable=False),  # bytes of all its members (headers + padded data)
])
REJECTS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
])


class SampleError(ValueError):
    """A sample cannot go into a shard (bad key, duplicate, record/image/array mismatch); names the key."""


@dataclass
class Sample:
    """One image and everything that goes with it: `KEY.json`, `KEY.<image_ext>`, `KEY.NAME.npy`."""

    key: str
    image_bytes: bytes
    image_ext: str
    record: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def tar_member_bytes(name: str, data: bytes) -> bytes:
    """Header + data + padding of one regular-file member, with the fixed metadata."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    header = ti.tobuf(format=TAR_FORMAT, encoding="utf-8", errors="strict")
    return header + data + b"\0" * (-len(data) % _BLOCK)


def tar_trailer(body_size: int) -> bytes:
    """End-of-archive blocks and padding, exactly as `tarfile` writes them."""
    end = body_size + 2 * _BLOCK
    return b"\0" * (2 * _BLOCK + (-end % _RECORD))


def member_names(key: str, image_ext: str, array_names: Iterable[str]) -> list[str]:
    """Member order of one sample: json, image, then arrays sorted by name."""
    return [f"{key}.json", f"{key}.{image_ext}", *(f"{key}.{n}.npy" for n in sorted(array_names))]


def _npy_bytes(arr: np.ndarray) -> bytes:
    if not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------- atomic files


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temp file in the same directory, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_parquet(path: Path, table: pa.Table) -> str:
    """Deterministic Parquet (fixed options, no pandas metadata), written atomically; returns its sha256."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3, use_dictionary=False,
                   write_statistics=True, version="2.6", data_page_version="1.0", store_schema=True)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def _normalize_reject(r: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        d = dataclasses.asdict(r)
    elif isinstance(r, Mapping):
        d = dict(r)
    else:
        try:
            d = {k: getattr(r, k) for k in ("key", "stage", "reason", "message")}
        except AttributeError as e:
            raise ValueError(f"reject {r!r} is not a mapping or a Reject-like object: {e}") from e
    validate_record("reject", d)
    return d


def check_sample(s: Sample, rec: Mapping[str, Any], *, check_images: bool = True) -> None:
    """Rules that tie a schema-valid record to the sample's other members (shared with `shards.verify`).

    Record key = sample key; image ext, magic number and (with `check_images`) completeness
    (`image_problem`) and pixel size match the record; declared arrays = present arrays, named `[a-z0-9_]+` (webdataset lower-cases
    extensions); for point maps `points` is finite float32 (n, 5) with n = `points.n`.
    Raises `SampleError` naming the key.
    """
    key = s.key
    if rec.get("key") != key:
        raise SampleError(f"sample {key!r}: record key {rec.get('key')!r} differs from the sample key")
    if s.image_ext not in IMAGE_EXTS:
        raise SampleError(f"sample {key!r}: image_ext {s.image_ext!r} is not one of {IMAGE_EXTS}")
    if rec["image"]["ext"] != s.image_ext:
        raise SampleError(f"sample {key!r}: record image.ext {rec['image']['ext']!r} != image_ext {s.image_ext!r}")
    if not isinstance(s.image_bytes, bytes | bytearray | memoryview) or len(s.image_bytes) == 0:
        raise SampleError(f"sample {key!r}: image_bytes must be non-empty bytes")
    if not bytes(s.image_bytes[:8]).startswith(_MAGIC[s.image_ext]):
        raise SampleError(f"sample {key!r}: image bytes are not a {s.image_ext} file (wrong magic number)")
    if check_images:
        why = image_problem(bytes(s.image_bytes), s.image_ext)
        if why is not None:
            raise SampleError(f"sample {key!r}: {why}")
        _check_image_size(s, rec)
    declared, present = set(rec["arrays"]), set(s.arrays)
    if declared != present:
        raise SampleError(f"sample {key!r}: record arrays {sorted(declared)} != sample arrays {sorted(present)}")
    for n, a in s.arrays.items():
        if not ARRAY_NAME.fullmatch(n):
            raise SampleError(f"sample {key!r}: array name {n!r} must match [a-z0-9_]+")
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise SampleError(f"sample {key!r}: array {n!r} must be a numeric numpy array")
    if rec["corpus"] == "pointmap":
        pts = s.arrays["points"]
        if pts.dtype != np.float32 or pts.ndim != 2 or pts.shape[1] != 5:
            raise SampleError(f"sample {key!r}: points must be float32 (N, 5) [u, v, X, Y, Z], got {pts.dtype} {pts.shape}")
        if pts.shape[0] != rec["points"]["n"]:
            raise SampleError(f"sample {key!r}: points.n = {rec['points']['n']} but the array has {pts.shape[0]} rows")
        if not np.isfinite(pts).all():
            raise SampleError(f"sample {key!r}: points hold non-finite values")


def image_problem(data: bytes, ext: str) -> str | None:
    """Why `data` is not a complete `ext` ("png" | "jpg") file, or None; checks structure, decodes nothing.

    Shards keep the original bytes and nobody decodes them until training, so a download cut short
    (header intact, pixel data missing) would pass every header check and fail, or silently show grey
    rows, in the trainer. PNG: the chunk chain must reach IEND within the data. JPEG: the marker
    segments are walked to the first scan (skipping APP segments, whose EXIF thumbnails carry their
    own end marker) and an end-of-image marker must follow it; entropy-coded data cannot contain one
    (0xFF is byte-stuffed), so this finds exactly the end of the main image. Trailing bytes after the
    end are allowed (cameras append metadata). Cost: one memchr-speed scan of the bytes.
    """
    if ext == "png":
        if not data.startswith(_MAGIC["png"]):
            return "not a PNG file (wrong magic number)"
        pos, n = 8, len(data)
        while pos + 8 <= n:
            length = int.from_bytes(data[pos:pos + 4], "big")
            end = pos + 12 + length
            if end > n:
                return f"truncated PNG: chunk {bytes(data[pos + 4:pos + 8])!r} at byte {pos} runs past the end ({n} bytes)"
            if data[pos + 4:pos + 8] == b"IEND":
                return None
            pos = end
        return f"truncated PNG: no IEND chunk in {n} bytes"
    if ext == "jpg":
        if not data.startswith(_MAGIC["jpg"]):
            return "not a JPEG file (wrong magic number)"
        pos, n = 2, len(data)
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                return f"corrupt JPEG: marker expected at byte {pos}"
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
                pos += 2
                continue
            if marker == 0xD9:
                return f"corrupt JPEG: end-of-image marker at byte {pos}, before any image data"
            seg_end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:  # start of scan: the image data follows, up to the EOI marker
                if data.find(b"\xff\xd9", seg_end) < 0:
                    return f"truncated JPEG: no end-of-image marker after the image data ({n} bytes)"
                return None
            pos = seg_end
        return f"truncated JPEG: no image data (start-of-scan marker) in {n} bytes"
    return f"unknown image extension {ext!r}"


def _check_image_size(s: Sample, rec: Mapping[str, Any]) -> None:
    from PIL import Image  # header parse only; imported here since only writing and verifying need it

    try:
        with Image.open(io.BytesIO(bytes(s.image_bytes))) as im:
            size = im.size
    except Exception as e:  # any decoder failure means the bytes are unusable
        raise SampleError(f"sample {s.key!r}: image bytes do not open as an image: {e}") from e
    want = (rec["image"]["width"], rec["image"]["height"])
    if size != want:
        raise SampleError(f"sample {s.key!r}: image is {size[0]}x{size[1]} but the record says {want[0]}x{want[1]}")


# ---------------------------------------------------------------- writer


@dataclass
class _Spooled:
    key: str
    spool_offset: int
    size: int
    row: dict[str, Any]
    dropped: dict[str, int] = field(default_factory=dict)  # record source.dropped: annotations left out
    record: Any = None  # the record as a reader parses it back (the shard's features, hf_card.ShardFeatures)


class ShardWriter:
    """Write chunk `index` of a build as `build_dir/shards/NNNNNN.tar` and its side files.

    Use as a context manager: `add(Sample)` for every sample (any order), optionally
    `add_reject(...)`, then `close(...)`. Leaving the block normally closes it; leaving it on an
    exception discards everything, leaving no completion marker, so the chunk is redone.
    Constructing a writer removes the chunk's previous outputs (stats first).
    """

    def __init__(self, build_dir: str | os.PathLike[str], index: int, *, check_images: bool = True):
        self.build_dir = Path(build_dir)
        self.index = int(index)
        self.name = shard_name(index)
        self.check_images = check_images
        self._dir = shards_dir(build_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        clean_partial(build_dir, index, force=True)
        self._spool: IO[bytes] | None = tempfile.TemporaryFile(dir=self._dir, prefix=f".{self.name}.spool.",
                                                                suffix=".tmp")
        self._spooled: dict[str, _Spooled] = {}
        self._rejects: list[dict[str, Any]] = []
        self._features = hf_card.ShardFeatures()
        self._closed = False
        self.stats: dict[str, Any] | None = None

    # -- context manager
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def __len__(self) -> int:
        return len(self._spooled)

    # -- adding
    def add(self, sample: Sample) -> None:
        """Check one sample against the contract and spool its tar members."""
        self._check_open()
        if not isinstance(sample, Sample):
            raise SampleError(f"expected a shards.writer.Sample, got {type(sample).__name__}")
        key = sample.key
        try:
            validate_key(key)
        except InvalidKey as e:
            raise SampleError(f"sample key rejected: {e}") from e
        if key in self._spooled:
            raise SampleError(f"duplicate key {key!r} in shard {self.name}")
        rec = sample.record
        if not isinstance(rec, Mapping):
            raise SampleError(f"sample {key!r}: record must be a dict, got {type(rec).__name__}")
        corpus = rec.get("corpus")
        if corpus not in records.SAMPLE_KINDS:
            raise SampleError(f"sample {key!r}: record corpus {corpus!r} is not one of {', '.join(records.SAMPLE_KINDS)}")
        try:
            plain = jsonio.to_jsonable(rec)
            validate_record(corpus, plain)
        except ValueError as e:
            raise SampleError(f"sample {key!r}: {e}") from e
        check_sample(sample, plain, check_images=self.check_images)

        text = jsonio.dumps(plain)
        members = ([(f"{key}.{sample.image_ext}", bytes(sample.image_bytes))]
                   + [(f"{key}.{n}.npy", _npy_bytes(sample.arrays[n])) for n in sorted(sample.arrays)])
        blob = b"".join([tar_member_bytes(f"{key}.json", text)] + [tar_member_bytes(n, d) for n, d in members])
        assert self._spool is not None
        off = self._spool.seek(0, os.SEEK_END)
        self._spool.write(blob)
        self._spooled[key] = _Spooled(key, off, len(blob), self._index_row(key, sample, plain),
                                      dict(plain["source"].get("dropped") or {}), hf_card.load_record(text))
        for name, data in members:  # image kinds and npy headers; the records are typed in key order at close
            self._features.add_member(hf_card.member_ext(name), data)

    def add_reject(self, reject: Any) -> None:
        """Record an input (or part of one) that did not become a sample: key, stage, reason, message."""
        self._check_open()
        self._rejects.append(_normalize_reject(reject))

    def _index_row(self, key: str, s: Sample, rec: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "key": key, "shard": self.index, "corpus": rec["corpus"], "dataset": dataset_id(rec["source"]["dataset"]),
            "image_ext": s.image_ext, "image_bytes": len(s.image_bytes),
            "width": rec["image"]["width"], "height": rec["image"]["height"],
            "n_objects": len(rec["objects"]) if "objects" in rec else None,
            "n_points": rec["points"]["n"] if "points" in rec else None,
            "n_mentions": len(rec["mentions"]) if "mentions" in rec else None,
        }

    # -- closing
    def close(self, stats_extra: Mapping[str, Any] | None = None, *, rejects: Iterable[Any] = (),
              n_input: int | None = None) -> dict[str, Any]:
        """Write the tar, the index and rejects Parquet, then the stats file; return the stats.

        `rejects`: reject rows (dicts or `pipelines.engine.stage.Reject`) of this chunk, added to those from
        `add_reject`. `n_input`: inputs of the chunk; when given, every input must be accounted for
        as a sample or a rejected key (nothing is dropped silently). `stats_extra`: free-form
        deterministic numbers stored under `extra`; a `timing` entry in it goes to the top-level
        `timing`, which is never compared between runs.
        """
        self._check_open()
        for r in rejects:
            self._rejects.append(_normalize_reject(r))
        rej = sorted(self._rejects, key=lambda r: (r["key"], r["stage"], r["reason"], r["message"]))
        sample_keys = set(self._spooled)
        rejected = {r["key"] for r in rej} - sample_keys
        accounted = len(sample_keys) + len(rejected)
        if n_input is None:
            n_input = accounted
        elif n_input > accounted:
            raise ValueError(f"shard {self.name}: {n_input} inputs but only {len(sample_keys)} samples + {len(rejected)} "
                             f"rejected keys: {n_input - accounted} inputs were dropped silently")
        extra = dict(stats_extra or {})
        timing = extra.pop("timing", None)

        # 1. the tar
        entries = [self._spooled[k] for k in sorted(self._spooled)]
        sha = hashlib.sha256()
        pos = 0
        rows: list[dict[str, Any]] = []
        spool = self._spool
        assert spool is not None

        def write_tar(f: IO[bytes]) -> None:
            nonlocal pos
            for e in entries:
                spool.seek(e.spool_offset)
                blob = spool.read(e.size)
                if len(blob) != e.size:  # pragma: no cover - disk trouble
                    raise OSError(f"spool file of shard {self.name} is truncated")
                f.write(blob)
                sha.update(blob)
                rows.append(e.row | {"offset": pos, "size": e.size})
                pos += e.size
            trailer = tar_trailer(pos)
            f.write(trailer)
            sha.update(trailer)
            pos += len(trailer)

        atomic_write(tar_path(self.build_dir, self.index), write_tar)

        # 2. index and rejects
        index_sha = write_parquet(index_path(self.build_dir, self.index),
                                  pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
        rej_rows = [{"key": r["key"], "shard": self.index, "stage": r["stage"], "reason": r["reason"],
                     "message": r["message"]} for r in rej]
        rejects_sha = write_parquet(rejects_path(self.build_dir, self.index),
                                    pa.Table.from_pylist(rej_rows, schema=REJECTS_SCHEMA))

        # 3. the completion marker, last
        stats: dict[str, Any] = {
            "version": 1, "shard": self.index, "tar": f"{self.name}.tar", "sha256": sha.hexdigest(), "tar_bytes": pos,
            "index_sha256": index_sha, "rejects_sha256": rejects_sha,
            "n_input": int(n_input), "n_samples": len(entries), "n_rejected": len(rejected), "n_reject_rows": len(rej),
            "by_corpus": dict(sorted(Counter(e.row["corpus"] for e in entries).items())),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rej).items())),
            "dropped_by_reason": dict(sorted(sum((Counter(e.dropped) for e in entries), Counter()).items())),
        }
        if extra:
            stats["extra"] = extra
        features = self._shard_features(entries)
        if features is not None:
            stats["features"] = features
        if timing is not None:
            stats["timing"] = timing
        stats = jsonio.to_jsonable(stats)
        validate_record("shard_stats", stats)
        data = jsonio.dumps(stats) + b"\n"
        atomic_write(stats_path(self.build_dir, self.index), lambda f: f.write(data))
        self._release()
        self.stats = stats
        return stats

    def _shard_features(self, entries: list[_Spooled]) -> dict[str, Any] | None:
        """This shard's share of the build's Hugging Face features (shards/hf_card.py), typed here, on the
        worker, so that `finalize` does not read every record of the build again in the driver. None when
        Arrow cannot type the records: `finalize` then reads this shard's tar and reports why."""
        for e in entries:
            self._features.add_record(e.record)
        try:
            return self._features.to_json()
        except (pa.ArrowException, TypeError, ValueError):
            return None

    def abort(self) -> None:
        """Drop everything added; leaves no output and no completion marker for this chunk."""
        self._release()
        clean_partial(self.build_dir, self.index, force=True)

    def _release(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter for shard {self.name} is already closed")
