"""The tiny preset learns: it overfits 8 fabricated det3d samples and then generates their exact answers,
inserting regions on the fly; the KV-cache loop stays exact on the trained model."""

import random
import time

import pytest
import torch

from model.checkpoint import build_tiny_model
from model.generate import generate
from model.gr3d import collate_conversations
from model.tokenizer import encode_conversation
from schemas import grammar
from tests.generation_ref import reference_logits

torch.set_num_threads(2)
STEPS = 160


def fabricate_samples(seed: int = 0) -> list[tuple[str, str, tuple[float, float, float, float] | None]]:
    """4 Region->3D samples (region prompt) and 4 detect-3D samples (the answer grounds, then gives 3D)."""
    rng = random.Random(seed)
    out = []
    for i in range(8):
        x1, x2 = sorted(rng.random() for _ in range(2))
        y1, y2 = sorted(rng.random() for _ in range(2))
        box = grammar.Box3D((rng.uniform(-2, 2), rng.uniform(-1, 1), rng.uniform(1, 8)),
                            (rng.uniform(0.2, 2), rng.uniform(0.2, 2), rng.uniform(0.2, 2)),
                            (rng.uniform(-0.2, 0.2), 0.0, rng.uniform(-0.9, 1.0)))
        b2 = grammar.parse_bbox2d(grammar.format_bbox2d((x1, y1, x2, y2)))
        if i < 4:
            out.append(("What is the 3D box of " + grammar.format_grounded(b2) + "?", grammar.format_box3d(box), None))
        else:
            cat = ["chair", "table", "sofa", "lamp"][i - 4]
            out.append((f"Detect the 3D box of the {cat}.", grammar.format_grounded(b2) + grammar.format_box3d(box), b2))
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build_tiny_model(seed=0)
    samples = fabricate_samples()
    encs = [encode_conversation(model.tokenizer, [{"from": "human", "value": p}, {"from": "gpt", "value": a}],
                                model.config.num_image_tokens) for p, a, _ in samples]
    batch = collate_conversations(encs, model.config.token_ids["pad"])
    pix = torch.randn(8, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    model.set_stage(1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    losses = []
    t0 = time.time()
    for _ in range(STEPS):
        loss = model(pixel_values=pix, **batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return model, samples, pix, losses, time.time() - t0


def test_loss_falls_by_90_percent(trained):
    _, _, _, losses, secs = trained
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
    assert losses[-1] < 0.05
    print(f"tiny overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f} in {STEPS} steps, {secs:.1f} s")


def test_generates_exact_answers_with_regions_inserted(trained):
    model, samples, pix, _, _ = trained
    res = generate(model, pix, [p for p, _, _ in samples], max_new_tokens=120, output_logits=True)
    for (prompt, answer, grounded), r, b in zip(samples, res, range(8)):
        assert r.finished and r.text == answer
        if grounded is None:
            assert r.regions == []
        else:  # the model wrote the 2D box, the loop pooled it and fed the region, the 3D box followed
            assert [reg.box for reg in r.regions] == [grounded]
            assert r.token_ids[r.regions[0].token_index] == model.config.token_ids["region"]
        assert r.mean_logprob > -0.05
        ref = reference_logits(model, pix[b], prompt, r)
        assert (r.step_logits - ref).abs().max() < 1e-4
