"""Depth decoding per format and scale (pipelines.corpora.pointmaps.depth_io): exact values, byte order, clear rejects."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from pipelines.corpora.pointmaps.depth_io import (
    DepthError,
    DepthSpec,
    decode_depth,
    embodiedscan_spec,
    guess_format,
    parse_pgm,
    read_depth,
)
from pipelines.sources.embodiedscan import depth_shift_for


def png16(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


RAW = np.array([[0, 1, 1000], [4000, 65535, 1234]], dtype=np.uint16)


@pytest.mark.parametrize("scale", [1000.0, 4000.0])
def test_png_u16_scales_exactly(scale: float) -> None:
    z = decode_depth(png16(RAW), DepthSpec("png_u16", scale))
    assert z.dtype == np.float32 and z.shape == (2, 3) and z.flags.c_contiguous
    np.testing.assert_array_equal(z, (RAW.astype(np.float32) / np.float32(scale)))
    assert z[0, 0] == 0.0 and z[1, 0] == pytest.approx(4000 / scale)


def test_embodiedscan_scales_follow_the_dataset() -> None:
    # Matterport3D is 1/4 mm, the rest mm; 3RScan frames are PGM
    assert embodiedscan_spec("matterport3d/x/y.png", depth_shift_for("matterport3d/b/region0")).units_per_metre == 4000
    assert embodiedscan_spec("scannet/posed_images/s/00000.png", depth_shift_for("scannet/s")).units_per_metre == 1000
    spec = embodiedscan_spec("3rscan/u/sequence/frame-000000.depth.pgm", depth_shift_for("3rscan/u"))
    assert spec.format == "pgm_u16" and spec.units_per_metre == 1000
    assert guess_format("a/b.depth.npy") == "npy_m" and guess_format("a.PNG") == "png_u16"


def test_pgm_16bit_is_big_endian_and_comments_are_skipped() -> None:
    # 0x0102 = 258 big-endian (a little-endian misread gives 513)
    data = b"P5\n# 3RScan depth\n2 1\n65535\n" + bytes([0x01, 0x02, 0x00, 0x00])
    np.testing.assert_array_equal(parse_pgm(data), [[258, 0]])
    z = decode_depth(data, DepthSpec("pgm_u16"))
    assert z[0, 0] == np.float32(0.258) and z[0, 1] == 0.0
    ascii_ = b"P2 3 1 65535\n1500 0 42\n"
    np.testing.assert_array_equal(decode_depth(ascii_, DepthSpec("pgm_u16")), np.float32([[1.5, 0.0, 0.042]]))


@pytest.mark.parametrize("data, reason", [
    (b"P5\n2 2\n65535\n" + b"\x00" * 5, "bad_depth"),  # 5 of 8 bytes
    (b"P6\n1 1\n255\n\x00\x00\x00", "bad_depth_format"),  # colour PPM
    (b"P5\n2", "bad_depth"),  # header cut
])  # fmt: skip
def test_bad_pgm_is_a_depth_error(data: bytes, reason: str) -> None:
    with pytest.raises(DepthError) as ei:
        decode_depth(data, DepthSpec("pgm_u16"))
    assert ei.value.reason == reason


def test_npy_metres_invalid_values_become_zero() -> None:
    a = np.array([[1.25, np.nan, -2.0], [np.inf, 0.0, 3.5]], dtype=np.float64)
    buf = io.BytesIO()
    np.save(buf, a)
    z = decode_depth(buf.getvalue(), DepthSpec("npy_m"))
    np.testing.assert_array_equal(z, np.float32([[1.25, 0, 0], [0, 0, 3.5]]))


def test_npy_integers_and_pickles_are_refused() -> None:
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 2), np.uint16))
    with pytest.raises(DepthError) as ei:
        decode_depth(buf.getvalue(), DepthSpec("npy_m"))
    assert ei.value.reason == "bad_depth_format"
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DepthError) as ei:
        decode_depth(buf.getvalue(), DepthSpec("npy_m"))
    assert ei.value.reason == "bad_depth"


def test_sunrgbd_bits_are_rotated_back() -> None:
    d = np.array([[0, 1234, 7999]], dtype=np.uint16)
    stored = ((d.astype(np.uint32) << 3) | (d.astype(np.uint32) >> 13)).astype(np.uint16)
    z = decode_depth(png16(stored), DepthSpec("png_sunrgbd"))
    np.testing.assert_array_equal(z, d.astype(np.float32) / np.float32(1000))
    assert not np.array_equal(decode_depth(png16(stored), DepthSpec("png_u16")), z)


@pytest.mark.parametrize("make, reason", [
    (lambda: png16(np.random.default_rng(0).integers(0, 65535, (64, 64)))[:2000], "bad_depth"),  # truncated
    (lambda: _png8(), "bad_depth_format"),  # 8-bit greyscale is not metric depth
    (lambda: b"GIF89a....", "bad_depth_format"),
])  # fmt: skip
def test_bad_png_is_a_depth_error(make, reason: str) -> None:
    with pytest.raises(DepthError) as ei:
        decode_depth(make(), DepthSpec("png_u16"))
    assert ei.value.reason == reason
    err = pickle.loads(pickle.dumps(ei.value))  # crosses Ray/Beam process boundaries intact
    assert err.reason == reason and str(err) == str(ei.value)


def _png8() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_read_depth_missing_file_and_format_from_name(tmp_path) -> None:
    with pytest.raises(DepthError) as ei:
        read_depth(tmp_path / "nope.png")
    assert ei.value.reason == "missing_depth"
    p = tmp_path / "f.depth.npy"
    np.save(p, np.full((3, 4), 2.0, np.float32))
    assert read_depth(p).shape == (3, 4) and read_depth(p)[0, 0] == 2.0


def test_spec_rejects_unknown_format_and_bad_scale() -> None:
    with pytest.raises(ValueError, match="unknown depth format"):
        DepthSpec("exr")
    with pytest.raises(ValueError, match="positive"):
        DepthSpec("png_u16", 0.0)
