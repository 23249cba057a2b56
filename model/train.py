"""The GR3D trainer: one readable loop for CPU, one GPU, DDP and FSDP under torchrun.

What one optimizer step does (stage semantics from the paper, supp. 4.2):
- `grad_accum` micro-batches per rank from `model.data.TrainLoader`; the loss is the token-weighted mean
  over the whole global window (all micro-batches of all ranks), so it does not depend on how the batch
  was split. DDP/FSDP average gradients over ranks, hence the `world / N` scale.
- AdamW, linear warmup over `warmup_ratio` of the steps then cosine, global grad-norm clip; bf16 autocast
  on CUDA; gradient checkpointing of the LLM blocks on request.
- Stage 1 trains all but SigLIP, stage 2 the LLM only (`GR3DModel.set_stage`).

Why a `TrainStep` wrapper module: FSDP (and DDP without find_unused_parameters) needs every trainable
parameter to take part in every backward on every rank, and GR3D's region encoder does not when a
micro-batch has no region prompt (its regions are all in answers, which are detached). The wrapper then
pools a dummy region with weight 0, so collectives always line up (without it FSDP ranks abort); all of it
runs inside the wrapped forward, where FSDP has the parameters gathered.

Checkpoints (`OUT/checkpoints/step_NNNNNN/`, written to `.tmp` and renamed when every rank is done):
`state/` (torch.distributed.checkpoint: model + optimizer, resharding-safe), `trainer.pt` (scheduler,
step), `rank_NNNNN.pt` (RNG), `data_rank_NNNNN.json` (each rank's exact data position), `trainer.json`
(written last). `--resume auto` takes the newest complete one. Metrics go to `OUT/metrics.jsonl` (trimmed
back to the resumed step, so a killed run leaves no duplicate points), the curve to `OUT/loss.png`, a
progress line with ETA to stderr. `OUT/final/` is a `model.checkpoint.save_pretrained` directory that
`gr3d eval det3d --checkpoint` loads. Multi-node: OUT must be on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.build import build_model
from model.data import ExampleSpec, TrainLoader, parse_mix
from model.train_config import TrainConfig, config_to_dict
from shards import interrupt

__all__ = ["train", "TrainStep", "DistInfo", "lr_lambda", "find_latest_checkpoint", "plot_metrics",
           "count_loss_tokens", "build_model", "enable_gradient_checkpointing", "Metrics"]

_CKPT_RE = re.compile(r"^step_(\d{6,})$")


# ---------------------------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"
    """none | ddp | fsdp"""
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Process group from torchrun's env (nccl on CUDA, gloo on CPU) and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mode = cfg.distributed
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if world > 1 and mode == "none":
        raise ValueError("launched with WORLD_SIZE > 1 but distributed=none")
    info = DistInfo(rank, world, local, mode, device)
    if mode != "none" and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ:  # fsdp/ddp asked for in a plain single process
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend, rank=rank, world_size=world)
        info.initialized_here = True
    return info


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _barrier(d: DistInfo) -> None:
    if d.mode != "none":
        dist.barrier()


def _all_reduce(x: float | int, d: DistInfo, op: str = "sum") -> float:
    if d.mode == "none":
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else torch.device("cpu"))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return float(t.item())


# ---------------------------------------------------------------------------------------------- model

class TrainStep(nn.Module):
    """GR3DModel + the training forward: returns (sum of token losses, number of loss tokens)."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model = model
        self.stage = stage

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        m = self.model
        out = m(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], labels=batch["labels"], region_boxes=batch["region_boxes"],
                region_detach=batch["region_detach"], image_windows=batch["image_windows"],
                depth=batch.get("depth"), image_grids=batch.get("image_grids"))
        loss_sum = out.loss * out.num_loss_tokens
        region_trains = any(p.requires_grad for p in m.region_encoder.parameters())
        has_grad_region = any(not d for ds in batch["region_detach"] for d in ds)
        if region_trains and not has_grad_region:
            g, cv = m.config.grid, m.config.vision_dim
            fmap = torch.zeros(1, g, g, cv, device=loss_sum.device)
            dummy = m.region_encoder(fmap, torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=fmap.device),
                                     torch.zeros(1, dtype=torch.long, device=fmap.device))
            loss_sum = loss_sum + 0.0 * dummy.float().sum()
        return loss_sum, out.num_loss_tokens


def count_loss_tokens(batch: dict[str, Any], token_ids: dict[str, int]) -> int:
    """Supervised targets of a batch, exactly as GR3DModel.forward counts them."""
    ids, lab = batch["input_ids"], batch["labels"].clone()
    for name in ("image", "region"):
        if name in token_ids:
            lab[ids == token_ids[name]] = -100
    lab[batch["attention_mask"] == 0] = -100
    return int(lab[:, 1:].ne(-100).sum())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the trainable transformer blocks in backward (non-reentrant: works with DDP/FSDP)."""

    def on(m: Any) -> None:
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 name
            m.activation_checkpointing_enable({"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    on(model.llm)
    if any(p.requires_grad for p in model.vision.parameters()):
        on(model.vision.model)


def wrap_model(step: TrainStep, d: DistInfo) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per transformer block, the rest at the root), or as is."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(step, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {}
        if d.device.type == "cuda":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in [b for b in step.modules() if type(b).__name__.endswith(("EncoderLayer", "DecoderLayer"))]:
            fully_shard(block, **kw)  # SigLIP and Qwen2 blocks: one all-gather group each
        fully_shard(step, **kw)
        return step
    return step


def _unwrap(wrapped: nn.Module) -> TrainStep:
    return wrapped.module if hasattr(wrapped, "module") else wrapped  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- schedule

def lr_lambda(step: int, max_steps: int, warmup_ratio: float, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine to `min_ratio`."""
    warm = int(math.ceil(warmup_ratio * max_steps))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- checkpoints

def find_latest_checkpoint(out: str | Path) -> Path | None:
    """Newest complete `step_NNNNNN` (its trainer.json exists: written last, before the atomic rename)."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name)) and
             (p / "trainer.json").is_file()]
    return max(found)[1] if found else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    s: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict[str, Any], device: torch.device) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def save_checkpoint(out: Path, step: int, wrapped: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                    loader: TrainLoader, d: DistInfo, cfg: TrainConfig, extra: dict[str, Any]) -> Path:
    """Write `checkpoints/step_NNNNNN/` atomically (tmp dir, every rank done, rename)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(d)
    msd, osd = get_state_dict(wrapped, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"), no_dist=d.mode == "none")
    torch.save({"rng": _rng_state(d.device)}, tmp / f"rank_{d.rank:05d}.pt")
    (tmp / f"data_rank_{d.rank:05d}.json").write_text(json.dumps(loader.state_dict(), indent=1) + "\n")
    _barrier(d)
    if d.is_main:
        torch.save({"step": step, "scheduler": sched.state_dict()}, tmp / "trainer.pt")
        info = {"step": step, "world_size": d.world, "mode": d.mode, "config": config_to_dict(cfg),
                "data": loader.state_dict(), **extra}
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1) + "\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, cfg.keep_checkpoints)
    _barrier(d)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name)))
    for _, p in found[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, wrapped: nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: TrainLoader,
                    d: DistInfo) -> int:
    """Restore model, optimizer, scheduler, RNG and this rank's data position; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    info = json.loads((path / "trainer.json").read_text())
    if info["world_size"] != d.world:
        raise ValueError(f"{path} was written by {info['world_size']} ranks, now {d.world}: the data position "
                         f"cannot be resumed exactly (model/optimizer could); relaunch with the same world size")
    msd, osd = get_state_dict(wrapped, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "state"), no_dist=d.mode == "none")
    set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tr = torch.load(path / "trainer.pt", weights_only=False)
    sched.load_state_dict(tr["scheduler"])
    _set_rng_state(torch.load(path / f"rank_{d.rank:05d}.pt", weights_only=False)["rng"], d.device)
    loader.load_state_dict(json.loads((path / f"data_rank_{d.rank:05d}.json").read_text()))
    return int(tr["step"])


def export_final(out_dir: Path, wrapped: nn.Module, cfg: TrainConfig, d: DistInfo) -> Path | None:
    """`save_pretrained` of the trained model on rank 0 (FSDP: the full state dict gathered to CPU first)."""
    from model.checkpoint import save_pretrained

    step = _unwrap(wrapped)
    if d.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not d.is_main:
            _barrier(d)
            return None
        cpu_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=None))
        fresh = build_model(cpu_cfg, torch.device("meta") if cfg.model.preset not in ("tiny", "small") else torch.device("cpu"))
        fresh.load_state_dict({k.removeprefix("model."): v for k, v in sd.items()}, assign=True)
        fresh.tokenizer = step.model.tokenizer
        path = save_pretrained(fresh, out_dir)
        _barrier(d)
        return path
    path = save_pretrained(step.model, out_dir) if d.is_main else None
    _barrier(d)
    return path


# ---------------------------------------------------------------------------------------------- metrics

class Metrics:
    """Rank 0's JSONL log, trimmed to the resumed step so a resumed run continues one clean curve."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _trim_jsonl(path, resume_step)

    def write(self, rec: dict[str, Any]) -> None:
        if self.enabled:
            with interrupt.deferred(), open(self.path, "a") as f:  # a stop never leaves half a line
                f.write(json.dumps(rec, sort_keys=True) + "\n")


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training loss (and lr) against step from metrics.jsonl, resumes marked; matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    pts = [r for r in recs if "loss" in r and "lr" in r]
    steps = [r["step"] for r in pts]
    losses = [r["loss"] for r in pts]
    lrs = [r["lr"] for r in pts]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="tab:blue", lw=1.2, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token-weighted CE)")
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    for r in recs:
        if r.get("event") == "resume":
            ax.axvline(r["step"], color="gray", ls="--", lw=0.8)
    ax2 = ax.twinx()
    ax2.plot(steps, lrs, color="tab:orange", lw=0.8, alpha=0.7, label="lr")
    ax2.set_ylabel("learning rate")
    ax.set_title("GR3D training" + (" (dashed: resumed)" if any(r.get("event") == "resume" for r in recs) else ""))
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------- loop

def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _micro_batches(loader: TrainLoader, d: DistInfo, events: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Endless micro-batches across epochs; an epoch ends on every rank as soon as one rank runs out."""
    while True:
        got = 0
        it = loader.epoch_batches()
        try:
            while True:
                b = next(it, None)
                if _all_reduce(b is not None, d, "min") < 1:
                    break
                got += 1
                yield b  # type: ignore[misc]
        finally:
            it.close()
        if got == 0 and loader.state.batches == 0:
            raise RuntimeError(f"epoch {loader.state.epoch} gave no usable samples (data.mix and stage tasks "
                               f"do not match? skipped: {loader.state.skipped})")
        events.append({"event": "epoch_end", "epoch": loader.state.epoch, "samples": loader.state.samples,
                       "skipped": dict(loader.state.skipped)})
        loader.next_epoch()


def train(cfg: TrainConfig, resume: str = "none") -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary. `resume`: none | auto | a checkpoint directory."""
    cfg.validate()
    d = setup_distributed(cfg)
    try:
        return _train(cfg, resume, d)
    finally:
        if d.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: str, d: DistInfo) -> dict[str, Any]:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    out = Path(cfg.out)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt: Path | None = None
    if resume == "auto":
        ckpt = find_latest_checkpoint(out)
    elif resume not in ("none", ""):
        ckpt = Path(resume)
        if not (ckpt / "trainer.json").is_file():
            raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no trainer.json)")
    elif find_latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume auto to continue, or use another out")

    model = build_model(cfg, d.device)
    n_train = model.set_stage(cfg.stage, train_vision=cfg.model.train_vision)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    step_mod = TrainStep(model, cfg.stage)
    wrapped = wrap_model(step_mod, d)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)

    sources = parse_mix(cfg.data.mix, cfg.data.root)
    spec = ExampleSpec.for_config(model, cfg)
    loader = TrainLoader(sources, spec, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                         shuffle=cfg.data.shuffle, shuffle_buffer=cfg.data.shuffle_buffer,
                         resampled=cfg.data.resampled, samples_per_epoch=cfg.data.samples_per_epoch,
                         rank=d.rank, world_size=d.world, prefetch_factor=cfg.data.prefetch_factor,
                         pin_memory=d.device.type == "cuda")
    per_step = cfg.data.batch_size * cfg.grad_accum
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * loader.estimated_samples_per_epoch() / per_step))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, max_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio))

    step = 0
    if ckpt is not None:
        step = load_checkpoint(ckpt, wrapped, opt, sched, loader, d)
    metrics = Metrics(out / "metrics.jsonl", d.is_main, step if ckpt is not None else None)
    samples_log = (out / f"samples_rank{d.rank:05d}.jsonl") if cfg.log_samples else None
    if samples_log is not None:
        _trim_jsonl(samples_log, step if ckpt is not None else None)
    tok_ids = model.config.token_ids
    if d.is_main:
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
        head = {"event": "resume" if ckpt else "start", "step": step, "max_steps": max_steps, "world_size": d.world,
                "mode": d.mode, "device": str(d.device), "trainable_params": n_train,
                "sources": {s.name: {"weight": s.weight, "samples": s.n_samples, "shards": len(s.urls)}
                            for s in sources},
                "data": loader.state_dict(), "checkpoint": str(ckpt) if ckpt else None}
        metrics.write(head)
        msg = (f"resumed from {ckpt} at step {step} (epoch {loader.state.epoch}, {loader.state.samples} samples "
               f"into it on rank 0)") if ckpt else f"training from step 0 to {max_steps}"
        print(f"[gr3d train] {msg}; {n_train:,} trainable parameters, {d.world} rank(s), {d.mode}, {d.device}",
              file=sys.stderr, flush=True)

    use_amp = d.device.type == "cuda"
    events: list[dict[str, Any]] = []
    batches = _micro_batches(loader, d, events)
    wrapped.train()
    t0, step0 = time.time(), step
    win_t, win_samples, win_tokens = time.time(), 0, 0
    last_loss = float("nan")
    tty = sys.stderr.isatty()
    try:
        while step < max_steps:
            window = [next(batches) for _ in range(cfg.grad_accum)]
            n_local = [count_loss_tokens(b, tok_ids) for b in window]
            n_total = _all_reduce(sum(n_local), d)
            loss_acc = torch.zeros((), dtype=torch.float64)
            for i, b in enumerate(window):
                last = i == len(window) - 1
                ctx = contextlib.nullcontext()
                if d.mode == "ddp" and not last:
                    ctx = wrapped.no_sync()  # type: ignore[operator]
                if d.mode == "fsdp":
                    wrapped.set_requires_gradient_sync(last)  # type: ignore[operator]
                with ctx, torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss_sum, n = wrapped(_to_device(b, d.device))
                    if n != n_local[i]:
                        raise RuntimeError(f"loss token count mismatch: model {n}, batch {n_local[i]}")
                    (loss_sum * (d.world / max(n_total, 1.0))).backward()
                loss_acc += loss_sum.detach().double().cpu()
                win_samples += len(b["keys"])
                win_tokens += int(b["attention_mask"].sum())
            if samples_log is not None:
                with interrupt.deferred(), open(samples_log, "a") as f:
                    f.write(json.dumps({"step": step + 1, "keys": [k for b in window for k in b["keys"]]}) + "\n")
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            gn_f = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            lr_now = sched.get_last_lr()[0]
            if math.isfinite(gn_f):
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            last_loss = _all_reduce(float(loss_acc), d) / max(n_total, 1.0)

            for ev in events:
                metrics.write({**ev, "step": step})
            events.clear()
            if step % cfg.log_every == 0 or step == max_steps or step == step0 + 1:
                now = time.time()
                dt = max(now - win_t, 1e-9)
                sps = _all_reduce(win_samples, d) / dt
                tps = _all_reduce(win_tokens, d) / dt
                per = (now - t0) / (step - step0)
                eta = per * (max_steps - step)
                rec = {"step": step, "epoch": loader.state.epoch, "loss": last_loss, "lr": lr_now,
                       "grad_norm": gn_f, "loss_tokens": int(n_total), "samples_per_s": sps, "tokens_per_s": tps,
                       "elapsed_s": now - t0, "eta_s": eta, "skipped_optimizer_step": not math.isfinite(gn_f)}
                if d.device.type == "cuda":
                    rec["max_memory_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                metrics.write(rec)
                if d.is_main:
                    line = (f"[gr3d train] step {step}/{max_steps} ({100 * step / max_steps:.0f}%) epoch "
                            f"{loader.state.epoch} loss {last_loss:.4f} lr {lr_now:.2e} gnorm {gn_f:.2f} "
                            f"{sps:.1f} samples/s {tps:.0f} tok/s elapsed {_fmt_time(now - t0)} ETA {_fmt_time(eta)}")
                    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                win_t, win_samples, win_tokens = now, 0, 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
                with interrupt.deferred():  # a stop waits for the checkpoint and its curve
                    save_checkpoint(out, step, wrapped, opt, sched, loader, d, cfg, {"loss": last_loss})
                    if d.is_main:
                        plot_metrics(out / "metrics.jsonl", out / "loss.png")
    except interrupt.Interrupted as exc:
        at = (find_latest_checkpoint(out) or Path("step 0 (no checkpoint yet)")).name
        raise exc.with_message(f"interrupted by {exc.signal_name} at step {step} of {max_steps}; nothing half-"
                               f"written; run the same command with --resume auto to continue from {at}") from None
    finally:
        batches.close()
    if tty and d.is_main:
        print(file=sys.stderr)
    with interrupt.deferred():
        final_ckpt = save_checkpoint(out, step, wrapped, opt, sched, loader, d, cfg, {"loss": last_loss})
        final_dir = export_final(out / "final", wrapped, cfg, d) if cfg.export_final else None
    summary = {"event": "end", "step": step, "loss": last_loss, "checkpoint": str(final_ckpt),
               "final": str(final_dir) if final_dir else None, "elapsed_s": time.time() - t0,
               "data": loader.state_dict()}
    metrics.write(summary)
    if d.is_main:
        plot_metrics(out / "metrics.jsonl", out / "loss.png")
        print(f"[gr3d train] done: step {step}, loss {last_loss:.4f}; wrote {out / 'loss.png'}"
              + (f" and {final_dir}" if final_dir else ""), file=sys.stderr, flush=True)
    return summary


def _trim_jsonl(path: Path, keep_upto: int | None) -> None:
    """Keep the lines of steps <= `keep_upto` (none when None): a resumed run continues one clean log."""
    keep = [] if keep_upto is None or not path.is_file() else [
        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= keep_upto]
    with interrupt.deferred():  # a stop mid-rewrite would lose the kept lines
        path.write_text("".join(k + "\n" for k in keep))
