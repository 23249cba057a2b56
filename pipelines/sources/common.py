"""What every reader yields: plain item dicts, or read rejects with a reason; and file-level errors.

Inputs are untrusted and huge, so one bad image or record must never stop a read: it becomes a
`ReadReject` (key, stage="read", reason code, message) yielded in place of the item, and ends up in
`rejects.parquet`. Only a failure of the whole file (truncated JSON, unsafe pickle) raises, as
`SourceError` naming the file.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipelines.engine.stage import Reject
from schemas.cli_errors import InputError

__all__ = [
    "MAX_CATEGORY_CHARS",
    "Item",
    "ReadReject",
    "ReadResult",
    "SourceError",
    "PathEscapesRoot",
    "read_reject",
    "read_each",
    "listing_worker_init",
    "reject_item",
    "item_reject",
    "is_reject",
    "split_results",
    "resolve_under",
    "resolved_path",
    "relative_to_root",
]

MAX_CATEGORY_CHARS = 200
"""A category name is a short noun phrase. An empty one, or a 50 MB string from a corrupt file, is a malformed
annotation: written as a category it would land in every detection prompt and answer of the image."""

Item = dict[str, Any]
"""One readable input: JSON-able except numpy arrays, with "key", "source" {dataset, file, id}, "format"."""

ReadReject = Reject
"""A reject of the read stage: the same dataclass as `pipelines.engine.stage.Reject` (key, stage, reason, message)."""

ReadResult = Item | ReadReject


class SourceError(InputError):
    """A whole input file is unusable (truncated JSON, unsafe pickle, wrong top-level shape, missing).

    An `InputError`: `gr3d` prints it as one line naming the file and exits 2 (schemas/cli_errors.py).
    """

    def __init__(self, path: str | os.PathLike, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class PathEscapesRoot(ValueError):
    """A path from an input file points outside the data root it must be resolved against."""


def read_reject(key: str, reason: str, message: str) -> ReadReject:
    """A reject row of stage "read"."""
    return Reject(key=key, stage="read", reason=reason, message=message)


def read_each(files: Iterable[Any], read: Callable[[Any], Iterable[ReadResult]],
              bad_file_key: Callable[[Any], str]) -> Iterator[ReadResult]:
    """Every file's items and read rejects, file after file; a file whose reader raises `SourceError` (the
    file as a whole is unusable) ends in one `bad_source_file` reject after what it yielded, and the other
    files are still read. `bad_file_key(file)` is that reject's key (each corpus names its own).
    """
    for f in files:
        try:
            yield from read(f)
        except SourceError as exc:
            yield read_reject(bad_file_key(f), "bad_source_file", str(exc))


def listing_worker_init() -> None:
    """Initializer of a listing's worker processes: Ctrl-C is left to the driver, which stops them (one message,
    not one traceback per worker), and the driver's SIGTERM (`Pool.terminate`) kills them at once, not through
    the handlers a fork copied from the driver. The cyclic garbage collector is off, as in the driver's listing
    (`pipelines.engine.plan.encode_inputs`): a listing makes no cycles, and a forked worker's collections would
    also write to every page it shares with the driver."""
    import gc
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.disable()


def reject_item(key: str, r: Reject) -> Item:
    """A read reject as a listing item (plans hold items): the first stage turns it back (`item_reject`)."""
    return {"key": key, "read_reject": {"reason": r.reason, "message": r.message}}


def item_reject(item: Item, stage: str = "read") -> Reject | None:
    """The reject an item carries (`reject_item`'s dict, or cot's `[reason, message]`), else None.

    cot's listing keeps its list form: the plan digests of its chunks hash the items as they are.
    """
    rr = item.get("read_reject")
    if rr is None:
        return None
    reason, message = (rr["reason"], rr["message"]) if isinstance(rr, dict) else rr
    return Reject(item["key"], stage, reason, message)


def is_reject(x: object) -> bool:
    return isinstance(x, Reject)


def split_results(results: Iterable[ReadResult]) -> tuple[list[Item], list[ReadReject]]:
    """Separate a reader's output into (items, rejects), keeping order."""
    items, rejects = [], []
    for r in results:
        (rejects if isinstance(r, Reject) else items).append(r)
    return items, rejects


def resolve_under(root: str | os.PathLike, rel: object) -> Path:
    """`root / rel`, normalised lexically; raises `PathEscapesRoot` if it leaves `root`.

    Lexical on purpose: datasets are often symlinked into the data root (`datasets/SUNRGBD -> /mnt/...`),
    so following links would refuse legitimate layouts; `..` and absolute paths are what is refused.
    """
    return Path(resolved_path(root, rel))


def resolved_path(root: str | os.PathLike, rel: object) -> str:
    """`str(resolve_under(root, rel))` without making the Path (~5 us of the ~8 per call; the det3d listing
    resolves every image's path)."""
    if not isinstance(rel, str) or not rel.strip():
        raise PathEscapesRoot(f"path must be a non-empty string, got {rel!r}")
    if "\x00" in rel:
        raise PathEscapesRoot(f"path contains a NUL byte: {rel!r}")
    root_s = os.fspath(root)
    base = _normalised_root(root_s, "" if os.path.isabs(root_s) else os.getcwd())  # cwd only when it matters
    full = os.path.normpath(os.path.join(base, rel))
    # For normalised absolute paths, "full is base or under it" is this prefix test, which costs a fraction of
    # os.path.commonpath (the driver resolves every input's path); a POSIX "//" root keeps commonpath's verdict.
    inside = (full == base or full.startswith(base if base.endswith(os.sep) else base + os.sep)) \
        if not base.startswith("//") else os.path.commonpath([base, full]) == base
    if not inside:
        raise PathEscapesRoot(f"path {rel!r} escapes the data root {base}")
    return full


@functools.lru_cache(maxsize=64)
def _normalised_root(root: str | bytes, cwd: str) -> str:
    """`root` made absolute against `cwd` ("" for an absolute root) and normalised: computed once per data root
    and working directory, not once per input."""
    return os.path.normpath(os.path.join(cwd, root))


def relative_to_root(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """`path` relative to `root` when inside it (POSIX separators), else its file name.

    Used for `source.file`: records must not carry machine-specific absolute paths, or the same
    input would give different shards on different machines.
    """
    p = os.path.normpath(os.path.abspath(os.fspath(path)))
    if root is not None:
        base = os.path.normpath(os.path.abspath(os.fspath(root)))
        if os.path.commonpath([base, p]) == base:
            return Path(os.path.relpath(p, base)).as_posix()
    return Path(p).name
