"""Cutting `auth_data` out of a large body's head without parsing the rest (proxy/auth_first.py)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.auth_first import auth_data_prefix

leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
# Strings full of the characters a naive scanner trips on: quotes, escapes, braces, brackets.
tricky = st.text(alphabet='{}[]"\\:,ab ', max_size=30)
values = st.recursive(st.one_of(leaves, tricky), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(tricky, inner, max_size=4)), max_leaves=20)
auth_objects = st.dictionaries(st.one_of(tricky, st.text(max_size=10)), values, max_size=6)


@given(auth=auth_objects, indent=st.sampled_from([None, 1, 4]), ascii_only=st.booleans())
def test_the_cut_is_exactly_the_auth_data_object(auth: dict, indent: int | None, ascii_only: bool) -> None:
    raw = json.dumps(auth, indent=indent, ensure_ascii=ascii_only).encode()
    body = b' {\n "auth_data" : ' + raw + b', "payload": {"x": "' + b"}" * 100 + b'"}}'
    cut = auth_data_prefix(body, len(raw) + 10)
    assert cut == raw
    assert json.loads(cut) == auth


def test_nothing_is_cut_when_auth_data_is_not_first_or_too_long() -> None:
    raw = json.dumps({"url": "http://x", "signature": "a" * 100}).encode()
    assert auth_data_prefix(b'{"payload": {}, "auth_data": ' + raw + b"}", 4096) is None
    assert auth_data_prefix(b'{"auth_data": ' + raw + b"}", len(raw) - 1) is None  # ends past the window
    assert auth_data_prefix(b'{"auth_data": "not an object"}', 4096) is None
    assert auth_data_prefix(b'{"auth_data": {"unterminated": "}', 4096) is None
    assert auth_data_prefix(b"[1, 2, 3]", 4096) is None
