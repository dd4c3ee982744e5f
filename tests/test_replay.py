"""The optional reqnum replay window: keyed on the decoded signature bytes, moved only by signed reqnums.

Updated for issue 8 finding 8: `accept` takes the decoded signature (bytes, not its base64 text) and
whether the signature covers the reqnum; the tests that predate it pass `reqnum_signed=True`, the
case they were written for (the 2024 format signs reqnum).
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.envelope import AuthData
from proxy.replay import ReplayGuard
from proxy.signature import StaticKeySource, Verifier, decode_signature, signs_reqnum

SIGNED = True
UNSIGNED = False


def test_the_same_signed_reqnum_passes_once() -> None:
    guard = ReplayGuard(100)
    assert guard.accept(5, b"sig", SIGNED) is None
    assert guard.accept(5, b"sig", SIGNED) == "reqnum 5 was already used"
    assert guard.accept(5, b"other", SIGNED) is None  # another signature: another request


def test_reqnums_far_behind_the_newest_are_refused() -> None:
    guard = ReplayGuard(100)
    assert guard.accept(1000, b"a", SIGNED) is None
    assert guard.accept(900, b"b", SIGNED) is None  # exactly at the edge of the window
    assert guard.accept(899, b"c", SIGNED) == "reqnum 899 is more than 100 behind the newest (1000)"


def test_memory_stays_bounded_by_the_window() -> None:
    guard = ReplayGuard(10)
    for n in range(1000):
        assert guard.accept(n, b"s", SIGNED) is None
    assert len(guard._recent) == 10
    for n in range(1000):  # unsigned reqnums are remembered in the same bounded set
        assert guard.accept(2**63 + n, b"s", UNSIGNED) is None
    assert len(guard._recent) == 10


def test_a_window_of_zero_is_not_a_guard() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(0)


def test_an_unsigned_huge_reqnum_does_not_block_later_requests() -> None:
    # Today: one url-signed request with reqnum 2**63 made every later request "too far behind".
    guard = ReplayGuard(100)
    assert guard.accept(7, b"url-sig", UNSIGNED) is None
    assert guard.accept(2**63, b"url-sig", UNSIGNED) is None
    for reqnum in range(8, 50):
        assert guard.accept(reqnum, b"url-sig", UNSIGNED) is None
    assert guard.accept(51, b"sorted-sig", SIGNED) is None


def test_an_unsigned_reqnum_is_still_checked_against_the_signed_window() -> None:
    # Only signed reqnums move the window, but every reqnum is held to it and to the duplicate check.
    guard = ReplayGuard(10)
    assert guard.accept(1000, b"a", SIGNED) is None
    assert guard.accept(2**63, b"u", UNSIGNED) is None
    assert guard.accept(995, b"b", SIGNED) is None  # the window still ends at 1000, not 2**63
    assert guard.accept(2**63, b"u", UNSIGNED) == f"reqnum {2**63} was already used"
    assert guard.accept(989, b"u", UNSIGNED) == "reqnum 989 is more than 10 behind the newest (1000)"


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**64), 2**64), max_size=30), st.integers(0, 10**6))
def test_no_sequence_of_unsigned_reqnums_refuses_a_fresh_signed_request(unsigned: list[int], fresh: int) -> None:
    guard = ReplayGuard(100)
    for index, reqnum in enumerate(unsigned):
        guard.accept(reqnum, b"url-sig-%d" % index, UNSIGNED)
    assert guard.accept(fresh, b"a fresh signature", SIGNED) is None


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _other_spellings(text: str) -> list[str]:
    """Base64 texts that b64decode(validate=True) maps to the same bytes as `text`."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = text.rstrip("=")
    pad = text[len(body):]
    decoded = base64.b64decode(text)
    spellings = [body[:-1] + c + pad for c in alphabet]
    return [s for s in spellings if s != text and base64.b64decode(s, validate=True) == decoded]


async def test_other_base64_spellings_of_the_same_signature_are_one_key(key: rsa.RSAPrivateKey) -> None:
    # Today the guard was keyed on the text: 15 other spellings of the same bytes each passed as new.
    # Now the verifier refuses them (non-canonical), and the guard's key is the bytes anyway.
    message = b'{\n    "cost": 1,\n    "endpoint": "e",\n    "reqnum": 5,\n    "url": "u"\n}'  # legacy
    text = base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()
    others = _other_spellings(text)
    assert len(others) == 15
    verifier = Verifier(StaticKeySource(key.public_key()), fmt="legacy")
    guard = ReplayGuard(100)

    def auth(signature: str) -> AuthData:
        raw = {"cost": 1, "endpoint": "e", "reqnum": 5, "url": "u", "signature": signature}
        return AuthData(cost=1, endpoint="e", reqnum=5, request_idx=None, signature=signature, url="u",
                        extra={}, raw=raw)

    first = await verifier.verify(auth(text))
    assert first.ok and first.signature_bytes is not None and signs_reqnum(first.fmt)
    assert guard.accept(5, first.signature_bytes, signs_reqnum(first.fmt)) is None
    for other in others:
        assert not (await verifier.verify(auth(other))).ok
        # Were one to get through, the guard would still see the same request.
        same = base64.b64decode(other)
        assert guard.accept(5, same, True) == "reqnum 5 was already used"
        assert decode_signature(other) is None
