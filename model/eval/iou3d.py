"""Exact IoU of oriented 3D boxes given by their 8 corners (Omni3D / pytorch3d corner order).

Omni3D scores 3D detections with pytorch3d's `iou_box3d`, which we cannot depend on here. This module
computes the same quantity exactly (up to float round-off) in numpy:

* the intersection of two convex boxes is a convex polytope whose boundary consists of pieces of
  the two boxes' faces: each face of A clipped to the inside of B, and each face of B clipped to the
  inside of A (Sutherland-Hodgman, one half-space at a time);
* its volume follows from the divergence theorem, V = 1/3 * sum_f (n_f . p_f) * area_f, summed over
  those clipped faces (outward normal n_f, any point p_f of the face's plane);
* each box's corners are first rebuilt from its 6 fitted face planes, so that every face is exactly
  planar even for float32 or rounded input (otherwise a nearly coincident face of the other box can
  cut it along an arbitrary line);
* faces of A and B lying in one plane (within 1e-7 of the pair's scale) are resolved explicitly: with
  the same outward normal only A's piece is kept (it would be counted twice), with opposite normals
  (boxes touching there) both are dropped (they would cancel); all other clipping is exact.

All pairs are processed at once: the clipping is vectorised over (pair, face) with padded polygons.
Pairs whose axis-aligned bounds do not overlap are skipped (their IoU is exactly 0).

Degenerate boxes are handled as Omni3D's wrapper does: a box whose faces are not planar (eps 1e-4)
or that has a face triangle of area <= 1e-8 gets IoU 0 with every other box, and a warning is issued
instead of an error. Omni3D checks only the predicted boxes; here both arguments are checked,
which changes nothing for Omni3D's ground truth (its corners are planar by construction).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "iou_3d",
    "iou_3d_pairs",
    "box_volume",
    "valid_boxes",
    "DegenerateBoxWarning",
    "FACES",
    "COPLANAR_EPS",
    "NONZERO_EPS",
]

# Faces of the box as corner indices (pytorch3d `_box_planes`): z=0, y=1, y=0, x=0, x=1, z=1 of the unit cube.
FACES = np.array(
    [[0, 1, 2, 3], [3, 2, 6, 7], [0, 1, 5, 4], [0, 3, 7, 4], [1, 2, 6, 5], [4, 5, 6, 7]], dtype=np.int64
)
# The 12 triangles pytorch3d (and Omni3D's zero-volume check) split the faces into.
_TRIANGLES = np.array(
    [
        [0, 1, 2], [0, 3, 2], [4, 5, 6], [4, 6, 7], [1, 5, 6], [1, 6, 2],
        [0, 4, 7], [0, 7, 3], [3, 2, 6], [3, 6, 7], [0, 1, 5], [0, 4, 5],
    ],
    dtype=np.int64,
)  # fmt: skip

COPLANAR_EPS = 1e-4
"""Omni3D's `_check_coplanar` tolerance (metres): distance of a face's 4th corner from the plane of the other 3."""
NONZERO_EPS = 1e-8
"""Omni3D's `_check_nonzero` tolerance: every face triangle must have an area above this (m^2)."""

# Relative tolerance (of the pair's size plus its distance from the camera) within which two face
# planes are taken to be the same plane. Treating such planes as one moves the result by at most
# about tol * face area; planes farther apart are clipped exactly, where round-off moves a clipping
# line by round-off / tol at most, i.e. ~1e-9 of the box size.
_REL_TOL = 1e-7
_FAR = 1e30  # a plane offset no vertex reaches: "do not clip"
_UNIT = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.float64
)


class DegenerateBoxWarning(UserWarning):
    """A box was not planar or had zero volume; its IoU was set to 0 (as Omni3D does)."""


def _as_corners(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2 and a.shape == (8, 3):
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (8, 3):
        raise ValueError(f"{name} must have shape (N, 8, 3) (corners in Omni3D order), got {a.shape}")
    return a


def _valid_boxes(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(finite, coplanar, nonzero) masks, with Omni3D's per-face tests (`_check_coplanar`, `_check_nonzero`)."""
    finite = np.isfinite(c).all(axis=(1, 2))
    cc = np.where(finite[:, None, None], c, 0.0)
    fv = cc[:, FACES]  # (B, 6, 4, 3)
    v0, v1, v2, v3 = fv[:, :, 0], fv[:, :, 1], fv[:, :, 2], fv[:, :, 3]

    def _unit(v: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.maximum(n, 1e-12)

    normal = _unit(np.cross(_unit(v1 - v0), _unit(v2 - v0)))
    # Omni3D sums the 6 faces' distances before taking abs (a quirk); we require each face to be planar.
    coplanar = (np.abs(np.einsum("bfk,bfk->bf", v3 - v0, normal)) < COPLANAR_EPS).all(axis=1)
    tv = cc[:, _TRIANGLES]  # (B, 12, 3, 3)
    areas = 0.5 * np.linalg.norm(np.cross(tv[:, :, 1] - tv[:, :, 0], tv[:, :, 2] - tv[:, :, 0]), axis=-1)
    nonzero = (areas > NONZERO_EPS).all(axis=1)
    return finite, finite & coplanar, finite & nonzero


# The three faces meeting at each corner (from FACES): used to rebuild corners from the face planes.
_CORNER_FACES = np.array([sorted(np.nonzero((FACES == v).any(axis=1))[0]) for v in range(8)], dtype=np.int64)


def valid_boxes(corners: object) -> np.ndarray:
    """(N,) True where a box passes Omni3D's planarity and non-zero-volume checks (else its IoU is 0)."""
    _, coplanar, nonzero = _valid_boxes(_as_corners(corners, "corners"))
    return coplanar & nonzero


def _planes(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per box: exact-planar corners (B,8,3), centroid (B,3), outward unit normals (B,6,3), offsets n.x = o (B,6).

    The face planes are fitted to the given corners, then every corner is recomputed as the meeting
    point of its three face planes. For exact input this changes nothing; for input with round-off
    (float32 JSON, 2-decimal corners) it makes every face exactly planar, so that clipping one box's
    face against a nearly coincident plane of the other box is geometrically consistent with the
    reverse clipping. Without it, micrometre noise on coincident faces can flip half a face in or out.
    """
    centroid = c.mean(axis=1)
    rel = c - centroid[:, None]
    fv = rel[:, FACES]  # (B, 6, 4, 3)
    # Cross product of the diagonals = twice the area vector of a planar quad; robust for slightly bent faces.
    n = np.cross(fv[:, :, 2] - fv[:, :, 0], fv[:, :, 3] - fv[:, :, 1])
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-300)
    # Orient outward (the corner order may be mirrored): away from the box centroid.
    out = np.einsum("bfk,bfk->bf", n, fv.mean(axis=2))
    n = np.where((out < 0)[..., None], -n, n)
    o = np.einsum("bfvk,bfk->bfv", fv, n).mean(axis=2)  # relative to the centroid
    mats = n[:, _CORNER_FACES]  # (B, 8, 3, 3)
    rhs = o[:, _CORNER_FACES]  # (B, 8, 3)
    ok = np.abs(np.linalg.det(mats)) > 1e-12
    mats = np.where(ok[..., None, None], mats, np.eye(3))
    corners = np.linalg.solve(mats, rhs[..., None])[..., 0]
    corners = np.where(ok[..., None], corners, rel) + centroid[:, None]
    o_abs = o + np.einsum("bfk,bk->bf", n, centroid)
    return corners, centroid, n, o_abs


def _face_volume(verts: np.ndarray, normals: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """1/3 * offset * |area| per polygon; verts (..., L, 3) padded with their first vertex (zero-area pad)."""
    area_vec = 0.5 * np.cross(verts, np.roll(verts, -1, axis=-2)).sum(axis=-2)
    area = np.abs(np.einsum("...k,...k->...", area_vec, normals))
    return offsets * area / 3.0


def box_volume(corners: object) -> np.ndarray:
    """Volume of each box (N,) from its corners, by the same divergence-theorem sum the IoU uses."""
    return _volumes(_planes(_as_corners(corners, "corners")))


def _volumes(planes: tuple) -> np.ndarray:
    corners_p, centroid, n, o = planes
    fv = corners_p[:, FACES] - centroid[:, None, None]
    o_rel = o - np.einsum("bfk,bk->bf", n, centroid)
    return _face_volume(fv, n, o_rel).sum(axis=1)


def _clip(
    verts: np.ndarray, count: np.ndarray, normals: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Clip P convex polygons to the closed half-spaces n.x <= o (one plane per polygon), Sutherland-Hodgman.

    verts (P, L, 3) hold `count` vertices each, padded with copies of the first vertex; the result has
    the same layout with L + 1 slots (a convex polygon gains at most one vertex per clipping plane).
    Only polygons that the plane actually cuts go through the general (gather/scatter) path.
    """
    P, L, _ = verts.shape
    d = np.einsum("plk,pk->pl", verts, normals) - offsets[:, None]
    valid = np.arange(L)[None, :] < count[:, None]
    outside = d > 0.0
    any_out = (valid & outside).any(axis=1)
    any_in = (valid & ~outside).any(axis=1)
    new_count = np.where(any_in, count, 0)
    res = np.concatenate([verts, verts[:, :1]], axis=1)
    rows = np.nonzero(any_out & any_in)[0]
    if rows.size == 0:
        return res, new_count
    v, dd, val = verts[rows], d[rows], valid[rows]
    nxt = np.roll(v, -1, axis=1)  # with first-vertex padding, the successor of the last vertex is vertex 0
    dn = np.roll(dd, -1, axis=1)
    inside = dd <= 0.0
    keep = val & inside
    cross = val & (inside != (dn <= 0.0))
    t = np.where(cross, dd / np.where(cross, dd - dn, 1.0), 0.0)
    x = v + t[..., None] * (nxt - v)
    R = rows.size
    cand = np.stack([v, x], axis=2).reshape(R, 2 * L, 3)
    mask = np.stack([keep, cross], axis=2).reshape(R, 2 * L)
    cnt = mask.sum(axis=1)
    Ln = int(cnt.max())
    if Ln > L + 1:  # only possible for polygons bent by round-off; widen instead of dropping vertices
        res = np.concatenate([res, np.repeat(res[:, :1], Ln - L - 1, axis=1)], axis=1)
    pos = np.cumsum(mask, axis=1) - 1
    r, s = np.nonzero(mask)
    sub = np.zeros((R, res.shape[1], 3))
    sub[r, pos[r, s]] = cand[r, s]
    pad = np.arange(res.shape[1])[None, :] >= cnt[:, None]
    res[rows] = np.where(pad[..., None], sub[:, :1], sub)
    new_count[rows] = cnt
    return res, new_count


def _intersection_volumes(pa: tuple, pb: tuple) -> np.ndarray:
    """Exact intersection volume of K box pairs; pa/pb are the `_planes` outputs of the pairs' A and B boxes."""
    a, ca, na, oa = pa
    b, _, nb, ob = pb
    K = a.shape[0]
    origin = ca  # work relative to A's centroid: keeps plane offsets small, hence round-off small
    a_rel = a - origin[:, None]
    b_rel = b - origin[:, None]
    oa_rel = oa - np.einsum("kfj,kj->kf", na, origin)
    ob_rel = ob - np.einsum("kfj,kj->kf", nb, origin)
    # Two planes count as the same when every corner of both faces lies within `tol` of the other's plane.
    scale = np.abs(np.concatenate([a_rel, b_rel], axis=1)).max(axis=(1, 2)) + np.abs(origin).max(axis=1)
    tol = _REL_TOL * scale  # (K,)

    fa = a_rel[:, FACES]  # (K, 6, 4, 3)
    fb = b_rel[:, FACES]
    # d_ab[k, g, f, v]: signed distance of corner v of B's face f from A's plane g; d_ba the other way round.
    d_ab = np.einsum("kfvj,kgj->kgfv", fb, na) - oa_rel[:, :, None, None]
    d_ba = np.einsum("kgvj,kfj->kgfv", fa, nb) - ob_rel[:, None, :, None]
    coincident = (np.abs(d_ab) <= tol[:, None, None, None]).all(axis=3)
    coincident &= (np.abs(d_ba) <= tol[:, None, None, None]).all(axis=3)  # (K, 6 A faces, 6 B faces)
    same_dir = np.einsum("kgj,kfj->kgf", na, nb) > 0.0
    same = coincident & same_dir
    opposite = coincident & ~same_dir
    # Same plane, same outward normal: the clipped pieces of both faces are the same polygon. Keep A's
    # (not clipped by that plane, on which it lies) and drop B's. Same plane, opposite normals (boxes
    # touching there): both pieces would cancel, so drop both.
    drop_a = opposite.any(axis=2)
    drop_b = (same | opposite).any(axis=1)

    verts = np.concatenate([fa, fb], axis=1).reshape(K * 12, 4, 3)
    clip_n = np.concatenate([np.repeat(nb[:, None], 6, axis=1), np.repeat(na[:, None], 6, axis=1)], axis=1)
    clip_o = np.concatenate(
        [np.repeat(ob_rel[:, None], 6, axis=1), np.repeat(oa_rel[:, None], 6, axis=1)], axis=1
    )
    # A's face g is not clipped by B's plane f when they are the same plane (same[g, f]).
    clip_o[:, :6] = np.where(same, _FAR, clip_o[:, :6])
    clip_n = clip_n.reshape(K * 12, 6, 3)
    clip_o = clip_o.reshape(K * 12, 6)
    count = np.full(K * 12, 4, dtype=np.int64)
    count[np.concatenate([drop_a, drop_b], axis=1).reshape(-1)] = 0
    for p in range(6):
        verts, count = _clip(verts, count, clip_n[:, p], clip_o[:, p])
    face_n = np.concatenate([na, nb], axis=1).reshape(K * 12, 3)
    face_o = np.concatenate([oa_rel, ob_rel], axis=1).reshape(K * 12)
    vol = _face_volume(verts, face_n, face_o)
    vol = np.where(count >= 3, vol, 0.0)
    return vol.reshape(K, 12).sum(axis=1)


def _checked(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validity masks of both sets (one warning for all degenerate boxes) and stand-in-cleaned copies."""
    fin_a, cop_a, nz_a = _valid_boxes(a)
    fin_b, cop_b, nz_b = _valid_boxes(b)
    ok_a = cop_a & nz_a
    ok_b = cop_b & nz_b
    n_bad = int((~ok_a).sum() + (~ok_b).sum())
    if n_bad:
        warnings.warn(
            f"iou_3d: {n_bad} degenerate box(es) get IoU 0 "
            f"(non-finite {int((~fin_a).sum() + (~fin_b).sum())}, non-coplanar "
            f"{int((fin_a & ~cop_a).sum() + (fin_b & ~cop_b).sum())}, zero-volume "
            f"{int((fin_a & ~nz_a).sum() + (fin_b & ~nz_b).sum())})",
            DegenerateBoxWarning,
            stacklevel=3,
        )
    # Stand-in unit cubes for degenerate boxes keep the linear algebra regular; their IoU stays 0.
    return ok_a, ok_b, np.where(ok_a[:, None, None], a, _UNIT), np.where(ok_b[:, None, None], b, _UNIT)


def _pair_ious(
    pa_all: tuple, pb_all: tuple, vol_a: np.ndarray, vol_b: np.ndarray, ia: np.ndarray, jb: np.ndarray
) -> np.ndarray:
    """IoU of the pairs (A[ia[k]], B[jb[k]]), in chunks that bound memory (12 polygons of <= 10 vertices per pair)."""
    out = np.zeros(ia.size)
    chunk = 4096
    for s in range(0, ia.size, chunk):
        i, j = ia[s : s + chunk], jb[s : s + chunk]
        inter = _intersection_volumes(tuple(x[i] for x in pa_all), tuple(x[j] for x in pb_all))
        va, vb = vol_a[i], vol_b[j]
        inter = np.clip(inter, 0.0, np.minimum(va, vb))
        union = va + vb - inter
        out[s : s + chunk] = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return out


def iou_3d(corners_a: object, corners_b: object) -> np.ndarray:
    """IoU (N, M) of every box in `corners_a` (N, 8, 3) with every box in `corners_b` (M, 8, 3).

    Corners follow the Omni3D / pytorch3d order (unit cube [0,0,0],[1,0,0],[1,1,0],[0,1,0],[0,0,1],
    [1,0,1],[1,1,1],[0,1,1]); mirrored (left-handed) corner sets are accepted too. Degenerate boxes
    (non-planar faces, zero-area faces, non-finite corners) get IoU 0 and a `DegenerateBoxWarning`.
    """
    a = _as_corners(corners_a, "corners_a")
    b = _as_corners(corners_b, "corners_b")
    ious = np.zeros((a.shape[0], b.shape[0]), dtype=np.float64)
    if ious.size == 0:
        return ious
    ok_a, ok_b, a, b = _checked(a, b)
    pa_all, pb_all = _planes(a), _planes(b)
    lo_a, hi_a = pa_all[0].min(axis=1), pa_all[0].max(axis=1)
    lo_b, hi_b = pb_all[0].min(axis=1), pb_all[0].max(axis=1)
    overlap = ((lo_a[:, None] < hi_b[None]) & (lo_b[None] < hi_a[:, None])).all(axis=2)
    overlap &= ok_a[:, None] & ok_b[None, :]
    ia, jb = np.nonzero(overlap)
    if ia.size:
        ious[ia, jb] = _pair_ious(pa_all, pb_all, _volumes(pa_all), _volumes(pb_all), ia, jb)
    return ious


def iou_3d_pairs(corners_a: object, corners_b: object) -> np.ndarray:
    """IoU (K,) of corresponding boxes a[k], b[k]: many small IoU matrices (one per image and category)
    computed in one vectorised call instead of thousands of tiny ones."""
    a = _as_corners(corners_a, "corners_a")
    b = _as_corners(corners_b, "corners_b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"iou_3d_pairs needs as many boxes on both sides, got {a.shape[0]} and {b.shape[0]}")
    out = np.zeros(a.shape[0])
    if out.size == 0:
        return out
    ok_a, ok_b, a, b = _checked(a, b)
    pa_all, pb_all = _planes(a), _planes(b)
    lo_a, hi_a = pa_all[0].min(axis=1), pa_all[0].max(axis=1)
    lo_b, hi_b = pb_all[0].min(axis=1), pb_all[0].max(axis=1)
    k = np.nonzero(((lo_a < hi_b) & (lo_b < hi_a)).all(axis=1) & ok_a & ok_b)[0]
    if k.size:
        out[k] = _pair_ious(pa_all, pb_all, _volumes(pa_all), _volumes(pb_all), k, k)
    return out
