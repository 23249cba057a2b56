"""Pure geometry shared by the readers, the builders and the sample world (numpy only).

EmbodiedScan stores 9-DoF boxes in a z-up aligned world with ZXY Euler angles and its own corner
order; Omni3D stores camera-frame boxes with `dimensions = [w, h, l]` = the local (z, y, x) extents
and pytorch3d corner order. Converting between them is easy to get subtly wrong (a swapped axis
still gives a plausible-looking box), so the conversion lives here once, with tests against
boxes whose corners are known exactly.
"""

from __future__ import annotations

import math

import numpy as np

from schemas.camera import CameraError, is_rotation, validate_intrinsics

__all__ = [
    "euler_zxy_to_matrix",
    "matrix_to_euler_zxy",
    "ES_UNIT_CORNERS",
    "ES_TO_OMNI_CORNER_ORDER",
    "es_box_corners",
    "intrinsics_from_cam2img",
    "pose_camera_to_world",
    "invert_pose",
    "es_box_to_camera",
    "es_camera_box_to_omni",
    "es_box_to_omni_camera",
    "backproject_depth",
]

# EmbodiedScan `EulerInstance3DBoxes.corners` order, unit-cube bits (x, y, z).
ES_UNIT_CORNERS = np.array(
    [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]], dtype=np.float64
)
# es_corners[ES_TO_OMNI_CORNER_ORDER] lists the same points in Omni3D/pytorch3d order.
ES_TO_OMNI_CORNER_ORDER = np.array([0, 4, 7, 3, 1, 5, 6, 2])


def euler_zxy_to_matrix(alpha: float, beta: float, gamma: float) -> np.ndarray:
    """EmbodiedScan's rotation R = Rz(alpha) @ Rx(beta) @ Ry(gamma) (radians; intrinsic 'ZXY')."""
    ca, sa = math.cos(alpha), math.sin(alpha)
    cb, sb = math.cos(beta), math.sin(beta)
    cg, sg = math.cos(gamma), math.sin(gamma)
    rz = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cb, -sb], [0.0, sb, cb]])
    ry = np.array([[cg, 0.0, sg], [0.0, 1.0, 0.0], [-sg, 0.0, cg]])
    return rz @ rx @ ry


def matrix_to_euler_zxy(R: object) -> tuple[float, float, float]:
    """Inverse of `euler_zxy_to_matrix`: (alpha, beta, gamma), beta in [-pi/2, pi/2].

    At gimbal lock (|beta| = pi/2) only alpha + gamma or alpha - gamma is defined; gamma is set to 0.
    """
    m = np.asarray(R, dtype=np.float64)
    sb = float(np.clip(m[2, 1], -1.0, 1.0))
    beta = math.asin(sb)
    if math.hypot(m[2, 0], m[2, 2]) < 1e-9:
        gamma = 0.0
        alpha = math.atan2(m[1, 0], m[0, 0])
    else:
        alpha = math.atan2(-m[0, 1], m[1, 1])
        gamma = math.atan2(-m[2, 0], m[2, 2])
    return alpha, beta, gamma


def _bbox9(bbox_3d: object) -> np.ndarray:
    b = np.asarray(bbox_3d, dtype=np.float64).reshape(-1)
    if b.shape != (9,):
        raise ValueError(f"bbox_3d must have 9 values (cx, cy, cz, x_size, y_size, z_size, alpha, beta, gamma), got {b.shape[0]}")
    if not np.all(np.isfinite(b)):
        raise ValueError("bbox_3d contains NaN or Inf")
    if np.any(b[3:6] <= 0):
        raise ValueError(f"bbox_3d sizes must be positive, got {b[3:6].tolist()}")
    return b


def es_box_corners(bbox_3d: object) -> np.ndarray:
    """The 8 world corners (8, 3) of an EmbodiedScan 9-DoF box, in EmbodiedScan's own corner order."""
    b = _bbox9(bbox_3d)
    R = euler_zxy_to_matrix(*b[6:9])
    return ((ES_UNIT_CORNERS - 0.5) * b[3:6]) @ R.T + b[:3]


def intrinsics_from_cam2img(cam2img: object) -> np.ndarray:
    """The 3x3 K inside a 3x3 or 4x4 `cam2img`, validated (raises `CameraError`)."""
    try:
        m = np.asarray(cam2img, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CameraError(f"cam2img is not numeric: {exc}") from None
    if m.shape not in ((3, 3), (4, 4), (3, 4)):
        raise CameraError(f"cam2img must be 3x3, 3x4 or 4x4, got shape {m.shape}")
    return validate_intrinsics(m[:3, :3])


def _pose(T: object, what: str) -> np.ndarray:
    try:
        m = np.asarray(T, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CameraError(f"{what} is not numeric: {exc}") from None
    if m.shape != (4, 4):
        raise CameraError(f"{what} must be 4x4, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise CameraError(f"{what} contains NaN or Inf")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise CameraError(f"{what} last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    if not is_rotation(m[:3, :3], tol=1e-4):
        raise CameraError(f"{what} rotation part is not a proper rotation")
    return m


def pose_camera_to_world(axis_align_matrix: object, cam2global: object) -> np.ndarray:
    """EmbodiedScan's camera -> aligned-world pose `axis_align_matrix @ cam2global` (validated rigid 4x4).

    `cam2global` alone points into the raw scan frame; the boxes live in the aligned frame.
    """
    A = _pose(axis_align_matrix, "axis_align_matrix")
    C = _pose(cam2global, "cam2global")
    return A @ C


def invert_pose(T: object) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (exact transpose form, no general matrix inverse)."""
    m = np.asarray(T, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = m[:3, :3].T
    out[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return out


def es_box_to_camera(bbox_3d: object, T_cam2world: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move a world 9-DoF box into the camera frame: (center_cam, sizes_xyz, R_cam) in EmbodiedScan axes.

    Sizes stay the local (x, y, z) extents; R_cam = R_world2cam @ R_world.
    """
    b = _bbox9(bbox_3d)
    T_w2c = invert_pose(T_cam2world)
    R_w = euler_zxy_to_matrix(*b[6:9])
    center = T_w2c[:3, :3] @ b[:3] + T_w2c[:3, 3]
    return center, b[3:6].copy(), T_w2c[:3, :3] @ R_w


def es_camera_box_to_omni(
    center_cam: object, sizes_xyz: object, R_cam: object
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-express an EmbodiedScan-axes box as an Omni3D box: (center, dims_whl, R_omni).

    Omni3D's local x is the length, y the height (pointing down for an upright box) and z the width.
    Taking R_omni columns (x, -z, y) of the EmbodiedScan rotation keeps det +1 and the same 8 corners,
    with dims [w, h, l] = [y_size, z_size, x_size]. "h" is a true height only when the box's local z
    is the world's up axis (not so for boxes written with beta = +-pi/2).
    """
    R = np.asarray(R_cam, dtype=np.float64)
    s = np.asarray(sizes_xyz, dtype=np.float64).reshape(3)
    R_omni = np.stack([R[:, 0], -R[:, 2], R[:, 1]], axis=1)
    dims = np.array([s[1], s[2], s[0]])
    return np.asarray(center_cam, dtype=np.float64).reshape(3).copy(), dims, R_omni


def es_box_to_omni_camera(bbox_3d: object, T_cam2world: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World 9-DoF EmbodiedScan box -> Omni3D camera-frame box (center, dims_whl, R_cam)."""
    return es_camera_box_to_omni(*es_box_to_camera(bbox_3d, T_cam2world))


def backproject_depth(depth_m: np.ndarray, K: object, stride: int = 1) -> np.ndarray:
    """Back-project a metric depth map to (N, 5) float64 rows (u, v, X, Y, Z) of its valid pixels.

    Pixel (u, v) is the column/row index (OpenCV: pixel centres at integer coordinates), which is
    also how the sample world casts its rays; depth <= 0 or non-finite is invalid and skipped.
    """
    Km = validate_intrinsics(K)
    d = np.asarray(depth_m, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must be 2-D, got shape {d.shape}")
    v, u = np.mgrid[0 : d.shape[0] : stride, 0 : d.shape[1] : stride]
    z = d[::stride, ::stride]
    ok = np.isfinite(z) & (z > 0)
    u, v, z = u[ok].astype(np.float64), v[ok].astype(np.float64), z[ok]
    x = (u - Km[0, 2] - Km[0, 1] * (v - Km[1, 2]) / Km[1, 1]) * z / Km[0, 0]
    y = (v - Km[1, 2]) * z / Km[1, 1]
    return np.stack([u, v, x, y, z], axis=1)
