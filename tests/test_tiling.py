"""NVILA dynamic tiling (`model.tiling`, the `tiles` image mode): NVILA's grid rule and token counts, stitched
region pooling equal to pooling the untiled map, spatial PE in original-image coordinates, a tiny model
that trains and generates with tiles, and streaming KV-cache generation on tiles equal to the full forward."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_tiny_model
from model.config import gr3d_8b_config
from model.imaging import ImagePolicy
from model.region import roi_align_mean
from model.tiling import (
    pool_regions,
    split_tiles,
    stitch_tiles,
    tile_grid,
    tile_windows,
    tiles_per_image,
)

torch.set_num_threads(1)

# (W, H, s) -> (rows, cols), encoder inputs (tiles + thumbnail), visual tokens (121 per 448 tile), derived by
# hand from VILA's llava/mm_utils.py dynamic_preprocess / find_closest_aspect_ratio (448 px, 1..12 tiles):
NVILA_TABLE = [
    ((448, 448, 1.0), (1, 1), 1, 121),       # aspect 1: (1,1); (2,2) ties but area 200704 <= 0.5*448^2*4
    ((1000, 1000, 1.0), (3, 3), 10, 1210),   # ties (2,2) then (3,3): area 1e6 > 401408 and > 903168
    ((640, 480, 1.0), (3, 4), 13, 1573),     # 4:3 is (4 cols, 3 rows) exactly: 12 tiles + thumbnail
    ((480, 640, 1.0), (4, 3), 13, 1573),     # portrait
    ((1280, 480, 1.0), (2, 5), 11, 1331),    # aspect 2.67: (5,2)=2.5 is closest among <= 12 tiles
    ((896, 448, 1.0), (1, 2), 3, 363),       # aspect 2: (4,2) ties, area 401408 <= 0.5*448^2*8
    ((2000, 1000, 1.0), (2, 4), 9, 1089),    # aspect 2, big: (4,2)
    # KITTI 1242x375: (3,1) and (6,2) tie at aspect 3.0; (6,2) needs area > 0.5*448^2*12 = 1,204,224.
    # fx 721.5377: s = 1.386 -> 1721x520 = 894,612: (3,1). A focal of 500 (s = 2): 2484x750: (6,2)
    ((1242, 375, 1000 / 721.5377), (1, 3), 4, 484),
    ((1242, 375, 2.0), (2, 6), 13, 1573),
    # square 600 px: alone (1,1); at s = 2 (fx 500) 1200x1200 passes both tie thresholds: (3,3)
    ((600, 600, 1.0), (1, 1), 1, 121),
    ((600, 600, 2.0), (3, 3), 10, 1210),
]


@pytest.mark.parametrize(("size", "grid", "inputs", "tokens"), NVILA_TABLE)
def test_nvila_grid_and_token_counts(size, grid, inputs, tokens) -> None:
    w, h, s = size
    cfg = gr3d_8b_config()
    assert cfg.num_image_tokens == 121  # 448/14 = 32 patches, 3x3 fold with zero pad -> 11 x 11
    pol = ImagePolicy("tiles", 448, tokens_per_tile=cfg.num_image_tokens)
    assert tile_grid(w * s, h * s, 448) == grid == pol.grid(w, h, s)
    assert tiles_per_image(grid) == inputs and sum(pol.token_counts(w, h, s)) == tokens


def test_tile_limits_follow_min_and_max() -> None:
    assert tile_grid(640, 480, 448, max_tiles=4) == (1, 1)  # (2,2) ties with (1,1); area too small
    assert tile_grid(1280, 960, 448, max_tiles=4) == (2, 2)
    assert tile_grid(448, 448, 448, min_tiles=2, max_tiles=4) == (2, 2)  # (1,1) excluded: (2,2) has the aspect
    with pytest.raises(ValueError, match="min_tiles"):
        tile_grid(448, 448, 448, min_tiles=3, max_tiles=2)


def test_tile_windows_map_tiles_back_to_the_original_image() -> None:
    wins = tile_windows((2, 3))
    assert len(wins) == 7 and wins[-1] == (0.0, 0.0, 1.0, 1.0)  # thumbnail last
    assert wins[0] == (0.0, 0.0, 3.0, 2.0) and wins[5] == (-2.0, -1.0, 1.0, 1.0)
    # the centre of tile (1, 2) is the original image's point (5/6, 3/4)
    x0, y0, x1, y1 = wins[5]
    assert ((0.5 - x0) / (x1 - x0), (0.5 - y0) / (y1 - y0)) == pytest.approx((5 / 6, 3 / 4))


def test_stitched_tiles_pool_like_the_untiled_map() -> None:
    """Tiles cut from one feature map (identical features), stitched back: every box, also across tile
    borders, pools exactly as on the untiled map; one-canvas images in the same batch pool via their window."""
    g, c = 4, 5
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(2 * g, 3 * g, c, generator=gen)  # the untiled image's map, 2 x 3 tiles of 4 x 4
    tiles = torch.cat([split_tiles(big, (2, 3)), torch.randn(1, g, g, c, generator=gen)])  # + thumbnail
    assert torch.equal(stitch_tiles(tiles, (2, 3)), big)
    single = torch.randn(1, g, g, c, generator=gen)
    fmaps = torch.cat([single, tiles, tiles.flip(-1)])
    win = torch.tensor([[0.0, 0.25, 1.0, 0.75]] + tile_windows((2, 3)) * 2)
    boxes = torch.tensor([[0.1, 0.2, 0.9, 0.7], [0.2, 0.3, 0.6, 0.8], [0.0, 0.0, 1.0, 1.0], [0.3, 0.45, 0.36, 0.55],
                          [0.5, 0.5, 0.5, 0.5], [0.3, 0.1, 0.7, 0.9]])
    index = torch.tensor([1, 0, 1, 1, 2, 2])
    out = pool_regions(fmaps, win, [(1, 1), (2, 3), (2, 3)], boxes, index)
    for k in (0, 2, 3):  # image 1: the untiled map, boxes as is (they span tile borders)
        assert torch.allclose(out[k], roi_align_mean(big[None], boxes[k:k + 1], torch.zeros(1, dtype=torch.long))[0],
                              atol=1e-6)
    assert torch.allclose(out[2], big.mean((0, 1)), atol=1e-6)
    ref_single = roi_align_mean(single, torch.tensor([[0.2, 0.25 + 0.3 * 0.5, 0.6, 0.25 + 0.8 * 0.5]]),
                                torch.zeros(1, dtype=torch.long))
    assert torch.allclose(out[1], ref_single[0], atol=1e-6)
    big2 = stitch_tiles(tiles.flip(-1), (2, 3))
    assert torch.allclose(out[4:], roi_align_mean(big2[None], boxes[4:], torch.zeros(2, dtype=torch.long)), atol=1e-6)


def test_spatial_pe_of_tiles_is_in_original_image_coordinates() -> None:
    """PE of 2 x 2 tiles, stitched, equals the PE of one canvas at twice the resolution (u, v of the image)."""
    from model.spatial_pe import SpatialPositionEncoding

    torch.manual_seed(0)
    pe = SpatialPositionEncoding(8, num_freqs=4, max_log2_freq=3.0)
    torch.nn.init.normal_(pe.mlp[2].weight)
    g = 3
    wins = torch.tensor(tile_windows((2, 2))[:4])
    tiled = stitch_tiles(pe(g, wins), (2, 2))
    whole = pe(2 * g, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))[0]
    assert torch.allclose(tiled, whole, atol=1e-5)
    # depth: one image's tiles share its min-max; tokens at equal depth get equal relative depth
    from model.spatial_pe import token_relative_depth

    d = torch.ones(4, 1, 6, 6)
    d[0], d[3] = 2.0, 4.0
    rel, ok = token_relative_depth(d, g, groups=torch.zeros(4, dtype=torch.long))
    assert ok.all() and torch.allclose(rel[0], torch.full((g, g), 0.5)) and float(rel[3].min()) == 1.0
    assert float(rel[1].max()) == 0.0


def _tiles_model():
    model = build_tiny_model(seed=0)
    model.config.image_mode, model.config.max_tiles = "tiles", 4
    return model


def test_tiled_pixels_and_depth_are_cut_from_the_grid_resize() -> None:
    pol = ImagePolicy("tiles", 112, max_tiles=4, tokens_per_tile=9)
    ramp = np.tile(np.arange(224, dtype=np.uint8)[None, :, None], (112, 1, 3))
    prep = pol.prepare(Image.fromarray(ramp), 1.0, np.tile(np.arange(1, 225, dtype=np.float32), (112, 1)))
    assert prep.grid == (1, 2) and prep.pixels.shape == (3, 3, 112, 112) and prep.depth.shape == (3, 1, 112, 112)
    assert prep.windows == [(0.0, 0.0, 2.0, 1.0), (-1.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)]
    assert torch.equal(prep.depth[1, 0, 0, :3], torch.tensor([113.0, 114.0, 115.0]))  # right half, 1:1
    assert torch.equal(prep.depth[2, 0, 0, :3], torch.tensor([2.0, 4.0, 6.0]))  # thumbnail: every 2nd column
    raw = (prep.pixels[1, 0, 5, 20:90] * 0.5 + 0.5) * 255  # 1:1 resampling of a ramp: exact
    assert torch.allclose(raw, torch.arange(132.0, 202.0), atol=0.51)


def test_tiny_model_trains_and_generates_with_tiles(tmp_path: Path) -> None:
    """Data path (build_example + collate) in the tiles mode, forward + backward, and generation."""
    from model.data import ExampleSpec, build_example, collate_examples
    from model.gr3d import GR3DModel
    from model.train import TrainStep
    from tests.test_data_loader import make_sample

    model = _tiles_model()
    model.set_stage(1)
    spec = ExampleSpec.for_model(model, 1)
    assert spec.mode == "tiles" and spec.max_tiles == 4
    exs = []
    for key, seed, size in (("world/d1", 3, (224, 112)), ("world/d2", 4, (112, 112))):
        s = make_sample("det3d", key, seed=seed)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            buf, "PNG")
        s.record["camera"]["scale"] = 1.0
        ex, why = build_example({"json": s.record, "png": buf.getvalue()}, spec, epoch=0)
        assert why is None
        exs.append(ex)
    assert [e.grid for e in exs] == [(1, 2), (1, 1)]
    tid = model.config.token_ids
    assert exs[0].encoded.input_ids.count(tid["image"]) == 3 * 9 and exs[1].encoded.input_ids.count(tid["image"]) == 9
    batch = collate_examples(exs, tid["pad"])
    assert batch["pixel_values"].shape == (4, 3, 112, 112) and batch["image_grids"] == [(1, 2), (1, 1)]
    loss_sum, n = TrainStep(model, 1)(batch)
    assert n > 0 and torch.isfinite(loss_sum)
    loss_sum.backward()
    for mod in (model.region_encoder, model.spatial_pe, model.projector):
        assert any(float(p.grad.abs().sum()) > 0 for p in mod.parameters() if p.grad is not None)
    # region embeddings of image 0 come from its stitched 1 x 2 tiles
    with torch.no_grad():
        vis = model.encode_images(batch["pixel_values"], None, batch["image_windows"], batch["image_grids"])
        box = torch.tensor([[0.3, 0.2, 0.8, 0.9]])
        emb = model.region_embeddings(vis, box, torch.tensor([0]))
        ref = model.region_encoder.mlp(roi_align_mean(stitch_tiles(vis.feature_map[:3], (1, 2))[None], box,
                                                      torch.zeros(1, dtype=torch.long)))
        assert torch.allclose(emb, ref, atol=1e-6)
    # generation prepares tiles by the model's own config (as a loaded checkpoint would)
    from model.generate import generate

    imgs = [Image.new("RGB", (224, 112), (90, 20, 200)), Image.new("RGB", (100, 100), (0, 90, 20))]
    res = generate(model, imgs, ["Where is <bbox>[0.100, 0.200, 0.700, 0.800]</bbox><region>?", "Hi"],
                   max_new_tokens=5, scales=[1.0, None])
    assert len(res) == 2 and all(len(r.token_ids) == 5 for r in res)
    assert isinstance(model, GR3DModel)


def test_train_loop_with_tiles_records_the_policy_for_evaluation(tmp_path: Path) -> None:
    """`gr3d train --model.image_mode tiles ...`: the trainer runs on tiles and the checkpoint carries the policy."""
    from model.checkpoint import load_pretrained
    from model.generate import prepare_image_batch
    from model.train import train
    from model.train_config import load_config, parse_override_args
    from tests.test_data_loader import write_corpora

    root = write_corpora(tmp_path / "b", shards=1, per_shard=4, corpora=("det3d",))
    args = ["--model.image_mode", "tiles", "--model.min_tiles", "2", "--model.max_tiles", "4", "--data.root", str(root),
            "--data.mix", "det3d@1", "--max_steps", "2", "--data.num_workers", "0", "--data.batch_size", "2",
            "--checkpoint_every", "0", "--out", str(tmp_path / "run")]
    summary = train(load_config("tiny", parse_override_args(args)))
    assert summary["step"] == 2
    model = load_pretrained(tmp_path / "run" / "final")
    assert (model.config.image_mode, model.config.min_tiles, model.config.max_tiles) == ("tiles", 2, 4)
    # 32 x 24 images: (1,1) is excluded, (2,2) is nearest 4:3 among 2..4 tiles: 4 tiles + thumbnail
    pix, win, _, grids = prepare_image_batch(model, [Image.new("RGB", (32, 24))], [2.0])
    assert grids == [(2, 2)] and pix.shape[0] == 5 and win.shape == (5, 4)


def test_streaming_generation_with_tiles_matches_full_forward() -> None:
    """KV-cache generation with streaming region insertion on tiles equals, step by step, one unpadded full
    forward per image over the same canvases, with images of different grids in one left-padded batch
    (27, 9, 27 and 27 image tokens, prompts of different lengths). Prompt regions and inserted regions pool
    from the stitched tiles, one box across the tile border; images 0, 1 and 3 insert their regions at the same
    steps, so one pooling call mixes grids and reorders its rows (image 3 shares image 0's grid)."""
    from model.generate import generate, prepare_image_batch
    from model.tokenizer import build_tiny_tokenizer
    from schemas import grammar
    from tests.generation_ref import forced, reference_logits

    model = _tiles_model()
    model.tokenizer = build_tiny_tokenizer()
    torch.manual_seed(1)
    torch.nn.init.normal_(model.spatial_pe.mlp[2].weight, std=0.5)  # make the (zero-init) PE visible
    sizes = [(224, 112), (112, 112), (112, 224), (224, 112)]
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8))
            for i, (w, h) in enumerate(sizes)]
    scales = [1.0] * len(imgs)
    across = grammar.format_bbox2d([0.3, 0.2, 0.8, 0.9])  # spans the 1 x 2 grid's tile border x = 0.5
    inside = grammar.format_bbox2d([0.05, 0.1, 0.4, 0.45])
    prompts = ["What is the 3D box of " + grammar.format_grounded([0.4, 0.3, 0.7, 0.6]) + "?", "Find the cups.",
               "Where is " + grammar.format_grounded([0.1, 0.4, 0.9, 0.6]) + "?",
               "Is " + grammar.format_grounded([0.45, 0.1, 0.55, 0.9]) + " a cup?"]
    scripts = [f"The cup {across} and the mug {inside} are close.", f"The cup {inside} and the mug {across}.", None,
               f"The cup {across} and the mug {across}!"]
    res = generate(model, imgs, prompts, max_new_tokens=80, scales=scales,
                   logits_processor=forced(model.tokenizer, scripts), output_logits=True)
    pix, win, _, grids = prepare_image_batch(model, imgs, scales)
    assert grids == [(1, 2), (1, 1), (2, 1), (1, 2)] and pix.shape[0] == 10
    for b in (0, 1, 3):
        assert res[b].finished and res[b].text == scripts[b].replace("</bbox>", "</bbox><region>")
        assert [r.token_index for r in res[b].regions] == [r.token_index for r in res[0].regions]
        assert len(res[b].regions) == 2
    assert not res[2].finished and len(res[2].token_logprobs) == 80
    start = 0
    for b, grid in enumerate(grids):
        n = tiles_per_image(grid)
        ref = reference_logits(model, pix[start:start + n], prompts[b], res[b], win[start:start + n], grid)
        start += n
        assert res[b].step_logits.shape == ref.shape
        assert (res[b].step_logits - ref).abs().max() < 1e-4, b
    assert start == pix.shape[0]
