"""proxy.headers (issue 8, finding 10): hop-by-hop fields and those named in Connection never reach the
model server, nor do the client's own forwarding fields; shepherd's are set from what it saw; in
secured mode the endpoint key is gone from the fields and from the query under every spelling, and
everything else is kept byte for byte, in order."""

from __future__ import annotations

import string
from urllib.parse import unquote_to_bytes

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from proxy.headers import FORWARDING, HOP_BY_HOP, strip_api_key, upstream_request

Header = tuple[bytes, bytes]

RFC_9110_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
}
CLIENT_FORWARDING = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded"}
OURS = {b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"}


def names(headers: list[Header]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def client_part(headers: list[Header]) -> list[Header]:
    """The fields that came from the client: ours are the last ones, and only ours have these names."""
    return [h for h in headers if h[0].lower() not in OURS]


# ---------------------------------------------------------------------------------------------
# Examples


def test_sets_are_the_rfc_ones() -> None:
    assert RFC_9110_HOP_BY_HOP <= HOP_BY_HOP
    assert CLIENT_FORWARDING == FORWARDING


def test_plain_request_keeps_its_fields_and_gains_ours() -> None:
    headers = [
        (b"host", b"worker:3000"), (b"user-agent", b"curl/8"), (b"content-type", b"application/json"),
        (b"content-length", b"12"), (b"authorization", b"Bearer endpoint-key"),
    ]
    query, out = upstream_request(headers, b"", client_host="203.0.113.7", scheme="https", strip_credentials=False)
    assert query == b""
    assert out == headers + [
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"forwarded", b"for=203.0.113.7;proto=https"),
    ]


def test_hop_by_hop_and_connection_named_fields_are_removed() -> None:
    headers = [
        (b"x-trace", b"secret-for-the-next-hop-only"),  # named below, before the Connection field
        (b"connection", b"Keep-Alive, X-Trace ,x-other\t"),
        (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
        (b"transfer-encoding", b"chunked"), (b"proxy-authorization", b"Basic eA=="),
        (b"Connection", b"X-Third"), (b"x-third", b"3"), (b"x-other", b"2"), (b"accept", b"*/*"),
    ]
    _, out = upstream_request(headers, b"", client_host="10.0.0.1", scheme="http", strip_credentials=False)
    assert client_part(out) == [(b"accept", b"*/*")]


def test_client_forwarding_fields_are_replaced_by_ours() -> None:
    headers = [
        (b"x-forwarded-for", b"1.1.1.1"), (b"X-Real-IP", b"1.1.1.1"), (b"forwarded", b"for=1.1.1.1"),
        (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"evil.example"), (b"accept", b"*/*"),
    ]
    _, out = upstream_request(headers, b"", client_host="10.0.0.9", scheme="http", strip_credentials=False)
    assert out == [
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"10.0.0.9"),
        (b"x-forwarded-proto", b"http"),
        (b"forwarded", b"for=10.0.0.9;proto=http"),
    ]


def test_ipv6_client_is_bracketed_and_quoted_in_forwarded() -> None:
    _, out = upstream_request([], b"", client_host="2001:db8:cafe::17", scheme="https", strip_credentials=False)
    assert dict(out) == {
        b"x-forwarded-for": b"2001:db8:cafe::17",
        b"x-forwarded-proto": b"https",
        b"forwarded": b'for="[2001:db8:cafe::17]";proto=https',
    }


def test_unknown_client_is_for_unknown() -> None:
    _, out = upstream_request([(b"x-forwarded-for", b"6.6.6.6")], b"", client_host=None, scheme="http",
                              strip_credentials=False)
    assert out == [(b"x-forwarded-proto", b"http"), (b"forwarded", b"for=unknown;proto=http")]


def test_an_odd_client_host_or_scheme_cannot_inject_a_field() -> None:
    _, out = upstream_request([], b"", client_host="1.2.3.4\r\nx-evil: 1", scheme="http\r\nx: y",
                              strip_credentials=False)
    assert out == [(b"x-forwarded-proto", b"http"), (b"forwarded", b"for=unknown;proto=http")]


def test_credentials_removed_only_when_asked() -> None:
    headers = [(b"authorization", b"Bearer endpoint-key"), (b"accept", b"*/*")]
    query = b"api_key=endpoint-key&model=x"
    kept_query, kept = upstream_request(headers, query, client_host="10.0.0.1", scheme="http", strip_credentials=False)
    assert kept_query == query and client_part(kept) == headers
    stripped_query, stripped = upstream_request(headers, query, client_host="10.0.0.1", scheme="http",
                                                strip_credentials=True)
    assert stripped_query == b"model=x" and client_part(stripped) == [(b"accept", b"*/*")]


def test_api_key_spellings_are_stripped() -> None:
    cases = {
        b"api_key=k1": b"",
        b"API_KEY=k1&a=1": b"a=1",
        b"a=1&api%5Fkey=k1": b"a=1",
        b"a=1&Api%5fKey=k1&b=2": b"a=1&b=2",
        b"%61%70%69%5f%6b%65%79=k1&b=2": b"b=2",
        b"a=1&api_key": b"a=1",
        b"api_key=&a=1": b"a=1",
        b"a=1&api_key=k1&api_key=k2&b=%20x": b"a=1&b=%20x",
        b"a=1;api_key=k1;b=2": b"a=1;b=2",  # servers that split on ";" too
        b"a=1&&api_key=k1&b": b"a=1&&b",  # an empty parameter is a parameter
    }
    for query, expected in cases.items():
        assert strip_api_key(query) == expected, query


def test_lookalike_names_are_kept() -> None:
    for query in (b"api_keys=1", b"my_api_key=1", b"api-key=1", b"apikey=1", b"api+key=1", b"api%255Fkey=1",
                  b"key=1&api=2", b"a=api_key", b"x=1%26api_key%3D2"):
        assert strip_api_key(query) == query


def test_query_without_key_is_the_same_object() -> None:
    query = b"model=llama&stream=true"
    assert strip_api_key(query) is query  # the fast path copies nothing


# ---------------------------------------------------------------------------------------------
# Properties over header lists

TOKEN_CHARS = string.ascii_lowercase + string.digits + "-"
field_name = st.one_of(
    st.sampled_from(sorted(RFC_9110_HOP_BY_HOP | CLIENT_FORWARDING | {b"authorization", b"trailers"})),
    st.sampled_from([b"accept", b"user-agent", b"content-type", b"host", b"content-length", b"x-trace"]),
    st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=12).map(str.encode),
)


def any_case(name: bytes, data: st.DataObject) -> bytes:
    """`name` with some of its ASCII letters upper-cased (ASGI lowercases names; be sure either way)."""
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return bytes(ch - 32 if flip and 97 <= ch <= 122 else ch for ch, flip in zip(name, flips))


@st.composite
def header_lists(draw: st.DrawFn) -> list[Header]:
    data = draw(st.data())
    headers: list[Header] = []
    for name in draw(st.lists(field_name, max_size=12)):
        if name == b"connection":
            listed = draw(st.lists(field_name, max_size=4))
            pieces = [
                draw(st.sampled_from(["", " ", "\t", "  "])).encode() + any_case(n, data)
                + draw(st.sampled_from(["", " ", "\t"])).encode()
                for n in listed
            ]
            extra_commas = draw(st.sampled_from([b"", b",", b" , "]))
            value = extra_commas + b",".join(pieces) + extra_commas
        else:
            value = draw(st.text(alphabet=string.printable.strip(), max_size=20)).encode()
        headers.append((any_case(name, data), value))
    return headers


def connection_options(headers: list[Header]) -> set[bytes]:
    options: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            options |= {o.strip(b" \t").lower() for o in value.split(b",")} - {b""}
    return options


@settings(max_examples=300, deadline=None)
@given(
    headers=header_lists(),
    client_host=st.sampled_from(["10.1.2.3", "::1", "2001:db8::7", None]),
    scheme=st.sampled_from(["http", "https"]),
    strip=st.booleans(),
)
def test_no_hop_by_hop_or_client_forwarding_field_survives(
    headers: list[Header], client_host: str | None, scheme: str, strip: bool
) -> None:
    _, out = upstream_request(headers, b"", client_host=client_host, scheme=scheme, strip_credentials=strip)
    from_client = client_part(out)
    dropped = RFC_9110_HOP_BY_HOP | CLIENT_FORWARDING | connection_options(headers)
    if strip:
        dropped |= {b"authorization"}
    assert not set(names(from_client)) & dropped
    # what was not dropped is all there, in order, byte for byte
    assert from_client == [h for h in headers if h[0].lower() not in dropped | {b"trailers"}]
    # exactly our forwarding fields, once each, last, with what we saw
    ours = out[len(from_client):]
    assert all(name in OURS for name, _ in ours)
    assert dict(ours)[b"x-forwarded-proto"] == scheme.encode()
    assert len(ours) == len(dict(ours))
    if client_host is None:
        assert b"x-forwarded-for" not in dict(ours)
        assert dict(ours)[b"forwarded"] == f"for=unknown;proto={scheme}".encode()
    else:
        assert dict(ours)[b"x-forwarded-for"] == client_host.encode()
        node = f'"[{client_host}]"' if ":" in client_host else client_host
        assert dict(ours)[b"forwarded"] == f"for={node};proto={scheme}".encode()


@settings(max_examples=200, deadline=None)
@given(headers=header_lists())
def test_client_forwarding_values_never_reach_the_server(headers: list[Header]) -> None:
    forged = [(n, b"6.6.6.6-forged") for n in sorted(CLIENT_FORWARDING)]
    _, out = upstream_request(forged + headers + forged, b"", client_host="10.0.0.1", scheme="http",
                              strip_credentials=False)
    assert b"6.6.6.6-forged" not in b"".join(v for _, v in out)


# ---------------------------------------------------------------------------------------------
# Properties over query strings


@st.composite
def key_spelling(draw: st.DrawFn) -> bytes:
    """`api_key` in any case, any of its bytes percent-encoded (either hex case), with or without a value."""
    out = b""
    for ch in b"api_key":
        c = ch - 32 if draw(st.booleans()) and 97 <= ch <= 122 else ch
        if draw(st.booleans()):
            escape = f"%{c:02x}" if draw(st.booleans()) else f"%{c:02X}"
            out += escape.encode()
        else:
            out += bytes([c])
    value = draw(st.one_of(st.none(), st.text(alphabet=string.ascii_letters + string.digits + "-_.%", max_size=20)))
    return out if value is None else out + b"=" + value.encode()


SECRET = b"the-endpoint-key-0123"
other_param = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-_.%+=/:", max_size=20).map(str.encode),
    st.sampled_from([b"api_keys=1", b"x_api_key=1", b"apikey=1", b"key=1", b"a=api_key", b"", b"api%255Fkey=1"]),
)


def decoded_name(param: bytes) -> bytes:
    return unquote_to_bytes(param.split(b"=", 1)[0]).lower()


@settings(max_examples=300, deadline=None)
@given(
    params=st.lists(
        st.tuples(
            st.sampled_from([b"&", b";"]),
            st.one_of(key_spelling().map(lambda k: (True, k)), other_param.map(lambda p: (False, p))),
        ),
        max_size=10,
    ),
)
def test_the_key_never_survives_and_the_rest_is_kept(params: list[tuple[bytes, tuple[bool, bytes]]]) -> None:
    """Parameters separated by "&" or ";" at random: each one kept keeps the separator before it."""
    others = [(sep, p) for sep, (is_key, p) in params if not is_key]
    # the generated "other" parameters contain no separator and are not the key under another spelling
    assume(all(b"&" not in p and b";" not in p and decoded_name(p) != b"api_key" for _, p in others))
    query = b"".join(sep + p for sep, (_, p) in params)[1:] if params else b""
    out = strip_api_key(query)
    assert all(decoded_name(p) != b"api_key" for p in out.replace(b";", b"&").split(b"&"))
    if len(others) == len(params):
        assert out == query  # nothing to remove: not a byte changes
    else:
        assert out == b"".join(sep + p for sep, p in others)[1:]


@settings(max_examples=200, deadline=None)
@given(before=st.lists(other_param, max_size=4), after=st.lists(other_param, max_size=4), key=key_spelling())
def test_the_key_value_never_reaches_the_server(before: list[bytes], after: list[bytes], key: bytes) -> None:
    assume(all(b"&" not in p and b";" not in p and SECRET not in p for p in before + after))
    assume(all(decoded_name(p) != b"api_key" for p in before + after))
    name = key.split(b"=", 1)[0]
    query = b"&".join([*before, name + b"=" + SECRET, *after])
    out, headers = upstream_request([(b"authorization", b"Bearer " + SECRET)], query, client_host="10.0.0.1",
                                    scheme="http", strip_credentials=True)
    assert SECRET not in out
    assert SECRET not in b"".join(v for _, v in headers)
    assert out == b"&".join([*before, *after])
