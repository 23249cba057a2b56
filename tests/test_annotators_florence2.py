"""Florence-2 tagger on a tiny random-weight native checkpoint built offline.

The real processor, generate (beam search, batching) and post_process_generation run; a
ScriptedLogits processor forces the decoder to known answers so the pixel boxes can be checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from annotators.cache import ResponseCache
from annotators.common import Candidate
from annotators.florence2 import Florence2Tagger, build_tiny_florence2, label_matches, prompt_text
from annotators.testing import ScriptedLogits

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("florence2_tiny"))


def _img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _scripted(tagger: Florence2Tagger, texts: list[str]) -> ScriptedLogits:
    tagger.setup()
    s = ScriptedLogits.from_texts(tagger.processor.tokenizer, texts, num_beams=tagger.num_beams)
    tagger.generate_kwargs = {"logits_processor": LogitsProcessorList([s])}
    return s


def test_tiny_checkpoint_loads_like_a_real_one(ckpt: Path) -> None:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration, Florence2Processor

    proc = AutoProcessor.from_pretrained(ckpt)
    assert isinstance(proc, Florence2Processor)
    assert len(proc.tokenizer.tokenize("<loc_999>")) == 1
    model = Florence2ForConditionalGeneration.from_pretrained(ckpt)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_phrase_grounding_batched_with_beams_gives_pixel_boxes(ckpt: Path) -> None:
    t = Florence2Tagger(str(ckpt), num_beams=3, max_new_tokens=20, batch_size=2)
    s = _scripted(
        t,
        [
            "cup<loc_100><loc_200><loc_300><loc_400>",
            "chair<loc_0><loc_0><loc_499><loc_999>",
            "cup<loc_100><loc_200><loc_300><loc_400><loc_900><loc_900><loc_950><loc_950>",
        ],
    )
    out = t.tag([_img(480, 640), _img(240, 320, 1)], [["the red cup", "the chair", "the red cup"], ["cup"]])
    assert s.calls == 2 and t.calls == 3  # 3 distinct requests in batches of 2; no OD needed
    assert out[0] == [
        Candidate("the red cup", "cup", (64.0, 96.0, 192.0, 192.0), "phrase_grounding", None, 0),
        Candidate("the chair", "chair", (0.0, 0.0, 319.0, 479.0), "phrase_grounding", None, 1),
        Candidate("the red cup", "cup", (64.0, 96.0, 192.0, 192.0), "phrase_grounding", None, 2),
    ]
    # (k + 0.5) * W / 1000 truncated, on the second image's own size; two boxes for one phrase
    assert [c.box_xyxy_px for c in out[1]] == [(32.0, 48.0, 96.0, 96.0), (288.0, 216.0, 304.0, 228.0)]
    assert all(c.mention_index == 0 and c.source == "phrase_grounding" for c in out[1])


def test_od_is_the_fallback_for_ungrounded_mentions(ckpt: Path) -> None:
    t = Florence2Tagger(str(ckpt), num_beams=1, max_new_tokens=40, batch_size=8, max_od_candidates=2)
    s = _scripted(
        t,
        [
            "cup<loc_100><loc_200><loc_300><loc_400>",  # "the red cup": grounded
            "",  # "the lamp": nothing
            "",  # "the vase": nothing
            "cup<loc_1><loc_1><loc_2><loc_2>lamp<loc_500><loc_500><loc_600><loc_600>table<loc_0><loc_700><loc_999><loc_999>",
        ],
    )
    (cands,) = t.tag([_img(100, 1000)], [["the red cup", "the lamp", "the vase"]])
    assert s.calls == 2  # one phrase-grounding batch, one OD batch
    by = {k: [c for c in cands if c.mention_index == k] for k in range(3)}
    assert [(c.label, c.source) for c in by[0]] == [("cup", "phrase_grounding")]  # grounded: no OD added
    assert [(c.label, c.source, c.box_xyxy_px) for c in by[1]] == [("lamp", "od", (500.0, 50.0, 600.0, 60.0))]
    assert [(c.label, c.source) for c in by[2]] == [
        ("cup", "od"),
        ("lamp", "od"),
    ]  # no match: first 2 OD boxes


def test_rerun_answers_from_cache_with_zero_model_calls(ckpt: Path, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "c.sqlite")
    images = [_img(480, 640), _img(480, 640, 2)]
    mentions = [["the red cup", "the lamp"], ["the chair"]]
    first = Florence2Tagger(str(ckpt), num_beams=1, max_new_tokens=24, cache=cache)
    _scripted(
        first,
        [
            "cup<loc_100><loc_200><loc_300><loc_400>",
            "",
            "chair<loc_5><loc_6><loc_7><loc_8>",
            "lamp<loc_1><loc_2><loc_3><loc_4>",
        ],
    )
    out1 = first.tag(images, mentions)
    assert first.calls == 4 and cache.stats()["puts"] == 4
    again = Florence2Tagger(
        str(ckpt), num_beams=1, max_new_tokens=24, cache=ResponseCache(tmp_path / "c.sqlite")
    )
    out2 = again.tag(images, mentions)
    assert out2 == out1
    assert again.calls == 0 and again.model is None  # the model was not even loaded
    assert again.cache is not None and again.cache.stats() == {"hits": 4, "misses": 0, "puts": 0}
    # different decoding settings are a different model id: no stale hits
    other = Florence2Tagger(str(ckpt), num_beams=2, max_new_tokens=24, cache=cache)
    assert other.model_id != first.model_id


def test_unscripted_random_model_runs_the_whole_path(ckpt: Path) -> None:
    t = Florence2Tagger(str(ckpt), num_beams=2, max_new_tokens=12, batch_size=3, od_mode="always")
    img = _img(50, 70)
    out = t.tag([img, img], [["a cup", "the table"], []])
    assert len(out) == 2 and out[1] == []
    assert t.calls == 3  # two phrase requests + one OD for the image with mentions
    for c in out[0]:
        x1, y1, x2, y2 = c.box_xyxy_px
        assert 0 <= x1 <= x2 <= 70 and 0 <= y1 <= y2 <= 50


def test_label_matching_and_input_checks(ckpt: Path) -> None:
    assert label_matches("the red cups on the table", "cup")
    assert label_matches("The coffee cup", "coffee cup")
    assert not label_matches("the cup", "coffee cup")
    assert not label_matches("the cup", "")
    assert prompt_text(" the <OD> cup\n on<loc_5> ") == "the OD cup on loc_5"
    with pytest.raises(ValueError):
        Florence2Tagger(str(ckpt)).tag([_img(4, 4)], [])
    with pytest.raises(ValueError):
        Florence2Tagger(str(ckpt), od_mode="sometimes")  # type: ignore[arg-type]


def test_default_max_new_tokens_is_bounded_by_the_decoder_positions(ckpt: Path) -> None:
    """Issue 15: the default 1024 new tokens ran past the tiny decoder's 256 positions (IndexError)."""
    t = Florence2Tagger(str(ckpt), od_mode="always")  # default num_beams and max_new_tokens
    assert t.max_new_tokens == 1024
    out = t.tag([_img(40, 60)], [["a cup"]])
    assert len(out) == 1 and t.calls == 2
    assert t.effective_max_new_tokens == 256 == t.model.config.text_config.max_position_embeddings
    assert Florence2Tagger(str(ckpt), max_new_tokens=12).effective_max_new_tokens == 12
