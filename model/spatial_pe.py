"""GR3D's spatial position encoding of visual tokens (the paper's method section; SR-3D-style).

Per visual token (one SigLIP patch): its pixel coordinates (u, v) normalized to the *original image* (the
letterbox window is undone, so they live in the same space as the grammar's 2D boxes) and its relative depth
when a depth map is given -> sinusoidal features -> MLP -> added to the token before the projector.

Decisions (nothing public fixes them):
- Inputs are pixel (u, v) + relative depth, not back-projected XYZ: single images often lack intrinsics
  (CoT corpus) and the paper says "pixel coordinates and relative depth cues".
- Relative depth of a token = mean of its valid depth pixels (0 = invalid); per image it is mapped to [0, 1]
  by min-max of log depth over the valid tokens. Log makes it invariant to the depth map's unknown scale
  (relative-depth estimators) and spreads near objects.
- A token without depth (no map, or no valid pixel in its patch) gets a learned "no depth" vector in place
  of the depth sinusoid, so the MLP can tell "unknown" from "far".
- Frequencies: pi * 2**linspace(0, max_log2, F) per input, sin and cos.
- The last MLP layer starts at zero: the pretrained NVILA features are untouched at step 0 (new module).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["sinusoid", "SpatialPositionEncoding", "token_relative_depth"]


def sinusoid(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """(...,) -> (..., 2F): [sin(f x), cos(f x)] for each frequency."""
    a = x[..., None] * freqs
    return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)


def token_relative_depth(depth: torch.Tensor, grid: int,
                         groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth canvas (B, 1, S, S) -> per-token relative depth (B, G, G) in [0, 1] and a validity mask.

    `groups` (B,): canvases with the same id are tiles of one image and share its min-max (default: each
    canvas is its own image).
    """
    d = depth.float()
    valid = (d > 0) & torch.isfinite(d)
    d = torch.where(valid, d, torch.zeros_like(d))
    k = d.shape[-1] // grid
    s = grid * k
    cnt = F.avg_pool2d(valid[..., :s, :s].float(), k)
    ld = torch.where(valid, torch.log(d.clamp_min(1e-6)), torch.zeros_like(d))
    mean_log = F.avg_pool2d(ld[..., :s, :s], k) / cnt.clamp_min(1e-12)
    tok_valid = (cnt > 0)[:, 0]
    mean_log = mean_log[:, 0]
    big = torch.finfo(mean_log.dtype).max
    lo = torch.where(tok_valid, mean_log, torch.full_like(mean_log, big)).amin(dim=(1, 2))
    hi = torch.where(tok_valid, mean_log, torch.full_like(mean_log, -big)).amax(dim=(1, 2))
    if groups is not None:  # min / max over all canvases (tiles) of the same image
        g = groups.to(lo.device).long()
        n = int(g.max()) + 1
        lo = torch.full((n,), big, dtype=lo.dtype, device=lo.device).scatter_reduce(0, g, lo, "amin")[g]
        hi = torch.full((n,), -big, dtype=hi.dtype, device=hi.device).scatter_reduce(0, g, hi, "amax")[g]
    lo, hi = lo[:, None, None], hi[:, None, None]
    rel = ((mean_log - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    rel = torch.where(tok_valid, rel, torch.zeros_like(rel))
    return rel, tok_valid


class SpatialPositionEncoding(nn.Module):
    """(u, v, relative depth | no-depth) -> sinusoid -> MLP -> one vector per visual token."""

    def __init__(self, dim: int, num_freqs: int = 16, max_log2_freq: float = 6.0, hidden: int | None = None):
        super().__init__()
        self.num_freqs = num_freqs
        self.max_log2_freq = max_log2_freq
        hidden = hidden or dim
        self.no_depth = nn.Parameter(torch.zeros(2 * num_freqs))
        self.mlp = nn.Sequential(nn.Linear(6 * num_freqs, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.no_depth, std=0.5)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, grid: int, windows: torch.Tensor, depth: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        """Encodings (B, G, G, dim) for a G x G patch grid.

        windows: (B, 4) content rectangle of each image in the normalized canvas (x0, y0, x1, y1); for a
        tile it extends past the tile, so (u, v) stay original-image coordinates. depth: optional (B, 1, S, S)
        depth canvas aligned with the pixels (0 where unknown); groups: image id of each canvas (tiles).
        """
        b = windows.shape[0]
        dev = windows.device
        centers = (torch.arange(grid, device=dev, dtype=torch.float32) + 0.5) / grid
        w = windows.float()
        u = (centers[None, None, :] - w[:, 0, None, None]) / (w[:, 2] - w[:, 0]).clamp_min(1e-6)[:, None, None]
        v = (centers[None, :, None] - w[:, 1, None, None]) / (w[:, 3] - w[:, 1]).clamp_min(1e-6)[:, None, None]
        u, v = u.expand(b, grid, grid), v.expand(b, grid, grid)
        freqs = math.pi * torch.pow(2.0, torch.linspace(0.0, self.max_log2_freq, self.num_freqs, device=dev))
        feats = [sinusoid(u, freqs), sinusoid(v, freqs)]
        no_depth = self.no_depth.float().expand(b, grid, grid, -1)
        if depth is None:
            feats.append(no_depth)
        else:
            rel, ok = token_relative_depth(depth.to(dev), grid, groups)
            feats.append(torch.where(ok[..., None], sinusoid(rel, freqs), no_depth))
        x = torch.cat(feats, dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(x)
