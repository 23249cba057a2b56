"""GR3D module: loss masking, region substitution and gradient flow, KV-cache exactness of streaming region
insertion, checkpoints (ours and NVILA layout)."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_tiny_model, load_pretrained, save_pretrained
from model.generate import generate
from model.gr3d import IGNORE_INDEX, collate_conversations
from model.tokenizer import build_tiny_tokenizer, encode_conversation
from schemas import grammar
from tests.generation_ref import forced, reference_logits

torch.set_num_threads(2)

BOX3D = grammar.format_box3d(grammar.Box3D((0.5, -0.2, 3.1), (1.0, 0.8, 0.6), (0.0, 0.0, 0.25)))
PROMPT_REGION = "What is the 3D box of " + grammar.format_grounded([0.1, 0.2, 0.6, 0.7]) + "?"
ANSWER_REGION = "The cup " + grammar.format_grounded([0.25, 0.25, 0.5, 0.75]) + " is at " + BOX3D


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture()
def model(tok):
    m = build_tiny_model(seed=0, tokenizer=tok)
    torch.manual_seed(1)
    torch.nn.init.normal_(m.spatial_pe.mlp[2].weight, std=0.5)  # make the (zero-init) PE visible
    return m


def _batch(model, turns_list):
    n = model.config.num_image_tokens
    encs = [encode_conversation(model.tokenizer, t, n) for t in turns_list]
    return encs, collate_conversations(encs, model.config.token_ids["pad"])


def _turns(prompt, answer):
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def test_loss_is_mean_ce_over_assistant_tokens_only(model):
    torch.manual_seed(0)
    encs, batch = _batch(model, [_turns(PROMPT_REGION, BOX3D), _turns("Where is it?", ANSWER_REGION)])
    pix = torch.randn(2, 3, 112, 112)
    out = model(pixel_values=pix, **batch)
    # reference: CE at every position whose *next* token is assistant text (label set by the encoder)
    logp = torch.log_softmax(out.logits.float(), -1)
    terms = []
    for b, e in enumerate(encs):
        for i in range(1, len(e.input_ids)):
            if e.labels[i] != IGNORE_INDEX:
                terms.append(-logp[b, i - 1, e.labels[i]])
    assert out.num_loss_tokens == len(terms)
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-5)
    # labels that (wrongly) cover the prompt, image and region slots are still masked for those slots
    bad = dict(batch, labels=torch.where(batch["attention_mask"] > 0, batch["input_ids"], IGNORE_INDEX))
    out_bad = model(pixel_values=pix, **bad)
    n_img_reg = sum(sum(1 for t in e.input_ids[1:] if t in (model.config.token_ids["image"],
                                                             model.config.token_ids["region"])) for e in encs)
    n_all = sum(len(e.input_ids) - 1 for e in encs)
    assert out_bad.num_loss_tokens == n_all - n_img_reg


def test_region_slot_gets_box_embedding_and_only_affects_later_positions(model):
    torch.manual_seed(0)
    encs, batch = _batch(model, [_turns(PROMPT_REGION, BOX3D)])
    pix = torch.randn(1, 3, 112, 112)
    visual = model.encode_images(pix)
    emb = model.embed_inputs(batch["input_ids"], visual, batch["region_boxes"])
    pos = batch["input_ids"][0].tolist().index(model.config.token_ids["region"])
    want = model.region_embeddings(visual, torch.tensor([[0.1, 0.2, 0.6, 0.7]]), torch.tensor([0]))
    assert torch.allclose(emb[0, pos], want[0], atol=1e-6)
    img = (batch["input_ids"][0] == model.config.token_ids["image"]).nonzero().flatten()
    assert torch.allclose(emb[0, img], visual.tokens[0], atol=1e-6)
    a = model(pixel_values=pix, input_ids=batch["input_ids"], region_boxes=[[(0.1, 0.2, 0.6, 0.7)]]).logits
    b = model(pixel_values=pix, input_ids=batch["input_ids"], region_boxes=[[(0.7, 0.1, 0.9, 0.3)]]).logits
    assert torch.allclose(a[0, :pos], b[0, :pos], atol=1e-5)
    assert (a[0, pos:] - b[0, pos:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="region boxes"):
        model(pixel_values=pix, input_ids=batch["input_ids"], region_boxes=[[]])


def _grads(model, batch, pix):
    model.zero_grad(set_to_none=True)
    model(pixel_values=pix, **batch).loss.backward()

    def total(mod):
        gs = [p.grad.abs().sum() for p in mod.parameters() if p.grad is not None]
        return float(sum(gs)) if gs else 0.0

    return {k: total(getattr(model, k)) for k in ("vision", "spatial_pe", "projector", "region_encoder", "llm")}


def test_stage_gradients_prompt_regions_train_inserted_regions_detached(model):
    torch.manual_seed(0)
    pix = torch.randn(1, 3, 112, 112)
    n1 = model.set_stage(1)
    assert n1 == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision."))
    _, prompt_batch = _batch(model, [_turns(PROMPT_REGION, BOX3D)])
    g = _grads(model, prompt_batch, pix)
    assert g["vision"] == 0 and g["region_encoder"] > 0 and g["spatial_pe"] > 0 and g["projector"] > 0
    _, answer_batch = _batch(model, [_turns("Where is the cup?", ANSWER_REGION)])
    assert answer_batch["region_detach"] == [[True]]
    g = _grads(model, answer_batch, pix)
    assert g["region_encoder"] == 0 and g["projector"] > 0  # inserted region embedding is detached
    # the default (no region_detach passed) derives "in a response" from the labels
    g = _grads(model, {k: v for k, v in answer_batch.items() if k != "region_detach"}, pix)
    assert g["region_encoder"] == 0
    # without detaching, the same sample would train the region encoder: the detach is what stops it
    g = _grads(model, dict(answer_batch, region_detach=[[False]]), pix)
    assert g["region_encoder"] > 0
    model.set_stage(2)
    g = _grads(model, prompt_batch, pix)
    assert g["llm"] > 0 and g["region_encoder"] == g["projector"] == g["spatial_pe"] == g["vision"] == 0


def test_streaming_insertion_matches_full_forward(model):
    torch.manual_seed(0)
    tok = model.tokenizer
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60 + 20 * i, 90, 3), dtype=np.uint8))
            for i in range(3)]
    b1, b2 = grammar.format_bbox2d([0.1, 0.2, 0.3, 0.4]), grammar.format_bbox2d([0.5, 0.5, 0.9, 0.6])
    scripts = [f"The cup {b1} and the mug {b2} are close.", "Bad <bbox>[0.1, 0.2]</bbox> box " + b1, None]
    prompts = ["Find the cups.", "Where?", PROMPT_REGION]
    res = generate(model, imgs, prompts, max_new_tokens=90, scales=[1.0, 2.0, 0.5],
                   logits_processor=forced(tok, scripts), output_logits=True)
    assert res[0].text == scripts[0].replace("</bbox>", "</bbox><region>") and res[0].finished
    assert [r.box for r in res[0].regions] == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.6)]
    assert [r.box for r in res[1].regions] == [(0.1, 0.2, 0.3, 0.4)]  # the malformed box got no region
    assert res[1].text.endswith(b1 + "<region>") and "[0.1, 0.2]</bbox> box" in res[1].text
    assert not res[2].finished and len(res[2].token_logprobs) == 90
    from model.generate import prepare_images

    pix, win, _ = prepare_images(model, imgs, [1.0, 2.0, 0.5])
    for b in range(3):
        ref = reference_logits(model, pix[b], prompts[b], res[b], win[b])
        assert res[b].step_logits.shape == ref.shape
        assert (res[b].step_logits - ref).abs().max() < 1e-4
    assert all(lp <= 0 for r in res for lp in r.token_logprobs)
    assert res[0].mean_logprob == pytest.approx(0.0, abs=1e-6)  # forced tokens have all the mass


def test_sampling_is_reproducible_with_a_generator(model):
    pix = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    runs = [generate(model, pix, ["Hi", "Where is it?"], max_new_tokens=12, do_sample=True, temperature=1.0,
                     top_p=0.9, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    greedy = generate(model, pix, ["Hi"] * 2, max_new_tokens=12)
    forbidden = {model.config.token_ids[k] for k in ("region", "image", "im_start", "pad")}
    assert not forbidden & {t for r in greedy + runs[0] for t in r.token_ids}


def test_checkpoint_round_trip_and_nvila_layout(model, tmp_path):
    torch.manual_seed(0)
    _, batch = _batch(model, [_turns(PROMPT_REGION, ANSWER_REGION)])
    pix = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        ref = model(pixel_values=pix, **batch).logits
    save_pretrained(model, tmp_path / "ours")
    back = load_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(back(pixel_values=pix, **batch).logits, ref)
    assert back.config.to_dict() == model.config.to_dict()

    # NVILA-Lite layout: same backbone dirs, no GR3D files -> backbone identical, GR3D modules new
    nv = tmp_path / "nvila"
    shutil.copytree(tmp_path / "ours", nv)
    (nv / "gr3d_config.json").unlink()
    shutil.rmtree(nv / "gr3d_modules")
    # the 8b preset is what an NVILA dir implies, so compare parts instead of running the tiny model as 8b
    nvm = load_pretrained(nv)
    assert nvm.config.preset == "nvila-lite" and nvm.config.vision_dim == model.config.vision_dim
    with torch.no_grad():
        assert torch.equal(nvm.vision(pix), model.vision(pix))
        f = model.vision(pix)
        assert torch.equal(nvm.projector(f), model.projector(f))
        assert torch.equal(nvm.llm(input_ids=batch["input_ids"]).logits, model.llm(input_ids=batch["input_ids"]).logits)
        # fresh spatial PE is zero at init, so the NVILA visual tokens are exactly the backbone's
        assert torch.equal(nvm.encode_images(pix).tokens, nvm.projector(nvm.vision(pix)))


def test_new_token_rows_start_at_the_mean_embedding(model):
    from model.checkpoint import _init_new_token_rows

    llm = model.llm
    emb, head = llm.get_input_embeddings().weight, llm.get_output_embeddings().weight
    new = [model.config.token_ids["bbox_open"], model.config.token_ids["region"]]
    keep = torch.ones(emb.shape[0], dtype=torch.bool)
    keep[new] = False
    want_in, want_out = emb[keep].mean(0).detach().clone(), head[keep].mean(0).detach().clone()
    _init_new_token_rows(llm, new)
    for i in new:
        assert torch.allclose(emb[i], want_in) and torch.allclose(head[i], want_out)
