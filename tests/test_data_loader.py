"""model.data on real shards (ShardWriter) and real DataLoader workers: task choice, image and token
plumbing, corpus mixing, rank/worker splitting, and the exact data position used by `--resume auto`."""

from __future__ import annotations

import copy
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_tiny_model
from model.data import (
    ExampleSpec,
    TrainLoader,
    build_example,
    fit_conversation,
    parse_mix,
    pick_conversation,
)
from model.vision import letterbox_window, preprocess_depth
from schemas import records
from shards.reader import iter_samples
from tests.test_shards_samples import det3d_record, image_bytes, make_sample, write_build

torch.set_num_threads(1)
CORPORA = ("det3d", "pointmap", "cot")


def write_corpora(root: Path, shards: int = 4, per_shard: int = 6, corpora: tuple[str, ...] = CORPORA) -> Path:
    """One build per corpus under `root`, `shards` x `per_shard` valid samples each (distinct keys and images)."""
    for c in corpora:
        write_build(root / c, [[make_sample(c, f"{c}/s{i:02d}_{j:03d}", seed=100 * i + j) for j in range(per_shard)]
                               for i in range(shards)])
    return root


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpora(tmp_path_factory.mktemp("builds"))


def _spec(model: torch.nn.Module, stage: int = 1, **kw: object) -> ExampleSpec:
    return ExampleSpec.for_model(model, stage, **kw)  # type: ignore[arg-type]


def _epoch_keys(loader: TrainLoader) -> list[list[str]]:
    return [b["keys"] for b in loader.epoch_batches()]


# ---------------------------------------------------------------------------------------------- one example

def _multi_round_record(key: str = "world/det_multi", rounds: int = 4) -> dict:
    rec = det3d_record(key)
    turns = []
    for r in range(rounds):
        x = 0.1 + 0.1 * r
        turns += [{"from": "human", "value": f"What is the 3D box of <bbox>[{x:.3f}, 0.200, {x + 0.1:.3f}, 0.500]"
                                             f"</bbox><region>?"},
                  {"from": "gpt", "value": f'<3d_box center="0.{r}0, 0.30, 2.50" dimensions="0.50, 0.90, 0.55" '
                                           f'rotation="0.00, 0.00, 0.25"></3d_box>'}]
    rec["conversations"] = [rec["conversations"][0], {"task": "region_to_3d", "turns": turns}]
    records.validate("det3d", rec)
    return rec


def test_conversation_choice_follows_stage_and_is_seeded_by_key_and_epoch() -> None:
    rec = det3d_record()
    rec["conversations"].append(copy.deepcopy(rec["conversations"][1]))
    rec["conversations"][-1]["turns"][0]["value"] = rec["conversations"][-1]["turns"][0]["value"].replace("What", "Which")
    s1 = [pick_conversation(rec, 1, 0, e) for e in range(12)]
    assert {c["task"] for c in s1} == {"region_to_3d"}
    assert len({c["turns"][0]["value"] for c in s1}) == 2  # the epoch re-draws among eligible ones
    assert [pick_conversation(rec, 1, 0, e) for e in range(12)] == s1  # and is reproducible
    assert pick_conversation(rec, 2, 0, 0)["task"] == "detect_3d"
    pm = make_sample("pointmap", "world/pm").record
    assert pick_conversation(pm, 2, 0, 0) is None and pick_conversation(pm, 1, 0, 0)["task"] == "point_3d"


def test_example_image_scale_window_tokens_and_regions(tiny: torch.nn.Module,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    import model.vision as vision  # build_example imports preprocess_image from here at call time: spy on it

    orig = vision.preprocess_image

    def spy(im, scale=1.0, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(scale)
        return orig(im, scale, *a, **kw)

    monkeypatch.setattr(vision, "preprocess_image", spy)
    spec = _spec(tiny, stage=1)
    det = make_sample("det3d", "world/d1", seed=3)
    w, h = det.record["image"]["width"], det.record["image"]["height"]
    sample = {"json": det.record, "jpg": det.image_bytes}
    ex, why = build_example(sample, spec, epoch=0)
    assert why is None and ex is not None and ex.task == "region_to_3d"
    assert calls == [det.record["camera"]["scale"]] == [2.0]  # 1000 / fx, fx = 500
    assert ex.window == letterbox_window(w, h, spec.image_size, 2.0)
    with Image.open(io.BytesIO(det.image_bytes)) as im:
        assert torch.equal(ex.pixel_values, orig(im, 2.0, spec.image_size))
    enc = ex.encoded
    tid = tiny.config.token_ids
    assert enc.input_ids.count(tid["image"]) == tiny.config.num_image_tokens
    assert enc.region_boxes == [(0.5, 0.4, 0.95, 0.95)] and enc.region_in_response == [False]
    sup = [i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    answer = tiny.tokenizer.decode(sup)
    assert answer.startswith("<3d_box center=") and answer.endswith("</3d_box><|im_end|>")
    # cot has no camera: shown at its own size (scale 1); its answer regions are detached
    cot = make_sample("cot", "world/c1", seed=4)
    calls.clear()
    ex2, _ = build_example({"json": cot.record, "jpg": cot.image_bytes}, spec, epoch=0)
    assert calls == [1.0] and ex2 is not None and ex2.encoded.region_in_response == [True, True]


def test_long_conversations_lose_last_rounds_then_are_skipped(tiny: torch.nn.Module) -> None:
    rec = _multi_round_record(rounds=4)
    turns = rec["conversations"][1]["turns"]
    n = tiny.config.num_image_tokens
    full = fit_conversation(tiny.tokenizer, turns, n, 10_000)
    one = fit_conversation(tiny.tokenizer, turns[:2], n, 10_000)
    assert len(full.region_boxes) == 4
    cut = fit_conversation(tiny.tokenizer, turns, n, len(full.input_ids) - 1)
    assert len(cut.region_boxes) == 3 and cut.input_ids == full.input_ids[: len(cut.input_ids)]
    assert fit_conversation(tiny.tokenizer, turns, n, len(one.input_ids)).input_ids == one.input_ids
    assert fit_conversation(tiny.tokenizer, turns, n, len(one.input_ids) - 1) is None
    spec = _spec(tiny, stage=1, max_seq_len=len(one.input_ids) - 1)
    ex, why = build_example({"json": rec, "jpg": image_bytes("jpg", 0)}, spec, epoch=0)
    assert ex is None and why == "too_long"


def test_depth_member_becomes_a_depth_canvas(tiny: torch.nn.Module, tmp_path: Path) -> None:
    s = make_sample("pointmap", "world/pm_depth", seed=1)
    depth = np.random.default_rng(0).uniform(0.5, 4.0, (24, 32)).astype(np.float32)
    s.arrays["depth"] = depth
    s.record["arrays"] = ["depth", "points"]
    write_build(tmp_path / "pm", [[s, make_sample("pointmap", "world/pm_plain", seed=2)]])
    loader = TrainLoader(parse_mix("pm", tmp_path), _spec(tiny), batch_size=2, num_workers=0, shuffle=False)
    (batch,) = list(loader.epoch_batches())
    assert batch["keys"] == ["world/pm_depth", "world/pm_plain"]
    size = tiny.config.image_size
    assert torch.equal(batch["depth"][0], preprocess_depth(depth, 2.0, size))
    assert batch["depth"][1].abs().sum() == 0  # no depth: all tokens get the learned no-depth vector
    assert batch["pixel_values"].shape == (2, 3, size, size) and batch["image_windows"].shape == (2, 4)


# ---------------------------------------------------------------------------------------------- mixture / splits

def test_parse_mix_weights_paths_and_incomplete_shards(builds: Path, tmp_path: Path) -> None:
    srcs = parse_mix("det3d@0.5, pointmap@0.3,cot", builds)
    assert [(s.name, s.weight, len(s.urls), s.n_samples) for s in srcs] == [
        ("det3d", 0.5, 4, 24), ("pointmap", 0.3, 4, 24), ("cot", 1.0, 4, 24)]
    assert parse_mix(f"{builds / 'cot'}@2", "/nonexistent")[0].name == "cot"
    # a tar without its stats file is an unfinished shard: not trained on
    write_build(tmp_path / "part", [[make_sample("det3d", "a/x")], [make_sample("det3d", "a/y")]])
    (tmp_path / "part" / "shards" / "000001.stats.json").unlink()
    assert parse_mix("part", tmp_path)[0].n_samples == 1
    for bad, match in [("det3d@x", "not a number"), ("det3d@0", "> 0"), ("nope@1", "does not exist"),
                       ("det3d,det3d", "named twice"), ("", "empty")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            parse_mix(bad, builds)


def test_epoch_splits_by_rank_and_worker_each_sample_once(tiny: torch.nn.Module, builds: Path) -> None:
    srcs = parse_mix("det3d@0.5,pointmap@0.3,cot@0.2", builds)
    everything = {s["__key__"] for c in CORPORA for s in iter_samples(builds / c)}
    per_rank = []
    for rank in (0, 1):
        loader = TrainLoader(srcs, _spec(tiny), batch_size=4, num_workers=2, rank=rank, world_size=2)
        keys = [k for b in _epoch_keys(loader) for k in b]
        assert len(keys) == len(set(keys)), "a rank saw a sample twice in one epoch"
        assert loader.state_dict()["done"] == [0, 1]
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == everything and len(everything) == 72


def test_order_is_reproducible_and_reshuffled_per_epoch(tiny: torch.nn.Module, builds: Path) -> None:
    srcs = parse_mix("det3d,pointmap,cot", builds)
    a = TrainLoader(srcs, _spec(tiny), batch_size=3, num_workers=2)
    e0 = _epoch_keys(a)
    assert _epoch_keys(TrainLoader(srcs, _spec(tiny), batch_size=3, num_workers=2)) == e0
    a.next_epoch()
    e1 = _epoch_keys(a)  # the same workers went on into epoch 1
    assert sorted(k for b in e1 for k in b) == sorted(k for b in e0 for k in b) and e1 != e0
    fresh = TrainLoader(srcs, _spec(tiny), batch_size=3, num_workers=2)
    fresh.next_epoch()
    assert _epoch_keys(fresh) == e1  # new workers started at epoch 1 agree


@pytest.mark.parametrize("workers,consumed", [(0, 5), (2, 3), (2, 7)])
def test_resume_from_state_gives_the_same_remaining_batches(tiny: torch.nn.Module, builds: Path,
                                                            workers: int, consumed: int) -> None:
    srcs = parse_mix("det3d@0.5,pointmap@0.3,cot@0.2", builds)
    full = _epoch_keys(TrainLoader(srcs, _spec(tiny, stage=2), batch_size=4, num_workers=workers))
    first = TrainLoader(srcs, _spec(tiny, stage=2), batch_size=4, num_workers=workers)
    it = first.epoch_batches()
    got = [next(it)["keys"] for _ in range(consumed)]
    state = first.state_dict()
    it.close()
    assert got == full[:consumed] and state["batches"] == consumed
    again = TrainLoader(srcs, _spec(tiny, stage=2), batch_size=4, num_workers=workers)
    again.load_state_dict(state)
    assert _epoch_keys(again) == full[consumed:]
    # stage 2 has no point-map task: those samples were read, counted as skipped, never batched
    assert again.state.skipped == {"pointmap:no_stage_task": 24}
    assert not any(k.startswith("pointmap/") for b in full for k in b)
    with pytest.raises(ValueError, match="num_workers"):
        TrainLoader(srcs, _spec(tiny), batch_size=4, num_workers=workers + 2).load_state_dict(state)


def test_resampled_mixture_holds_the_ratios(tiny: torch.nn.Module, builds: Path) -> None:
    srcs = parse_mix("det3d@0.5,pointmap@0.3,cot@0.2", builds)
    loader = TrainLoader(srcs, _spec(tiny), batch_size=20, num_workers=0, resampled=True, samples_per_epoch=600)
    keys = [k for b in _epoch_keys(loader) for k in b]
    assert len(keys) == 600
    frac = {c: n / len(keys) for c, n in Counter(k.split("/")[0] for k in keys).items()}
    assert frac["det3d"] == pytest.approx(0.5, abs=0.06)
    assert frac["pointmap"] == pytest.approx(0.3, abs=0.06)
    assert frac["cot"] == pytest.approx(0.2, abs=0.06)
    assert len(set(keys)) < len(keys)  # with replacement, by design


def test_too_few_shards_for_the_ranks_is_a_clear_error(tiny: torch.nn.Module, tmp_path: Path) -> None:
    write_build(tmp_path / "det3d", [[make_sample("det3d", "a/x")]])
    with pytest.raises(ValueError, match="1 shards for 2 ranks"):
        TrainLoader(parse_mix("det3d", tmp_path), _spec(tiny), batch_size=1, rank=0, world_size=2)


def test_written_samples_are_schema_valid(builds: Path) -> None:
    for c in CORPORA:
        for s in iter_samples(builds / c):
            records.validate(c, s["json"])
