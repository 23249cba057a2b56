"""Finalize a build: merge the per-shard side files and write `manifest.json` and `run.json`.

`manifest.json` is a function of the inputs, the config and the code only (config, code version,
totals, counts by reject reason, per-shard sha256 and counts), so two runs of the same build can
be compared byte for byte: it holds no timestamps, hostnames or durations. Those go to
`run.json`, which is never compared.
"""

from __future__ import annotations

import getpass
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import records
from shards import jsonio
from shards.hf_card import ShardFeatures, write_hf_files
from shards.layout import index_path, rejects_path, shard_name, shards_dir, stats_path
from shards.writer import INDEX_SCHEMA, REJECTS_SCHEMA, atomic_write, write_parquet

__all__ = ["FinalizeError", "code_version", "finalize", "list_shard_indices", "read_stats"]

_TAR_NAME = re.compile(r"^([0-9]{6})\.tar$")
_STATS_NAME = re.compile(r"^([0-9]{6})\.stats\.json$")


class FinalizeError(ValueError):
    """The build cannot be finalized (gaps, unfinished shards, duplicate keys); lists every cause."""


def list_shard_indices(build_dir: str | os.PathLike[str]) -> tuple[list[int], list[int]]:
    """(indices of `NNNNNN.tar` files, indices of `NNNNNN.stats.json` files), each sorted."""
    d = shards_dir(build_dir)
    if not d.is_dir():
        return [], []
    tars, stats = [], []
    for p in d.iterdir():
        if m := _TAR_NAME.match(p.name):
            tars.append(int(m.group(1)))
        elif m := _STATS_NAME.match(p.name):
            stats.append(int(m.group(1)))
    return sorted(tars), sorted(stats)


def read_stats(build_dir: str | os.PathLike[str], index: int) -> dict[str, Any]:
    """The validated stats of shard `index` (raises ValueError naming the file)."""
    p = stats_path(build_dir, index)
    try:
        stats = jsonio.loads(p.read_bytes())
        records.validate("shard_stats", stats)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e
    if stats["shard"] != index:
        raise ValueError(f"{p}: says shard {stats['shard']}, expected {index}")
    return stats


def code_version() -> str:
    """`gr3d <package version> git:<describe>` ("unknown" parts when not available).

    Stable for two runs of the same checkout: only the installed version and `git describe
    --always --tags --dirty` (untracked build outputs do not make it dirty). Git runs with
    GIT_OPTIONAL_LOCKS=0 so it never writes the repository's index.
    """
    try:
        version = importlib.metadata.version("gr3d")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"gr3d {version} git:{_git_describe() or 'unknown'}"


def _git_describe() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--tags", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=20, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    desc = out.stdout.strip()
    return desc if out.returncode == 0 and desc else None


def _merge(paths: list[Path], schema: pa.Schema, what: str) -> pa.Table:
    tables = []
    for p in paths:
        t = pq.ParquetFile(p).read()  # not `read_table`: that imports pyarrow.dataset (and pandas), ~0.3 s
        if not t.schema.equals(schema):
            raise FinalizeError(f"{p}: {what} schema differs from the writer's:\n{t.schema}\nexpected:\n{schema}")
        tables.append(t)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def finalize(build_dir: str | os.PathLike[str], config: Mapping[str, Any], code_version: str,
             *, run_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge `shards/*.index.parquet` and `*.rejects.parquet` into `index.parquet` and
    `rejects.parquet`, write `manifest.json` (returned) and `run.json`.

    Refuses (FinalizeError listing every cause) when shard numbers have a gap, a shard has no
    stats file (not finished), or a key appears in two shards. `config` must be JSON-able;
    `run_info` (durations, executor, ...) goes to `run.json` only.
    """
    build = Path(build_dir)
    tars, stats_idx = list_shard_indices(build)
    problems: list[str] = []
    n = max([*tars, *stats_idx], default=-1) + 1
    for i in range(n):
        if i not in tars:
            problems.append(f"shards/{shard_name(i)}.tar is missing (gap in shard numbering 0..{n - 1})")
        elif i not in stats_idx:
            problems.append(f"shards/{shard_name(i)}.stats.json is missing: shard {i} did not finish")
    all_stats: list[dict[str, Any]] = []
    for i in range(n):
        if i in tars and i in stats_idx:
            try:
                all_stats.append(read_stats(build, i))
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise FinalizeError(f"cannot finalize {build}:\n  " + "\n  ".join(problems))

    index = _merge([index_path(build, i) for i in range(n)], INDEX_SCHEMA, "index")
    rejects = _merge([rejects_path(build, i) for i in range(n)], REJECTS_SCHEMA, "rejects")
    keys = index.column("key").to_pylist()
    dups = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dups:
        raise FinalizeError(f"cannot finalize {build}: {len(dups)} keys appear in more than one shard, e.g. {dups[:5]}")
    index_sha = write_parquet(build / "index.parquet", index)
    rejects_sha = write_parquet(build / "rejects.parquet", rejects)

    by_corpus: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    shards = []
    for st in all_stats:
        by_corpus.update(st["by_corpus"])
        by_reason.update(st["rejects_by_reason"])
        dropped.update(st.get("dropped_by_reason") or {})
        shards.append({"shard": st["shard"], "tar": f"shards/{st['tar']}", "sha256": st["sha256"],
                       "tar_bytes": st["tar_bytes"], "n_input": st["n_input"], "n_samples": st["n_samples"],
                       "n_rejected": st["n_rejected"], "n_reject_rows": st["n_reject_rows"]})
    totals = {k: sum(st[k] for st in all_stats) for k in ("n_input", "n_samples", "n_rejected", "n_reject_rows")}
    manifest = jsonio.to_jsonable({
        "version": 1, "code_version": code_version, "config": dict(config), "n_shards": n, "totals": totals,
        "by_corpus": dict(sorted(by_corpus.items())), "rejects_by_reason": dict(sorted(by_reason.items())),
        "dropped_by_reason": dict(sorted(dropped.items())),
        "shards": shards,
        "files": {"index.parquet": {"sha256": index_sha, "rows": index.num_rows},
                  "rejects.parquet": {"sha256": rejects_sha, "rows": rejects.num_rows}},
    })
    records.validate("manifest", manifest)
    data = jsonio.dumps(manifest, indent=1) + b"\n"
    atomic_write(build / "manifest.json", lambda f: f.write(data))
    # Column types for Hugging Face `datasets`, over every sample (shards/hf_card.py): merged from the
    # shards' stats; a shard whose stats carry none (an older writer, or records Arrow could not type) is read.
    write_hf_files(build, (_shard_features(build, st) for st in all_stats), ",".join(sorted(by_corpus)) or "empty",
                   totals["n_samples"])

    run = {
        "finished_at_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "user": _user(), "pid": os.getpid(),
        "python": sys.version.split()[0], "platform": platform.platform(), "argv": list(sys.argv),
        "code_version": code_version,
        "shard_timing": {shard_name(st["shard"]): st["timing"] for st in all_stats if "timing" in st},
        **dict(run_info or {}),
    }
    run_data = jsonio.dumps(run, indent=1) + b"\n"
    atomic_write(build / "run.json", lambda f: f.write(run_data))
    return manifest


def _shard_features(build: Path, stats: Mapping[str, Any]) -> ShardFeatures:
    entry = stats.get("features")
    if entry is None:
        return ShardFeatures.of_tar(build / "shards" / stats["tar"])
    try:
        return ShardFeatures.from_json(entry)
    except ValueError as e:
        raise FinalizeError(f"cannot finalize {build}: {stats_path(build, stats['shard'])}: {e}") from e


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # pragma: no cover - no passwd entry in some containers
        return "unknown"

