"""`--sample-world DIR` is one flag for every builder and means the same as spelling the world's files out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipelines.cli import build_parser


def _builder(argv: list[str]) -> Any:
    args = build_parser().parse_args(argv)
    return args.builder_spec.make(args)


@pytest.mark.parametrize("corpus", ["det3d", "pointmaps", "cot"])
def test_sample_world_flag_equals_explicit_inputs(sample_world: Any, tmp_path: Path, corpus: str) -> None:
    w = sample_world
    explicit = {
        "det3d": ["--omni3d", *map(str, w.omni3d_files), "--embodiedscan", *map(str, w.embodiedscan_files),
                  "--data-root", str(w.root)],
        "pointmaps": ["--source", "embodiedscan", "--embodiedscan", *map(str, w.embodiedscan_files),
                      "--data-root", str(w.root)],
        "cot": ["--refspatial", *(str(f.json_path) for f in w.refspatial_files), "--data-root", str(w.root),
                "--ground-truth", str(w.root / w.manifest["ground_truth"]), "--tagger", "oracle", "--verifier", "oracle"],
    }[corpus]
    flag = {"det3d": [], "pointmaps": ["--source", "embodiedscan"], "cot": ["--tagger", "oracle", "--verifier", "oracle"]}
    out = ["--out", str(tmp_path / corpus)]
    a = _builder(["build", corpus, *explicit, *out])
    b = _builder(["build", corpus, "--sample-world", str(w.root), *flag[corpus], *out])
    assert a.config == b.config
    assert len(list(b.list_inputs(b.config))) > 0


def test_sample_world_flag_needs_a_world(tmp_path: Path) -> None:
    from pipelines.engine.plan import PlanError

    for argv in (["build", "det3d"], ["build", "cot", "--tagger", "oracle", "--verifier", "oracle"],
                 ["build", "pointmaps", "--source", "embodiedscan"]):
        with pytest.raises((PlanError, ValueError), match="sample_world.json"):
            _builder([*argv, "--sample-world", str(tmp_path), "--out", str(tmp_path / "o")])
