"""Building the presets and loading/saving checkpoints, all from local directories (no hub).

Checkpoint layout (ours) mirrors NVILA's so one loader reads both:
  DIR/gr3d_config.json            GR3D config (presets, token ids, PE/region shapes)   [ours only]
  DIR/llm/                        Qwen2ForCausalLM.save_pretrained + the tokenizer
  DIR/vision_tower/               SiglipVisionModel.save_pretrained
  DIR/mm_projector/               config.json {"mm_projector_type": "mlp_downsample_3x3_fix"} + model.safetensors
  DIR/gr3d_modules/               model.safetensors with spatial_pe.* and region_encoder.*  [ours only]
An NVILA-Lite checkpoint directory (`llm/`, `vision_tower/`, `mm_projector/`, no gr3d files) loads as the
gr3d-8b backbone; the GR3D modules are then newly initialized (seeded), and the grammar tokens are added to
NVILA's tokenizer (their embedding rows start at the mean embedding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from model.config import CONFIG_FILE, GR3DConfig, gr3d_8b_config, small_config, tiny_config
from model.gr3d import GR3DModel
from model.projector import DownsampleProjector
from model.region import RegionEncoder
from model.spatial_pe import SpatialPositionEncoding
from model.tokenizer import add_gr3d_tokens, build_tiny_tokenizer, gr3d_special_tokens, gr3d_token_ids

__all__ = ["build_tiny_model", "build_gr3d_8b", "build_model", "save_pretrained", "load_pretrained",
           "is_nvila_checkpoint", "PROJECTOR_TYPE"]

PROJECTOR_TYPE = "mlp_downsample_3x3_fix"
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "layer_norm_eps", "hidden_act", "num_channels")
_LLM_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rope_parameters", "rms_norm_eps",
             "tie_word_embeddings", "hidden_act", "sliding_window", "use_sliding_window", "max_window_layers")


def build_tiny_model(seed: int = 0, image_size: int = 112, tokenizer: Any = None,
                     attn_implementation: str = "sdpa", preset: str = "tiny") -> GR3DModel:
    """The tiny (or `small`) preset: offline tokenizer + random weights (seeded), float32."""
    tok = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    make = small_config if preset == "small" else tiny_config
    cfg = make(len(tok), gr3d_token_ids(tok), image_size)
    return GR3DModel(cfg, tok, attn_implementation)


def build_gr3d_8b(device: str | torch.device = "meta", tokenizer: Any = None,
                  dtype: torch.dtype = torch.bfloat16) -> GR3DModel:
    """The gr3d-8b architecture with random weights; on the meta device by default (shapes only)."""
    tids = gr3d_token_ids(tokenizer) if tokenizer is not None else {}
    cfg = gr3d_8b_config(token_ids=tids)
    with torch.device(device):
        model = GR3DModel(cfg, tokenizer)
    return model.to(dtype)


def build_model(preset: str, **kwargs: Any) -> GR3DModel:
    """`tiny`, `small` or `gr3d-8b` by name."""
    if preset in ("tiny", "small"):
        return build_tiny_model(preset=preset, **kwargs)
    if preset == "gr3d-8b":
        return build_gr3d_8b(**kwargs)
    raise ValueError(f"unknown preset {preset!r} (tiny | small | gr3d-8b)")


# ---------------------------------------------------------------------------------------------- save

def save_pretrained(model: GR3DModel, out_dir: str | Path) -> Path:
    """Write the NVILA-style layout plus the GR3D config and modules (safetensors)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out)
    model.llm.save_pretrained(out / "llm")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out / "llm")
    model.vision.model.save_pretrained(out / "vision_tower")
    (out / "mm_projector").mkdir(exist_ok=True)
    (out / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": PROJECTOR_TYPE}) + "\n")
    save_file({k: v.contiguous() for k, v in model.projector.state_dict().items()},
              str(out / "mm_projector" / "model.safetensors"))
    (out / "gr3d_modules").mkdir(exist_ok=True)
    mods = {f"spatial_pe.{k}": v for k, v in model.spatial_pe.state_dict().items()}
    mods.update({f"region_encoder.{k}": v for k, v in model.region_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in mods.items()}, str(out / "gr3d_modules" / "model.safetensors"))
    return out


# ---------------------------------------------------------------------------------------------- load

def is_nvila_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return all((p / d).is_dir() for d in ("llm", "vision_tower", "mm_projector"))


def _init_new_token_rows(llm: Any, new_ids: list[int]) -> None:
    """Rows of newly added tokens start at the mean of the existing rows (input and output embeddings)."""
    if not new_ids:
        return
    with torch.no_grad():
        for mat in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            keep = torch.ones(mat.shape[0], dtype=torch.bool)
            keep[new_ids] = False
            mat[new_ids] = mat[keep].float().mean(0).to(mat.dtype)


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    seed: int = 0, attn_implementation: str = "sdpa") -> GR3DModel:
    """Load our checkpoint or an NVILA-Lite-style directory (then GR3D modules are new, seeded)."""
    from safetensors.torch import load_file
    from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    p = Path(path)
    if not is_nvila_checkpoint(p):
        raise FileNotFoundError(f"{p} is not a GR3D/NVILA checkpoint (needs llm/, vision_tower/, mm_projector/)")
    ours = (p / CONFIG_FILE).exists()
    proj_cfg = json.loads((p / "mm_projector" / "config.json").read_text())
    if proj_cfg.get("mm_projector_type") != PROJECTOR_TYPE:
        raise ValueError(f"projector {proj_cfg.get('mm_projector_type')!r} is not {PROJECTOR_TYPE}")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p / "llm"), local_files_only=True)
    before = set(tok.get_vocab())
    add_gr3d_tokens(tok)
    new_ids = sorted(tok.convert_tokens_to_ids(t) for t in gr3d_special_tokens() if t not in before)
    llm = Qwen2ForCausalLM.from_pretrained(str(p / "llm"), dtype=dtype or "auto", local_files_only=True)
    vcfg = SiglipVisionConfig.from_pretrained(str(p / "vision_tower"), local_files_only=True)
    vcfg.vision_use_head = False  # NVILA uses layer -2 features; the pooling head is unused
    vision = SiglipVisionModel.from_pretrained(str(p / "vision_tower"), config=vcfg, dtype=dtype or "auto",
                                               local_files_only=True)
    if len(tok) > llm.get_input_embeddings().weight.shape[0]:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
    if not ours:
        _init_new_token_rows(llm, new_ids)

    if ours:
        cfg = GR3DConfig.load(p)
        cfg.token_ids = gr3d_token_ids(tok)
    else:
        cfg = gr3d_8b_config(token_ids=gr3d_token_ids(tok))
        cfg.preset = "nvila-lite"
    if not ours:  # shapes come from the NVILA component configs
        cfg.vision = {k: getattr(vision.config, k) for k in _VISION_KEYS} | {"vision_use_head": False}
        lcfg = llm.config.to_dict()
        cfg.llm = {k: lcfg[k] for k in _LLM_KEYS if k in lcfg} | {
            "bos_token_id": None, "eos_token_id": cfg.token_ids["eos"], "pad_token_id": cfg.token_ids["pad"]}
    cfg.llm["vocab_size"] = llm.get_input_embeddings().weight.shape[0]

    with torch.device("meta"):
        model = GR3DModel(cfg, tok, attn_implementation)
    llm.config._attn_implementation = attn_implementation
    model.llm = llm
    model.vision.model = vision
    wdtype = next(llm.parameters()).dtype
    proj = DownsampleProjector(cfg.vision_dim, cfg.llm_dim, cfg.downsample)
    proj.load_state_dict(load_file(str(p / "mm_projector" / "model.safetensors")))
    model.projector = proj
    torch.manual_seed(seed)
    model.spatial_pe = SpatialPositionEncoding(cfg.vision_dim, cfg.pe_num_freqs, cfg.pe_max_log2_freq, cfg.pe_hidden)
    model.region_encoder = RegionEncoder(cfg.vision_dim, cfg.llm_dim, cfg.region_hidden)
    if ours:
        sd = load_file(str(p / "gr3d_modules" / "model.safetensors"))
        model.spatial_pe.load_state_dict({k[len("spatial_pe."):]: v for k, v in sd.items()
                                          if k.startswith("spatial_pe.")})
        model.region_encoder.load_state_dict({k[len("region_encoder."):]: v for k, v in sd.items()
                                              if k.startswith("region_encoder.")})
    return model.to(device=device, dtype=wdtype)
