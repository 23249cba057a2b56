"""How a stage's setup failure on a worker reaches the driver as a `StageSetupError`, on any executor.

A `StageSetupError` raised in the driver's process (the local executor) propagates as itself. Raised in
a worker, it comes back wrapped, and often as text only: Ray Data wraps it in `UserCodeException`, Beam's
SDK workers (multi-processing, portable runners) send the runner a traceback string. So the worker code
of the Ray and Beam executors runs inside `reported(build_dir)`, which writes the error's fields to
`BUILD/setup_error.json` (`shards.layout.SETUP_ERROR_FILE`) before re-raising; when `execute` fails, the
driver takes that record (`take`) and raises the `StageSetupError` it describes. The build directory is
already the one place every worker and the driver share (workers write the shards there).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pipelines.engine.stage import StageSetupError
from shards.layout import BuildLayout


@contextmanager
def reported(build_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Around a worker's stage code: a `StageSetupError` raised inside is recorded for the driver, then re-raised."""
    try:
        yield
    except StageSetupError as exc:
        record(build_dir, exc)
        raise


def record(build_dir: str | os.PathLike[str], err: StageSetupError) -> None:
    """Write `err`'s fields atomically (several workers may fail at once: any one of them is the answer)."""
    path = BuildLayout(build_dir).setup_error
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(err.to_record(), sort_keys=True))
    os.replace(tmp, path)


def take(build_dir: str | os.PathLike[str]) -> StageSetupError | None:
    """The recorded error, if a worker wrote one (the record is removed), else None."""
    try:
        rec = json.loads(BuildLayout(build_dir).setup_error.read_text())
    except (OSError, ValueError):  # none (the usual case), or unreadable: the executor's own error stands
        rec = None
    clear(build_dir)
    return StageSetupError.from_record(rec) if isinstance(rec, dict) else None


def clear(build_dir: str | os.PathLike[str]) -> None:
    """Remove a record (a stale one from a run killed before it took it)."""
    BuildLayout(build_dir).setup_error.unlink(missing_ok=True)
