"""Compare two OUTDIRs of `bench/byte_identity.sh`: one digest row per build file, and the count that differ.

    python bench/byte_identity.py BEFORE AFTER > table.txt

Tars and Parquet are compared byte for byte. `manifest.json`, `run.json` and the shards' `.stats.json`
are compared as JSON without what may change between two identical builds: `code_version` (the commit),
the stats' `timing`, run.json's timings/host/pid, and argv[0] and the OUTDIR prefix in run.json's argv.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

VOLATILE = {"code_version"}
RUN_VOLATILE = {"started_at_utc", "finished_at_utc", "seconds", "hostname", "pid", "shard_timing",
                "stage_seconds_sum", "platform", "python", "user"}


def digest(p: Path, roots: list[Path]) -> str:
    """sha256 of a file, of its JSON without the volatile keys for manifests, run records and stats."""
    if p.name in ("manifest.json", "run.json") or p.name.endswith(".stats.json"):
        d = json.loads(p.read_text())
        drop = VOLATILE | ({"timing"} if p.name.endswith(".stats.json") else set())
        drop |= RUN_VOLATILE if p.name == "run.json" else set()
        for k in drop:
            d.pop(k, None)
        if p.name == "run.json":
            argv = d.get("argv", [])[1:]
            for r in roots:
                argv = [x.replace(str(r), "ROOT") for x in argv]
            d["argv"] = argv
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main(before: str, after: str) -> int:
    roots = [Path(before).resolve(), Path(after).resolve()]
    b, a = Path(before) / "builds", Path(after) / "builds"
    files = sorted({str(p.relative_to(d)) for d in (b, a) for p in d.rglob("*") if p.is_file()})
    bad = 0
    for f in files:
        pb, pa = b / f, a / f
        hb = digest(pb, roots) if pb.exists() else "-"
        ha = digest(pa, roots) if pa.exists() else "-"
        raw = "" if not (pb.exists() and pa.exists()) or pb.read_bytes() == pa.read_bytes() else " (raw differs)"
        status = "same" if hb == ha else "DIFF"
        bad += status == "DIFF"
        print(f"{f:45s} {hb[:12]} {ha[:12]} {status}{raw}")
    print("DIFFERENT:", bad, "of", len(files))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
