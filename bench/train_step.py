"""One GR3D training step on one GPU: peak memory, step time, tokens/s and MFU (random init is fine).

Run (GPU): .venv/bin/python -m bench.train_step --preset gr3d-8b --batch 2 --steps 6 --json OUT.json
Smoke (CPU): .venv/bin/python -m bench.train_step --preset tiny --device cpu --steps 2
NVILA tiling (the gr3d-8b recipe's `model.image_mode: tiles`): add `--tiles --image 640x480 --fx 530`: each
sample's image is tiled as the policy does for that size and focal length (SUN RGB-D-like: 12 tiles + a
thumbnail of 448 px, 121 tokens each), and the vision FLOPs count every tile.

The step is the trainer's own (`model.train.TrainStep`, bf16 autocast, gradient checkpointing of the LLM,
AdamW over the stage's trainable parameters, grad clip 1.0). With a single 80 GB GPU the 8B model only fits
with bf16 parameters and bf16 AdamW states (~62 GB of state in stage 1); the real runs use fp32 master
weights sharded by FSDP. The batch is real encoded conversations (bench.loader's det3d records: 5-round
region->3D) with random pixels. MFU = model FLOPs / step time / peak, with model FLOPs =
8 x LLM params x tokens (forward, backward, checkpoint recompute) + 2 x SigLIP params x patches (frozen
tower, forward only); peak bf16 dense: H100/H200 989 TFLOP/s, A100 312 TFLOP/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.loader import _record
from model.gr3d import collate_conversations
from model.tokenizer import encode_conversation
from model.train import TrainStep, build_model, enable_gradient_checkpointing
from model.train_config import ModelArgs, TrainConfig


def _peak(name: str) -> float | None:
    for key, v in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)):
        if key in name:
            return v
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gr3d-8b", choices=["gr3d-8b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tiles", action="store_true", help="NVILA dynamic tiling (image_mode tiles) instead of one canvas")
    ap.add_argument("--image", default="640x480", help="WxH of the (random) image with --tiles")
    ap.add_argument("--fx", type=float, default=530.0, help="focal length in pixels with --tiles (s = 1000/fx)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = TrainConfig(stage=args.stage, model=ModelArgs(preset=args.preset, dtype=dtype,
                                                        gradient_checkpointing=not args.no_checkpointing,
                                                        image_mode="tiles" if args.tiles else "letterbox"))
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    build_s = time.perf_counter() - t0
    n_train = model.set_stage(args.stage)
    if not args.no_checkpointing:
        enable_gradient_checkpointing(model)
    step = TrainStep(model, args.stage).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, foreach=True)

    c = model.config
    rng = random.Random(0)
    counts: int | list[int] = c.num_image_tokens
    canvases = 1
    if args.tiles:
        from PIL import Image

        from model.imaging import ImagePolicy

        w, h = (int(x) for x in args.image.split("x"))
        policy = ImagePolicy.from_config(c)
        counts = policy.token_counts(w, h, 1000.0 / args.fx)
        prep = policy.prepare(Image.new("RGB", (w, h), (127, 127, 127)), 1000.0 / args.fx, None)
        canvases = prep.pixels.shape[0]
    encs = [encode_conversation(model.tokenizer, _record(f"b/{i}", rng)["conversations"][0]["turns"], counts)
            for i in range(args.batch)]
    batch = collate_conversations(encs, c.token_ids["pad"])
    batch["pixel_values"] = torch.randn(args.batch * canvases, 3, c.image_size, c.image_size)
    if args.tiles:
        batch["image_windows"] = torch.tensor(prep.windows * args.batch)
        batch["image_grids"] = [prep.grid] * args.batch
    else:
        batch["image_windows"] = torch.tensor([[0.0, 0.125, 1.0, 0.875]] * args.batch)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    tokens = int(batch["attention_mask"].sum())

    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss_sum, n = step(batch)
            (loss_sum / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[1:] if len(times) > 1 else times)
    params_by = model.parameter_counts()
    flops = 8 * params_by["llm"] * tokens + 2 * params_by["vision"] * (c.grid ** 2) * args.batch * canvases
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = _peak(name)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
           "preset": args.preset, "stage": args.stage, "batch": args.batch, "tokens_per_step": tokens,
           "image_mode": c.image_mode, "canvases_per_image": canvases,
           "trainable_params": n_train, "param_dtype": dtype, "gradient_checkpointing": not args.no_checkpointing,
           "build_s": build_s, "step_s_median": dt, "step_s_all": times, "tokens_per_s": tokens / dt,
           "samples_per_s": args.batch / dt, "model_tflop_per_step": flops / 1e12,
           "mfu": flops / dt / peak if peak else None,
           "max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
