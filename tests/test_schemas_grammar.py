"""Text grammar: exact strings, strict parsing, round trips."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.camera import box_corners, euler_to_matrix
from schemas.grammar import (
    Box3D,
    GrammarError,
    box3d_from_pose,
    box3d_to_pose,
    check_regions,
    find_box3d,
    find_grounded,
    format_bbox2d,
    format_box3d,
    format_grounded,
    format_point2d,
    format_point3d,
    parse_bbox2d,
    parse_box3d,
    parse_point3d,
)

unit = st.floats(0, 1)
metres = st.floats(-50, 50)


def test_bbox_exact_string():
    assert format_bbox2d([0.1, 0.25, 0.5, 0.75]) == "<bbox>[0.100, 0.250, 0.500, 0.750]</bbox>"
    assert format_point2d(0.5, 0.25) == "<bbox>[0.500, 0.250, 0.500, 0.250]</bbox>"
    assert format_grounded([0, 0, 1, 1]).endswith("</bbox><region>")


def test_box3d_exact_string_from_r_cam():
    # R_cam = Ry(30 deg) -> rotation (0, 0, 1/6) -> "0.17".
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    box = box3d_from_pose([0.12, 0.45, 2.6], [0.55, 0.9, 0.6], R)
    assert format_box3d(box) == (
        '<3d_box center="0.12, 0.45, 2.60" dimensions="0.55, 0.90, 0.60" rotation="0.00, 0.00, 0.17"></3d_box>')


def test_box3d_negative_zero_and_minus_one_angle():
    box = Box3D((-0.001, 0.0, 1.0), (1, 1, 1), (0.0, -0.999, 1.0))
    s = format_box3d(box)
    assert 'center="0.00, 0.00, 1.00"' in s
    assert 'rotation="0.00, 1.00, 1.00"' in s  # -1.00 and +1.00 are the same angle; (-1, 1] keeps +1


@settings(max_examples=200, deadline=None)
@given(unit, unit, unit, unit)
def test_bbox_round_trip(a, b, c, d):
    box = (min(a, c), min(b, d), max(a, c), max(b, d))
    parsed = parse_bbox2d(format_bbox2d(box))
    assert parsed == pytest.approx(box, abs=5e-4 + 1e-12)
    assert format_bbox2d(parsed) == format_bbox2d(box)


@settings(max_examples=200, deadline=None)
@given(metres, metres, st.floats(0.01, 80), st.floats(0.01, 10), st.floats(0.01, 10), st.floats(0.01, 10),
       st.floats(-0.49, 0.49), st.floats(-0.999, 1), st.floats(-0.999, 1))
def test_box3d_round_trip(x, y, z, w, h, l, p, r, yw):
    box = Box3D((x, y, z), (w, h, l), (p, r, yw))
    text = format_box3d(box)
    back = parse_box3d(text)
    assert back.center == pytest.approx(box.center, abs=5e-3 + 1e-9)
    assert format_box3d(back) == text


@settings(max_examples=100, deadline=None)
@given(metres, metres, metres)
def test_point3d_round_trip(x, y, z):
    text = format_point3d((x, y, z))
    assert parse_point3d(text) == pytest.approx((x, y, z), abs=5e-3 + 1e-9)
    assert format_point3d(parse_point3d(text)) == text


def test_pose_round_trip_keeps_corners():
    R = euler_to_matrix(0.2, -0.1, 2.5)
    box = box3d_from_pose([1, 0.5, 4], [0.4, 0.8, 1.6], R)
    c, d, R2 = box3d_to_pose(box)
    a = box_corners([1, 0.5, 4], [0.4, 0.8, 1.6], R)
    b = box_corners(c, d, R2)
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    assert dist.min(axis=1).max() < 1e-9


@pytest.mark.parametrize("text, where", [
    ("[0.1, 0.2, 0.3, 0.4]</bbox>", "opening tag"),
    ("<bbox>[0.1, 0.2, 0.3, 0.4]", "closing tag"),
    ("<bbox>[0.1, 0.2, 0.3]</bbox>", "expected 4 numbers in 2D box, got 3"),
    ("<bbox>[0.1, 0.2, 0.3, 0.4, 0.5]</bbox>", "list end after 4"),
    ("<bbox>[nan, 0.2, 0.3, 0.4]</bbox>", "number 1 of 4"),
    ("<bbox>[0.1, 0.2, 0.3, 0.4]</bbox> extra", "after 2D box"),
    ("<bbox>[0.5, 0.2, 0.3, 0.4]</bbox>", "x1 <= x2"),
    ("<bbox>[0.1, 0.2, 1.3, 0.4]</bbox>", "in \\[0, 1\\]"),
    ("<bbox>[0.1,0.2, 0.3, 0.4]</bbox>", "separator"),
])
def test_malformed_bbox(text, where):
    with pytest.raises(GrammarError, match=where):
        parse_bbox2d(text)


@pytest.mark.parametrize("text, where", [
    ('<3d_box center="1.00, 2.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, 0.00"></3d_box>',
     "expected 3 numbers in 3D box center, got 2"),
    ('<3d_box center="1.00, 2.00, 3.00" dimensions="1.00, -1.00, 1.00" rotation="0.00, 0.00, 0.00"></3d_box>',
     "positive"),
    ('<3d_box center="1.00, 2.00, 3.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, NaN"></3d_box>',
     "number 3 of 3"),
    ('<3d_box center="1.00, 2.00, 3.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, 0.00">', "closing"),
    ('<3d_box center="1.00, 2.00, 3.00" dimensions="1.00, 1.00, 1.00"></3d_box>', "rotation"),
    ('<3d_box center="1.00, 2.00, 3.00" dimensions="1.00, 1.00, 1.00" rotation="0.00, 0.00, 1.50"></3d_box>',
     "\\(-1, 1\\]"),
])
def test_malformed_box3d(text, where):
    with pytest.raises(GrammarError, match=where):
        parse_box3d(text)


@pytest.mark.parametrize("text", ["x: 1.00, y: 2.00", "x: 1.00, y: 2.00, z: nan", "x: 1, y: 2, z: 3 m",
                                  "y: 1.00, x: 2.00, z: 3.00"])
def test_malformed_point3d(text):
    with pytest.raises(GrammarError):
        parse_point3d(text)


def test_find_grounded_and_regions():
    text = ("The cup " + format_grounded([0.1, 0.1, 0.2, 0.2]) + " is left of the chair "
            + format_bbox2d([0.5, 0.5, 0.9, 0.9]) + ".")
    found = find_grounded(text)
    assert [g.has_region for g in found] == [True, False]
    assert found[1].box == (0.5, 0.5, 0.9, 0.9)
    assert text[found[0].start:found[0].end].startswith("<bbox>")
    check_regions(text)
    with pytest.raises(GrammarError, match="directly follow"):
        check_regions("a cup <region>")
    with pytest.raises(GrammarError, match="number"):
        find_grounded("a <bbox>[0.1, x]</bbox>")
    with pytest.raises(GrammarError, match="without an opening"):
        find_grounded("a 0.1</bbox>")


def test_find_box3d_in_text():
    b = format_box3d(Box3D((0, 0, 2), (1, 1, 1), (0, 0, 0)))
    found = find_box3d("first " + b + " then " + b)
    assert len(found) == 2 and found[0][0].center == (0.0, 0.0, 2.0)
