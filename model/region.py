"""Region encoder: a 2D box -> one embedding in the LLM's input space (pure torch; no torchvision here).

Pooling is RoIAlign with one output bin and torchvision's adaptive sampling (`aligned=True`,
`sampling_ratio=-1`, `output_size=1`): the box, in feature-cell units, gets ceil(width) x ceil(height)
sample points (at least 1) on a regular grid at sub-cell centres; each is bilinearly interpolated (border
clamped) and the samples are averaged. Because bilinear interpolation is separable and the samples form a
product grid, the average equals `Wy^T F Wx` with per-box weight vectors over rows and columns, computed in
closed form and applied with one einsum (float32), so any number of boxes pools in one vectorized call.
Properties the tests pin: the whole map gives the exact mean feature (samples land on cell centres), a box
that is exactly one cell (or a point at a cell centre) gives that cell, and a zero-size box (the grammar's
point) gives the bilinear value at the point.

Decisions: pooling reads the vision feature map *after* the spatial PE and *before* the projector (finest
grid: 32x32 for a 448 tile; PE makes the region carry its position and relative depth); box -> one token;
MLP = LN(Cv) -> Linear(Cv, H) -> GELU -> Linear(H, H).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["axis_weights", "roi_align_mean", "RegionEncoder"]


def axis_weights(lo: torch.Tensor, hi: torch.Tensor, size: int) -> torch.Tensor:
    """Per-box weights (n, size) over one axis whose dot with a feature column is the sampled mean.

    lo, hi: box extent in cell units ([0, size] covers the map; cell i spans [i, i+1]).
    """
    n_box = lo.shape[0]
    width = (hi - lo).clamp_min(0)
    n = torch.ceil(width - 1e-4).clamp_min(1)  # RoIAlign adaptive sampling ratio for a single bin
    m = int(n.max().item()) if n_box else 1
    k = torch.arange(m, device=lo.device, dtype=lo.dtype)
    pos = lo[:, None] + (k[None, :] + 0.5) * (width / n)[:, None]  # (n_box, m) sample positions
    valid = (k[None, :] < n[:, None]).to(lo.dtype)
    c = (pos - 0.5).clamp(0, size - 1)  # pixel-centre coordinates, border clamped
    i0 = torch.floor(c).long().clamp(max=size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    w1 = c - i0.to(c.dtype)
    w0 = 1 - w1
    wts = torch.zeros(n_box, size, device=lo.device, dtype=lo.dtype)
    wts.scatter_add_(1, i0, w0 * valid)
    wts.scatter_add_(1, i1, w1 * valid)
    return wts / n[:, None]


def roi_align_mean(feature_maps: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Mean RoIAlign feature of each box.

    feature_maps: (B, Gh, Gw, C); boxes: (n, 4) normalized (x1, y1, x2, y2) in the feature map's frame
    (clipped to [0, 1], corners sorted); image_index: (n,) which map each box reads. Returns (n, C).
    """
    if boxes.numel() == 0:
        return feature_maps.new_zeros(0, feature_maps.shape[-1])
    _, gh, gw, _ = feature_maps.shape
    b = boxes.to(torch.float32).clamp(0, 1)
    x1, x2 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
    y1, y2 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
    wx = axis_weights(x1 * gw, x2 * gw, gw)
    wy = axis_weights(y1 * gh, y2 * gh, gh)
    # (n, B, Gh*Gw) weights, zero outside each box's own image: no per-box copy of a feature map is made
    w = torch.zeros(b.shape[0], feature_maps.shape[0], gh * gw, device=b.device)
    w[torch.arange(b.shape[0], device=b.device), image_index.to(b.device)] = (wy[:, :, None] * wx[:, None, :]).flatten(1)
    return torch.einsum("nbk,bkc->nc", w, feature_maps.float().flatten(1, 2))


class RegionEncoder(nn.Module):
    """Box -> RoIAlign mean of the (PE-enriched) vision feature map -> MLP -> one LLM-space embedding."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or llm_dim
        self.mlp = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, llm_dim))

    def forward(self, feature_maps: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        pooled = roi_align_mean(feature_maps, boxes, image_index)
        return self.mlp(pooled.to(self.mlp[1].weight.dtype))
