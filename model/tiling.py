"""NVILA dynamic tiling (the `tiles` image mode) and SR-3D-style stitched region pooling.

Tile grid (NVILA's `dynamic_preprocess` / `find_closest_aspect_ratio`, VILA `llava/mm_utils.py`; docs/model.md
"Images" says what we matched): the candidate grids are every (cols, rows) with min_tiles <= cols*rows <=
max_tiles, ordered by tile count; the grid whose cols/rows is closest to the image's aspect ratio wins, and on
an exact tie a later (larger) grid wins only when the image area exceeds half of the grid's pixel area. The
image is resized (stretched) to (cols*S, rows*S) and cut into S x S tiles in row-major order; when there is
more than one tile, a thumbnail (the whole image resized to S x S) follows. Here the "image" is the
intrinsics-normalized one, (s*W, s*H) with s = 1000/fx, so the grid follows the camera-normalized size.

Geometry: tile (r, c) of a (rows, cols) grid sees original-image x in [c/cols, (c+1)/cols], so its content
window (where the original image [0, 1]^2 lies in the tile's own normalized frame) is (-c, -r, cols-c,
rows-r); the thumbnail's is (0, 0, 1, 1). With these windows the spatial PE gives every token its
original-image (u, v) unchanged (`model.spatial_pe`). Region pooling stitches the tiles' feature maps back
into one (rows*G, cols*G) map covering exactly the original image, so a box spanning tiles pools as one
RoIAlign on one map (SR-3D's tile-then-stitch); the thumbnail is not pooled from when there are tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["target_ratios", "find_closest_aspect_ratio", "tile_grid", "tiles_per_image", "tile_windows",
           "stitch_tiles", "split_tiles", "canvas_offsets", "pool_regions", "Grid"]

Grid = tuple[int, int]
"""(rows, cols) of an image's tile grid; (1, 1) = one tile, no thumbnail."""


def target_ratios(min_tiles: int = 1, max_tiles: int = 12) -> list[tuple[int, int]]:
    """NVILA's candidate (cols, rows) grids, in its order (by tile count; the set's order within a count)."""
    ratios = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_tiles <= i * j <= max_tiles}
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio: float, ratios: Sequence[tuple[int, int]], width: float, height: float,
                              image_size: int) -> tuple[int, int]:
    """NVILA's rule: closest cols/rows to the aspect ratio; exact ties go to a larger grid if the image is big."""
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_grid(width: float, height: float, image_size: int, min_tiles: int = 1, max_tiles: int = 12) -> Grid:
    """(rows, cols) NVILA picks for an image of (width, height) pixels (here: the s-scaled size)."""
    if not (width > 0 and height > 0):
        raise ValueError(f"bad image size {width}x{height}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    cols, rows = find_closest_aspect_ratio(width / height, target_ratios(min_tiles, max_tiles), width, height,
                                           image_size)
    return rows, cols


def tiles_per_image(grid: Grid) -> int:
    """Encoder inputs of one image: rows*cols tiles, plus the thumbnail when there is more than one tile."""
    n = grid[0] * grid[1]
    return n + 1 if n > 1 else n


def tile_windows(grid: Grid) -> list[tuple[float, float, float, float]]:
    """Content window of each encoder input of one image (tiles row-major, then the thumbnail)."""
    rows, cols = grid
    out = [(float(-c), float(-r), float(cols - c), float(rows - r)) for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        out.append((0.0, 0.0, 1.0, 1.0))
    return out


def stitch_tiles(tiles: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Feature maps of one image's tiles (rows*cols[+1], G, G, C), row-major -> one (rows*G, cols*G, C) map."""
    rows, cols = grid
    g, c = tiles.shape[1], tiles.shape[-1]
    t = tiles[: rows * cols].reshape(rows, cols, g, g, c)
    return t.permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, c)


def split_tiles(fmap: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of `stitch_tiles` (no thumbnail): (rows*G, cols*G, C) -> (rows*cols, G, G, C)."""
    rows, cols = grid
    g = fmap.shape[0] // rows
    return fmap.reshape(rows, g, cols, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * cols, g, g, -1)


def canvas_offsets(grids: Sequence[Grid]) -> list[int]:
    """Index of each image's first encoder input in the flat canvas batch."""
    out, n = [], 0
    for g in grids:
        out.append(n)
        n += tiles_per_image(g)
    return out


def pool_regions(fmaps: torch.Tensor, windows: torch.Tensor, grids: Sequence[Grid], boxes: torch.Tensor,
                 image_index: torch.Tensor) -> torch.Tensor:
    """(n, C) RoIAlign means (`model.region.roi_align_mean`) of boxes in original-image coordinates.

    Each image pools from one map: its canvas, through its content window (one-tile grid), or its tiles
    stitched into one map that covers exactly the original image. Images whose maps have the same shape are
    pooled in one call.
    """
    from model.region import roi_align_mean

    if boxes.shape[0] == 0:
        return fmaps.new_zeros(0, fmaps.shape[-1], dtype=torch.float32)
    offsets = canvas_offsets(grids)
    idx = image_index.tolist()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for b in sorted(set(idx)):
        by_shape.setdefault(tuple(grids[b]), []).append(b)  # type: ignore[arg-type]
    parts, order = [], []
    for grid, imgs in by_shape.items():
        local = {b: i for i, b in enumerate(imgs)}
        sel = [k for k, b in enumerate(idx) if b in local]
        bx = boxes[sel].clamp(0, 1)
        if grid == (1, 1):
            maps = fmaps[[offsets[b] for b in imgs]]
            w = windows[[offsets[idx[k]] for k in sel]].to(bx)
            bx = torch.cat([w[:, :2], w[:, :2]], 1) + bx * torch.cat([w[:, 2:] - w[:, :2]] * 2, 1)
        else:
            maps = torch.stack([stitch_tiles(fmaps[offsets[b]:offsets[b] + tiles_per_image(grid)], grid)
                                for b in imgs])
        li = torch.tensor([local[idx[k]] for k in sel], dtype=torch.long, device=boxes.device)
        parts.append(roi_align_mean(maps, bx, li))
        order += sel
    out = torch.cat(parts)
    inv = torch.empty(len(order), dtype=torch.long, device=out.device)
    inv[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
    return out[inv]
