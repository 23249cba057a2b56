"""Session fixtures around the sample world (owned by the sample-world area).

`sample_world` generates one small world (3 scenes x 2 views, 320x240) per test session into a
temporary directory and returns a `pipelines.sample_world.SampleWorld` (root, manifest, the files of
each format, `ground_truth`). Tests must treat it as read-only: copy what they want to damage.
"""

from __future__ import annotations

import pytest

from pipelines.sample_world import SampleWorld

SAMPLE_WORLD_ARGS = {"scenes": 3, "views": 2, "seed": 0, "width": 320, "height": 240}


@pytest.fixture(scope="session")
def sample_world(tmp_path_factory: pytest.TempPathFactory) -> SampleWorld:
    from pipelines.sample_world.world import generate

    root = tmp_path_factory.mktemp("sample_world")
    manifest = generate(root, **SAMPLE_WORLD_ARGS)
    return SampleWorld(root, manifest)


@pytest.fixture(scope="session")
def quick_learning_inputs(tmp_path_factory: pytest.TempPathFactory):
    """The learning benches' quick world and train/held-out builds, made once per session (read-only)."""
    from bench.learning import setup

    work = tmp_path_factory.mktemp("quick_learning_inputs")
    setup(work, True, None, [])
    return work


@pytest.fixture
def quick_learning_work(quick_learning_inputs, tmp_path):
    """A fresh learning-bench work folder whose world and builds are hard links of the session's quick ones."""
    import os
    import shutil

    work = tmp_path / "work"
    for part in ("world", "builds"):
        shutil.copytree(quick_learning_inputs / part, work / part, copy_function=os.link)
    return work
