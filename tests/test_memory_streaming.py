"""The execution side of a build streams: what it allocates does not grow with the number of inputs.

`bench/memory.py` measures whole builds (driver listing included) over 1x and 4x the input; this test
guards the part that must be O(chunk): planning, the stages, the shard writer and the manifest. The
builder's listing is done and encoded before measuring and handed to the build as a ready
`EncodedInputs` (as the driver holds it: one compact blob per input, `pipelines.engine.plan.encode_inputs`), so
only what `run_build` allocates on top is traced (tracemalloc: Python objects, numpy arrays, image
bytes). The det3d build over 4x the inputs, same chunk size, must peak within 1.3x of the 1x peak: an
executor or writer that kept every sample, record or image of the run until the end would grow with the
corpus (about 4x here) and fail.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder
from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import decoded, encode_inputs
from pipelines.engine.run import run_build

CHUNK = 48  # 1x is 2 chunks, 4x is 8: the chunk-level peak dominates the small O(n) part (plan, keys)


def traced_peak(builder: Any, items: list[dict[str, Any]], out: Path) -> tuple[int, int]:
    """(peak bytes that `run_build` allocates above what existed before, samples written)."""
    listing = encode_inputs(items)
    builder.list_inputs = lambda config: listing
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        res = run_build(builder, out, BuildOptions.on("local", chunk_size=CHUNK, show_progress=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, res.manifest["totals"]["n_samples"]


def test_det3d_build_allocations_do_not_grow_with_the_corpus(sample_world: Any, tmp_path: Path) -> None:
    b = make_builder(Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files, sample_world.root))
    base = list(decoded(b.list_inputs(b.config)))  # 12 inputs: the world's Omni3D images and EmbodiedScan frames
    small = [{**it, "key": f"{it['key']}/r{r:03d}"} for r in range(8) for it in base]
    large = [{**it, "key": f"{it['key']}/r{r:03d}"} for r in range(32) for it in base]
    run_build(make_builder(Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files, sample_world.root)),
              tmp_path / "warm",  # imports, caches
              BuildOptions.on("local", chunk_size=CHUNK, limit=CHUNK, show_progress=False))
    p1, n1 = traced_peak(b, small, tmp_path / "x1")
    p4, n4 = traced_peak(b, large, tmp_path / "x4")
    assert (n1, n4) == (len(small), len(large))  # everything written: the work really was 4x
    assert p4 < 1.3 * p1, f"peak {p1 / 2**20:.2f} MiB at {n1} inputs, {p4 / 2**20:.2f} MiB at {n4}"
