"""Readers of the real on-disk formats: Omni3D JSON, EmbodiedScan info pkl, RefSpatial JSON, RGB-D folders.

Each reader yields plain item dicts (with "key", "format", "source") or `ReadReject`s with a reason;
it raises `SourceError` only when a whole file is unusable. Readers are written from the format notes
(docs/formats.md), never from the sample-world generator, so the sample world can test them.
"""

from pipelines.sources.common import (
    Item,
    PathEscapesRoot,
    ReadReject,
    ReadResult,
    SourceError,
    is_reject,
    read_reject,
    resolve_under,
    split_results,
)
from pipelines.sources.embodiedscan import read_embodiedscan
from pipelines.sources.omni3d import EVAL_RULES, NO_RULES, TRAIN_RULES, IgnoreRules, read_omni3d
from pipelines.sources.refspatial import RefSpatialFile, default_files, iter_json_array, read_refspatial
from pipelines.sources.rgbd import read_rgbd
from pipelines.sources.safe_pickle import UnsafePickleError, safe_load

__all__ = [
    "Item", "ReadReject", "ReadResult", "SourceError", "PathEscapesRoot", "UnsafePickleError",
    "is_reject", "read_reject", "resolve_under", "split_results", "safe_load",
    "read_omni3d", "IgnoreRules", "EVAL_RULES", "TRAIN_RULES", "NO_RULES",
    "read_embodiedscan", "read_refspatial", "RefSpatialFile", "default_files", "iter_json_array", "read_rgbd",
]  # fmt: skip
