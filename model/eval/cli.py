"""`gr3d eval det3d` (Omni3D AP3D) and `gr3d eval ground2d` (2D grounding Acc@0.5).

Imports nothing heavy at module level (the evaluators load numpy/scipy only when a command runs), so
`gr3d --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run_det3d", "run_heldout", "run_ground2d", "format_det3d_table", "references_from_records"]

_METRICS = ("AP3D", "AP15", "AP25", "AP50", "APn", "APm", "APf", "AR100")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gr3d eval` with its subcommands."""
    p = subparsers.add_parser(
        "eval", help="evaluate GR3D: Omni3D AP3D (det3d), 2D grounding Acc@0.5 (ground2d)"
    )
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    d = sub.add_parser(
        "det3d",
        help="Omni3D AP3D protocol (IoU 0.05..0.50, near/medium/far, ignore and proximity rules)",
        description="Score 3D detections with the Omni3D protocol. GT: Omni3D JSONs named {Dataset}_{split}.json "
        "(the name decides per-dataset results and the SUN RGB-D/Objectron proximity rule). Predictions: "
        "Omni3D's per-image JSON or a flat list of instances (bbox XYWH px, bbox3D 8x3 corners, score).",
    )
    d.add_argument(
        "--gt", nargs="+", required=True, metavar="OMNI3D_JSON", help="ground-truth Omni3D JSON file(s)"
    )
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", metavar="FILE", help="predictions JSON (Omni3D format or flat list)")
    src.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="generate predictions with a GR3D checkpoint directory ('tiny' = the random-weight preset), "
        "prompting once per category present in each image's GT; writes predictions.json beside the eval",
    )
    d.add_argument("--out", required=True, metavar="DIR", help="output folder for det3d_eval.json")
    d.add_argument(
        "--category-meta",
        metavar="FILE",
        help="Cube R-CNN category_meta.json: prediction category_id values are its contiguous ids",
    )
    d.add_argument(
        "--categories",
        nargs="+",
        metavar="NAME",
        help="evaluate only these category names (default: every category each GT file lists)",
    )
    gen = d.add_argument_group("generation (with --checkpoint)")
    gen.add_argument(
        "--image-root", metavar="DIR", help="folder the GT images' file_path values are relative to"
    )
    gen.add_argument(
        "--prompt", default=None, help="question template with {category}/{plural} (default: the corpus's canonical detect_3d question)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=512, help="generation length cap per answer")
    gen.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    gen.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    gen.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model dtype")
    gen.add_argument("--limit-images", type=int, default=None, help="only the first N images (smoke runs)")
    gen.add_argument("--constrained", action="store_true",
                     help="grammar-constrained decoding (model.constrained): every answer parses")
    gen.add_argument("--max-objects", type=int, default=8, help="with --constrained: objects per answer at most")
    d.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="draw predicted (red) and ground-truth (green) 3D boxes on the first N images: OUT/vis/*.png")
    d.set_defaults(func=run_det3d)

    h = sub.add_parser(
        "heldout",
        help="region->3D, detect_3d and 2D grounding of checkpoints side by side (model.eval.heldout)",
        description="Score checkpoints on held-out images: region->3D (GT 2D box as the region prompt; AP3D/AP15/"
        "AP25, median relative depth error), detect_3d (Omni3D AP) and 2D grounding Acc@0.5 on a held-out cot build.",
    )
    h.add_argument("--gt", required=True, metavar="OMNI3D_JSON", help="held-out ground truth (Omni3D JSON)")
    h.add_argument("--checkpoint", nargs="+", required=True, metavar="NAME=DIR", help="checkpoints to score")
    h.add_argument("--image-root", required=True, metavar="DIR", help="folder the GT file_path values are relative to")
    h.add_argument("--cot", metavar="BUILD_DIR", help="held-out grounded-CoT build (2D grounding)")
    h.add_argument("--free", action="store_true", help="unconstrained decoding (default: grammar-constrained)")
    h.add_argument("--limit-images", type=int, default=None, help="only the first N images")
    h.add_argument("--limit-mentions", type=int, default=100, help="grounded mentions scored (default 100)")
    h.add_argument("--out", metavar="DIR", help="also write heldout_eval.json there")
    h.set_defaults(func=run_heldout)

    g = sub.add_parser(
        "ground2d",
        help="explicit 2D grounding Acc@0.5",
        description="Acc@IoU of predicted 2D boxes against references. Both JSONs map an id to [x1, y1, x2, y2] "
        "(a dict, or a list of {'id', 'bbox'}); references can instead come from a built cot/det3d shard set "
        "(ids KEY/mention/I and KEY/object/I, boxes normalized).",
    )
    g.add_argument(
        "--predictions", required=True, metavar="FILE", help="predicted boxes JSON (null = no box)"
    )
    ref = g.add_mutually_exclusive_group(required=True)
    ref.add_argument("--gt", metavar="FILE", help="reference boxes JSON")
    ref.add_argument(
        "--shards", metavar="BUILD_DIR", help="a built cot/det3d shard set (reads KEY.json members)"
    )
    g.add_argument("--threshold", type=float, default=0.5, help="IoU threshold (default 0.5)")
    g.add_argument("--out", metavar="DIR", help="also write ground2d_eval.json there")
    g.set_defaults(func=run_ground2d)


def _pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}"


def format_det3d_table(results: Mapping[str, Any]) -> str:
    """Per-dataset and overall metrics as a fixed-width table (percent, like Omni3D's logs)."""
    rows = [(name, m) for name, m in results["datasets"].items()] + [("overall", results["overall"])]
    width = max(12, *(len(r[0]) for r in rows))
    head = f"{'dataset':<{width}} " + " ".join(f"{k:>7}" for k in _METRICS) + f" {'images':>7} {'gt':>7}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(
            f"{name:<{width}} "
            + " ".join(f"{_pct(m.get(k)):>7}" for k in _METRICS)
            + f" {m.get('n_images', 0):>7} {m.get('n_gt', 0):>7}"
        )
    named = {k: v for k, v in results.get("omni3d", {}).items() if v is not None}
    if named:
        lines.append("  ".join(f"{k} AP3D {_pct(v)}" for k, v in named.items()))
    return "\n".join(lines)


def _json_safe(x: Any) -> Any:
    """NaN -> None so the output is strict JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _generate_predictions(args: argparse.Namespace, gt: Any, out: Path) -> list[dict[str, Any]]:
    """Load the model, prompt it per (image, category present), save and return Omni3D predictions."""
    from model.eval.predict import DEFAULT_PROMPT, predict_omni3d

    if not args.image_root:
        raise SystemExit(
            "gr3d eval det3d --checkpoint needs --image-root (where the GT file_path values live)"
        )
    if args.checkpoint == "tiny":
        from model.checkpoint import build_tiny_model

        model = build_tiny_model()
    else:
        import torch

        from model.checkpoint import load_pretrained

        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_pretrained(args.checkpoint, dtype=dtype)
    model = model.to(args.device)
    jobs = gt.prediction_jobs()

    def progress(done: int, total: int) -> None:
        print(f"\rgenerating: {done}/{total} prompts", end="", file=sys.stderr, flush=True)

    factory = None
    if args.constrained:
        from model.constrained import GrammarConstraint, detect_kind

        def factory() -> Any:  # the answer form the checkpoint was trained on (grounded or direct 3D)
            return GrammarConstraint(model.tokenizer, detect_kind(model.config), max_items=args.max_objects)

    preds = predict_omni3d(
        model,
        jobs,
        args.image_root,
        prompt=args.prompt or DEFAULT_PROMPT,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=progress,
        logits_processor_factory=factory,
    )
    print(file=sys.stderr)
    (out / "predictions.json").write_text(json.dumps(preds) + "\n")
    return preds


def run_det3d(args: argparse.Namespace) -> int:
    from model.eval.io import load_category_meta, load_omni3d_gt, load_predictions, parse_predictions
    from model.eval.omni3d_ap import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gt = load_omni3d_gt(args.gt, category_names=args.categories)
    if args.limit_images is not None:
        gt = gt.subset(sorted(gt.image_dataset)[: args.limit_images])
    if args.checkpoint:
        dets = parse_predictions(_generate_predictions(args, gt, out), gt)
        source = str(out / "predictions.json")
    else:
        id_map = load_category_meta(args.category_meta) if args.category_meta else None
        dets = load_predictions(args.predictions, gt, id_map)
        source = str(args.predictions)
    results = evaluate(gt, dets)
    results["inputs"] = {
        "gt": [str(p) for p in args.gt],
        "predictions": source,
        "checkpoint": args.checkpoint,
    }
    (out / "det3d_eval.json").write_text(json.dumps(_json_safe(results), indent=1, sort_keys=True) + "\n")
    print(format_det3d_table(results))
    c = results["counts"]
    if c["dropped_unknown_image"] or c["dropped_out_of_vocabulary"]:
        print(
            f"dropped {c['dropped_unknown_image']} detections on images not in the GT and "
            f"{c['dropped_out_of_vocabulary']} outside their dataset's categories",
            file=sys.stderr,
        )
    if args.visualize:
        from model.eval.visualize import draw_detections

        if not args.image_root:
            raise SystemExit("gr3d eval det3d --visualize needs --image-root")
        for path in draw_detections(gt, dets, args.image_root, out / "vis", args.visualize):
            print(f"wrote {path}")
    print(f"wrote {out / 'det3d_eval.json'}")
    return 0


def run_heldout(args: argparse.Namespace) -> int:
    from model.checkpoint import load_pretrained
    from model.eval.heldout import eval_detect3d, eval_grounding, eval_region3d, grounding_items
    from model.eval.io import load_omni3d_gt

    gt = load_omni3d_gt([args.gt])
    if args.limit_images is not None:
        gt = gt.subset(sorted(gt.image_dataset)[: args.limit_images])
    items = grounding_items(args.cot, args.limit_mentions) if args.cot else []
    c = not args.free
    results: dict[str, Any] = {}
    print(f"{'model':10s} {'r3d AP3D':>8s} {'r3d AP15':>8s} {'depth err':>9s} {'det AP3D':>8s} {'det AP15':>8s} "
          f"{'Acc@0.5':>8s}")
    for spec in args.checkpoint:
        name, _, path = spec.rpartition("=")
        model = load_pretrained(path)
        r = {"region3d": eval_region3d(model, gt, args.image_root, constrained=c),
             "detect3d": eval_detect3d(model, gt, args.image_root, constrained=c)[0],
             "grounding": eval_grounding(model, items, constrained=c) if items else None}
        results[name or path] = r
        acc = _pct(r["grounding"]["acc50"]) if r["grounding"] else "-"
        print(f"{name or path:10s} {_pct(r['region3d']['AP3D']):>8s} {_pct(r['region3d']['AP15']):>8s} "
              f"{r['region3d']['median_rel_depth_error']:9.2f} {_pct(r['detect3d']['AP3D']):>8s} "
              f"{_pct(r['detect3d']['AP15']):>8s} {acc:>8s}", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "heldout_eval.json").write_text(json.dumps(_json_safe(results), indent=1, sort_keys=True) + "\n")
    return 0


def _boxes_json(data: Any) -> dict[str, list[float] | None]:
    if isinstance(data, Mapping):
        return {str(k): (None if v is None else [float(x) for x in v]) for k, v in data.items()}
    if isinstance(data, list):
        out: dict[str, list[float] | None] = {}
        for i, rec in enumerate(data):
            if "id" not in rec:
                raise ValueError(f"entry {i} has no 'id'")
            b = rec.get("bbox")
            out[str(rec["id"])] = None if b is None else [float(x) for x in b]
        return out
    raise ValueError("boxes JSON must be a dict {id: box} or a list of {'id', 'bbox'}")


def references_from_records(records: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Reference 2D boxes of sample records: cot mentions (KEY/mention/I) and det3d objects (KEY/object/I)."""
    refs: dict[str, list[float]] = {}
    for rec in records:
        key = rec["key"]
        for i, m in enumerate(rec.get("mentions") or []):
            if m.get("bbox2d") is not None:
                refs[f"{key}/mention/{i}"] = [float(x) for x in m["bbox2d"]]
        for i, o in enumerate(rec.get("objects") or []):
            if o.get("bbox2d") is not None:
                refs[f"{key}/object/{i}"] = [float(x) for x in o["bbox2d"]]
    return refs


def _iter_shard_records(build_dir: Path) -> Iterator[dict[str, Any]]:
    """The records (KEY.json) of every shard of a build, in shard then key order, without webdataset."""
    from shards.layout import SHARDS_DIR
    from shards.reader import iter_tar, shard_urls

    tars = [Path(u) for u in shard_urls(build_dir)] if (build_dir / SHARDS_DIR).is_dir() else []
    if not tars:
        raise FileNotFoundError(f"no shards/*.tar under {build_dir}")
    for t in tars:
        for sample in iter_tar(t):
            if "json" in sample:
                yield sample["json"]


def run_ground2d(args: argparse.Namespace) -> int:
    from model.eval.ground2d import grounding_accuracy

    preds = _boxes_json(json.loads(Path(args.predictions).read_text()))
    if args.gt:
        refs_any = _boxes_json(json.loads(Path(args.gt).read_text()))
        refs = {k: v for k, v in refs_any.items() if v is not None}
    else:
        refs = references_from_records(_iter_shard_records(Path(args.shards)))
    res = grounding_accuracy(preds, refs, threshold=args.threshold)
    print(
        f"Acc@{args.threshold:g}: {_pct(res['accuracy'])}%  ({res['n_correct']}/{res['n']}, "
        f"{res['n_missing']} without a prediction, mean IoU {res['mean_iou']:.3f})"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ground2d_eval.json").write_text(json.dumps(_json_safe(res), indent=1, sort_keys=True) + "\n")
    return 0
