"""The audit report: one self-contained HTML file and a machine-readable `audit.json`.

Why one file with embedded PNGs: reports are mailed around and opened on machines without the
build or a network; nothing in the HTML refers to anything outside it (no scripts, fonts or
stylesheets from elsewhere). `audit.json` holds every number of every section and every figure's
data, and is validated against `schemas/json/audit.schema.json` before it is written.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.audit.load import BuildData, load_build

__all__ = ["AUDIT_VERSION", "build_audit", "render_html", "write_report"]

AUDIT_VERSION = 1
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:12px;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{width:430px}
.kpi{display:inline-block;border:1px solid #ddd;border-radius:6px;padding:8px 14px;margin:4px;min-width:140px}
.kpi b{display:block;font-size:20px}.muted{color:#777;font-size:12px}code{font-size:12px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if pct else f"{v:.3g}"
    return str(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class=num>{_e(_fmt(c))}</td>" if isinstance(c, int | float) and not isinstance(c, bool)
        else f"<td>{_e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _build_info(b: BuildData) -> dict[str, Any]:
    cfg = b.config
    return {
        "path": str(b.root), "builder": b.builder or None, "code_version": b.manifest.get("code_version"),
        "manifest_sha256": b.manifest_sha256, "n_shards": int(b.manifest.get("n_shards", len(b.stats))),
        "corpora": b.corpora, "totals": dict(b.manifest.get("totals") or {}),
        "perturbation": cfg.get("perturbation"),
        "annotators": {k: cfg.get(k) for k in ("tagger", "tagger_model", "verifier", "verifier_model", "rewrite", "sim")
                       if k in cfg} or None,
    }


def build_audit(b: BuildData, *, gallery_size: int = 12, seed: int = 0, error_gallery: int = 4,
                ) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """(audit.json document, figures, gallery images) of a loaded build; the error gallery's images come
    after the sample gallery's, marked `"error": True`."""
    from pipelines.audit import metrics, plots
    from pipelines.audit.errors import draw_error_gallery

    sec = metrics.compute_audit(b, gallery_size=gallery_size, seed=seed, error_gallery=error_gallery)
    rows = sec.pop("_mentions")
    figs = plots.make_figures(sec)
    gt_by_key: dict[str, dict[int, list[float] | None]] = {}
    for r in rows:
        gt_by_key.setdefault(r["key"], {})[r["index"]] = r["gt_box"]
    gallery = []
    for g in sec["gallery"]:
        sample = b.read_sample(g["key"])
        n = len(sample["json"].get("mentions", []))
        gts = [gt_by_key.get(g["key"], {}).get(i) for i in range(n)]
        png, drawn = plots.draw_gallery_image(sample, gt_boxes=gts)
        gallery.append({**g, "png": png, "drawn": drawn})
    doc = {
        "version": AUDIT_VERSION,
        "build": _build_info(b),
        "inputs": {"ground_truth": str(b.ground_truth_path) if b.ground_truth_path else None,
                   "intermediates": {k: v for k, v in sorted(b.intermediate_files.items())},
                   "verified": b.verified, "warnings": list(b.warnings)},
        **{k: sec[k] for k in ("funnel", "agreement", "rewrite", "boxes2d", "det3d", "pointmaps")},
        "error_gallery": sec["error_gallery"],
        "gallery": [{"key": g["key"], "stratum": g["stratum"], "drawn": g["drawn"]} for g in gallery],
        "figures": [f.to_json() for f in figs],
    }
    if sec["error_gallery"] is not None:
        drawn = draw_error_gallery(b, sec["error_gallery"])
        gallery += [{**d, "error": True} for d in drawn]
    return doc, figs, gallery


def _kpis(doc: Mapping[str, Any]) -> str:
    f = doc["funnel"]
    items = [("inputs", f["n_input"]), ("written", f["n_written"]),
             ("yield", _fmt(f["n_written"] / f["n_input"], True) if f["n_input"] else "n/a")]
    a = doc.get("agreement") or {}
    g = a.get("ground_truth")
    if g:
        items += [("precision@0.5 vs GT", _fmt(g["precision"], True)), ("recall@0.5 vs GT", _fmt(g["recall"], True))]
        ve = a.get("verify_effect")
        if ve and ve.get("n"):
            items.append(("precision before -> after verify",
                          f"{_fmt(ve['precision_before'], True)} -> {_fmt(ve['precision_after'], True)}"))
    if a.get("written_vs_tagger"):
        items.append(("written = tagger box", _fmt(a["written_vs_tagger"]["agree_at_0_5"], True)))
    if doc.get("rewrite"):
        items.append(("mentions rewritten", _fmt(doc["rewrite"]["rate"], True)))
    if doc.get("det3d") and doc["det3d"].get("n_objects"):
        items.append(("3D outliers", f"{doc['det3d']['n_outliers']} / {doc['det3d']['n_objects']}"))
    return "".join(f'<span class=kpi><b>{_e(v)}</b>{_e(k)}</span>' for k, v in items)


def _verify_effect_html(ve: Mapping[str, Any] | None) -> str:
    """Where the verifier helped: precision of the tagger's first box vs of the verifier's choice, and the
    caught / missed / lost errors (tables: a caught error's sample is usually rejected, so it has no shard
    image to draw)."""
    if not ve or not ve["n"]:
        return ""
    head = (f'<h3 id=verify-effect>What the verifier did</h3><p>Precision@0.5 of the tagger\'s first box '
            f'<b>{_e(_fmt(ve["precision_before"], True))}</b> (what an unverified build writes) &rarr; of the '
            f'verifier\'s choice <b>{_e(_fmt(ve["precision_after"], True))}</b>, over {ve["n"]} mentions with '
            f'candidates: {ve["n_caught"]} wrong first boxes caught (a right box chosen instead, or refused), '
            f'{ve["n_missed"]} wrong boxes accepted, {ve["n_lost"]} right first boxes lost (refused or swapped for '
            f'a wrong one), {ve["n_kept"]} right first boxes kept.</p>')
    cols = ["key", "#", "mention", "category", "first box IoU", "chosen IoU", "decision", "candidates"]
    body = []
    for kind, title in (("caught", "Caught errors"), ("missed", "Missed errors (accepted wrong boxes)"),
                        ("lost", "Lost right boxes")):
        ex = ve.get(kind) or []
        if ex:
            body.append(f"<h4>{_e(title)}</h4>" + _table(cols, [
                [x["key"], x["mention_index"], x["text"], x["category"], x["first_iou"], x["chosen_iou"],
                 x["decision"], x["n_candidates"]] for x in ex[:20]]))
    return head + "".join(body)


_STRATUM_TITLES = {"caught": "Caught: the verifier refused a wrong box",
                   "missed": "Missed: a wrong box was accepted (written)",
                   "lost": "Lost: the verifier refused a right box",
                   "correct": "Correct: a right box, kept"}


def _error_gallery_html(eg: Mapping[str, Any] | None, drawn: Sequence[Mapping[str, Any]]) -> str:
    """Caught / missed / lost / correct cases drawn on their images, with the count of each stratum."""
    from pipelines.audit.plots import data_uri

    if not eg:
        return ""
    c = eg["counts"]
    basis = ("the verifier's decision on the tagger's candidates" if eg["basis"] == "verifier"
             else "the tagger's first box (no verify stage)")
    parts = [f'<h2 id=error-gallery>Caught and missed errors</h2><p>Mentions with candidates and a ground-truth '
             f'box, by {_e(basis)}: {c["caught"]} caught, {c["missed"]} missed, {c["lost"]} lost, {c["correct"]} '
             f'correct. Up to {eg["cap"]} per stratum (seed {eg["seed"]}). Red: a wrong box (IoU &lt; '
             f'{eg["iou_threshold"]} with the truth), green: a right one, white: the truth.</p>']
    for s, title in _STRATUM_TITLES.items():
        cases = [d for d in drawn if d["stratum"] == s]
        if not cases:
            continue
        parts.append(f'<h3>{_e(title)} ({c[s]})</h3><div class=gallery>')
        parts += [f'<figure class="error {_e(s)}"><img alt="{_e(d["key"])}" src="{data_uri(d["png"])}">'
                  f'<figcaption>{_e(d["caption"])} <code>{_e(d["key"])}</code></figcaption></figure>' for d in cases]
        parts.append("</div>")
    return "".join(parts)


def _ambiguity_html(a: Mapping[str, Any] | None) -> str:
    """Share of written descriptions that do not single out their object, per source and vs the injected record."""
    if not a or not a["n"]:
        return ""

    def ci(x: Sequence[float] | None) -> str:
        return "n/a" if not x else f"[{100 * x[0]:.1f}, {100 * x[1]:.1f}]"

    rows = [[src, v["n"], v["n_ambiguous"], _fmt(v["ambiguous_share"], True), ci(v["ambiguous_ci"]),
             v["n_misdescribed"], _fmt(v["not_unique_share"], True), ci(v["not_unique_ci"])]
            for src, v in [("all", a), *sorted(a["by_source"].items())]]
    out = ('<h3 id=ambiguity>Do the descriptions single out their object?</h3><p>Each written description '
           '(the rewrite, else the record&rsquo;s words) resolved among the objects visible in its image: ambiguous = '
           'it fits more than one, misdescribed = it fits another object or none (95% Wilson intervals). '
           f'{a["n_confusable"]} of the {a["n"]} objects share their category with another visible object.</p>'
           + _table(["source", "mentions", "ambiguous", "share", "95% CI", "misdescribed", "not unique", "95% CI"],
                    rows))
    if a.get("by_injection"):
        out += "<p>Against what the simulated rewriter injected:</p>" + _table(
            ["injected", "unique", "ambiguous", "misdescribed"],
            [[k, v["n_unique"], v["n_ambiguous"], v["n_misdescribed"]] for k, v in a["by_injection"].items()])
    if a["examples"]:
        out += _table(["key", "#", "text", "description", "outcome", "objects matched"],
                      [[x["key"], x["index"], x["text"], x["description"], x["outcome"], x["n_matches"]]
                       for x in a["examples"]])
    return out


def render_html(doc: Mapping[str, Any], figs: Sequence[Any], gallery: Sequence[Mapping[str, Any]]) -> str:
    """The report page; every image is a data URI, so the file stands alone."""
    from pipelines.audit.plots import data_uri

    by_sec: dict[str, list[Any]] = {}
    for f in figs:
        by_sec.setdefault(f.section, []).append(f)

    def figures(section: str) -> str:
        return "".join(f'<figure class=plot id="fig-{_e(f.id)}"><img alt="{_e(f.title)}" src="{data_uri(f.png)}">'
                       f"<figcaption>{_e(f.title)}: {_e(f.caption)}</figcaption></figure>"
                       for f in by_sec.get(section, []))

    b = doc["build"]
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>GR3D audit: {_e(b['path'])}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Annotation-noise audit</h1><p class=muted>build <code>{_e(b['path'])}</code> &middot; "
             f"{_e(b['code_version'])} &middot; manifest sha256 <code>{_e(b['manifest_sha256'][:16])}</code></p>",
             f"<div>{_kpis(doc)}</div>"]
    sim = (b.get("annotators") or {}).get("sim")
    if sim:
        parts.append(f"<p><b>Simulated annotators</b> (noise scale {_e(sim['noise_scale'])}, seed {_e(sim['seed'])}): "
                     "the errors were injected at known rates and recorded in the intermediates.</p>")
    if b.get("perturbation"):
        p = b["perturbation"]
        parts.append("<p><b>This build is a perturbed copy</b>: " + _e(", ".join(
            f"{k}={v}" for k, v in sorted(p.items()) if not isinstance(v, dict))) + "</p>")
    errors_drawn = [g for g in gallery if g.get("error")]
    gallery = [g for g in gallery if not g.get("error")]
    sections = [("funnel", "Funnel"), ("agreement", "Agreement between annotators"),
                ("error_gallery", "Caught and missed errors"), ("rewrite", "Rewrites"),
                ("boxes2d", "2D boxes"), ("det3d", "3D detection corpus"), ("pointmaps", "Point-map corpus"),
                ("gallery", "Gallery")]
    parts.append("<p>" + " &middot; ".join(f'<a href="#{k.replace("_", "-")}">{_e(t)}</a>' for k, t in sections
                                           if k == "funnel" or doc.get(k)) + "</p>")

    f = doc["funnel"]
    parts.append(f'<h2 id=funnel>Funnel</h2>{figures("funnel")}')
    if f["rejects"]:
        parts.append(_table(["stage", "reason", "rows"], [[r["stage"], r["reason"], r["count"]] for r in f["rejects"]]))
    else:
        parts.append("<p>No rejects.</p>")

    a = doc.get("agreement")
    if a:
        parts.append('<h2 id=agreement>Agreement between annotators</h2>')
        g = a.get("ground_truth")
        rows = []
        if g:
            rows.append(["written boxes vs ground truth", g["n_written"], g["precision"], g["recall"], g["mean_iou"]])
        if a.get("tagger"):
            t = a["tagger"]
            rows.append(["tagger first candidate vs ground truth", t["n_entities"], t["top1_acc"], None, t["mean_top1_iou"]])
            rows.append(["tagger best candidate vs ground truth", t["n_entities"], t["best_of_k_acc"], None,
                         t["mean_best_iou"]])
        v = a.get("verifier") or {}
        if v.get("n_with_gt"):
            rows.append(["verifier vs ground truth", v["n_with_gt"], v["precision"], v["recall"], None])
        if a.get("written_vs_tagger"):
            w = a["written_vs_tagger"]
            rows.append(["written boxes vs tagger candidates", w["n"], w["agree_at_0_5"], None, w["mean_iou"]])
        if rows:
            parts.append(_table(["comparison", "n", "precision / acc @0.5", "recall @0.5", "mean IoU"], rows))
        if v.get("decisions"):
            parts.append(f"<p>Verifier decisions: {_e(v['decisions'])}; chose the tagger's first candidate in "
                         f"{_e(_fmt(v.get('chose_first_candidate'), True))} of its choices.</p>")
        parts.append(_verify_effect_html(a.get("verify_effect")))
        if not g:
            parts.append("<p class=muted>No ground truth found (pass <code>--ground-truth</code> for a sample-world "
                         "build): agreement with the truth is not measured.</p>")
        parts.append(figures("agreement"))
        if g and g["worst"]:
            parts.append("<h3>Lowest-IoU written mentions</h3>" + _table(
                ["key", "#", "text", "category", "IoU vs GT"],
                [[w["key"], w["index"], w["text"], w["category"], w["iou_gt"]] for w in g["worst"]]))

    parts.append(_error_gallery_html(doc.get("error_gallery"), errors_drawn))

    r = doc.get("rewrite")
    if r:
        parts.append(f'<h2 id=rewrite>Rewrites</h2><p>{r["n_rewritten"]} of {r["n_mentions"]} written mentions '
                     f'rewritten ({_e(_fmt(r["rate"], True))}); words per mention {_e(_fmt(r["words_original"]["mean"]))}'
                     f' &rarr; {_e(_fmt(r["words_rewritten"]["mean"]))}.</p>')
        if r.get("intermediate"):
            parts.append(f"<p>Rewrite requests: {_e(r['intermediate']['decisions'])}.</p>")
        parts.append(figures("rewrite"))
        parts.append(_ambiguity_html(r.get("ambiguity")))
        if r["examples"]:
            parts.append(_table(["key", "#", "original", "rewritten"],
                                [[x["key"], x["index"], x["text"], x["rewritten"]] for x in r["examples"]]))

    bx = doc.get("boxes2d")
    if bx:
        parts.append('<h2 id=boxes2d>2D boxes</h2>' + _table(
            ["corpus", "boxes", "median w", "median h", "degenerate", "tiny (<0.1% area)", ">90% area", "touch border"],
            [[c, d["n"], d["width"]["median"], d["height"]["median"], d["n_degenerate"], d["n_tiny"], d["n_huge"],
              d["n_touching_border"]] for c, d in sorted(bx.items())]) + figures("boxes2d"))

    d3 = doc.get("det3d")
    if d3:
        parts.append(f'<h2 id=det3d>3D detection corpus</h2><p>{d3["n_objects"]} objects in {d3["n_samples"]} '
                     f'samples; {d3.get("n_outliers", 0)} flagged.</p>' + figures("det3d"))
        if d3.get("outliers"):
            parts.append(_table(["key", "#", "category", "rule", "value", "robust z"],
                                [[o["key"], o["index"], o["category"], o["rule"], o["value"], o["robust_z"]]
                                 for o in d3["outliers"][:40]]))

    pm = doc.get("pointmaps")
    if pm:
        parts.append(f'<h2 id=pointmaps>Point-map corpus</h2><p>{pm["n_points"]} points in {pm["n_samples"]} samples; '
                     f'{pm["n_invalid_points"]} invalid; {pm["n_outliers"]} samples flagged.</p>' + figures("pointmaps"))
        if pm.get("outliers"):
            parts.append(_table(["key", "rule", "value", "robust z"],
                                [[o["key"], o["rule"], o["value"], o["robust_z"]] for o in pm["outliers"][:40]]))

    if gallery:
        parts.append('<h2 id=gallery>Gallery</h2><p class=muted>Stratified by corpus, dataset and outcome; '
                     'white boxes are the ground truth where known.</p><div class=gallery>')
        for g in gallery:
            parts.append(f'<figure class=sample><img alt="{_e(g["key"])}" src="{data_uri(g["png"])}">'
                         f'<figcaption><code>{_e(g["key"])}</code> ({_e(g["stratum"])})</figcaption></figure>')
        parts.append("</div>")
    warn = doc["inputs"]["warnings"]
    if warn:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(w)}</li>" for w in warn) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(build_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 ground_truth: str | os.PathLike[str] | None = None, verify: bool = True, intermediates: bool = True,
                 gallery_size: int = 12, seed: int = 0, error_gallery: int = 4) -> dict[str, Any]:
    """Audit a build: write `OUT/report.html` and `OUT/audit.json` (schema-validated); return the document.

    `error_gallery`: caught / missed / lost cases drawn per stratum (0: counts only, no images)."""
    from schemas import records
    from shards import jsonio

    b = load_build(build_dir, ground_truth=ground_truth, verify=verify, intermediates=intermediates)
    doc, figs, gallery = build_audit(b, gallery_size=gallery_size, seed=seed, error_gallery=error_gallery)
    doc = jsonio.to_jsonable(doc)
    records.validate("audit", doc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_bytes(jsonio.dumps(doc, indent=1) + b"\n")
    (out / "report.html").write_text(render_html(doc, figs, gallery), encoding="utf-8")
    return doc
