"""Camera and 3D-box conventions shared by every corpus and the model.

One place decides: the camera frame is OpenCV (x right, y down, z forward, metres); a box is
Omni3D's (`dimensions = [w, h, l]` = the local (z, y, x) extents, `corners = R @ local + center`, corners
in pytorch3d order); rotation text is R = Rz(roll) @ Rx(pitch) @ Ry(yaw); and a box is canonicalized
among the 24 proper symmetries of a cuboid so that one physical box has one text.
numpy only.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = [
    "CameraError",
    "validate_intrinsics",
    "normalization_scale",
    "rot_x",
    "rot_y",
    "rot_z",
    "euler_to_matrix",
    "matrix_to_euler",
    "is_rotation",
    "box_corners",
    "UNIT_CORNERS",
    "CUBOID_SYMMETRIES",
    "canonicalize_box",
    "project",
    "FOCAL_REFERENCE",
]

FOCAL_REFERENCE = 1000.0
"""Images are shown to the model as if taken with fx = 1000 px (s = 1000 / fx)."""

# Omni3D / pytorch3d corner order of the unit cube, bits (x, y, z).
UNIT_CORNERS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.float64
)


class CameraError(ValueError):
    """Raised for intrinsics or poses that no camera could have (NaN, fx <= 0, non-rotation R)."""


def validate_intrinsics(K: object) -> np.ndarray:
    """Return K as a (3, 3) float64 array, or raise `CameraError` saying what is wrong.

    Input files are untrusted: a NaN or zero focal length would silently poison every 3D target.
    """
    if _plainly_valid(K):  # the common case, without numpy's per-element costs (the det3d listing checks every image)
        return np.array(K, dtype=np.float64)
    try:
        arr = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an integer beyond float64's range
        raise CameraError(f"intrinsics are not numeric: {exc}") from None
    if arr.shape != (3, 3):
        raise CameraError(f"intrinsics must be 3x3, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CameraError("intrinsics contain NaN or Inf")
    fx, fy = arr[0, 0], arr[1, 1]
    if fx <= 0 or fy <= 0:
        raise CameraError(f"focal lengths must be positive, got fx={fx:g}, fy={fy:g}")
    if abs(arr[2, 2] - 1.0) > 1e-9 or abs(arr[2, 0]) > 1e-9 or abs(arr[2, 1]) > 1e-9:
        raise CameraError(f"last row of intrinsics must be [0, 0, 1], got {arr[2].tolist()}")
    if abs(arr[1, 0]) > 1e-9:
        raise CameraError(f"K[1][0] must be 0, got {arr[1, 0]:g}")
    return arr


def _plainly_valid(K: object) -> bool:
    """True when K is certainly valid by `validate_intrinsics`'s rules: 3 lists of 3 Python floats (or ints, not
    bools) passing every check, done with Python floats (the same IEEE float64 arithmetic as numpy's). False
    means "not sure": the numpy checks decide and say what is wrong, so no verdict or message changes."""
    if type(K) is not list or len(K) != 3:
        return False
    try:
        rows = [[_plain_float(x) for x in r] for r in K if type(r) is list and len(r) == 3]
    except (TypeError, OverflowError):
        return False
    if len(rows) != 3 or not math.isfinite(sum(itertools.chain.from_iterable(rows))):
        return False
    (fx, k01, _), (k10, fy, _), (k20, k21, k22) = rows
    return fx > 0 and fy > 0 and abs(k22 - 1.0) <= 1e-9 and abs(k20) <= 1e-9 and abs(k21) <= 1e-9 and abs(k10) <= 1e-9


def _plain_float(x: object) -> float:
    if type(x) is float:
        return x  # type: ignore[return-value]
    if type(x) is int:
        return float(x)  # OverflowError beyond float64: "not sure"
    raise TypeError


def normalization_scale(K: object) -> float:
    """s = 1000 / fx: the factor by which the model's data loader resizes the image (both axes).

    After the resize the image looks as if taken with fx = 1000, so metric depth is inferable from
    apparent size; 3D targets stay metric and unchanged.
    """
    return FOCAL_REFERENCE / float(validate_intrinsics(K)[0, 0])


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def euler_to_matrix(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """R = Rz(roll) @ Rx(pitch) @ Ry(yaw), angles in radians (camera frame: y is down, so yaw turns about y)."""
    return rot_z(roll) @ rot_x(pitch) @ rot_y(yaw)


def matrix_to_euler(R: object) -> tuple[float, float, float]:
    """Inverse of `euler_to_matrix`: (pitch, roll, yaw) in radians, pitch in [-pi/2, pi/2], others in (-pi, pi].

    At gimbal lock (|pitch| = pi/2) roll and yaw are not separable; roll is set to 0 there.
    """
    m = np.asarray(R, dtype=np.float64)
    sp = float(np.clip(m[2, 1], -1.0, 1.0))
    pitch = math.asin(sp)
    if math.sqrt(m[2, 0] ** 2 + m[2, 2] ** 2) < 1e-9:
        roll = 0.0
        yaw = math.atan2(m[0, 2], m[0, 0])
    else:
        yaw = math.atan2(-m[2, 0], m[2, 2])
        roll = math.atan2(-m[0, 1], m[1, 1])
    return pitch, _wrap_pi(roll), _wrap_pi(yaw)


def _wrap_pi(a: float) -> float:
    """Wrap an angle into (-pi, pi]."""
    a = math.fmod(a + math.pi, 2 * math.pi)
    if a <= 0:
        a += 2 * math.pi
    return a - math.pi


def is_rotation(R: object, tol: float = 1e-6) -> bool:
    """True when R is a proper rotation (orthonormal, det +1) within `tol`."""
    m = np.asarray(R, dtype=np.float64)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        return False
    return bool(np.allclose(m.T @ m, np.eye(3), atol=tol) and abs(np.linalg.det(m) - 1.0) < tol)


def box_corners(center: object, dims_whl: object, R: object) -> np.ndarray:
    """The 8 corners (8, 3) of an Omni3D box in pytorch3d order.

    dims_whl = [w, h, l] are the local (z, y, x) extents: local x spans l, y spans h, z spans w.
    """
    c = np.asarray(center, dtype=np.float64).reshape(3)
    w, h, l = (float(x) for x in np.asarray(dims_whl, dtype=np.float64).reshape(3))
    local = (UNIT_CORNERS - 0.5) * np.array([l, h, w])
    return local @ np.asarray(R, dtype=np.float64).T + c


def _proper_symmetries() -> np.ndarray:
    """The 24 signed permutation matrices with det +1, identity first (needed for idempotent ties)."""
    out = [np.eye(3)]
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            P = np.zeros((3, 3))
            for col, row in enumerate(perm):
                P[row, col] = signs[col]
            if np.linalg.det(P) > 0 and not np.array_equal(P, np.eye(3)):
                out.append(P)
    return np.stack(out)


CUBOID_SYMMETRIES = _proper_symmetries()


def canonicalize_box(dims_whl: object, R: object, tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Among the 24 equivalent (dims, R) of one cuboid, the one whose rotation is closest to identity.

    A cuboid is unchanged by relabelling its local axes with a proper signed permutation P
    (old local = P @ new local): R' = R @ P, extents permuted accordingly. The rotation angle of R'
    grows as trace(R') falls, so we keep the largest trace; ties go to the earliest symmetry, with
    identity first, which makes the function idempotent.
    """
    Rm = np.asarray(R, dtype=np.float64)
    w, h, l = (float(x) for x in np.asarray(dims_whl, dtype=np.float64).reshape(3))
    ext = np.array([l, h, w])  # local (x, y, z) extents
    cands = Rm[None] @ CUBOID_SYMMETRIES  # (24, 3, 3)
    traces = np.trace(cands, axis1=1, axis2=2)
    best = int(np.flatnonzero(traces >= traces.max() - tol)[0])
    P = CUBOID_SYMMETRIES[best]
    new_ext = np.abs(P).T @ ext
    return np.array([new_ext[2], new_ext[1], new_ext[0]]), cands[best]


def project(K: object, pts_cam: object) -> np.ndarray:
    """Pinhole projection of camera-frame points (N, 3) to pixels (N, 2): uvw = K @ X, (u, v) = uvw[:2] / w."""
    P = np.asarray(pts_cam, dtype=np.float64).reshape(-1, 3)
    uvw = P @ np.asarray(K, dtype=np.float64).T
    return uvw[:, :2] / uvw[:, 2:3]
