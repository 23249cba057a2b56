"""The grounded-CoT builder with real tiny random-weight models built offline from configs: a native
Florence-2 and a LLaVA-style chat VLM, through the real processor / generate / post-processing code, as
actor pools on Ray and as DoFns on Beam. Model calls are counted to show a rebuild makes none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from annotators.florence2 import Florence2Tagger, build_tiny_florence2
from annotators.testing import ScriptedLogits
from annotators.vlm import TransformersVLM, build_tiny_vlm
from pipelines.corpora.cot.builder import CotConfig, make_cot_builder
from pipelines.engine.options import BuildOptions
from pipelines.engine.run import run_build
from tests.test_executors_toy import compared_files

torch.set_num_threads(1)
FILES = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]
# Every Florence-2 request answers this phrase-grounding box (beam search still runs, forced).
FORCED = "object<loc_100><loc_200><loc_500><loc_700>"
LOCAL4 = BuildOptions.on("local", chunk_size=4, show_progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {"florence2": build_tiny_florence2(root / "florence2"), "vlm": build_tiny_vlm(root / "vlm")}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts generate() requests of both models in this process (the local and in-process Beam runs)."""
    n = {"florence2": 0, "vlm": 0}
    gen, comp = Florence2Tagger._generate, TransformersVLM._complete

    def counted_generate(self, requests):
        n["florence2"] += len(requests)
        return gen(self, requests)

    def counted_complete(self, batch, on_done):
        n["vlm"] += len(batch)
        return comp(self, batch, on_done)

    monkeypatch.setattr(Florence2Tagger, "_generate", counted_generate)
    monkeypatch.setattr(TransformersVLM, "_complete", counted_complete)
    return n


def _builder(sw_root: Path, out: Path, tiny: dict[str, Path], **kw: Any):
    args: dict[str, Any] = dict(tagger="florence2", verifier="transformers", tagger_model=str(tiny["florence2"]),
                                verifier_model=str(tiny["vlm"]), tagger_max_new_tokens=16, verifier_max_new_tokens=12,
                                device="cpu", torch_threads=1, num_gpus=0)
    args.update(kw)
    return make_cot_builder(CotConfig(FILES, sw_root, out=out, **args))


def _forced_tagger_kwargs(tiny: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoProcessor, LogitsProcessorList

    tok = AutoProcessor.from_pretrained(tiny["florence2"]).tokenizer
    scripted = ScriptedLogits.from_texts(tok, [FORCED] * 400, num_beams=3)
    return {"generate_kwargs": {"logits_processor": LogitsProcessorList([scripted])}}


def _mention_images(sample_world, tag_rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    images = {s["id"]: s["image"][0] if isinstance(s["image"], list) else s["image"]
              for f in sample_world.refspatial_files for s in json.loads(f.json_path.read_text())}
    return [{"image": images[r["record_id"]], "text": r["mention_text"]} for r in tag_rows]


def _totals(res) -> tuple[int, int, int]:
    t = res.manifest["totals"]
    return t["n_input"], t["n_samples"], t["n_rejected"]


def test_random_models_complete_and_account_for_every_input(tmp_path: Path, sample_world, tiny, calls) -> None:
    out = tmp_path / "random"
    res = run_build(_builder(sample_world.root, out, tiny), out, LOCAL4)
    n_in, n_ok, n_rej = _totals(res)
    assert n_in == 11 and n_ok + n_rej == 11
    reasons = set(res.manifest["rejects_by_reason"])
    assert reasons <= {"no_candidates", "verifier_malformed_output", "verifier_none", "low_confidence",
                       "ambiguous_alignment", "rewrite_malformed_output"}, reasons
    index = pq.read_table(out / "index.parquet").column("key").to_pylist()
    rej = pq.read_table(out / "rejects.parquet").column("key").to_pylist()
    assert sorted(index + rej) == sorted(r["key"] for r in pq.read_table(out / "intermediate" / "tag").to_pylist()
                                         if r["mention_index"] == 0)  # each input once, in one place
    assert calls["florence2"] > 0  # real generate calls happened (phrase grounding, then the OD fallback)
    tag = pq.read_table(out / "intermediate" / "tag").to_pylist()
    assert {r["record_id"] for r in tag} == {s["id"] for f in sample_world.refspatial_files
                                             for s in json.loads(f.json_path.read_text())}


def test_forced_tagger_random_verifier_same_bytes_on_local_ray_beam_and_rebuilds_make_no_calls(
        tmp_path: Path, sample_world, tiny, calls, ray_session) -> None:
    # verifier batch 1: a random model's near-tied logits can flip with the padding of a batch, and which
    # requests share a batch depends on what the cache already answered (chunk order differs on Ray);
    # one request per generate call makes its answers batch-invariant, hence executor-invariant.
    kw = dict(tagger_kwargs=_forced_tagger_kwargs(tiny), rewrite="none", verifier_batch_size=1)
    out = tmp_path / "local"
    res = run_build(_builder(sample_world.root, out, tiny, **kw), out, LOCAL4)
    assert _totals(res) == (11, 0, 11)
    # every mention got Florence-2's (forced) box; the random VLM's answers are unusable -> rejects, raw kept
    assert res.manifest["rejects_by_reason"] == {"verifier_malformed_output": 11}
    tag = pq.read_table(out / "intermediate" / "tag").to_pylist()
    assert tag and all(r["source"] == "phrase_grounding" and r["box_px"] == [32.0, 48.0, 160.0, 168.0]
                       for r in tag)  # (k + 0.5) * 320/1000 and * 240/1000, truncated: the real post-processing
    ver = pq.read_table(out / "intermediate" / "verify").to_pylist()
    assert len(ver) == len(tag) and all(r["decision"] == "malformed_output" and r["parse_error"] for r in ver)
    assert all(len(json.loads(r["attempts"])) == 2 for r in ver)  # first answer and the repair retry
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    assert all(r["stage"] == "assign" and "raw: " in r["message"] for r in rej)
    first_calls = dict(calls)
    # one Florence-2 request per distinct (image, mention) and no OD fallback (every request got a box);
    # one verify prompt per distinct (image, mention, candidates), answered twice (the repair retry).
    # Mentions repeated across the two files on one image are answered by the cache.
    n_distinct = len({(r["image"], r["text"]) for r in _mention_images(sample_world, tag)})
    assert first_calls == {"florence2": n_distinct, "vlm": 2 * n_distinct} and n_distinct < len(ver)

    # re-run over the finished build: nothing to do, zero model calls
    calls.update(florence2=0, vlm=0)
    res = run_build(_builder(sample_world.root, out, tiny, **kw), out, BuildOptions.on("local", show_progress=False))
    assert res.processed == [] and calls == {"florence2": 0, "vlm": 0}
    # rebuild from scratch (--overwrite deletes shards and intermediates, keeps BUILD/cache): zero calls too
    ref = compared_files(out)
    res = run_build(_builder(sample_world.root, out, tiny, **kw), out,
                    BuildOptions.on("local", chunk_size=4, overwrite=True, show_progress=False))
    assert res.processed == [0, 1, 2] and calls == {"florence2": 0, "vlm": 0}
    assert compared_files(out) == ref

    # the model stages as actor pools on Ray (num_gpus from the CLI: 0 here) and as DoFns on Beam
    for ex, workers in (("ray", 1), ("beam", 1)):
        o = tmp_path / ex
        run_build(_builder(sample_world.root, o, tiny, **kw), o,
                  BuildOptions.on(ex, chunk_size=4, workers=workers, show_progress=False))
        assert compared_files(o) == ref, ex


def test_default_tagger_settings_give_no_exception_rejects(tmp_path: Path, sample_world, tiny) -> None:
    """Issue 15: at the default --tagger-max-new-tokens (1024) every tiny Florence-2 request failed and
    every sample became an `exception` reject; generation is now bounded by the decoder's positions."""
    out = tmp_path / "default"
    b = _builder(sample_world.root, out, tiny, tagger_max_new_tokens=1024)
    res = run_build(b, out, LOCAL4)
    n_in, n_ok, n_rej = _totals(res)
    assert n_in == 11 and n_ok + n_rej == 11
    assert "exception" not in res.manifest["rejects_by_reason"] and "model_error" not in res.manifest["rejects_by_reason"]
    assert len(pq.read_table(out / "intermediate" / "tag").to_pylist()) > 0


def test_a_model_error_on_one_sample_is_a_model_error_reject(tmp_path: Path, sample_world, tiny, monkeypatch) -> None:
    """The model failing on one sample's requests rejects that sample (`model_error` + message), not its batch."""
    from annotators.images import image_sha256

    first = json.loads((sample_world.root / FILES[0]).read_text())[0]
    rel = first["image"][0] if isinstance(first["image"], list) else first["image"]
    poison = image_sha256(Image.open(sample_world.root / "sample_world" / rel).convert("RGB"))
    real = Florence2Tagger._generate

    def failing(self, requests):
        if any(image_sha256(im) == poison for im, _ in requests):
            raise IndexError("index out of range in self")
        return real(self, requests)

    monkeypatch.setattr(Florence2Tagger, "_generate", failing)
    out = tmp_path / "poison"
    res = run_build(_builder(sample_world.root, out, tiny), out, LOCAL4)
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    errs = [r for r in rej if r["reason"] == "model_error"]
    assert errs and all(r["stage"] == "tag" for r in errs)
    assert errs[0]["message"] == "tagger: IndexError: index out of range in self"
    assert "exception" not in res.manifest["rejects_by_reason"]
    n_in, n_ok, n_rej = _totals(res)
    assert n_ok + n_rej == n_in == 11
    tag = pq.read_table(out / "intermediate" / "tag").to_pylist()  # `_outcome`: "ok" or the reject reason
    tagged = {r["key"] for r in tag if r["_outcome"] == "ok"}
    assert {r["key"] for r in tag if r["_outcome"] == "model_error"} == {r["key"] for r in errs}
    failed = {r["key"] for r in errs}
    assert len(tagged) + len(failed) == 11 and not tagged & failed  # the samples sharing its batch are tagged
