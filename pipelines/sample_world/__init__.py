"""The sample world: procedural indoor scenes with exact ground truth, written in real on-disk formats.

`generate(out, scenes, views, seed, width, height)` writes Omni3D JSON, EmbodiedScan info pkl,
RefSpatial JSON, a generic RGB-D folder and `ground_truth.json`; `load_manifest(out)` reads back
`sample_world.json`; `SampleWorld.open(out)` gives each format's files as the readers want
them. Importing this package is cheap: open3d is only imported when rendering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

from pipelines.sample_world.paths import SampleWorld

__all__ = ["SampleWorld", "generate", "load_manifest"]


def generate(out: str | Path, scenes: int = 20, views: int = 4, seed: int = 0, width: int = 640,
             height: int = 480) -> dict[str, Any]:
    """Write a sample world to `out`; see `pipelines.sample_world.world.generate`."""
    from pipelines.sample_world.world import generate as _generate

    return _generate(out, scenes=scenes, views=views, seed=seed, width=width, height=height)


def load_manifest(out: str | Path) -> dict[str, Any]:
    """Read `sample_world.json` of a generated world."""
    from pipelines.sample_world.world import load_manifest as _load

    return _load(out)
