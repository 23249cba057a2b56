"""schemas.geometry against hand-computed boxes and an independent Euler implementation (scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from pipelines.sample_world.render import clip_polygon_rect, convex_hull, silhouette_box
from schemas.camera import CameraError, box_corners
from schemas.geometry import (
    ES_TO_OMNI_CORNER_ORDER,
    backproject_depth,
    es_box_corners,
    es_box_to_camera,
    es_box_to_omni_camera,
    euler_zxy_to_matrix,
    intrinsics_from_cam2img,
    invert_pose,
    matrix_to_euler_zxy,
    pose_camera_to_world,
)

angles = st.floats(-math.pi, math.pi)


@given(angles, st.floats(-math.pi / 2 + 1e-3, math.pi / 2 - 1e-3), angles)
@settings(max_examples=60, deadline=None)
def test_zxy_euler_matches_scipy_intrinsic_zxy(a, b, g):
    R = euler_zxy_to_matrix(a, b, g)
    assert np.allclose(R, Rotation.from_euler("ZXY", [a, b, g]).as_matrix(), atol=1e-12)
    assert np.allclose(euler_zxy_to_matrix(*matrix_to_euler_zxy(R)), R, atol=1e-9)


@pytest.mark.parametrize("beta", [math.pi / 2, -math.pi / 2])
def test_zxy_euler_gimbal_lock_round_trips(beta):
    R = euler_zxy_to_matrix(0.7, beta, -0.4)
    a, b, g = matrix_to_euler_zxy(R)
    assert b == pytest.approx(beta) and g == 0.0
    assert np.allclose(euler_zxy_to_matrix(a, b, g), R, atol=1e-12)


def test_es_corners_hand_computed():
    # 2 x 1 x 0.5 box at (1, 2, 0.25), turned 90 degrees about z: its length now runs along world y.
    c = es_box_corners([1, 2, 0.25, 2.0, 1.0, 0.5, math.pi / 2, 0, 0])
    assert np.allclose(c[0], [1.5, 1.0, 0.0])  # local (-1, -0.5, -0.25) -> world (+0.5, -1, -0.25) + centre
    assert np.allclose(c[4], [1.5, 3.0, 0.0])  # local x + 2 -> world y + 2
    assert np.allclose(c[1], [1.5, 1.0, 0.5])  # local z + 0.5 -> world z + 0.5
    assert np.allclose(c.min(0), [0.5, 1.0, 0.0]) and np.allclose(c.max(0), [1.5, 3.0, 0.5])


def test_es_box_into_camera_and_omni3d_hand_computed():
    # Camera at the world origin looking along world +y, level (OpenCV: x right = world +x, y down = world -z).
    T = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    # A 0.6 (x) by 0.4 (y) by 1.0 (z up) box 3 m in front of the camera, 0.5 m below its centre.
    b = [0.0, 3.0, -0.5, 0.6, 0.4, 1.0, 0.0, 0.0, 0.0]
    center, sizes, R_c = es_box_to_camera(b, T)
    assert np.allclose(center, [0.0, 0.5, 3.0]) and np.allclose(sizes, [0.6, 0.4, 1.0])
    c, dims, R_o = es_box_to_omni_camera(b, T)
    assert np.allclose(dims, [0.4, 1.0, 0.6])  # [w, h, l]: width = y size, height = z size, length = x size
    assert np.allclose(R_o, np.eye(3))  # the upright box faces the camera squarely: no rotation in Omni3D terms
    corners = box_corners(c, dims, R_o)
    assert np.allclose(corners[0], [-0.3, 0.0, 2.8]) and np.allclose(corners[6], [0.3, 1.0, 3.2])
    # same point set as the world corners moved into the camera
    cam = es_box_corners(b) @ invert_pose(T)[:3, :3].T + invert_pose(T)[:3, 3]
    d = np.linalg.norm(cam[:, None] - corners[None], axis=-1)
    assert d.min(axis=1).max() < 1e-12 and d.min(axis=0).max() < 1e-12


@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-1, 1), angles, angles, st.floats(-1.5, 1.5), angles)
@settings(max_examples=40, deadline=None)
def test_conversion_keeps_the_point_set_for_any_pose(x, y, z, a, b_yaw, beta, gamma):
    T = np.eye(4)
    T[:3, :3] = euler_zxy_to_matrix(b_yaw, 0.3, -0.2)
    T[:3, 3] = [0.5, -1.0, 1.4]
    box = [x, y, z, 0.7, 0.3, 1.2, a, beta, gamma]
    c, dims, R = es_box_to_omni_camera(box, T)
    assert np.isclose(np.linalg.det(R), 1.0)
    om = box_corners(c, dims, R)
    w2c = invert_pose(T)
    es = es_box_corners(box) @ w2c[:3, :3].T + w2c[:3, 3]
    d = np.linalg.norm(es[:, None] - om[None], axis=-1)
    assert d.min(axis=1).max() < 1e-9 and d.min(axis=0).max() < 1e-9
    # the documented reorder puts EmbodiedScan corners into pytorch3d order over the box's own axes
    _, sizes, R_c = es_box_to_camera(box, T)
    assert np.allclose(es[ES_TO_OMNI_CORNER_ORDER], box_corners(es.mean(0), sizes[::-1], R_c), atol=1e-9)


def test_poses_and_intrinsics_are_validated():
    with pytest.raises(CameraError, match="positive"):
        intrinsics_from_cam2img(np.diag([0.0, 500.0, 1.0, 1.0]))
    K = intrinsics_from_cam2img([[500, 0, 320, 0], [0, 500, 240, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert K.shape == (3, 3) and K[0, 2] == 320
    with pytest.raises(CameraError, match="rotation"):
        pose_camera_to_world(np.eye(4), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(CameraError, match="NaN"):
        pose_camera_to_world(np.eye(4), np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="9 values"):
        es_box_corners([0, 0, 0, 1, 1, 1])


def test_backproject_depth_hand_computed():
    K = np.array([[100.0, 0, 2.0], [0, 50.0, 1.0], [0, 0, 1]])
    d = np.zeros((3, 4))
    d[1, 2] = 2.0  # the principal point: straight ahead
    d[0, 3] = 4.0  # one pixel right (fx = 100), one up (fy = 50)
    d[2, 0] = np.nan
    pts = backproject_depth(d, K)
    assert pts.shape == (2, 5)
    assert np.allclose(pts[0], [3, 0, (3 - 2) * 4 / 100, (0 - 1) * 4 / 50, 4])
    assert np.allclose(pts[1], [2, 1, 0, 0, 2])


def test_silhouette_box_clips_behind_the_camera_and_to_the_image():
    K = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    bits = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=float)
    # a 2 x 2 x 2 box centred 2 m ahead: projects to [0, 100] exactly at its front face (z = 1)
    box = silhouette_box((bits - 0.5) * 2 + [0, 0, 2], K, 100, 100)
    assert box == pytest.approx([0.0, 0.0, 100.0, 100.0])
    small = silhouette_box((bits - 0.5) * 0.2 + [0, 0, 2], K, 100, 100)  # front face at z = 1.9
    assert small == pytest.approx([50 - 100 * 0.1 / 1.9, 50 - 100 * 0.1 / 1.9, 50 + 100 * 0.1 / 1.9, 50 + 100 * 0.1 / 1.9])
    # a box straddling the camera plane still has a (clipped) silhouette; one entirely behind has none
    assert silhouette_box((bits - 0.5) * 1 + [0.2, 0, 0.2], K, 100, 100) is not None
    assert silhouette_box((bits - 0.5) * 1 + [0, 0, -2], K, 100, 100) is None
    hull = convex_hull(np.array([[0, 0], [2, 0], [1, 1], [2, 2], [0, 2]]))
    assert len(hull) == 4
    clipped = clip_polygon_rect(np.array([[-1.0, -1], [3, -1], [3, 3], [-1, 3]]), 0, 0, 2, 2)
    assert np.allclose(clipped.min(0), [0, 0]) and np.allclose(clipped.max(0), [2, 2])
