"""Prompt templates: stable variant choice, plurals, canonical evaluator phrasing."""

from schemas.prompts import DETECT_3D, choose, detect_prompt, plural, point_prompt, region_to_3d_prompt


def test_plural_vocabulary():
    assert [plural(x) for x in ["chair", "box", "night stand", "bookcase", "shelves", "bus", "cup", "books",
                                "clothes", "sofa", "lamp", "traffic cone"]] == [
        "chairs", "boxes", "night stands", "bookcases", "shelves", "buses", "cups", "books",
        "clothes", "sofas", "lamps", "traffic cones"]


def test_choice_is_stable_and_spreads():
    picks = [choose(DETECT_3D, f"key{i}") for i in range(60)]
    assert picks == [choose(DETECT_3D, f"key{i}") for i in range(60)]
    assert set(picks) == set(DETECT_3D)
    assert choose(DETECT_3D, "a", "1") == choose(DETECT_3D, "a", "1")


def test_canonical_phrasings():
    assert detect_prompt("chair") == "Detect the 3D bounding boxes of all chairs."
    r = "<bbox>[0.100, 0.100, 0.100, 0.100]</bbox><region>"
    assert point_prompt(r, variant=0) == f"Please detect the 3D location of point {r}."
    assert region_to_3d_prompt(r, variant=0) == f"What is the 3D box of {r}?"
    assert r in region_to_3d_prompt(r, key="x")
