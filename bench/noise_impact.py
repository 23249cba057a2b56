"""What annotation noise costs: cot corpora at several noise levels -> audit -> train -> held-out scores.

Why: the GR3D paper leaves the effect of its auto-annotation noise unquantified. On the sample world the
truth is known, so the simulated annotators (annotators/sim.py) can make the same corpus at chosen noise
levels, the audit measures each corpus's precision, and a model trained on each is scored on a held-out
world. One run = (noise level, verify on/off, seed):

    builds/cot (gr3d build cot --tagger sim [--verifier sim|none] --noise-scale L --sim-seed S)
    -> audit/audit.json (measured corpus precision / recall)
    -> train/ (gr3d train --config PRESET, same steps and mix for every run, seed S)
    -> held-out 2D grounding Acc@0.5 (first question of each held-out RefSpatial record, i-th box of the
       answer vs the i-th true mention box of that turn; no box = wrong) and detect_3d AP15 (gr3d eval det3d
       on the held-out world's Omni3D files)
    -> runs/NAME/result.json

Resumable: a run whose result.json exists is skipped (and each step inside it resumes too). At the end
every result.json is gathered into OUT/noise_impact.json and OUT/noise_impact.png (metric vs measured
corpus precision, mean over seeds with min-max bars).

    .venv/bin/python -m bench.noise_impact --quick --out /tmp/noise     # plumbing check (test suite)
    .venv/bin/python -m bench.noise_impact --preset small --levels 0,1,2,4 --seeds 0,1 --out bench/noise_out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

COT_FILES = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]


def _cli(argv: list[str]) -> None:
    from pipelines.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"noise_impact: `gr3d {' '.join(argv)}` failed with exit code {rc}")


def _world(out: Path, scenes: int, views: int, seed: int, size: tuple[int, int]) -> Path:
    if not (out / "sample_world.json").exists():
        _cli(["sample-world", "--out", str(out), "--scenes", str(scenes), "--views", str(views), "--seed", str(seed),
              "--width", str(size[0]), "--height", str(size[1])])
    return out


def heldout_grounding(checkpoint: Path, world: Path, max_new_tokens: int, limit: int | None) -> dict[str, Any]:
    """Acc@0.5 of the boxes the model writes when answering the held-out world's first questions."""
    from PIL import Image

    from annotators.oracle import load_ground_truth
    from model.checkpoint import load_pretrained
    from model.eval.ground2d import grounding_accuracy
    from model.generate import generate
    from pipelines.corpora.cot.builder import iter_inputs, resolve_refspatial_files
    from pipelines.corpora.cot.text import _clean_human
    from schemas.grammar import find_grounded

    gt = load_ground_truth(world / "ground_truth.json")
    by_turn: dict[str, list[Any]] = {}
    for g in gt.values():
        if g.turn == 1:
            by_turn.setdefault(g.record_id, []).append(g)
    items = [it for it in iter_inputs({"files": resolve_refspatial_files(COT_FILES, world)})
             if "read_reject" not in it and it["id"] in by_turn]
    items.sort(key=lambda it: it["id"])
    if limit is not None:
        items = items[:limit]
    model = load_pretrained(checkpoint)
    refs: dict[str, list[float]] = {}
    preds: dict[str, list[float] | None] = {}
    n_malformed = 0
    for it in items:
        with Image.open(it["image_paths"][0]) as im:
            img, (w, h) = im.convert("RGB"), im.size
        question = _clean_human(it["conversations"][0]["value"], False, True)
        text = generate(model, [img], [question], max_new_tokens=max_new_tokens)[0].text
        try:
            boxes = [list(b.box) for b in find_grounded(text)]
        except ValueError:
            boxes, n_malformed = [], n_malformed + 1
        for i, g in enumerate(sorted(by_turn[it["id"]], key=lambda g: g.start)):
            x1, y1, x2, y2 = g.box_xyxy_px
            refs[f"{it['id']}/{i}"] = [x1 / w, y1 / h, x2 / w, y2 / h]
            preds[f"{it['id']}/{i}"] = boxes[i] if i < len(boxes) else None
    res = grounding_accuracy(preds, refs)
    return {"accuracy": res["accuracy"], "n": res["n"], "n_missing": res["n_missing"],
            "mean_iou": res["mean_iou"], "n_records": len(items), "n_malformed_answers": n_malformed}


def run_one(args: argparse.Namespace, name: str, level: float, verify: bool, seed: int, world: Path,
            heldout: Path, det3d: Path) -> dict[str, Any]:
    """One (level, verify, seed) run; returns (and writes) its result.json."""
    d = args.out / "runs" / name
    result_path = d / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    cot = d / "cot"
    _cli(["build", "cot", "--refspatial", *COT_FILES, "--data-root", str(world), "--out", str(cot),
          "--tagger", "sim", "--verifier", "sim" if verify else "none", "--noise-scale", str(level),
          "--sim-seed", str(seed), "--allow-partial", "--executor", "local", "--quiet"])
    _cli(["audit", str(cot), "--out", str(d / "audit"), "--gallery", "0"])
    audit = json.loads((d / "audit" / "audit.json").read_text())["agreement"]
    g = audit["ground_truth"]
    run = d / "train"
    _cli(["train", "--config", args.preset, "--resume", "auto", "--seed", str(seed), "--stage", "2",
          "--data.root", str(args.out), "--data.mix", f"{det3d}@{args.mix[0]},{cot}@{args.mix[1]}",
          "--data.num_workers", "0", "--max_steps", str(args.steps), "--checkpoint_every", str(args.steps),
          "--out", str(run)])
    ground = heldout_grounding(run / "final", heldout, args.max_new_tokens, args.limit_eval)
    omni = sorted((heldout / "Omni3D").glob("*.json"))
    ev = d / "eval"
    argv = ["eval", "det3d", "--gt", *map(str, omni), "--checkpoint", str(run / "final"),
            "--image-root", str(heldout), "--max-new-tokens", str(args.max_new_tokens), "--out", str(ev)]
    if args.limit_eval is not None:
        argv += ["--limit-images", str(args.limit_eval)]
    _cli(argv)
    overall = json.loads((ev / "det3d_eval.json").read_text())["overall"]
    res = {"name": name, "noise_scale": level, "verify": verify, "seed": seed, "preset": args.preset,
           "steps": args.steps, "corpus": {"n_written_mentions": g["n_written"], "precision": g["precision"],
                                           "precision_ci": g["precision_ci"], "recall": g["recall"],
                                           "verifier_accuracy": (audit.get("verifier") or {}).get("accuracy")},
           "ground2d": ground, "detect3d": {"AP15": overall.get("AP15"), "AP3D": overall.get("AP3D")},
           "seconds": round(time.perf_counter() - t0, 1)}
    result_path.write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    return res


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def summarize(out: Path) -> dict[str, Any]:
    """Every runs/*/result.json -> noise_impact.json and noise_impact.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]
    groups: dict[tuple[float, bool], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["noise_scale"], r["verify"]), []).append(r)
    table = []
    def stat(rs: list[dict[str, Any]], get: Any) -> dict[str, float | None]:
        v = [x for x in (get(r) for r in rs) if x is not None and x == x]
        return {"mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v))} if v else \
            {"mean": None, "min": None, "max": None}

    for (level, verify), rs in sorted(groups.items()):
        table.append({"noise_scale": level, "verify": verify, "seeds": sorted(r["seed"] for r in rs),
                      "precision": stat(rs, lambda r: r["corpus"]["precision"]),
                      "ground2d_acc": stat(rs, lambda r: r["ground2d"]["accuracy"]),
                      "detect3d_ap15": stat(rs, lambda r: r["detect3d"]["AP15"])})
    doc = _nan_to_none({"runs": runs, "table": table})
    (out / "noise_impact.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "ground2d_acc", "held-out 2D grounding Acc@0.5"),
                              (axes[1], "detect3d_ap15", "held-out detect_3d AP15")):
        for verify, marker in ((True, "o"), (False, "s")):
            rows = [t for t in doc["table"] if t["verify"] == verify and t["precision"]["mean"] is not None
                    and t[metric]["mean"] is not None]
            if not rows:
                continue
            x = [t["precision"]["mean"] for t in rows]
            y = [t[metric]["mean"] for t in rows]
            err = [[t[metric]["mean"] - t[metric]["min"] for t in rows], [t[metric]["max"] - t[metric]["mean"]
                                                                         for t in rows]]
            ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label="verify" if verify else "no verify")
            for t, xi, yi in zip(rows, x, y):
                ax.annotate(f"x{t['noise_scale']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("measured corpus precision@0.5 (audit)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "noise_impact.png", dpi=100)
    plt.close(fig)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("noise_impact_out"))
    p.add_argument("--quick", action="store_true",
                   help="plumbing check: tiny worlds, two levels (0, 2), verify on/off, one seed, 4 steps")
    p.add_argument("--preset", default="tiny", help="training config name or YAML (tiny; small for the curve)")
    p.add_argument("--levels", default="0,1,2,4", help="noise scales (0 = oracle, 1 = realistic default)")
    p.add_argument("--verify", default="on,off", help="verify stage: on, off or on,off")
    p.add_argument("--seeds", default="0,1", help="seeds (sim errors and training)")
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--mix", default="0.5,0.5", help="det3d,cot mixture weights")
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--heldout-scenes", type=int, default=4)
    p.add_argument("--size", default="320x240", help="image size WxH of the worlds")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--limit-eval", type=int, default=None, help="held-out records / images per evaluation")
    args = p.parse_args(argv)
    if args.quick:
        args.levels, args.verify, args.seeds, args.steps = "0,2", "on,off", "0", 4
        args.scenes, args.views, args.heldout_scenes, args.size = 2, 2, 1, "160x120"
        args.max_new_tokens, args.limit_eval = 24, 2
    args.mix = [float(x) for x in args.mix.split(",")]
    size = tuple(int(x) for x in args.size.split("x"))
    args.out = args.out.resolve()
    world = _world(args.out / "world_train", args.scenes, args.views, 0, size)
    heldout = _world(args.out / "world_heldout", args.heldout_scenes, args.views, 1, size)
    det3d = args.out / "det3d"
    _cli(["build", "det3d", "--sample-world", str(world), "--out", str(det3d), "--executor", "local", "--quiet"])
    for seed in (int(s) for s in args.seeds.split(",")):
        for level in (float(x) for x in args.levels.split(",")):
            for verify in (v == "on" for v in args.verify.split(",")):
                name = f"L{level:g}_{'v' if verify else 'nv'}_s{seed}"
                r = run_one(args, name, level, verify, seed, world, heldout, det3d)
                print(f"{name}: precision {r['corpus']['precision']}, ground2d {r['ground2d']['accuracy']}, "
                      f"AP15 {r['detect3d']['AP15']} ({r['seconds']} s)", flush=True)
    summarize(args.out)
    print(f"wrote {args.out / 'noise_impact.json'} and {args.out / 'noise_impact.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
