"""Transformers VLM backend on tiny random-weight chat VLMs built offline (LLaVA, Qwen2.5-VL layout).

The real chat template, processor, batched generate and decode run; ScriptedLogits steers the
decoder to known answers to test parsing, the retry-once policy and the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from annotators.cache import ResponseCache
from annotators.common import Candidate
from annotators.parsing import ModelOutputError
from annotators.prompts import PROMPT_VERSION
from annotators.testing import ScriptedLogits
from annotators.vlm import (
    RewriteRequest,
    TransformersVLM,
    Verdict,
    VerifyRequest,
    VLMClient,
    build_tiny_vlm,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_llava"), arch="llava")


def _img(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8)


def _script(vlm: TransformersVLM, texts: list[str]) -> ScriptedLogits:
    vlm.setup()
    s = ScriptedLogits.from_texts(vlm.processor.tokenizer, texts)
    vlm.generate_kwargs = {"logits_processor": LogitsProcessorList([s])}
    return s


def test_verify_and_rewrite_parse_model_json(llava: Path) -> None:
    vlm = TransformersVLM(str(llava), max_new_tokens=40, batch_size=2)
    assert isinstance(vlm, VLMClient)
    _script(
        vlm,
        [
            '{"choice": 1, "confidence": 0.75}',
            '```json\n{"choice": null, "confidence": 0.2}\n```',
            '{"choice": 0, "confidence": 1}',
        ],
    )
    cands = [Candidate("the cup", "cup", (10, 10, 50, 50), "od"), (60, 20, 150, 110)]
    res = vlm.verify_many(
        [
            VerifyRequest(_img(), "the cup", cands),
            VerifyRequest(_img(), "the lamp", cands),
            VerifyRequest(_img(1), "the mug", [(0, 0, 5, 5)]),
        ]
    )
    assert res[0] == Verdict(1, 0.75, '{"choice": 1, "confidence": 0.75}', PROMPT_VERSION)
    assert res[1].choice is None and res[1].confidence == 0.2  # type: ignore[union-attr]
    assert res[2].choice == 0  # type: ignore[union-attr]
    assert vlm.calls == 3
    _script(vlm, ['{"description": "the blue mug next to the laptop"}'])
    rw = vlm.rewrite(_img(), "the mug", (10, 10, 50, 50), [(60, 20, 150, 110)])
    assert rw.text == "the blue mug next to the laptop" and rw.prompt_version == PROMPT_VERSION


def test_malformed_output_retried_once_then_error_with_raw(llava: Path, tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "vlm.sqlite")
    vlm = TransformersVLM(str(llava), max_new_tokens=40, cache=cache)
    s = _script(
        vlm,
        [
            "I think it is box 0",  # 1st attempt, request 0: prose
            '{"choice": 5, "confidence": 0.5}',  # 1st attempt, request 1: out of range
            "Box 0, definitely.",  # retry, request 0: still prose -> error
            '{"choice": 0, "confidence": 0.9}',  # retry, request 1: fine
        ],
    )
    res = vlm.verify_many(
        [VerifyRequest(_img(), "the cup", [(1, 1, 9, 9)]), VerifyRequest(_img(), "the bowl", [(1, 1, 9, 9)])]
    )
    err = res[0]
    assert isinstance(err, ModelOutputError)
    assert err.raw == "Box 0, definitely." and err.attempts == ["I think it is box 0", "Box 0, definitely."]
    assert "does not start with a JSON object" in err.reason
    assert res[1] == Verdict(0, 0.9, '{"choice": 0, "confidence": 0.9}')
    assert vlm.calls == 4 and s.calls == 2  # 2 first attempts in one batch + 2 retries in one batch
    assert cache.stats()["puts"] == 4  # every finished call is cached, unusable ones too

    # re-run from the cache: zero model calls, identical outcome (the failure is replayed too)
    again = TransformersVLM(str(llava), max_new_tokens=40, cache=ResponseCache(tmp_path / "vlm.sqlite"))
    res2 = again.verify_many(
        [VerifyRequest(_img(), "the cup", [(1, 1, 9, 9)]), VerifyRequest(_img(), "the bowl", [(1, 1, 9, 9)])]
    )
    assert again.calls == 0 and again.model is None
    assert isinstance(res2[0], ModelOutputError) and res2[0].attempts == err.attempts
    assert res2[1] == res[1]
    with pytest.raises(ModelOutputError) as ei:
        again.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert ei.value.attempts == err.attempts and again.calls == 0


def test_rewrite_many_batches_and_validates(llava: Path) -> None:
    vlm = TransformersVLM(str(llava), max_new_tokens=40, batch_size=4)
    _script(
        vlm,
        [
            '{"description": "the left chair"}',
            '{"description": "<bbox> chair"}',
            '{"description": "the right chair"}',
        ],
    )
    res = vlm.rewrite_many(
        [
            RewriteRequest(_img(), "chair", (0, 0, 50, 100), [(100, 0, 150, 100)]),
            RewriteRequest(_img(), "chair", (100, 0, 150, 100), [(0, 0, 50, 100)]),
        ]
    )
    assert res[0].text == "the left chair"  # type: ignore[union-attr]
    assert res[1].text == "the right chair"  # type: ignore[union-attr]  # forbidden '<' -> repaired
    assert vlm.calls == 3


def test_qwen25vl_layout_loads_without_torchvision_and_generates(tmp_path: Path) -> None:
    ckpt = build_tiny_vlm(tmp_path / "qwen", arch="qwen2_5_vl")
    assert not (ckpt / "processor_config.json").exists()  # like a real Qwen2.5-VL checkpoint dir
    vlm = TransformersVLM(str(ckpt), max_new_tokens=40)
    _script(vlm, ['{"choice": 0, "confidence": 0.6}'])
    v = vlm.verify(_img(), "the cup", [(10, 10, 50, 50)])
    assert v.choice == 0 and v.confidence == 0.6
    assert type(vlm.processor).__name__ == "Qwen2_5_VLProcessorImagesOnly"
    # unscripted: random output goes through the whole path and ends as a ModelOutputError
    vlm.generate_kwargs = {}
    with pytest.raises(ModelOutputError) as ei:
        vlm.verify(_img(3), "the cup", [(10, 10, 50, 50)])
    assert len(ei.value.attempts) == 2 and vlm.calls == 3
