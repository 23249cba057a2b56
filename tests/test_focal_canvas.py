"""The `focal` image mode (`model.imaging`): resize by F/fx, centre pad or crop on the encoder square. Exact
geometry (a pixel lands where the content window says, padded and cropped), equal apparent size for equal
metric size at equal depth across focal lengths, depth alignment, and the policy travelling in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import build_tiny_model, load_pretrained, save_pretrained
from model.imaging import ImagePolicy, focal_to_fit, focal_window
from model.vision import letterbox_window

torch.set_num_threads(1)
S = 112


def _ramp(w: int, h: int) -> Image.Image:
    """Red = column index, green = row index: a linear image, which bicubic resampling reproduces."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    a[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    return Image.fromarray(a)


@pytest.mark.parametrize("canvas_focal", [100.0, 200.0])  # f = 1/3: padded; f = 2/3: cropped on all sides
def test_pixels_land_where_the_window_says(canvas_focal: float) -> None:
    w, h, fx = 240, 180, 300.0
    pol = ImagePolicy("focal", S, canvas_focal=canvas_focal)
    scale = 1000.0 / fx
    (win,) = pol.windows(w, h, scale)
    f = canvas_focal / fx
    assert win == pytest.approx(((S - f * w) / 2 / S, (S - f * h) / 2 / S, (S + f * w) / 2 / S, (S + f * h) / 2 / S))
    assert (win[0] < 0) == (canvas_focal == 200.0) and (win[1] < 0) == (canvas_focal == 200.0)
    raw = (pol.pixels(_ramp(w, h), scale)[0][0] * 0.5 + 0.5) * 255  # (3, S, S) back to 0..255
    centres = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    src_x = (centres - win[0]) / (win[2] - win[0]) * w  # original pixel coordinate of each canvas column
    src_y = (centres - win[1]) / (win[3] - win[1]) * h
    margin = 8.0  # resampling filter support at the image border
    cols = ((src_x > margin) & (src_x < w - margin)).nonzero().flatten()
    rows = ((src_y > margin) & (src_y < h - margin)).nonzero().flatten()
    assert len(cols) > 20 and len(rows) > 10
    red, green = raw[0][rows][:, cols].double(), raw[1][rows][:, cols].double()
    assert (red - (src_x[cols] - 0.5)[None, :]).abs().max() < 0.75  # value of pixel k is k: centre at k + 0.5
    assert (green - (src_y[rows] - 0.5)[:, None]).abs().max() < 0.75
    if canvas_focal == 100.0:  # padding is the mean colour: normalized 0
        outside = (src_x < -1) | (src_x > w + 1)
        assert outside.any() and float(pol.pixels(_ramp(w, h), scale)[0][:, :, outside].abs().max()) < 0.01


def _object_view(fx: float, w: int = 320, h: int = 240, size_m: float = 0.6, depth_m: float = 3.0) -> Image.Image:
    """A white square of `size_m` metres at `depth_m` on the optical axis, pinhole camera (fx, centre)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    half = fx * size_m / depth_m / 2
    a[int(round(h / 2 - half)):int(round(h / 2 + half)), int(round(w / 2 - half)):int(round(w / 2 + half))] = 255
    return Image.fromarray(a)


def test_equal_metric_size_at_equal_depth_has_equal_canvas_size() -> None:
    pol = ImagePolicy("focal", S, canvas_focal=100.0)
    widths, window_widths = [], []
    for fx in (200.0, 350.0):  # 40 px and 70 px wide in the two images
        pix = pol.pixels(_object_view(fx), 1000.0 / fx)[0][0]
        widths.append(int((pix[0, S // 2] > 0.5).sum()))  # white; padding is the mean (~0)
        x0, _, x1, _ = pol.windows(320, 240, 1000.0 / fx)[0]
        window_widths.append(fx * 0.6 / 3.0 / 320 * (x1 - x0) * S)  # object width (normalized) on the canvas
    assert window_widths == pytest.approx([20.0, 20.0])  # F * size / depth = 100 * 0.6 / 3
    assert abs(widths[0] - widths[1]) <= 1 and abs(widths[0] - 20) <= 1
    letter = ImagePolicy("letterbox", S)  # without normalization the sizes differ by the focal ratio
    lw = [int((letter.pixels(_object_view(fx), 1000.0 / fx)[0][0, 0, S // 2] > 0.5).sum()) for fx in (200.0, 350.0)]
    assert lw[1] > 1.5 * lw[0]


def test_depth_canvas_follows_the_same_placement() -> None:
    w, h, fx = 240, 180, 300.0
    d = np.ones((h, w), dtype=np.float32)
    d[:, w // 2:] = 2.0
    for canvas_focal in (100.0, 200.0):
        pol = ImagePolicy("focal", S, canvas_focal=canvas_focal)
        dep = pol.depth(d, 1000.0 / fx)[0, 0]
        x0, y0, x1, y1 = pol.windows(w, h, 1000.0 / fx)[0]
        src_x = ((np.arange(S) + 0.5) / S - x0) / (x1 - x0) * w
        src_y = ((np.arange(S) + 0.5) / S - y0) / (y1 - y0) * h
        inside = (src_y >= 0) & (src_y < h)
        expect = np.where((src_x >= 0) & (src_x < w), np.where(src_x >= w / 2, 2.0, 1.0), 0.0)
        assert np.array_equal(dep.numpy()[inside], np.broadcast_to(expect, (int(inside.sum()), S)))
        assert float(dep[~torch.from_numpy(inside)].abs().sum()) == 0.0
    # a depth map at half the image resolution lands on the same canvas cells
    pol = ImagePolicy("focal", S, canvas_focal=100.0)
    half = pol.depth(d[::2, ::2], 1000.0 / fx, w, h)
    assert torch.equal(half, pol.depth(d, 1000.0 / fx))


def test_unknown_camera_falls_back_to_letterbox_and_fit_helper() -> None:
    pol = ImagePolicy("focal", S, canvas_focal=100.0)
    assert pol.windows(200, 100, None) == [letterbox_window(200, 100, S, 1.0)]
    # the sample world's widest view (78 deg) spans the 168 px canvas exactly at F = 103.7
    F = focal_to_fit(168, 78.0)
    assert F == pytest.approx(103.73, abs=0.01)
    w = 320
    fx = (w / 2) / math.tan(math.radians(78.0) / 2)
    x0, _, x1, _ = focal_window(w, 240, 168, 1000.0 / fx, F)
    assert (x0, x1) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError, match="canvas_focal"):
        ImagePolicy("focal", S)


def test_focal_policy_is_a_config_key_recorded_in_the_checkpoint(tmp_path: Path) -> None:
    from model.build import apply_train_options
    from model.data import ExampleSpec
    from model.generate import prepare_images
    from model.train_config import ConfigError, load_config

    with pytest.raises(ConfigError, match="canvas_focal"):
        load_config("tiny", {"model.image_mode": "focal"})
    cfg = load_config("tiny", {"model.image_mode": "focal", "model.canvas_focal": "70"})
    model = apply_train_options(build_tiny_model(seed=0), cfg)
    spec = ExampleSpec.for_config(model, cfg)
    assert (spec.mode, spec.canvas_focal) == ("focal", 70.0)
    save_pretrained(model, tmp_path / "ck")
    loaded = load_pretrained(tmp_path / "ck")
    assert (loaded.config.image_mode, loaded.config.canvas_focal) == ("focal", 70.0)
    img = _ramp(240, 180)
    pix, win, _ = prepare_images(loaded, [img], [1000.0 / 300.0])
    assert torch.equal(pix[0], ImagePolicy("focal", S, canvas_focal=70.0).pixels(img, 1000.0 / 300.0)[0][0])
    assert win[0].tolist() == pytest.approx(focal_window(240, 180, S, 1000.0 / 300.0, 70.0))
