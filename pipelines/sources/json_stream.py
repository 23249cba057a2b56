"""A streaming parse of one large JSON object whose bulk is a few top-level arrays (Omni3D's `images`, `annotations`).

Why: `json.load` reads the whole text into one string before parsing, so a 1 GB annotation file costs 1 GB of
text on top of its parsed objects in the driver. `iter_object` reads the file in buffered pieces and hands the
elements of the chosen arrays over one at a time, so the text held at once is one buffer (plus the element
being parsed), whatever the file's size. There is no incremental-JSON wheel here (ijson), so the parser is
the standard library's own `json.JSONDecoder.raw_decode` (the C scanner) applied element by element; only the
structure around the elements (the top-level object's `{ "key": ..., }` and the arrays' `[ , ]`) is walked in
Python. Values are exactly what `json.load` gives (same decoder: floats, big ints, escapes, NaN).

A value cut by the end of a buffer is parsed again once more text is read (a number the buffer's end may have cut
is too: "12" may be the start of "123"); the read size doubles while one value
does not fit, so a large value that is not streamed costs O(size), not O(size^2). Errors raise
`json.JSONDecodeError` with the line and column in the whole file, as `json.load` would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from typing import IO, Any

_WS = re.compile(r"[ \t\n\r]*")
_NUM_TAIL = re.compile(r"[0-9eE+\-.]*")
_DECODER = json.JSONDecoder()
READ_SIZE = 1 << 20  # characters per read


class _Text:
    """The file's text, a buffer at a time: `buf[pos:]` is what is left to parse, `base` is buf[0]'s offset."""

    def __init__(self, fh: IO[str], read_size: int):
        self.fh, self.read_size = fh, read_size
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False
        self.lines = 0  # newlines in the text dropped before buf[0]
        self.line_start = 0  # absolute offset just after the last newline dropped

    def more(self, want: int = 0) -> bool:
        """Append at least one more read (of `want` characters if larger); False at end of file."""
        if self.eof:
            return False
        data = self.fh.read(max(self.read_size, want))
        if not data:
            self.eof = True
            return False
        if self.pos:  # drop what is parsed, keeping the line count for error positions
            gone = self.buf[:self.pos]
            n = gone.count("\n")
            if n:
                self.lines += n
                self.line_start = self.base + gone.rindex("\n") + 1
            self.buf, self.base, self.pos = self.buf[self.pos:], self.base + self.pos, 0
        self.buf += data
        return True

    def peek(self) -> str:
        """The next non-whitespace character ("" at end of file), without consuming it."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def value(self) -> Any:
        """The next JSON value, decoded by the standard decoder."""
        self.peek()
        want = 0
        while True:
            try:
                v, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                want = 2 * len(self.buf)  # the value does not fit yet: read as much again as is buffered
                if self.more(want):
                    continue
                raise self.error(exc.msg, exc.pos) from None
            # A number that the buffer's end may have cut: "12" of "123", "-1" of "-1E+400" (raw_decode stops
            # before an "E" with no digits yet). Decide with more text.
            if _NUM_TAIL.fullmatch(self.buf, end) and isinstance(v, (int, float)) and self.more(want):
                continue
            self.pos = end
            return v

    def expect(self, ch: str, msg: str) -> None:
        if self.peek() != ch:
            raise self.error(msg, self.pos)
        self.pos += 1

    def error(self, msg: str, pos: int) -> json.JSONDecodeError:
        """`json.JSONDecodeError` at buffer position `pos`, with the whole file's line and column."""
        nl = self.buf.rfind("\n", 0, pos)
        lineno = self.lines + self.buf.count("\n", 0, pos) + 1
        col = pos - nl if nl >= 0 else self.base + pos - self.line_start + 1
        exc = json.JSONDecodeError(msg, "", 0)
        exc.args = (f"{msg}: line {lineno} column {col} (char {self.base + pos})",)
        exc.pos, exc.lineno, exc.colno = self.base + pos, lineno, col
        return exc


def iter_object(fh: IO[str], stream: Collection[str], read_size: int | None = None) -> Iterator[tuple[str, str, Any]]:
    """Parse a JSON document from `fh`, yielding events as it goes.

    - `("member", key, value)`: a top-level member (its value parsed whole);
    - `("array", key, None)` then `("item", key, element)` per element: a member named in `stream` whose value
      is an array (a repeated key starts again with a new "array" event: the last one wins, as in json.load);
    - `("top", "", value)`: the document is not an object (its value, whole).
    Raises `json.JSONDecodeError` (truncated or invalid text, extra data after the document) as json.load
    would; the events before the error have been yielded, so a caller keeps nothing until the end.
    """
    t = _Text(fh, read_size or READ_SIZE)
    if t.peek() != "{":
        yield "top", "", t.value()
    else:
        t.pos += 1
        if t.peek() == "}":
            t.pos += 1
        else:
            while True:
                if t.peek() != '"':
                    raise t.error("Expecting property name enclosed in double quotes", t.pos)
                key = t.value()
                t.expect(":", "Expecting ':' delimiter")
                if key in stream and t.peek() == "[":
                    t.pos += 1
                    yield "array", key, None
                    keys: dict[str, str] = {}
                    if t.peek() == "]":
                        t.pos += 1
                    else:
                        while True:
                            v = t.value()
                            if isinstance(v, dict):  # one key object for all elements, as json.load's memo gives
                                v = {keys.setdefault(k, k): x for k, x in v.items()}
                            yield "item", key, v
                            c = t.peek()
                            t.pos += 1
                            if c == "]":
                                break
                            if c != ",":
                                raise t.error("Expecting ',' delimiter", t.pos - 1)
                else:
                    yield "member", key, t.value()
                c = t.peek()
                t.pos += 1
                if c == "}":
                    break
                if c != ",":
                    raise t.error("Expecting ',' delimiter", t.pos - 1)
    if t.peek() != "":
        raise t.error("Extra data", t.pos)


def load_object(fh: IO[str], stream: Collection[str], read_size: int | None = None) -> Any:
    """The document as `json.load` gives it, parsed with `iter_object` (the text is never held whole)."""
    out: dict[str, Any] = {}
    for kind, key, value in iter_object(fh, stream, read_size):
        if kind == "top":
            return value
        if kind == "array":  # a repeated key: the last value, at the first one's place (as json.load's dict)
            out[key] = []
        elif kind == "item":
            out[key].append(value)
        else:
            out[key] = value
    return out
