"""Figures of the audit report: matplotlib (Agg) -> PNG bytes, and gallery images drawn with Pillow.

Each `Figure` keeps the numbers it draws (`data`), so `audit.json` holds exactly what the report
shows and a plot can be redrawn or compared without parsing pixels. Figures are small (about
750 x 330 px at 100 dpi) so a report with ~20 of them stays a few hundred KB and renders offline.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Figure", "data_uri", "draw_gallery_image", "make_figures"]

_SERIES_LABELS = {
    "written_vs_gt": "written box vs ground truth",
    "tagger_top1_vs_gt": "tagger first candidate vs ground truth",
    "tagger_best_vs_gt": "tagger best candidate vs ground truth",
    "verifier_vs_gt": "verifier's choice vs ground truth",
    "written_vs_tagger": "written box vs nearest tagger candidate",
}
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


@dataclass
class Figure:
    """One report figure: where it goes, what it says, its PNG, and the numbers it draws."""

    id: str
    section: str
    title: str
    caption: str
    png: bytes
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "section": self.section, "title": self.title, "caption": self.caption,
                "png_bytes": len(self.png), "data": self.data}


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _bars(ax: Any, labels: Sequence[str], values: Sequence[float], color: str = "#4c72b0",
          annotate: Sequence[str] | None = None) -> None:
    y = np.arange(len(labels))
    ax.barh(y, values, color=color)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    top = max([float(v) for v in values], default=0.0) or 1.0
    for i, v in enumerate(values):
        ax.text(float(v) + top * 0.01, i, annotate[i] if annotate else f"{v:g}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18)


def _hist_axes(ax: Any, h: Mapping[str, Sequence[float]], label: str | None = None, color: str | None = None,
               step: bool = False) -> None:
    e = np.asarray(h["edges"], dtype=float)
    c = np.asarray(h["counts"], dtype=float)
    if step:
        ax.stairs(c, e, label=label, color=color, linewidth=1.6)
    else:
        ax.stairs(c, e, label=label, color=color, fill=True, alpha=0.8)


def _heat(ax: Any, grid: Sequence[Sequence[int]], title: str) -> None:
    ax.imshow(np.asarray(grid, dtype=float), extent=(0, 1, 1, 0), cmap="magma", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (normalized)")
    ax.set_ylabel("y (normalized)")


# ============================================================================ sections
def _funnel_figures(f: Mapping[str, Any]) -> list[Figure]:
    plt = _plt()
    out = []
    steps = f["steps"]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(steps) + 1.0))
    _bars(ax, [s["step"] for s in steps], [s["count"] for s in steps],
          annotate=[f"{s['count']} ({100 * s['fraction']:.1f}%)" if s["fraction"] is not None else str(s["count"])
                    for s in steps])
    ax.set_xlabel("samples")
    ax.set_title("Sample funnel: inputs to written samples", fontsize=10)
    out.append(Figure("funnel-samples", "funnel", "Sample funnel",
                      "Samples left after each step (share of the inputs).", _png(fig), {"steps": steps}))
    if f.get("mention_steps"):
        ms = f["mention_steps"]
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(ms) + 1.0))
        _bars(ax, [s["step"] for s in ms], [s["count"] for s in ms], color="#55a868")
        ax.set_xlabel("mentions")
        ax.set_title("Mention funnel", fontsize=10)
        out.append(Figure("funnel-mentions", "funnel", "Mention funnel",
                          "Mentions (entities) through tagging, verification, assignment and rewriting; "
                          "written mentions count every span.", _png(fig), {"steps": ms}))
    if f["stages"]:
        st = f["stages"]
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(st) + 1.2))
        y = np.arange(len(st))
        ax.barh(y - 0.2, [s["in"] for s in st], height=0.4, label="in", color="#8c8c8c")
        ax.barh(y + 0.2, [s["out"] for s in st], height=0.4, label="out", color="#4c72b0")
        ax.set_yticks(y, [s["stage"] for s in st])
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.set_xlabel("items")
        ax.set_title("Items in and out of each stage", fontsize=10)
        out.append(Figure("funnel-stages", "funnel", "Stage counts", "Items in and out of each pipeline stage "
                          "(from the shards' stats).", _png(fig), {"stages": st}))
    if f["rejects"]:
        rj = f["rejects"][:25]
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rj) + 1.2))
        _bars(ax, [f"{r['stage']}: {r['reason']}" for r in rj], [r["count"] for r in rj], color="#c44e52")
        ax.set_xlabel("reject rows")
        ax.set_title("Rejects by stage and reason", fontsize=10)
        out.append(Figure("funnel-rejects", "funnel", "Rejects by reason", "Reject rows by stage and reason code.",
                          _png(fig), {"rejects": f["rejects"]}))
    return out


def _agreement_figures(a: Mapping[str, Any]) -> list[Figure]:
    plt = _plt()
    out = []
    hs = a.get("histograms") or {}
    if hs:
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
        for (name, h), col in zip(sorted(hs.items()), colors):
            n = sum(h["counts"]) or 1
            _hist_axes(ax, {"edges": h["edges"], "counts": [c / n for c in h["counts"]]},
                       label=f"{_SERIES_LABELS.get(name, name)} (n={sum(h['counts'])})", color=col, step=True)
        ax.axvline(0.5, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("IoU")
        ax.set_ylabel("share")
        ax.set_title("IoU between annotators", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        out.append(Figure("agreement-iou", "agreement", "IoU histograms",
                          "Distribution of IoU between the written boxes, the tagger's candidates, the verifier's "
                          "choices and the ground truth; the dotted line is the 0.5 threshold.", _png(fig),
                          {"histograms": hs}))
    g = a.get("ground_truth")
    if g and g["per_category"]:
        pc = g["per_category"]
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(pc) + 1.4))
        y = np.arange(len(pc))
        ax.barh(y - 0.2, [c["precision"] if c["precision"] is not None else 0 for c in pc], height=0.4,
                label="precision@0.5", color="#4c72b0")
        ax.barh(y + 0.2, [c["recall"] if c["recall"] is not None else 0 for c in pc], height=0.4,
                label="recall@0.5", color="#dd8452")
        ax.set_yticks(y, [f"{c['category']} ({c['n_written']}/{c['n_gt']})" for c in pc])
        ax.invert_yaxis()
        ax.set_xlim(0, 1.05)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"Written boxes vs ground truth: P={g['precision'] or 0:.3f} R={g['recall'] or 0:.3f}", fontsize=10)
        out.append(Figure("agreement-per-category", "agreement", "Precision / recall per category",
                          "Precision (written mentions) and recall (ground-truth mentions) at IoU 0.5, per "
                          "category; labels give written / ground-truth counts.", _png(fig), {"per_category": pc}))
    return out


def _rewrite_figures(r: Mapping[str, Any]) -> list[Figure]:
    if not r or not r["n_rewritten"]:
        return []
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.2))
    _hist_axes(a1, r["length_histogram"], color="#8172b3")
    a1.set_xlabel("words in the rewritten mention")
    a1.set_ylabel("mentions")
    a1.set_title(f"{r['n_rewritten']} of {r['n_mentions']} mentions rewritten", fontsize=9)
    wa = r["words_added"][:12]
    if wa:
        _bars(a2, [w["word"] for w in wa], [w["count"] for w in wa], color="#937860")
    a2.set_title("words the rewrite added", fontsize=9)
    return [Figure("rewrite-lengths", "rewrite", "Rewrites", "Length of the rewritten mentions and the words the "
                   "rewrite added most.", _png(fig),
                   {"length_histogram": r["length_histogram"], "words_added": r["words_added"]})]


def _box_figures(bx: Mapping[str, Any]) -> list[Figure]:
    plt = _plt()
    out = []
    for corpus, d in sorted(bx.items()):
        fig, axs = plt.subplots(1, 4, figsize=(11, 2.9))
        _hist_axes(axs[0], d["hist_width"], color="#4c72b0")
        axs[0].set_xlabel("width")
        _hist_axes(axs[1], d["hist_height"], color="#55a868")
        axs[1].set_xlabel("height")
        _hist_axes(axs[2], d["hist_sqrt_area"], color="#dd8452")
        axs[2].set_xlabel("sqrt(area)")
        for ax in axs[:3]:
            ax.set_ylabel("boxes")
        _heat(axs[3], d["center_heatmap"], "box centers")
        fig.suptitle(f"{corpus}: {d['n']} boxes (normalized to the image)", fontsize=10)
        out.append(Figure(f"boxes2d-{corpus}", "boxes2d", f"2D boxes ({corpus})",
                          "Width, height and sqrt(area) as fractions of the image, and where box centers fall.",
                          _png(fig), {k: d[k] for k in ("hist_width", "hist_height", "hist_sqrt_area", "center_heatmap")}))
    return out


def _det3d_figures(d: Mapping[str, Any]) -> list[Figure]:
    if not d or not d.get("n_objects"):
        return []
    plt = _plt()
    out = []
    fig, axs = plt.subplots(1, 4, figsize=(11, 2.9))
    _hist_axes(axs[0], d["hist_depth"], color="#4c72b0")
    axs[0].set_xlabel("depth z (m)")
    axs[0].set_ylabel("objects")
    for ax, k, col in zip(axs[1:], ("pitch", "roll", "yaw"), ("#55a868", "#dd8452", "#8172b3")):
        _hist_axes(ax, d[f"hist_{k}"], color=col)
        ax.set_xlabel(f"{k} (deg)")
    fig.suptitle(f"3D boxes: depth and orientation ({d['n_objects']} objects)", fontsize=10)
    out.append(Figure("det3d-depth-orientation", "det3d", "Depth and orientation",
                      "Camera-frame depth of box centers and the box rotation angles (canonical form).", _png(fig),
                      {k: d[k] for k in ("hist_depth", "hist_pitch", "hist_roll", "hist_yaw")}))
    pc = d["per_category"][:20]
    fig, ax = plt.subplots(figsize=(8.5, 0.38 * len(pc) + 1.4))
    y = np.arange(len(pc))
    for off, dim, col in ((-0.25, "w", "#4c72b0"), (0.0, "h", "#55a868"), (0.25, "l", "#dd8452")):
        med = np.asarray([c[dim]["median"] for c in pc], dtype=float)
        lo = med - np.asarray([c[dim]["p05"] for c in pc], dtype=float)
        hi = np.asarray([c[dim]["p95"] for c in pc], dtype=float) - med
        ax.errorbar(med, y + off, xerr=[lo, hi], fmt="o", color=col, label=dim, markersize=4, capsize=2)
    ax.set_yticks(y, [f"{c['category']} ({c['n']})" for c in pc])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("size (m): median, 5-95% range")
    ax.legend(fontsize=8)
    ax.set_title("3D box dimensions per category", fontsize=10)
    out.append(Figure("det3d-dims", "det3d", "Dimensions per category",
                      "Median and 5-95% range of the box dimensions (w, h, l) per category.", _png(fig),
                      {"per_category": pc}))
    sc = d["scatter"]
    flagged = {(o["key"], o["index"]) for o in d["outliers"]}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    z = np.asarray(sc["z"], dtype=float)
    vol = np.clip(np.asarray(sc["volume"], dtype=float), 1e-6, None)
    a1.scatter(z, vol, s=10, color="#4c72b0", label="objects")
    a1.set_yscale("log")
    a1.set_xlabel("depth z (m)")
    a1.set_ylabel("volume (m^3)")
    a1.set_title(f"{d['n_outliers']} objects flagged as outliers", fontsize=9)
    _hist_axes(a2, d["hist_consistency_iou"], color="#c44e52")
    a2.set_xlabel("IoU(2D box, projected 3D box)")
    a2.set_ylabel("objects")
    a2.set_title("2D / 3D consistency", fontsize=9)
    out.append(Figure("det3d-outliers", "det3d", "Outliers and 2D/3D consistency",
                      "Depth vs volume of every object, and the IoU between each 2D box and the clipped "
                      "projection of its 3D box (occlusion lowers it; a wrong 2D box lowers it more).", _png(fig),
                      {"scatter": sc, "hist_consistency_iou": d["hist_consistency_iou"], "n_flagged": len(flagged)}))
    return out


def _pointmap_figures(p: Mapping[str, Any]) -> list[Figure]:
    if not p:
        return []
    plt = _plt()
    fig, axs = plt.subplots(1, 3, figsize=(11, 3.0))
    _hist_axes(axs[0], p["hist_depth"], color="#4c72b0")
    axs[0].set_xlabel("point depth Z (m)")
    axs[0].set_ylabel("points")
    _hist_axes(axs[1], p["hist_median_depth"], color="#55a868")
    axs[1].set_xlabel("median depth per sample (m)")
    axs[1].set_ylabel("samples")
    _heat(axs[2], p["uv_heatmap"], "where points are sampled")
    fig.suptitle(f"Point maps: {p['n_points']} points in {p['n_samples']} samples", fontsize=10)
    return [Figure("pointmaps-depth", "pointmaps", "Point depth and coverage",
                   "Depth of the sampled points, per-sample median depth, and the image positions of the points.",
                   _png(fig), {k: p[k] for k in ("hist_depth", "hist_median_depth", "uv_heatmap")})]


def make_figures(audit: Mapping[str, Any]) -> list[Figure]:
    """Every figure of the report, in report order, from the sections `metrics.compute_audit` returns."""
    figs = _funnel_figures(audit["funnel"])
    if audit.get("agreement"):
        figs += _agreement_figures(audit["agreement"])
    if audit.get("rewrite"):
        figs += _rewrite_figures(audit["rewrite"])
    if audit.get("boxes2d"):
        figs += _box_figures(audit["boxes2d"])
    if audit.get("det3d"):
        figs += _det3d_figures(audit["det3d"])
    if audit.get("pointmaps"):
        figs += _pointmap_figures(audit["pointmaps"])
    return figs


# ============================================================================ gallery
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def draw_gallery_image(sample: Mapping[str, Any], *, gt_boxes: Sequence[Sequence[float] | None] = (),
                       max_width: int = 420, colours: Sequence[tuple[int, int, int]] | None = None,
                       ) -> tuple[bytes, list[dict[str, Any]]]:
    """The sample's image with its annotations drawn; returns (PNG bytes, what was drawn).

    cot: each mention's box (colour per mention, or `colours[i]`) labelled with its index and text,
    and its ground-truth box in white when known; det3d: 2D box, category and the projected 3D box
    wireframe; pointmap: the sampled points coloured by depth (near = yellow).
    """
    from PIL import Image, ImageDraw

    rec = sample["json"]
    raw = sample.get(rec["image"]["ext"]) or sample.get("jpg") or sample.get("png")
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    W, H = img.size
    s = min(1.0, max_width / W)
    if s < 1.0:
        img = img.resize((max(1, round(W * s)), max(1, round(H * s))), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    font = _font(11)
    iw, ih = img.size
    drawn: list[dict[str, Any]] = []

    def px(b: Sequence[float]) -> list[float]:
        return [b[0] * iw, b[1] * ih, b[2] * iw, b[3] * ih]

    def label(xy: tuple[float, float], text: str, col: tuple[int, int, int]) -> None:
        x, y = xy
        tb = draw.textbbox((x, y), text, font=font)
        draw.rectangle(tb, fill=col)
        draw.text((x, y), text, fill=(255, 255, 255), font=font)

    if rec["corpus"] == "cot":
        for i, m in enumerate(rec.get("mentions", [])):
            col = colours[i] if colours is not None and i < len(colours) else _PALETTE[i % len(_PALETTE)]
            gb = gt_boxes[i] if i < len(gt_boxes) else None
            if gb is not None:
                draw.rectangle(px(gb), outline=(255, 255, 255), width=1)
            b = px(m["bbox2d"])
            draw.rectangle(b, outline=col, width=2)
            text = f"{i}: {m.get('rewritten') or m['text']}"
            label((b[0] + 2, max(0.0, b[1] - 13)), text[:40], col)
            drawn.append({"index": i, "label": text, "box": m["bbox2d"], "gt_box": gb})
    elif rec["corpus"] == "det3d":
        from schemas.camera import box_corners, project
        from schemas.grammar import Box3D, box3d_to_pose

        K = np.asarray(rec["camera"]["K"], dtype=float)
        edges = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]
        for i, o in enumerate(rec.get("objects", [])):
            col = _PALETTE[i % len(_PALETTE)]
            bx = o["box3d"]
            c, d, R = box3d_to_pose(Box3D(tuple(bx["center"]), tuple(bx["dimensions"]), tuple(bx["rotation"])))
            corners = box_corners(c, d, R)
            if (corners[:, 2] > 0.05).all():
                uv = project(K, corners) * np.array([iw / W, ih / H])
                for a_, b_ in edges:
                    draw.line([tuple(uv[a_]), tuple(uv[b_])], fill=col, width=1)
            b = px(o["bbox2d"])
            draw.rectangle(b, outline=col, width=2)
            label((b[0] + 2, max(0.0, b[1] - 13)), f"{i}: {o['category']}", col)
            drawn.append({"index": i, "label": o["category"], "box": o["bbox2d"]})
    elif rec["corpus"] == "pointmap":
        import matplotlib

        pts = np.asarray(sample.get("points.npy", np.zeros((0, 5))), dtype=float)
        if pts.size:
            z = pts[:, 4]
            lo, hi = float(np.min(z)), float(np.max(z))
            cmap = matplotlib.colormaps["viridis_r"]
            for u, v, zz in zip(pts[:, 0] * iw / W, pts[:, 1] * ih / H, z):
                r, g, bl, _ = cmap((zz - lo) / (hi - lo) if hi > lo else 0.5)
                draw.ellipse([u - 2, v - 2, u + 2, v + 2], fill=(int(r * 255), int(g * 255), int(bl * 255)))
            drawn.append({"n_points": int(pts.shape[0]), "depth_min": lo, "depth_max": hi})
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue(), drawn
