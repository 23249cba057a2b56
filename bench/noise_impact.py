"""What annotation noise costs: cot corpora at several noise levels -> audit -> train -> held-out scores.

Why: the GR3D paper leaves the effect of its auto-annotation noise unquantified. On the sample world the
truth is known, so the simulated annotators (annotators/sim.py) can make the same grounded-CoT corpus at
chosen noise levels, the audit measures each corpus's precision, and a model trained on each is scored on
the held-out scenes. Everything but the cot corpus is the learning bench's (`bench/learning.py`): the same
world, det3d and point-map builds, recipe, steps and held-out evaluation (`model.eval.heldout`: 2D grounding
Acc@0.5 on the held-out oracle cot build, detect_3d AP15 with the Omni3D protocol). The clean level is the
learning bench's own oracle-annotated run (`image_s{seed}`), reused, not retrained.

One run = (noise level, verify on/off, seed); the seed drives both the simulated errors and training:

    WORK/noise/cot_L{level}_{v|nv}_s{seed}   gr3d build cot --tagger sim --verifier sim|none --noise-scale L
    WORK/noise/audit_...                      gr3d audit (measured precision / recall against the truth)
    WORK/runs/noise_L..._s{seed}              gr3d train (recipe mixture with this cot build)
    WORK/results/noise_L..._s{seed}.json      held-out grounding + detect_3d

Resumable: every build, audit, training run and evaluation is skipped when its output exists. At the end
the results are gathered into noise_impact.json and noise_impact.png (metric vs measured corpus precision,
mean over seeds with min-max bars): bench/ in full mode, WORK in quick mode.

    .venv/bin/python -m bench.noise_impact --quick --work /tmp/noise     # plumbing check (test suite)
    .venv/bin/python -m bench.noise_impact --parallel 2                   # the curve (after bench.learning)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.learning import (
    ROOT,
    RunSpec,
    evaluate_all,
    finished,
    grounding_all_job,
    map_parallel,
    setup,
    train_all,
)

COT_MIX_NAME = "cot"
"""Name of the cot corpus in the recipe's mixture; each noise run swaps in its own build at the same weight."""


def _cli(argv: list[str]) -> None:
    from pipelines.cli import main

    rc = main(argv)
    if rc:
        raise SystemExit(f"noise_impact: `gr3d {' '.join(argv)}` failed with exit code {rc}")


def recipe_mix(config: str, overrides: list[str]) -> str:
    """The training mixture the runs use: `--data.mix` of the overrides, else the config's."""
    from model.train_config import load_config, parse_override_args

    return parse_override_args(overrides).get("data.mix") or load_config(config).data.mix


def with_cot(mix: str, cot: Path) -> str:
    """`mix` with its cot corpus replaced by the build at `cot` (same weight)."""
    items = []
    for item in mix.split(","):
        name, _, w = item.strip().partition("@")
        items.append(f"{cot}@{w}" if name == COT_MIX_NAME else item.strip())
    if not any(i.startswith(str(cot)) for i in items):
        raise SystemExit(f"noise_impact: the recipe's mixture {mix!r} has no {COT_MIX_NAME!r} corpus to swap")
    return ",".join(items)


def build_and_audit(world: Path, noise: Path, name: str, level: float, verify: bool, seed: int) -> dict[str, Any]:
    """The cot corpus of one noise setting and its audit against the truth (both skipped when done)."""
    from pipelines.sample_world.splits import split_inputs

    cot, audit = noise / f"cot_{name}", noise / f"audit_{name}"
    if not (cot / "manifest.json").is_file():
        _cli(["build", "cot", "--refspatial", *split_inputs(world, "train")["refspatial"], "--data-root", str(world),
              "--image-root", "sample_world", "--depth-root", "RefSpatial/3D/depth", "--ground-truth",
              str(world / "ground_truth.json"), "--tagger", "sim", "--verifier", "sim" if verify else "none",
              "--noise-scale", str(level), "--sim-seed", str(seed), "--allow-partial", "--executor", "local",
              "--chunk-size", "200", "--quiet", "--out", str(cot)])
    return _audit(cot, audit, world)


def _audit(cot: Path, audit: Path, world: Path) -> dict[str, Any]:
    if not (audit / "audit.json").is_file():
        _cli(["audit", str(cot), "--out", str(audit), "--gallery", "0", "--no-verify",
              "--ground-truth", str(world / "ground_truth.json")])
    agreement = json.loads((audit / "audit.json").read_text())["agreement"]
    g = agreement["ground_truth"]
    return {"build": str(cot), "n_written_mentions": g["n_written"], "precision": g["precision"],
            "precision_ci": g["precision_ci"], "recall": g["recall"],
            "verifier_accuracy": (agreement.get("verifier") or {}).get("accuracy")}


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y on x (None with fewer than two distinct x)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def _pct(x: float | None) -> float | None:
    """A fraction (accuracy, AP) in points; None stays None (no detection scored)."""
    return None if x is None else 100 * x


def answer(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The bench's two answers, from the per-run rows (each run one point, so the seeds' spread shows).

    - `ground2d_per_precision_point`: held-out grounding Acc@0.5 points per point of measured corpus
      precision, the least-squares slope over every run (each (level, verify) setting counted once per seed:
      the clean runs appear in both verify arms but are one training run), with the slope fitted on each
      seed's runs alone as the spread. The same for detect_3d AP15.
    - `verify`: per noise level with both arms, verify-on minus verify-off, paired by seed (the same seed
      makes the same tagger errors, so the difference is the verify stage's): corpus precision, recall,
      held-out grounding, detect_3d AP15, all in points, as mean and min..max over seeds.
    """
    seen: dict[str, dict[str, Any]] = {}
    for r in runs:
        seen.setdefault(r["run"], r)  # a clean run counted once though it stands in both arms
    uniq = list(seen.values())

    def fit(get: Any) -> dict[str, Any]:
        pts = [(r["seed"], 100 * r["corpus"]["precision"], get(r)) for r in uniq
               if r["corpus"]["precision"] is not None and get(r) is not None]
        per_seed = {s: _slope([(x, y) for t, x, y in pts if t == s]) for s in sorted({t for t, _, _ in pts})}
        slopes = [v for v in per_seed.values() if v is not None]
        return {"slope": _slope([(x, y) for _, x, y in pts]), "n_runs": len(pts), "per_seed": per_seed,
                "min": min(slopes) if slopes else None, "max": max(slopes) if slopes else None}

    by = {(r["noise_scale"], r["verify"], r["seed"]): r for r in runs}
    verify = []
    for level in sorted({r["noise_scale"] for r in runs if r["noise_scale"] > 0}):
        seeds = sorted(s for (lv, v, s) in by if lv == level and v and (lv, False, s) in by)
        if not seeds:
            continue
        row: dict[str, Any] = {"noise_scale": level, "seeds": seeds}
        for name, get in (("precision", lambda r: 100 * r["corpus"]["precision"]),
                          ("recall", lambda r: 100 * r["corpus"]["recall"]),
                          ("ground2d_acc", lambda r: 100 * r["ground2d"]["accuracy"]),
                          ("detect3d_ap15", lambda r: _pct(r["detect3d"]["AP15"]))):
            d = [get(by[(level, True, s)]) - get(by[(level, False, s)]) for s in seeds
                 if get(by[(level, True, s)]) is not None and get(by[(level, False, s)]) is not None]
            row[name] = {"mean": sum(d) / len(d), "min": min(d), "max": max(d)} if d else None
        verify.append(row)
    return {"ground2d_per_precision_point": fit(lambda r: 100 * r["ground2d"]["accuracy"]),
            "detect3d_ap15_per_precision_point": fit(lambda r: _pct(r["detect3d"]["AP15"])),
            "verify": verify}


def summarize(runs: list[dict[str, Any]], out: Path, blind: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-run rows -> noise_impact.json (runs + per-setting table + answer) and noise_impact.png; `blind`:
    the blind runs' grounding on the same mentions, drawn as the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple[float, bool], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["noise_scale"], r["verify"]), []).append(r)

    def stat(rs: list[dict[str, Any]], get: Any) -> dict[str, float | None]:
        v = [x for x in (get(r) for r in rs) if x is not None and x == x]
        return {"mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v))} if v else \
            {"mean": None, "min": None, "max": None}

    table = [{"noise_scale": level, "verify": verify, "seeds": sorted(r["seed"] for r in rs),
              "precision": stat(rs, lambda r: r["corpus"]["precision"]),
              "recall": stat(rs, lambda r: r["corpus"]["recall"]),
              "ground2d_acc": stat(rs, lambda r: r["ground2d"]["accuracy"]),
              "detect3d_ap15": stat(rs, lambda r: r["detect3d"]["AP15"])}
             for (level, verify), rs in sorted(groups.items())]
    doc = _nan_to_none({"runs": runs, "table": table, "answer": answer(runs), "blind": blind or {}})
    out.mkdir(parents=True, exist_ok=True)
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
            err = [[t[metric]["mean"] - t[metric]["min"] for t in rows],
                   [t[metric]["max"] - t[metric]["mean"] for t in rows]]
            ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label="verify" if verify else "no verify")
            for t, xi, yi in zip(rows, x, y):
                ax.annotate(f"x{t['noise_scale']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if metric == "ground2d_acc" and doc["blind"]:
            b = [v["accuracy"] for v in doc["blind"].values()]
            ax.axhspan(min(b), max(b), color="0.85", zorder=0)
            ax.axhline(sum(b) / len(b), color="0.5", lw=1, ls="--", label="blind model (no image)")
        ax.set_xlabel("measured corpus precision@0.5 (audit)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "noise_impact.png", dpi=100)
    plt.close(fig)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "learning",
                   help="the learning bench's work folder (world, builds, runs are shared; default out/learning)")
    p.add_argument("--quick", action="store_true",
                   help="plumbing check: tiny world, tiny model, a few steps, levels 0 and 2, one seed")
    p.add_argument("--levels", default="0,1,2,4", help="noise scales (0 = the clean oracle corpus, 1 = realistic)")
    p.add_argument("--verify", default="on,off", help="verify stage: on, off or on,off")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (sim errors and training)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--eval-images", type=int, default=40, help="held-out images scored by detect_3d")
    p.add_argument("--grounding", type=int, default=150, help="held-out grounded-CoT mentions scored")
    p.add_argument("--grounding-all", action="store_true",
                   help="score grounding on every held-out mention (1,197 on the full world, not --grounding's "
                        "first ones) for the table, the plot and the answer; the blind runs too, as a baseline")
    p.add_argument("--only-finished", action="store_true",
                   help="gather only the settings whose training runs are finished (train nothing): the curve "
                        "so far, while other settings are still to train")
    p.add_argument("--parallel", type=int, default=1, help="training runs (then evaluations) at once")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training overrides")
    p.add_argument("--out", type=Path, default=None,
                   help="where noise_impact.json/.png go (default: bench/ in full mode, WORK in quick mode)")
    a = p.parse_args(argv)
    work: Path = a.work.resolve()
    world, builds, config, steps, overrides = setup(work, a.quick, a.steps, a.set)
    eval_images, grounding = (min(a.eval_images, 2), min(a.grounding, 4)) if a.quick else (a.eval_images, a.grounding)
    if a.quick:
        a.levels, a.seeds = "0,2", [0]
    out = a.out or (work if a.quick else ROOT / "bench")
    mix = recipe_mix(config, overrides)
    noise = work / "noise"
    settings = [(float(x), v == "on") for x in a.levels.split(",") for v in a.verify.split(",")]
    settings = [s for i, s in enumerate(settings) if s[0] > 0 or s not in settings[:i]]
    rows: list[tuple[str, float, bool, int, dict[str, Any]]] = []
    specs: list[RunSpec] = []
    clean = _audit(builds / "cot", noise / "audit_clean", world)
    for seed in a.seeds:
        for level, verify in settings:
            if level == 0:  # the clean corpus is the learning bench's oracle build; its runs are image_s{seed}
                rows.append((f"image_s{seed}", level, verify, seed, clean))
                specs.append(RunSpec(f"image_s{seed}", seed))
                continue
            name = f"L{level:g}_{'v' if verify else 'nv'}_s{seed}"
            corpus = build_and_audit(world, noise, name, level, verify, seed)
            rows.append((f"noise_{name}", level, verify, seed, corpus))
            specs.append(RunSpec(f"noise_{name}", seed,
                                 overrides=("--data.mix", with_cot(mix, Path(corpus["build"])))))
    if a.only_finished:
        done = {sp.name for sp in specs if finished(work / "runs" / sp.name, steps or 0)}
        left = sorted({r[0] for r in rows} - done)
        if left:
            print(f"--only-finished: leaving out {len(left)} run(s) not trained yet: {', '.join(left)}")
        rows = [r for r in rows if r[0] in done]
        specs = [sp for sp in specs if sp.name in done]
    t0 = time.perf_counter()
    train_all(list(dict.fromkeys(specs)), builds, work / "runs", config, steps, overrides, a.parallel)
    train_s = time.perf_counter() - t0
    results = work / "results"
    jobs = list(dict.fromkeys((work / "runs" / r[0], results / f"{r[0]}_constrained.json", True) for r in rows))
    evaluate_all(jobs, world, builds, eval_images, grounding, 1, a.parallel)
    full: dict[str, Any] = {}
    if a.grounding_all:
        names = list(dict.fromkeys(r[0] for r in rows)) + [f"blind_s{s}" for s in a.seeds
                                                           if (work / "runs" / f"blind_s{s}" / "final").is_dir()]
        gjobs = [(work / "runs" / n, builds, results / f"{n}_grounding_all.json") for n in names]
        got = map_parallel(grounding_all_job, gjobs, a.parallel, sum(not r.is_file() for _, _, r in gjobs))
        full = {n: g["grounding"] for n, g in zip(names, got)}
    runs = []
    for run, level, verify, seed, corpus in rows:
        res = json.loads((results / f"{run}_constrained.json").read_text())
        first = {"accuracy": res["grounding"]["acc50"], "n": res["grounding"]["n"]}
        runs.append({"name": f"L{level:g}_{'v' if verify else 'nv'}_s{seed}", "run": run, "noise_scale": level,
                     "verify": verify, "seed": seed, "config": config, "steps": steps or "recipe",
                     "corpus": {k: v for k, v in corpus.items() if k != "build"},
                     "ground2d": ({"accuracy": full[run]["acc50"], "n": full[run]["n"]} if run in full else first),
                     "ground2d_first": first,
                     "detect3d": {"AP15": res["detect3d"]["AP15"], "AP3D": res["detect3d"]["AP3D"]}})
        print(f"{runs[-1]['name']}: precision {corpus['precision']}, grounding Acc@0.5 "
              f"{runs[-1]['ground2d']['accuracy']} (n {runs[-1]['ground2d']['n']}), "
              f"detect_3d AP15 {res['detect3d']['AP15']}", flush=True)
    blind = {n: {"accuracy": g["acc50"], "n": g["n"]} for n, g in full.items() if n.startswith("blind_")}
    doc = summarize(runs, out, blind)
    g = doc["answer"]["ground2d_per_precision_point"]
    if g["slope"] is not None:
        print(f"held-out grounding Acc@0.5: {g['slope']:+.3f} points per point of corpus precision "
              f"(per seed {g['min']:+.3f}..{g['max']:+.3f}, {g['n_runs']} runs)" if g["min"] is not None else
              f"held-out grounding Acc@0.5: {g['slope']:+.3f} points per point of corpus precision")
    for v in doc["answer"]["verify"]:
        if v["precision"] and v["ground2d_acc"]:
            print(f"verify at x{v['noise_scale']:g}: precision {v['precision']['mean']:+.1f} points, "
                  f"held-out grounding {v['ground2d_acc']['mean']:+.1f} points (seeds {v['seeds']})")
    print(f"wrote {out / 'noise_impact.json'} and {out / 'noise_impact.png'} (training {train_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
