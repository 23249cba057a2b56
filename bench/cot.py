"""CoT builder overhead around its models: samples/s of the full pipeline vs a bare loop of the same calls.

Both sides run the same tiny random-weight models on CPU (a native Florence-2 and a LLaVA-style chat VLM
built offline), with the same decoding settings and the same batching:
- `pipeline`: `run_build(make_cot_builder(CotConfig(...)), out, BuildOptions.on("local"))` from the RefSpatial JSON to finished
  shards: reading and checking records, mention extraction, image decoding in every model stage, the
  Florence-2 tag stage, the VLM verify stage, the Hungarian assignment, composing, the response cache
  (a fresh sqlite file per run), the intermediate Parquet of every stage, shards, manifest.
- `bare`: a loop that only calls `Florence2Tagger.tag` and `TransformersVLM.verify_many` on the same
  records, with images, mentions and the candidate lists prepared before the clock starts (no cache).

Florence-2 is forced (ScriptedLogits, beam search still runs) to answer one box per mention, so every
mention reaches the verifier; the random VLM answers garbage, so each verify call is followed by its
repair retry: the model calls are exactly those of a real build. The reported ratio is
bare time / pipeline time (= pipeline samples/s / bare samples/s); the target is >= 0.8.

Run: `.venv/bin/python -m bench.cot [--scenes 6 --views 4 --repeat 3 --chunk-size 16]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

FORCED = "object<loc_100><loc_200><loc_500><loc_700>"


def _forced(tokenizer: Any, n: int) -> Any:
    from transformers import LogitsProcessorList

    from annotators.testing import ScriptedLogits

    return LogitsProcessorList([ScriptedLogits.from_texts(tokenizer, [FORCED] * n, num_beams=3)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repetitions; best and median reported")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--tagger-max-new-tokens", type=int, default=16)
    ap.add_argument("--verifier-max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoProcessor

    torch.set_num_threads(args.threads)
    from annotators.common import Candidate
    from annotators.florence2 import Florence2Tagger, build_tiny_florence2
    from annotators.vlm import TransformersVLM, VerifyRequest, build_tiny_vlm
    from pipelines.corpora.cot.builder import CotConfig, list_inputs, make_cot_builder
    from pipelines.corpora.cot.common import _load_rgb, _mention_of
    from pipelines.corpora.cot.stages import ReadStage
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.run import run_build
    from pipelines.sample_world import generate

    tmp = Path(tempfile.mkdtemp(prefix="gr3d-bench-cot-"))
    try:
        generate(tmp / "world", scenes=args.scenes, views=args.views, seed=0, width=320, height=240)
        flo, vlm_dir = build_tiny_florence2(tmp / "florence2"), build_tiny_vlm(tmp / "vlm")
        tok = AutoProcessor.from_pretrained(flo).tokenizer
        files = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]
        common = dict(tagger_max_new_tokens=args.tagger_max_new_tokens,
                      verifier_max_new_tokens=args.verifier_max_new_tokens)

        counted = {"florence2": 0, "vlm": 0}
        gen, comp = Florence2Tagger._generate, TransformersVLM._complete

        def counted_generate(self: Any, requests: Any) -> Any:
            counted["florence2"] += len(requests)
            return gen(self, requests)

        def counted_complete(self: Any, batch: Any, on_done: Any) -> Any:
            counted["vlm"] += len(batch)
            return comp(self, batch, on_done)

        Florence2Tagger._generate = counted_generate  # type: ignore[method-assign]
        TransformersVLM._complete = counted_complete  # type: ignore[method-assign]

        def builder(out: Path, cache: bool = False) -> Any:
            return make_cot_builder(CotConfig(files, tmp / "world", out=out, cache=cache, tagger="florence2",
                                    verifier="transformers",
                                    tagger_model=str(flo), verifier_model=str(vlm_dir), rewrite="none",
                                    device="cpu", torch_threads=args.threads, num_gpus=0,
                                    tagger_kwargs={"generate_kwargs": {"logits_processor": _forced(tok, n_forced)}},
                                    **common))

        b0 = make_cot_builder(CotConfig(files, tmp / "world", cache=None, tagger="oracle", verifier="none"))
        items = sorted(list_inputs(b0.config), key=lambda it: it["key"])
        read, _ = ReadStage().process(items)
        n_samples = len(items)
        images = [_load_rgb(it["image_path"]) for it in read]  # prepared outside the bare loop's clock
        mentions = [[_mention_of(it, e) for e in it["entities"]] for it in read]
        n_mentions = sum(len(m) for m in mentions)

        n_forced = 2 * n_mentions + 64  # >= the Florence-2 requests of one run

        def bare() -> tuple[float, int, int]:
            forced = _forced(tok, n_forced)  # tokenizing the scripted answers is not a model call
            t0 = time.perf_counter()
            tagger = Florence2Tagger(str(flo), num_beams=3, max_new_tokens=args.tagger_max_new_tokens, batch_size=8,
                                     generate_kwargs={"logits_processor": forced})
            vlm = TransformersVLM(str(vlm_dir), max_new_tokens=args.verifier_max_new_tokens, batch_size=4)
            tagger.setup()
            vlm.setup()
            cands: list[list[Any]] = []
            for s in range(0, len(read), 8):  # the tag stage's batch
                cands += tagger.tag(images[s:s + 8], mentions[s:s + 8])
            for s in range(0, len(read), 16):  # the verify stage's batch
                reqs = []
                for i in range(s, min(s + 16, len(read))):
                    per: dict[int, list[Candidate]] = {}
                    for c in cands[i]:
                        per.setdefault(c.mention_index, []).append(c)
                    reqs += [VerifyRequest(images[i], mentions[i][k], cs) for k, cs in sorted(per.items())]
                vlm.verify_many(reqs)
            return time.perf_counter() - t0, tagger.calls, vlm.calls

        def pipeline(rep: int, cache: bool = False) -> tuple[float, dict[str, int]]:
            out = tmp / f"build{rep}{'c' if cache else ''}"
            shutil.rmtree(out, ignore_errors=True)
            b = builder(out, cache)
            counted.update(florence2=0, vlm=0)
            t0 = time.perf_counter()
            run_build(b, out, BuildOptions.on("local", chunk_size=args.chunk_size, show_progress=False))
            return time.perf_counter() - t0, dict(counted)

        t_bare, t_pipe, t_cached = [], [], []
        calls = (0, 0)
        for rep in range(args.repeat):  # interleaved: load from other jobs hits both alike
            counted.update(florence2=0, vlm=0)
            tb, nt, nv = bare()
            tp, pc = pipeline(rep)
            tc, cc = pipeline(rep, cache=True)
            if pc != {"florence2": nt, "vlm": nv}:
                raise SystemExit(f"the pipeline made other model calls than the bare loop: {pc} vs {nt}, {nv}")
            t_bare.append(tb)
            t_pipe.append(tp)
            t_cached.append(tc)
            calls = (nt, nv)
            print(f"rep {rep}: bare {tb:6.2f} s ({n_samples / tb:6.2f} samples/s)  pipeline {tp:6.2f} s "
                  f"({n_samples / tp:6.2f} samples/s)  ratio {tb / tp:.3f}  | with cache {tc:6.2f} s "
                  f"(calls {cc['florence2']} + {cc['vlm']})  loadavg {os.getloadavg()[0]:.2f}", flush=True)
        best = min(t_bare) / min(t_pipe)
        med = statistics.median(t_bare) / statistics.median(t_pipe)
        print(f"\nsamples={n_samples} mentions={n_mentions} florence2 requests={calls[0]} vlm calls={calls[1]} "
              f"threads={args.threads} cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}")
        print("| side | best s | median s | samples/s (best) |")
        print("|---|---|---|---|")
        print(f"| bare loop | {min(t_bare):.2f} | {statistics.median(t_bare):.2f} | {n_samples / min(t_bare):.2f} |")
        print(f"| pipeline | {min(t_pipe):.2f} | {statistics.median(t_pipe):.2f} | {n_samples / min(t_pipe):.2f} |")
        print(f"| pipeline + response cache | {min(t_cached):.2f} | {statistics.median(t_cached):.2f} "
              f"| {n_samples / min(t_cached):.2f} |")
        print(f"overhead ratio (pipeline / bare samples/s): best {best:.3f}, median {med:.3f}  (target >= 0.8)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
