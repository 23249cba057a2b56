"""Each corpus's options are written once, in its frozen config dataclass (`pipelines.corpora.options`).

The flags of `gr3d build CORPUS` are derived from the fields, so the CLI's defaults must give the same
builder config (the manifest's, which guards resumes) as the dataclass's own defaults, and every option
field must be reachable as a flag.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pipelines.cli import build_parser
from pipelines.corpora.cot.builder import CotConfig, make_cot_builder
from pipelines.corpora.det3d.builder import Det3dBuildConfig
from pipelines.corpora.det3d.builder import make_builder as make_det3d
from pipelines.corpora.options import CLI, options_from_args
from pipelines.corpora.pointmaps.builder import PointmapConfig
from pipelines.corpora.pointmaps.builder import make_builder as make_pointmap
from pipelines.engine.plan import PlanError


def _args(corpus: str, *extra: str) -> Any:
    return build_parser().parse_args(["build", corpus, "--out", "unused", *extra])


def test_cli_defaults_equal_the_dataclass_defaults(sample_world: Any, tmp_path) -> None:
    w = str(sample_world.root)
    det = make_det3d(options_from_args(Det3dBuildConfig, _args("det3d", "--sample-world", w)))
    assert det.config == make_det3d(Det3dBuildConfig(sample_world=w)).config
    pm = make_pointmap(options_from_args(PointmapConfig, _args("pointmap", "--source", "rgbd", "--sample-world", w)))
    assert pm.config == make_pointmap(PointmapConfig("rgbd", sample_world=w)).config
    cli = options_from_args(CotConfig, _args("cot", "--sample-world", w, "--tagger", "sim", "--verifier", "oracle"))
    py = CotConfig(sample_world=w, tagger="sim", verifier="oracle", out="unused")
    assert make_cot_builder(cli).config == make_cot_builder(py).config
    assert (cli.cache, cli.structured_output, str(cli.out)) == (True, True, "unused")


def test_flags_reach_their_fields(sample_world: Any) -> None:
    cot = options_from_args(CotConfig, _args("cot", "--tagger", "oracle", "--verifier", "oracle", "--no-cache",
                                             "--no-structured-output", "--sim-miss", "0.25",
                                             "--max-candidates", "3"))
    assert (cot.cache, cot.structured_output, cot.sim_rates, cot.max_candidates) == (None, False, {"miss": 0.25}, 3)
    det = options_from_args(Det3dBuildConfig, _args("det3d", "--omni3d-rule", "max_depth=none", "--digits-2d", "4"))
    assert det.convert.omni3d_rules == {"max_depth": None} and det.convert.digits_2d == 4
    pm = options_from_args(PointmapConfig, _args("pointmap", "--source", "rgbd", "--points", "7", "--keep-depth"))
    assert (pm.sampler.n, pm.keep_depth) == (7, True)


@pytest.mark.parametrize("cls, corpus", [(Det3dBuildConfig, "det3d"), (PointmapConfig, "pointmap"), (CotConfig, "cot")])
def test_every_option_field_is_a_flag(cls: type, corpus: str) -> None:
    """A field with `option(...)` metadata and no custom `add` has its flag in `gr3d build CORPUS`."""
    sub = build_parser()._subparsers._group_actions[0].choices["build"]._subparsers._group_actions[0].choices[corpus]
    flags = {s for a in sub._actions for s in a.option_strings}

    def fields(c: type) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(c):
            fac = f.default_factory
            out += fields(fac) if isinstance(fac, type) and dataclasses.is_dataclass(fac) else [f]
        return out

    for f in fields(cls):
        md = f.metadata.get(CLI)
        if md is not None and md["add"] is None:
            assert (md["flag"] or "--" + f.name.replace("_", "-")) in flags, f.name


def test_invalid_option_is_a_plan_error() -> None:
    with pytest.raises(ValueError, match="max_rounds"):
        Det3dBuildConfig(convert=dataclasses.replace(Det3dBuildConfig().convert, max_rounds=11))
    with pytest.raises(ValueError, match="--tagger florence2 needs --tagger-model"):
        CotConfig(tagger="florence2").check_annotators()
    with pytest.raises(ValueError, match="--tagger must be"):
        CotConfig(tagger="florence3")
    with pytest.raises(PlanError, match="det3d needs at least one"):
        make_det3d(Det3dBuildConfig(data_root="."))
