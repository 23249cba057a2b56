"""The build plan (deterministic chunks, done/to-do, guarded resumes) and the progress lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipelines.engine.plan import (
    PlanError,
    make_chunks,
    make_plan,
    prepare_build_dir,
    remove_build_outputs,
    sort_inputs,
)
from pipelines.engine.progress import Progress
from shards.layout import stats_path


def _items(n: int, tag: str = "") -> list[dict]:
    return [{"key": f"s{i:03d}", "path": f"/data/{i}{tag}.png"} for i in range(n)]


def _fake_done(d: Path, i: int, plan=None) -> None:
    """Mark chunk `i` finished as an executor would: its digest released into plan.json first."""
    if plan is not None:
        plan.release(i)
    (d / "shards").mkdir(parents=True, exist_ok=True)
    (d / "shards" / f"{i:06d}.tar").write_bytes(b"")
    stats_path(d, i).write_text("{}")


def test_chunks_are_a_function_of_the_sorted_listing() -> None:
    items = _items(23)
    a = make_chunks(sort_inputs(items[::-1]), 10)
    b = make_chunks(sort_inputs(items), 10)
    assert a == b and [len(c.items) for c in a] == [10, 10, 3]
    assert a[1].keys == [f"s{i:03d}" for i in range(10, 20)]
    with pytest.raises(PlanError, match="duplicate"):
        sort_inputs([{"key": "a"}, {"key": "a"}])
    with pytest.raises(PlanError, match="dot"):
        sort_inputs([{"key": "frame.0001"}])
    with pytest.raises(PlanError):
        make_chunks(items, 0)


def test_plan_done_todo_limit_and_dry_run_writes_nothing(tmp_path: Path) -> None:
    cfg = {"x": 1}
    plan = make_plan("b", cfg, _items(25), tmp_path, 10, limit=22)
    assert plan.n_inputs == 22 and plan.todo == [0, 1, 2] and plan.done == []
    assert not any(tmp_path.iterdir())  # planning never writes
    prepare_build_dir(plan, "b", cfg)
    _fake_done(tmp_path, 1, plan)
    plan2 = make_plan("b", cfg, _items(25), tmp_path, 10, limit=22)
    assert plan2.done == [1] and plan2.todo == [0, 2]
    assert "done: 1  to do: 2" in plan2.describe() and "0, 2" in plan2.describe()


def test_changed_inputs_redo_only_their_chunks_and_extra_shards_go(tmp_path: Path) -> None:
    cfg: dict = {}
    plan = make_plan("b", cfg, _items(30), tmp_path, 10)
    prepare_build_dir(plan, "b", cfg)
    for i in range(3):
        _fake_done(tmp_path, i, plan)
    changed = _items(30)
    changed[15]["path"] = "/elsewhere.png"  # chunk 1 changes
    plan2 = make_plan("b", cfg, changed[:20], tmp_path, 10)  # and the listing shrinks to 2 chunks
    assert plan2.done == [0] and plan2.todo == [1] and plan2.stale == [1]
    prepare_build_dir(plan2, "b", cfg)
    assert not stats_path(tmp_path, 1).exists()  # the stale chunk's marker is gone
    assert not (tmp_path / "shards" / "000002.tar").exists()  # beyond the new last chunk
    assert json.loads((tmp_path / "plan.json").read_text())["n_chunks"] == 2


def test_a_resume_with_another_config_or_chunk_size_is_refused(tmp_path: Path) -> None:
    plan = make_plan("b", {"v": 1}, _items(5), tmp_path, 2)
    prepare_build_dir(plan, "b", {"v": 1})
    with pytest.raises(PlanError, match="config"):
        make_plan("b", {"v": 2}, _items(5), tmp_path, 2)
    with pytest.raises(PlanError, match="chunk size.*--overwrite"):
        make_plan("b", {"v": 1}, _items(5), tmp_path, 3)
    (tmp_path / "keep.txt").write_text("user file")
    remove_build_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert make_plan("b", {"v": 2}, _items(5), tmp_path, 3).todo == [0, 1]


def test_progress_lines_show_rate_eta_and_are_throttled() -> None:
    now = [0.0]
    out = io.StringIO()
    p = Progress(["decode", "tag"], total=100, total_shards=4, stream=out, interval=5.0, clock=lambda: now[0])
    now[0] = 2.0
    p.update("decode", 20)  # first render
    now[0] = 3.0
    p.update("decode", 10)  # throttled
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "decode 20/100 20% 10.0/s ETA 0:00:08" in lines[0] and "tag 0/100 0% 0.0/s ETA ?" in lines[0]
    now[0] = 10.0
    p.set_counts({"decode": 100, "tag": 50}, shards=2)
    last = out.getvalue().splitlines()[-1]
    assert "decode 100/100 100% 10.0/s done" in last and "tag 50/100 50% 5.0/s ETA 0:00:10" in last
    assert "shards 2/4" in last
