"""NVILA-Lite's multimodal projector (`mlp_downsample_3x3_fix`), same layer indices as VILA's checkpoints.

3x3 spatial-to-channel fold of the vision feature map (zero-padded to a multiple of 3: 32x32 -> 11x11 =
121 tokens for a 448 tile), then LN(9C) -> Linear(9C, 3C) -> GELU -> LN(3C) -> Linear(3C, H) -> GELU ->
Linear(H, H). The `layers` Sequential keeps VILA's indices (0 is the parameter-free fold) so an NVILA
`mm_projector/model.safetensors` (keys `layers.1.weight`, ...) loads as is.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SpaceToChannel", "DownsampleProjector", "space_to_channel"]


def space_to_channel(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    """(B, A, Bw, C) -> (B, ceil(A/k), ceil(Bw/k), k*k*C), zero-padding the bottom/right.

    Channel order equals VILA's `flat_square_3x3` (fold along the second spatial axis first, then the
    first), which matters for loading its projector weights.
    """
    n, a, b, c = x.shape
    pa, pb = (-a) % k, (-b) % k
    if pa or pb:
        x = torch.nn.functional.pad(x, (0, 0, 0, pb, 0, pa))
        n, a, b, c = x.shape
    x = x.reshape(n, a, b // k, c * k).permute(0, 2, 1, 3)
    x = x.reshape(n, b // k, a // k, c * k * k).permute(0, 2, 1, 3)
    return x.contiguous()


class SpaceToChannel(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.k = k

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        y = space_to_channel(fmap, self.k)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class DownsampleProjector(nn.Module):
    """Visual feature map (B, G, G, Cv) -> LLM tokens (B, ceil(G/k)^2, H), row-major over the token grid."""

    def __init__(self, vision_dim: int, llm_dim: int, k: int = 3):
        super().__init__()
        self.k = k
        self.layers = nn.Sequential(
            SpaceToChannel(k),
            nn.LayerNorm(vision_dim * k * k),
            nn.Linear(vision_dim * k * k, vision_dim * k),
            nn.GELU(),
            nn.LayerNorm(vision_dim * k),
            nn.Linear(vision_dim * k, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.layers(fmap)
