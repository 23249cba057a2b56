"""Key rule and the deterministic sanitizer, on hostile inputs."""

from __future__ import annotations

import re

import pytest

from shards.keys import MAX_KEY_LEN, InvalidKey, make_key, validate_key

HOSTILE = ["../../x", "a.b", "café/ünï", "", "x" * 500, "/abs/path", "a//b", "a/", "scene0000_00.frame.0001",
           "with space", "tab\there", "semi;colon", "..", ".", "a/../b", "日本語", "\x00nul", "a\\b"]


@pytest.mark.parametrize("key,cause", [
    ("../../x", "'..'"), ("a.b", "dot"), ("café", "U+00E9"), ("", "empty"), ("x" * 500, "500 chars"),
    ("/abs", "absolute"), ("a//b", "empty path segment"), ("a/", "empty path segment"), ("a b", "U+0020"),
])
def test_validate_key_names_the_cause(key: str, cause: str) -> None:
    with pytest.raises(InvalidKey, match=re.escape(cause)):
        validate_key(key)


def test_validate_key_accepts_the_rule() -> None:
    for k in ["a", "A-z_0", "omni3d/SUNRGBD_000123", "x" * MAX_KEY_LEN, "a/b/c-d_e"]:
        assert validate_key(k) == k
    with pytest.raises(InvalidKey, match="must be a str"):
        validate_key(123)
    with pytest.raises(InvalidKey):
        validate_key("x" * (MAX_KEY_LEN + 1))


def test_make_key_sanitizes_hostile_inputs_into_distinct_valid_keys() -> None:
    keys = [make_key("ds", h) for h in HOSTILE]
    for k in keys:
        assert validate_key(k) == k and len(k) <= MAX_KEY_LEN
        assert "." not in k and ".." not in k and not k.startswith("/")
    assert len(set(keys)) == len(keys)  # no collisions
    assert keys == [make_key("ds", h) for h in HOSTILE]  # deterministic within a process
    # ... and across processes/versions: pinned values (sha256-based, not Python's salted hash)
    assert make_key("../../x") == "______x-602a19beb0"


def test_make_key_keeps_valid_parts_and_separates_lookalikes() -> None:
    assert make_key("omni3d", "SUNRGBD_000123") == "omni3d/SUNRGBD_000123"
    assert make_key("a", 7) == "a/7"
    lookalikes = [make_key("a.b"), make_key("a/b"), make_key("a_b"), make_key("a", "b"), make_key("a?b")]
    assert len(set(lookalikes)) == len(lookalikes)
    assert make_key("a_b") == "a_b" and make_key("a", "b") == "a/b"
    long1, long2 = make_key("p" * 300), make_key("p" * 301)
    assert len(long1) == MAX_KEY_LEN and long1 != long2
    with pytest.raises(InvalidKey):
        make_key()
    with pytest.raises(InvalidKey, match="str or int"):
        make_key("a", None)  # type: ignore[arg-type]
