"""The single `gr3d` console script.

Each command lives in the module that owns it, as `add_parser(subparsers)` registering `run(args) -> int`.
Those modules import nothing heavy at module level, so `gr3d --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

# Modules that register top-level commands, in the order `--help` lists them.
COMMAND_MODULES: list[str] = [
    "pipelines.demo",
    "model.eval.cli",
    "shards.cli",
    "pipelines.engine.build_cli",
    "pipelines.sample_world.cli",
    "model.cli",
    "pipelines.audit.cli",
]


def _export_ply(sample: dict[str, Any], out: Path) -> Any:
    """`gr3d shards show --ply`: the point-map corpus's exporter, imported only when used."""
    from pipelines.corpora.pointmaps.export import export_ply

    return export_ply(sample, out)


# Keyword arguments some `add_parser` take: what a lower package needs from above without importing it.
COMMAND_OPTIONS: dict[str, dict[str, Any]] = {"shards.cli": {"ply_exporter": _export_ply}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gr3d",
        description="GR3D corpus engine: build the grounded-CoT, 3D-detection and point-map corpora, "
        "audit their annotation noise, train and evaluate GR3D.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub, **COMMAND_OPTIONS.get(name, {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # what parse_args does, but a command may report it its own way (`usage_error`)
        getattr(args, "usage_error", parser.error)(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
