"""Sample keys: the rule, and a deterministic sanitizer for arbitrary source ids.

WebDataset splits a member name at the first dot of its basename, so a key with a dot silently
becomes another key plus a strange extension (Hypersim `frame.0000`, ARKit timestamps `123.456`).
Keys are also path-like (`omni3d/SUNRGBD_000123`) and end up in file names of caches and
exports, so `..`, absolute paths and odd characters are refused too.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_KEY_LEN", "InvalidKey", "make_key", "validate_key"]

MAX_KEY_LEN = 200
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_KEY = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_HASH_HEX = 10  # 40 bits: only inputs that sanitize to the same text need to differ here


class InvalidKey(ValueError):
    """A sample key breaks the key rule; the message says which part and why."""


def validate_key(key: object) -> str:
    """Return `key` if it is a valid sample key, else raise `InvalidKey` naming the cause.

    Rule: `[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*`, no dots, no `..`, not absolute, at most 200 chars.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, got {type(key).__name__}: {key!r}")
    if not key:
        raise InvalidKey("key is empty")
    if len(key) > MAX_KEY_LEN:
        raise InvalidKey(f"key is {len(key)} chars long, more than {MAX_KEY_LEN}: {key[:40]!r}...")
    if _KEY.fullmatch(key):
        return key
    if key.startswith("/"):
        raise InvalidKey(f"key {key!r} is absolute (starts with '/')")
    if ".." in key:
        raise InvalidKey(f"key {key!r} contains '..'")
    if "." in key:
        raise InvalidKey(f"key {key!r} contains a dot: webdataset would split the member name there")
    if key.endswith("/") or "//" in key:
        raise InvalidKey(f"key {key!r} has an empty path segment")
    bad = _BAD_CHAR.search(key.replace("/", "_"))
    ch = bad.group(0) if bad else "?"
    raise InvalidKey(f"key {key!r} contains {ch!r} (U+{ord(ch):04X}); allowed: A-Z a-z 0-9 _ - and '/' between segments")


def _digest(parts: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in parts:  # length-prefixed, so ("a/b",) and ("a", "b") hash differently
        b = p.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()[:_HASH_HEX]


def make_key(*parts: str | int) -> str:
    """Turn arbitrary strings (file names, ids, paths) into one valid key, deterministically.

    Each part becomes one `/`-separated segment; characters outside `[A-Za-z0-9_-]` become `_`.
    When that changed anything, or the result is longer than 200 chars, a short hash of the
    original parts is appended, so `a.b`, `a/b` and `a_b` do not collide. Valid parts pass
    through unchanged: `make_key("omni3d", "SUNRGBD_000123") == "omni3d/SUNRGBD_000123"`.
    """
    if not parts:
        raise InvalidKey("make_key needs at least one part")
    raw: list[str] = []
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, str | int):
            raise InvalidKey(f"key parts must be str or int, got {type(p).__name__}: {p!r}")
        raw.append(str(p))
    segments = [_BAD_CHAR.sub("_", p) or "_" for p in raw]
    key = "/".join(segments)
    if key == "/".join(raw) and len(key) <= MAX_KEY_LEN:
        return validate_key(key)
    suffix = "-" + _digest(tuple(raw))
    key = key[: MAX_KEY_LEN - len(suffix)].rstrip("/")
    return validate_key(key + suffix)
