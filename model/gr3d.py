"""The GR3D model: NVILA-Lite backbone + spatial PE + region encoder (the paper's method section; docs/model.md).

Data flow for one sample (one image):
  pixels (B, 3, S, S) -> SigLIP layer -2 -> feature map (B, G, G, Cv) -> + spatial PE (u, v, relative depth)
  -> projector (3x3 fold + MLP) -> G'^2 visual tokens, written over the `<image>` slots of the text;
  each `<region>` slot gets RegionEncoder(box just before it) pooled from the PE-enriched feature map;
  -> Qwen2 causal LM.

Training rules (the paper's training section and docs/model.md, decisions 5 and 6):
- Region embeddings come from the boxes written in the text (the targets, teacher forcing).
- Regions inside an assistant turn (the ones the model itself inserts at inference) are detached. Regions in
  the user prompt (region prompts, Region->3D) are not: that is how the region encoder learns in stage 1.
- Loss is token cross-entropy on assistant tokens only; image slots, region slots and the prompt are never
  targets (enforced here too, whatever labels the caller passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from model.config import GR3DConfig
from model.projector import DownsampleProjector
from model.region import RegionEncoder
from model.spatial_pe import SpatialPositionEncoding
from model.tiling import Grid, pool_regions, tiles_per_image
from model.vision import VisionTower

__all__ = ["GR3DModel", "GR3DOutput", "VisualFeatures", "IGNORE_INDEX", "BoxesLike", "collate_conversations"]

IGNORE_INDEX = -100
BoxesLike = torch.Tensor | Sequence[Sequence[float]]


@dataclass
class VisualFeatures:
    """What the image encoder produced for a batch; kept (cached) during generation for region pooling."""

    feature_map: torch.Tensor
    """(T, G, G, Cv) vision features with spatial PE added (what regions are pooled from), one per canvas."""
    tokens: torch.Tensor
    """(T, N, H) projected visual tokens; an image's tokens are those of its canvases in order."""
    windows: torch.Tensor
    """(T, 4) content rectangle of the original image in each canvas, normalized (x0, y0, x1, y1)."""
    grids: list[Grid] | None = None
    """Tile grid (rows, cols) of each image (`model.tiling`); None: one canvas per image (T = B)."""

    def tokens_per_image(self) -> list[int]:
        n = self.tokens.shape[1]
        if self.grids is None:
            return [n] * self.tokens.shape[0]
        return [n * tiles_per_image(g) for g in self.grids]


def collate_conversations(encoded: Sequence[Any], pad_id: int) -> dict[str, Any]:
    """Right-pad `EncodedConversation`s into forward() kwargs: input_ids, attention_mask, labels,
    region_boxes, region_detach (detached = region inside an assistant turn)."""
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "region_boxes": [list(e.region_boxes) for e in encoded],
            "region_detach": [list(e.region_in_response) for e in encoded]}


@dataclass
class GR3DOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    num_loss_tokens: int = 0


class GR3DModel(nn.Module):
    """GR3D as one nn.Module. `tokenizer` is attached (not a submodule) so `generate` can decode."""

    def __init__(self, config: GR3DConfig, tokenizer: Any = None, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        self.config = config
        self.tokenizer = tokenizer
        self.vision = VisionTower(config.vision, config.vision_select_layer)
        cv, h = config.vision_dim, config.llm_dim
        self.spatial_pe = SpatialPositionEncoding(cv, config.pe_num_freqs, config.pe_max_log2_freq, config.pe_hidden)
        self.projector = DownsampleProjector(cv, h, config.downsample)
        self.region_encoder = RegionEncoder(cv, h, config.region_hidden)
        llm_cfg = Qwen2Config(**config.llm)
        llm_cfg._attn_implementation = attn_implementation
        self.llm = Qwen2ForCausalLM(llm_cfg)

    # ------------------------------------------------------------------ parts
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def encode_images(self, pixel_values: torch.Tensor, depth: torch.Tensor | None = None,
                      image_windows: torch.Tensor | None = None,
                      image_grids: Sequence[Grid] | None = None) -> VisualFeatures:
        """Vision tower -> + spatial PE -> projector, per canvas (T canvases; `image_grids` says how many
        belong to each image: NVILA tiles). `image_windows` defaults to the whole canvas."""
        b = pixel_values.shape[0]
        grids = [(int(g[0]), int(g[1])) for g in image_grids] if image_grids is not None else None
        groups = None
        if grids is not None:
            counts = [tiles_per_image(g) for g in grids]
            if sum(counts) != b:
                raise ValueError(f"{b} canvases for tile grids {grids} ({sum(counts)} canvases)")
            groups = torch.repeat_interleave(torch.arange(len(grids)), torch.tensor(counts))
        vdtype = next(self.vision.parameters()).dtype
        fmap = self.vision(pixel_values.to(device=self.device, dtype=vdtype))
        if image_windows is None:
            image_windows = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=fmap.device).expand(b, 4)
        windows = torch.as_tensor(image_windows, dtype=torch.float32, device=fmap.device).reshape(b, 4)
        pe = self.spatial_pe(fmap.shape[1], windows, depth, groups)
        fmap = fmap.to(pe.dtype) + pe
        tokens = self.projector(fmap.to(self.projector.layers[1].weight.dtype))
        return VisualFeatures(fmap, tokens, windows, grids)

    def region_embeddings(self, visual: VisualFeatures, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Embeddings (n, H) of boxes normalized to their original images (grammar coordinates)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=visual.feature_map.device).reshape(-1, 4)
        if visual.grids is not None:  # tiles: pool each image's stitched map (or its one canvas)
            pooled = pool_regions(visual.feature_map, visual.windows, visual.grids, boxes, image_index)
            return self.region_encoder.mlp(pooled.to(self.region_encoder.mlp[1].weight.dtype))
        w = visual.windows[image_index]
        scale = torch.stack([w[:, 2] - w[:, 0], w[:, 3] - w[:, 1]] * 2, dim=1)
        offset = torch.stack([w[:, 0], w[:, 1]] * 2, dim=1)
        canvas_boxes = offset + boxes.clamp(0, 1) * scale
        return self.region_encoder(visual.feature_map, canvas_boxes, image_index.to(boxes.device))

    def embed_inputs(self, input_ids: torch.Tensor, visual: VisualFeatures | None,
                     region_boxes: Sequence[BoxesLike] | None = None,
                     region_detach: Sequence[Sequence[bool] | torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with the image slots and `<region>` slots overwritten.

        region_boxes[b]: boxes (k_b, 4) of sample b's `<region>` tokens in order; region_detach[b]: which of
        them are detached (default: none).
        """
        ids = input_ids.to(self.device)
        tid = self.config.token_ids
        emb = self.llm.get_input_embeddings()(ids)
        if "image" in tid and visual is None and bool((ids == tid["image"]).any()):
            raise ValueError("<image> tokens present but no pixel_values / visual features given")
        if visual is not None and "image" in tid:
            img_mask = ids == tid["image"]
            counts = img_mask.sum(dim=1).tolist()
            if counts != visual.tokens_per_image():
                raise ValueError(f"samples need {visual.tokens_per_image()} image tokens, got {counts}")
            emb = emb.masked_scatter(img_mask[..., None], visual.tokens.to(emb.dtype).reshape(-1, emb.shape[-1]))
        if "region" not in tid:
            return emb
        reg_mask = ids == tid["region"]
        n_reg = reg_mask.sum(dim=1).tolist()
        if sum(n_reg) == 0:
            return emb
        if visual is None or region_boxes is None:
            raise ValueError("<region> tokens present but no image features / region_boxes given")
        boxes, index, detach = [], [], []
        for b, k in enumerate(n_reg):
            bx = torch.as_tensor(region_boxes[b] if b < len(region_boxes) else [], dtype=torch.float32).reshape(-1, 4)
            if bx.shape[0] != k:
                raise ValueError(f"sample {b}: {k} <region> tokens but {bx.shape[0]} region boxes")
            boxes.append(bx)
            index.append(torch.full((k,), b, dtype=torch.long))
            dt = region_detach[b] if region_detach is not None else [False] * k
            detach.append(torch.as_tensor(list(dt) if not isinstance(dt, torch.Tensor) else dt, dtype=torch.bool)
                          .reshape(-1)[:k])
        all_boxes = torch.cat(boxes).to(self.device)
        all_index = torch.cat(index).to(self.device)
        all_detach = torch.cat(detach).to(self.device)
        reg = self.region_embeddings(visual, all_boxes, all_index).to(emb.dtype)
        reg = torch.where(all_detach[:, None], reg.detach(), reg)
        return emb.masked_scatter(reg_mask[..., None], reg)

    @staticmethod
    def regions_in_response(input_ids: torch.Tensor, labels: torch.Tensor, region_id: int) -> list[torch.Tensor]:
        """Per sample, per `<region>`: is it in an assistant turn? (the `</bbox>` before it is supervised)."""
        out = []
        for b in range(input_ids.shape[0]):
            pos = (input_ids[b] == region_id).nonzero().flatten()
            prev = (pos - 1).clamp_min(0)
            out.append(labels[b, prev].ne(IGNORE_INDEX) & pos.gt(0))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                region_boxes: Sequence[BoxesLike] | None = None, depth: torch.Tensor | None = None,
                image_windows: torch.Tensor | None = None,
                region_detach: Sequence[Sequence[bool] | torch.Tensor] | None = None,
                position_ids: torch.Tensor | None = None, image_grids: Sequence[Grid] | None = None) -> GR3DOutput:
        """Teacher-forced forward (training and the full-sequence reference of the generation loop).

        input_ids/labels: right-padded (B, L) from `model.tokenizer.encode_conversation`; region_detach
        defaults to "detach the regions that sit in assistant turns" when labels are given. With
        `image_grids` (tiles), pixel_values/image_windows/depth hold every image's canvases in order.
        """
        ids = input_ids.to(self.device)
        visual = (self.encode_images(pixel_values, depth, image_windows, image_grids)
                  if pixel_values is not None else None)
        if region_detach is None and labels is not None and "region" in self.config.token_ids:
            region_detach = self.regions_in_response(ids, labels.to(self.device), self.config.token_ids["region"])
        emb = self.embed_inputs(ids, visual, region_boxes, region_detach)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        out = self.llm(inputs_embeds=emb, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits
        loss, n = None, 0
        if labels is not None:
            lab = labels.to(self.device).clone()
            for name in ("image", "region"):
                if name in self.config.token_ids:
                    lab[ids == self.config.token_ids[name]] = IGNORE_INDEX
            if attention_mask is not None:
                lab[attention_mask == 0] = IGNORE_INDEX
            tgt = lab[:, 1:]
            n = int(tgt.ne(IGNORE_INDEX).sum())
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1)
        return GR3DOutput(loss, logits, n)

    # ------------------------------------------------------------------ training helpers
    def set_stage(self, stage: int, train_vision: bool = False) -> int:
        """Trainable parameters per GR3D stage; returns how many parameters train.

        Stage 1 (spatial pretraining): all but the SigLIP encoder (with `train_vision`, everything: a
        random-weight encoder has to learn). Stage 2 (detection CoT): the LLM only.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for name, p in self.named_parameters():
            if stage == 1:
                p.requires_grad_(train_vision or not name.startswith("vision."))
            else:
                p.requires_grad_(name.startswith("llm."))
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (works on the meta device)."""
        parts = {"vision": self.vision, "projector": self.projector, "llm": self.llm,
                 "spatial_pe": self.spatial_pe, "region_encoder": self.region_encoder}
        out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
        out["nvila_backbone"] = out["vision"] + out["projector"] + out["llm"]
        out["gr3d_modules"] = out["spatial_pe"] + out["region_encoder"]
        out["total"] = out["nvila_backbone"] + out["gr3d_modules"]
        return out
