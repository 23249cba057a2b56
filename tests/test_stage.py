"""The stage abstraction and the shared chunk runner: failure isolation, accounting, intermediates."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipelines.engine.chunk import ChunkState, account, new_state, process_batch, run_stage, segments
from pipelines.engine.plan import Chunk
from pipelines.engine.stage import Reject, Resources, Stage, StageSetupError
from shards.layout import intermediate_path
from tests.test_executors_toy import Finalize, Render, ToyModel


class Picky(Stage):
    """Raises on keys containing 'bad' (a whole-batch failure unless isolated)."""

    batch_size = 4

    def __init__(self) -> None:
        self.calls: list[int] = []

    def process(self, batch):
        self.calls.append(len(batch))
        for it in batch:
            if "bad" in it["key"]:
                raise KeyError(f"no field for {it['key']}")
        return [dict(it, ok=True) for it in batch], []


class BrokenSetup(Stage):
    def setup(self) -> None:
        raise FileNotFoundError("model.bin")

    def process(self, batch):
        return batch, []


def test_resources_and_reject_are_validated() -> None:
    with pytest.raises(ValueError):
        Resources(cpus=-1)
    with pytest.raises(ValueError, match="snake_case"):
        Reject("k", "s", "Bad Reason")
    with pytest.raises(ValueError, match="stage"):
        Reject("k", "", "ok_code")
    assert Reject("k", "s", "too_small", "m").to_dict() == {"key": "k", "stage": "s", "reason": "too_small",
                                                           "message": "m"}


def test_stage_defaults_name_and_actor_placement() -> None:
    assert Picky.name == "picky" and BrokenSetup.name == "broken_setup"

    class VLMVerifier(Stage):
        pass

    assert VLMVerifier.name == "vlm_verifier"
    assert ToyModel.name == "toy_model" and ToyModel().runs_on_actors
    assert not Render().runs_on_actors

    class Gpu(Stage):
        resources = Resources(gpus=1, gpu_memory_gb=20)

    assert Gpu().runs_on_actors
    segs = segments([Render(), Picky(), ToyModel(), Finalize()])
    assert [(len(s.stages), s.actors) for s in segs] == [(2, False), (1, True), (1, False)]


def test_setup_failure_is_fatal_with_a_clear_picklable_message() -> None:
    s = BrokenSetup()
    with pytest.raises(StageSetupError) as ei:
        s.ensure_setup()
    msg = str(ei.value)
    assert "broken_setup" in msg and "FileNotFoundError: model.bin" in msg
    again = pickle.loads(pickle.dumps(ei.value))  # crosses Ray/Beam process boundaries intact
    assert isinstance(again, StageSetupError) and str(again) == msg
    # and a setup failure is never swallowed as a per-sample reject
    st = new_state(Chunk(0, ({"key": "a"},)))
    with pytest.raises(StageSetupError):
        run_stage(BrokenSetup(), st)


def test_setup_runs_again_on_a_pickled_copy() -> None:
    m = ToyModel()
    m.ensure_setup()
    copy = pickle.loads(pickle.dumps(m))
    assert copy._ready is False and m._ready is True


def test_failing_samples_are_isolated_and_the_rest_survive() -> None:
    stage = Picky()
    batch = [{"key": k} for k in ("a", "bad1", "b", "c")]
    out, rej = process_batch(stage, batch)
    assert [o["key"] for o in out] == ["a", "b", "c"]
    assert rej == [Reject("bad1", "picky", "exception", "KeyError: 'no field for bad1'")]
    assert stage.calls == [4, 1, 1, 1, 1]  # the batch, then one by one


def test_bad_process_return_values_reject_instead_of_crashing() -> None:
    class NoKey(Stage):
        def process(self, batch):
            return [{"value": 1} for _ in batch], []

    out, rej = process_batch(NoKey(), [{"key": "x"}, {"key": "y"}])
    assert out == [] and [r.key for r in rej] == ["x", "y"] and all("TypeError" in r.message for r in rej)


def _state(keys, items, rejects=()) -> ChunkState:
    return ChunkState(3, list(keys), [dict(key=k) for k in items], list(rejects))


def test_accounting_invariant_every_input_is_written_or_rejected() -> None:
    st = _state(["a", "b", "c", "d", "e"], ["a", "c", "c", "d", "zz"], [Reject("b", "s1", "too_dark"),
                                                                       Reject("d", "s2", "late_reject")])
    written, rejects = account(st)
    assert [w["key"] for w in written] == ["a"]
    reasons = {(r.key, r.reason) for r in rejects}
    assert reasons == {("b", "too_dark"), ("c", "duplicate_output"), ("d", "late_reject"), ("e", "lost"),
                       ("zz", "unknown_key")}
    inputs = set(st.keys)
    accounted = {w["key"] for w in written} | {r.key for r in rejects if r.key in inputs}
    assert accounted == inputs


def test_run_stage_batches_and_counts() -> None:
    stage = Picky()
    st = new_state(Chunk(0, tuple({"key": f"k{i}"} for i in range(10))))
    seen = []
    run_stage(stage, st, report=lambda name, n: seen.append((name, n)))
    assert stage.calls == [4, 4, 2] and seen == [("picky", 4), ("picky", 4), ("picky", 2)]
    assert st.stage_counts["picky"] == {"in": 10, "out": 10, "rejected": 0}


def test_model_intermediate_is_written_then_reused_without_calling_the_model(tmp_path: Path) -> None:
    items = tuple({"key": f"k{i}", "value": i, "w": 8, "h": 6} for i in range(12))
    render = Render(fail_mod=5)
    model = ToyModel()
    st = new_state(Chunk(4, items))
    run_stage(render, st, tmp_path)
    inputs_to_model = list(st.items)
    run_stage(model, st, tmp_path)
    path = intermediate_path(tmp_path, "toy_model", 4)
    assert path.exists() and st.reused == []
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    assert {r["key"] for r in rows} == {it["key"] for it in inputs_to_model}
    assert {r["_outcome"] for r in rows} <= {"ok", "low_score"}

    class Exploding(ToyModel):
        name = "toy_model"

        def process(self, batch):
            raise AssertionError("the model must not be called when its intermediate exists")

    st2 = ChunkState(4, list(st.keys), list(inputs_to_model))
    run_stage(Exploding(), st2, tmp_path)
    assert st2.reused == ["toy_model"]
    assert st2.items == st.items and st2.rejects == [r for r in st.rejects if r.stage == "toy_model"]

    # an intermediate that does not match the inputs is not trusted: recomputed
    st3 = ChunkState(4, list(st.keys), inputs_to_model[:3])
    run_stage(ToyModel(), st3, tmp_path)
    assert st3.reused == [] and len(st3.items) + len(st3.rejects) == 3
