"""Where a generated sample world keeps each format's files, as the readers want them.

Builders, tests and the demo all start from a world directory; this turns its `sample_world.json`
into reader arguments, so nobody hard-codes the layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

__all__ = ["SampleWorld"]


@dataclass(frozen=True)
class SampleWorld:
    """A generated world: `root` is the data root of every format, `manifest` its `sample_world.json`."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> SampleWorld:
        from pipelines.sample_world.world import load_manifest

        return cls(Path(root), load_manifest(root))

    @property
    def omni3d_files(self) -> list[Path]:
        return [self.root / p for p in self.manifest["files"]["omni3d"]]

    @property
    def embodiedscan_files(self) -> list[Path]:
        return [self.root / p for p in self.manifest["files"]["embodiedscan"]]

    @property
    def refspatial_files(self) -> list[Any]:
        """`pipelines.sources.refspatial.RefSpatialFile`s with this world's image and depth roots."""
        from pipelines.sources.refspatial import RefSpatialFile

        return [RefSpatialFile(self.root / f["json"], self.root / f["image_root"], self.root / f["depth_root"],
                               tag=f["json"].removeprefix("RefSpatial/").removesuffix(".json"))
                for f in self.manifest["files"]["refspatial"]]  # fmt: skip

    @property
    def rgbd_root(self) -> Path:
        return self.root / self.manifest["files"]["rgbd"]

    @cached_property
    def ground_truth(self) -> dict[str, Any]:
        """The parsed `ground_truth.json` (read once)."""
        return json.loads((self.root / self.manifest["ground_truth"]).read_text(encoding="utf-8"))
