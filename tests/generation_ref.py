"""Reference side of the generation exactness tests (`model.generate`): a forced script, and the full
teacher-forced forward the streaming KV-cache loop must reproduce step by step. One place, shared by the
one-canvas tests (tests/test_model_gr3d.py, tests/test_model_overfit.py) and the tiles test
(tests/test_tiling.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.generate import GenerationResult, LogitsProcessor
from model.gr3d import GR3DModel
from model.tiling import Grid, tiles_per_image
from model.tokenizer import encode_prompt
from schemas import grammar

__all__ = ["forced", "reference_logits"]


def forced(tok, scripts: Sequence[str | None]) -> LogitsProcessor:
    """A logits processor that forces each batch item's script (then EOS), ignoring region slots;
    None leaves that item free (greedy)."""
    region = tok.convert_tokens_to_ids(grammar.REGION)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok.encode(s, add_special_tokens=False) + [eos] if s is not None else None for s in scripts]

    def proc(b: int, generated: list[int], scores: torch.Tensor) -> torch.Tensor:
        if ids[b] is None:
            return scores
        k = sum(1 for t in generated if t != region)
        out = torch.full_like(scores, -float("inf"))
        out[ids[b][k]] = 0.0
        return out

    return proc


def reference_logits(model: GR3DModel, pix: torch.Tensor, prompt: str, result: GenerationResult,
                     window: torch.Tensor | None = None, grid: Grid | None = None) -> torch.Tensor:
    """Logits that chose each generated token, from one unpadded full forward (batch of one) over prompt +
    generated sequence with the same regions (region slots skipped: they are never sampled).

    One canvas: pix (3, S, S), window (4,) or None. Tiles: pix (T, 3, S, S) and window (T, 4), the image's
    canvases as `prepare_image_batch` made them, and its grid."""
    n_tok = model.config.num_image_tokens
    if grid is None:
        pix, window, grids, counts = pix[None], None if window is None else window[None], None, n_tok
    else:
        grids, counts = [grid], [n_tok] * tiles_per_image(grid)
    enc = encode_prompt(model.tokenizer, prompt, counts)
    ids = enc.input_ids + result.token_ids
    boxes = list(enc.region_boxes) + [r.box for r in result.regions]
    slots = {r.token_index for r in result.regions}
    with torch.no_grad():
        out = model(torch.tensor([ids]), pix, region_boxes=[boxes], image_windows=window, image_grids=grids)
    pos = [len(enc.input_ids) + t - 1 for t in range(len(result.token_ids)) if t not in slots]
    return out.logits[0, pos].float()
