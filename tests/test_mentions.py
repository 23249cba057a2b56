"""Rule-based mention extraction: exact spans on the sample world's ground truth, and the rules alone."""

from __future__ import annotations

from pipelines.corpora.cot.mentions import (
    DEFAULT_VOCABULARY,
    EMBODIEDSCAN_CATEGORIES,
    OMNI3D_CATEGORIES,
    Vocabulary,
    extract_mentions,
    group_entities,
    question_objects,
)


def _texts(conv, **kw) -> list[str]:
    return [m.mention.text for m in extract_mentions(conv, "r", **kw)]


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_every_ground_truth_answer_mention_is_found_with_its_exact_span(sample_world) -> None:
    import json

    gt = sample_world.ground_truth["refspatial_mentions"]
    found: dict[tuple[str, int, int, int], str] = {}
    for f in sample_world.refspatial_files:
        for rec in json.loads(f.json_path.read_text()):
            for m in extract_mentions(rec["conversations"], rec["id"]):
                mm = m.mention
                assert rec["conversations"][mm.turn]["value"][mm.start:mm.end] == mm.text
                found[(mm.record_id, mm.turn, mm.start, mm.end)] = m.category
    want = {(g["record_id"], g["turn"], g["start"], g["end"]): g["category"] for g in gt if g["turn"] % 2 == 1}
    assert len(want) > 20
    assert found == want  # nothing missed, nothing extra, categories right (incl. "night stand")


def test_vocabulary_has_the_detection_categories_but_not_the_viewer() -> None:
    assert set(OMNI3D_CATEGORIES) - {"camera"} <= DEFAULT_VOCABULARY
    assert len(EMBODIEDSCAN_CATEGORIES) == 288
    assert {"mug", "night stand", "coffee table", "sofa"} <= DEFAULT_VOCABULARY
    assert "camera" not in DEFAULT_VOCABULARY and "floor" not in DEFAULT_VOCABULARY
    assert _texts(_conv("Which is closer?", "The mug is farther from the camera than the chair.")) == [
        "The mug", "the chair"]


def test_longest_noun_modifiers_possessive_and_plural_rules() -> None:
    a = ("The light blue night stand is left of the coffee table's edge. The chairs and the red boxes are "
         "behind a wooden chair, next to this lamp.")
    got = extract_mentions(_conv("Describe.", a), "r")
    assert [(m.mention.text, m.category, m.entity) for m in got] == [
        ("The light blue night stand", "night stand", "light blue night stand"),
        ("the coffee table", "coffee table", "coffee table"),  # possessive cut, multi-word noun kept
        ("a wooden chair", "chair", "wooden chair"),
        ("this lamp", "lamp", "lamp"),
    ]  # "The chairs" / "the red boxes" name several objects: not mentions
    # relation words end a modifier run: no phrase spans "the left of the table"
    assert _texts(_conv("q", "It is to the left of the table, on the top of the red cabinet.")) == [
        "the table", "the red cabinet"]


def test_question_objects_extend_the_vocabulary_and_question_only_filters() -> None:
    q = ("<image>\nPoint to the gizmo closest to the left edge of the laptop. Your answer should be formatted as a "
         "list of tuples, i.e. [(x1, y1)], where each tuple contains the x and y coordinates of a point "
         "satisfying the conditions above.")
    assert question_objects(q) == ["laptop", "gizmo"]  # not "edge", "list", "point", "x"
    a = "The gizmo is left of the laptop and the sofa. [(0.412, 0.637)]"
    assert _texts(_conv(q, a)) == ["The gizmo", "the laptop", "the sofa"]
    assert _texts(_conv(q, a), question_only=True) == ["The gizmo", "the laptop"]
    assert _texts(_conv(q, a), vocabulary=["chair"]) == ["The gizmo", "the laptop"]  # custom list + question's
    ms = extract_mentions(_conv(q, a), "r")
    assert [m.in_question for m in ms] == [True, True, False]
    assert _texts(_conv("q", "the x"), vocabulary=Vocabulary.of(["x"])) == ["the x"]


def test_only_answer_turns_by_default_and_entities_group_repeats() -> None:
    conv = [{"from": "human", "value": "Is the red cup left of the bowl?"},
            {"from": "gpt", "value": "Yes, the red cup is left of the bowl. The red cup is small."},
            {"from": "human", "value": "And the bowl?"},
            {"from": "gpt", "value": "The bowl is on the table."}]
    ms = extract_mentions(conv, "rec7")
    assert [(m.mention.turn, m.mention.start) for m in ms] == [(1, 5), (1, 28), (1, 38), (3, 0), (3, 15)]
    assert all(m.mention.record_id == "rec7" for m in ms)
    ents = group_entities(ms)
    assert [(e.key, len(e.mentions)) for e in ents] == [("red cup", 2), ("bowl", 2), ("table", 1)]
    assert ents[0].first.text == "the red cup"
    assert len(extract_mentions(conv, "rec7", turns="all")) == len(ms) + 3
    assert extract_mentions(conv, "rec7") == ms  # deterministic
