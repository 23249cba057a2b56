"""`gr3d demo`: the whole system on the embedded sample world, printing where each output is.

It runs the same commands a user runs, in order, through `pipelines.cli.main`:
sample world -> det3d, pointmaps and cot builds (oracle annotators; simulated annotators with realistic,
recorded errors; then the real Florence-2 / VLM code paths on tiny random-weight models built offline) ->
`shards verify` -> audit report of the simulated-annotator build (the oracle build would audit at 100 %)
-> a short tiny-model training -> Omni3D evaluation. Every step resumes: a re-run skips finished shards and checkpoints.
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
    p.add_argument("--scenes", type=int, default=6, help="sample-world scenes (default: 6)")
    p.add_argument("--views", type=int, default=3, help="camera views per scene (default: 3)")
    p.add_argument("--steps", type=int, default=200, help="tiny-model training steps (default: 200)")
    p.add_argument("--executor", choices=["ray", "beam", "local"], default="ray",
                   help="executor of the builds (default: ray, embedded)")
    p.add_argument("--skip-models", action="store_true",
                   help="skip the CoT build with tiny Florence-2 / VLM models (the oracle build still runs)")
    p.set_defaults(func=run)


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
    _step("det3d build", ["build", "det3d", "--sample-world", str(world), "--out", str(builds / "det3d"), *ex],
          outputs)
    _step("pointmaps build", ["build", "pointmap", "--source", "embodiedscan",
                              "--embodiedscan", *map(str, sorted((world / "embodiedscan").glob("*.pkl"))),
                              "--data-root", str(world), "--out", str(builds / "pointmap"), *ex], outputs)
    refspatial = [f"RefSpatial/3D/{name}.json" for name in ("reasoning_template_qa", "choice_qa")]
    cot_common = ["build", "cot", "--refspatial", *refspatial, "--data-root", str(world),
                  "--ground-truth", str(world / "ground_truth.json")]
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
    run_dir = out / "train"
    # Stage 2 (detection CoT) is what the evaluator prompts; stage 1's tasks are covered by the tests.
    _step("train tiny GR3D", ["train", "--config", "tiny", "--resume", "auto", "--data.root", str(builds),
                              "--data.mix", "det3d@0.8,cot@0.2", "--stage", "2",
                              "--max_steps", str(args.steps), "--checkpoint_every", "100",
                              "--out", str(run_dir)], outputs)
    omni3d = [str(p) for p in sorted((world / "Omni3D").glob("*_val.json"))] or \
        [str(p) for p in sorted((world / "Omni3D").glob("*.json"))]
    _step("evaluate (Omni3D protocol)", ["eval", "det3d", "--gt", *omni3d, "--checkpoint", str(run_dir / "final"),
                                         "--image-root", str(world), "--max-new-tokens", "160",
                                         "--out", str(out / "eval")], outputs)

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
        ("evaluation", out / "eval" / "det3d_eval.json"),
    ]
    for label, path in rows:
        if path.exists():
            print(f"  {label:55s} {path}")
    ev = out / "eval" / "det3d_eval.json"
    if ev.exists():
        overall = json.loads(ev.read_text()).get("overall", {})
        print(f"  overall AP3D of the tiny model: {overall.get('AP3D', float('nan'))} "
              "(it is scored on views it trained on: a check of the pipeline, not a benchmark)")
    return 0
