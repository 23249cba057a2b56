"""`gr3d shards verify DIR` and `gr3d shards show DIR KEY [--ply OUT]`.

Registered by `pipelines/cli.py` (COMMAND_MODULES). Imports only argparse at module level so
`gr3d --help` stays fast; the work modules load when a subcommand runs. `--ply` needs a point-map
exporter, which lives with the point-map corpus: the root CLI passes it in (`ply_exporter`), so this
package never imports `pipelines`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What `export_ply` exported, in the words `--ply` prints.
CLOUD_WORDS = {
    "stored_depth": "the full depth map stored in the shard (KEY.depth.npy)",
    "source_depth": "the full depth map read from the source depth file",
    "sampled_points": "the sampled points (KEY.points.npy)",
}


def add_parser(sub: argparse._SubParsersAction,
               ply_exporter: Callable[[dict[str, Any], Path, Path | None], Any] | None = None) -> None:
    p = sub.add_parser("shards", help="verify and inspect built shards",
                       description="Verify a build's shards against the contract, or print one sample.")
    ssub = p.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)
    v = ssub.add_parser("verify", help="check a build (numbering, stats, sha256, keys, records, index)",
                        description="Check a finished build; prints every problem (file: cause) and exits 1 if any.")
    v.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="build directory (holds shards/)")
    v.add_argument("--no-manifest", action="store_true",
                   help="do not require manifest.json (check shards of a build that is not finalized yet)")
    v.add_argument("--no-images", action="store_true", help="skip decoding image headers to check their size")
    v.add_argument("--max-problems", type=int, default=200, help="print at most this many problems (default 200)")
    s = ssub.add_parser("show", help="print one sample's record", description="Print the record of sample KEY.")
    s.add_argument("build_dir", type=Path, metavar="BUILD_DIR", help="build directory (holds shards/)")
    s.add_argument("key", metavar="KEY", help="sample key")
    s.add_argument("--ply", type=Path, metavar="OUT",
                   help="also export the sample's points as a PLY file: the full depth map's back-projection when "
                        "the depth is in the shard or found under --data-root, else the sampled points; the "
                        "output says which")
    s.add_argument("--data-root", type=Path, metavar="DIR", default=None,
                   help="with --ply: where the record's source depth file is looked up (default: GR3D_DATA_ROOT, "
                        "else the current directory)")
    p.set_defaults(func=run, ply_exporter=ply_exporter)


def run(args: argparse.Namespace) -> int:
    if args.shards_command == "verify":
        return _verify(args)
    if args.shards_command == "show":
        return _show(args)
    raise ValueError(f"unknown shards subcommand {args.shards_command!r}")  # pragma: no cover - argparse guards


def _verify(args: argparse.Namespace) -> int:
    from schemas.cli_errors import require_dir
    from shards.verify import iter_problem_lines, verify

    require_dir(args.build_dir, "build directory")
    rep = verify(args.build_dir, require_manifest=not args.no_manifest, check_images=not args.no_images)
    if rep.problems:
        for line in iter_problem_lines(rep.problems, args.max_problems):
            print(line)
        print(f"FAILED: {len(rep.problems)} problems in {args.build_dir}", file=sys.stderr)
        return 1
    print(f"OK: {args.build_dir}: {rep.n_shards} shards, {rep.n_samples} samples, {rep.n_reject_rows} reject rows")
    return 0


def _show(args: argparse.Namespace) -> int:
    from schemas.cli_errors import require_dir
    from shards.reader import read_sample

    require_dir(args.build_dir, "build directory")
    try:
        sample = read_sample(args.build_dir, args.key)
    except (KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(json.dumps(sample["json"], indent=2, sort_keys=True, ensure_ascii=False))
    for k, v in sorted(sample.items()):
        if k.startswith("__") or k == "json":
            continue
        desc = f"array {v.dtype} {list(v.shape)}" if hasattr(v, "shape") else f"{len(v)} bytes"
        print(f"# {k}: {desc}")
    print(f"# from {sample['__url__']}")
    if args.ply is not None:
        exporter = getattr(args, "ply_exporter", None)
        try:
            if exporter is None:
                raise ImportError("no exporter was registered (run through `gr3d`)")
            info = exporter(sample, args.ply, args.data_root)
        except ImportError as e:
            print(f"error: --ply needs the point-map exporter, which is not available: {e}", file=sys.stderr)
            return 2
        print(f"# wrote {args.ply}: {info['points']} points, {CLOUD_WORDS[info['cloud']]}")
        if info["cloud"] == "sampled_points":
            print(f"gr3d shards show: note: no depth map for {args.key} (not in the shard, not found under "
                  f"--data-root/GR3D_DATA_ROOT): exported the {info['points']} sampled points only",
                  file=sys.stderr)
    return 0
