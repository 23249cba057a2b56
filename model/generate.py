"""Streaming region insertion at inference (GR3D section 2.2.2), batched, on a transformers KV cache.

Loop, per prompt, on one shared `DynamicCache`:
1. Prefill the left-padded batch: chat template + visual tokens + the prompt's own `<region>`s (their boxes
   are parsed from the prompt text).
2. Each step every live sequence feeds exactly one input embedding: the token it just chose, or, right after
   it emitted `</bbox>`, the region embedding of that box (parsed with `schemas.grammar.parse_bbox2d` from the
   generated `<bbox>..</bbox>`, pooled from the visual features computed at prefill: no image re-encoding).
   The logits after `</bbox>` are never sampled: in training that position's target is the `<region>` slot,
   which is not supervised.
3. Stop at `<|im_end|>` or after `max_new_tokens` chosen tokens (region slots do not count).
`<region>`, `<image>`, `<|im_start|>` and padding can never be chosen. A `</bbox>` whose box does not parse
gets no region (the text keeps what was generated). Greedy or sampled (temperature, top-p).

Because every sequence consumes one input per step, positions stay aligned with a single full forward over
the final sequence; tests check that the per-step logits equal it within 1e-4 (one canvas per image, and NVILA
tiles with different grids in one batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.gr3d import GR3DModel
from model.imaging import ImagePolicy
from model.tiling import Grid, tiles_per_image
from model.tokenizer import DEFAULT_SYSTEM, encode_prompt
from schemas import grammar

__all__ = ["InsertedRegion", "GenerationResult", "generate", "prepare_images", "prepare_image_batch"]

LogitsProcessor = Callable[[int, list[int], torch.Tensor], torch.Tensor]
"""(batch index, token ids generated so far for it, scores (V,)) -> scores."""


@dataclass
class InsertedRegion:
    box: tuple[float, float, float, float]
    """Parsed 2D box, normalized to the original image."""
    token_index: int
    """Index in `GenerationResult.token_ids` of the `<region>` slot that received the embedding."""


@dataclass
class GenerationResult:
    text: str
    """Generated text (no `<|im_end|>`), with `<region>` where a region was inserted."""
    regions: list[InsertedRegion]
    token_logprobs: list[float]
    """Log-probability of every chosen token (region slots excluded) under the unscaled distribution."""
    token_ids: list[int] = field(default_factory=list)
    """Generated ids including the region slots (as the `<region>` id) and the final EOS if any."""
    finished: bool = False
    """True when EOS was produced (False: stopped at max_new_tokens)."""
    step_logits: torch.Tensor | None = None
    """(chosen tokens, V) raw logits each token was chosen from (only with output_logits=True)."""

    @property
    def mean_logprob(self) -> float:
        """Mean token log-probability (a detection confidence); -inf when nothing was generated."""
        return float(np.mean(self.token_logprobs)) if self.token_logprobs else -math.inf


def prepare_image_batch(model: GR3DModel, images: Any, scales: Sequence[float | None] | None = None,
                        depth: Any = None, mode: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[Grid] | None]:
    """PIL images (+ intrinsics scales s = 1000/fx, None = unknown camera, + optional (H, W) depth arrays) or
    ready tensors -> model inputs, by the model's image policy (`model.imaging`; `mode` overrides it).

    Returns pixel_values (T, 3, S, S), windows (T, 4) or None (whole canvas), depth (T, 1, S, S) or None, and
    the tile grid of each image (tiles mode) or None (one canvas per image, T = B).
    """
    if isinstance(images, torch.Tensor):
        pix = images if images.dim() == 4 else images[None]
        dep = depth if isinstance(depth, torch.Tensor) or depth is None else torch.stack(list(depth))
        return pix, None, dep, None
    images = list(images)
    if images and isinstance(images[0], torch.Tensor):
        dep = depth if isinstance(depth, torch.Tensor) or depth is None else torch.stack(list(depth))
        return torch.stack(images), None, dep, None
    policy = ImagePolicy.from_config(model.config, mode)
    sc = list(scales) if scales is not None else [None] * len(images)
    deps = list(depth) if depth is not None and not isinstance(depth, torch.Tensor) else [None] * len(images)
    preps = [policy.prepare(im, s, d) for im, s, d in zip(images, sc, deps)]
    pix = torch.cat([p.pixels for p in preps])
    win = torch.tensor([w for p in preps for w in p.windows], dtype=torch.float32)
    dep = depth if isinstance(depth, torch.Tensor) else None
    if depth is not None and dep is None:
        dep = torch.cat([p.depth for p in preps])  # type: ignore[misc]
    return pix, win, dep, ([p.grid for p in preps] if policy.mode == "tiles" else None)


def prepare_images(model: GR3DModel, images: Any, scales: Sequence[float | None] | None = None,
                   depth: Any = None, mode: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`prepare_image_batch` without the tile grids: pixel_values, windows, depth (one canvas per image)."""
    return prepare_image_batch(model, images, scales, depth, mode)[:3]


def _choose(scores: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> int:
    if not do_sample or temperature <= 0:
        return int(torch.argmax(scores))
    probs = torch.softmax(scores / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, dim=-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: GR3DModel, images: Any, prompts: Sequence[str], max_new_tokens: int = 256,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             scales: Sequence[float | None] | None = None, depth: Any = None,
             image_windows: torch.Tensor | None = None,
             system: str | None = DEFAULT_SYSTEM, generator: torch.Generator | None = None,
             logits_processor: LogitsProcessor | None = None, output_logits: bool = False,
             tokenizer: Any = None, prefixes: Sequence[str] | None = None) -> list[GenerationResult]:
    """Generate answers for a batch of (image, prompt) pairs with streaming region insertion.

    images: PIL images (prepared by the model's image policy with `scales`, s = 1000/fx, default unknown) or
    a tensor (B, 3, S, S) already preprocessed (then `image_windows` may give the content rectangles). Prompts are user texts; a
    `<bbox>..</bbox><region>` in a prompt is a region prompt. `prefixes` (one per prompt) start the
    assistant's answer (teacher forcing, e.g. the reasoning up to a mention to ground); their grounded
    boxes get region embeddings like the prompt's, and the result text excludes them.
    """
    from transformers import DynamicCache

    tok = tokenizer or model.tokenizer
    if tok is None:
        raise ValueError("generate needs a tokenizer (model.tokenizer or tokenizer=)")
    if len(prompts) == 0:
        return []
    model.eval()
    tid = model.config.token_ids
    dev = model.device
    pix, win, dep, grids = prepare_image_batch(model, images, scales, depth)
    if image_windows is not None:
        win = torch.as_tensor(image_windows, dtype=torch.float32)
    n_img = len(grids) if grids is not None else pix.shape[0]
    if n_img != len(prompts):
        raise ValueError(f"{n_img} images for {len(prompts)} prompts")
    visual = model.encode_images(pix, dep.to(dev) if dep is not None else None,
                                 win.to(dev) if win is not None else None, grids)

    # ---- prefill (left padded)
    n_tok = model.config.num_image_tokens
    counts = [[n_tok] * tiles_per_image(g) for g in grids] if grids is not None else [n_tok] * len(prompts)
    enc = [encode_prompt(tok, p, c, system=system) for p, c in zip(prompts, counts)]
    if prefixes is not None:
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
        for e, pre in zip(enc, prefixes):
            if pre:
                grammar.check_regions(pre)
                e.input_ids = e.input_ids + list(tok.encode(pre, add_special_tokens=False))
                e.region_boxes = e.region_boxes + [g.box for g in grammar.find_grounded(pre) if g.has_region]
    bsz, length = len(enc), max(len(e.input_ids) for e in enc)
    ids = torch.full((bsz, length), tid["pad"], dtype=torch.long)
    mask = torch.zeros((bsz, length), dtype=torch.long)
    for b, e in enumerate(enc):
        ids[b, length - len(e.input_ids):] = torch.tensor(e.input_ids)
        mask[b, length - len(e.input_ids):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    emb = model.embed_inputs(ids, visual, [e.region_boxes for e in enc])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.llm.config)
    out = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    logits = out.logits[:, -1].float()
    next_pos = mask.sum(-1)

    forbidden = torch.tensor([tid[k] for k in ("region", "image", "im_start", "pad") if k in tid], device=dev)
    embed = model.llm.get_input_embeddings()
    tokens: list[list[int]] = [[] for _ in range(bsz)]
    logps: list[list[float]] = [[] for _ in range(bsz)]
    regions: list[list[InsertedRegion]] = [[] for _ in range(bsz)]
    steps: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
    pending: list[tuple[float, float, float, float] | None] = [None] * bsz
    bbox_start: list[int | None] = [None] * bsz
    done = [False] * bsz
    finished = [False] * bsz
    n_chosen = [0] * bsz

    while True:
        feed_ids = torch.full((bsz,), tid["pad"], dtype=torch.long, device=dev)
        region_rows: list[int] = []
        for b in range(bsz):
            if done[b]:
                continue
            if pending[b] is not None:
                regions[b].append(InsertedRegion(pending[b], len(tokens[b])))  # type: ignore[arg-type]
                tokens[b].append(tid["region"])
                region_rows.append(b)
                continue
            raw = logits[b]
            if output_logits:
                steps[b].append(raw.detach().cpu().clone())
            scores = raw.clone()
            scores[forbidden] = -math.inf
            if logits_processor is not None:
                scores = logits_processor(b, list(tokens[b]), scores)
            lp = torch.log_softmax(scores, dim=-1)
            t = _choose(scores, do_sample, temperature, top_p, generator)
            tokens[b].append(t)
            logps[b].append(float(lp[t]))
            n_chosen[b] += 1
            feed_ids[b] = t
            if t == tid["eos"]:
                done[b] = finished[b] = True
                continue
            if t == tid["bbox_open"]:
                bbox_start[b] = len(tokens[b]) - 1
            elif t == tid["bbox_close"] and bbox_start[b] is not None:
                text = tok.decode(tokens[b][bbox_start[b]:], skip_special_tokens=False)
                bbox_start[b] = None
                try:
                    pending[b] = grammar.parse_bbox2d(text)
                except grammar.GrammarError:
                    pending[b] = None
            if n_chosen[b] >= max_new_tokens:
                done[b] = True
                if pending[b] is not None:  # keep the text well-formed: the region slot closes the box
                    regions[b].append(InsertedRegion(pending[b], len(tokens[b])))  # type: ignore[arg-type]
                    tokens[b].append(tid["region"])
                    pending[b] = None
        if all(done):
            break
        step_emb = embed(feed_ids)[:, None, :]
        if region_rows:
            rows = torch.tensor(region_rows, device=dev)
            boxes = torch.tensor([pending[b] for b in region_rows], dtype=torch.float32, device=dev)
            reg = model.region_embeddings(visual, boxes, rows).to(step_emb.dtype)
            step_emb = step_emb.index_copy(0, rows, reg[:, None, :])
            for b in region_rows:
                pending[b] = None
        mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=dev)], dim=1)
        out = model.llm(inputs_embeds=step_emb, attention_mask=mask, position_ids=next_pos[:, None], cache=cache,
                        use_cache=True)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1

    results = []
    for b in range(bsz):
        ids_b = tokens[b]
        body = ids_b[:-1] if finished[b] else ids_b
        results.append(GenerationResult(
            text=tok.decode(body, skip_special_tokens=False), regions=regions[b], token_logprobs=logps[b],
            token_ids=ids_b, finished=finished[b],
            step_logits=torch.stack(steps[b]) if output_logits and steps[b] else None))
    return results
