"""`gr3d demo`: the whole system on the embedded sample world, printing where each output is.

It runs the same commands a user runs, in order, through `pipelines.cli.main`:
sample world -> det3d, pointmaps and cot builds of the train scenes (oracle annotators; simulated annotators
with realistic, recorded errors; then the real Florence-2 / VLM code paths on tiny random-weight models built
offline) -> `shards verify` -> audit report of the simulated-annotator build (the oracle build would audit at
100 %) -> a short tiny-model training, and the same on constant images (the blind baseline) -> evaluation on
the held-out scenes (the world's last 20 %: region -> 3D, Omni3D detect_3d, 2D grounding; grammar-constrained
decoding) with predicted and ground-truth boxes drawn on held-out images. Every step resumes: a re-run skips
finished shards and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole system on the embedded sample world",
        description="Generate the sample world, build the three corpora, verify them, audit the CoT corpus, "
        "train a tiny GR3D for a few hundred CPU steps and evaluate it with the Omni3D protocol.",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    p.add_argument("--scenes", type=int, default=10, help="sample-world scenes (default: 10, the last 2 held out)")
    p.add_argument("--views", type=int, default=3, help="camera views per scene (default: 3)")
    p.add_argument("--steps", type=int, default=200, help="tiny-model training steps (default: 200)")
    p.add_argument("--executor", choices=["ray", "beam", "local"], default="ray",
                   help="executor of the builds (default: ray, embedded)")
    p.add_argument("--skip-models", action="store_true",
                   help="skip the CoT build with tiny Florence-2 / VLM models (the oracle build still runs)")
    p.set_defaults(func=run)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _step(title: str, argv: list[str], outputs: list[tuple[str, Path]]) -> None:
    from pipelines.cli import main

    t0 = time.perf_counter()
    print(f"\n=== {title}\n$ gr3d {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        raise SystemExit(f"demo step failed ({title}): exit code {rc}")
    print(f"--- {title}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    outputs.append((title, Path(argv[argv.index("--out") + 1]) if "--out" in argv else Path(argv[-1])))


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    world, builds, models = out / "sample_world", out / "builds", out / "models"
    outputs: list[tuple[str, Path]] = []
    t0 = time.perf_counter()
    ex = ["--executor", args.executor, "--workers", "2", "--chunk-size", "8", "--quiet"]

    _step("sample world", ["sample-world", "--out", str(world), "--scenes", str(args.scenes),
                           "--views", str(args.views), "--seed", "0"], outputs)
    from pipelines.sample_world.splits import split_inputs

    train, val = split_inputs(world, "train"), split_inputs(world, "val")  # scene-disjoint
    _step("det3d build (train scenes)", ["build", "det3d", "--omni3d", train["omni3d"], "--embodiedscan",
                                         train["embodiedscan"], "--data-root", str(world),
                                         "--out", str(builds / "det3d"), *ex], outputs)
    _step("pointmaps build (train scenes)", ["build", "pointmap", "--source", "embodiedscan",
                                             "--embodiedscan", train["embodiedscan"],
                                             "--data-root", str(world), "--out", str(builds / "pointmap"), *ex], outputs)
    roots = ["--data-root", str(world), "--image-root", "sample_world", "--depth-root", "RefSpatial/3D/depth",
             "--ground-truth", str(world / "ground_truth.json")]
    cot_common = ["build", "cot", "--refspatial", *train["refspatial"], *roots]
    _step("cot build (held-out scenes, for 2D grounding)", ["build", "cot", "--refspatial", *val["refspatial"],
                                                            *roots, "--tagger", "oracle", "--verifier", "oracle",
                                                            "--out", str(builds / "cot_val"), *ex], outputs)
    _step("cot build (oracle annotators)", [*cot_common, "--tagger", "oracle", "--verifier", "oracle",
                                            "--out", str(builds / "cot"), *ex], outputs)
    _step("cot build (simulated annotators, realistic noise)", [*cot_common, "--tagger", "sim", "--verifier", "sim",
                                                                "--out", str(builds / "cot_sim"), *ex], outputs)
    if not args.skip_models:
        from annotators.florence2 import build_tiny_florence2
        from annotators.vlm import build_tiny_vlm

        if not (models / "florence2").exists():
            build_tiny_florence2(models / "florence2")
        if not (models / "vlm").exists():
            build_tiny_vlm(models / "vlm")
        _step("cot build (tiny Florence-2 + tiny VLM, real code paths)",
              [*cot_common, "--tagger", "florence2", "--tagger-model", str(models / "florence2"),
               "--verifier", "transformers", "--verifier-model", str(models / "vlm"),
               "--out", str(builds / "cot_models"), "--executor", "local", "--chunk-size", "16", "--quiet"],
              outputs)
    for name in ["det3d", "pointmap", "cot", "cot_sim"]:
        _step(f"verify {name}", ["shards", "verify", str(builds / name)], outputs)
    _step("audit (cot with simulated annotators, against ground truth)",
          ["audit", str(builds / "cot_sim"), "--out", str(out / "audit"),
                                                "--ground-truth", str(world / "ground_truth.json")], outputs)
    run_dir, blind_dir = out / "train", out / "train_blind"
    # every task the held-out evaluation asks for, the vision encoder included (random weights)
    recipe = ["--config", "tiny", "--resume", "auto", "--data.root", str(builds),
              "--data.mix", "det3d@0.6,pointmap@0.1,cot@0.3", "--data.tasks",
              "region_to_3d,detect_3d,point_3d,grounded_cot", "--model.train_vision", "true",
              "--max_steps", str(args.steps), "--checkpoint_every", "100"]
    _step("train tiny GR3D (train scenes)", ["train", *recipe, "--out", str(run_dir)], outputs)
    _step("train the blind baseline (same recipe, constant images)",
          ["train", *recipe, "--data.blind", "true", "--out", str(blind_dir)], outputs)
    _step("evaluate detect_3d on held-out scenes (Omni3D protocol, constrained decoding)",
          ["eval", "det3d", "--gt", val["omni3d"], "--checkpoint", str(run_dir / "final"),
           "--image-root", str(world), "--constrained", "--max-objects", "3", "--max-new-tokens", "300",
           "--visualize", "4", "--out", str(out / "eval")], outputs)
    print("\nheld-out scenes (never trained on), grammar-constrained decoding, percent:")
    _step("evaluate image model and blind baseline on held-out scenes (region->3D, detect_3d, grounding)",
          ["eval", "heldout", "--gt", val["omni3d"], "--cot", str(builds / "cot_val"), "--image-root", str(world),
           "--checkpoint", f"image={run_dir / 'final'}", f"blind={blind_dir / 'final'}",
           "--limit-mentions", "40", "--out", str(out / "eval_heldout")], outputs)

    print(f"\n=== demo finished in {time.perf_counter() - t0:.0f} s; outputs:")
    rows = [
        ("sample world (Omni3D/EmbodiedScan/RefSpatial formats)", world),
        ("det3d corpus", builds / "det3d"),
        ("point-map corpus", builds / "pointmap"),
        ("grounded CoT corpus (oracle)", builds / "cot"),
        ("grounded CoT corpus (simulated annotators)", builds / "cot_sim"),
        ("grounded CoT corpus (tiny models)", builds / "cot_models"),
        ("audit report (simulated-annotator build)", out / "audit" / "report.html"),
        ("training run (metrics.jsonl, loss.png, checkpoints)", run_dir),
        ("held-out detect_3d evaluation", out / "eval" / "det3d_eval.json"),
        ("held-out images with predicted (red) and GT (green) 3D boxes", out / "eval" / "vis"),
    ]
    for label, path in rows:
        if path.exists():
            print(f"  {label:55s} {path}")
    ev = out / "eval_heldout" / "heldout_eval.json"
    print(f"\nheld-out scenes, tiny model after {args.steps} CPU steps next to its blind baseline ({ev}):")
    for name, r in json.loads(ev.read_text()).items():
        g = r.get("grounding") or {}
        print(f"  {name:6s} region->3D AP15 {_pct(r['region3d']['AP15'])}, median depth error "
              f"{r['region3d']['median_rel_depth_error']:.3f}; detect_3d AP15 {_pct(r['detect3d']['AP15'])}; "
              f"grounding Acc@0.5 {_pct(g.get('acc50'))}")
    print("  (a pipeline check at demo scale; the learning benchmark with the small preset: bench/learning.md)")
    return 0
