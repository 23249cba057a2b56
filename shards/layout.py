"""The layout of a build directory, written once: every path a build writes, and when a chunk is done.

    BUILD/
      shards/NNNNNN.tar             one WebDataset tar per chunk (NNNNNN: the chunk index, 6 digits)
      shards/NNNNNN.index.parquet   one row per sample of the chunk
      shards/NNNNNN.rejects.parquet one row per rejected input of the chunk
      shards/NNNNNN.stats.json      written LAST: the chunk is done exactly when it exists and parses
      intermediate/STAGE/NNNNNN.parquet   raw outputs of a model stage (cot), reused on resume
      plan.json  index.parquet  rejects.parquet  manifest.json  run.json
      features.json  README.md      column types + dataset card for Hugging Face datasets (shards/hf_card.py)
      cache/                        the annotators' response cache (cot; kept by --overwrite)
      setup_error.json              only while a failed run stops: the stage setup failure a worker
                                    recorded for the driver (pipelines/engine/setup_error.py); removed by it

`BuildLayout(root)` names each of these; the module functions are the same facts for callers that hold
a directory and an index. `BUILD_OUTPUTS` is what `--overwrite` deletes (never anything else).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import jsonio

__all__ = [
    "SHARD_DIGITS", "SHARDS_DIR", "INTERMEDIATE_DIR", "PLAN_FILE", "INDEX_FILE", "REJECTS_FILE", "MANIFEST_FILE",
    "RUN_FILE", "FEATURES_FILE", "CARD_FILE", "SETUP_ERROR_FILE", "CHUNK_INPUTS_DIR", "BUILD_OUTPUTS", "BuildLayout", "shard_name", "shards_dir", "tar_path", "index_path", "rejects_path",
    "stats_path", "intermediate_path", "is_done", "clean_partial", "remove_intermediate_temps",
]

SHARD_DIGITS = 6
SHARDS_DIR = "shards"
INTERMEDIATE_DIR = "intermediate"
PLAN_FILE = "plan.json"
INDEX_FILE = "index.parquet"
REJECTS_FILE = "rejects.parquet"
MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"
FEATURES_FILE = "features.json"
CARD_FILE = "README.md"  # the name `datasets.load_dataset(BUILD_DIR)` reads its card from
SETUP_ERROR_FILE = "setup_error.json"  # never left in a build: the driver takes it when the run fails
# The to-do chunks' encoded inputs, for workers that read them from storage (Beam); removed when the run ends,
# and a killed run's by the next run's `prepare_build_dir`.
CHUNK_INPUTS_DIR = ".chunk_inputs"
# What `--overwrite` deletes: only the paths a build writes, never anything else in the directory.
BUILD_OUTPUTS = (SHARDS_DIR, INTERMEDIATE_DIR, INDEX_FILE, REJECTS_FILE, MANIFEST_FILE, RUN_FILE, PLAN_FILE,
                 FEATURES_FILE, CARD_FILE, CHUNK_INPUTS_DIR)




def shard_name(index: int) -> str:
    """`7` -> `"000007"`."""
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0 or index >= 10**SHARD_DIGITS:
        raise ValueError(f"shard index must be an int in [0, {10**SHARD_DIGITS}), got {index!r}")
    return f"{int(index):0{SHARD_DIGITS}d}"


def shards_dir(build_dir: str | os.PathLike[str]) -> Path:
    return Path(build_dir) / SHARDS_DIR


def tar_path(build_dir: str | os.PathLike[str], index: int) -> Path:
    return shards_dir(build_dir) / f"{shard_name(index)}.tar"


def index_path(build_dir: str | os.PathLike[str], index: int) -> Path:
    return shards_dir(build_dir) / f"{shard_name(index)}.index.parquet"


def rejects_path(build_dir: str | os.PathLike[str], index: int) -> Path:
    return shards_dir(build_dir) / f"{shard_name(index)}.rejects.parquet"


def stats_path(build_dir: str | os.PathLike[str], index: int) -> Path:
    return shards_dir(build_dir) / f"{shard_name(index)}.stats.json"


def is_done(build_dir: str | os.PathLike[str], index: int) -> bool:
    """True when chunk `index` finished: its stats.json exists and parses (it is written last) and its tar exists."""
    sp = stats_path(build_dir, index)
    try:
        stats = jsonio.loads(sp.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(stats, dict) and tar_path(build_dir, index).is_file()


def clean_partial(build_dir: str | os.PathLike[str], index: int, *, force: bool = False) -> list[Path]:
    """Remove what an interrupted write of chunk `index` left, so a re-run redoes it.

    Temp files of the chunk always go. The chunk's outputs go too when it is not done, or when
    `force` (the writer does that before rewriting a chunk): the stats file first, so no moment
    exists where an old completion marker sits beside a new tar. Returns the removed paths.
    """
    d = shards_dir(build_dir)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    name = shard_name(index)
    for p in sorted(d.glob(f".{name}.*.tmp")):
        p.unlink(missing_ok=True)
        removed.append(p)
    if force or not is_done(build_dir, index):
        for p in (stats_path(build_dir, index), tar_path(build_dir, index),
                  index_path(build_dir, index), rejects_path(build_dir, index)):
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


# ---------------------------------------------------------------- tar bytes


def remove_intermediate_temps(build_dir: str | os.PathLike[str]) -> None:
    """Delete torn writes of model intermediates (temp files a killed or interrupted worker left)."""
    inter = Path(build_dir) / INTERMEDIATE_DIR
    if inter.is_dir():
        for stage_dir in inter.iterdir():
            for p in stage_dir.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def intermediate_path(build_dir: str | os.PathLike[str], stage_name: str, index: int) -> Path:
    """Where a model stage's raw outputs for chunk `index` live: BUILD/intermediate/STAGE/NNNNNN.parquet."""
    return Path(build_dir) / INTERMEDIATE_DIR / stage_name / f"{shard_name(index)}.parquet"


@dataclass(frozen=True)
class BuildLayout:
    """Every path of one build directory. `BuildLayout(dir).tar(3)` is `dir/shards/000003.tar`."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def shards(self) -> Path:
        return shards_dir(self.root)

    def tar(self, index: int) -> Path:
        return tar_path(self.root, index)

    def index(self, index: int) -> Path:
        return index_path(self.root, index)

    def rejects(self, index: int) -> Path:
        return rejects_path(self.root, index)

    def stats(self, index: int) -> Path:
        return stats_path(self.root, index)

    def intermediate(self, stage_name: str, index: int) -> Path:
        return intermediate_path(self.root, stage_name, index)

    def is_done(self, index: int) -> bool:
        return is_done(self.root, index)

    def file(self, name: str) -> Path:
        """A build-level file or directory: one of `BUILD_OUTPUTS` (plan.json, manifest.json, ...)."""
        if name not in BUILD_OUTPUTS:
            raise ValueError(f"{name!r} is not a build output; choose from {BUILD_OUTPUTS}")
        return self.root / name

    def remove_outputs(self, names: Iterable[str] = BUILD_OUTPUTS) -> None:
        """Delete what a build wrote here (`--overwrite`): only the named outputs, never anything else."""
        for name in names:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def plan(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def setup_error(self) -> Path:
        return self.root / SETUP_ERROR_FILE

    def done_shards(self) -> Iterator[int]:
        """Indices of the finished chunks, in order (tars whose stats file marks them done)."""
        if not self.shards.is_dir():
            return
        for p in sorted(self.shards.glob("*.tar")):
            head = p.name[: -len(".tar")]
            if head.isdigit() and len(head) == SHARD_DIGITS and is_done(self.root, int(head)):
                yield int(head)
