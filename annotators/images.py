"""Image helpers shared by the annotators: RGB normalisation, pixel hashing, box marks, data URLs.

Why a module: the Florence-2 tagger, both VLM backends and the cache key must agree on what
"the image" is. Everything is normalised to an RGB PIL image first, so a uint8 array, a PIL image
in another mode and a decoded JPEG of the same pixels all hash and render the same.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["as_rgb", "image_sha256", "draw_marks", "to_data_url"]

_COLOURS = [(255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 160, 0), (200, 0, 200), (0, 200, 200)]


def as_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode) or an HxW / HxWx{1,3,4} uint8 array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        img = Image.fromarray(np.ascontiguousarray(arr))
        return img if img.mode == "RGB" else img.convert("RGB")
    raise TypeError(f"unsupported image array shape {arr.shape}")


def image_sha256(image: Any) -> str:
    """sha256 of the RGB pixels and size: the image part of a cache key.

    Pixels, not file bytes: the same picture hashes the same from any source, and marks drawn
    on it (which change what the model sees) change the hash.
    """
    img = as_rgb(image)
    h = hashlib.sha256(f"RGB|{img.size[0]}x{img.size[1]}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def draw_marks(
    image: Image.Image,
    boxes_px: Sequence[Sequence[float]],
    names: Sequence[str],
) -> Image.Image:
    """A copy of `image` with each box outlined and labelled with its name (set-of-mark).

    Line width and font scale with the image so marks stay visible after the serving stack
    downsizes a large photo. Deterministic (no randomness, fixed palette by index).
    """
    if len(boxes_px) != len(names):
        raise ValueError("one name per box")
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(min(w, h) / 200))
    font = ImageFont.load_default(size=max(10, round(min(w, h) / 30)))
    for i, (box, name) in enumerate(zip(boxes_px, names)):
        colour = _COLOURS[i % len(_COLOURS)]
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        tb = draw.textbbox((x1, y1), name, font=font)
        draw.rectangle(tb, fill=colour)
        draw.text((x1, y1), name, fill=(255, 255, 255), font=font)
    return out


def to_data_url(image: Image.Image, fmt: str = "png", jpeg_quality: int = 95) -> str:
    """`data:image/...;base64,...` for OpenAI-style `image_url` content parts.

    PNG by default: lossless, so the server sees exactly the hashed pixels (and thin marks are
    not smeared). JPEG is smaller on large photos; choose it when bandwidth matters.
    """
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        image.save(buf, format="PNG", optimize=False)
        mime = "image/png"
    elif fmt in ("jpg", "jpeg"):
        image.save(buf, format="JPEG", quality=jpeg_quality)
        mime = "image/jpeg"
    else:
        raise ValueError(f"unsupported image format {fmt!r}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
