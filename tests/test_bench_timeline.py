"""The plumbing of bench/build_timeline.py: per-chunk timing in the stats files, read back as a timeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.engine.options import BuildOptions
from pipelines.engine.run import run_build
from tests.test_executors_toy import toy_builder


def test_chunk_timing_reads_back_as_a_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import build_timeline

    out = tmp_path / "b"
    run_build(toy_builder(24, cost_ms=5.0), out, BuildOptions.on("local", chunk_size=8, show_progress=False))
    rows = build_timeline.chunk_rows(out)
    assert len(rows) == 3 and {r["pid"] for r in rows} == {__import__("os").getpid()}
    for r in rows:  # 8 inputs x 5 ms of busy work each: CPU the thread spent, within the chunk's wall time
        assert 0.03 <= r["cpu"] <= r["wall"] + 0.01 and r["start"] < r["end"]
    assert sorted(rows, key=lambda r: r["start"]) == sorted(rows, key=lambda r: r["end"])  # one after another
    build_timeline.report(out)
    text = capsys.readouterr().out
    assert "3 chunks on 1 process(es)" in text and "chunks running, per second:" in text
