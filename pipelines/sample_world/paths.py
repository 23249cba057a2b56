"""Where a generated sample world keeps each format's files, as the readers want them.

Builders, tests and the demo all start from a world directory; this turns its `sample_world.json`
into reader arguments, so nobody hard-codes the layout.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

__all__ = ["SampleWorld", "add_sample_world_argument", "sample_world_of"]


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


def add_sample_world_argument(group: argparse._ActionsContainer) -> None:
    """`--sample-world DIR`, the same flag in every builder: take the inputs from a generated world."""
    group.add_argument("--sample-world", type=Path, default=None, metavar="DIR",
                       help="take this corpus's inputs (and the data root) from a generated sample world "
                            "(`gr3d sample-world`); explicit input flags are added to them")


def sample_world_of(args: argparse.Namespace) -> SampleWorld | None:
    """The world `--sample-world` names, or None; a directory without `sample_world.json` is a ValueError."""
    root = getattr(args, "sample_world", None)
    if root is None:
        return None
    if not (Path(root) / "sample_world.json").is_file():
        raise ValueError(f"--sample-world {root}: no sample_world.json there")
    return SampleWorld(Path(root), json.loads((Path(root) / "sample_world.json").read_text(encoding="utf-8")))
