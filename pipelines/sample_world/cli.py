"""`gr3d sample-world`: write the procedural sample world in the Omni3D, EmbodiedScan and RefSpatial formats."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample-world",
        help="generate the procedural sample world (Omni3D / EmbodiedScan / RefSpatial / RGB-D formats)",
        description="Render small indoor scenes with Open3D and write them, with exact ground truth, in the "
        "real on-disk formats of Omni3D, EmbodiedScan and RefSpatial plus a generic RGB-D folder. "
        "Same arguments give byte-identical files.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (the data root of every format)")
    p.add_argument("--scenes", type=_positive, default=20, help="number of scenes (default 20)")
    p.add_argument("--views", type=_positive, default=4, help="camera views per scene (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=_positive, default=640, help="colour image width in pixels (default 640)")
    p.add_argument("--height", type=_positive, default=480, help="colour image height in pixels (default 480)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="processes rendering scenes in parallel (default: the cores available to this process); "
                   "the output bytes do not depend on it")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run, usage_error=_one_line_error)
    p.error = _one_line_error  # type: ignore[method-assign]  # argparse prints usage + message; we print one line


def _one_line_error(message: str) -> NoReturn:
    """Argument errors as one line (`gr3d sample-world --help` has the usage)."""
    print(f"gr3d sample-world: error: {message}", file=sys.stderr)
    sys.exit(2)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    """Generate the world; any failure is one line on stderr (exit 2: bad arguments, 1: could not write)."""
    from pipelines.sample_world.world import generate

    t0 = time.perf_counter()
    workers = args.workers or available_cores()
    try:
        manifest = generate(args.out, scenes=args.scenes, views=args.views, seed=args.seed,
                            width=args.width, height=args.height, workers=workers,
                            progress=None if args.quiet else sys.stderr)
    except ValueError as exc:
        print(f"gr3d sample-world: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gr3d sample-world: error: cannot write the world to {args.out}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"gr3d sample-world: error: {exc}", file=sys.stderr)
        return 1
    c = manifest["counts"]
    print(f"sample world: {c['scenes']} scenes, {c['views']} views, {c['objects']} objects, "
          f"{c['omni3d_annotations']} Omni3D annotations, {c['refspatial_records']} RefSpatial records "
          f"-> {args.out} ({time.perf_counter() - t0:.1f} s, {workers} workers)")
    return 0
