"""Strict parsing of VLM output.

Why strict: a verifier answer decides which box becomes training data. Scraping a number out of
free prose ("I think it is box 2, or maybe 3") would turn model confusion into silent label noise.
So the output must be exactly one JSON object, optionally inside a single Markdown code fence
(```json ... ``` or ``` ... ```), which chat models add even when told not to. Anything else is a
`ParseError` whose `reason` says what was wrong. The caller retries once with a repair prompt and
then turns the failure into a reject that keeps the raw text.

Field validation is strict too: types are checked exactly (a bool is not an int, NaN is not a
number), values are range-checked, and unknown keys are refused, except an optional free-text
`"reason"` that models like to add and that does no harm.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = [
    "REWRITE_SCHEMA",
    "VERDICT_SCHEMA",
    "ParseError",
    "ModelOutputError",
    "extract_json_object",
    "parse_verdict",
    "parse_rewrite",
    "MAX_DESCRIPTION_CHARS",
]

MAX_DESCRIPTION_CHARS = 200
"""Longest accepted rewrite. Instance descriptions are short noun phrases; longer output is a
model running on, and it would also bloat the CoT text it gets spliced into."""

_FENCE = re.compile(r"\A```(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?```\Z", re.DOTALL)
_FORBIDDEN_IN_DESCRIPTION = ("<", ">", "\n", "\r", "[", "]")


class ParseError(ValueError):
    """Model output that is not acceptable; `reason` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ModelOutputError(RuntimeError):
    """A model call whose output stayed unusable after the retry.

    Carries the raw text of every attempt (last one in `raw`) so the builder can keep it in the
    reject row; the audit reads those rows to see how the model fails.
    """

    def __init__(self, reason: str, raw: str, attempts: list[str] | None = None) -> None:
        super().__init__(f"unusable model output: {reason}")
        self.reason = reason
        self.raw = raw
        self.attempts = list(attempts) if attempts is not None else [raw]


def _reject_constant(name: str) -> Any:
    raise ParseError(f"non-finite number {name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ParseError(f"duplicate key {k!r}")
        out[k] = v
    return out


def extract_json_object(text: str) -> dict[str, Any]:
    """Return the single JSON object that `text` consists of.

    Accepted: surrounding whitespace, and one enclosing ```/```json fence. Rejected with a
    `ParseError`: empty output, prose before or after the object, several objects, arrays or
    scalars at the top level, NaN/Infinity, duplicate keys.
    """
    if not isinstance(text, str):
        raise ParseError(f"output is {type(text).__name__}, not text")
    s = text.strip()
    if not s:
        raise ParseError("empty output")
    if s.startswith("```"):
        m = _FENCE.match(s)
        if m is None:
            raise ParseError("unterminated or malformed code fence")
        s = m.group("body").strip()
        if not s:
            raise ParseError("empty code fence")
    if not s.startswith("{"):
        raise ParseError("output does not start with a JSON object")
    decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    try:
        obj, end = decoder.raw_decode(s)
    except ParseError:
        raise
    except json.JSONDecodeError as exc:
        raise ParseError(f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    rest = s[end:].strip()
    if rest:
        raise ParseError(f"text after the JSON object: {rest[:40]!r}")
    if not isinstance(obj, dict):  # pragma: no cover - guarded by the '{' check
        raise ParseError("top level is not a JSON object")
    return obj


def _check_keys(obj: dict[str, Any], required: set[str]) -> None:
    missing = required - obj.keys()
    if missing:
        raise ParseError(f"missing key(s) {sorted(missing)}")
    extra = obj.keys() - required - {"reason"}
    if extra:
        raise ParseError(f"unexpected key(s) {sorted(extra)}")
    if "reason" in obj and not isinstance(obj["reason"], str):
        raise ParseError("'reason' must be a string")


# JSON Schemas of the two answers, sent as `response_format` (structured output) to endpoints that
# support it (vLLM, SGLang, OpenAI), so the server constrains decoding to what the parsers below accept.
VERDICT_SCHEMA: dict = {
    "type": "object",
    "properties": {"choice": {"type": ["integer", "null"], "minimum": 0},
                   "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["choice", "confidence"],
    "additionalProperties": False,
}
REWRITE_SCHEMA: dict = {
    "type": "object",
    "properties": {"description": {"type": "string"}},
    "required": ["description"],
    "additionalProperties": False,
}


def parse_verdict(text: str, n_candidates: int) -> tuple[int | None, float]:
    """Parse a verify answer `{"choice": int|null, "confidence": number}`.

    `choice` must index one of the `n_candidates` boxes (0-based) or be null ("none of them");
    `confidence` must be a finite number in [0, 1].
    """
    obj = extract_json_object(text)
    _check_keys(obj, {"choice", "confidence"})
    choice = obj["choice"]
    if choice is not None:
        if isinstance(choice, bool) or not isinstance(choice, int):
            raise ParseError(f"'choice' must be an integer or null, got {choice!r}")
        if not 0 <= choice < n_candidates:
            raise ParseError(f"'choice' {choice} out of range 0..{n_candidates - 1}")
    conf = obj["confidence"]
    if isinstance(conf, bool) or not isinstance(conf, int | float):
        raise ParseError(f"'confidence' must be a number, got {conf!r}")
    conf = float(conf)
    if not math.isfinite(conf) or not 0.0 <= conf <= 1.0:
        raise ParseError(f"'confidence' {conf} outside [0, 1]")
    return choice, conf


def parse_rewrite(text: str) -> str:
    """Parse a rewrite answer `{"description": str}` into the cleaned description.

    The description is spliced into grounded CoT text, so it must be one non-empty line without
    the grammar's bracket characters, at most `MAX_DESCRIPTION_CHARS` long.
    """
    obj = extract_json_object(text)
    _check_keys(obj, {"description"})
    desc = obj["description"]
    if not isinstance(desc, str):
        raise ParseError(f"'description' must be a string, got {type(desc).__name__}")
    desc = re.sub(r"[ \t]+", " ", desc).strip()
    if not desc:
        raise ParseError("empty description")
    if len(desc) > MAX_DESCRIPTION_CHARS:
        raise ParseError(f"description longer than {MAX_DESCRIPTION_CHARS} chars")
    bad = [c for c in _FORBIDDEN_IN_DESCRIPTION if c in desc]
    if bad:
        raise ParseError(f"description contains forbidden characters {bad!r}")
    return desc
