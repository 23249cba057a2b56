"""GR3D model parts: tokenizer and chat encoding, preprocessing, projector fold, region pooling, spatial PE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.projector import DownsampleProjector, space_to_channel
from model.region import RegionEncoder, roi_align_mean
from model.spatial_pe import SpatialPositionEncoding, token_relative_depth
from model.tokenizer import (
    IGNORE_INDEX,
    IM_END,
    build_tiny_tokenizer,
    encode_conversation,
    gr3d_special_tokens,
    gr3d_token_ids,
    load_tokenizer,
)
from model.vision import letterbox_window, preprocess_depth, preprocess_image
from schemas import grammar

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


BOX3D = grammar.format_box3d(grammar.Box3D((-0.27, 1.31, 31.11), (2.05, 1.46, 4.0), (0.01, 0.0, -0.5)))


# ------------------------------------------------------------------------------------------- tokenizer

def test_special_tokens_are_single_ids_and_digits_split(tok):
    for t in gr3d_special_tokens():
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    ids = tok.encode("31.11", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["3", "1", ".", "1", "1"]
    text = "Is it " + grammar.format_grounded([0.1, 0.25, 0.5, 0.75]) + "? " + BOX3D
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    tid = gr3d_token_ids(tok)
    assert ids.count(tid["region"]) == 1 and ids.count(tid["box3d_open"]) == 1


def test_tokenizer_save_load_offline(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    text = "<image>\nWhat is the 3D box of " + grammar.format_grounded([0, 0, 1, 1]) + "?" + BOX3D
    assert back.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert gr3d_token_ids(back) == gr3d_token_ids(tok)
    assert back.chat_template == tok.chat_template


def test_encode_conversation_matches_template_and_masks_labels(tok):
    prompt = "What is the 3D box of " + grammar.format_grounded([0.1, 0.2, 0.3, 0.4]) + "?"
    answer = "It is " + grammar.format_grounded([0.5, 0.5, 0.75, 1.0]) + BOX3D
    enc = encode_conversation(tok, [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
                              num_image_tokens=5)
    tid = gr3d_token_ids(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + prompt},
                                    {"role": "assistant", "content": answer}], tokenize=False)
    ref = tok.encode(text, add_special_tokens=False)
    i = ref.index(tid["image"])
    assert enc.input_ids == ref[:i] + [tid["image"]] * 5 + ref[i + 1:]
    assert enc.region_boxes == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.75, 1.0)]
    assert enc.region_in_response == [False, True]
    supervised = [t for t in enc.labels if t != IGNORE_INDEX]
    # exactly the answer (minus its region slot) and the closing <|im_end|>
    assert tok.decode(supervised) == answer.replace(grammar.REGION, "") + IM_END
    for t, lab in zip(enc.input_ids, enc.labels):
        if t in (tid["region"], tid["image"]):
            assert lab == IGNORE_INDEX
    with pytest.raises(grammar.GrammarError):
        encode_conversation(tok, [{"from": "human", "value": "a <region> b"}], 5)
    with pytest.raises(ValueError):
        encode_conversation(tok, [{"from": "human", "value": "<image><image>"}], 5)


# ------------------------------------------------------------------------------------------- preprocessing

def test_letterbox_policy():
    img = Image.fromarray(np.full((480, 640, 3), 255, dtype=np.uint8))
    assert letterbox_window(640, 480, 112, scale=0.5) == (0.0, 14 / 112, 1.0, 98 / 112)
    assert letterbox_window(640, 480, 112, mode="stretch") == (0.0, 0.0, 1.0, 1.0)
    x = preprocess_image(img, scale=1.6, image_size=112)
    assert x.shape == (3, 112, 112)
    assert torch.allclose(x[:, 20:90], torch.ones(3, 70, 112))      # white content -> +1
    assert x[:, :13].abs().max() < 0.01 and x[:, 99:].abs().max() < 0.01  # mean padding -> ~0
    d = preprocess_depth(np.full((480, 640), 2.0), 1.0, 112)
    assert d.shape == (1, 112, 112) and float(d[0, 0, 0]) == 0.0 and float(d[0, 56, 56]) == 2.0


# ------------------------------------------------------------------------------------------- projector

def test_space_to_channel_order_and_padding():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 4)
    y = space_to_channel(x, 3)
    assert y.shape == (2, 3, 3, 36)
    xp = F.pad(x, (0, 0, 0, 2, 0, 1))  # zero pad to 9 x 9
    for i in range(3):
        for j in range(3):
            for di in range(3):
                for dj in range(3):
                    ch = di * 12 + dj * 4  # VILA flat_square_3x3 channel layout
                    assert torch.equal(y[:, i, j, ch:ch + 4], xp[:, 3 * i + di, 3 * j + dj])
    proj = DownsampleProjector(4, 16, 3)
    assert proj(torch.randn(1, 32, 32, 4)).shape == (1, 121, 16)
    assert [k for k in proj.state_dict() if k.endswith("weight")] == [
        "layers.1.weight", "layers.2.weight", "layers.4.weight", "layers.5.weight", "layers.7.weight"]


# ------------------------------------------------------------------------------------------- region pooling

def _reference_roi(fmap: torch.Tensor, box, ) -> torch.Tensor:
    """RoIAlign (1 bin, adaptive sampling) by explicit sampling with grid_sample (border clamp)."""
    _, gh, gw, _ = fmap.shape
    x1, y1, x2, y2 = box
    nx = max(1, int(np.ceil((x2 - x1) * gw - 1e-4)))
    ny = max(1, int(np.ceil((y2 - y1) * gh - 1e-4)))
    xs = x1 + (np.arange(nx) + 0.5) * (x2 - x1) / nx
    ys = y1 + (np.arange(ny) + 0.5) * (y2 - y1) / ny
    gx, gy = np.meshgrid(2 * xs - 1, 2 * ys - 1)
    grid = torch.tensor(np.stack([gx, gy], -1), dtype=torch.float32)[None]
    s = F.grid_sample(fmap.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return s.mean(dim=(2, 3))[0]


def test_roi_pooling_whole_map_cell_point_and_reference():
    torch.manual_seed(0)
    fm = torch.randn(2, 6, 8, 5)
    idx = torch.tensor([0, 1])
    whole = roi_align_mean(fm, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), idx)
    assert torch.allclose(whole, fm.mean(dim=(1, 2)), atol=1e-6)
    # a box that is exactly cell (row 2, col 5), and a point at that cell's centre
    cell = torch.tensor([[5 / 8, 2 / 6, 6 / 8, 3 / 6], [5.5 / 8, 2.5 / 6, 5.5 / 8, 2.5 / 6]])
    out = roi_align_mean(fm, cell, torch.tensor([1, 1]))
    assert torch.allclose(out, fm[1, 2, 5].expand(2, 5), atol=1e-5)
    two = roi_align_mean(fm, torch.tensor([[0.0, 0.0, 2 / 8, 1 / 6]]), torch.tensor([0]))
    assert torch.allclose(two[0], (fm[0, 0, 0] + fm[0, 0, 1]) / 2, atol=1e-6)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(20):
        x = np.sort(rng.random(2))
        y = np.sort(rng.random(2))
        boxes.append([x[0], y[0], x[1], y[1]])
    got = roi_align_mean(fm, torch.tensor(boxes, dtype=torch.float32), torch.zeros(20, dtype=torch.long))
    ref = torch.stack([_reference_roi(fm[:1], b) for b in boxes])
    assert torch.allclose(got, ref, atol=1e-5)


def test_region_encoder_gradients_reach_mlp_and_features():
    torch.manual_seed(0)
    fm = torch.randn(1, 4, 4, 8, requires_grad=True)
    enc = RegionEncoder(8, 16)
    out = enc(fm, torch.tensor([[0.0, 0.0, 0.5, 0.5]]), torch.tensor([0]))
    out.sum().backward()
    assert enc.mlp[1].weight.grad.abs().sum() > 0
    g = fm.grad[0].abs().sum(-1)
    assert g[:2, :2].min() > 0 and g[2:, :].sum() == 0 and g[:, 2:].sum() == 0  # only the box's cells


# ------------------------------------------------------------------------------------------- spatial PE

def test_relative_depth_is_scale_invariant_and_flags_missing():
    d = torch.zeros(1, 1, 28, 28)
    d[..., :14, :] = 1.0
    d[..., 14:, :14] = 4.0  # bottom-right patch has no depth
    rel, ok = token_relative_depth(d, 2)
    assert ok.tolist() == [[[True, True], [True, False]]]
    assert rel[0, 0, 0] == 0 and rel[0, 1, 0] == 1
    rel10, _ = token_relative_depth(d * 10, 2)
    assert torch.allclose(rel, rel10)


def test_spatial_pe_starts_at_zero_and_separates_depth_and_position():
    torch.manual_seed(0)
    pe = SpatialPositionEncoding(16, num_freqs=4, max_log2_freq=3.0)
    win = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert pe(4, win).abs().max() == 0  # zero-initialized output layer: pretrained features untouched
    torch.nn.init.normal_(pe.mlp[2].weight)
    depth = torch.ones(1, 1, 8, 8)
    depth[..., :, 4:] = 3.0
    no_d, with_d = pe(4, win), pe(4, win, depth)
    assert not torch.allclose(no_d, with_d)
    assert not torch.allclose(no_d[0, 0, 0], no_d[0, 0, 1])  # position matters
    # an image placed in the top-left quarter of its canvas: the PE is a function of image coordinates,
    # so its 2x2 tokens on a 4x4 grid match a 2x2 grid over a full-canvas image (centres 0.25, 0.75)
    quarter = pe(4, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))
    full = pe(2, win)
    assert torch.allclose(quarter[0, :2, :2], full[0], atol=1e-5)
