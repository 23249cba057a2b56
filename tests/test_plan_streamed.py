"""The streamed plan: chunk digests are computed as chunks are released to run, not all before the first.

Why: digesting every chunk for plan.json was the largest serial phase of the driver (~0.3 ms per det3d
input, bench/executors.md), paid before any worker started. Now `make_plan` digests only the chunks
already done on disk (the resume decision needs them), and each other chunk's digest is computed and
written to plan.json just before the chunk is handed to a worker. What must not change: plan.json at the
end of a build is byte for byte what it always was, and a crash at any point still resumes correctly
(a finished shard is always covered by its digest; a shard not covered is redone, never trusted).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import (
    Builder,
    make_chunks,
    make_plan,
    plan_record,
    prepare_build_dir,
    sort_inputs,
)
from pipelines.engine.run import run_build
from pipelines.engine.stage import Item, Reject, Stage
from shards.layout import PLAN_FILE
from tests.test_executors_toy import compared_files, toy_builder, toy_inputs

N, CS = 40, 4  # 10 chunks


def _old_plan_bytes(builder: Builder, chunk_size: int) -> bytes:
    """plan.json as the eager plan wrote it: every digest computed up front, same JSON layout."""
    chunks = make_chunks(sort_inputs(builder.list_inputs(builder.config)), chunk_size)
    rec = plan_record(builder.name, builder.config, chunk_size, chunks)
    return (json.dumps(rec, indent=1, sort_keys=True) + "\n").encode()


def _digests(build_dir: Path) -> list[str]:
    return json.loads((build_dir / PLAN_FILE).read_text())["chunk_digests"]


def test_make_plan_digests_nothing_on_a_fresh_build(tmp_path: Path) -> None:
    b = toy_builder(N, with_model=False)
    plan = make_plan(b.name, b.config, b.list_inputs(b.config), tmp_path / "b", CS)
    assert len(plan.chunks) == 10 and plan.todo == list(range(10))
    assert all(c.digest == "" for c in plan.chunks)  # the serial part no longer decodes every chunk
    # ...and a digest asked for is the eager one (equal chunks, equal digests)
    eager = make_chunks(sort_inputs(toy_inputs(b.config)), CS)
    assert [c.ensure_digest() for c in plan.chunks] == [c.digest for c in eager]


def test_release_records_the_digest_before_handing_the_chunk_out(tmp_path: Path) -> None:
    b = toy_builder(N, with_model=False)
    d = tmp_path / "b"
    plan = make_plan(b.name, b.config, b.list_inputs(b.config), d, CS)
    prepare_build_dir(plan, b.name, b.config)
    assert _digests(d) == [""] * 10  # nothing released yet: no shard can be trusted under this record
    want = json.loads(_old_plan_bytes(b, CS))["chunk_digests"]

    c = plan.release(0)
    assert c.digest == want[0] and _digests(d)[0] == want[0]
    plan.release(1)
    seen = _digests(d)
    assert seen[1] == want[1]
    # batches grow with the run (here up to 1024 inputs = every chunk); never a chunk before its turn
    plan.release(2)
    later = _digests(d)
    assert later[:3] == want[:3] and all(x in ("", w) for x, w in zip(later, want))

    plan.release_all()
    assert (d / PLAN_FILE).read_bytes() == _old_plan_bytes(b, CS)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_final_plan_json_is_the_eager_plans_bytes(tmp_path: Path, executor: str, request: Any) -> None:
    if executor == "ray":
        request.getfixturevalue("ray_session")
    b = toy_builder(N, with_model=False)
    run_build(b, tmp_path / "b", BuildOptions.on(executor, chunk_size=CS, workers=2, show_progress=False))
    assert (tmp_path / "b" / PLAN_FILE).read_bytes() == _old_plan_bytes(b, CS)


class _Crash(BaseException):
    """Not an Exception: stage isolation does not turn it into a reject, the run dies (like a kill)."""


class _FailOn(Stage):
    """Dies on one key: a run that stops midway, after some chunks are done."""

    name = "fail_on"
    batch_size = 16

    def __init__(self, key: str):
        super().__init__()
        self.key = key

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        if any(it["key"] == self.key for it in batch):
            raise _Crash(f"boom at {self.key}")
        return batch, []


def test_a_run_that_dies_midway_resumes_its_finished_chunks(tmp_path: Path) -> None:
    """Chunks 0-2 finish, chunk 3 raises: the re-run skips 0-2 (their digests were recorded) and ends
    byte-identical to an uninterrupted build, with the same plan.json bytes."""
    good = toy_builder(N, with_model=False)
    stages: list[Any] = list(good.stages)
    bad = Builder(good.name, good.config, good.list_inputs, [_FailOn("toy/s00013"), *stages])
    ok = Builder(good.name, good.config, good.list_inputs, [_FailOn("none"), *stages])
    out, ref = tmp_path / "out", tmp_path / "ref"
    with pytest.raises(_Crash, match="boom"):
        run_build(bad, out, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    rec = _digests(out)
    assert all(rec[:4]) and not any(rec[4:])  # released: 0-3 (3 was running); the rest never handed out
    res = run_build(ok, out, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    assert res.plan.done == [0, 1, 2] and res.plan.stale == [] and res.processed == list(range(3, 10))
    run_build(ok, ref, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    assert compared_files(out) == compared_files(ref)
    assert (out / PLAN_FILE).read_bytes() == (ref / PLAN_FILE).read_bytes()


def test_a_done_shard_without_a_recorded_digest_is_redone(tmp_path: Path) -> None:
    """The crash window the release order closes: if a shard existed with no digest ("" in plan.json),
    it could be another listing's output; it is redone, never trusted."""
    b = toy_builder(N, with_model=False)
    out = tmp_path / "b"
    run_build(b, out, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    full = (out / PLAN_FILE).read_bytes()
    rec = json.loads(full)
    rec["chunk_digests"][5] = ""
    (out / PLAN_FILE).write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    before = compared_files(out)
    res = run_build(b, out, BuildOptions.on("local", chunk_size=CS, show_progress=False))
    assert res.plan.stale == [5] and res.processed == [5]
    assert compared_files(out) == before and (out / PLAN_FILE).read_bytes() == full


def _slow_listing(seconds: float, fail: bool = False) -> Any:
    """toy_inputs, yielded over `seconds` (a listing long enough for Ray to start meanwhile)."""
    marks: dict[str, float] = {}

    def listing(config: dict[str, Any]) -> Any:
        items = toy_inputs(config)
        for k, it in enumerate(items):
            time.sleep(seconds / len(items))
            yield it
            if fail and k == len(items) // 2:
                raise ValueError("listing broke halfway")
        marks["listed"] = time.monotonic()

    return listing, marks


def test_ray_starts_and_warms_its_workers_while_the_driver_lists(tmp_path: Path, ray_session: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.engine.executors import ray_executor

    calls: list[float] = []
    real = ray_executor.prestart

    def spy(address: Any, stages: Any) -> None:
        calls.append(time.monotonic())
        real(address, stages)

    monkeypatch.setattr(ray_executor, "prestart", spy)
    good = toy_builder(N, with_model=False)
    listing, marks = _slow_listing(1.5)
    slow = Builder(good.name, good.config, listing, list(good.stages))
    run_build(slow, tmp_path / "ray", BuildOptions.on("ray", chunk_size=CS, show_progress=False))
    assert len(calls) == 1 and calls[0] < marks["listed"]  # Ray was being set up before the listing ended
    assert ray_executor._PRESTARTED == {}  # the executor took the warm workers over
    run_build(good, tmp_path / "local", BuildOptions.on("local", chunk_size=CS, show_progress=False))
    assert compared_files(tmp_path / "ray") == compared_files(tmp_path / "local")
    assert (tmp_path / "ray" / PLAN_FILE).read_bytes() == (tmp_path / "local" / PLAN_FILE).read_bytes()


def test_a_listing_error_during_the_ray_prestart_is_raised_and_releases_ray(tmp_path: Path, ray_session: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.engine.executors import ray_executor

    released: list[bool] = []
    real = ray_executor.shutdown_prestarted
    monkeypatch.setattr(ray_executor, "shutdown_prestarted", lambda: (released.append(True), real())[1])
    good = toy_builder(N, with_model=False)
    listing, _ = _slow_listing(2.0, fail=True)
    with pytest.raises(ValueError, match="listing broke halfway"):
        run_build(Builder(good.name, good.config, listing, list(good.stages)), tmp_path / "b",
                  BuildOptions.on("ray", chunk_size=CS, show_progress=False))
    assert released == [True] and ray_executor._PRESTARTED == {}
    assert not (tmp_path / "b").exists()  # nothing written: the plan never existed
