"""The options of a build run, typed: what `gr3d build`'s common flags mean, built once from them.

`BuildOptions` is what `run_build` takes: the plan's options (chunk size, limit, overwrite, dry run),
progress, and the `ExecutorOptions` that `run_build` hands to the chosen executor unchanged. Options that
only one executor reads live in that executor's own dataclass (`RayOptions`, `BeamOptions`), so an
executor's signature says what it uses and the others never see flags that mean nothing to them.

`BuildOptions.from_args(args)` is the one place that reads the common flags
(`pipelines.engine.build_cli.add_common_arguments`). Values are checked by `run_build`, which raises
`BuildError` for a bad one (the CLI prints it as one line).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Any

EXECUTORS = ("ray", "beam", "local")
DEFAULT_CHUNK_SIZE = 1000


@dataclass(frozen=True)
class RayOptions:
    """Read by the Ray executor only."""

    address: str | None = None  # join this cluster (`--ray-address`); None: RAY_ADDRESS, else an embedded Ray
    num_gpus: float | None = None  # GPUs per model-stage actor (`--num-gpus`); None: what the stage declares


@dataclass(frozen=True)
class BeamOptions:
    """Read by the Beam executor only."""

    # Pipeline options passed through to Beam, already split like shell lines (`--beam-options`).
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutorOptions:
    """Where the chunks run: the executor, its parallelism, and each executor's own options."""

    name: str = "ray"  # one of EXECUTORS
    workers: int | None = None  # parallel workers; None: all CPUs / GPUs available (the local loop ignores it)
    ray: RayOptions = field(default_factory=RayOptions)
    beam: BeamOptions = field(default_factory=BeamOptions)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `run_build` needs besides the builder and the output directory."""

    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    chunk_size: int | None = None  # None: the resumed build's chunk size, else DEFAULT_CHUNK_SIZE
    limit: int | None = None  # only the first N inputs (after sorting by key)
    overwrite: bool = False  # delete the previous build outputs first (default: resume)
    dry_run: bool = False  # only plan
    show_progress: bool = True
    progress_interval: float = 5.0  # seconds between progress lines

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BuildOptions:
        """The common flags of `gr3d build` (`add_common_arguments`) as options."""
        executor = ExecutorOptions(
            name=args.executor, workers=args.workers,
            ray=RayOptions(address=args.ray_address, num_gpus=args.num_gpus),
            beam=BeamOptions(args=tuple(tok for s in args.beam_options for tok in shlex.split(s))))
        return cls(executor=executor, chunk_size=args.chunk_size, limit=args.limit, overwrite=args.overwrite,
                   dry_run=args.dry_run, show_progress=not args.quiet, progress_interval=args.progress_interval)

    @classmethod
    def on(cls, executor: str, *, workers: int | None = None, **kw: Any) -> BuildOptions:
        """Shorthand for callers in code (tests, benchmarks) on an executor with no Ray/Beam options:
        `BuildOptions.on("ray", workers=2, chunk_size=4)` is
        `BuildOptions(ExecutorOptions("ray", workers=2), chunk_size=4)`."""
        return cls(executor=ExecutorOptions(executor, workers), **kw)

