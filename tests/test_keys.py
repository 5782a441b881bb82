from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import UnsafeKey
from agent.keys import find_collisions, key_to_parts


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/abs",
        "..",
        ".",
        "a/../b",
        "a//b",
        "a/./b",
        "a\x00b",
        "",
        "x" * 256,
        "d/" + "é" * 128,
        "a/" * 2100 + "b",
    ],
)
def test_hostile_keys_are_rejected(key: str) -> None:
    with pytest.raises(UnsafeKey):
        key_to_parts(key)


def test_plain_keys_map_to_components() -> None:
    assert key_to_parts("a/b/c.bin") == ("a", "b", "c.bin")
    assert key_to_parts("..hidden/x..y") == ("..hidden", "x..y")


def test_file_and_directory_collision_is_found() -> None:
    found = find_collisions([("a", "b"), ("a", "b", "c")])
    assert found == {("a", "b"): "is both a file and a directory prefix of other keys"}
    assert find_collisions([("a",), ("a",)]) == {("a",): "appears twice in the listing"}
    assert find_collisions([("a", "b"), ("a", "c"), ("d",)]) == {}


@given(st.text(max_size=300))
def test_accepted_keys_never_escape(key: str) -> None:
    try:
        parts = key_to_parts(key)
    except UnsafeKey:
        return
    assert "/".join(parts) == key
    assert all(p not in ("", ".", "..") and "/" not in p and "\x00" not in p for p in parts)
    assert not key.startswith("/")
