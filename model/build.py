"""The model a training config asks for, with its preprocessing and answer form recorded in its config.

`build_model` makes the preset (random, seeded) or loads `model.init`, then writes the config's image policy
(`model.image_mode`, `canvas_focal`, `min_tiles`, `max_tiles`) and `data.det3d_answer` into the model's
`GR3DConfig`. The trainer builds its examples from that config and `save_pretrained` writes it next to the
weights, so every evaluation of the checkpoint prepares images and reads detect_3d answers exactly as the
training did, without extra flags.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["build_model", "apply_train_options"]


def apply_train_options(model: Any, cfg: Any) -> Any:
    """Record the training config's image policy and detect_3d answer form in `model.config` (returns model)."""
    from model.imaging import ImagePolicy

    c = model.config
    c.image_mode, c.canvas_focal = cfg.model.image_mode, float(cfg.model.canvas_focal)
    c.min_tiles, c.max_tiles = int(cfg.model.min_tiles), int(cfg.model.max_tiles)
    c.det3d_answer = cfg.data.det3d_answer
    ImagePolicy.from_config(c)  # fails early on an unusable combination
    return model


def build_model(cfg: Any, device: torch.device) -> nn.Module:
    """The preset (random, seeded) or a checkpoint (`model.init`), in the configured dtype, on `device`."""
    from model.checkpoint import build_gr3d_8b, build_tiny_model, load_pretrained
    from model.tokenizer import build_tiny_tokenizer

    dtype = getattr(torch, cfg.model.dtype)
    torch.manual_seed(cfg.seed)
    if cfg.model.init:
        model = load_pretrained(cfg.model.init, dtype=dtype, seed=cfg.seed,
                                attn_implementation=cfg.model.attn_implementation)
    elif cfg.model.preset in ("tiny", "small"):
        model = build_tiny_model(seed=cfg.seed, image_size=cfg.model.image_size,
                                 attn_implementation=cfg.model.attn_implementation, preset=cfg.model.preset)
    else:  # random gr3d-8b (benchmarks): grammar tokens from the tiny tokenizer fit in Qwen2's vocabulary
        model = build_gr3d_8b(device=device, tokenizer=build_tiny_tokenizer(), dtype=dtype)
        model.llm.config._attn_implementation = cfg.model.attn_implementation
    return apply_train_options(model, cfg).to(device=device, dtype=dtype)
