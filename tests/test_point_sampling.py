"""Samplers (pipelines.corpora.pointmaps.sampling): seeded by key, never invalid pixels, strata and edges as specified."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.corpora.pointmaps.sampling import (
    SamplerConfig,
    SamplingError,
    edge_at,
    edge_mask,
    rng_for,
    sample_indices,
    sample_pixels,
    stable_seed,
    stratified_quota,
)

K = np.array([[200.0, 0.0, 63.5], [0.0, 200.0, 47.5], [0.0, 0.0, 1.0]])


def slanted_floor(h: int = 96, w: int = 128) -> np.ndarray:
    """A plane seen at a grazing angle: inverse depth affine in (u, v), depth from 1 m to ~10 m."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    inv = 0.1 + 0.9 * (v / (h - 1)) + 0.002 * u
    return (1.0 / inv).astype(np.float32)


def test_stable_seed_is_sha256_of_salt_and_key() -> None:
    want = int.from_bytes(hashlib.sha256(b"0|omni3d/SUNRGBD/17").digest()[:8], "big")
    assert stable_seed("omni3d/SUNRGBD/17") == want
    assert stable_seed("a") != stable_seed("b") and stable_seed("a", 1) != stable_seed("a", 0)


def test_uniform_is_reproducible_per_key_distinct_and_valid() -> None:
    z = slanted_floor()
    z[::3, ::2] = 0.0  # holes
    z[10:20, 30:60] = np.nan  # NaN must never be sampled either
    cand = np.flatnonzero(z > 0)
    cfg = SamplerConfig(n=100)
    a = sample_indices(cand, z.reshape(-1), cfg, rng_for("k1"))
    b = sample_indices(cand, z.reshape(-1), cfg, rng_for("k1"))
    c = sample_indices(cand, z.reshape(-1), cfg, rng_for("k2"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.sort(a), np.sort(c))
    assert len(set(a.tolist())) == 100 and np.all(z.reshape(-1)[a] > 0)


def test_uniform_is_uniform_over_candidates() -> None:
    # candidates: 1/4 in the left block, 3/4 in the right block; 40 keys x 100 draws
    cand = np.arange(4000)
    hits = np.concatenate([sample_indices(cand, np.ones(4000, np.float32), SamplerConfig(n=100), rng_for(f"u{i}"))
                           for i in range(40)])
    frac = float(np.mean(hits < 1000))
    assert abs(frac - 0.25) < 0.035  # binomial sd = 0.0097


def test_too_few_candidates_is_a_reason_not_a_repeat() -> None:
    with pytest.raises(SamplingError) as ei:
        sample_indices(np.arange(50), np.ones(50, np.float32), SamplerConfig(n=100), rng_for("x"))
    assert ei.value.reason == "too_few_candidates"


def test_depth_stratified_balances_near_and_far() -> None:
    # 95 % of the pixels at ~1 m, 5 % at ~5 m: uniform asks about the far wall ~5 times in 100
    z = np.full(10000, 1.0, np.float32) + np.linspace(0, 0.1, 10000, dtype=np.float32)
    z[:500] = 5.0 + np.linspace(0, 0.1, 500, dtype=np.float32)
    cand = np.arange(z.size)
    uni = sample_indices(cand, z, SamplerConfig(n=100), rng_for("s"))
    strat = sample_indices(cand, z, SamplerConfig(n=100, mode="depth_stratified", depth_bins=2), rng_for("s"))
    assert np.sum(z[uni] > 3) < 15
    assert np.sum(z[strat] > 3) == 50 and len(set(strat.tolist())) == 100
    # with 8 bins: only 2 bins are occupied here; each still gets half
    strat8 = sample_indices(cand, z, SamplerConfig(n=100, mode="depth_stratified"), rng_for("s"))
    assert np.sum(z[strat8] > 3) == 50


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=10), st.integers(1, 200))
def test_stratified_quota_water_fills(counts: list[int], n: int) -> None:
    c = np.array(counts)
    q = stratified_quota(c, n)
    assert q.sum() == min(n, c.sum()) and np.all(q <= c) and np.all(q >= 0)
    open_ = q < c  # bins that could give more
    if open_.any():
        # every open bin holds the largest share (+-1), and no full bin got more than an open one
        assert q[open_].max() - q[open_].min() <= 1
        assert np.all(q[~open_] <= q[open_].max() + 1)


def test_edge_mask_flags_occlusions_never_slanted_planes() -> None:
    z = slanted_floor()
    assert not edge_mask(z, 0.03, 1).any()  # inverse depth is affine on a plane, however grazing
    zq = np.round(z * 1000) / 1000  # millimetre quantization does not create edges either
    assert not edge_mask(zq.astype(np.float32), 0.03, 0).any()
    z2 = z.copy()
    z2[40:60, 50:80] = 0.8  # a box in front of the floor
    e = edge_mask(z2, 0.03, 1)
    ring = np.zeros_like(e)
    ring[38:62, 48:82] = True
    ring[42:58, 52:78] = False  # flagged: 1 px either side of the outline, +1 px dilation
    assert e[40, 60] and e[59, 70] and e[50, 50] and e[50, 79] and e[39, 60]  # both sides of the outline
    assert not (e & ~ring).any() and not e[50, 65]  # nothing far from the outline


def test_edge_mask_flags_holes_borders() -> None:
    z = slanted_floor()
    z[30, 30] = 0.0
    e = edge_mask(z, 0.03, 0)
    assert e[29, 30] and e[31, 30] and e[30, 29] and e[30, 31] and not e[30, 30] and e.sum() == 4


def _rough_scene(seed: int) -> np.ndarray:
    """A slanted floor with boxes in front, holes, NaN-free: edges of every kind, touching the border."""
    rng = np.random.default_rng(seed)
    z = slanted_floor(60, 80)
    for _ in range(4):
        r, c = rng.integers(0, 55), rng.integers(0, 75)
        z[r : r + rng.integers(2, 15), c : c + rng.integers(2, 20)] = rng.uniform(0.5, 3.0)
    z[rng.random(z.shape) < 0.02] = 0.0
    return z


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_edge_at_equals_the_full_mask_bit_for_bit(seed: int, radius: int) -> None:
    z = _rough_scene(seed)
    full = edge_mask(z, 0.03, radius).reshape(-1)
    assert full.any() and not full.all()
    np.testing.assert_array_equal(edge_at(z, np.arange(z.size), 0.03, radius), full)


@pytest.mark.parametrize("mode", ["edge_avoiding", "depth_stratified_edge_avoiding"])
def test_edge_avoiding_never_picks_an_edge_pixel(mode: str) -> None:
    z = _rough_scene(7)
    full = edge_mask(z, 0.03, 1).reshape(-1)
    cand = np.flatnonzero(z.reshape(-1) > 0)
    for i in range(10):
        sel = sample_pixels(z, cand, SamplerConfig(n=100, mode=mode), rng_for(f"e{i}"))
        assert len(set(sel.tolist())) == 100 and not full[sel].any() and np.all(z.reshape(-1)[sel] > 0)


def test_edge_avoiding_falls_back_then_rejects_when_edges_dominate() -> None:
    z = slanted_floor(60, 80)
    z[:, ::2] *= 0.5  # stripes: almost every pixel is at an edge
    z[20:40, 30:60] = 2.0  # one flat patch: 20 x 30, of which 18 x 28 are edge-free
    cand = np.flatnonzero(z.reshape(-1) > 0)
    sel = sample_pixels(z, cand, SamplerConfig(n=400, mode="edge_avoiding"), rng_for("f"))
    r, c = np.divmod(sel, 80)
    assert sel.size == 400 and r.min() >= 21 and r.max() <= 38 and c.min() >= 31 and c.max() <= 58
    with pytest.raises(SamplingError) as ei:
        sample_pixels(z, cand, SamplerConfig(n=600, mode="edge_avoiding"), rng_for("f"))
    assert ei.value.reason == "too_few_edge_free_pixels"


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="mode"):
        SamplerConfig(mode="random")
    with pytest.raises(ValueError):
        SamplerConfig(n=0)
    assert SamplerConfig(mode="depth_stratified_edge_avoiding").stratified
    assert SamplerConfig(mode="depth_stratified_edge_avoiding").avoid_edges
