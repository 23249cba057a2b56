"""Read a JSON file into exactly what `json.load` gives, with orjson's parser when that is certain to agree.

Why: the det3d driver parses every Omni3D annotation file before any chunk can start, and the standard
library's parser was the largest single part of that serial listing (bench/executors.md, "Driver per input
(session 4)"). orjson parses the same text in ~0.65x the CPU here (creating the Python floats is most of
the cost either way).

Same values. orjson gives `json.load`'s values for the JSON both accept (floats by correct rounding, `-0` an
int, `-0.0` a float, a repeated key's last value at its first place), with these differences, all sent to the
standard library instead, so the caller always gets `json.load`'s values and `json.load`'s errors:
- NaN / Infinity / -Infinity literals, numbers overflowing to inf (`1e400`), lone surrogate escapes (`"\\ud800"`),
  invalid UTF-8 and nesting deeper than 1024 levels: orjson raises, then the file is parsed again by
  `json.load` (which accepts them, or raises its own error with line and column, exactly as before);
- integers outside 64 bits: orjson returns them as floats without an error, so a file with any run of 19 or
  more digits not right after a "." (every integer beyond 64 bits has one; a float's decimals do not count)
  goes to `json.load` from the start.
Without orjson installed, every file takes `json.load`.

Same memory. orjson parses into its own document before making Python objects: a whole 61 MB Omni3D file
peaked at 476 MiB against `json.load`'s 312 MiB. So a file larger than `PIECE_BYTES` is parsed whole only by
`json.load`; orjson parses it in pieces: the big top-level array the caller names (Omni3D's `annotations`)
cut at element boundaries into ~`PIECE_BYTES` pieces, each parsed alone, and the rest of the document
("skeleton") with that array replaced by a unique sentinel string. The cuts are guesses (the bytes `},{`,
with whitespace, which might be inside a string or a nested value), made certain by the parses themselves:
when the skeleton parses with the sentinel as its top-level member and every piece parses as an array, the
original text is the skeleton with a valid array in the sentinel's place, so its value is the skeleton's with
the pieces' elements concatenated. A piece that does not parse is tried again up to the next candidate cut
(`CUT_TRIES` times); anything else (no such array, two candidates, a piece that still does not parse) goes
to `json.load`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

try:
    import orjson
except ImportError:  # an optional speed-up: the standard library gives the same values
    orjson = None  # type: ignore[assignment]

__all__ = ["load_json_path", "has_long_digit_run", "split_top_array", "cut_points", "LONG_DIGITS", "PIECE_BYTES"]

PIECE_BYTES = 2 << 20
"""Largest text orjson parses at once (its transient document is ~2.7x the text)."""

CUT_TRIES = 8
"""Candidate cuts tried per piece before the file goes to `json.load` (each failed try re-parses the piece)."""

_BOUNDARY = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")  # a candidate cut between two objects of an array
_UNSURE = object()

LONG_DIGITS = 19
"""Digits from which an integer may not fit in 64 bits (2**63 has 19): orjson would turn it into a float."""

# each digit -> "0", "." stays, anything else -> " ": a run that counts is " " followed by LONG_DIGITS "0"s
_DIGITS_ONLY = bytes(0x30 if 0x30 <= i <= 0x39 else i if i == 0x2E else 0x20 for i in range(256))
_RUN = b" " + b"0" * LONG_DIGITS
_SCAN = 1 << 20  # bytes translated at once (a bounded copy, not a second copy of the whole file)


def has_long_digit_run(raw: bytes) -> bool:
    """True when `raw` holds `LONG_DIGITS` or more digits in a row not right after a "." (C-speed: translate +
    find, ~3 ms per MB). Every integer literal beyond 64 bits has such a run; the digits after a float's decimal
    point do not count (a full-precision 0.00012345678901234567 is common in real annotation files and is
    parsed alike by both), an integer part or exponent that long does (it only loses the fast path)."""
    for s in range(0, len(raw), _SCAN):
        piece = raw[s - 1:s + _SCAN + LONG_DIGITS - 1] if s else b" " + raw[:_SCAN + LONG_DIGITS - 1]
        if piece.translate(_DIGITS_ONLY).find(_RUN) >= 0:
            return True
    return False


def load_json_path(path: str | os.PathLike, split: str | None = None) -> Any:
    """`json.load(open(path, encoding="utf-8"))`: the same value, or the same exception, faster when it can be.

    `split`: the name of the top-level array that holds most of a large file (parsed in pieces by orjson; a
    large file without one is parsed by `json.load`). Raises what `json.load` raises: OSError,
    UnicodeDecodeError, json.JSONDecodeError (line and column as `json.load` reports them, since a file orjson
    refuses is parsed again by `json.load`), RecursionError. The file's bytes are held while parsed, as
    `json.load` holds its text.
    """
    if orjson is not None:
        with open(path, "rb") as fh:
            raw = fh.read()
        if not has_long_digit_run(raw):
            try:
                if len(raw) <= PIECE_BYTES:
                    return orjson.loads(raw)
                if split is not None:
                    value = _loads_in_pieces(raw, split)
                    if value is not _UNSURE:
                        return value
            except orjson.JSONDecodeError:
                pass  # not certain to be an error for json.load (NaN, 1e400, lone surrogates): ask it
        del raw
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def split_top_array(raw: bytes, split: str) -> tuple[bytes, str, int, int] | None:
    """The document with its top-level array `split` replaced by a unique sentinel string, or None.

    Returns (skeleton, sentinel, start, end): `raw[start:end]` is the array's text between its brackets. The
    split is a guess until the caller has parsed the skeleton and found the sentinel as the value of `split` in
    the top-level object, and parsed the array's text as an array (in one piece or in pieces cut by
    `cut_points`): then the document is certain to be the skeleton with that array in the sentinel's place.
    """
    key = re.compile(rb'"' + re.escape(split.encode()) + rb'"[ \t\n\r]*:[ \t\n\r]*\[')
    m = key.search(raw)
    end = raw.rfind(b"]")  # the array's end, if it is the last member (Omni3D's `annotations` is)
    if m is None or key.search(raw, m.end()) is not None or end < m.end():
        return None
    sentinel = "gr3d-json-fast-" + os.urandom(12).hex()
    if raw.find(sentinel.encode()) >= 0:
        return None
    return raw[:m.end() - 1] + b'"' + sentinel.encode() + b'"' + raw[end + 1:], sentinel, m.end(), end


def cut_points(raw: bytes, start: int, end: int, n: int) -> list[tuple[int, int]]:
    """`raw[start:end]` (an array's text between its brackets) cut into up to `n` pieces of about equal size at
    candidate element boundaries (`},{`): each `(s, e)` is to be parsed as `b"[" + raw[s:e] + b"]"`. A cut inside
    a string or a nested value makes a piece fail its parse, so the caller treats that as "not sure"."""
    out, pos = [], start
    for k in range(1, n):
        cut = _BOUNDARY.search(raw, max(pos, start + (end - start) * k // n), end)
        if cut is None:
            break
        out.append((pos, cut.start() + 1))  # a piece ends after a "}" and the next starts at its "{"
        pos = cut.end() - 1
    out.append((pos, end))
    return out


def _loads_in_pieces(raw: bytes, split: str) -> Any:
    """The document's value with its top-level array `split` parsed in pieces (module docstring), or `_UNSURE`.

    Raises orjson.JSONDecodeError when a part does not parse (the caller then asks `json.load`).
    """
    parts = split_top_array(raw, split)
    if parts is None:
        return _UNSURE
    skeleton, sentinel, start, end = parts
    doc = orjson.loads(skeleton)
    if not isinstance(doc, dict) or doc.get(split) != sentinel:
        return _UNSURE
    items: list[Any] = []
    pos = start
    while True:
        start = pos + PIECE_BYTES
        for _ in range(CUT_TRIES):  # a cut inside a string or a nested value fails its parse: try the next one
            cut = _BOUNDARY.search(raw, start, end) if start < end else None
            stop = cut.start() + 1 if cut else end  # a piece ends after a "}" and the next starts at its "{"
            try:
                items.extend(orjson.loads(b"[" + raw[pos:stop] + b"]"))
                break
            except orjson.JSONDecodeError:
                if cut is None:  # the last piece: a real error, or `end` is not the array's end
                    raise
                start = cut.start() + 1
        else:
            return _UNSURE
        if cut is None:
            break
        pos = cut.end() - 1
    doc[split] = items
    return doc
