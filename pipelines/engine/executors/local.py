"""The plain in-process loop: every to-do chunk, one after the other, in this process.

It is the reference the other executors must match byte for byte, the benchmark baseline, and the
simplest way to debug a stage (breakpoints work). Stages are copied through pickle first, exactly as a
Ray or Beam worker receives them, so a stage that does not survive pickling fails here too.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from pipelines.engine.chunk import run_chunk
from pipelines.engine.options import ExecutorOptions
from pipelines.engine.plan import BuildPlan
from pipelines.engine.progress import Progress
from pipelines.engine.stage import Stage


def execute(stages: Sequence[Stage], plan: BuildPlan, options: ExecutorOptions, *,
            progress: Progress | None = None, progress_token: str | None = None) -> list[int]:
    """Run the plan's to-do chunks in order; returns their indices. `options` are not read."""
    local = [pickle.loads(pickle.dumps(s)) for s in stages]
    for s in local:  # setup failures stop the run before any chunk is touched
        s.ensure_setup()
    report = progress.update if progress is not None else None
    done: list[int] = []
    try:
        for i in plan.todo:
            run_chunk(local, plan.release(i), plan.build_dir, report)
            done.append(i)
            if progress is not None:
                progress.shard_done()
    finally:
        for s in local:
            s.teardown()
    return done
