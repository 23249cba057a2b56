"""Scene placement never fails: any (seed, scene) gives a scene, deterministically (placement only, no rendering)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.sample_world import scene as sc


def test_placement_succeeds_for_500_seed_scene_pairs():
    # seeds 0-124 x scenes 0-3: before the fix 23 of 240 such scenes failed with "could only place 2 objects"
    for seed in range(125):
        for index in range(4):
            s = sc.make_scene(seed, index, 1, 64, 48)
            floor = [o for o in s.objects if o.support is None]
            assert len(floor) >= sc.MIN_FLOOR_OBJECTS, (seed, index)
            assert len(s.views) == 1 and s.index == index


def _digest(s: sc.Scene) -> list:
    return [(o.category, o.center.tolist(), o.size.tolist(), o.yaw) for o in s.objects] + [
        v.cam2world.tolist() for v in s.views
    ]


def test_failed_attempt_is_retried_with_its_own_sub_seed(monkeypatch):
    """A failing first attempt is retried with sub-seed (seed, index, 0, 1): same scene on every call."""
    real = sc._make_scene_attempt
    seen: list[np.random.Generator] = []

    def first_fails(rng, *a):
        seen.append(rng)
        if len(seen) % 2 == 1:
            raise sc.PlacementError("forced")
        return real(rng, *a)

    monkeypatch.setattr(sc, "_make_scene_attempt", first_fails)
    a, b = sc.make_scene(3, 0, 2, 160, 120), sc.make_scene(3, 0, 2, 160, 120)
    assert _digest(a) == _digest(b)
    expect = real(sc.scene_rng(3, 0, 1), 0, 2, 160, 120)
    assert _digest(a) == _digest(expect)
    assert _digest(a) != _digest(real(sc.scene_rng(3, 0, 0), 0, 2, 160, 120))


def test_exhausted_attempts_raise_one_clear_error(monkeypatch):
    def always_fails(rng, index, *a):
        raise sc.PlacementError(f"scene {index}: forced")

    monkeypatch.setattr(sc, "_make_scene_attempt", always_fails)
    with pytest.raises(RuntimeError, match=r"scene 5: placement failed in all \d+ attempts \(last: scene 5: forced\)"):
        sc.make_scene(0, 5, 1, 64, 48)
