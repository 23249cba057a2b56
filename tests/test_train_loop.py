"""Trainer pieces in-process: schedule, loss-token count, checkpoint discovery, metrics trimming, the plot,
and one real (tiny) optimizer step through the same code path as `gr3d train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import build_tiny_model
from model.data import ExampleSpec, TrainLoader, parse_mix
from model.train import Metrics, TrainStep, count_loss_tokens, find_latest_checkpoint, lr_lambda, plot_metrics
from tests.test_data_loader import write_corpora

torch.set_num_threads(1)


def test_lr_schedule_warms_up_linearly_then_cosine_to_the_floor() -> None:
    lam = [lr_lambda(s, 100, 0.03, 0.1) for s in range(100)]
    assert lam[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 3% of 100 steps
    assert lam[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lam[3:], lam[4:]))  # monotone decay after warmup
    assert lam[3 + 48] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 48 / 97)))
    assert lr_lambda(100, 100, 0.03, 0.1) == pytest.approx(0.1)
    assert lr_lambda(0, 10, 0.0) == pytest.approx(1.0)


def test_find_latest_checkpoint_skips_unfinished(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    assert find_latest_checkpoint(tmp_path) is None
    for name, complete in [("step_000010", True), ("step_000030", False), ("step_000040.tmp", True),
                           ("step_000020", True)]:
        (ck / name).mkdir(parents=True)
        if complete:
            (ck / name / "trainer.json").write_text("{}")
    assert find_latest_checkpoint(tmp_path) == ck / "step_000020"


def test_metrics_trimmed_to_the_resumed_step_and_plotted(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    m = Metrics(p, True, None)
    for s in range(1, 31):
        m.write({"step": s, "loss": 5.0 / s, "lr": 1e-3})
    m2 = Metrics(p, True, 20)  # killed at 30, resumed from the step-20 checkpoint
    m2.write({"event": "resume", "step": 20})
    m2.write({"step": 21, "loss": 0.2, "lr": 1e-3})
    steps = [json.loads(ln)["step"] for ln in p.read_text().splitlines()]
    assert steps == [*range(1, 21), 20, 21]
    png = plot_metrics(p, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_train_step_loss_is_token_weighted_and_trains_the_region_encoder(tmp_path: Path) -> None:
    model = build_tiny_model(seed=0)
    model.set_stage(1)
    write_corpora(tmp_path, shards=1, per_shard=4, corpora=("cot", "det3d"))
    spec = ExampleSpec.for_model(model, stage=1)
    step = TrainStep(model, 1)
    for mix in ("cot", "det3d"):  # cot: only answer (detached) regions -> the zero-weight dummy keeps it in
        loader = TrainLoader(parse_mix(mix, tmp_path), spec, batch_size=4, num_workers=0, shuffle=False)
        batch = next(loader.epoch_batches())
        loader.close()
        model.zero_grad()
        loss_sum, n = step(batch)
        assert n == count_loss_tokens(batch, model.config.token_ids) > 0
        ref = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "labels",
                                             "region_boxes", "image_windows")})
        assert float(loss_sum.detach()) == pytest.approx(float(ref.loss.detach()) * ref.num_loss_tokens, rel=1e-6)
        loss_sum.backward()
        grads = [p.grad for p in model.region_encoder.parameters()]
        assert all(g is not None for g in grads)
        nonzero = any(float(g.abs().sum()) > 0 for g in grads)
        assert nonzero == (mix == "det3d")  # region prompts train it; answer regions are detached
        assert all(p.grad is None for p in model.vision.parameters())  # stage 1: SigLIP frozen


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    from model.train import enable_gradient_checkpointing

    write_corpora(tmp_path, shards=1, per_shard=4, corpora=("det3d",))
    grads = []
    for ckpt in (False, True):
        model = build_tiny_model(seed=0)
        model.set_stage(1)
        if ckpt:
            enable_gradient_checkpointing(model)
        assert model.llm.is_activation_checkpointing == ckpt
        loader = TrainLoader(parse_mix("det3d", tmp_path), ExampleSpec.for_model(model, 1), batch_size=4,
                             num_workers=0, shuffle=False)
        batch = next(loader.epoch_batches())
        loader.close()
        loss_sum, _ = TrainStep(model, 1).train()(batch)
        loss_sum.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_grad_accumulation_equals_the_big_batch(tmp_path: Path) -> None:
    """Loss is token-weighted over the whole window: 2 x 4 accumulated == one batch of 8 (same samples)."""
    from model.train import train
    from model.train_config import load_config
    from tests.test_train_resume import weights

    root = write_corpora(tmp_path / "b", shards=2, per_shard=8)
    finals = []
    for bs, acc in ((8, 1), (4, 2)):
        cfg = load_config("tiny", {"data.root": str(root), "data.num_workers": "0", "max_steps": "3",
                                   "data.batch_size": str(bs), "grad_accum": str(acc), "checkpoint_every": "0",
                                   "out": str(tmp_path / f"r{bs}")})
        summary = train(cfg)
        assert summary["step"] == 3 and summary["data"]["samples"] == 24
        finals.append(weights(tmp_path / f"r{bs}" / "final"))
    a, b = finals
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # type: ignore[union-attr]
    assert any(float((a[k] - b[k]).abs().max()) > 0 for k in a)  # padding differs: not trivially the same run
