"""Throughput of `model.eval.iou_3d` (pairs/s) next to a scipy baseline (half-space intersection + hull).

Run: .venv/bin/python bench/iou3d.py [--dets 100 --gts 50 --repeats 5]
Two scenes of one image: "crowded" (every detection overlaps most GT: the worst case, nothing is
skipped) and "sparse" (objects spread over a room, as in a real image: most pairs are disjoint and
skipped by the bounding-box test). The baseline computes each overlapping pair separately with
scipy.spatial.HalfspaceIntersection (interior point by linprog) and ConvexHull volumes; it also
serves as a correctness check (max |difference| is printed).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection
from scipy.spatial.transform import Rotation

from model.eval import iou_3d

UNIT = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], float)


def boxes(n: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    R = Rotation.random(n, random_state=seed).as_matrix()
    centers = rng.normal(0, spread, (n, 3)) + [0, 0, 6]
    dims = rng.uniform(0.4, 2.0, (n, 3))
    return np.einsum("nij,nkj->nki", R, (UNIT[None] - 0.5) * dims[:, None]) + centers[:, None]


def scipy_iou(a: np.ndarray, b: np.ndarray) -> float:
    ha, hb = ConvexHull(a), ConvexHull(b)
    eqs = np.vstack([ha.equations, hb.equations])
    A, off = eqs[:, :3], eqs[:, 3]
    res = linprog(
        np.r_[0, 0, 0, -1], A_ub=np.c_[A, np.linalg.norm(A, axis=1)], b_ub=-off, bounds=[(None, None)] * 3 + [(0, None)]
    )
    if res.x is None or res.x[3] < 1e-9:
        return 0.0
    inter = ConvexHull(HalfspaceIntersection(eqs, res.x[:3]).intersections).volume
    return inter / (ha.volume + hb.volume - inter)


def scipy_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    lo_a, hi_a, lo_b, hi_b = a.min(1), a.max(1), b.min(1), b.max(1)
    for i in range(len(a)):
        for j in range(len(b)):
            if np.all(lo_a[i] < hi_b[j]) and np.all(lo_b[j] < hi_a[i]):  # same bounding-box skip as ours
                out[i, j] = scipy_iou(a[i], b[j])
    return out


def timeit(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dets", type=int, default=100)
    ap.add_argument("--gts", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print("| scene | pairs | overlapping | ours s | ours pairs/s | scipy s | scipy pairs/s | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, spread in (("crowded", 0.5), ("sparse", 3.0)):
        a, b = boxes(args.dets, spread, 1), boxes(args.gts, spread, 2)
        ours = timeit(lambda a=a, b=b: iou_3d(a, b), args.repeats)
        ref_t = timeit(lambda a=a, b=b: scipy_iou_matrix(a, b), 1)
        got, ref = iou_3d(a, b), scipy_iou_matrix(a, b)
        n = a.shape[0] * b.shape[0]
        print(
            f"| {name} | {n} | {(ref > 0).sum()} | {ours:.3f} | {n / ours:,.0f} | {ref_t:.2f} | {n / ref_t:,.0f} "
            f"| {ref_t / ours:.0f}x | {np.abs(got - ref).max():.1e} |"
        )


if __name__ == "__main__":
    main()
