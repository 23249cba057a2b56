"""Human review: a stratified sample of annotated boxes as a sheet to mark, and its score.

Why: on real data there is no ground truth; the paper's number (95.5% of 200 audited boxes
correct) comes from people looking at boxes. `sample_for_review` draws such a sample reproducibly
(seeded by unit id, not by order), stratified by corpus and category so rare categories are not
missed, and writes `sheet.csv` (for a spreadsheet), `sheet.parquet` (the same rows plus each crop's
PNG bytes, self-contained) and `crops/NNNN.png` (the whole image with the box, next to a zoomed
crop). A reviewer fills the `verdict` column: 1/yes/correct, 0/no/wrong, or leaves it blank
(unsure). `score_sheet` turns the marks into an accuracy with a Wilson 95% interval, plus the
stratum-weighted estimate (each stratum weighted by its share of all units).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.audit.load import AuditInputError, BuildData, load_build
from pipelines.audit.stats import wilson_interval, wilson_score

__all__ = ["CORRECT", "SHEET_COLUMNS", "WRONG", "ScoreError", "allocate", "review_units", "sample_for_review",
           "score_sheet"]

SHEET_COLUMNS = ["review_id", "unit_id", "stratum", "corpus", "dataset", "key", "index", "category", "text",
                 "rewritten", "bbox2d", "crop", "stratum_size", "stratum_sampled", "weight", "verdict", "note"]
CORRECT = frozenset({"1", "y", "yes", "correct", "c", "true", "t", "ok", "right", "good"})
WRONG = frozenset({"0", "n", "no", "wrong", "w", "false", "f", "incorrect", "bad", "x"})
UNSURE = frozenset({"", "?", "unsure", "skip", "na", "n/a"})
_CROP_H = 200


class ScoreError(ValueError):
    """A sheet that cannot be scored: unreadable, missing columns, or an unknown mark (names row and value)."""


def review_units(b: BuildData) -> list[dict[str, Any]]:
    """Every reviewable box: cot mentions and det3d objects, with what a reviewer needs to judge it."""
    out = []
    for key in sorted(b.records):
        rec = b.records[key]
        if rec["corpus"] == "cot":
            items, tag = rec.get("mentions", []), "m"
        elif rec["corpus"] == "det3d":
            items, tag = rec.get("objects", []), "o"
        else:
            continue
        for i, it in enumerate(items):
            out.append({"unit_id": f"{key}#{tag}{i}", "corpus": rec["corpus"], "dataset": rec["source"]["dataset"],
                        "key": key, "index": i, "category": it["category"],
                        "text": it.get("text", it["category"]), "rewritten": it.get("rewritten"),
                        "bbox2d": [float(v) for v in it["bbox2d"]], "stratum": f"{rec['corpus']}/{it['category']}"})
    return out


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Sample size per stratum: proportional (largest remainder), at least one per stratum when n allows,
    never more than the stratum holds. Deterministic (ties by stratum name)."""
    total = sum(sizes.values())
    n = min(n, total)
    names = sorted(s for s in sizes if sizes[s] > 0)
    if n <= 0 or not names:
        return {s: 0 for s in sizes}
    q = {s: 0 for s in names}
    if n >= len(names):
        for s in names:
            q[s] = 1
    left = n - sum(q.values())
    while left > 0:
        room = {s: sizes[s] - q[s] for s in names if sizes[s] > q[s]}
        cap = sum(sizes[s] for s in room)
        exact = {s: left * sizes[s] / cap for s in room}
        add = {s: min(room[s], int(math.floor(exact[s]))) for s in room}
        if sum(add.values()) == 0:  # hand out one at a time by largest remainder
            best = sorted(room, key=lambda s: (-(exact[s] - math.floor(exact[s])), -sizes[s], s))[0]
            add[best] = 1
        for s, a in add.items():
            q[s] += a
        left -= sum(add.values())
    return {s: q.get(s, 0) for s in sizes}


def _crop_png(image_bytes: bytes, box: Sequence[float], color: tuple[int, int, int] = (255, 40, 40)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    W, H = img.size
    x1, y1, x2, y2 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
    full = img.copy()
    ImageDraw.Draw(full).rectangle([x1, y1, x2, y2], outline=color, width=max(2, round(W / 200)))
    s = _CROP_H / H
    full = full.resize((max(1, round(W * s)), _CROP_H), Image.BILINEAR)
    mx, my = max(16.0, 0.3 * (x2 - x1)), max(16.0, 0.3 * (y2 - y1))
    cx1, cy1 = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    cx2, cy2 = min(W, math.ceil(x2 + mx)), min(H, math.ceil(y2 + my))
    crop = img.crop((cx1, cy1, max(cx1 + 1, cx2), max(cy1 + 1, cy2)))
    ImageDraw.Draw(crop).rectangle([x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1], outline=color, width=2)
    cs = _CROP_H / crop.size[1]
    crop = crop.resize((max(1, min(3 * _CROP_H, round(crop.size[0] * cs))), _CROP_H), Image.BILINEAR)
    sheet = Image.new("RGB", (full.size[0] + 8 + crop.size[0], _CROP_H), (255, 255, 255))
    sheet.paste(full, (0, 0))
    sheet.paste(crop, (full.size[0] + 8, 0))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def sample_for_review(build_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, n: int = 200,
                      seed: int = 0, verify: bool = True) -> dict[str, Any]:
    """Draw `n` units stratified by (corpus, category) and write the review sheet to `out_dir`.

    Returns a summary (units, strata, sampled, files). Same build + n + seed -> same sheet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    b = load_build(build_dir, verify=verify, intermediates=False, find_gt=False)
    units = review_units(b)
    if not units:
        raise AuditInputError(f"{b.root}: no reviewable boxes (no cot mentions or det3d objects)")
    by_stratum: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for u in units:
        by_stratum[u["stratum"]].append(u)
    quota = allocate({s: len(v) for s, v in by_stratum.items()}, n)

    def rank(u: Mapping[str, Any]) -> str:
        return hashlib.sha256(f"gr3d-review:{seed}:{u['unit_id']}".encode()).hexdigest()

    picked = []
    for s in sorted(by_stratum):
        for u in sorted(by_stratum[s], key=rank)[: quota[s]]:
            picked.append({**u, "stratum_size": len(by_stratum[s]), "stratum_sampled": quota[s],
                           "weight": len(by_stratum[s]) / quota[s]})
    picked.sort(key=rank)  # reviewers see strata interleaved, not one category after another
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    rows, crops = [], []
    images: dict[str, bytes] = {}
    for rid, u in enumerate(picked, start=1):
        if u["key"] not in images:
            sample = b.read_sample(u["key"])
            images = {u["key"]: sample[sample["json"]["image"]["ext"]]}  # one image at a time: memory stays flat
        png = _crop_png(images[u["key"]], u["bbox2d"])
        rel = f"crops/{rid:04d}.png"
        (out / rel).write_bytes(png)
        crops.append(png)
        rows.append({"review_id": rid, "unit_id": u["unit_id"], "stratum": u["stratum"], "corpus": u["corpus"],
                     "dataset": u["dataset"], "key": u["key"], "index": u["index"], "category": u["category"],
                     "text": u["text"], "rewritten": u["rewritten"] or "", "bbox2d": json.dumps(u["bbox2d"]),
                     "crop": rel, "stratum_size": u["stratum_size"], "stratum_sampled": u["stratum_sampled"],
                     "weight": u["weight"], "verdict": "", "note": ""})
    with open(out / "sheet.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        wr.writeheader()
        wr.writerows(rows)
    table = pa.Table.from_pylist([{**r, "crop_png": c} for r, c in zip(rows, crops)])
    pq.write_table(table, out / "sheet.parquet")
    (out / "README.txt").write_text(
        "Review sheet of a GR3D build (gr3d audit sample).\n"
        f"build: {b.root}\nunits: {len(units)}  sampled: {len(rows)}  seed: {seed}\n\n"
        "For each row open crops/NNNN.png (left: the image with the box, right: zoomed) and read `text`\n"
        "(and `rewritten`). In the `verdict` column write 1 if the box is the object the text names\n"
        "(tight enough that you would accept it as its box), 0 if not; leave it blank if you cannot tell.\n"
        "Then: gr3d audit score sheet.csv\n", encoding="utf-8")
    return {"build": str(b.root), "units": len(units), "strata": len(by_stratum), "sampled": len(rows),
            "seed": seed, "files": {"csv": str(out / "sheet.csv"), "parquet": str(out / "sheet.parquet"),
                                    "crops": str(out / "crops")}}


def _read_sheet(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        for name in ("sheet.csv", "sheet.parquet"):
            if (path / name).is_file():
                return _read_sheet(path / name)
        raise ScoreError(f"{path}: no sheet.csv or sheet.parquet in this directory")
    if not path.is_file():
        raise ScoreError(f"{path}: no such sheet")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=None).to_pylist()
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        raise ScoreError(f"{path}: unreadable sheet: {e}") from e
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for a non-Parquet file
        raise ScoreError(f"{path}: unreadable sheet: {type(e).__name__}: {e}") from e


def _mark(v: Any, row: int, path: Path) -> bool | None:
    s = "" if v is None else str(v).strip().lower()
    if s in CORRECT:
        return True
    if s in WRONG:
        return False
    if s in UNSURE:
        return None
    raise ScoreError(f"{path}: row {row}: verdict {v!r} is not a mark; use 1/yes/correct, 0/no/wrong, or leave it blank")


def score_sheet(sheet: str | os.PathLike[str], *, z: float = 1.959963984540054) -> dict[str, Any]:
    """Accuracy of a marked sheet with its Wilson interval (default 95%), overall, weighted and per stratum.

    The weighted estimate sum_h (N_h / N) p_h corrects for the rounding of the stratified allocation;
    its interval is Wilson's at the Kish effective sample size p(1 - p) / Var.
    """
    path = Path(sheet)
    rows = _read_sheet(path)
    if not rows:
        raise ScoreError(f"{path}: the sheet has no rows")
    missing = {"verdict", "stratum"} - set(rows[0])
    if missing:
        raise ScoreError(f"{path}: missing column(s) {sorted(missing)}; expected the columns of `gr3d audit sample`")
    marks = [(r, _mark(r.get("verdict"), i + 2, path)) for i, r in enumerate(rows)]
    done = [(r, m) for r, m in marks if m is not None]
    if not done:
        raise ScoreError(f"{path}: no row is marked (fill the verdict column: 1 correct, 0 wrong)")
    k = sum(1 for _, m in done if m)
    n = len(done)
    lo, hi = wilson_interval(k, n, z)
    strata: dict[str, dict[str, Any]] = {}
    for r, m in done:
        s = strata.setdefault(str(r["stratum"]), {"n": 0, "correct": 0, "size": None})
        s["n"] += 1
        s["correct"] += int(m)
        if r.get("stratum_size") not in (None, ""):
            s["size"] = int(float(r["stratum_size"]))
    per = []
    for name, s in sorted(strata.items()):
        slo, shi = wilson_interval(s["correct"], s["n"], z)
        per.append({"stratum": name, "n": s["n"], "correct": s["correct"], "accuracy": s["correct"] / s["n"],
                    "ci_low": slo, "ci_high": shi, "size": s["size"]})
    weighted = None
    if all(p["size"] for p in per):
        total = sum(p["size"] for p in per)
        pw = sum(p["size"] / total * p["accuracy"] for p in per)
        var = sum((p["size"] / total) ** 2 * p["accuracy"] * (1 - p["accuracy"]) / p["n"] for p in per)
        n_eff = pw * (1 - pw) / var if var > 0 else float(n)
        wlo, whi = wilson_score(pw, n_eff, z)
        weighted = {"accuracy": pw, "ci_low": wlo, "ci_high": whi, "n_effective": n_eff}
    return {"sheet": str(path), "rows": len(rows), "marked": n, "unmarked": len(rows) - n, "correct": k,
            "accuracy": k / n, "ci_low": lo, "ci_high": hi, "confidence": 0.95 if abs(z - 1.96) < 0.01 else None,
            "method": "wilson", "weighted": weighted, "per_stratum": per}

