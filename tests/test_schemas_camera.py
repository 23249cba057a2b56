"""Camera conventions: hand-computed examples and properties (hypothesis)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.camera import (
    CUBOID_SYMMETRIES,
    CameraError,
    box_corners,
    canonicalize_box,
    euler_to_matrix,
    is_rotation,
    matrix_to_euler,
    normalization_scale,
    project,
    validate_intrinsics,
)

angles = st.floats(-math.pi + 1e-3, math.pi - 1e-3)
pitches = st.floats(-math.pi / 2 + 0.05, math.pi / 2 - 0.05)
dims = st.floats(0.05, 5.0)


def test_hand_computed_yaw_only():
    # A box turned 30 degrees about the camera's (downward) y axis.
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    assert np.allclose(euler_to_matrix(0.0, 0.0, math.pi / 6), R)
    pitch, roll, yaw = matrix_to_euler(R)
    assert (pitch, roll) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert yaw == pytest.approx(math.pi / 6)


def test_hand_computed_composition_order():
    # R = Rz(roll) @ Rx(pitch) @ Ry(yaw): with pitch=90deg, the local y axis maps to camera +z.
    R = euler_to_matrix(math.pi / 2, 0.0, 0.0)
    assert np.allclose(R @ [0, 1, 0], [0, 0, 1])
    # roll=90deg turns local x into camera +y (down).
    R = euler_to_matrix(0.0, math.pi / 2, 0.0)
    assert np.allclose(R @ [1, 0, 0], [0, 1, 0])
    # Order matters: pitch then roll differs from roll then pitch.
    a = euler_to_matrix(0.3, 0.4, 0.0)
    assert np.allclose(a, np.array(
        [[math.cos(0.4), -math.sin(0.4), 0], [math.sin(0.4), math.cos(0.4), 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]]))


def test_corner_order_is_omni3d():
    # R = I, dims [w, h, l] = [2, 4, 6]: local x spans l=6, y spans h=4, z spans w=2.
    corners = box_corners([0, 0, 10], [2, 4, 6], np.eye(3))
    expected = np.array([
        [-3, -2, 9], [3, -2, 9], [3, 2, 9], [-3, 2, 9],
        [-3, -2, 11], [3, -2, 11], [3, 2, 11], [-3, 2, 11],
    ], dtype=float)
    assert np.allclose(corners, expected)


def test_24_proper_symmetries():
    assert CUBOID_SYMMETRIES.shape == (24, 3, 3)
    assert np.array_equal(CUBOID_SYMMETRIES[0], np.eye(3))
    assert all(is_rotation(P) for P in CUBOID_SYMMETRIES)
    assert len({P.tobytes() for P in CUBOID_SYMMETRIES}) == 24


def test_canonicalize_hand_computed_120_degrees():
    # Yaw 120 deg with (w, h, l) = (0.5, 0.9, 1.2) is the same cuboid as yaw 30 deg with w and l swapped.
    d, R = canonicalize_box([0.5, 0.9, 1.2], euler_to_matrix(0, 0, 2 * math.pi / 3))
    assert np.allclose(d, [1.2, 0.9, 0.5])
    assert np.allclose(R, euler_to_matrix(0, 0, math.pi / 6))


def _same_point_set(a, b, tol=1e-9):
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return bool(np.all(dist.min(axis=1) < tol) and np.all(dist.min(axis=0) < tol))


@settings(max_examples=200, deadline=None)
@given(pitches, angles, angles)
def test_euler_round_trip(p, r, y):
    p2, r2, y2 = matrix_to_euler(euler_to_matrix(p, r, y))
    assert np.allclose(euler_to_matrix(p2, r2, y2), euler_to_matrix(p, r, y), atol=1e-9)
    assert (p2, r2, y2) == pytest.approx((p, r, y), abs=1e-7)


@settings(max_examples=200, deadline=None)
@given(pitches, angles, angles, dims, dims, dims)
def test_canonicalize_idempotent_and_same_corners(p, r, y, w, h, l):
    R = euler_to_matrix(p, r, y)
    d1, R1 = canonicalize_box([w, h, l], R)
    d2, R2 = canonicalize_box(d1, R1)
    assert np.allclose(d1, d2) and np.allclose(R1, R2)
    assert is_rotation(R1)
    assert np.trace(R1) >= np.trace(R) - 1e-9
    c = [0.3, -0.2, 4.0]
    assert _same_point_set(box_corners(c, [w, h, l], R), box_corners(c, d1, R1), tol=1e-7)
    # canonical rotation is within 2*pi/3... at most: its angle is no larger than any other variant
    angle = math.acos(np.clip((np.trace(R1) - 1) / 2, -1, 1))
    assert angle <= math.radians(120) + 1e-6


@settings(max_examples=100, deadline=None)
@given(st.floats(200, 2000), st.floats(200, 2000), st.integers(200, 1600), st.integers(200, 1200),
       pitches, angles, angles, st.floats(-1, 1), st.floats(-1, 1), st.floats(2, 8))
def test_projection_normalization_invariant_to_resize(fx, fy, W, H, p, r, y, x, yc, z):
    # Normalized 2D coordinates of a box's projection do not change when the image is resized by s = 1000/fx.
    K = np.array([[fx, 0, W / 2], [0, fy, H / 2], [0, 0, 1.0]])
    s = normalization_scale(K)
    Ks = np.diag([s, s, 1.0]) @ K
    pts = box_corners([x, yc, z], [0.5, 0.7, 0.9], euler_to_matrix(p, r, y))
    a = project(K, pts) / [W, H]
    b = project(Ks, pts) / [s * W, s * H]
    assert np.allclose(a, b, atol=1e-9)
    assert Ks[0, 0] == pytest.approx(1000.0)


@pytest.mark.parametrize("K, msg", [
    ([[float("nan"), 0, 1], [0, 500, 1], [0, 0, 1]], "NaN"),
    ([[0, 0, 1], [0, 500, 1], [0, 0, 1]], "positive"),
    ([[-5, 0, 1], [0, 500, 1], [0, 0, 1]], "positive"),
    ([[500, 0, 1], [0, 500, 1]], "3x3"),
    ([[500, 0, 1], [0, 500, 1], [0, 0, 2]], "last row"),
    ("abc", "numeric"),
])
def test_bad_intrinsics_are_named(K, msg):
    with pytest.raises(CameraError, match=msg):
        validate_intrinsics(K)


def test_normalization_scale():
    assert normalization_scale([[500, 0, 320], [0, 500, 240], [0, 0, 1]]) == pytest.approx(2.0)


def test_is_rotation_rejects_reflection_and_skew():
    assert not is_rotation(np.diag([1, 1, -1]))
    assert not is_rotation(np.eye(3) * 1.1)
    assert is_rotation(euler_to_matrix(0.1, 0.2, 0.3))


_K = [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("K", [
    _K, [[500, 0, 320], [0, 510, 240], [0, 0, 1]], [[500.0, 3.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]],
    [[0.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]], [[500.0, 0.0, 320.0], [0.0, -1.0, 240.0], [0.0, 0.0, 1.0]],
    [[500.0, 0.0, 320.0], [1e-10, 510.0, 240.0], [0.0, 0.0, 1.0]], [[500.0, 0.0, 320.0], [1e-8, 510.0, 240.0], [0, 0, 1]],
    [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0 + 2e-9]], [[500.0, 0.0, float("nan")], [0, 510, 240], [0, 0, 1]],
    [[500.0, 0.0, 1e308], [0.0, 510.0, 1e308], [0.0, 0.0, 1.0]], [[True, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]],
    [["500", 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0]], [[10**400, 0, 320], [0, 510, 240], [0, 0, 1]],
    [[500.0, 0.0], [0.0, 510.0], [0.0, 0.0]], [_K[0], _K[1]], (tuple(_K[0]), tuple(_K[1]), tuple(_K[2])), None, "K",
    [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[500.0, 0.0, 320.0, 1.0]] * 3,
    [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 1e-9, 1.0]], [[500.0, 0.0, 320.0], [0.0, 510.0, 240.0], [0.0, 2e-9, 1.0]],
])
def test_intrinsics_fast_path_never_changes_the_verdict(K, monkeypatch):
    """`validate_intrinsics`'s Python fast path accepts only what the numpy checks accept, with the same array;
    anything else goes to them and gets their message (a 400-digit integer included: "not numeric")."""
    import numpy as np

    from schemas import camera

    def outcome():
        try:
            arr = camera.validate_intrinsics(K)
        except camera.CameraError as exc:
            return "error", str(exc)
        return "ok", arr.dtype, arr.shape, arr.tolist()

    fast = outcome()
    monkeypatch.setattr(camera, "_plainly_valid", lambda _k: False)
    assert outcome() == fast
    if fast[0] == "ok":
        assert isinstance(camera.validate_intrinsics(K), np.ndarray)


def test_intrinsics_fast_path_takes_plain_lists():
    from schemas import camera

    assert camera._plainly_valid(_K) and camera._plainly_valid([[500, 0, 320], [0, 510, 240], [0, 0, 1]])
    assert not camera._plainly_valid(np.array(_K)) and not camera._plainly_valid([[True, 0, 1]] * 3)
