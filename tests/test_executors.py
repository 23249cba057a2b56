"""Executors: the same toy build on a plain loop, the local executor, Ray and Beam gives the same bytes;
failures are accounted for; setup errors stop the run; resumes redo only what is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.engine.chunk import run_chunk
from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import Builder, make_plan, prepare_build_dir
from pipelines.engine.run import run_build
from pipelines.engine.stage import Item, Reject, Resources, Stage, StageSetupError
from shards.layout import CHUNK_INPUTS_DIR, SETUP_ERROR_FILE, is_done, stats_path
from tests.test_executors_toy import Finalize, Render, ToyModel, compared_files, toy_builder, toy_inputs

N, CS = 40, 10


def _plain_loop(builder, out: Path) -> None:
    """The simplest possible driver: no executor at all, chunk after chunk, then the manifest."""
    from shards.manifest import code_version, finalize

    plan = make_plan(builder.name, builder.config, builder.list_inputs(builder.config), out, CS)
    prepare_build_dir(plan, builder.name, builder.config)
    for c in plan.chunks:
        run_chunk(builder.stages, c, out)
    finalize(out, {"builder": builder.name, **builder.config}, code_version())


def _run(builder, out: Path, executor: str, **kw):
    kw.setdefault("chunk_size", CS)
    return run_build(builder, out, BuildOptions.on(executor, show_progress=False, **kw))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_beam_local_and_plain_loop_write_identical_bytes(tmp_path: Path, ray_session) -> None:
    b = toy_builder(N)
    _plain_loop(b, tmp_path / "loop")
    ref = compared_files(tmp_path / "loop")
    assert len([k for k in ref if k.endswith(".tar")]) == N // CS
    runs = {
        "local": dict(executor="local"),
        "ray": dict(executor="ray", workers=2),
        "beam-processes": dict(executor="beam", workers=2),
        "beam-in-process": dict(executor="beam", workers=1),
    }
    for name, kw in runs.items():
        res = _run(b, tmp_path / name, **kw)
        assert res.processed == [0, 1, 2, 3], name
        got = compared_files(tmp_path / name)
        assert got.keys() == ref.keys(), name
        diff = [k for k in ref if ref[k] != got[k]]
        assert not diff, f"{name} differs from the plain loop in {diff}"
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["executor"] == "ray" and run["chunks_processed"] == [0, 1, 2, 3]


class _CountSetups(Stage):
    """Passes items through; each setup() leaves a file named after its process (and a unique tail)."""

    batch_size = 64

    def __init__(self, marker_dir: str):
        self.marker_dir = marker_dir

    def setup(self) -> None:
        import uuid

        Path(self.marker_dir, f"{os.getpid()}-{uuid.uuid4().hex}").touch()

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        return [dict(it) for it in batch], []


@pytest.mark.ray
def test_ray_cpu_only_build_sets_stages_up_once_per_worker_process(tmp_path: Path, ray_session) -> None:
    """Plain Ray tasks per chunk: a worker keeps the run's set-up stages, so setup() is per process, not per
    chunk (under Ray Data every chunk's task unpickled and set up the stages again)."""
    from tests.test_executors_toy import Finalize, Render, _Score, toy_inputs

    markers = tmp_path / "setups"
    markers.mkdir()
    b = Builder("toy", {"n": 48, "fail_mod": 7, "cost_ms": 0.0, "with_model": False}, toy_inputs,
                [Render(fail_mod=7), _CountSetups(str(markers)), _Score(), Finalize()])
    _run(b, tmp_path / "ray", "ray", chunk_size=6, workers=2)  # 8 chunks
    pids = [p.name.split("-")[0] for p in markers.iterdir()]
    assert len(pids) == len(set(pids)) < 8, pids
    _run(b, tmp_path / "local", "local", chunk_size=6)
    assert compared_files(tmp_path / "ray") == compared_files(tmp_path / "local")


@pytest.mark.ray
def test_ray_fused_cpu_pipeline_is_worker_count_independent(tmp_path: Path, ray_session) -> None:
    b = toy_builder(24, with_model=False)
    _run(b, tmp_path / "local", "local", chunk_size=6)
    _run(b, tmp_path / "ray1", "ray", chunk_size=6, workers=1)
    assert compared_files(tmp_path / "ray1") == compared_files(tmp_path / "local")


def test_sample_exceptions_become_rejects_and_counts_add_up(tmp_path: Path) -> None:
    res = _run(toy_builder(N, fail_mod=7), tmp_path, "local")
    t = res.manifest["totals"]
    assert t["n_input"] == N and t["n_samples"] + t["n_rejected"] == N
    rej = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    exc = {r["key"]: r for r in rej if r["reason"] == "exception"}
    want = {f"toy/s{i:05d}" for i in range(N) if i % 7 == 1}
    assert set(exc) == want
    assert all(r["stage"] == "render" and r["message"] == f"ValueError: corrupt input {k}" for k, r in exc.items())
    index = pq.read_table(tmp_path / "index.parquet").column("key").to_pylist()
    assert len(index) == t["n_samples"] and not (set(index) & {r["key"] for r in rej})
    assert set(index) | {r["key"] for r in rej} == {f"toy/s{i:05d}" for i in range(N)}
    assert res.manifest["rejects_by_reason"]["exception"] == len(want)
    text = res.summary()
    assert f"inputs: {N}" in text and "render: ValueError" in text and "rejects by reason: exception=" in text


SETUP_MSG = "setup() of stage 'toy_model' failed: OSError: weights file /nonexistent/toy.safetensors not found"


class NeedsTool(Stage):
    """A CPU stage whose setup fails: with no model stage, Ray runs plain tasks (another path than Ray Data)."""

    def setup(self) -> None:
        raise OSError("tool /nonexistent/bin/tool not found")

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        return batch, []


# Beam with one worker runs in this process (the error comes back chained); with two, in SDK worker
# processes (it comes back as the runner's text); Ray Data wraps it in UserCodeException.
@pytest.mark.parametrize("executor,workers", [
    ("local", 1), ("beam", 1), pytest.param("beam", 2, marks=pytest.mark.slow),
    pytest.param("ray", 1, marks=pytest.mark.ray)])
def test_setup_failure_stops_the_run_with_a_clear_message(tmp_path: Path, executor: str, workers: int,
                                                          request) -> None:
    if executor == "ray":
        request.getfixturevalue("ray_session")
    b = toy_builder(12, fail_setup=True)
    with pytest.raises(StageSetupError) as ei:
        _run(b, tmp_path, executor, chunk_size=4, workers=workers)
    assert str(ei.value) == SETUP_MSG, str(ei.value)
    assert not any(is_done(tmp_path, i) for i in range(3)) and not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / SETUP_ERROR_FILE).exists()  # the worker's record was taken by the driver
    assert not (tmp_path / CHUNK_INPUTS_DIR).exists()  # Beam's chunk inputs go with a failed run too


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_beam_workers_read_the_chunks_from_storage_not_from_the_pipeline(tmp_path: Path, workers: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`Create` embeds its values in the pipeline proto, which the driver and every SDK worker pickle and
    bz2 again (seconds per worker at 12K inputs): it must carry chunk indices only."""
    from pipelines.engine.executors import beam_executor

    created: list[list[object]] = []
    real = beam_executor.beam.Create

    def spy(values, *a, **kw):
        created.append(list(values))
        return real(values, *a, **kw)

    monkeypatch.setattr(beam_executor.beam, "Create", spy)
    res = _run(toy_builder(12), tmp_path / "beam", "beam", chunk_size=4, workers=workers)
    assert res.processed == [0, 1, 2] and created == [[0, 1, 2]]
    assert not (tmp_path / "beam" / CHUNK_INPUTS_DIR).exists()
    _run(toy_builder(12), tmp_path / "local", "local", chunk_size=4)
    assert compared_files(tmp_path / "beam") == compared_files(tmp_path / "local")


def test_a_killed_runs_chunk_inputs_are_swept_by_the_next_run(tmp_path: Path) -> None:
    stale = tmp_path / CHUNK_INPUTS_DIR
    stale.mkdir(parents=True)
    (stale / "000000.chunk").write_bytes(b"left by a SIGKILLed Beam driver")
    res = _run(toy_builder(12), tmp_path, "local", chunk_size=4)
    assert res.processed == [0, 1, 2] and not stale.exists()


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_cpu_stage_setup_failure_on_plain_ray_tasks(tmp_path: Path, executor: str, request) -> None:
    if executor == "ray":
        request.getfixturevalue("ray_session")
    b = Builder("toy", {"n": 8}, toy_inputs, [Render(), NeedsTool(), Finalize()])
    with pytest.raises(StageSetupError) as ei:
        _run(b, tmp_path, executor, chunk_size=4, workers=1)
    assert str(ei.value) == "setup() of stage 'needs_tool' failed: OSError: tool /nonexistent/bin/tool not found"


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_setup_failure_is_one_line_from_gr3d_build(tmp_path: Path, executor: str, request, capsys) -> None:
    if executor == "ray":
        request.getfixturevalue("ray_session")
    from pipelines.cli import main

    rc = main(["build", "toy", "--out", str(tmp_path / "b"), "--executor", executor, "--workers", "1",
               "--chunk-size", "4", "--n", "12", "--fail-setup", "--quiet"])
    ours = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gr3d ")]
    assert rc == 2 and ours == [f"gr3d build toy: error: {SETUP_MSG}"], ours


def test_rerun_reuses_model_intermediates_and_redoes_only_missing_chunks(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    calls.mkdir()
    out = tmp_path / "build"
    b = toy_builder(N, calls_dir=str(calls))
    _run(b, out, "local")
    first = compared_files(out)
    model_calls = sum(len(p.read_text().splitlines()) for p in calls.iterdir())
    assert model_calls == sum(json.loads(stats_path(out, i).read_text())["extra"]["stages"]["toy_model"]["in"]
                              for i in range(4)) > 0
    # a crash after chunk 2's model stage but before its shard completed:
    stats_path(out, 2).unlink()
    res = _run(b, out, "local")
    assert res.processed == [2] and res.plan.done == [0, 1, 3]
    assert sum(len(p.read_text().splitlines()) for p in calls.iterdir()) == model_calls  # no model call
    st = json.loads(stats_path(out, 2).read_text())
    assert st["timing"]["reused_intermediate"] == ["toy_model"]
    assert compared_files(out) == first
    run = json.loads((out / "run.json").read_text())
    assert run["chunks_processed"] == [2] and run["chunks_skipped_done"] == [0, 1, 3]


def test_limit_then_extend_resumes_and_equals_a_full_run(tmp_path: Path) -> None:
    b = toy_builder(N)
    r1 = _run(b, tmp_path / "grow", "local", limit=20)
    assert r1.processed == [0, 1] and r1.manifest["totals"]["n_input"] == 20
    r2 = _run(b, tmp_path / "grow", "local")
    assert r2.processed == [2, 3] and r2.plan.done == [0, 1]
    _run(b, tmp_path / "full", "local")
    assert compared_files(tmp_path / "grow") == compared_files(tmp_path / "full")


def test_cli_dry_run_summary_overwrite(tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    out = str(tmp_path / "b")
    base = ["build", "toy", "--out", out, "--executor", "local", "--n", "30", "--quiet"]
    assert main([*base, "--chunk-size", "10", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "chunks: 3" in text and "to do: 3 (30 inputs)" in text
    assert not os.path.exists(out)
    assert main([*base, "--chunk-size", "10"]) == 0
    text = capsys.readouterr().out
    assert "inputs: 30" in text and "written: " in text and "processed this run: 3 chunk(s)" in text
    assert main([*base, "--dry-run"]) == 0  # a resume takes the recorded chunk size
    assert "done: 3  to do: 0" in capsys.readouterr().out
    assert main([*base, "--chunk-size", "15"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*base, "--chunk-size", "15", "--overwrite"]) == 0
    assert "processed this run: 2 chunk(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b" / "shards").glob("*.tar")) == ["000000.tar", "000001.tar"]


def test_ray_resource_plan_leaves_cpu_for_tasks_on_two_cores() -> None:
    from pipelines.engine.executors.ray_executor import resource_plan
    from tests.test_executors_toy import Finalize, Render

    rp = resource_plan([Render(), ToyModel(), Finalize()], n_chunks=10, cpus=2, gpus=0, workers=None, num_gpus=None)
    assert [r["segment"].actors for r in rp] == [False, True, False]
    actor = rp[1]
    assert actor["size"] == 2 and actor["num_gpus"] == 0
    held = actor["size"] * actor["num_cpus"]
    assert held < 2 and all(r["num_cpus"] <= 2 - held for r in rp if not r["segment"].actors)

    class GpuModel(ToyModel):
        resources = Resources(cpus=1, gpus=1)

    with pytest.raises(RuntimeError, match="--num-gpus 0"):
        resource_plan([GpuModel()], n_chunks=4, cpus=2, gpus=0, workers=None, num_gpus=None)
    rp = resource_plan([GpuModel()], n_chunks=4, cpus=64, gpus=8, workers=None, num_gpus=None)
    assert rp[0]["size"] == 4 and rp[0]["num_gpus"] == 1 and rp[0]["num_cpus"] == 1
    assert resource_plan([GpuModel()], n_chunks=4, cpus=2, gpus=0, workers=1, num_gpus=0)[0]["num_gpus"] == 0


def test_beam_options_local_runner_never_prism_and_portable_runners_pass_through() -> None:
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    from pipelines.engine.executors.beam_executor import pipeline_options

    opts, local = pipeline_options([], workers=None, n_chunks=10)
    d = opts.view_as(DirectOptions)
    assert local and d.direct_num_workers == (os.cpu_count() or 1) and (
        d.direct_running_mode == ("multi_processing" if (os.cpu_count() or 1) > 1 else "in_memory"))
    opts, local = pipeline_options(["--runner=DirectRunner"], workers=4, n_chunks=2)
    assert local and opts.view_as(DirectOptions).direct_num_workers == 2  # never more workers than chunks
    flink = ["--runner=FlinkRunner", "--flink_master=flink:8081", "--environment_type=DOCKER", "--parallelism=8"]
    opts, local = pipeline_options(flink, workers=2, n_chunks=100)
    assert not local and opts.view_as(StandardOptions).runner == "FlinkRunner"
    assert opts.get_all_options()["flink_master"] == "flink:8081" and opts.get_all_options()["parallelism"] == 8
    assert opts.view_as(DirectOptions).direct_num_workers == 1  # untouched for a portable runner


def test_common_build_flags_become_typed_options_once() -> None:
    """`gr3d build`'s common flags, read by `BuildOptions.from_args` alone: each lands in one typed field."""
    from pipelines.cli import build_parser
    from pipelines.engine.options import BeamOptions, BuildOptions, ExecutorOptions, RayOptions

    args = build_parser().parse_args([
        "build", "toy", "--out", "x", "--executor", "beam", "--workers", "3", "--chunk-size", "7", "--limit", "9",
        "--overwrite", "--dry-run", "--ray-address", "head:6379", "--num-gpus", "0", "--quiet",
        "--progress-interval", "2", "--beam-options=--runner=FlinkRunner --flink_master='h:8081'",
        "--beam-options=--environment_type=DOCKER"])
    assert BuildOptions.from_args(args) == BuildOptions(
        executor=ExecutorOptions("beam", workers=3, ray=RayOptions(address="head:6379", num_gpus=0.0),
                                 beam=BeamOptions(("--runner=FlinkRunner", "--flink_master=h:8081",
                                                   "--environment_type=DOCKER"))),
        chunk_size=7, limit=9, overwrite=True, dry_run=True, show_progress=False, progress_interval=2.0)
    defaults = BuildOptions.from_args(build_parser().parse_args(["build", "toy", "--out", "x"]))
    assert defaults == BuildOptions() and defaults.executor.name == "ray"
