"""Which depth pixels become point targets: uniform, depth-stratified and edge-avoiding samplers.

Every sampler works on flat indices into the depth map (no per-pixel Python) and draws from a
`numpy.random.Generator` seeded by a stable hash of the sample key (`stable_seed`), never by worker
id, time or Python's salted `hash()`: the same key gives the same points on any executor, worker
count or rerun, which is what makes shards byte-identical.

Modes (`SamplerConfig.mode`, recorded in each record's `points.mode`):
- `uniform`: N distinct pixels uniformly among the candidates.
- `depth_stratified`: candidates binned in equal-width depth ranges between their min and max depth;
  each non-empty bin gets an equal share of N (a bin with fewer pixels gives all of them and the rest
  is shared among the others). Far surfaces cover few pixels in a perspective image, so uniform
  sampling rarely asks about them; this evens the depth distribution of the targets.
- `edge_avoiding`: uniform, but pixels at depth discontinuities (and `edge_radius` pixels around them)
  are excluded. A pixel is an edge when the second difference of inverse depth along x or y exceeds
  `edge_threshold` times its own inverse depth, or a 4-neighbour has no depth. Inverse depth is affine
  in (u, v) on any plane, so slanted floors and walls are never flagged at any viewing angle, while an
  occlusion boundary (a jump of > ~edge_threshold in relative depth) always is. Real sensors put
  "flying pixels" with mixed depths there: bad targets.
- `depth_stratified_edge_avoiding`: both.
Invalid depth (0, NaN; already 0 after `pipelines.corpora.pointmaps.depth_io`) is never a candidate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipelines.corpora.options import option

__all__ = [
    "MODES",
    "SamplerConfig",
    "SamplingError",
    "stable_seed",
    "rng_for",
    "edge_mask",
    "edge_at",
    "sample_indices",
    "sample_pixels",
    "stratified_quota",
]

MODES: tuple[str, ...] = ("uniform", "depth_stratified", "edge_avoiding", "depth_stratified_edge_avoiding")


class SamplingError(ValueError):
    """A frame cannot give N targets; `reason` is the reject code (e.g. `too_few_valid_pixels`)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):
        return (SamplingError, (self.reason, str(self)))


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings; part of the builder config (so of the manifest and the resume digest).

    `n`: points per sample. `min_valid_fraction`: a frame whose valid depth covers less than this
    fraction of the depth map is rejected (`too_few_valid_pixels`): mostly-empty frames are broken
    captures. `max_depth`: depths beyond it (metres) count as invalid (None: no limit). `depth_bins`:
    strata of `depth_stratified`. `edge_threshold`, `edge_radius`: see the module docstring. `seed`:
    mixed into every key's seed, to draw another point set from the same data.
    """

    n: int = option(100, group="pm", flag="--points", metavar="POINTS", type=int, help="points sampled per image (default 100)")
    mode: str = option("uniform", group="pm", choices=MODES, help="sampling mode (default uniform)")
    min_valid_fraction: float = option(
        0.05, group="pm", type=float,
        help="reject frames whose valid depth covers less than this fraction (default 0.05)")
    max_depth: float | None = option(None, group="pm", type=float, help="treat depth beyond this (m) as invalid")
    depth_bins: int = option(8, group="pm", type=int, help="strata of depth_stratified modes (default 8)")
    edge_threshold: float = option(0.03, group="pm", type=float,
                                   help="relative inverse-depth curvature that marks a depth edge (default 0.03)")
    edge_radius: int = option(1, group="pm", type=int, help="pixels excluded around depth edges (default 1)")
    seed: int = option(0, group="pm", type=int, help="mixed into every key's sampling seed (default 0)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown sampling mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.n < 1:
            raise ValueError(f"points per sample must be >= 1, got {self.n}")
        if not 0.0 <= self.min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in [0, 1], got {self.min_valid_fraction}")
        if self.max_depth is not None and not self.max_depth > 0:
            raise ValueError(f"max_depth must be > 0, got {self.max_depth}")
        if self.depth_bins < 1 or self.edge_radius < 0 or not self.edge_threshold > 0:
            raise ValueError("need depth_bins >= 1, edge_radius >= 0 and edge_threshold > 0")

    @property
    def stratified(self) -> bool:
        return self.mode.startswith("depth_stratified")

    @property
    def avoid_edges(self) -> bool:
        return self.mode.endswith("edge_avoiding")


def stable_seed(key: str, salt: int | str = 0) -> int:
    """A 64-bit seed from sha256(salt|key): identical on every machine, process and Python run."""
    return int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:8], "big")


def rng_for(key: str, salt: int | str = 0) -> np.random.Generator:
    return np.random.default_rng(stable_seed(key, salt))


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square, separably with shifted ORs (no scipy needed)."""
    if r <= 0:
        return mask
    out = mask.copy()
    for s in range(1, r + 1):
        out[:, s:] |= mask[:, :-s]
        out[:, :-s] |= mask[:, s:]
    rows = out.copy()
    for s in range(1, r + 1):
        out[s:, :] |= rows[:-s, :]
        out[:-s, :] |= rows[s:, :]
    return out


def edge_mask(depth: np.ndarray, threshold: float = 0.03, radius: int = 1) -> np.ndarray:
    """Pixels at or near a depth discontinuity (bool, depth's shape). See the module docstring.

    Pixels on the image border are tested along the axes where they have both neighbours.
    """
    z = np.asarray(depth, dtype=np.float32)
    valid = z > 0
    w = np.zeros_like(z)
    np.divide(1.0, z, out=w, where=valid)
    edge = np.zeros(z.shape, dtype=bool)
    # a valid pixel next to an invalid one: the border of the measured region
    hole = ~valid
    edge[:, 1:] |= hole[:, :-1]
    edge[:, :-1] |= hole[:, 1:]
    edge[1:, :] |= hole[:-1, :]
    edge[:-1, :] |= hole[1:, :]
    tol = np.float32(threshold) * w
    if z.shape[1] >= 3:
        d2 = np.abs(w[:, :-2] - 2.0 * w[:, 1:-1] + w[:, 2:])
        edge[:, 1:-1] |= d2 > tol[:, 1:-1]
    if z.shape[0] >= 3:
        d2 = np.abs(w[:-2, :] - 2.0 * w[1:-1, :] + w[2:, :])
        edge[1:-1, :] |= d2 > tol[1:-1, :]
    edge &= valid
    return _dilate(edge, radius) & valid


def edge_at(depth: np.ndarray, idx: np.ndarray, threshold: float = 0.03, radius: int = 1) -> np.ndarray:
    """`edge_mask(depth, threshold, radius).reshape(-1)[idx]`, computed only around the pixels `idx`.

    Gathers a (2r+3)^2 window per pixel and applies the same float32 tests in the same order, so the
    answer is bit-identical to the full mask; the edge-avoiding uniform sampler uses it to test a few
    hundred drawn pixels instead of building the mask of the whole frame.
    """
    z = np.asarray(depth, dtype=np.float32)
    H, W = z.shape
    idx = np.asarray(idx, dtype=np.int64)
    r = int(radius)
    p = r + 1
    zp = np.full((H + 2 * p, W + 2 * p), -1.0, dtype=np.float32)  # -1: outside the image
    zp[p:-p, p:-p] = z
    k = 2 * p + 1
    rows, cols = np.divmod(idx, W)
    off = np.arange(k)
    win = zp[rows[:, None, None] + off[None, :, None], cols[:, None, None] + off[None, None, :]]  # (M, k, k)
    inside = win != -1.0
    valid = win > 0
    w = np.zeros_like(win)
    np.divide(1.0, win, out=w, where=valid)
    c = np.s_[:, 1:-1, 1:-1]  # the (2r+1)^2 pixels whose edge flag matters, with all 4 neighbours in the window
    hole = inside & ~valid
    edge = hole[:, 1:-1, :-2] | hole[:, 1:-1, 2:] | hole[:, :-2, 1:-1] | hole[:, 2:, 1:-1]
    tol = np.float32(threshold) * w[c]
    d2x = np.abs(w[:, 1:-1, :-2] - 2.0 * w[c] + w[:, 1:-1, 2:])
    edge |= (d2x > tol) & inside[:, 1:-1, :-2] & inside[:, 1:-1, 2:]
    d2y = np.abs(w[:, :-2, 1:-1] - 2.0 * w[c] + w[:, 2:, 1:-1])
    edge |= (d2y > tol) & inside[:, :-2, 1:-1] & inside[:, 2:, 1:-1]
    edge &= valid[c]
    return edge.reshape(edge.shape[0], -1).any(axis=1) & valid[:, p, p]


def stratified_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """Split `n` draws over bins holding `counts` items: equal shares, water-filled (sum == n if possible).

    Bins are visited from the smallest; each takes min(count, ceil(remaining / bins left)). Since shares
    never grow along that order, every bin at least as large as its share takes exactly its share.
    """
    counts = np.asarray(counts, dtype=np.int64)
    quota = np.zeros_like(counts)
    remaining = int(min(n, counts.sum()))
    order = [int(b) for b in np.argsort(counts, kind="stable") if counts[b] > 0]
    for i, b in enumerate(order):
        share = -(-remaining // (len(order) - i))
        take = min(int(counts[b]), share)
        quota[b] = take
        remaining -= take
    return quota


def sample_indices(candidates: np.ndarray, depth_flat: np.ndarray, cfg: SamplerConfig,
                   rng: np.random.Generator) -> np.ndarray:
    """Choose `cfg.n` distinct entries of `candidates` (flat depth indices), in random order.

    `depth_flat` is the raveled depth map (used by the stratified mode). Raises `SamplingError`
    (`too_few_candidates`) when fewer than n candidates exist: sampling with replacement would
    repeat targets silently.
    """
    cand = np.asarray(candidates)
    if cand.size < cfg.n:
        raise SamplingError("too_few_candidates", f"{cand.size} candidate pixels for {cfg.n} points")
    if not cfg.stratified:
        return cand[rng.choice(cand.size, size=cfg.n, replace=False)]
    z = depth_flat[cand]
    lo, hi = float(z.min()), float(z.max())
    bins = cfg.depth_bins
    if hi > lo:
        b = np.minimum(((z - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1)
    else:
        b = np.zeros(z.shape, dtype=np.int64)
    counts = np.bincount(b, minlength=bins)
    quota = stratified_quota(counts, cfg.n)
    order = np.argsort(b, kind="stable")  # candidates grouped by bin, each group in index order
    starts = np.concatenate([[0], np.cumsum(counts)])
    picked = []
    for k in range(bins):
        if quota[k]:
            group = order[starts[k] : starts[k + 1]]
            picked.append(group[rng.choice(group.size, size=int(quota[k]), replace=False)])
    sel = cand[np.concatenate(picked)]
    return sel[rng.permutation(sel.size)]


def sample_pixels(depth: np.ndarray, candidates: np.ndarray, cfg: SamplerConfig, rng: np.random.Generator) -> np.ndarray:
    """`cfg.n` flat pixel indices drawn from `candidates` (flat indices of valid pixels) in `cfg.mode`.

    Edge-avoiding uniform mode draws 4n + 64 candidates, tests only those (`edge_at`) and keeps the first
    n edge-free ones: a uniform sample of the edge-free pixels (rejection keeps uniformity) at the cost of
    a few hundred window tests instead of a full-frame mask. Only when too few of them pass (a frame
    mostly made of edges) is the full mask built, and the draw repeated from the edge-free pixels. The
    stratified modes need edge-free counts per depth bin, so they build the mask. Raises `SamplingError`
    (`too_few_edge_free_pixels`, `too_few_candidates`).
    """
    z = np.asarray(depth, dtype=np.float32)
    cand = np.asarray(candidates, dtype=np.int64)
    if cfg.avoid_edges:
        if not cfg.stratified and cand.size >= cfg.n:
            draw = cand[rng.choice(cand.size, size=min(cand.size, 4 * cfg.n + 64), replace=False)]
            ok = ~edge_at(z, draw, cfg.edge_threshold, cfg.edge_radius)
            if np.count_nonzero(ok) >= cfg.n:
                return draw[ok][: cfg.n]
        cand = cand[~edge_mask(z, cfg.edge_threshold, cfg.edge_radius).reshape(-1)[cand]]
        if cand.size < cfg.n:
            raise SamplingError("too_few_edge_free_pixels", f"{cand.size} candidate pixels away from depth edges; "
                                                            f"need {cfg.n}")
    return sample_indices(cand, z.reshape(-1), cfg, rng)
