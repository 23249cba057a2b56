"""Depth decoding for every RGB-D source the point-map corpus reads: one place for formats and scales.

Each source stores metric depth differently, and a wrong scale or byte order still gives a plausible
looking (but wrong by 4x or 256x) point cloud, so every format is named, decoded here and nowhere else:

| format        | file                                    | metres =                      | source |
|---------------|-----------------------------------------|-------------------------------|--------|
| `png_u16`     | 16-bit greyscale PNG                    | value / scale                 | EmbodiedScan: ScanNet, ARKitScenes (scale 1000), Matterport3D (scale 4000); generic folders; the sample world |
| `pgm_u16`     | binary (P5) or ASCII (P2) PGM, 16-bit   | value / scale (1000)          | 3RScan `frame-NNNNNN.depth.pgm` (big-endian, as Netpbm says) |
| `npy_m`       | `.npy` of floats (no pickle)            | value / scale (1: metres)     | generic RGB-D folders (`STEM.depth.npy`) |
| `png_sunrgbd` | 16-bit PNG, bits rotated right by 3     | ((v >> 3) \\| (v << 13)) / scale | SUN RGB-D `depth_bfx` (Omni3D's SUNRGBD images), as the SUN RGB-D toolbox's `read3dPoints.m` |

The result is always a C-contiguous float32 (H, W) map in metres where invalid pixels (0, negative,
NaN, Inf) are exactly 0, so every later step tests validity with one `depth > 0`.
Errors are `DepthError` with a snake_case `reason` (`missing_depth`, `bad_depth`, `bad_depth_format`),
which the builder turns into a reject row without ever stopping the run.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEPTH_FORMATS",
    "DepthError",
    "DepthSpec",
    "decode_depth",
    "read_depth",
    "guess_format",
    "embodiedscan_spec",
    "parse_pgm",
]

DEPTH_FORMATS: tuple[str, ...] = ("png_u16", "pgm_u16", "npy_m", "png_sunrgbd")
_DEFAULT_SCALE = {"png_u16": 1000.0, "pgm_u16": 1000.0, "npy_m": 1.0, "png_sunrgbd": 1000.0}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class DepthError(ValueError):
    """A depth file cannot give a metric depth map. `reason` is the reject code, the message says why."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):  # keep reason + message across process boundaries (Ray, Beam)
        return (DepthError, (self.reason, str(self)))


@dataclass(frozen=True)
class DepthSpec:
    """How to read one depth file: `format` (one of DEPTH_FORMATS) and `scale` = stored units per metre."""

    format: str
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.format not in DEPTH_FORMATS:
            raise ValueError(f"unknown depth format {self.format!r}; choose one of {', '.join(DEPTH_FORMATS)}")
        if self.scale is not None and not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"depth scale must be a positive number, got {self.scale!r}")

    @property
    def units_per_metre(self) -> float:
        return float(self.scale) if self.scale is not None else _DEFAULT_SCALE[self.format]


def guess_format(path: str | os.PathLike[str]) -> str:
    """The depth format a file name implies: `.npy` -> npy_m, `.pgm` -> pgm_u16, otherwise png_u16."""
    name = os.fspath(path).lower()
    if name.endswith(".npy"):
        return "npy_m"
    if name.endswith(".pgm"):
        return "pgm_u16"
    return "png_u16"


def embodiedscan_spec(depth_path: str, depth_shift: float) -> DepthSpec:
    """EmbodiedScan: `depth_m = value / depth_shift` (4000 Matterport3D, else 1000); 3RScan frames are PGM."""
    return DepthSpec("pgm_u16" if str(depth_path).lower().endswith(".pgm") else "png_u16", float(depth_shift))


def _to_metres(raw: np.ndarray, scale: float) -> np.ndarray:
    """float32 metres, invalid -> 0. Division (not multiplication by 1/scale) keeps value/scale correctly rounded."""
    z = raw.astype(np.float32)  # always a fresh array
    if scale != 1.0:
        np.divide(z, np.float32(scale), out=z)
    if raw.dtype.kind == "u":
        return z  # unsigned: 0 stays exactly 0, nothing else can be invalid
    bad = ~(z > 0)  # catches 0, negatives and NaN in one comparison
    if raw.dtype.kind == "f":
        bad |= ~np.isfinite(z)
    if bad.any():
        z[bad] = 0.0
    return z


def _decode_png(data: bytes, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(_PNG_MAGIC):
        raise DepthError("bad_depth_format", f"{what}: not a PNG file (wrong magic number)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            if mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise DepthError("bad_depth_format", f"{what}: depth PNG must be 16-bit greyscale, got mode {mode!r}")
            arr = np.asarray(im)
    except DepthError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DepthError("bad_depth", f"{what}: cannot decode the PNG: {exc}") from None
    if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DepthError("bad_depth_format", f"{what}: 32-bit PNG values outside the 16-bit range")
    return arr


def parse_pgm(data: bytes, what: str = "pgm") -> np.ndarray:
    """Decode a PGM (P5 binary or P2 ASCII) into uint16/uint8 (H, W); 16-bit P5 is big-endian (Netpbm).

    Written by hand rather than through PIL: PIL's PGM support for maxval > 255 has changed between
    versions, and a silent byte-order mistake would scale every 3RScan depth by up to 256x.
    """
    magic = data[:2]
    if magic not in (b"P5", b"P2"):
        raise DepthError("bad_depth_format", f"{what}: not a PGM file (magic {magic!r}, expected P5 or P2)")
    fields: list[int] = []
    pos = 2
    n = len(data)
    while len(fields) < 3:
        while pos < n and data[pos : pos + 1].isspace():
            pos += 1
        if pos < n and data[pos : pos + 1] == b"#":
            while pos < n and data[pos : pos + 1] not in (b"\n", b"\r"):
                pos += 1
            continue
        start = pos
        while pos < n and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise DepthError("bad_depth", f"{what}: truncated or malformed PGM header")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise DepthError("bad_depth", f"{what}: bad PGM header {width}x{height} maxval {maxval}")
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
    if magic == b"P5":
        pos += 1  # exactly one whitespace byte after maxval
        need = width * height * dtype.itemsize
        if n - pos < need:
            raise DepthError("bad_depth", f"{what}: PGM data truncated ({n - pos} of {need} bytes)")
        arr = np.frombuffer(data, dtype=dtype, count=width * height, offset=pos).reshape(height, width)
    else:
        try:
            vals = np.array(data[pos:].split(), dtype=np.int64)
        except ValueError:
            raise DepthError("bad_depth", f"{what}: non-numeric value in ASCII PGM data") from None
        if vals.size < width * height:
            raise DepthError("bad_depth", f"{what}: PGM data truncated ({vals.size} of {width * height} values)")
        arr = vals[: width * height].reshape(height, width)
    return arr.astype(np.uint16 if maxval > 255 else np.uint8)


def _decode_npy(data: bytes, what: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DepthError("bad_depth", f"{what}: cannot load the .npy: {exc}") from None
    if arr.dtype.kind != "f":
        raise DepthError("bad_depth_format", f"{what}: depth .npy must hold float metres, got dtype {arr.dtype}")
    return arr


def decode_depth(data: bytes, spec: DepthSpec, what: str = "depth") -> np.ndarray:
    """Decode the bytes of a depth file into float32 (H, W) metres, invalid = 0 (raises `DepthError`)."""
    fmt = spec.format
    if fmt == "png_u16":
        raw = _decode_png(data, what)
    elif fmt == "png_sunrgbd":
        raw = _decode_png(data, what).astype(np.uint16)
        raw = (raw >> 3) | (raw << 13)  # uint16 arithmetic: the toolbox's bitor(bitshift(d,-3), bitshift(d,13))
    elif fmt == "pgm_u16":
        raw = parse_pgm(data, what)
    else:  # npy_m
        raw = _decode_npy(data, what)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2 or raw.shape[0] < 1 or raw.shape[1] < 1:
        raise DepthError("bad_depth", f"{what}: depth must be a 2-D map, got shape {raw.shape}")
    return _to_metres(raw, spec.units_per_metre)


def read_depth(path: str | os.PathLike[str], spec: DepthSpec | None = None) -> np.ndarray:
    """Read and decode a depth file (format from `spec`, else from its name via `guess_format`)."""
    p = Path(path)
    spec = spec or DepthSpec(guess_format(p))
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DepthError("missing_depth", f"no depth file at {p}") from None
    except OSError as exc:
        raise DepthError("bad_depth", f"{p}: cannot read: {exc.strerror or exc}") from None
    return decode_depth(data, spec, what=p.name)
