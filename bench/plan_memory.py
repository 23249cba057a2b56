"""What the driver keeps per input after a det3d listing + plan, and its peak while listing (tracemalloc).

`encode_inputs` of the build's listing (`make_builder(...).list_inputs`) for one Omni3D file, traced in this
process only: forked listing workers are other processes, and the issue's budget is the driver's. "kept" is
what is still allocated once the listing is consumed and collected (the plan's keys and blob references, or
the blobs themselves in trees before the spill); "peak" is the most allocated at once while listing (the parse
of the file and what the driver holds of its items). Run it with the code tree as the working directory to
compare trees.

Run: `cd TREE && /work/main/.venv/bin/python /work/main/bench/plan_memory.py FILE DATA_ROOT [LABEL]`
(results: bench/executors.md, "The plan spilled").
"""

import gc
import sys
import time
import tracemalloc

sys.path.insert(0, ".")

from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder  # noqa: E402
from pipelines.engine.plan import encode_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = argv if argv is not None else sys.argv[1:]
    f, root = args[0], args[1]
    b = make_builder(Det3dBuildConfig([f], [], root))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.time()
    enc = encode_inputs(b.list_inputs(b.config))
    gc.collect()
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = len(enc)
    out = {"n": n, "kept_b_per_input": (cur - base) / n, "peak_b_per_input": (peak - base) / n,
           "peak_mib": (peak - base) / 2**20, "s": time.time() - t}
    print(f"{args[2] if len(args) > 2 else ''} n={n} kept per input {out['kept_b_per_input']:.0f} B, peak while "
          f"listing {out['peak_b_per_input']:.0f} B per input ({out['peak_mib']:.0f} MiB), {out['s']:.1f} s "
          "(under tracemalloc)")
    return out


if __name__ == "__main__":
    main()
