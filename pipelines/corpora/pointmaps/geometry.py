"""Geometry kernels of the point-map corpus: back-projection of depth pixels and the colour-view mask."""

from __future__ import annotations

import math

import numpy as np

from pipelines.corpora.pointmaps.sampling import SamplerConfig, SamplingError, rng_for, sample_pixels

_EPS_PX = 1e-6


def _k(K: object) -> np.ndarray:
    from schemas.camera import validate_intrinsics

    return validate_intrinsics(K)


def colour_affine(K_colour: object, K_depth: object) -> np.ndarray:
    """(2, 3) A with colour pixel = A @ (u_d, v_d, 1) for a shared pose: A = (K_colour K_depth^-1)[:2].

    Written out rather than through a matrix inverse so that equal intrinsics give exactly the identity
    (a 0.9999999 would push the last column out of the image).
    """
    Kc, Kd = _k(K_colour), _k(K_depth)
    if np.array_equal(Kc, Kd):
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fxd, sd, cxd, fyd, cyd = Kd[0, 0], Kd[0, 1], Kd[0, 2], Kd[1, 1], Kd[1, 2]
    fxc, sc, cxc, fyc, cyc = Kc[0, 0], Kc[0, 1], Kc[0, 2], Kc[1, 1], Kc[1, 2]
    # x = (u - cxd - sd*y) / fxd, y = (v - cyd) / fyd; u_c = fxc*x + sc*y + cxc, v_c = fyc*y + cyc
    a00 = fxc / fxd
    a01 = (sc - fxc * sd / fxd) / fyd
    a02 = cxc - a00 * cxd - a01 * cyd
    a11 = fyc / fyd
    a12 = cyc - a11 * cyd
    return np.array([[a00, a01, a02], [0.0, a11, a12]])


def colour_view_mask(depth_shape: tuple[int, int], K_colour: object, K_depth: object,
                     width: int, height: int) -> np.ndarray | None:
    """Depth pixels whose colour pixel lies in [0, W-1] x [0, H-1]; None when that is every pixel.

    Separable (one test per row and one per column) unless the two skews differ.
    """
    Hd, Wd = depth_shape
    A = colour_affine(K_colour, K_depth)
    lo_u, hi_u, lo_v, hi_v = -_EPS_PX, width - 1 + _EPS_PX, -_EPS_PX, height - 1 + _EPS_PX
    vc = A[1, 1] * np.arange(Hd) + A[1, 2]
    rows = (vc >= lo_v) & (vc <= hi_v)
    if A[0, 1] == 0.0:
        uc = A[0, 0] * np.arange(Wd) + A[0, 2]
        cols = (uc >= lo_u) & (uc <= hi_u)
        if rows.all() and cols.all():
            return None
        return rows[:, None] & cols[None, :]
    v, u = np.mgrid[0:Hd, 0:Wd]
    uc = A[0, 0] * u + A[0, 1] * v + A[0, 2]
    return rows[:, None] & (uc >= lo_u) & (uc <= hi_u)


def backproject(depth: np.ndarray, K: object, *, scale: float | None = None, return_index: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Every valid pixel of a depth map as camera points: float32 (N, 3), row-major pixel order.

    The full-frame kernel (the `.ply` export and the benchmark against Open3D): per-column and per-row
    ray factors are computed once (W + H divisions), then X = z * xf[u], Y = z * yf[v] over the masked
    pixels, with no index arithmetic. `depth` is float metres, or raw unsigned integers with `scale`
    units per metre (e.g. a uint16 PNG in mm, 1000): then only the valid pixels are converted, each
    exactly as `depth_io` would. `return_index` also gives the flat pixel indices (for colours).
    """
    Km = _k(K)
    raw = np.asarray(depth)
    if raw.ndim != 2:
        raise ValueError(f"depth must be 2-D, got shape {raw.shape}")
    H, W = raw.shape
    fx, s, cx, fy, cy = Km[0, 0], Km[0, 1], Km[0, 2], Km[1, 1], Km[1, 2]
    yf = ((np.arange(H) - cy) / fy).astype(np.float32)
    xf = ((np.arange(W) - cx) / fx).astype(np.float32)
    if raw.dtype.kind == "u":
        if scale is None:
            raise ValueError("integer depth needs scale (stored units per metre)")
        z = raw
        m = raw > 0
        zz = raw[m].astype(np.float32)
        np.divide(zz, np.float32(scale), out=zz)
    else:
        z = raw.astype(np.float32, copy=False)
        m = z > 0
        zz = z[m]
    X = np.broadcast_to(xf, z.shape)[m] * zz
    Yr = np.broadcast_to(yf[:, None], z.shape)[m]
    if s != 0.0:
        X -= np.float32(s / fx) * Yr * zz
    pts = np.stack([X, Yr * zz, zz], axis=1)
    if return_index:
        return pts, np.flatnonzero(m)
    return pts


def backproject_indices(depth: np.ndarray, K: object, idx: np.ndarray) -> np.ndarray:
    """Camera points (n, 3) float64 of the depth pixels at flat indices `idx` (u = idx % W, v = idx // W)."""
    Km = _k(K)
    z = np.asarray(depth)
    W = z.shape[1]
    idx = np.asarray(idx, dtype=np.int64)
    v = idx // W
    u = idx - v * W
    d = z.reshape(-1)[idx].astype(np.float64)
    y = (v - Km[1, 2]) / Km[1, 1]
    x = (u - Km[0, 2] - Km[0, 1] * y) / Km[0, 0]
    return np.stack([x * d, y * d, d], axis=1)


def sample_frame(depth: np.ndarray, K_depth: object, K_colour: object, width: int, height: int, key: str,
                 cfg: SamplerConfig) -> tuple[np.ndarray, dict[str, int]]:
    """The N targets of one frame: float32 (N, 5) rows (u, v, X, Y, Z) and counts for the stats.

    Candidates are the valid depth pixels (depth > 0, <= max_depth) whose colour pixel is inside the
    colour image (and, in edge-avoiding modes, away from depth discontinuities). Raises
    `SamplingError` with reason `too_few_valid_pixels`, `too_few_pixels_in_colour_view` or
    `too_few_edge_free_pixels`.
    """
    z = np.asarray(depth, dtype=np.float32)
    if cfg.max_depth is not None:
        z = np.where(z <= cfg.max_depth, z, np.float32(0.0))
    valid = z > 0
    n_valid = int(np.count_nonzero(valid))
    need = max(cfg.n, math.ceil(cfg.min_valid_fraction * z.size))
    if n_valid < need:
        raise SamplingError("too_few_valid_pixels",
                            f"{n_valid} of {z.size} depth pixels are valid; need {need} "
                            f"({cfg.n} points, min_valid_fraction {cfg.min_valid_fraction})")
    view = colour_view_mask(z.shape, K_colour, K_depth, width, height)
    cand = valid if view is None else valid & view
    n_view = n_valid if view is None else int(np.count_nonzero(cand))
    if n_view < cfg.n:
        raise SamplingError("too_few_pixels_in_colour_view",
                            f"{n_view} valid depth pixels project into the {width}x{height} colour image; need {cfg.n}")
    sel = sample_pixels(z, np.flatnonzero(cand), cfg, rng_for(key, cfg.seed))
    xyz = backproject_indices(z, K_depth, sel)
    # colour pixel = A (u_d, v_d, 1): the projection of xyz with the colour K, and exactly the depth pixel
    # when both cameras are one; the clip only removes the +-1e-6 px tolerance of the view test
    A = colour_affine(K_colour, K_depth)
    v_d, u_d = np.divmod(sel, z.shape[1])
    out = np.empty((sel.size, 5), dtype=np.float32)
    out[:, 0] = np.clip(A[0, 0] * u_d + A[0, 1] * v_d + A[0, 2], 0.0, width - 1)
    out[:, 1] = np.clip(A[1, 1] * v_d + A[1, 2], 0.0, height - 1)
    out[:, 2:5] = xyz
    return out, {"n_valid": n_valid, "n_in_view": n_view}
