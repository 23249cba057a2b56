"""Vision side: image preprocessing policy and the SigLIP tower.

Preprocessing policy (`preprocess_image`), one tile:
1. Resize by the intrinsics scale s = 1000 / fx to (s*W, s*H) (docs/formats.md, "Design rules").
2. Fit into the encoder's square input: `letterbox` (default) scales uniformly so the longer side is the
   encoder size and pads the rest with the normalization mean (so padding is ~0 after normalization);
   `stretch` resizes to the square (what NVILA's dynamic preprocess does for a 1-tile grid).
   Both steps are composed into one resampling, so pixels are resampled once.
The content rectangle inside the square (`letterbox_window`) is given to the model so that pixel-coordinate
position encodings and region pooling use coordinates normalized to the *original image*, as the grammar's
boxes are. With a single canvas, step 1 only fixes the aspect ratio. The other image modes (a fixed-focal
canvas, NVILA dynamic tiling) and the dispatch between them are in `model.imaging`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["letterbox_window", "preprocess_image", "preprocess_depth", "VisionTower"]

Window = tuple[float, float, float, float]


def _fit(width: int, height: int, scale: float, image_size: int, mode: str) -> tuple[int, int, int, int]:
    """(new_w, new_h, x0, y0) of the content inside the square canvas."""
    if width <= 0 or height <= 0 or not scale > 0:
        raise ValueError(f"bad image size {width}x{height} or scale {scale}")
    if mode == "stretch":
        return image_size, image_size, 0, 0
    if mode != "letterbox":
        raise ValueError(f"unknown preprocess mode {mode!r} (letterbox | stretch)")
    sw, sh = width * scale, height * scale  # step 1: intrinsics-normalized size
    f = image_size / max(sw, sh)  # step 2: fit the longer side
    nw, nh = max(1, min(image_size, round(sw * f))), max(1, min(image_size, round(sh * f)))
    return nw, nh, (image_size - nw) // 2, (image_size - nh) // 2


def letterbox_window(width: int, height: int, image_size: int, scale: float = 1.0,
                     mode: str = "letterbox") -> Window:
    """Normalized (x0, y0, x1, y1) of the image content inside the encoder input square."""
    nw, nh, x0, y0 = _fit(width, height, scale, image_size, mode)
    return (x0 / image_size, y0 / image_size, (x0 + nw) / image_size, (y0 + nh) / image_size)


def preprocess_image(image: Any, scale: float = 1.0, image_size: int = 448, mode: str = "letterbox",
                     mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)
                     ) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, image_size, image_size) per the module's policy."""
    from PIL import Image

    img = image.convert("RGB")
    nw, nh, x0, y0 = _fit(img.width, img.height, scale, image_size, mode)
    resized = img.resize((nw, nh), Image.Resampling.BICUBIC)
    fill = tuple(int(round(255 * m)) for m in mean)
    canvas = Image.new("RGB", (image_size, image_size), fill)
    canvas.paste(resized, (x0, y0))
    arr = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (arr - m) / s


def preprocess_depth(depth: np.ndarray, scale: float = 1.0, image_size: int = 448,
                     mode: str = "letterbox") -> torch.Tensor:
    """Metric or relative depth (H, W) -> (1, image_size, image_size) on the same canvas; 0 = no depth.

    Nearest-neighbour resampling so that invalid (0) pixels are never blended into valid ones.
    """
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {d.shape}")
    h, w = d.shape
    nw, nh, x0, y0 = _fit(w, h, scale, image_size, mode)
    ys = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(np.int64)
    xs = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(np.int64)
    out = np.zeros((image_size, image_size), dtype=np.float32)
    out[y0:y0 + nh, x0:x0 + nw] = d[ys[:, None], xs[None, :]]
    out[~np.isfinite(out)] = 0.0
    return torch.from_numpy(out)[None]


class VisionTower(nn.Module):
    """SigLIP vision encoder (transformers `SiglipVisionModel`) returning a spatial feature map.

    Features are the hidden states of `select_layer` (NVILA: -2, no post-layernorm), reshaped to
    (B, G, G, C). Patch tokens only: SigLIP has no CLS token.
    """

    def __init__(self, vision_config: dict[str, Any], select_layer: int = -2):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.model = SiglipVisionModel(SiglipVisionConfig(**vision_config))
        self.select_layer = select_layer

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        b, n, c = feats.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ValueError(f"non-square patch grid: {n} tokens")
        return feats.reshape(b, g, g, c)
