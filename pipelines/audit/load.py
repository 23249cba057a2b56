"""Read a finished build for the audit: manifest, index, rejects, intermediates, records, ground truth.

Why one loader: every number of the report must come from the same, checked view of the build.
A build is audited only after `shards.verify` passes (a tar that changed after it was written
would make every figure a lie), and every file the audit needs but cannot read stops it with an
`AuditInputError` that names that file, so a user can rebuild exactly that chunk.

Which intermediate Parquet files must exist follows from the build's config: a cot build writes
`intermediate/{tag,assign}/NNNNNN.parquet` for every shard, plus `verify/` with a verifier and
`rewrite/` when it also rewrites (see `pipelines/corpora/cot/builder.py`). Other builders persist none.

Ground truth (sample world only): `--ground-truth FILE`, else a `ground_truth.json` beside a
`sample_world.json` found from the paths in the manifest's config (the data root, input files,
the oracle's file), else none: then the report has no ground-truth agreement.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.layout import (
    INDEX_FILE,
    INTERMEDIATE_DIR,
    SHARDS_DIR,
    intermediate_path,
    shard_name,
    shards_dir,
    stats_path,
    tar_path,
)

__all__ = [
    "AuditInputError",
    "BuildData",
    "INTERMEDIATE_COLUMNS",
    "expected_intermediates",
    "find_ground_truth",
    "load_build",
    "POINT_SAMPLE_PER_RECORD",
]

#: Points kept per point-map sample for the depth distribution (the builders sample ~100 per image;
#: keeping all of 272K samples' points would cost GBs for a histogram).
POINT_SAMPLE_PER_RECORD = 128
_GT_NAME = "ground_truth.json"
_SW_NAME = "sample_world.json"


class AuditInputError(ValueError):
    """The build (or a file the audit needs) is missing, corrupt or inconsistent; the message names the file."""


@dataclass
class BuildData:
    """Everything the audit reads from one build, already checked.

    `records` maps key -> KEY.json record; `shard_of` key -> shard number. `intermediates` maps a
    stage name to its rows (every shard's file concatenated, in shard order; rows carry the
    executor's `_outcome` column: "ok" or the reject reason). `points` holds, per point-map key,
    a (<=POINT_SAMPLE_PER_RECORD, 5) float32 slice of its points plus `point_stats` per key (count,
    depth quantiles over all its points), so the depth distribution stays cheap on big builds.
    """

    root: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    index: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    stats: list[dict[str, Any]]
    records: dict[str, dict[str, Any]]
    shard_of: dict[str, int]
    intermediates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    intermediate_files: dict[str, list[str]] = field(default_factory=dict)
    points: dict[str, np.ndarray] = field(default_factory=dict)
    point_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    ground_truth: dict[str, Any] | None = None
    ground_truth_path: Path | None = None
    verified: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config") or {})

    @property
    def builder(self) -> str:
        """The builder's name as `run_build` records it in the config (`cot`, `det3d`, `pointmaps`), or ``""``."""
        return str(self.config.get("builder") or "")

    @property
    def corpora(self) -> dict[str, int]:
        """Samples per corpus, from the records actually read."""
        out: dict[str, int] = {}
        for r in self.records.values():
            out[r["corpus"]] = out.get(r["corpus"], 0) + 1
        return dict(sorted(out.items()))

    def keys_of(self, corpus: str) -> list[str]:
        return sorted(k for k, r in self.records.items() if r["corpus"] == corpus)

    def read_sample(self, key: str) -> dict[str, Any]:
        """The full decoded sample (image bytes included) by random access through the index."""
        from shards.reader import read_sample

        try:
            return read_sample(self.root, key)
        except (OSError, ValueError) as e:
            shard = self.shard_of.get(key)
            where = f"{SHARDS_DIR}/{shard_name(shard)}.tar" if shard is not None else INDEX_FILE
            raise AuditInputError(f"{self.root / where}: cannot read sample {key!r}: {e}") from e


def expected_intermediates(config: Mapping[str, Any]) -> list[str]:
    """Stages whose `intermediate/STAGE/NNNNNN.parquet` a build with this config must have, per shard."""
    if config.get("builder") != "cot":
        return []
    stages = ["tag"]
    verifier = config.get("verifier")
    if verifier not in (None, "none"):
        stages.append("verify")
    stages.append("assign")
    if verifier not in (None, "none") and config.get("rewrite", "none") != "none":
        stages.append("rewrite")
    return stages


def _iter_paths(obj: Any) -> Iterator[str]:
    """Strings in a config that may be paths (contain a separator or end in a known suffix)."""
    if isinstance(obj, str):
        if "/" in obj or obj.endswith((".json", ".pkl")):
            yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_paths(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _iter_paths(v)


def find_ground_truth(config: Mapping[str, Any], build_root: Path) -> Path | None:
    """A sample world's `ground_truth.json` reachable from the build's config, or None.

    The oracle's own file (`config["ground_truth"]`) first; then, for each path in the config and
    each of its parents (up to 4 levels), a directory holding both `ground_truth.json` and
    `sample_world.json`. Relative paths are tried against the working directory and the build's parent.
    """
    gt = config.get("ground_truth")
    if isinstance(gt, str) and Path(gt).is_file():
        return Path(gt).resolve()
    seen: set[Path] = set()
    for s in _iter_paths(config):
        p = Path(s)
        tries = [p] if p.is_absolute() else [Path.cwd() / p, build_root.parent / p]
        for t in tries:
            cur = t
            for _ in range(5):
                if cur in seen:
                    break
                seen.add(cur)
                if cur.name == _GT_NAME and cur.is_file():
                    return cur.resolve()
                if (cur / _GT_NAME).is_file() and (cur / _SW_NAME).is_file():
                    return (cur / _GT_NAME).resolve()
                if cur.parent == cur:
                    break
                cur = cur.parent
    return None


#: Columns the metrics use per intermediate stage (the verifier's raw text and the prompts stay on disk:
#: on a full corpus they would cost GBs of memory for nothing the report shows). The tag stage's `note`
#: and `injected` (what a simulated tagger did; null otherwise) caption the error gallery; the rewrite's
#: raw answer is one short JSON object, and a simulated rewriter records there what it injected.
INTERMEDIATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "tag": ("key", "record_id", "mention_index", "category", "spans", "n_candidates", "image_width", "image_height",
            "candidate_index", "box_norm", "note", "injected", "_outcome"),
    "verify": ("key", "record_id", "mention_index", "decision", "choice", "confidence", "chosen_box_norm", "_outcome"),
    "assign": ("key", "record_id", "mention_index", "decision", "spans", "sample_decision", "_outcome"),
    "rewrite": ("key", "record_id", "mention_index", "decision", "failure", "raw_text", "_outcome"),
}


def _read_parquet_rows(path: Path, what: str, columns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        if columns is not None:
            names = set(pq.read_schema(path).names)
            return pq.read_table(path, columns=[c for c in columns if c in names]).to_pylist()
        return pq.read_table(path).to_pylist()
    except FileNotFoundError as e:
        raise AuditInputError(f"{path}: missing {what}") from e
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for torn/foreign files
        raise AuditInputError(f"{path}: unreadable {what}: {type(e).__name__}: {e}") from e


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise AuditInputError(f"{path}: missing {what}") from e
    except (OSError, ValueError) as e:
        raise AuditInputError(f"{path}: unreadable {what}: {e}") from e


def load_build(build_dir: str | os.PathLike[str], *, ground_truth: str | os.PathLike[str] | None = None,
               verify: bool = True, intermediates: bool = True, find_gt: bool = True) -> BuildData:
    """Read and check a finished build.

    `verify`: run `shards.verify` first and refuse a build with problems (each listed with its file).
    `intermediates`: read `intermediate/*/NNNNNN.parquet`; those the config implies must all exist.
    `ground_truth`: a ground-truth file to use (must exist); else discovered (`find_ground_truth`)
    when `find_gt`. Raises `AuditInputError` naming the file for anything missing or corrupt.
    """
    root = Path(build_dir).resolve()
    if not shards_dir(root).is_dir():
        raise AuditInputError(f"{root}: not a build directory (no shards/ folder)")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise AuditInputError(f"{manifest_path}: missing: the build was not finalized (run the build to the end)")
    manifest_bytes = manifest_path.read_bytes()
    manifest = _load_json(manifest_path, "manifest")
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise AuditInputError(f"{manifest_path}: not a build manifest (no 'shards' list)")

    verified = False
    if verify:
        from shards.verify import verify_build

        problems = verify_build(root)
        if problems:
            shown = "\n  ".join(f"{root / p.path.split(':', 1)[0]}: {p.cause}"
                                + (f" (sample {p.path.split(':', 1)[1]})" if ":" in p.path else "")
                                for p in problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise AuditInputError(f"{root} fails `gr3d shards verify` ({len(problems)} problems); "
                                  f"fix or rebuild these files first:\n  {shown}{more}")
        verified = True

    index = _read_parquet_rows(root / "index.parquet", "index (index.parquet)")
    rejects = _read_parquet_rows(root / "rejects.parquet", "rejects (rejects.parquet)")
    shard_ids = [int(s["shard"]) for s in manifest["shards"]]
    stats = []
    for i in shard_ids:
        p = stats_path(root, i)
        stats.append(_load_json(p, f"shard stats of shard {i}"))

    # -- records (and point summaries), one tar at a time so an error names its tar
    records: dict[str, dict[str, Any]] = {}
    shard_of: dict[str, int] = {}
    points: dict[str, np.ndarray] = {}
    point_stats: dict[str, dict[str, float]] = {}
    for i in shard_ids:
        tar = tar_path(root, i)
        if not tar.is_file():
            raise AuditInputError(f"{tar}: missing shard listed in manifest.json")
        try:
            for s in _iter_tar(tar):
                rec = s["json"]
                key = rec["key"]
                records[key] = rec
                shard_of[key] = i
                pts = s.get("points.npy")
                if pts is not None:
                    arr = np.asarray(pts, dtype=np.float32)
                    points[key] = arr[:POINT_SAMPLE_PER_RECORD].copy()
                    z = arr[:, 4] if arr.ndim == 2 and arr.shape[1] >= 5 else np.zeros(0, np.float32)
                    point_stats[key] = _point_summary(arr, z, rec)
        except AuditInputError:
            raise
        except Exception as e:  # noqa: BLE001 - webdataset/tarfile/json raise many types for a bad tar
            raise AuditInputError(f"{tar}: cannot read samples: {type(e).__name__}: {e}") from e
    if len(records) != len(index):
        raise AuditInputError(f"{root / 'index.parquet'}: {len(index)} rows but the shards hold {len(records)} samples")

    data = BuildData(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                     index=index, rejects=rejects, stats=stats, records=records, shard_of=shard_of,
                     points=points, point_stats=point_stats, verified=verified)

    # -- intermediates
    if intermediates:
        must = expected_intermediates(data.config)
        inter = root / INTERMEDIATE_DIR
        present = sorted(p.name for p in inter.iterdir() if p.is_dir()) if inter.is_dir() else []
        for stage in [*must, *(s for s in present if s not in must)]:
            rows: list[dict[str, Any]] = []
            files: list[str] = []
            for i in shard_ids:
                p = intermediate_path(root, stage, i)
                if not p.is_file():
                    if stage in must:
                        raise AuditInputError(
                            f"{p}: missing intermediate file (stage {stage!r} of shard {i}; a {data.builder} build "
                            f"with this config writes one per shard). Re-run that chunk, or audit without "
                            f"intermediates (--no-intermediates)")
                    data.warnings.append(f"{p}: missing (stage {stage!r} is not required by the config)")
                    continue
                rows.extend(_read_parquet_rows(p, f"intermediate file of stage {stage!r}",
                                               INTERMEDIATE_COLUMNS.get(stage)))
                files.append(str(p.relative_to(root)))
            data.intermediates[stage] = rows
            data.intermediate_files[stage] = files

    # -- ground truth
    gt_path: Path | None = None
    if ground_truth is not None:
        gt_path = Path(ground_truth).resolve()
        if not gt_path.is_file():
            raise AuditInputError(f"{gt_path}: ground-truth file not found (--ground-truth)")
    elif find_gt:
        gt_path = find_ground_truth(data.config, root)
    if gt_path is not None:
        gt = _load_json(gt_path, "ground truth")
        if not isinstance(gt, dict) or not isinstance(gt.get("refspatial_mentions", []), list):
            raise AuditInputError(f"{gt_path}: not a sample-world ground truth (no 'refspatial_mentions' list)")
        data.ground_truth, data.ground_truth_path = gt, gt_path
    return data


def _iter_tar(path: Path) -> Iterator[dict[str, Any]]:
    """Samples of one shard (`shards.reader.iter_tar`: plain tarfile, no webdataset/torch)."""
    from shards.reader import iter_tar

    return iter_tar(path)


def _point_summary(arr: np.ndarray, z: np.ndarray, rec: Mapping[str, Any]) -> dict[str, float]:
    """Per-sample numbers over all of a sample's points (not only the kept slice)."""
    n = int(arr.shape[0]) if arr.ndim == 2 else 0
    w, h = rec["image"]["width"], rec["image"]["height"]
    finite = np.isfinite(z)
    valid = finite & (z > 0)
    out: dict[str, float] = {"n": float(n), "n_invalid": float(n - int(valid.sum()))}
    if valid.any():
        q = np.quantile(z[valid], [0.0, 0.05, 0.5, 0.95, 1.0])
        out.update(z_min=float(q[0]), z_p05=float(q[1]), z_median=float(q[2]), z_p95=float(q[3]), z_max=float(q[4]))
    if n and arr.shape[1] >= 2:
        u, v = arr[:, 0], arr[:, 1]
        out["n_outside_image"] = float(int(((u < 0) | (u > w) | (v < 0) | (v > h)).sum()))
    return out
