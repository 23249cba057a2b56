"""`gr3d build BUILDER`: run a corpus builder on an executor, with resume, limits and a dry run.

Corpus builders plug in by registering themselves, so this module never needs to know them:

    # pipelines/builders/cot.py  (module level stays light: no torch / ray / transformers imports)
    from pipelines.engine.build_cli import register_builder

    def _add_arguments(p):            # the builder's own options, after the common ones
        p.add_argument("--refspatial", type=Path, required=True)

    def _make(args) -> Builder:       # a pipelines.engine.plan.Builder: config, list_inputs, stages
        return Builder("cot", {"refspatial": str(args.refspatial)}, list_inputs, [Read(), Tag(), Write()])

    register_builder("cot", _make, help="grounded CoT corpus from RefSpatial", add_arguments=_add_arguments)

and by adding their module name to `BUILDER_MODULES` below (or, for plugins and tests, to the
`GR3D_BUILDERS` environment variable, comma-separated). Common options (all builders):
`--out --executor ray|beam|local --workers --chunk-size --limit --overwrite --dry-run --ray-address
--num-gpus --beam-options --quiet --progress-interval`, read once into `pipelines.engine.options.BuildOptions`.

On a Ray cluster (`--ray-address` or RAY_ADDRESS) or a distributed Beam runner, shards are written by
the workers: `--out` must be a path every node sees at the same place (NFS, a mounted bucket).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Modules whose import registers a builder (`register_builder`), in `--help` order.
BUILDER_MODULES: list[str] = ["pipelines.corpora.cot.builder", "pipelines.corpora.det3d.builder", "pipelines.corpora.pointmaps.builder"]
ENV_BUILDERS = "GR3D_BUILDERS"


@dataclass(frozen=True)
class BuilderSpec:
    name: str
    make: Callable[[argparse.Namespace], Any]  # -> pipelines.engine.plan.Builder
    help: str = ""
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, BuilderSpec] = {}


def register_builder(name: str, make: Callable[[argparse.Namespace], Any], *, help: str = "",
                     add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     aliases: tuple[str, ...] = ()) -> None:
    """Make `gr3d build NAME` available. `make(args)` returns a `pipelines.engine.plan.Builder`.

    NAME is the corpus the builder writes (one name per thing); `aliases` keep old spellings working.

    Registering the same name twice with another function is an error (two modules fighting over a
    subcommand); re-registering the same spec (a module imported twice) is harmless.
    """
    spec = BuilderSpec(name, make, help, add_arguments, tuple(aliases))
    old = _REGISTRY.get(name)
    if old is not None and _origin(old.make) != _origin(make):
        raise ValueError(f"builder {name!r} is already registered by {_origin(old.make)}")
    _REGISTRY[name] = spec


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def env_builder_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(ENV_BUILDERS, "").split(",") if m.strip()]


def registered_builders() -> dict[str, BuilderSpec]:
    """Import every builder module and return the registry.

    A module of BUILDER_MODULES that does not exist (yet) is skipped; one named in GR3D_BUILDERS that
    cannot be imported is reported on stderr and skipped, so a stale variable never breaks `gr3d`.
    """
    for mod in BUILDER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
    for mod in env_builder_modules():
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            print(f"gr3d: skipping builder module {mod!r} from {ENV_BUILDERS}: {exc}", file=sys.stderr)
    return dict(_REGISTRY)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution (common to all builders)")
    g.add_argument("--out", type=Path, required=True,
                   help="build directory (on a cluster: a path every node sees)")
    g.add_argument("--executor", choices=("ray", "beam", "local"), default="ray",
                   help="ray (default): Ray tasks per chunk (Ray Data when a stage needs a model actor pool), "
                        "embedded local Ray unless --ray-address/RAY_ADDRESS; "
                        "beam: Apache Beam (in-process FnApiRunner unless --beam-options sets a runner); "
                        "local: plain single-process loop")
    g.add_argument("--workers", type=int, default=None,
                   help="parallel workers (Ray: task concurrency and actor-pool size; Beam local: processes); "
                        "default: all CPUs / GPUs available")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="inputs per chunk = samples per shard at most (default: the resumed build's, else 1000)")
    g.add_argument("--limit", type=int, default=None, help="only the first N inputs (after sorting by key)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete previous outputs in --out first (default: resume, skipping done chunks)")
    g.add_argument("--dry-run", action="store_true", help="print the plan (chunks, done, to do) and exit")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: RAY_ADDRESS, else start an embedded local Ray)")
    g.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per model-stage worker (default: what the stage declares; 0 runs it on CPU)")
    g.add_argument("--beam-options", action="append", default=[], metavar="'--runner=FlinkRunner ...'",
                   help="Beam pipeline options passed through (repeatable; each is split like a shell line)")
    g.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    g.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")


def add_parser(sub: argparse._SubParsersAction) -> None:
    builders = registered_builders()
    p = sub.add_parser("build", help="build a corpus (cot | det3d | pointmap) into WebDataset shards",
                       description="Build a corpus into shards: resumable, on Ray, Beam or a plain loop. "
                                   "Each builder's own options follow its name: gr3d build BUILDER --out DIR ...")
    bsub = p.add_subparsers(dest="builder", metavar="BUILDER", required=True)
    for name, spec in builders.items():
        bp = bsub.add_parser(name, help=spec.help, description=spec.help, aliases=list(spec.aliases))
        add_common_arguments(bp)
        if spec.add_arguments is not None:
            spec.add_arguments(bp)
        bp.set_defaults(func=run, builder_spec=spec)
    if not builders:
        p.set_defaults(func=lambda args: _no_builders())


def _no_builders() -> int:
    print("gr3d build: no builder is registered (see pipelines/engine/build_cli.py)", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the chosen builder; print the plan (dry run) or the build summary. Exit 2 on a fatal build error."""
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.plan import PlanError
    from pipelines.engine.run import BuildError, run_build
    from pipelines.engine.stage import StageSetupError
    from schemas.cli_errors import EXIT_USAGE

    spec: BuilderSpec = args.builder_spec
    try:
        builder = spec.make(args)
        result = run_build(builder, args.out, BuildOptions.from_args(args))
    except (StageSetupError, BuildError, PlanError) as exc:  # an unusable input file: InputError, via gr3d's main
        print(f"gr3d build {spec.name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(result.summary())
    return 0
