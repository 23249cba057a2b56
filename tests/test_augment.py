"""Training options of `model.augment`: 2D box jitter of region prompts (seeded, off by default, never at
evaluation) and the direct-3D detection answers (trained, recorded in the checkpoint, decoded and parsed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model.augment import direct_answer, jitter_boxes
from model.checkpoint import build_tiny_model
from model.data import ExampleSpec, build_example
from tests.test_data_loader import make_sample

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_tiny_model(seed=0)


def test_jitter_is_seeded_bounded_valid_and_spares_answer_boxes() -> None:
    boxes = [(0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0), (0.3, 0.3, 0.3, 0.3), (0.2, 0.2, 0.4, 0.4)]
    resp = [False, False, False, True]
    a = jitter_boxes(boxes, resp, 0.2, "0:1:world/a")
    assert a == jitter_boxes(boxes, resp, 0.2, "0:1:world/a")  # same (seed, epoch, key): same jitter
    assert a != jitter_boxes(boxes, resp, 0.2, "0:2:world/a")  # next epoch: another draw
    assert a[3] == boxes[3] and a[2] == boxes[2]  # answer boxes and points never move
    assert a[0] != boxes[0]
    for (x1, y1, x2, y2), (ox1, oy1, ox2, oy2) in zip(a, boxes):
        assert 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1
        w, h = ox2 - ox1, oy2 - oy1
        assert abs(x1 - ox1) <= 0.2 * w + 1e-9 and abs(y2 - oy2) <= 0.2 * h + 1e-9
    assert a[0][0] < a[0][2] and a[0][1] < a[0][3]
    assert jitter_boxes(boxes, resp, 0.0, "k") == boxes
    with pytest.raises(ValueError, match="jitter"):
        jitter_boxes(boxes, resp, 0.5, "k")


def test_build_example_jitters_region_prompts_only_when_asked(tiny) -> None:
    from model.train_config import TrainConfig, load_config

    assert TrainConfig().data.box_jitter == 0.0 and ExampleSpec.for_model(tiny, 1).box_jitter == 0.0
    s = make_sample("det3d", "world/j1", seed=3)
    sample = {"json": s.record, "jpg": s.image_bytes}
    plain, _ = build_example(sample, ExampleSpec.for_model(tiny, 1, tasks=["region_to_3d"]), epoch=0)
    assert plain.encoded.region_boxes == [(0.5, 0.4, 0.95, 0.95)]  # off by default: the text's box
    cfg = load_config("tiny", {"data.box_jitter": "0.25", "data.tasks": "region_to_3d"})
    spec = ExampleSpec.for_config(tiny, cfg)
    j0, _ = build_example(sample, spec, epoch=0)
    assert j0.encoded.region_boxes != plain.encoded.region_boxes
    assert j0.encoded.input_ids == plain.encoded.input_ids  # the text keeps the exact numbers
    assert build_example(sample, spec, epoch=0)[0].encoded.region_boxes == j0.encoded.region_boxes
    assert build_example(sample, spec, epoch=1)[0].encoded.region_boxes != j0.encoded.region_boxes
    cot = make_sample("cot", "world/j2", seed=4)  # its regions are answers (detached): never jittered
    ex, _ = build_example({"json": cot.record, "jpg": cot.image_bytes},
                          ExampleSpec.for_model(tiny, 1, box_jitter=0.25), epoch=0)
    assert ex.encoded.region_boxes == [(0.2, 0.3, 0.35, 0.5), (0.5, 0.5, 0.5, 0.5)]


def test_evaluation_pools_the_exact_prompt_box(tiny, monkeypatch) -> None:
    """Generation (every evaluation path) pools the region prompt's own box: no jitter there."""
    from model.generate import generate

    seen = []
    orig = tiny.region_embeddings

    def spy(visual, boxes, index):  # type: ignore[no-untyped-def]
        seen.append(torch.as_tensor(boxes).tolist())
        return orig(visual, boxes, index)

    monkeypatch.setattr(tiny, "region_embeddings", spy)
    generate(tiny, [Image.new("RGB", (64, 48))], ["Where is <bbox>[0.125, 0.250, 0.500, 0.750]</bbox><region>?"],
             max_new_tokens=2)
    assert seen[0] == [[0.125, 0.25, 0.5, 0.75]]


def test_direct_answers_drop_the_grounded_prefix(tiny) -> None:
    text = ("<bbox>[0.100, 0.200, 0.450, 0.900]</bbox><region> <3d_box center=\"1.00, 2.00, 3.00\" dimensions=\"1.00, "
            "1.00, 1.00\" rotation=\"0.00, 0.00, 0.00\"></3d_box>\n<bbox>[0.5, 0.5, 0.6, 0.6]</bbox><region> <3d_box "
            "center=\"0.00, 0.00, 1.00\" dimensions=\"1.00, 1.00, 1.00\" rotation=\"0.00, 0.00, 0.00\"></3d_box>")
    out = direct_answer(text)
    assert "<bbox>" not in out and "<region>" not in out and out.count("<3d_box") == 2 and out.startswith("<3d_box")
    s = make_sample("det3d", "world/d1", seed=3)
    spec = ExampleSpec.for_model(tiny, 2, det3d_answer="direct")
    ex, _ = build_example({"json": s.record, "jpg": s.image_bytes}, spec, epoch=0)
    assert ex.task == "detect_3d" and ex.encoded.region_boxes == []
    sup = [i for i, lab in zip(ex.encoded.input_ids, ex.encoded.labels) if lab != -100]
    assert tiny.tokenizer.decode(sup).startswith("<3d_box center=")
    grounded, _ = build_example({"json": s.record, "jpg": s.image_bytes}, ExampleSpec.for_model(tiny, 2), epoch=0)
    assert len(grounded.encoded.region_boxes) == 1  # default: the grounded answer


@pytest.mark.parametrize("mode", ["grounded", "direct"])
def test_both_answer_forms_train_and_evaluate_end_to_end(mode: str, tmp_path: Path) -> None:
    """A few stage-2 steps in each mode; the checkpoint records the form and detect_3d evaluation follows it."""
    from model.checkpoint import load_pretrained
    from model.constrained import GrammarConstraint, detect_kind
    from model.eval.predict import predict_omni3d
    from model.train import train
    from model.train_config import load_config
    from tests.test_data_loader import write_corpora
    from tests.test_shards_samples import K, image_bytes

    root = write_corpora(tmp_path / "b", shards=1, per_shard=4, corpora=("det3d",))
    cfg = load_config("tiny", {"data.root": str(root), "data.mix": "det3d@1", "stage": "2", "max_steps": "2",
                               "data.num_workers": "0", "data.batch_size": "2", "checkpoint_every": "0",
                               "data.det3d_answer": mode, "out": str(tmp_path / "run")})
    assert train(cfg)["step"] == 2
    model = load_pretrained(tmp_path / "run" / "final")
    assert model.config.det3d_answer == mode
    kind = detect_kind(model.config)
    assert kind == {"grounded": "detect", "direct": "detect_direct"}[mode]
    (tmp_path / "img.jpg").write_bytes(image_bytes("jpg", 1))
    jobs = [{"id": 1, "file_path": "img.jpg", "width": 32, "height": 24, "K": K, "categories": [(3, "chair")]}]
    texts = []

    def factory():  # type: ignore[no-untyped-def]
        c = GrammarConstraint(model.tokenizer, kind, max_items=1)
        orig = c.__call__

        def call(b, ids, scores):  # type: ignore[no-untyped-def]
            texts.append(ids)
            return orig(b, ids, scores)
        return call

    (pred,) = predict_omni3d(model, jobs, tmp_path, max_new_tokens=120, logits_processor_factory=factory)
    (inst,) = pred["instances"]  # constrained: exactly one well-formed object
    assert inst["category_id"] == 3 and len(inst["bbox3D"]) == 8
    answer = model.tokenizer.decode(texts[-1])
    assert inst["bbox_source"] == {"grounded": "answer", "direct": "projected"}[mode] or "bbox" not in inst
    assert ("<bbox>" in answer) == (mode == "grounded")
