"""The GR3D paper's ablations in miniature, on the sample world: one change at a time from the learning recipe.

Rows (each trained with the learning bench's recipe, steps and seeds, scored on the held-out scenes with
`model.eval.heldout`; the baseline is the learning bench's own `image_s{seed}` run, reused):

- `baseline`: the `small` recipe: grounded 2D -> 3D answers, point maps at 100 %, letterbox images (the
  1000/fx scale only fixes the aspect ratio there, so camera normalization is effectively off);
- `camera_norm`: the fixed-focal canvas (`model.image_mode=focal`): objects of equal size at equal depth
  have equal apparent size whatever the focal length (the paper's "+Cam");
- `direct_3d`: detect_3d answers give only 3D boxes, no grounded 2D box first (the paper's "2D -> 3D" off);
- `pointmap_0`, `pointmap_50`: no point-map corpus; half of it (half of its shards, at half its mixture
  weight, so the rest of the mixture is seen as often as with all of it).

    .venv/bin/python -m bench.ablations --parallel 2                  # writes bench/ablations.md
    .venv/bin/python -m bench.ablations --quick --work /tmp/abl       # plumbing only (tiny world and model)

Resumable like the learning bench (a finished run or evaluation is skipped), in the same work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.learning import ROOT, RunSpec, evaluate_all, setup, train_all
from bench.noise_impact import recipe_mix

NOTES = "<!-- notes: kept by re-runs -->"

PAPER = """The paper's Table 5 (cumulative, GR3D-8B; SUN RGB-D and KITTI AP15 / AP3D): none 30.19 / 20.27 and
10.08 / 6.22; +2D->3D 42.29 / 29.87 and 15.61 / 10.03; +point maps 41.24 / 30.95 and 21.55 / 14.35; +camera
normalization 43.49 / 31.64 and 22.18 / 14.75. Its Fig. 5 (point-map data 0 / 5 / 100 %, SUN RGB-D, GT 2D boxes
as input): AP15 52 / 53 / 59, AP3D 38 / 39 / 43."""


CANVAS_FOCAL = {False: "103.7", True: "69.2"}
"""Focal length (px) of the canvas at which the sample world's widest view (its shortest focal length, 78 degrees
across the image) just fits: the `small` preset's 168 px canvas on the 320 px world; quick: the tiny preset's
112 px canvas on the 160 px world (docs/model.md)."""


def half_build(src: Path, dest: Path) -> Path:
    """A build directory holding the first half of `src`'s finished shards (hard links), for `pointmap_50`."""
    if (dest / "manifest.json").is_file():
        return dest
    from shards.layout import BuildLayout, shard_name

    layout = BuildLayout(src)
    done = list(layout.done_shards())
    keep = done[: max(1, len(done) // 2)]
    (dest / "shards").mkdir(parents=True, exist_ok=True)
    for i in keep:
        for p in (src / "shards").glob(f"{shard_name(i)}.*"):
            target = dest / "shards" / p.name
            if not target.exists():
                os.link(p, target)
    for name in ("plan.json", "run.json", "manifest.json"):  # manifest last: it marks the copy complete
        if (src / name).is_file():
            os.link(src / name, dest / name)
    return dest


def _mix_without(mix: str, corpus: str, replace: str | None = None, weight_factor: float = 1.0) -> str:
    items = []
    for item in mix.split(","):
        name, _, w = item.strip().partition("@")
        if name != corpus:
            items.append(item.strip())
        elif replace is not None:
            items.append(f"{replace}@{float(w or 1) * weight_factor:g}")
    return ",".join(items)


ROWS: dict[str, tuple[str, Callable[[str, Path, bool], tuple[str, ...]]]] = {
    "baseline": ("the small recipe (2D->3D, point maps 100 %, letterbox)", lambda mix, b, q: ()),
    "camera_norm": ("+ fixed-focal canvas (camera normalization real)",
                    lambda mix, b, q: ("--model.image_mode", "focal", "--model.canvas_focal", CANVAS_FOCAL[q])),
    "direct_3d": ("detect_3d answers without the grounded 2D box", lambda mix, b, q: ("--data.det3d_answer", "direct")),
    "pointmap_0": ("no point-map data", lambda mix, b, q: ("--data.mix", _mix_without(mix, "pointmap"))),
    "pointmap_50": ("half the point-map data (half its shards, half its weight)",
                    lambda mix, b, q: ("--data.mix", _mix_without(mix, "pointmap", str(half_build(b / "pointmap",
                                                                                              b / "pointmap_half")), 0.5))),
}

METRICS = [("region3d", "AP3D"), ("region3d", "AP15"), ("region3d", "median_rel_depth_error"), ("detect3d", "AP3D"),
           ("detect3d", "AP15"), ("grounding", "acc50")]


def _versus(rs: list[dict[str, Any]], base: list[dict[str, Any]], metric: tuple[str, str], scale: float,
            digits: int) -> str:
    """A row's mean minus the baseline's, and whether it exceeds the seed spread (the larger of the two ranges)."""
    from model.eval.heldout import summary

    s, b = (summary([r[metric[0]].get(metric[1]) for r in x]) for x in (rs, base))
    if s["mean"] is None or b["mean"] is None or float("inf") in (s["mean"], b["mean"]):
        return "-"
    d = scale * (s["mean"] - b["mean"])
    noise = scale * max(s["spread"] or 0, b["spread"] or 0)
    return f"{d:+.{digits}f} ({'beyond' if abs(d) > noise else 'within'} the seed spread {noise:.{digits}f})"


def render(results: dict[str, list[dict[str, Any]]], header: list[str]) -> str:
    from model.eval.heldout import summary

    lines = [*header, "",
             "| row | what changes | seeds | r->3D AP3D | r->3D AP15 | r->3D med. rel. depth err | det AP3D | det AP15 "
             "| ground Acc@0.5 | AP15 (r->3D) vs baseline | depth err vs baseline (lower is better) |",
             "|" + "---|" * 11]
    base = results.get("baseline", [])
    for name, rs in results.items():
        if not rs:
            continue
        cells = []
        for a, b in METRICS:
            s = summary([r[a].get(b) for r in rs])
            pct = b != "median_rel_depth_error"
            k = 100.0 if pct else 1.0
            if s["mean"] is None:
                cells.append("-")
            elif s["mean"] == float("inf"):
                cells.append("inf")
            else:
                cells.append(f"{k * s['mean']:.{1 if pct else 3}f} ± {k * (s['spread'] or 0) / 2:.{1 if pct else 3}f}")
        if name == "baseline" or not base:
            verdicts = ["-", "-"]
        else:
            verdicts = [_versus(rs, base, ("region3d", "AP15"), 100.0, 1),
                        _versus(rs, base, ("region3d", "median_rel_depth_error"), 1.0, 3)]
        lines.append(f"| {name} | {ROWS[name][0]} | {len(rs)} | " + " | ".join(cells + verdicts) + " |")
    return "\n".join([*lines, "", "Percent (AP, Acc), mean ± half the range over seeds; depth error is a ratio. "
                      "'Beyond the seed spread': the difference of means exceeds the larger of the two rows' ranges.",
                      "", PAPER, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "learning", help="the learning bench's work folder")
    p.add_argument("--quick", action="store_true", help="tiny world, tiny model, a few steps: plumbing only")
    p.add_argument("--rows", default=",".join(ROWS), help=f"rows to run (default all: {','.join(ROWS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--eval-images", type=int, default=40)
    p.add_argument("--grounding", type=int, default=150)
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every row")
    p.add_argument("--report", type=Path, default=None, help="default bench/ablations.md (WORK/ablations.md quick)")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    work: Path = a.work.resolve()
    t0, load0 = time.time(), os.getloadavg()
    world, builds, config, steps, overrides = setup(work, a.quick, a.steps, a.set)
    eval_images, grounding = (min(a.eval_images, 2), min(a.grounding, 4)) if a.quick else (a.eval_images, a.grounding)
    mix = recipe_mix(config, overrides)
    specs: dict[str, list[RunSpec]] = {}
    for row in rows:
        extra = ROWS[row][1](mix, builds, a.quick)
        specs[row] = [RunSpec(f"image_s{s}" if row == "baseline" else f"abl_{row}_s{s}", s, overrides=extra)
                      for s in a.seeds]
    train_all([s for ss in specs.values() for s in ss], builds, work / "runs", config, steps, overrides, a.parallel)
    results = work / "results"
    jobs = [(work / "runs" / s.name, results / f"{s.name}_constrained.json", True) for ss in specs.values() for s in ss]
    outs = iter(evaluate_all(jobs, world, builds, eval_images, grounding, 1, a.parallel))
    by_row = {row: [next(outs) for _ in ss] for row, ss in specs.items()}
    cmd = "PYTHONPATH=. .venv/bin/python -m bench.ablations " + " ".join(sys.argv[1:] if argv is None else argv)
    header = ["# The paper's ablations in miniature (sample world, held-out scenes)", "",
              f"Command: `{cmd}`  ",
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores; load average "
              f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; wall {time.time() - t0:.0f} s.  ",
              f"Config `{config}`, steps per run {steps or 'recipe'}, seeds {a.seeds}, {eval_images} held-out images, "
              f"{grounding} grounded mentions; constrained decoding. One change at a time from the baseline."]
    md = render(by_row, header)
    report = a.report or (work / "ablations.md" if a.quick else ROOT / "bench" / "ablations.md")
    old = report.read_text() if report.is_file() else ""
    if NOTES in old:
        md += "\n" + old[old.index(NOTES):]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(md)
    (report.with_suffix(".json")).write_text(json.dumps(by_row, indent=1, default=str) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
