"""`bench/parallel_ceiling.py`'s plumbing on the sample world: both ways run, write shards, and give ratios."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def test_parallel_ceiling_quick(sample_world: Any, capsys: Any) -> None:
    from bench.parallel_ceiling import main

    med = main(["--omni3d", str(sample_world.omni3d_files[0]), "--data-root", str(sample_world.root),
                "--chunks", "2", "--chunk-size", "2", "--loop", "20000", "--repeat", "2"])
    assert set(med) == {"det3d_one_s", "det3d_two_s", "det3d_ratio", "loop_one_s", "loop_two_s", "loop_ratio"}
    assert all(v > 0 for v in med.values())
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and "medians over 2 repetitions, 2 chunks of 2 inputs" in out
    assert not list(Path(tempfile.gettempdir()).glob("gr3d-ceiling-*"))  # its work directory is removed
