"""Strict JSON parsing of VLM output, and the prompt templates' versioning."""

from __future__ import annotations

import pytest

from annotators import prompts
from annotators.parsing import (
    MAX_DESCRIPTION_CHARS,
    ParseError,
    extract_json_object,
    parse_rewrite,
    parse_verdict,
)


@pytest.mark.parametrize(
    "text",
    [
        '{"choice": 1, "confidence": 0.5}',
        '  \n{"choice": 1, "confidence": 0.5}\n ',
        '```json\n{"choice": 1, "confidence": 0.5}\n```',
        '```\n{"choice": 1, "confidence": 0.5}\n```',
        '```JSON\n{"choice": 1, "confidence": 0.5}```',
    ],
)
def test_accepts_bare_object_and_fenced(text: str) -> None:
    assert extract_json_object(text) == {"choice": 1, "confidence": 0.5}


@pytest.mark.parametrize(
    ("text", "reason_part"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ('Sure! {"choice": 1, "confidence": 0.5}', "does not start"),
        ('{"choice": 1, "confidence": 0.5} I hope this helps', "text after"),
        ('{"choice": 1} {"choice": 2}', "text after"),
        ('[{"choice": 1}]', "does not start"),
        ('{"choice": 1, "confidence": NaN}', "non-finite"),
        ('{"choice": 1, "choice": 2, "confidence": 0.5}', "duplicate"),
        ('{"choice": 1, "confidence": 0.5', "invalid JSON"),
        ('```json\n{"choice": 1}', "fence"),
        ("```json\n\n```", "empty code fence"),
        ("{'choice': 1}", "invalid JSON"),
    ],
)
def test_rejects_with_reason(text: str, reason_part: str) -> None:
    with pytest.raises(ParseError) as ei:
        extract_json_object(text)
    assert reason_part in ei.value.reason


def test_verdict_fields_are_checked_strictly() -> None:
    assert parse_verdict('{"choice": 2, "confidence": 1}', 3) == (2, 1.0)
    assert parse_verdict('{"choice": null, "confidence": 0.0, "reason": "no cup"}', 3) == (None, 0.0)
    bad = {
        '{"choice": 3, "confidence": 0.5}': "out of range",
        '{"choice": -1, "confidence": 0.5}': "out of range",
        '{"choice": true, "confidence": 0.5}': "integer or null",
        '{"choice": "1", "confidence": 0.5}': "integer or null",
        '{"choice": 1.0, "confidence": 0.5}': "integer or null",
        '{"choice": 1, "confidence": 1.5}': "outside",
        '{"choice": 1, "confidence": "high"}': "number",
        '{"choice": 1}': "missing",
        '{"choice": 1, "confidence": 0.5, "box": [1, 2]}': "unexpected",
        '{"choice": 1, "confidence": 0.5, "reason": 3}': "reason",
    }
    for text, part in bad.items():
        with pytest.raises(ParseError) as ei:
            parse_verdict(text, 3)
        assert part in ei.value.reason, (text, ei.value.reason)


def test_rewrite_fields_are_checked_strictly() -> None:
    assert parse_rewrite('{"description": "  the   red mug "}') == "the red mug"
    for text, part in {
        '{"description": ""}': "empty",
        '{"description": 5}': "string",
        '{"description": "a <bbox> b"}': "forbidden",
        '{"description": "line\\nbreak"}': "forbidden",
        '{"description": "x", "extra": 1}': "unexpected",
        '{"description": "' + "a" * (MAX_DESCRIPTION_CHARS + 1) + '"}': "longer",
    }.items():
        with pytest.raises(ParseError) as ei:
            parse_rewrite(text)
        assert part in ei.value.reason


def test_prompt_version_pins_templates() -> None:
    # If this fails you edited a template: bump PROMPT_VERSION, then update the pinned values.
    assert prompts.PROMPT_VERSION == "vlm-v1"
    assert prompts.TEMPLATES_SHA256 == "8ada7e469cda863fabe8a8a561145868e4c18c249613bfee7bc85934e72a17c4"


def test_prompts_use_milli_coordinates_and_numbering() -> None:
    p = prompts.verify_prompt(
        'the "red" cup', [(64, 48, 320, 240), (0, 0, 640, 480)], ["cup", None], 640, 480, True
    )
    assert "0: [100, 100, 500, 500] (proposed as: cup)" in p
    assert "1: [0, 0, 1000, 1000]\n" in p
    assert "the 'red' cup" in p and prompts.MARKS_NOTE in p
    one = prompts.verify_prompt("cup", [(0, 0, 10, 10)], None, 640, 480, False)
    assert "Does box 0" in one and prompts.MARKS_NOTE not in one
    r = prompts.rewrite_prompt("chair", (0, 0, 320, 480), [(320, 0, 640, 480)], 640, 480, False)
    assert "[0, 0, 500, 1000]" in r and "0: [500, 0, 1000, 1000]" in r and "other objects of its class" in r
    assert prompts.to_milli((-5, 0, 700, 480), 640, 480) == (0, 0, 1000, 1000)
    assert prompts.repair_prompt("Q", "bad\nthing").endswith(
        "(bad thing). Reply again with only the JSON object described above, with no other text."
    )
