"""Underfit or overfit? Score trained learning-bench runs on TRAIN scenes, as the held-out evaluation does.

Same region -> 3D and grounding evaluation as `bench/learning.py` (`model.eval.heldout`), on the first N train
images of the sample world's Omni3D train file and the train-scene cot build. Equal train and held-out figures
mean the model underfits (bench/learning.md, "Reading").

    PYTHONPATH=. .venv/bin/python -m bench.learning_fit out/learning/runs/image_s0 out/learning/runs/blind_s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with final/)")
    p.add_argument("--work", type=Path, default=Path("out/learning"), help="the learning bench's work folder")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--grounding", type=int, default=150)
    a = p.parse_args(argv)
    import torch

    from model.checkpoint import load_pretrained
    from model.eval.heldout import eval_grounding, eval_region3d, grounding_items
    from model.eval.io import load_omni3d_gt

    torch.set_num_threads(1)
    world = a.work / "world"
    gt = load_omni3d_gt([world / "Omni3D" / "SampleWorld_train.json"])
    gt = gt.subset(sorted(gt.image_dataset)[:a.images])
    items = grounding_items(a.work / "builds" / "cot", a.grounding)
    for run in a.runs:
        m = load_pretrained(run / "final")
        r = eval_region3d(m, gt, world)
        g = eval_grounding(m, items)
        print(json.dumps({"run": str(run), "split": "train",
                          "region3d": {k: r[k] for k in ("AP3D", "AP15", "median_rel_depth_error")},
                          "grounding": g}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
