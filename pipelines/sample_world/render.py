"""Render a `Scene` with Open3D's RaycastingScene: RGB, metric depth, instance labels, object analysis.

Open3D finds which surface each pixel's ray hits first (float32, Embree); the depth itself is then
recomputed in float64 from the exact plane of the hit triangle, so depth maps are exact up to the
millimetre quantization of the PNG, which is what the tests hold them to.

Pixel convention (OpenCV): pixel (i, j) is centred at continuous image coordinate (i, j), so its
ray is K^-1 [i, j, 1]; a standard back-projection `X = (u - cx) z / fx` with u = column index lands
exactly on the rendered surface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.sample_world.catalog import FLOOR_RGB, WALL_RGB
from pipelines.sample_world.scene import Scene

# Box triangles over corners indexed by bits (x, y, z) = (i>>2, i>>1, i&1), with each face's outward normal.
_BOX_FACES = (  # (corner indices of a quad, outward local normal)
    ((0, 1, 3, 2), (-1.0, 0.0, 0.0)),
    ((4, 6, 7, 5), (1.0, 0.0, 0.0)),
    ((0, 4, 5, 1), (0.0, -1.0, 0.0)),
    ((2, 3, 7, 6), (0.0, 1.0, 0.0)),
    ((0, 2, 6, 4), (0.0, 0.0, -1.0)),
    ((1, 5, 7, 3), (0.0, 0.0, 1.0)),
)
_LIGHT = np.array([0.35, -0.45, 0.82])
_LIGHT = _LIGHT / np.linalg.norm(_LIGHT)


@dataclass
class Raycaster:
    """An Open3D scene plus, per geometry, its triangles' exact float64 planes and base colours."""

    scene: object  # open3d.t.geometry.RaycastingScene
    label_of_geom: np.ndarray  # geometry id -> instance label (0 = room, i + 1 = object i)
    planes: list[np.ndarray]  # per geometry: (n_tri, 4) unit normal (facing into the room / outward) and offset
    base_rgb: list[np.ndarray]  # per geometry: (n_tri, 3) float colour
    boxes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per object: (center, R local->world, half extents)
    room: np.ndarray  # (Lx, Ly, wall height)


def _quad_mesh(quads: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    verts, tris = [], []
    for q in quads:
        b = len(verts)
        verts.extend(q)
        tris.extend([(b, b + 1, b + 2), (b, b + 2, b + 3)])
    return np.asarray(verts, dtype=np.float64), np.asarray(tris, dtype=np.uint32)


def build_raycaster(scene: Scene) -> Raycaster:
    """Floor, four walls (no ceiling: rays leaving the room give depth 0 = invalid) and the objects."""
    import open3d as o3d

    rs = o3d.t.geometry.RaycastingScene()
    labels, planes, colours = [], [], []

    def add(verts: np.ndarray, tris: np.ndarray, normals: np.ndarray, rgb: np.ndarray, label: int) -> None:
        gid = rs.add_triangles(o3d.core.Tensor(verts.astype(np.float32)), o3d.core.Tensor(tris))
        assert gid == len(labels)
        p0 = verts[tris[:, 0]]
        planes.append(np.concatenate([normals, np.einsum("ij,ij->i", normals, p0)[:, None]], axis=1))
        colours.append(rgb)
        labels.append(label)

    hx, hy, hz = scene.room / 2
    hz = scene.room[2]
    floor = np.array([[-hx, -hy, 0], [hx, -hy, 0], [hx, hy, 0], [-hx, hy, 0]], dtype=np.float64)
    v, t = _quad_mesh([floor])
    n = np.tile([0.0, 0.0, 1.0], (len(t), 1))
    add(v, t, n, np.tile(np.array(FLOOR_RGB, float), (len(t), 1)), 0)
    walls = [
        (np.array([[-hx, -hy, 0], [-hx, hy, 0], [-hx, hy, hz], [-hx, -hy, hz]]), (1.0, 0.0, 0.0)),
        (np.array([[hx, -hy, 0], [hx, hy, 0], [hx, hy, hz], [hx, -hy, hz]]), (-1.0, 0.0, 0.0)),
        (np.array([[-hx, -hy, 0], [hx, -hy, 0], [hx, -hy, hz], [-hx, -hy, hz]]), (0.0, 1.0, 0.0)),
        (np.array([[-hx, hy, 0], [hx, hy, 0], [hx, hy, hz], [-hx, hy, hz]]), (0.0, -1.0, 0.0)),
    ]
    for k, (q, nn) in enumerate(walls):
        v, t = _quad_mesh([q.astype(np.float64)])
        shade = np.array(WALL_RGB, float) * (1.0 - 0.04 * k)
        add(v, t, np.tile(nn, (len(t), 1)), np.tile(shade, (len(t), 1)), 0)

    bits = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64)
    for o in scene.objects:
        corners = ((bits - 0.5) * o.size) @ o.R.T + o.center
        quads = [corners[list(idx)] for idx, _ in _BOX_FACES]
        v, t = _quad_mesh(quads)
        n = np.repeat(np.array([nn for _, nn in _BOX_FACES]) @ o.R.T, 2, axis=0)
        add(v, t, n, np.tile(np.array(o.rgb, float), (len(t), 1)), o.index + 1)
    boxes = [(o.center.astype(np.float64), o.R, o.size / 2.0) for o in scene.objects]
    return Raycaster(rs, np.asarray(labels, dtype=np.int32), planes, colours, boxes, scene.room.astype(np.float64))


def camera_rays(K: np.ndarray, cam2world: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel world ray directions (H, W, 3) with unit camera-z component, and the origin (3,)."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    Kinv = np.linalg.inv(K)
    d_cam = np.stack([u, v, np.ones_like(u)], axis=-1) @ Kinv.T
    d_cam = d_cam / d_cam[..., 2:3]
    return d_cam @ cam2world[:3, :3].T, cam2world[:3, 3].copy()


@dataclass
class Render:
    rgb: np.ndarray | None  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float64 metres along camera z; 0 = no hit
    label: np.ndarray  # (H, W) uint8 instance label (0 = room or nothing)


def render(rc: Raycaster, K: np.ndarray, cam2world: np.ndarray, width: int, height: int, colour: bool = True) -> Render:
    """Cast one ray per pixel; depth is the exact float64 distance along camera z to the hit plane."""
    import open3d as o3d

    dirs, origin = camera_rays(K, cam2world, width, height)
    flat = dirs.reshape(-1, 3)
    rays = np.concatenate([np.broadcast_to(origin, flat.shape), flat], axis=1).astype(np.float32)
    hit = rc.scene.cast_rays(o3d.core.Tensor(rays))
    gid = hit["geometry_ids"].numpy().astype(np.int64)
    pid = hit["primitive_ids"].numpy().astype(np.int64)
    valid = gid != int(rc.scene.INVALID_ID)
    offsets = np.cumsum([0] + [len(p) for p in rc.planes])
    planes = np.concatenate([*rc.planes, np.zeros((1, 4))])  # last row: "no hit"
    bases = np.concatenate([*rc.base_rgb, np.zeros((1, 3))])
    labels = np.concatenate([np.repeat(rc.label_of_geom, np.diff(offsets)), [0]]).astype(np.uint8)
    tri = np.where(valid, offsets[np.where(valid, gid, 0)] + pid, len(planes) - 1)  # global triangle index
    plane, base, label = planes[tri], bases[tri], labels[tri]
    depth = np.zeros(flat.shape[0])
    n, off = plane[:, :3], plane[:, 3]
    denom = np.einsum("ij,ij->i", n, flat)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (off - n @ origin) / denom  # camera-z depth, since every direction has camera z = 1
    # Embree (float32) decides what is hit; the depth is then recomputed in float64 on the whole solid,
    # so a ray grazing an edge gets the true entry point, not its triangle's plane extended.
    for k in np.unique(label[valid]):
        m = valid & (label == k)
        if k == 0:
            exact, up = _room_exit(flat[m], origin, rc.room)
            t[m] = np.where(up, np.nan, exact)
        else:
            c, R, half = rc.boxes[k - 1]
            exact = ray_box_entry(flat[m], origin, c, R, half)
            t[m] = np.where(np.isfinite(exact), exact, t[m])
    ok = valid & np.isfinite(t) & (t > 0)
    depth[ok] = t[ok]
    label[~ok] = 0
    rgb = None
    if colour:
        lam = np.abs(n @ _LIGHT)  # two-sided: the visible side of a face faces the camera
        shade = 0.45 + 0.55 * lam
        pts = origin + flat * depth[:, None]
        floor = ok & (label == 0) & (np.abs(n[:, 2] - 1.0) < 1e-9)
        checker = ((np.floor(pts[:, 0] / 0.5) + np.floor(pts[:, 1] / 0.5)) % 2 == 0) & floor
        shade = shade * np.where(checker, 0.9, 1.0)
        fog = np.exp(-0.03 * depth)
        col = base * (shade * fog)[:, None]
        col[~ok] = (235.0, 240.0, 250.0)  # open sky above the walls
        rgb = np.clip(np.rint(col), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return Render(rgb, depth.reshape(height, width), label.reshape(height, width))


def _room_exit(d: np.ndarray, origin: np.ndarray, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where rays from inside the room leave it: exit t, and whether that is through the open top."""
    lo = np.array([-room[0] / 2, -room[1] / 2, 0.0])
    hi = np.array([room[0] / 2, room[1] / 2, room[2]])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d > 0, (hi - origin) / d, np.where(d < 0, (lo - origin) / d, np.inf))
    axis = np.argmin(t, axis=1)
    exit_t = t[np.arange(len(t)), axis]
    return exit_t, (axis == 2) & (d[:, 2] > 0)


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres (0 = invalid; depths beyond 65.535 m become invalid)."""
    mm = np.rint(depth_m * 1000.0)
    mm[(mm <= 0) | (mm > 65535) | ~np.isfinite(mm)] = 0
    return mm.astype(np.uint16)


def relative_depth_vis(depth_m: np.ndarray) -> np.ndarray:
    """RefSpatial-style relative depth: disparity min-max normalised to 1..255 (nearer brighter), 0 = invalid, 3 channels."""
    ok = depth_m > 0
    out = np.zeros(depth_m.shape, dtype=np.uint8)
    if ok.any():
        disp = np.zeros_like(depth_m)
        disp[ok] = 1.0 / depth_m[ok]
        lo, hi = disp[ok].min(), disp[ok].max()
        scale = 254.0 / (hi - lo) if hi > lo else 0.0
        out[ok] = np.rint(1.0 + (disp[ok] - lo) * scale).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


# ---------------------------------------------------------------------------------------------------
# Per-object analysis in one view (exact, float64): silhouette, visibility, 2D boxes.


def ray_box_entry(dirs: np.ndarray, origin: np.ndarray, center: np.ndarray, R: np.ndarray,
                  half: np.ndarray) -> np.ndarray:
    """Slab test: entry t (> 0) of rays origin + t * dirs into an oriented box, NaN where missed.

    `R` maps box-local to world, `half` the local half-extents. With camera-z-normalised directions
    t is the camera-z depth of the entry point.
    """
    o = R.T @ (origin - center)
    d = dirs.reshape(-1, 3) @ R
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o) / d
        t2 = (half - o) / d
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    entry = np.where(tmin > 0, tmin, tmax)
    hit = (tmax >= tmin) & (tmax > 0)
    return np.where(hit, entry, np.nan).reshape(dirs.shape[:-1])


def clip_box_near(corners_cam: np.ndarray, near: float) -> np.ndarray:
    """Vertices of (box ∩ {z >= near}): kept corners plus edge/plane intersections (camera frame)."""
    pts = [c for c in corners_cam if c[2] >= near]
    for i in range(8):
        for j in range(i + 1, 8):
            a, b = corners_cam[i], corners_cam[j]
            if bin(i ^ j).count("1") != 1:  # corners indexed by bits: one differing bit = an edge
                continue
            if (a[2] - near) * (b[2] - near) < 0:
                s = (near - a[2]) / (b[2] - a[2])
                pts.append(a + s * (b - a))
    return np.asarray(pts).reshape(-1, 3)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """2D convex hull (Andrew's monotone chain), counter-clockwise, no repeated end point."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.asarray(pts).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1])


def clip_polygon_rect(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon to an axis-aligned rectangle."""
    out = [tuple(p) for p in poly]
    for axis, bound, keep_ge in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if not out:
            break
        src, out = out, []
        for k in range(len(src)):
            cur, prev = src[k], src[k - 1]
            cin = cur[axis] >= bound if keep_ge else cur[axis] <= bound
            pin = prev[axis] >= bound if keep_ge else prev[axis] <= bound
            if cin != pin:
                s = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + s * (cur[0] - prev[0]), prev[1] + s * (cur[1] - prev[1])))
            if cin:
                out.append(cur)
    return np.asarray(out).reshape(-1, 2)


def silhouette_box(corners_bits_cam: np.ndarray, K: np.ndarray, width: int, height: int,
                   near: float = 1e-3) -> list[float] | None:
    """Tight box of the projected cuboid silhouette truncated to the image [0, W] x [0, H] (None: outside).

    Exactly what Omni3D's `bbox2D_trunc` is (the tight box of the rendered cuboid mesh), computed
    analytically: the part of the box in front of the camera, projected, convex hull, clipped.
    """
    pts = clip_box_near(corners_bits_cam, near)
    if len(pts) == 0:
        return None
    uv = (pts @ K.T)[:, :2] / pts[:, 2:3]
    hull = convex_hull(uv)
    if len(hull) < 3:
        return None
    clipped = clip_polygon_rect(hull, 0.0, 0.0, float(width), float(height))
    if len(clipped) < 3:
        return None
    x0, y0 = clipped.min(axis=0)
    x1, y1 = clipped.max(axis=0)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [float(x0), float(y0), float(x1), float(y1)]


def rect_intersection_area(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)
