"""Do the corpora teach? Train GR3D on the sample world's train scenes, score it on held-out scenes.

One command, seeds fixed, resumable (every build, training run and evaluation writes its own output and a
re-run skips what is finished):

    PYTHONPATH=. .venv/bin/python -m bench.learning                  # full: writes bench/learning.md
    PYTHONPATH=. .venv/bin/python -m bench.learning --quick --work /tmp/q   # plumbing only (the test suite)

Steps: sample world (400 scenes x 2 views, 320x240, seed 0) -> train-split det3d, pointmap and cot builds
plus a held-out cot build (`pipelines.sample_world.splits`) -> per seed, the `small` recipe on real images
and the **blind** baseline (same recipe, `data.blind`: constant images, no depth) -> held-out evaluation
(`model.eval.heldout`): region -> 3D (AP3D/AP15/AP25, median relative depth error), detect_3d (Omni3D
AP3D/AP15), 2D grounding Acc@0.5 on held-out grounded-CoT mentions, each with grammar-constrained
decoding and (image model) without; the **category prior** answers the same questions with no model.
Results: WORK/results/*.json, and the table in bench/learning.md (or WORK/learning.md with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTES = "<!-- notes: kept by re-runs -->"
METRICS = [("region3d", "parsed"), ("region3d", "AP3D"), ("region3d", "AP15"), ("region3d", "AP25"), ("region3d", "median_rel_depth_error"),
           ("detect3d", "AP3D"), ("detect3d", "AP15"), ("grounding", "acc50")]


def _cli(argv: list[str]) -> None:
    from pipelines.cli import main

    print(f"$ gr3d {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        raise SystemExit(f"gr3d {argv[0]} failed with exit code {rc}")


def prepare(work: Path, scenes: int, views: int, width: int, height: int) -> tuple[Path, Path]:
    """World + builds (each resumes or is skipped when complete). Returns (world, builds)."""
    from pipelines.sample_world import generate
    from pipelines.sample_world.splits import split_inputs

    world, builds = work / "world", work / "builds"
    if not (world / "sample_world.json").is_file():
        generate(world, scenes=scenes, views=views, seed=0, width=width, height=height)
    ex = ["--executor", "local", "--chunk-size", "200", "--quiet"]
    inputs = {s: split_inputs(world, s) for s in ("train", "val")}
    cot = ["--data-root", str(world), "--image-root", "sample_world", "--depth-root", "RefSpatial/3D/depth",
           "--ground-truth", str(world / "ground_truth.json"), "--tagger", "oracle", "--verifier", "oracle"]
    todo = [
        ("det3d", ["build", "det3d", "--omni3d", inputs["train"]["omni3d"], "--data-root", str(world)]),
        ("pointmap", ["build", "pointmaps", "--source", "embodiedscan", "--embodiedscan",
                      inputs["train"]["embodiedscan"], "--data-root", str(world)]),
        ("cot", ["build", "cot", "--refspatial", *inputs["train"]["refspatial"], *cot]),
        ("cot_val", ["build", "cot", "--refspatial", *inputs["val"]["refspatial"], *cot]),
    ]
    for name, argv in todo:
        if not (builds / name / "manifest.json").is_file():
            _cli([*argv, "--out", str(builds / name), *ex])
    return world, builds


def setup(work: Path, quick: bool, steps: int | None, sets: Sequence[str]) -> tuple[Path, Path, str, int, list[str]]:
    """World and builds (made or reused) and the training recipe: (world, builds, config, steps, overrides).

    Full: 400 scenes x 2 views at 320x240 and the `small` recipe. Quick: 5 scenes at 160x120, the `tiny` model
    for a few steps (plumbing only). `sets` are KEY=VALUE training overrides added to every run.
    """
    if quick:
        world, builds = prepare(work, scenes=5, views=2, width=160, height=120)
        config, steps = "tiny", steps or 3
        overrides = ["--data.mix", "det3d@0.5,pointmap@0.2,cot@0.3",
                     "--data.tasks", "region_to_3d,detect_3d,point_3d,grounded_cot", "--model.train_vision", "true",
                     "--data.batch_size", "4", "--data.num_workers", "0", "--checkpoint_every", "0",
                     "--threads", "1", "--data.max_seq_len", "512"]
    else:
        world, builds = prepare(work, scenes=400, views=2, width=320, height=240)
        config, steps, overrides = "small", steps or 0, []
    for kv in sets:
        k, _, v = kv.partition("=")
        overrides += [f"--{k}", v]
    return world, builds, config, steps, overrides


def train_run(builds: Path, out: Path, config: str, seed: int, steps: int, blind: bool,
              overrides: list[str]) -> float:
    """One training run in a fresh process (its own torch threads); skipped when OUT/final exists."""
    if finished(out, steps):
        return 0.0
    t0 = time.perf_counter()
    cmd = _train_cmd(builds, out, config, seed, steps, blind, overrides)
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: its folder name under WORK/runs, seed and extra overrides.

    The learning bench, the ablations (`bench/ablations.py`) and the noise curve (`bench/noise_impact.py`)
    are grids of these over the same world and builds, so a run another bench already finished is reused.
    """

    name: str
    seed: int
    blind: bool = False
    overrides: tuple[str, ...] = ()


def finished(run: Path, steps: int) -> bool:
    """Whether `run` holds a finished training run, refusing one trained for other than `steps` steps.

    Why: benches reuse finished runs by folder name, so `--steps 1440` on a work folder holding 480-step runs
    would otherwise report the old runs under the new budget. `steps` 0 means the recipe's own, not checked.
    """
    if not (run / "final" / "gr3d_config.json").is_file():
        return False
    cfg = run / "config.json"
    had = json.loads(cfg.read_text()).get("max_steps") if cfg.is_file() else None
    if steps and had is not None and had != steps:
        raise SystemExit(f"{run} is a finished run of {had} steps, not {steps}: "
                         "give the new budget its own run names (--tag) or another --work")
    return True


def train_all(specs: Sequence[RunSpec], builds: Path, runs: Path, config: str, steps: int,
              base_overrides: Sequence[str], parallel: int) -> float:
    """Train every unfinished run, up to `parallel` processes at once (each 1 torch thread + a loader worker)."""
    t0 = time.perf_counter()
    pending = [r for r in specs if not finished(runs / r.name, steps)]
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        procs = [subprocess.Popen(_train_cmd(builds, runs / r.name, config, r.seed, steps, r.blind,
                                             [*base_overrides, *r.overrides]),
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}) for r in batch]
        for pr in procs:
            if pr.wait() != 0:
                raise SystemExit(f"training failed: {' '.join(map(str, pr.args))}")
    return time.perf_counter() - t0


def evaluate_all(jobs: Sequence[tuple[Path, Path, bool]], world: Path, builds: Path, eval_images: int,
                 grounding: int, threads: int, parallel: int) -> list[dict[str, Any]]:
    """`evaluate_run` of every (run folder, result file, constrained), `parallel` processes at once."""
    args = [(run, world, builds, result, c, eval_images, grounding, threads) for run, result, c in jobs]
    return map_parallel(_evaluate_star, args, parallel, sum(not result.is_file() for _, result, _ in jobs))


def map_parallel(star: Callable[[tuple[Any, ...]], Any], args: Sequence[tuple[Any, ...]], parallel: int,
                 todo: int) -> list[Any]:
    """`star(a)` for every `a` in `args`, in `parallel` spawned processes when more than one (`todo`) has work
    left (a cached result costs nothing, so a pool would only add its start-up); else in this process."""
    if parallel > 1 and todo > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(star, args))
    return [star(a) for a in args]


def evaluate_run(run: Path, world: Path, builds: Path, result: Path, constrained: bool, eval_images: int,
                 grounding: int, threads: int) -> dict[str, Any]:
    """Held-out metrics of one trained run (cached in `result`)."""
    if result.is_file():
        return json.loads(result.read_text())
    import torch

    from model.checkpoint import load_pretrained
    from model.eval.heldout import eval_detect3d, eval_grounding, eval_region3d, grounding_items

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gt = _val_gt(world, eval_images)
    model = load_pretrained(run / "final")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"run": str(run), "constrained": constrained}
    out["region3d"] = eval_region3d(model, gt, world, constrained=constrained)
    out["detect3d"], _ = eval_detect3d(model, gt, world, constrained=constrained)
    out["grounding"] = eval_grounding(model, grounding_items(builds / "cot_val", grounding), constrained=constrained)
    out["eval_s"] = time.perf_counter() - t0
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _val_gt(world: Path, eval_images: int) -> Any:
    from model.eval.io import load_omni3d_gt

    gt = load_omni3d_gt([world / "Omni3D" / "SampleWorld_val.json"])
    return gt.subset(sorted(gt.image_dataset)[:eval_images])


def prior_result(world: Path, builds: Path, result: Path, eval_images: int, grounding: int) -> dict[str, Any]:
    if result.is_file():
        return json.loads(result.read_text())
    from model.eval.heldout import CategoryPrior, grounding_items

    prior = CategoryPrior(world / "Omni3D" / "SampleWorld_train.json", builds / "cot")
    gt = _val_gt(world, eval_images)
    out = {"region3d": prior.region3d(gt), "detect3d": prior.detect3d(gt),
           "grounding": prior.grounding(grounding_items(builds / "cot_val", grounding))}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")
    return out


def grounding_all(run: Path, builds: Path, result: Path) -> dict[str, Any]:
    """Held-out 2D grounding Acc@0.5 of one run on every grounded mention of the held-out scenes (cached in
    `result`). Why: `--grounding` scores the first 150 mentions by default, where one mention is 0.67 points and a
    clean model at ~4 % has a binomial standard error of ~1.6 points, as large as the effects measured here;
    all 1,197 mentions of the 400-scene world bring it to ~0.6."""
    if result.is_file():
        return json.loads(result.read_text())
    import torch

    from model.checkpoint import load_pretrained
    from model.eval.heldout import eval_grounding, grounding_items

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = {"run": str(run), "constrained": True,
           "grounding": eval_grounding(load_pretrained(run / "final"), grounding_items(builds / "cot_val"))}
    out["eval_s"] = time.perf_counter() - t0
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")
    return out


def grounding_all_job(x: tuple[Path, Path, Path]) -> dict[str, Any]:
    return grounding_all(*x)


def prior_grounding_all(world: Path, builds: Path, result: Path) -> dict[str, Any]:
    """The category prior's grounding Acc@0.5 on every held-out grounded mention (cached in `result`)."""
    if result.is_file():
        return json.loads(result.read_text())
    from model.eval.heldout import CategoryPrior, grounding_items

    prior = CategoryPrior(world / "Omni3D" / "SampleWorld_train.json", builds / "cot")
    out = {"grounding": prior.grounding(grounding_items(builds / "cot_val"))}
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _fmt(s: dict[str, Any], pct: bool) -> str:
    if s["mean"] is None:
        return "-"
    if s["mean"] == float("inf"):
        return "inf (nothing parsed)"
    k = 100.0 if pct else 1.0
    txt = f"{k * s['mean']:.1f}" if pct else f"{s['mean']:.3f}"
    if s["n"] > 1:
        txt += f" ± {k * s['spread'] / 2:.1f}" if pct else f" ± {s['spread'] / 2:.3f}"
    return txt


def table(rows: dict[str, list[dict[str, Any]]], grounding_all_n: int | None = None) -> str:
    """Markdown table: one row per system, mean ± half the seed range (spread = max - min). With
    `grounding_all_n`, one more column: grounding on every held-out mention (`grounding_all` of a result)."""
    from model.eval.heldout import summary

    metrics = METRICS + ([("grounding_all", "acc50")] if grounding_all_n else [])
    head = ("| system | seeds | r->3D parsed | r->3D AP3D | r->3D AP15 | r->3D AP25 | r->3D med. rel. depth err | det AP3D | det AP15 "
            "| ground Acc@0.5 |" + (f" ground Acc@0.5, all {grounding_all_n} |" if grounding_all_n else ""))
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for name, results in rows.items():
        if not results:
            continue
        for r in results:
            r["region3d"]["parsed"] = r["region3d"]["n_parsed"] / max(1, r["region3d"]["n"])
        cells = [_fmt(summary([(r.get(a) or {}).get(b) for r in results]), b != "median_rel_depth_error")
                 for a, b in metrics]
        lines.append(f"| {name} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "learning", help="work folder (default out/learning)")
    p.add_argument("--quick", action="store_true", help="tiny world, tiny model, a few steps: plumbing only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--eval-images", type=int, default=40, help="held-out images scored (region->3D, detect_3d)")
    p.add_argument("--grounding", type=int, default=150, help="held-out grounded-CoT mentions scored")
    p.add_argument("--grounding-all", action="store_true",
                   help="also score grounding on every held-out mention (constrained runs and the prior; a column)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation")
    p.add_argument("--parallel", type=int, default=1, help="training runs (then evaluations) at once, in separate processes")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra training overrides, e.g. data.batch_size=8 (recorded in the report's command)")
    p.add_argument("--variants", default="image,blind", help="which models to train: image, blind or both")
    p.add_argument("--tag", default="", help="run and result names VARIANT-TAG_sSEED instead of VARIANT_sSEED, "
                   "e.g. a longer budget beside the recipe's runs (`--steps 1440 --tag 1440`)")
    p.add_argument("--report-only", action="store_true", help="no training or evaluation: table of the finished ones")
    p.add_argument("--report", type=Path, default=None, help="markdown report (default bench/learning.md)")
    a = p.parse_args(argv)
    work: Path = a.work.resolve()
    t_start = time.time()
    load0 = os.getloadavg()
    world, builds, config, steps, overrides = setup(work, a.quick, a.steps, a.set)
    eval_images, grounding = (min(a.eval_images, 2), min(a.grounding, 4)) if a.quick else (a.eval_images, a.grounding)
    report = a.report or (work if a.quick else ROOT / "bench") / (f"learning-{a.tag}.md" if a.tag else "learning.md")
    results = work / "results"
    prior = prior_result(world, builds, results / "prior.json", eval_images, grounding)

    rows: dict[str, list[dict[str, Any]]] = {"image (constrained)": [], "image (free decoding)": [],
                                             "blind (constrained)": [], "category prior": [prior]}
    tag = f"-{a.tag}" if a.tag else ""
    if "_s" in tag:
        p.error("--tag must not contain '_s' (run names end in _sSEED)")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not variants or set(variants) - {"image", "blind"}:
        p.error(f"--variants: image, blind or image,blind, not {a.variants!r}")
    specs = [RunSpec(f"{v}{tag}_s{seed}", seed, v == "blind") for seed in a.seeds for v in variants]
    train_s = {"all runs": 0.0 if a.report_only else
               train_all(specs, builds, work / "runs", config, steps, overrides, a.parallel)}
    evals = [(r.name.split("_s")[0], r.seed, work / "runs" / r.name, c) for r in specs
             for c in ((True, False) if not r.blind else (True,))]
    if a.report_only:  # only what is already evaluated
        evals = [e for e in evals if (results / f"{e[0]}_s{e[1]}_{'constrained' if e[3] else 'free'}.json").is_file()]
    t0 = time.perf_counter()
    all_n = None
    if a.grounding_all:
        prior["grounding_all"] = prior_grounding_all(world, builds, results / "prior_grounding_all.json")["grounding"]
        all_n = prior["grounding_all"]["n"]
    outs = evaluate_all([(run, results / f"{v}_s{seed}_{'constrained' if c else 'free'}.json", c)
                         for v, seed, run, c in evals], world, builds, eval_images, grounding, a.threads, a.parallel)
    if a.grounding_all:
        gjobs = [(run, builds, results / f"{v}_s{seed}_grounding_all.json") for v, seed, run, c in evals if c]
        got = map_parallel(grounding_all_job, gjobs, a.parallel, sum(not r.is_file() for _, _, r in gjobs))
        by_run = {str(run): g["grounding"] for (run, _, _), g in zip(gjobs, got)}
        for (_, _, run, c), r in zip(evals, outs):
            if c:
                r["grounding_all"] = by_run[str(run)]
    train_s["all evaluations"] = time.perf_counter() - t0
    for (v, seed, _, c), r in zip(evals, outs):
        rows[f"{v.split('-')[0]} ({'constrained' if c else 'free decoding'})"].append(r)
        print(f"{v} seed {seed} {'constrained' if c else 'free'}: "
              + json.dumps({k: r[k] for k in ("region3d", "detect3d", "grounding")}), flush=True)
    md = render(rows, a, work, config, steps, eval_images, grounding, load0, os.getloadavg(), t_start, train_s,
                all_n)
    report.parent.mkdir(parents=True, exist_ok=True)
    old = report.read_text() if report.is_file() else ""
    if NOTES in old:  # hand-written analysis below the marker survives a re-run
        md += "\n" + old[old.index(NOTES):]
    report.write_text(md)
    print(md)
    return 0


def _evaluate_star(x: tuple[Any, ...]) -> dict[str, Any]:
    return evaluate_run(*x)


def _train_cmd(builds: Path, run: Path, config: str, seed: int, steps: int, blind: bool,
               overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--config", config, "--resume", "auto",
            "--data.root", str(builds), "--seed", str(seed), *(["--max_steps", str(steps)] if steps else []),
            "--data.blind", str(blind).lower(), "--out", str(run), *overrides]


def _loss_curve(run: Path) -> str:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    if not rows:
        return "-"
    return f"{rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f} (step {rows[-1]['step']})"


def render(rows: dict[str, list[dict[str, Any]]], a: argparse.Namespace, work: Path, config: str, steps: int,
           eval_images: int, grounding: int, load0: tuple[float, ...], load1: tuple[float, ...], t_start: float,
           train_s: dict[str, float], grounding_all_n: int | None = None) -> str:
    cmd = "PYTHONPATH=. .venv/bin/python -m bench.learning " + " ".join(sys.argv[1:])
    curves = []
    for d in sorted((work / "runs").glob("*")) if (work / "runs").is_dir() else []:
        if (d / "metrics.jsonl").is_file():
            curves.append(f"- `{d.name}`: loss {_loss_curve(d)}")
    return "\n".join([
        "# Learning on the sample world: held-out scenes",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores ({platform.python_version()}), shared; load average at start "
        f"{load0[0]:.1f}, at end {load1[0]:.1f}; wall {time.time() - t_start:.0f} s this invocation.  ",
        f"Config `{config}`, steps per run {steps or 'recipe default'}, seeds {a.seeds}; held-out: first "
        f"{eval_images} val images (region->3D on each non-ignored object, detect_3d on each (image, category "
        f"present)), first {grounding} grounded mentions of the held-out CoT build"
        + (f" (and all {grounding_all_n}, last column: the first {grounding} are an easier subset)."
           if grounding_all_n else "."),
        "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in train_s.items()) + ".",
        "",
        "Percent, mean ± half the range over seeds; depth error is a ratio (lower is better).",
        "",
        table(rows, grounding_all_n),
        "",
        "Training loss (first logged -> last):",
        *curves,
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
