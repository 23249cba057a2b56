"""Annotation-noise audit of a built corpus: `gr3d audit`.

The paper leaves the auto-annotation noise unquantified; users who regenerate a corpus must know
how noisy it is, where, and what it costs. This package reads a finished build (shards, index,
rejects, the per-stage intermediate Parquet of the model stages and, on the sample world, the
ground truth) and reports:

| module       | what                                                                             |
|--------------|----------------------------------------------------------------------------------|
| `load.py`    | `load_build`: everything of a build, checked, with errors that name the file     |
| `metrics.py` | funnel, annotator agreement (tagger / verifier / written / ground truth), rewrite |
|              | statistics, 2D box, det3d and point-map distributions and outliers              |
| `errors.py`  | the error gallery: caught / missed / lost / correct mentions, counted and drawn  |
| `ambiguity.py` | whether each written description singles out its object (sample-world truth)  |
| `plots.py`   | matplotlib (Agg) figures as PNG bytes                                            |
| `report.py`  | `write_report`: one self-contained HTML file + `audit.json` (schema `audit`)     |
| `review.py`  | stratified human-review sheet (`sample_for_review`) and its score (`score_sheet`) |
| `perturb.py` | `perturb_build`: a copy of a build with controlled, recorded box noise           |
| `cli.py`     | `gr3d audit BUILD`, `gr3d audit sample`, `gr3d audit score`, `gr3d audit perturb` |

Importing the package is cheap; numpy, pyarrow and matplotlib load inside the modules that need them.
"""

from __future__ import annotations

__all__: list[str] = []
