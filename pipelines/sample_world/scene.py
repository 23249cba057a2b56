"""Procedural indoor scenes: a room, furniture-like cuboids and posed pinhole cameras (numpy only).

This module is the ground truth. Everything else (renders, Omni3D / EmbodiedScan / RefSpatial
files) is derived from the `Scene` built here, so a test can compare any written field with the
exact value it should have. The world frame is EmbodiedScan's aligned frame: z up, metres, the room
centred on the origin with the floor at z = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines.sample_world.catalog import COLOURS, FLOOR_CATEGORIES, MAX_OBJECTS, TOP_CATEGORIES, Category
from schemas.geometry import euler_zxy_to_matrix, matrix_to_euler_zxy

WALL_HEIGHT = 2.8
_FLOOR_WEIGHTS = {"chair": 3.0, "table": 1.5, "box": 1.5, "bin": 1.0, "lamp": 1.0}
# Proper signed permutations used to write some EmbodiedScan boxes in an equivalent, non-canonical form
# (like real files, where walls and many objects carry beta = +-pi/2): new local axes expressed in old ones.
_ALT_FORMS = (
    np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),  # local y <-> z: beta = -pi/2
    np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]),  # quarter turn about z: alpha shifted, x/y sizes swapped
    np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]),  # cyclic x -> y -> z
)


@dataclass
class Obj:
    """One cuboid object. `size` = (length, width, height) = extents along local x, y, z (z up)."""

    index: int
    category: str
    colour: str
    rgb: tuple[int, int, int]
    center: np.ndarray  # world, z-up, metres (gravity centre)
    size: np.ndarray  # (l, w, h)
    yaw: float  # rotation about world z, radians
    support: int | None = None  # index of the object it stands on
    touching: list[str] = field(default_factory=list)  # "wall", "floor", or "obj:<index>"
    bbox_id: int = 0  # EmbodiedScan bbox_id (not its position in the list)
    es_form: int = -1  # -1: written as (l, w, h, yaw, 0, 0); else index into _ALT_FORMS

    @property
    def R(self) -> np.ndarray:
        """Local -> world rotation (yaw about z)."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])

    def corners_world(self) -> np.ndarray:
        """8 world corners (any order; used for containment and projection checks)."""
        bits = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64)
        return ((bits - 0.5) * self.size) @ self.R.T + self.center

    def footprint(self) -> np.ndarray:
        """4 floor-plane corners (x, y) of the object's footprint, counter-clockwise."""
        l, w = self.size[0] / 2, self.size[1] / 2
        local = np.array([[-l, -w], [l, -w], [l, w], [-l, w]])
        return local @ self.R[:2, :2].T + self.center[:2]

    def es_bbox_3d(self) -> list[float]:
        """EmbodiedScan 9-DoF box [cx, cy, cz, x_size, y_size, z_size, alpha, beta, gamma] of this object.

        Objects with `es_form >= 0` are written in an equivalent but non-canonical form (permuted sizes,
        non-zero beta/gamma): the same 8 corners, as in real files.
        """
        if self.es_form < 0:
            return [*map(float, self.center), *map(float, self.size), float(self.yaw), 0.0, 0.0]
        P = _ALT_FORMS[self.es_form]
        R_new = self.R @ P
        sizes = np.abs(P).T @ self.size
        a, b, g = matrix_to_euler_zxy(R_new)
        assert np.allclose(euler_zxy_to_matrix(a, b, g), R_new, atol=1e-12)
        return [*map(float, self.center), *map(float, sizes), a, b, g]


@dataclass
class View:
    """One posed colour camera (+ the depth sensor that shares its pose)."""

    index: int
    K: np.ndarray  # 3x3 colour intrinsics
    width: int
    height: int
    cam2world: np.ndarray  # 4x4, OpenCV camera (x right, y down, z forward) -> aligned world
    depth_K: np.ndarray  # 3x3 intrinsics of the half-resolution depth sensor
    depth_width: int
    depth_height: int


@dataclass
class Scene:
    index: int
    scene_id: str
    room: np.ndarray  # (Lx, Ly, wall height)
    objects: list[Obj]
    views: list[View]
    axis_align_matrix: np.ndarray  # 4x4 raw scan frame -> aligned world
    per_view_intrinsics: bool  # colour K varies per view (zoom); written per image in EmbodiedScan


def _sample(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _separation(a: np.ndarray, b: np.ndarray) -> float:
    """Signed separation of two convex polygons (SAT): > 0 apart, 0 touching, < 0 overlapping."""
    best = -math.inf
    for poly in (a, b):
        for i in range(len(poly)):
            e = poly[(i + 1) % len(poly)] - poly[i]
            n = np.array([-e[1], e[0]]) / math.hypot(e[0], e[1])
            pa, pb = a @ n, b @ n
            best = max(best, pb.min() - pa.max(), pa.min() - pb.max())
    return best


def _inside_room(fp: np.ndarray, room: np.ndarray, margin: float = 0.0) -> bool:
    hx, hy = room[0] / 2 - margin, room[1] / 2 - margin
    return bool(np.all(np.abs(fp[:, 0]) <= hx + 1e-9) and np.all(np.abs(fp[:, 1]) <= hy + 1e-9))


def _pick_category(rng: np.random.Generator, pool: tuple[Category, ...]) -> Category:
    w = np.array([_FLOOR_WEIGHTS.get(c.name, 1.0) for c in pool])
    return pool[int(rng.choice(len(pool), p=w / w.sum()))]


def _place_floor_object(
    rng: np.random.Generator, cat: Category, objs: list[Obj], room: np.ndarray, index: int, colour: tuple
) -> Obj | None:
    size = np.array([_sample(rng, cat.length), _sample(rng, cat.width), _sample(rng, cat.height)])
    for _ in range(60):
        touching: list[str] = ["floor"]
        partner: int | None = None
        mode = rng.uniform()
        floor_objs = [o for o in objs if o.support is None]
        if mode < cat.against_wall:
            wall = int(rng.integers(4))
            normal = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)][wall]  # inward normal
            yaw = math.atan2(-normal[0], normal[1])  # local +y (the object's front) points into the room
            half_span = (room[1] if wall < 2 else room[0]) / 2 - size[0] / 2 - 0.05
            if half_span <= 0:
                continue
            along = float(rng.uniform(-half_span, half_span))
            off = (room[0] if wall < 2 else room[1]) / 2 - size[1] / 2  # back face exactly on the wall
            if wall < 2:
                cxy = (-normal[0] * off, along)
            else:
                cxy = (along, -normal[1] * off)
            touching.append("wall")
        elif floor_objs and mode < cat.against_wall + 0.3 * (1 - cat.against_wall):
            p = floor_objs[int(rng.integers(len(floor_objs)))]
            side = 1.0 if rng.uniform() < 0.5 else -1.0
            yaw = p.yaw + (math.pi if rng.uniform() < 0.5 else 0.0)
            ex = p.R[:2, 0]
            ey = p.R[:2, 1]
            slide = float(rng.uniform(-0.5, 0.5)) * abs(p.size[1] - size[1])
            c = p.center[:2] + side * (p.size[0] / 2 + size[0] / 2) * ex + slide * ey  # faces flush: exactly touching
            cxy = (float(c[0]), float(c[1]))
            partner = p.index
            touching.append(f"obj:{p.index}")
        else:
            yaw = float(rng.uniform(-math.pi, math.pi))
            cxy = (float(rng.uniform(-room[0] / 2, room[0] / 2)), float(rng.uniform(-room[1] / 2, room[1] / 2)))
        o = Obj(index, cat.name, colour[0], colour[1], np.array([cxy[0], cxy[1], size[2] / 2]), size, float(yaw))
        o.touching = touching
        fp = o.footprint()
        if not _inside_room(fp, room):
            continue
        ok = True
        for q in floor_objs:
            need = 0.0 if q.index == partner else 0.08
            if _separation(fp, q.footprint()) < need - 1e-9:
                ok = False
                break
        if ok:
            if partner is not None:
                objs[partner].touching.append(f"obj:{index}")
            return o
    return None


def _place_top_object(
    rng: np.random.Generator, cat: Category, objs: list[Obj], index: int, colour: tuple
) -> Obj | None:
    supports = [o for o in objs if o.support is None and o.category in {"table", "desk", "cabinet", "night stand"}]
    if not supports:
        return None
    size = np.array([_sample(rng, cat.length), _sample(rng, cat.width), _sample(rng, cat.height)])
    for _ in range(40):
        s = supports[int(rng.integers(len(supports)))]
        rel_yaw = 0.0 if cat.name == "television" else float(rng.uniform(-math.pi, math.pi))
        yaw = s.yaw + rel_yaw
        c, si = math.cos(rel_yaw), math.sin(rel_yaw)
        # half-extents of the rotated footprint in the support's local frame
        ex = abs(c) * size[0] / 2 + abs(si) * size[1] / 2
        ey = abs(si) * size[0] / 2 + abs(c) * size[1] / 2
        if ex > s.size[0] / 2 - 0.02 or ey > s.size[1] / 2 - 0.02:
            continue
        lx = float(rng.uniform(-(s.size[0] / 2 - ex - 0.02), s.size[0] / 2 - ex - 0.02))
        ly = float(rng.uniform(-(s.size[1] / 2 - ey - 0.02), s.size[1] / 2 - ey - 0.02))
        cxy = s.center[:2] + s.R[:2, :2] @ np.array([lx, ly])
        top = s.center[2] + s.size[2] / 2
        o = Obj(index, cat.name, colour[0], colour[1], np.array([cxy[0], cxy[1], top + size[2] / 2]), size,
                float(math.atan2(math.sin(yaw), math.cos(yaw))), support=s.index, touching=[f"obj:{s.index}"])
        fp = o.footprint()
        if any(_separation(fp, q.footprint()) < 0.03 for q in objs if q.support == s.index):
            continue
        s.touching.append(f"obj:{index}")
        return o
    return None


def _look_at(eye: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """4x4 camera -> world pose of an OpenCV camera at `eye` looking at `target` (z up world), rolled."""
    f = target - eye
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 0.0, 1.0])
    r = r / np.linalg.norm(r)
    d = np.cross(f, r)
    R = np.stack([r, d, f], axis=1)
    c, s = math.cos(roll), math.sin(roll)
    R = R @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = eye
    return T


def _intrinsics(rng: np.random.Generator, width: int, height: int, hfov_deg: float) -> np.ndarray:
    fx = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
    fy = fx * (1.0 + float(rng.uniform(-0.004, 0.004)))
    cx = width / 2 + float(rng.uniform(-0.01, 0.01)) * width
    cy = height / 2 + float(rng.uniform(-0.01, 0.01)) * height
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


_HFOVS = (52.0, 60.0, 68.0, 78.0)


MIN_FLOOR_OBJECTS = 3  # a scene needs at least this many floor objects (views and RefSpatial questions)
MAX_ATTEMPTS = 64  # placement retries per scene; each attempt has its own sub-seed


class PlacementError(RuntimeError):
    """One placement attempt of a scene could not fit its objects or cameras (the scene is retried)."""


def scene_rng(seed: int, index: int, attempt: int) -> np.random.Generator:
    """The generator of placement attempt `attempt` of scene `index`.

    Attempt 0 keeps the sub-seed (seed, index, 0) that scenes have always used, so a scene that places at
    the first try is unchanged; retries get (seed, index, 0, attempt), a stream of their own. The scene is
    therefore still a function of (seed, index) alone.
    """
    key = [int(seed), int(index), 0] + ([int(attempt)] if attempt else [])
    return np.random.default_rng(np.random.SeedSequence(key))


def make_scene(seed: int, index: int, n_views: int, width: int, height: int) -> Scene:
    """Build scene `index` of a world; the scene depends only on (seed, index), never on other scenes.

    Random placement can fail (a small room, large furniture); a failed attempt is retried with the next
    sub-seed of `scene_rng`, deterministically, so any (seed, index) gives a scene.
    """
    errors: list[str] = []
    for attempt in range(MAX_ATTEMPTS):
        try:
            return _make_scene_attempt(scene_rng(seed, index, attempt), index, n_views, width, height)
        except PlacementError as e:
            errors.append(str(e))
    raise RuntimeError(f"scene {index}: placement failed in all {MAX_ATTEMPTS} attempts (last: {errors[-1]})")


def _make_scene_attempt(rng: np.random.Generator, index: int, n_views: int, width: int, height: int) -> Scene:
    room = np.array([rng.uniform(4.0, 7.0), rng.uniform(4.0, 7.0), WALL_HEIGHT])
    n_total = int(rng.integers(3, MAX_OBJECTS + 1))
    # at most n_total - MIN_FLOOR_OBJECTS objects on top: drawing up to n_total - 2 (as before) left scenes
    # with 2 floor objects, which could never reach the minimum (about 1 scene in 10 failed). The draw is
    # kept and clamped, so every scene that placed before is unchanged.
    n_top = min(int(rng.integers(0, min(3, n_total - 2) + 1)), n_total - MIN_FLOOR_OBJECTS)
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:n_total]]
    objs: list[Obj] = []
    supports = [c for c in FLOOR_CATEGORIES if c.support]
    n_floor = n_total - n_top
    for attempt in range(4 * n_floor):
        if len(objs) == n_floor:
            break
        first_support = attempt == 0 and n_top > 0
        cat = supports[int(rng.integers(len(supports)))] if first_support else _pick_category(rng, FLOOR_CATEGORIES)
        o = _place_floor_object(rng, cat, objs, room, len(objs), colours[len(objs)])
        if o is not None:
            objs.append(o)
    if len(objs) < MIN_FLOOR_OBJECTS:
        raise PlacementError(f"scene {index}: could only place {len(objs)} of {n_floor} floor objects")
    for _ in range(n_top):
        cat = TOP_CATEGORIES[int(rng.integers(len(TOP_CATEGORIES)))]
        o = _place_top_object(rng, cat, objs, len(objs), colours[len(objs)])
        if o is not None:
            objs.append(o)
    bbox_ids = rng.permutation(len(objs)) * 3 + 7
    for o, b in zip(objs, bbox_ids):
        o.bbox_id = int(b)
        o.es_form = int(rng.integers(len(_ALT_FORMS))) if rng.uniform() < 0.35 else -1

    per_view = bool(index % 2 == 1)
    base_hfov = _HFOVS[int(rng.integers(len(_HFOVS)))]
    K_scene = _intrinsics(rng, width, height, base_hfov)
    dw, dh = width // 2, height // 2
    depth_K = _intrinsics(rng, dw, dh, float(rng.uniform(62.0, 70.0)))
    theta = float(rng.uniform(-math.pi, math.pi))
    A = np.eye(4)
    A[:3, :3] = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    A[:3, 3] = [rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-0.1, 0.1)]

    views: list[View] = []
    order = rng.permutation(len(objs))
    for v in range(n_views):
        K = _intrinsics(rng, width, height, _HFOVS[int(rng.integers(len(_HFOVS)))]) if per_view else K_scene
        pose = _place_camera(rng, room, objs, objs[int(order[v % len(objs)])], K, width, height)
        views.append(View(v, K, width, height, pose, depth_K, dw, dh))
    return Scene(index, f"scene{index:04d}", room, objs, views, A, per_view)


def _place_camera(
    rng: np.random.Generator, room: np.ndarray, objs: list[Obj], focus: Obj, K: np.ndarray, W: int, H: int
) -> np.ndarray:
    """A pose inside the room, clear of objects, looking roughly at `focus` with it in the image."""
    best, best_n = None, -1
    for _ in range(200):
        # stand back from the focus object, at eye height, clear of every object
        eye = np.array([rng.uniform(-room[0] / 2 + 0.35, room[0] / 2 - 0.35),
                        rng.uniform(-room[1] / 2 + 0.35, room[1] / 2 - 0.35),
                        rng.uniform(1.2, 1.7)])  # fmt: skip
        if np.linalg.norm(eye[:2] - focus.center[:2]) < 2.0:
            continue
        if any(_point_polygon_distance(eye[:2], o.footprint()) < 0.35 for o in objs):
            continue
        target = focus.center + np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.1)])
        pose = _look_at(eye, target, math.radians(float(rng.uniform(-3.0, 3.0))))
        pitch = math.degrees(math.asin(np.clip(-pose[2, 2], -1, 1)))  # forward.z < 0 -> looking down
        if not (4.0 <= pitch <= 45.0):
            continue
        # prefer views that hold several object centres
        w2c = np.linalg.inv(pose)
        n_in = 0
        for o in objs:
            pc = w2c[:3, :3] @ o.center + w2c[:3, 3]
            if pc[2] > 0.5:
                u, v = (K @ pc)[:2] / pc[2]
                n_in += int(0 <= u < W and 0 <= v < H)
        if n_in > best_n:
            best, best_n = pose, n_in
        if n_in >= min(3, len(objs)):
            break
    if best is None:
        raise PlacementError(f"could not place a camera looking at object {focus.index}")
    return best


def _point_polygon_distance(p: np.ndarray, poly: np.ndarray) -> float:
    """Distance from a 2D point to a convex polygon (0 inside)."""
    inside = True
    dmin = math.inf
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        e = b - a
        if e[0] * (p[1] - a[1]) - e[1] * (p[0] - a[0]) < 0:
            inside = False
        t = float(np.clip(np.dot(p - a, e) / np.dot(e, e), 0.0, 1.0))
        dmin = min(dmin, float(np.linalg.norm(p - (a + t * e))))
    return 0.0 if inside else dmin
