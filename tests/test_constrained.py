"""Grammar-constrained decoding: even a random model writes answers the strict parsers accept."""

from __future__ import annotations

import math

import pytest
import torch

from model.checkpoint import build_tiny_model
from model.constrained import GrammarConstraint
from model.eval.predict import parse_answer
from model.generate import generate
from schemas import grammar


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3)


def _gen(model, kind, n=4, max_items=2, max_new_tokens=400, seed=0):
    img = torch.zeros(n, 3, 112, 112)
    c = GrammarConstraint(model.tokenizer, kind, max_items=max_items)
    return generate(model, img, ["Detect the 3D bounding boxes of all chairs."] * n, max_new_tokens=max_new_tokens,
                    logits_processor=c, do_sample=True, generator=torch.Generator().manual_seed(seed))


def test_random_model_unconstrained_does_not_parse(model):
    """The failure the constraint fixes: a random model's free answer holds no complete 3D box."""
    img = torch.zeros(2, 3, 112, 112)
    res = generate(model, img, ["Detect the 3D bounding boxes of all chairs."] * 2, max_new_tokens=60)
    assert all(not parse_answer(r.text) for r in res)


def test_detect_answers_always_parse(model):
    for r in _gen(model, "detect"):
        assert r.finished, r.text
        objs = parse_answer(r.text)
        assert 1 <= len(objs) <= 2, r.text
        assert all(o.box3d is not None for o in objs)
        # every line is one object: grounded 2D box (region inserted by generate) then the 3D box
        for line in r.text.split("\n"):
            assert line.startswith(grammar.BBOX_OPEN) and line.endswith(grammar.BOX3D_CLOSE), line


def test_box3d_answer_is_exactly_one_box(model):
    for r in _gen(model, "box3d", max_new_tokens=80):
        assert r.finished
        box = grammar.parse_box3d(r.text)  # the whole text, strictly
        assert all(d > 0 for d in box.dimensions)
        assert all(-1 < x <= 1 for x in box.rotation)


def test_bbox_answer_numbers_in_range(model):
    for r in _gen(model, "bbox", max_new_tokens=40):
        assert r.finished
        text = r.text.replace(grammar.REGION, "")
        nums = [float(x) for x in text[len(grammar.BBOX_OPEN) + 1:text.index("]")].split(", ")]
        assert len(nums) == 4 and all(0 <= v <= 1 for v in nums), text


def test_corpus_answer_is_accepted_and_wrong_tokens_masked(model):
    tok = model.tokenizer
    box = grammar.Box3D((-0.49, 0.0, 4.12), (0.12, 0.3, 0.5), (0.01, 0.0, -0.5))
    answer = grammar.format_grounded([0.4, 0.4, 0.414, 0.6]) + " " + grammar.format_box3d(box)
    ids = tok.encode(answer, add_special_tokens=False)
    c = GrammarConstraint(tok, "detect", max_items=2)
    st = c.state_of(ids)
    assert c.allowed(st)[c.eos]  # one complete object: may end
    # inside the rotation list after its third number only `">` can follow (here: no digit, no comma)
    cut = answer.index('">')
    st2 = c.state_of(tok.encode(answer[:cut], add_special_tokens=False))
    scores = c(0, [], torch.zeros(len(tok)))  # fresh row: only <bbox> at the start
    assert [i for i in range(len(tok)) if not math.isinf(scores[i])] == [c.special[grammar.BBOX_OPEN]]
    allowed = c.allowed(st2)
    for digit in "0123456789,":
        for i in tok.encode(digit, add_special_tokens=False):
            assert not allowed[i]
    assert not allowed[c.eos]
    with pytest.raises(ValueError, match="leaves the grammar"):
        c.state_of(tok.encode(answer.replace("rotation", "rotatoin"), add_special_tokens=False))


def test_bbox_answers_are_ordered_boxes_the_parser_accepts(model):
    """x2 >= x1 and y2 >= y1 are constrained digit by digit: every sampled 2D box parses strictly."""
    for seed in range(3):
        for r in _gen(model, "bbox", n=8, max_new_tokens=40, seed=seed):
            text = r.text.replace(grammar.REGION, "")
            x1, y1, x2, y2 = grammar.parse_bbox2d(text)  # raises on x2 < x1 or y2 < y1
            assert x1 <= x2 and y1 <= y2


def test_bbox_lower_bound_masks_exactly_the_digits_that_cannot_reach_it(model):
    tok = model.tokenizer
    c = GrammarConstraint(tok, "bbox")

    def ok(prefix: str, nxt: str) -> bool:
        st = c.state_of([c.special[grammar.BBOX_OPEN]] + tok.encode(prefix, add_special_tokens=False))
        return c._feed_char(st, nxt) is not None

    assert ok("[0.500, 0.200, 0.", "5") and ok("[0.500, 0.200, 0.", "9") and not ok("[0.500, 0.200, 0.", "4")
    assert ok("[0.500, 0.200, 0.5", "0") and not ok("[0.505, 0.200, 0.50", "4") and ok("[0.505, 0.200, 0.50", "5")
    assert ok("[0.500, 0.200, ", "1") and ok("[1.000, 0.200, ", "1") and not ok("[1.000, 0.200, ", "0")
    assert not ok("[0.100, 0.700, 0.900, 0.", "6") and ok("[0.100, 0.700, 0.900, 0.", "7")
    # the kept values are released after y2: the next element's states carry none
    st = c.state_of([c.special[grammar.BBOX_OPEN]] + tok.encode("[0.100, 0.700, 0.900, 0.800]", add_special_tokens=False))
    assert st[3] == ()
