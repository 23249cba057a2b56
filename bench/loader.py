"""Training-loader throughput (samples/s) at the gr3d-8b input size, per core and with 2 workers.

Run: .venv/bin/python -m bench.loader [--samples 256 --workers 2 --epochs 2 --json OUT.json]

Writes `--samples` det3d samples with real 640x480 JPEGs (Omni3D-like sizes, fx = 520 so the image is
shown at 1000/fx) and realistic conversations (region->3D, 5 rounds; detection with up to 6 objects) into
8 shards with `shards.writer.ShardWriter`, then reads them back through `model.data.TrainLoader`, the
trainer's own path: webdataset, decode, conversation pick, resize by camera scale, letterbox to 448,
chat-template tokenization, collation. The tokenizer is the tiny preset's (Qwen2's is not on this box;
it splits text into more tokens, so tokenization cost is over- rather than under-estimated).

It also prints what one GPU needs: samples/s = (MFU x peak FLOP/s) / FLOPs per sample, with FLOPs per
sample = 8 x LLM params x tokens (forward + backward + the gradient-checkpointing recompute) + 2 x SigLIP
params x 1024 patches (frozen tower: forward only), tokens per sample measured from the batches.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.data import ExampleSpec, TrainLoader, parse_mix
from model.tokenizer import build_tiny_tokenizer, gr3d_token_ids
from schemas import grammar, prompts
from shards.writer import Sample, ShardWriter

LLM_PARAMS = 7_615_616_512  # gr3d-8b Qwen2-7B incl. embeddings (docs/model.md)
VISION_PARAMS = 413_327_088
PATCHES = 1024  # 448 / 14 squared
PEAK = {"H100 SXM bf16 dense": 989e12, "A100 bf16 dense": 312e12}


def _image(rng: np.random.Generator, w: int = 640, h: int = 480) -> bytes:
    """A JPEG with photo-like statistics (smooth gradients + blobs + mild noise), ~60-90 KB."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 200, yy / h * 180, (xx + yy) / (w + h) * 160], -1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        img += (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)[..., None] * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _record(key: str, rng: random.Random) -> dict[str, Any]:
    fx = 520.0
    objs = []
    for _ in range(6):
        x1, y1 = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
        objs.append({"category": rng.choice(["chair", "table", "lamp"]),
                     "bbox2d": [x1, y1, x1 + rng.uniform(0.05, 0.3), y1 + rng.uniform(0.05, 0.3)],
                     "box3d": {"center": [rng.uniform(-2, 2), rng.uniform(-1, 1), rng.uniform(1, 8)],
                               "dimensions": [rng.uniform(0.3, 2) for _ in range(3)],
                               "rotation": [0.0, 0.0, rng.uniform(-0.9, 1.0)]}})
    objs.sort(key=lambda o: o["box3d"]["center"][2])

    def g(o: dict[str, Any]) -> str:
        return grammar.format_grounded(o["bbox2d"])

    def b3(o: dict[str, Any]) -> str:
        return grammar.format_box3d(grammar.Box3D(*(tuple(o["box3d"][k]) for k in ("center", "dimensions", "rotation"))))

    turns = []
    for o in objs[:5]:
        turns += [{"from": "human", "value": prompts.region_to_3d_prompt(g(o), key)},
                  {"from": "gpt", "value": b3(o)}]
    convs = [{"task": "region_to_3d", "turns": turns}]
    for cat in sorted({o["category"] for o in objs}):
        ans = "\n".join(f"{g(o)} {b3(o)}" for o in objs if o["category"] == cat)
        convs.append({"task": "detect_3d", "category": cat, "turns": [
            {"from": "human", "value": prompts.detect_prompt(cat, None, key)}, {"from": "gpt", "value": ans}]})
    return {"key": key, "corpus": "det3d", "source": {"dataset": "bench", "file": "bench", "id": key},
            "image": {"ext": "jpg", "width": 640, "height": 480},
            "camera": {"K": [[fx, 0.0, 320.0], [0.0, fx, 240.0], [0.0, 0.0, 1.0]], "scale": 1000.0 / fx},
            "arrays": [], "objects": objs, "conversations": convs}


def write_shards(root: Path, n: int, shards: int = 8) -> Path:
    build = root / "det3d"
    rng, rrng = np.random.default_rng(0), random.Random(0)
    per = -(-n // shards)
    for s in range(shards):
        with ShardWriter(build, s) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"bench/s{i:06d}"
                w.add(Sample(key, _image(rng), "jpg", _record(key, rrng), {}))
            w.close()
    return build


def measure(root: Path, spec: ExampleSpec, workers: int, epochs: int, batch: int) -> dict[str, Any]:
    loader = TrainLoader(parse_mix("det3d", root), spec, batch_size=batch, num_workers=workers)
    t0 = time.perf_counter()
    first = None
    n = tokens = 0
    for e in range(epochs):
        for b in loader.epoch_batches():
            if first is None:
                first = time.perf_counter() - t0
                t1 = time.perf_counter()
                continue  # time to the first batch (worker start-up) is reported separately
            n += len(b["keys"])
            tokens += int(b["attention_mask"].sum())
        if e + 1 < epochs:
            loader.next_epoch()
    dt = time.perf_counter() - t1
    loader.close()
    return {"workers": workers, "samples": n, "seconds": dt, "samples_per_s": n / dt,
            "tokens_per_sample": tokens / max(n, 1), "first_batch_s": first}


def gpu_need(tokens_per_sample: float, mfu: float = 0.4) -> dict[str, float]:
    flops = 8 * LLM_PARAMS * tokens_per_sample + 2 * VISION_PARAMS * PATCHES
    return {name: mfu * peak / flops for name, peak in PEAK.items()} | {"flops_per_sample": flops, "mfu": mfu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = build_tiny_tokenizer()
    ids = gr3d_token_ids(tok)
    spec = ExampleSpec(tok, stage=1, num_image_tokens=121, image_size=448, pad_id=ids["pad"], max_seq_len=4096)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_shards(Path(tmp), args.samples)
        write_s = time.perf_counter() - t
        one = measure(Path(tmp), spec, 0, args.epochs, args.batch)
        multi = measure(Path(tmp), spec, args.workers, args.epochs, args.batch)
    need = gpu_need(multi["tokens_per_sample"])
    res = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpus": os.cpu_count(),
           "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "samples": args.samples,
           "shard_write_s": write_s, "single_process": one, "with_workers": multi, "gpu_need": need}
    print(f"single process (1 core):   {one['samples_per_s']:7.1f} samples/s  ({one['tokens_per_sample']:.0f} tokens/sample)")
    print(f"{args.workers} DataLoader workers:      {multi['samples_per_s']:7.1f} samples/s  "
          f"(first batch after {multi['first_batch_s']:.2f} s)")
    for name in PEAK:
        print(f"one {name} GPU at MFU {need['mfu']:.0%} needs {need[name]:6.1f} samples/s "
              f"({need['flops_per_sample'] / 1e12:.1f} TFLOP/sample)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
