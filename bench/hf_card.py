"""Cost of the Hugging Face features written at finalize (shards/hf_card.py), against finalize without it.

Writes a synthetic build (cot, det3d and point-map samples of tests/test_shards_samples.py, one image each)
of SHARDS x PER_SHARD samples, then times, side by side in the same run, REPEATS times each:
- baseline: `finalize` with the features step replaced by a no-op (merging indexes, manifest, run.json);
- with: the real `finalize` (also reads every record and npy header once: features.json + README.md).
Prints medians and the ratio. Run: .venv/bin/python -m bench.hf_card [--shards 8 --per-shard 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import shards.manifest as manifest
from shards.writer import ShardWriter
from tests.test_shards_samples import make_sample


def _write(build: Path, n_shards: int, per_shard: int) -> None:
    corpora = ("cot", "det3d", "pointmap")
    for s in range(n_shards):
        with ShardWriter(build, s) as w:
            for i in range(per_shard):
                k = s * per_shard + i
                w.add(make_sample(corpora[k % 3], f"world/s{k:07d}", seed=k % 16))
            w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build = Path(d) / "b"
        _write(build, a.shards, a.per_shard)
        real = manifest.write_hf_files
        times: dict[str, list[float]] = {"baseline": [], "with_features": []}
        for _ in range(a.repeats):
            for name in times:
                manifest.write_hf_files = real if name == "with_features" else (lambda *args, **kw: {})
                t0 = time.perf_counter()
                manifest.finalize(build, {"builder": "bench"}, "bench")
                times[name].append(time.perf_counter() - t0)
        manifest.write_hf_files = real
    n = a.shards * a.per_shard
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"samples {n}  load average {os.getloadavg()[0]:.2f}")
    for k, v in med.items():
        print(f"{k:14s} median {v * 1000:8.1f} ms  ({n / v:,.0f} samples/s)  runs {[round(x, 3) for x in times[k]]}")
    print(f"features step: +{(med['with_features'] - med['baseline']) * 1000:.1f} ms, "
          f"finalize ratio {med['with_features'] / med['baseline']:.2f}x")


if __name__ == "__main__":
    main()
