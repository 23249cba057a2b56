"""Exact oriented 3D IoU (`model.eval.iou_3d`) against independent values.

Boxes are built here from the unit-cube corner order written out by hand (not with schemas.camera),
and checked against: closed-form volumes, a Monte Carlo estimate (1e6 points), and scipy's
half-space intersection + convex hull.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection
from scipy.spatial.transform import Rotation

from model.eval import iou_3d
from model.eval.iou3d import DegenerateBoxWarning, box_volume

# Omni3D / pytorch3d corner order of the unit cube (docs/formats.md, "Omni3D").
UNIT = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float
)


def corners(center: object, lhw: object, R: np.ndarray | None = None) -> np.ndarray:
    """Corners of a box with local x/y/z extents l/h/w, rotated by R about its centre."""
    R = np.eye(3) if R is None else R
    return ((UNIT - 0.5) * np.asarray(lhw, float)) @ R.T + np.asarray(center, float)


def aabb(lo: object, hi: object) -> np.ndarray:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return corners((lo + hi) / 2, hi - lo)


def rot(seed: int) -> np.ndarray:
    return Rotation.random(random_state=seed).as_matrix()


def monte_carlo_iou(a: tuple, b: tuple, n: int = 1_000_000, seed: int = 0) -> float:
    """IoU of boxes given as (center, lhw, R) from n uniform points in the bounding box of both."""
    ca, ea = corners(*a), corners(*b)
    allc = np.concatenate([ca, ea])
    lo, hi = allc.min(0), allc.max(0)
    p = np.random.default_rng(seed).uniform(lo, hi, size=(n, 3))

    def inside(box: tuple) -> np.ndarray:
        c, lhw, R = box
        local = (p - np.asarray(c)) @ R  # R^T (p - c), row-wise
        return (np.abs(local) <= np.asarray(lhw) / 2).all(axis=1)

    ia, ib = inside(a), inside(b)
    return float((ia & ib).sum() / (ia | ib).sum())


def hull_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Reference IoU: scipy half-space intersection of the two hulls, volume by ConvexHull."""
    eqs = np.vstack([ConvexHull(a).equations, ConvexHull(b).equations])
    A, off = eqs[:, :3], eqs[:, 3]
    res = linprog(
        np.r_[0, 0, 0, -1],
        A_ub=np.c_[A, np.linalg.norm(A, axis=1)],
        b_ub=-off,
        bounds=[(None, None)] * 3 + [(0, None)],
    )
    if res.x is None or res.x[3] < 1e-9:
        return 0.0
    inter = ConvexHull(HalfspaceIntersection(eqs, res.x[:3]).intersections).volume
    va, vb = ConvexHull(a).volume, ConvexHull(b).volume
    return inter / (va + vb - inter)


def test_identical_boxes_have_iou_one_in_any_pose_and_precision() -> None:
    for seed in range(5):
        c = corners([0.3 * seed, -1.0, 5.0 + 10 * seed], [0.4, 1.2, 2.5], rot(seed))
        assert iou_3d(c[None], c[None])[0, 0] == pytest.approx(1.0, abs=1e-12)
        c32 = c.astype(np.float32)  # round-off of float32 JSON must not matter
        assert iou_3d(c32, c32)[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_disjoint_and_touching_boxes_have_iou_zero() -> None:
    a = aabb([0, 0, 0], [1, 1, 1])
    assert iou_3d(a, aabb([2, 0, 0], [3, 1, 1]))[0, 0] == 0.0
    assert iou_3d(a, aabb([1, 0, 0], [2, 1, 1]))[0, 0] == 0.0  # shares a face
    assert iou_3d(a, aabb([1, 1, 1], [2, 2, 2]))[0, 0] == 0.0  # shares a corner
    # rotated, bounding boxes overlap but the boxes do not (a thin diagonal slab beside a cube corner)
    R = Rotation.from_euler("z", -45, degrees=True).as_matrix()  # local x along (1, -1)
    slab = corners(
        [1.5, 1.5, 0.5], [3.0, 0.2, 1.0], R
    )  # occupies 3 - 0.14 <= x + y <= 3 + 0.14; cube: x + y <= 2
    assert iou_3d(a, slab)[0, 0] == 0.0


@pytest.mark.parametrize(
    ("lo_b", "hi_b", "expected"),
    [
        # A = [0,2]x[0,1]x[0,1] (vol 2). B overlaps [1,2]x[0.5,1]x[0,1] = 0.5: 0.5 / (2 + 2 - 0.5)
        ([1, 0.5, 0], [3, 1.5, 1], 0.5 / 3.5),
        # B inside A: vol 0.125 / 2
        ([0.25, 0.25, 0.25], [0.75, 0.75, 0.75], 0.125 / 2),
        # B = [1,2]x[0,1]x[0,1] lies inside A sharing five face planes: overlap = B = 1 -> 1 / (2 + 1 - 1)
        ([1, 0, 0], [2, 1, 1], 0.5),
        # corner overlap in all three axes: [1.5,2]x[0.5,1]x[0.5,1] = 0.125; B vol 1
        ([1.5, 0.5, 0.5], [2.5, 1.5, 1.5], 0.125 / (2 + 1 - 0.125)),
        # B = A exactly shifted along x by 0.5 (coplanar floor, ceiling, front and back): 1.5 / 2.5
        ([0.5, 0, 0], [2.5, 1, 1], 1.5 / 2.5),
    ],
)
def test_axis_aligned_overlaps_by_hand(lo_b: list, hi_b: list, expected: float) -> None:
    a = aabb([0, 0, 0], [2, 1, 1])
    got = iou_3d(a, aabb(lo_b, hi_b))[0, 0]
    assert got == pytest.approx(expected, abs=1e-12)
    # the same pair rigidly moved and rotated keeps its IoU (frame independence)
    R, t = rot(11), np.array([0.7, -2.0, 30.0])
    got_r = iou_3d(a @ R.T + t, aabb(lo_b, hi_b) @ R.T + t)[0, 0]
    assert got_r == pytest.approx(expected, abs=1e-9)


def test_square_rotated_45_degrees_closed_form() -> None:
    # unit cube vs the same cube turned 45 deg about its vertical axis: the overlap is a regular
    # octagon of area 2(sqrt(2) - 1) times the height 1.
    a = corners([0, 0, 0], [1, 1, 1])
    b = corners([0, 0, 0], [1, 1, 1], Rotation.from_euler("y", 45, degrees=True).as_matrix())
    inter = 2 * (np.sqrt(2) - 1)
    assert iou_3d(a, b)[0, 0] == pytest.approx(inter / (2 - inter), abs=1e-12)


@pytest.mark.parametrize(
    ("box_a", "box_b"),
    [
        (([0.0, 0.0, 4.0], [1.0, 1.5, 2.0], rot(1)), ([0.3, 0.2, 4.2], [1.2, 1.0, 1.8], rot(2))),
        (([1.0, -0.5, 12.0], [3.0, 1.5, 1.8], rot(3)), ([1.4, -0.3, 12.5], [2.5, 1.6, 2.0], rot(4))),
        (([0.0, 0.0, 2.0], [0.5, 0.5, 0.5], rot(5)), ([0.1, 0.05, 2.0], [0.6, 0.3, 0.6], rot(6))),
    ],
)
def test_rotated_boxes_agree_with_monte_carlo(box_a: tuple, box_b: tuple) -> None:
    mc = monte_carlo_iou(box_a, box_b)
    assert mc > 0.1  # a meaningful overlap, so the check is not trivially 0 == 0
    assert iou_3d(corners(*box_a), corners(*box_b))[0, 0] == pytest.approx(mc, abs=0.005)


def test_random_pairs_agree_with_scipy_halfspace_hull() -> None:
    rng = np.random.default_rng(7)
    a = np.stack([corners(rng.normal(0, 0.5, 3), rng.uniform(0.2, 2, 3), rot(100 + i)) for i in range(40)])
    b = np.stack([corners(rng.normal(0, 0.5, 3), rng.uniform(0.2, 2, 3), rot(200 + i)) for i in range(40)])
    got = iou_3d(a, b)
    ref = np.array([[hull_iou(x, y) for y in b] for x in a])
    assert (ref > 0).sum() > 400  # most pairs overlap
    np.testing.assert_allclose(got, ref, atol=1e-8)


def test_matrix_shape_symmetry_and_mirrored_corner_order() -> None:
    rng = np.random.default_rng(3)
    a = np.stack([corners(rng.normal(0, 0.3, 3), rng.uniform(0.5, 1.5, 3), rot(i)) for i in range(4)])
    b = np.stack([corners(rng.normal(0, 0.3, 3), rng.uniform(0.5, 1.5, 3), rot(10 + i)) for i in range(3)])
    ab = iou_3d(a, b)
    assert ab.shape == (4, 3)
    np.testing.assert_allclose(ab, iou_3d(b, a).T, atol=1e-12)
    mirrored = a[:, [1, 0, 3, 2, 5, 4, 7, 6]]  # same boxes, left-handed corner order
    np.testing.assert_allclose(iou_3d(mirrored, b), ab, atol=1e-12)
    assert iou_3d(np.zeros((0, 8, 3)), b).shape == (0, 3)


def test_box_volume_is_l_h_w() -> None:
    assert box_volume(corners([1, 2, 3], [0.5, 2.0, 3.0], rot(9)))[0] == pytest.approx(3.0, abs=1e-12)


def test_float32_boxes_with_coincident_faces_far_from_camera() -> None:
    # Shifted along one local axis: four faces coincide up to float32 round-off (~4e-6 m at z = 40).
    R = rot(5)
    a = corners(np.array([0, 0, 40.0]), [1, 1, 1], R)
    b = corners(np.array([0, 0, 40.0]) + R @ [0.3, 0, 0], [1, 1, 1], R)
    got = iou_3d(a.astype(np.float32), b.astype(np.float32))[0, 0]
    assert got == pytest.approx(0.7 / 1.3, abs=1e-5)


def test_degenerate_boxes_get_zero_with_a_warning() -> None:
    good = corners([0, 0, 3], [1, 1, 1])
    flat = corners([0, 0, 3], [1, 0, 1])  # zero height: zero volume
    bent = good.copy()
    bent[6] += [0.0, 0.0, 0.05]  # one corner off its faces' planes by 5 cm
    with pytest.warns(DegenerateBoxWarning, match="2 degenerate"):
        ious = iou_3d(np.stack([good, flat, bent]), good[None])
    assert ious[0, 0] == pytest.approx(1.0, abs=1e-12)
    assert ious[1, 0] == 0.0 and ious[2, 0] == 0.0
    with pytest.warns(DegenerateBoxWarning):
        assert iou_3d(good, np.full((8, 3), np.nan))[0, 0] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid input stays silent
        iou_3d(good, good)


def test_100_detections_by_50_gt_is_fast() -> None:
    rng = np.random.default_rng(0)
    # a crowded image: every detection overlaps many GT (the worst case, no pair is skipped early)
    a = np.stack(
        [corners(rng.normal(0, 0.5, 3) + [0, 0, 5], rng.uniform(0.5, 2, 3), rot(i)) for i in range(100)]
    )
    b = np.stack(
        [corners(rng.normal(0, 0.5, 3) + [0, 0, 5], rng.uniform(0.5, 2, 3), rot(500 + i)) for i in range(50)]
    )
    iou_3d(a, b)
    t0 = time.perf_counter()
    ious = iou_3d(a, b)
    elapsed = time.perf_counter() - t0
    assert (ious > 0).mean() > 0.5
    assert elapsed < 2.0  # ~0.3 s on one shared core; generous for a loaded CI box
