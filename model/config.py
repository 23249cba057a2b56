"""GR3D model configuration and presets.

One plain dataclass holds the two backbone configs (as kwargs dicts, so the whole thing is a small JSON file
next to a checkpoint) plus the shapes of the GR3D additions and the ids of the grammar tokens the model
needs at run time. Presets:

- `tiny`: random weights, SigLIP 2 layers at 112 px / patch 14, Qwen2 hidden 64 x 2 layers. CPU tests, demo.
- `gr3d-8b`: NVILA-Lite-8B shapes: SigLIP so400m-patch14-448 (no pooling head, features from layer -2),
  the `mlp_downsample_3x3_fix` projector, Qwen2-7B. Weights come from a local checkpoint (model.checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GR3DConfig", "PRESETS", "preset_config", "tiny_config", "gr3d_8b_config", "CONFIG_FILE"]

CONFIG_FILE = "gr3d_config.json"


@dataclass
class GR3DConfig:
    """Everything needed to instantiate a GR3DModel (weights aside)."""

    preset: str
    vision: dict[str, Any]
    """kwargs of transformers.SiglipVisionConfig."""
    llm: dict[str, Any]
    """kwargs of transformers.Qwen2Config."""
    vision_select_layer: int = -2
    """Hidden-state index the visual features come from (NVILA: -2, i.e. the penultimate layer's output)."""
    downsample: int = 3
    """Spatial-to-channel factor of the projector (NVILA-Lite: 3x3)."""
    pe_num_freqs: int = 16
    """Sinusoid frequencies per input (u, v, relative depth) of the spatial position encoding."""
    pe_max_log2_freq: float = 6.0
    """Highest frequency is pi * 2**this (cycles over the unit range); frequencies are log-spaced from pi."""
    pe_hidden: int | None = None
    """Hidden width of the PE MLP; None means the vision width."""
    region_hidden: int | None = None
    """Hidden width of the region MLP; None means the LLM width."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    token_ids: dict[str, int] = field(default_factory=dict)
    """Ids of image, region, bbox_open, bbox_close, eos, pad, im_start (set from the tokenizer)."""
    image_mode: str = "letterbox"
    """How images become encoder inputs (`model.imaging`): letterbox | stretch | focal | tiles. Recorded here so
    training and every evaluation of a checkpoint prepare images alike."""
    canvas_focal: float = 0.0
    """`focal` mode: the focal length (encoder pixels) every camera is rescaled to."""
    min_tiles: int = 1
    """`tiles` mode: fewest tiles of the grid (NVILA: 1)."""
    max_tiles: int = 12
    """`tiles` mode: most tiles of the grid (NVILA: 12), plus a thumbnail when more than one."""
    det3d_answer: str = "grounded"
    """detect_3d answer form the model was trained on: grounded (2D box + region, then 3D) | direct (3D only)."""

    # ------------------------------------------------------------------ derived shapes
    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def grid(self) -> int:
        """Side of the vision feature map (patches per side)."""
        return self.image_size // self.patch_size

    @property
    def token_grid(self) -> int:
        """Side of the projected token map (zero-padded to a multiple of `downsample`, then folded)."""
        return math.ceil(self.grid / self.downsample)

    @property
    def num_image_tokens(self) -> int:
        return self.token_grid**2

    @property
    def vision_dim(self) -> int:
        return int(self.vision["hidden_size"])

    @property
    def llm_dim(self) -> int:
        return int(self.llm["hidden_size"])

    def token_id(self, name: str) -> int:
        if name not in self.token_ids:
            raise KeyError(f"token id {name!r} not set in the GR3D config; build it with a tokenizer "
                           f"(model.tokenizer.gr3d_token_ids)")
        return int(self.token_ids[name])

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GR3DConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GR3D config keys: {sorted(unknown)}")
        for k in ("image_mean", "image_std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> GR3DConfig:
        return cls.from_dict(json.loads((Path(directory) / CONFIG_FILE).read_text()))


def _vision(hidden: int, intermediate: int, layers: int, heads: int, image_size: int) -> dict[str, Any]:
    """SiglipVisionConfig kwargs: patch 14, no pooling head (NVILA takes patch features)."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=image_size, patch_size=14, vision_use_head=False, layer_norm_eps=1e-6,
                hidden_act="gelu_pytorch_tanh")


def _llm(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_positions: int,
         rope_theta: float, token_ids: dict[str, int] | None) -> dict[str, Any]:
    """Qwen2Config kwargs: untied embeddings, no BOS, EOS/pad from the tokenizer's ids."""
    return dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, rms_norm_eps=1e-6,
                tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=(token_ids or {}).get("eos"), pad_token_id=(token_ids or {}).get("pad"))


def tiny_config(vocab_size: int, token_ids: dict[str, int] | None = None, image_size: int = 112) -> GR3DConfig:
    """Really tiny: a few hundred CPU training steps take seconds. Random weights."""
    return GR3DConfig(preset="tiny", vision=_vision(32, 64, 2, 2, image_size),
                      llm=_llm(vocab_size, 64, 128, 2, 4, 2, 1024, 10000.0, token_ids),
                      pe_num_freqs=8, pe_max_log2_freq=4.0, token_ids=dict(token_ids or {}))


def small_config(vocab_size: int, token_ids: dict[str, int] | None = None, image_size: int = 168) -> GR3DConfig:
    """CPU-trainable: the sample world's learning bench on 2 cores (bench/learning.md says why these sizes).

    168 px / patch 14 = a 12x12 feature map (16 visual tokens after the 3x3 fold); SigLIP 96-d x 3 layers,
    Qwen2 192-d x 4 layers (6 heads of 32, 2 KV heads), the tiny offline tokenizer. About 2.5M parameters.
    """
    return GR3DConfig(preset="small", vision=_vision(96, 192, 3, 4, image_size),
                      llm=_llm(vocab_size, 192, 512, 4, 6, 2, 1024, 10000.0, token_ids),
                      pe_num_freqs=8, pe_max_log2_freq=4.0, token_ids=dict(token_ids or {}))


def gr3d_8b_config(vocab_size: int = 152064, token_ids: dict[str, int] | None = None) -> GR3DConfig:
    """NVILA-Lite-8B shapes: SigLIP so400m-patch14-448 (1152-d, 27 layers, no head) + Qwen2-7B.

    Vocab 152064 is Qwen2-7B's embedding size; it has ~400 unused rows beyond the Qwen2 tokenizer, so the
    grammar tokens fit without resizing.
    """
    return GR3DConfig(preset="gr3d-8b", vision=_vision(1152, 4304, 27, 16, 448),
                      llm=_llm(vocab_size, 3584, 18944, 28, 28, 4, 32768, 1000000.0, token_ids),
                      pe_num_freqs=16, pe_max_log2_freq=6.0, token_ids=dict(token_ids or {}))


PRESETS = {"tiny": tiny_config, "small": small_config, "gr3d-8b": gr3d_8b_config}


def preset_config(name: str, **kwargs: Any) -> GR3DConfig:
    """The config of a named preset (`tiny` and `small` need `vocab_size`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**kwargs)
