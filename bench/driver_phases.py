"""Driver CPU per input of a det3d listing and plan, phase by phase (the figures in bench/executors.md).

Phases, each timed alone with `time.process_time` on the same Omni3D file: the parse
(`load_omni3d_json`); the Omni3D reader (which includes its own parse: subtract the first figure) with
det3d's trimming (`_omni3d_item`) apart; the whole det3d listing as a build runs it (`iter_inputs`: parse,
reader and trimming, fused where the tree fuses them); encoding (`pipelines.engine.plan.encode_inputs`: pickle (+ zlib in trees before session 4), sort); chunking; the plan.json digests (a
serial phase before any chunk runs in a baseline tree; in the streamed plan they are computed as chunks are
released, while the workers run). Run it
with `PYTHONPATH` pointing at each code tree to compare them, interleaved.

Run: `PYTHONPATH=. .venv/bin/python -m bench.driver_phases FILE DATA_ROOT` (FILE from `bench.omni3d_big`).
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    try:
        from pipelines.corpora.det3d.builder import _omni3d_item, iter_inputs, omni3d_rules
        from pipelines.engine.plan import _encoded_chunks, encode_inputs
    except ImportError:  # a code tree from before the package restructure (a baseline)
        from pipelines.det3d import _omni3d_item, iter_inputs, omni3d_rules  # type: ignore[no-redef]
        from pipelines.plan import _encoded_chunks, encode_inputs  # type: ignore[no-redef]
    from pipelines.sources.omni3d import load_omni3d_json, read_omni3d

    f, root = (argv or sys.argv[1:])[:2]
    t = time.process_time
    c = t()
    n = len(load_omni3d_json(f)["images"])
    t_json = t() - c
    c = t()
    raw = list(read_omni3d([f], root, omni3d_rules("train"), check_files=False))
    t_read = t() - c
    c = t()
    items = [_omni3d_item(r) for r in raw]
    t_lean = t() - c
    del raw, items
    cfg = {"omni3d": [f], "embodiedscan": [], "data_root": root, "convert": {}}
    c = t()
    items = list(iter_inputs(cfg))
    t_list = t() - c
    c = t()
    enc = encode_inputs(items)
    t_enc = t() - c
    c = t()
    try:  # the streamed plan (issue 18b): chunks without digests, then the digests apart (overlapping the run)
        chunks = _encoded_chunks(enc.pairs, 200, lazy=True)
        t_chunks = t() - c
        c = t()
        for ch in chunks:
            ch.ensure_digest()
        t_dig = t() - c
    except TypeError:  # a tree from before: the digests are part of cutting the chunks, before any chunk runs
        _encoded_chunks(enc.pairs, 200)
        t_chunks, t_dig = 0.0, t() - c
    c = t()
    for it in items:
        json.dumps(it, sort_keys=True, separators=(",", ":"), default=str)
    t_js = t() - c
    ms = {k: 1e3 * v / n for k, v in dict(json=t_json, reader_incl_json=t_read, trim=t_lean,
                                           listing=t_list, encode=t_enc,
                                           chunks=t_chunks, digests=t_dig, canonical_json_alone=t_js).items()}
    print(f"n={n} CPU ms per input: " + " ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    print(f"blob bytes per input {sum(len(b) for _, b in enc.pairs) / n:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
