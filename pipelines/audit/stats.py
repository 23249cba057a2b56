"""The audit's thresholds and small statistics: robust z-scores, histograms, summaries, Wilson intervals."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipelines.audit.load import BuildData

IOU_THRESHOLD = 0.5
ROBUST_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
# MAD floors on log values. A category's sizes naturally vary by tens of percent, and a build often
# holds the same few objects seen from many views (MAD ~ 0): without a floor a 10% larger desk would
# be an "outlier". With these floors a flag needs a side ~2.8x (volume ~13x, depth ~2.8x) off the median.
LOG_MIN_MAD = 0.2
LOG_VOLUME_MIN_MAD = 0.5
MIN_GROUP_FOR_Z = 5  # fewer values than this: a MAD is meaningless, no z-score outliers
IOU_EDGES = [round(0.05 * i, 2) for i in range(21)]
STAGE_ORDER = ["read", "det3d_read", "read_frame", "tag", "verify", "assign", "rewrite", "det3d_convert",
               "sample_points", "verbalize", "compose"]
GROUNDED = ("grounded", "coreferent")
MAX_LISTED = 200  # outliers / worst examples listed per table in audit.json
MAX_SCATTER = 20000  # objects drawn in the depth/volume scatter


# ============================================================================ small helpers
def robust_z(x: Sequence[float] | np.ndarray, min_mad: float = 0.0) -> np.ndarray:
    """Modified z-score 0.6745 (x - median) / MAD: outlier scores that a few outliers cannot mask.

    `min_mad` floors the MAD: the same object seen in many views has nearly identical sizes, and a
    MAD of float noise would make a 1 mm difference an "outlier" (see LOG_MIN_MAD). With
    MAD = 0 and no floor the mean absolute deviation stands in (x 1.2533, the normal-consistent
    factor); if that is 0 too every score is 0.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return a
    med = np.median(a)
    mad = max(float(np.median(np.abs(a - med))), min_mad)
    if mad > 0:
        return 0.6745 * (a - med) / mad
    meanad = np.mean(np.abs(a - med))
    if meanad > 0:
        return (a - med) / (1.2533 * meanad)
    return np.zeros_like(a)


def histogram(values: Iterable[float], edges: Sequence[float]) -> dict[str, list[float] | list[int]]:
    """Counts per bin [e_i, e_i+1) (the last bin closed), values outside counted in the end bins."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    v = np.clip(v, e[0], e[-1])
    counts, _ = np.histogram(v, bins=e)
    return {"edges": [float(x) for x in e], "counts": [int(c) for c in counts]}


def auto_edges(values: Sequence[float], bins: int = 30, lo: float | None = None, hi: float | None = None) -> list[float]:
    """Bin edges over [lo or p0.5, hi or p99.5] so one wild value does not flatten the histogram."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return [0.0, 1.0]
    a = float(np.quantile(v, 0.005)) if lo is None else lo
    b = float(np.quantile(v, 0.995)) if hi is None else hi
    if b <= a:
        b = a + 1.0
    return [float(x) for x in np.linspace(a, b, bins + 1)]


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    """n, mean, min, p05, median, p95, max of the finite values (None when there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "min": None, "p05": None, "median": None, "p95": None, "max": None}
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return {"n": int(v.size), "mean": float(v.mean()), "min": float(v.min()), "p05": float(q[0]),
            "median": float(q[1]), "p95": float(q[2]), "max": float(v.max())}


def _ratio(k: int, n: int) -> float | None:
    return None if n == 0 else k / n


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (default 95%); (0, 1) when n = 0.

    Why Wilson: with accuracies near 1 (the paper: 95.5% of 200) the normal interval overshoots 1
    and collapses to zero width at 100%; Wilson's stays inside [0, 1] and keeps its coverage.
    """
    if n <= 0:
        return 0.0, 1.0
    return wilson_score(k / n, n, z)


def wilson_score(p: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson interval for an observed proportion `p` over `n` (n may be an effective, fractional size)."""
    z2 = z * z
    den = 1 + z2 / n
    center = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z2 / (4 * n * n)) / den
    return max(0.0, center - half), min(1.0, center + half)


def _json_list(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def _ok_rows(b: BuildData, stage: str) -> list[dict[str, Any]]:
    return [r for r in b.intermediates.get(stage, []) if r.get("_outcome", "ok") == "ok"]
