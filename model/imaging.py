"""The image policy of a model: one place that turns (image, camera scale, depth) into encoder inputs.

The policy is part of the model's config (`GR3DConfig.image_mode`, `canvas_focal`, `min_tiles`,
`max_tiles`), so training (`model.data`) and every evaluation (`model.generate.prepare_images`) prepare images
the same way, and a checkpoint carries it. `scale` is the record's s = 1000/fx, or None when the camera is
unknown (the cot corpus). Modes (docs/model.md, decision 3):

- `letterbox` / `stretch`: one canvas, the image resized by s then fitted into the square (`model.vision`);
  s only fixes the aspect ratio.
- `focal` (CPU presets: camera normalization that changes what the encoder sees, at a fixed cost): the image
  is resized by F/fx = canvas_focal * s / 1000, so every camera becomes a pinhole of focal length F encoder
  pixels, and centred on the S x S canvas: padded with the mean colour where smaller, cropped where larger.
  Objects of equal metric size at equal depth then have equal size on the canvas. The placement is an exact
  affine map (float offset, PIL `resize(box=...)` resamples exactly the visible source rectangle), so the
  content window, which may extend past the canvas when cropped, is exact. Unknown camera: letterbox fit.
- `tiles` (gr3d-8b): NVILA dynamic tiling of the s-scaled image (`model.tiling`), several encoder inputs.

Every mode returns, per encoder input, the content window: where the original image [0, 1]^2 lies in that
input's normalized frame, so PE and region pooling work in original-image coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.tiling import Grid, tile_grid, tile_windows, tiles_per_image

__all__ = ["IMAGE_MODES", "ImagePolicy", "PreparedImage", "focal_window", "focal_to_fit"]

IMAGE_MODES = ("letterbox", "stretch", "focal", "tiles")
Window = tuple[float, float, float, float]


def focal_to_fit(image_size: int, hfov_deg: float) -> float:
    """The canvas focal F (encoder pixels) at which a view of horizontal field of view `hfov_deg` spans the canvas."""
    return image_size / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))


def focal_window(width: int, height: int, image_size: int, scale: float, canvas_focal: float) -> Window:
    """Normalized content window of the `focal` mode: the image scaled by F*s/1000, centred (may exceed [0, 1])."""
    if width <= 0 or height <= 0 or not scale > 0 or not canvas_focal > 0:
        raise ValueError(f"bad image size {width}x{height}, scale {scale} or canvas focal {canvas_focal}")
    f = canvas_focal * scale / 1000.0
    ox, oy = (image_size - f * width) / 2.0, (image_size - f * height) / 2.0
    s = float(image_size)
    return (ox / s, oy / s, (ox + f * width) / s, (oy + f * height) / s)


def _visible(o: float, extent: float, size: int) -> tuple[int, int]:
    """Whole canvas pixels [a, b) covered by content spanning [o, o + extent)."""
    return max(0, math.ceil(o - 1e-6)), min(size, math.floor(o + extent + 1e-6))


def _nearest_depth(d: np.ndarray, sx: float, sy: float, ox: float, oy: float, out_w: int, out_h: int) -> np.ndarray:
    """Depth on an (out_h, out_w) canvas where canvas x = ox + sx * source x; nearest neighbour, 0 outside."""
    h, w = d.shape
    xs = (np.arange(out_w) + 0.5 - ox) / sx
    ys = (np.arange(out_h) + 0.5 - oy) / sy
    okx, oky = (xs >= 0) & (xs < w), (ys >= 0) & (ys < h)
    xi = np.clip(np.floor(xs), 0, w - 1).astype(np.int64)
    yi = np.clip(np.floor(ys), 0, h - 1).astype(np.int64)
    out = d[yi[:, None], xi[None, :]] * (oky[:, None] & okx[None, :])
    out[~np.isfinite(out)] = 0.0
    return out.astype(np.float32)


@dataclass
class PreparedImage:
    """One image's encoder inputs: T canvases (T = 1 except in `tiles` mode)."""

    pixels: torch.Tensor
    """(T, 3, S, S) normalized."""
    windows: list[Window]
    """Content window of each canvas."""
    grid: Grid
    """(rows, cols) tile grid; (1, 1) for the one-canvas modes."""
    depth: torch.Tensor | None = None
    """(T, 1, S, S) depth canvases (0 = unknown) or None."""


@dataclass(frozen=True)
class ImagePolicy:
    """How images become encoder inputs (see the module docstring); build it with `from_config`."""

    mode: str = "letterbox"
    image_size: int = 448
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    canvas_focal: float = 0.0
    min_tiles: int = 1
    max_tiles: int = 12
    tokens_per_tile: int = 121

    def __post_init__(self) -> None:
        if self.mode not in IMAGE_MODES:
            raise ValueError(f"unknown image mode {self.mode!r} ({' | '.join(IMAGE_MODES)})")
        if self.mode == "focal" and not self.canvas_focal > 0:
            raise ValueError("image mode focal needs canvas_focal > 0 (encoder pixels)")

    @classmethod
    def from_config(cls, cfg: Any, mode: str | None = None) -> ImagePolicy:
        """The policy a `GR3DConfig` records (`mode` overrides its image mode)."""
        return cls(mode or cfg.image_mode, cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std),
                   float(cfg.canvas_focal), int(cfg.min_tiles), int(cfg.max_tiles), cfg.num_image_tokens)

    # ------------------------------------------------------------------ geometry
    def grid(self, width: int, height: int, scale: float | None) -> Grid:
        if self.mode != "tiles":
            return (1, 1)
        s = 1.0 if scale is None else scale
        return tile_grid(width * s, height * s, self.image_size, self.min_tiles, self.max_tiles)

    def token_counts(self, width: int, height: int, scale: float | None) -> list[int]:
        """Visual tokens of each encoder input of an image, in order (what `encode_conversation` expands)."""
        return [self.tokens_per_tile] * tiles_per_image(self.grid(width, height, scale))

    def _focal(self, scale: float | None) -> bool:
        return self.mode == "focal" and scale is not None

    def windows(self, width: int, height: int, scale: float | None) -> list[Window]:
        if self.mode == "tiles":
            return tile_windows(self.grid(width, height, scale))
        if self._focal(scale):
            return [focal_window(width, height, self.image_size, scale, self.canvas_focal)]  # type: ignore[arg-type]
        from model import vision

        mode = "letterbox" if self.mode == "focal" else self.mode
        return [vision.letterbox_window(width, height, self.image_size, 1.0 if scale is None else scale, mode)]

    # ------------------------------------------------------------------ pixels
    def _normalize(self, canvas: Any) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
        m = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        s = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (arr - m) / s

    def _focal_pixels(self, img: Any, scale: float) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        f = self.canvas_focal * scale / 1000.0
        ox, oy = (size - f * img.width) / 2.0, (size - f * img.height) / 2.0
        canvas = Image.new("RGB", (size, size), tuple(int(round(255 * m)) for m in self.mean))
        (x0, x1), (y0, y1) = _visible(ox, f * img.width, size), _visible(oy, f * img.height, size)
        if x1 > x0 and y1 > y0:
            box = ((x0 - ox) / f, (y0 - oy) / f, (x1 - ox) / f, (y1 - oy) / f)
            canvas.paste(img.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=box), (x0, y0))
        return self._normalize(canvas)

    def _tile_pixels(self, img: Any, grid: Grid) -> torch.Tensor:
        from PIL import Image

        rows, cols = grid
        size = self.image_size
        big = img.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
        tiles = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                 for r in range(rows) for c in range(cols)]
        if rows * cols > 1:
            tiles.append(img.resize((size, size), Image.Resampling.BICUBIC))
        return torch.stack([self._normalize(t) for t in tiles])

    def pixels(self, image: Any, scale: float | None) -> tuple[torch.Tensor, Grid]:
        """(T, 3, S, S) encoder inputs of a PIL image and its tile grid."""
        img = image.convert("RGB")
        if self.mode == "tiles":
            grid = self.grid(img.width, img.height, scale)
            return self._tile_pixels(img, grid), grid
        if self._focal(scale):
            return self._focal_pixels(img, scale)[None], (1, 1)  # type: ignore[arg-type]
        from model import vision  # looked up at call time (tests spy on it)

        mode = "letterbox" if self.mode == "focal" else self.mode
        return vision.preprocess_image(img, 1.0 if scale is None else scale, self.image_size, mode, self.mean,
                                       self.std)[None], (1, 1)

    def depth(self, depth: np.ndarray, scale: float | None, width: int | None = None,
              height: int | None = None) -> torch.Tensor:
        """(T, 1, S, S) depth canvases aligned with `pixels` (nearest neighbour: no blending with invalid 0).

        width, height: the image's size when the depth map has another resolution (default: the same)."""
        d = np.asarray(depth, dtype=np.float32)
        if d.ndim != 2:
            raise ValueError(f"depth must be (H, W), got {d.shape}")
        h, w = d.shape
        width, height = width or w, height or h
        size = self.image_size
        if self.mode == "tiles":
            rows, cols = self.grid(width, height, scale)
            big = _nearest_depth(d, cols * size / w, rows * size / h, 0.0, 0.0, cols * size, rows * size)
            out = [big[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
            if rows * cols > 1:
                out.append(_nearest_depth(d, size / w, size / h, 0.0, 0.0, size, size))
            return torch.from_numpy(np.stack(out))[:, None]
        if self._focal(scale):
            f = self.canvas_focal * scale / 1000.0  # type: ignore[operator]
            ox, oy = (size - f * width) / 2.0, (size - f * height) / 2.0
            dep = _nearest_depth(d, f * width / w, f * height / h, ox, oy, size, size)
            return torch.from_numpy(dep)[None, None]
        from model import vision

        mode = "letterbox" if self.mode == "focal" else self.mode
        return vision.preprocess_depth(d, 1.0 if scale is None else scale, size, mode)[None]

    def prepare(self, image: Any, scale: float | None, depth: np.ndarray | None = None) -> PreparedImage:
        """Pixels, windows, grid and depth canvases of one image."""
        pix, grid = self.pixels(image, scale)
        wins = self.windows(image.width, image.height, scale)
        dep = self.depth(depth, scale, image.width, image.height) if depth is not None else None
        return PreparedImage(pix, wins, grid, dep)


def flatten_grids(grids: Sequence[Grid] | None, n_images: int) -> list[Grid]:
    """Per-image grids, (1, 1) for each when None."""
    return [tuple(g) for g in grids] if grids is not None else [(1, 1)] * n_images  # type: ignore[misc]
