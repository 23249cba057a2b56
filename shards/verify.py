"""`gr3d shards verify DIR`: check a finished build against the whole shard contract.

A build is trusted by the trainer and the audit only after this passes. Checked: shard numbering
without gaps; every tar has its stats.json (completion marker); tar sha256 against stats.json
and manifest.json; every member's name (key rule, no dots, known extensions, fixed tar metadata);
a sample's members contiguous, in writer order, without duplicates; keys sorted within a shard
and unique across shards; every record against its JSON Schema and against its image and arrays;
the per-shard and merged index.parquet against the tars' actual contents (keys, byte offsets);
counts in stats.json and manifest.json against what is there; no leftover temp files.

Each problem names the file (and key) and the cause. Nothing here trusts the writer's code: the
tars are re-read with `tarfile`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from schemas import records
from shards import jsonio
from shards.keys import InvalidKey, validate_key
from shards.layout import shard_name, shards_dir
from shards.writer import IMAGE_EXTS, Sample, SampleError, check_sample, member_names

__all__ = ["Problem", "VerifyReport", "verify", "verify_build"]

_SIDE = re.compile(r"^([0-9]{6})\.(tar|stats\.json|index\.parquet|rejects\.parquet)$")
_TMP = re.compile(r"^\.[0-9]{6}\..*\.tmp$")
_NPY_EXT = re.compile(r"^[a-z0-9_]+\.npy$")


@dataclass(frozen=True)
class Problem:
    """One violation: `path` relative to the build dir (`shards/000001.tar:KEY` for a sample), and why."""

    path: str
    cause: str

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}"


@dataclass
class VerifyReport:
    problems: list[Problem] = field(default_factory=list)
    n_shards: int = 0
    n_samples: int = 0
    n_reject_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Scanned:
    key: str
    offset: int
    end: int = 0
    names: list[str] = field(default_factory=list)
    data: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes


def verify_build(build_dir: str | os.PathLike[str], *, require_manifest: bool = True,
                 check_images: bool = True) -> list[Problem]:
    """Every problem of the build (empty list: the build is sound)."""
    return verify(build_dir, require_manifest=require_manifest, check_images=check_images).problems


def verify(build_dir: str | os.PathLike[str], *, require_manifest: bool = True,
           check_images: bool = True) -> VerifyReport:
    """Like `verify_build`, with counts for a summary line."""
    build = Path(build_dir)
    rep = VerifyReport()
    P = rep.problems
    sdir = shards_dir(build)
    if not sdir.is_dir():
        P.append(Problem(str(build), "not a build directory: no shards/ folder"))
        return rep

    kinds: dict[int, set[str]] = {}
    for p in sorted(sdir.iterdir()):
        if m := _SIDE.match(p.name):
            kinds.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif _TMP.match(p.name):
            P.append(Problem(f"shards/{p.name}", "leftover temp file of an interrupted write (re-run that shard)"))
        else:
            P.append(Problem(f"shards/{p.name}", "unexpected file in shards/"))
    n = max(kinds, default=-1) + 1
    rep.n_shards = n
    tar_sha: dict[int, str] = {}
    stats_by: dict[int, dict[str, Any]] = {}
    all_rows: list[tuple[str, int, int, int]] = []  # (key, shard, offset, size) in shard order
    key_home: dict[str, str] = {}
    for i in range(n):
        name = shard_name(i)
        have = kinds.get(i, set())
        rel_tar = f"shards/{name}.tar"
        if "tar" not in have:
            P.append(Problem(rel_tar, f"missing: gap in shard numbering (shards 0..{n - 1} expected)"))
            continue
        stats = _check_stats(build, i, have, P)
        if stats is not None:
            stats_by[i] = stats
        sha, size = _sha256(sdir / f"{name}.tar")
        tar_sha[i] = sha
        if stats is not None:
            if stats["sha256"] != sha:
                P.append(Problem(rel_tar, f"sha256 {sha[:16]}... differs from stats.json {stats['sha256'][:16]}... "
                                          "(the tar changed after it was written)"))
            if stats["tar_bytes"] != size:
                P.append(Problem(rel_tar, f"{size} bytes, stats.json says {stats['tar_bytes']}"))
        scanned = _scan_tar(sdir / f"{name}.tar", rel_tar, P)
        prev = None
        for s in scanned:
            _check_scanned(s, rel_tar, P, check_images)
            if prev is not None and s.key < prev:
                P.append(Problem(f"{rel_tar}:{s.key}", f"samples are not sorted by key ({s.key!r} after {prev!r})"))
            prev = s.key
            if s.key in key_home and key_home[s.key] != rel_tar:
                P.append(Problem(f"{rel_tar}:{s.key}", f"duplicate key: also in {key_home[s.key]}"))
            key_home.setdefault(s.key, rel_tar)
        rows = [(s.key, i, s.offset, s.end - s.offset) for s in scanned]
        all_rows.extend(rows)
        rep.n_samples += len(scanned)
        if stats is not None and stats["n_samples"] != len(scanned):
            P.append(Problem(rel_tar, f"holds {len(scanned)} samples, stats.json says {stats['n_samples']}"))
        _check_shard_parquets(build, i, have, stats, rows, P)
        if stats is not None:
            rep.n_reject_rows += stats["n_reject_rows"]
    _check_manifest(build, n, tar_sha, stats_by, all_rows, require_manifest, P)
    return rep


# ---------------------------------------------------------------- pieces


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _check_stats(build: Path, i: int, have: set[str], P: list[Problem]) -> dict[str, Any] | None:
    rel = f"shards/{shard_name(i)}.stats.json"
    if "stats.json" not in have:
        P.append(Problem(rel, "missing: the shard did not finish (stats.json is written last)"))
        return None
    try:
        stats = jsonio.loads((build / rel).read_bytes())
        records.validate("shard_stats", stats)
    except (OSError, ValueError) as e:
        P.append(Problem(rel, f"unreadable or invalid: {e}"))
        return None
    if stats["shard"] != i:
        P.append(Problem(rel, f"says shard {stats['shard']}, expected {i}"))
    return stats


def _scan_tar(path: Path, rel: str, P: list[Problem]) -> list[_Scanned]:
    """Group members into samples the way webdataset does, reporting every naming/order problem."""
    out: list[_Scanned] = []
    cur: _Scanned | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                where = f"{rel}:{m.name}"
                if not m.isreg():
                    P.append(Problem(where, f"not a regular file (tar type {m.type!r})"))
                    continue
                if (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) != (0, 0, 0, "", "", 0o644):
                    P.append(Problem(where, f"tar metadata not fixed (mtime={m.mtime}, uid={m.uid}, gid={m.gid}, "
                                            f"uname={m.uname!r}, gname={m.gname!r}, mode={oct(m.mode)}): "
                                            "bytes would depend on more than content"))
                base = m.name.rpartition("/")[2]
                if "." not in base:
                    P.append(Problem(where, "member name has no extension"))
                    continue
                ext = base.partition(".")[2]
                key = m.name[: len(m.name) - len(ext) - 1]
                if ext != ext.lower():
                    P.append(Problem(where, f"extension {ext!r} is not lower case (webdataset lower-cases it)"))
                elif ext not in ("json", *IMAGE_EXTS) and not _NPY_EXT.match(ext):
                    P.append(Problem(where, f"unexpected extension {ext!r}: a dot in the key? webdataset splits the "
                                            f"member name at the first dot, giving key {key!r}"))
                if cur is None or key != cur.key:
                    if key in seen:
                        P.append(Problem(f"{rel}:{key}", "members of the sample are not contiguous "
                                                         "(the key appears again after other samples)"))
                    seen.add(key)
                    cur = _Scanned(key=key, offset=m.offset)
                    out.append(cur)
                elif ext in cur.data:
                    P.append(Problem(where, "duplicate member in the sample"))
                    continue
                f = tf.extractfile(m)
                cur.data[ext] = f.read() if f is not None else b""
                cur.names.append(m.name)
                cur.end = m.offset_data + m.size + (-m.size % tarfile.BLOCKSIZE)
            # tarfile (and webdataset with it) silently stops at a damaged header after the first:
            # everything after the last member read must be the all-zero trailer.
            end = tf.offset
        with open(path, "rb") as fh:
            fh.seek(end)
            rest = fh.read()
        if rest.strip(b"\0"):
            P.append(Problem(rel, f"unreadable tar header at byte {end}: the {len(rest)} bytes after it are lost "
                                  "to any reader (damaged tar)"))
    except (tarfile.TarError, OSError, EOFError) as e:
        P.append(Problem(rel, f"tar is unreadable: {e}"))
    return out


def _check_scanned(s: _Scanned, rel: str, P: list[Problem], check_images: bool) -> None:
    where = f"{rel}:{s.key}"
    try:
        validate_key(s.key)
    except InvalidKey as e:
        P.append(Problem(where, f"bad key: {e}"))
    if "json" not in s.data:
        P.append(Problem(where, "no KEY.json record"))
        return
    try:
        rec = jsonio.loads(s.data["json"])
    except ValueError as e:
        P.append(Problem(f"{where}.json", f"record is not valid JSON: {e}"))
        return
    corpus = rec.get("corpus") if isinstance(rec, dict) else None
    if corpus not in records.SAMPLE_KINDS:
        P.append(Problem(f"{where}.json", f"record corpus {corpus!r} is not one of {', '.join(records.SAMPLE_KINDS)}"))
        return
    try:
        records.validate(corpus, rec)
    except records.SchemaError as e:
        P.append(Problem(f"{where}.json", str(e)))
        return
    images = [e for e in IMAGE_EXTS if e in s.data]
    if len(images) != 1:
        P.append(Problem(where, f"expected exactly one image member (jpg or png), found {images or 'none'}"))
        return
    arrays: dict[str, np.ndarray] = {}
    for ext, data in s.data.items():
        if _NPY_EXT.match(ext):
            try:
                arrays[ext[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                P.append(Problem(f"{where}.{ext}", f"not a loadable .npy: {e}"))
                return
    try:
        check_sample(Sample(s.key, s.data[images[0]], images[0], rec, arrays), rec, check_images=check_images)
    except SampleError as e:
        P.append(Problem(where, str(e)))
        return
    expected = member_names(s.key, images[0], arrays)
    if s.names != expected and len(s.names) == len(expected):
        P.append(Problem(where, f"member order {[n[len(s.key):] for n in s.names]} is not the writer's "
                                f"{[n[len(s.key):] for n in expected]}"))
    elif len(s.names) != len(expected):
        extra = sorted(set(s.names) - set(expected))
        P.append(Problem(where, f"unexpected members {extra}"))


def _parquet_rows(path: Path, cols: list[str]) -> list[tuple[Any, ...]]:
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=cols)
    return list(zip(*(t.column(c).to_pylist() for c in cols)))


def _check_shard_parquets(build: Path, i: int, have: set[str], stats: dict[str, Any] | None,
                          rows: list[tuple[str, int, int, int]], P: list[Problem]) -> None:
    name = shard_name(i)
    for kind, stat_key in (("index.parquet", "index_sha256"), ("rejects.parquet", "rejects_sha256")):
        rel = f"shards/{name}.{kind}"
        if kind not in have:
            P.append(Problem(rel, "missing"))
            continue
        sha, _ = _sha256(build / rel)
        if stats is not None and stats[stat_key] != sha:
            P.append(Problem(rel, f"sha256 differs from stats.json {stat_key}"))
        try:
            if kind == "index.parquet":
                got = _parquet_rows(build / rel, ["key", "shard", "offset", "size"])
                _compare_rows(rel, got, rows, P)
            else:
                n_rej = len(_parquet_rows(build / rel, ["key"]))
                if stats is not None and n_rej != stats["n_reject_rows"]:
                    P.append(Problem(rel, f"{n_rej} rows, stats.json says {stats['n_reject_rows']}"))
        except Exception as e:  # pyarrow raises several types for a damaged file
            P.append(Problem(rel, f"unreadable: {e}"))


def _compare_rows(rel: str, got: list[tuple[Any, ...]], want: list[tuple[str, int, int, int]],
                  P: list[Problem]) -> None:
    if len(got) != len(want):
        P.append(Problem(rel, f"{len(got)} rows but the tars hold {len(want)} samples"))
        return
    for g, w in zip(got, want):
        if tuple(g) != w:
            P.append(Problem(rel, f"row (key, shard, offset, size) = {tuple(g)} but the tar has {w}"))
            return


def _check_manifest(build: Path, n: int, tar_sha: dict[int, str], stats_by: dict[int, dict[str, Any]],
                    all_rows: list[tuple[str, int, int, int]], require: bool, P: list[Problem]) -> None:
    mp = build / "manifest.json"
    if not mp.is_file():
        if require:
            P.append(Problem("manifest.json", "missing: the build was not finalized"))
        return
    try:
        man = jsonio.loads(mp.read_bytes())
        records.validate("manifest", man)
    except (OSError, ValueError) as e:
        P.append(Problem("manifest.json", f"unreadable or invalid: {e}"))
        return
    if man["n_shards"] != n:
        P.append(Problem("manifest.json", f"n_shards = {man['n_shards']} but shards/ holds {n}"))
    for entry in man["shards"]:
        i = entry["shard"]
        if i not in tar_sha:
            P.append(Problem(entry["tar"], "listed in manifest.json but missing or unreadable"))
        elif tar_sha[i] != entry["sha256"]:
            P.append(Problem(entry["tar"], f"sha256 {tar_sha[i][:16]}... differs from manifest.json "
                                           f"{entry['sha256'][:16]}..."))
        st = stats_by.get(i)
        if st is not None and any(st[k] != entry[k] for k in ("sha256", "n_samples", "n_reject_rows", "n_input")):
            P.append(Problem("manifest.json", f"entry of shard {i} disagrees with {entry['tar'][:-4]}.stats.json"))
    if len(stats_by) == n:
        for k in ("n_input", "n_samples", "n_rejected", "n_reject_rows"):
            total = sum(st[k] for st in stats_by.values())
            if man["totals"][k] != total:
                P.append(Problem("manifest.json", f"totals.{k} = {man['totals'][k]}, the shards' stats sum to {total}"))
    for fname, cols in (("index.parquet", ["key", "shard", "offset", "size"]), ("rejects.parquet", ["key"])):
        fp = build / fname
        if not fp.is_file():
            P.append(Problem(fname, "missing"))
            continue
        info = man["files"].get(fname)
        if info is None:
            P.append(Problem("manifest.json", f"no entry for {fname}"))
        elif _sha256(fp)[0] != info["sha256"]:
            P.append(Problem(fname, "sha256 differs from manifest.json"))
        try:
            got = _parquet_rows(fp, cols)
        except Exception as e:  # pyarrow raises several types for a damaged file
            P.append(Problem(fname, f"unreadable: {e}"))
            continue
        if fname == "index.parquet":
            _compare_rows(fname, got, all_rows, P)
        elif len(got) != man["totals"]["n_reject_rows"]:
            P.append(Problem(fname, f"{len(got)} rows, manifest totals.n_reject_rows = {man['totals']['n_reject_rows']}"))


def iter_problem_lines(problems: list[Problem], limit: int) -> Iterator[str]:
    """At most `limit` lines, then a count of the rest."""
    for p in problems[:limit]:
        yield str(p)
    if len(problems) > limit:
        yield f"... and {len(problems) - limit} more problems"
