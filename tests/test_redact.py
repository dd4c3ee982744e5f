"""Tests for supervisor.redact: secret values, secret shapes, and the structlog processor."""

from __future__ import annotations

import string
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.redact import REDACTED, Redactor, mask, redact_event

HF = "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ"
MASTER = "m4ster-t0ken-0123456789"


def test_secret_masked_to_prefix() -> None:
    r = Redactor([HF])
    assert r.redact(f"downloading with {HF} now") == f"downloading with hf_a{REDACTED} now"


def test_mask_never_shows_a_short_secret_in_full() -> None:
    assert mask("abcdefghijklmnop") == "abcd" + REDACTED
    assert mask("abcdef") == "a" + REDACTED
    assert mask("abc") == REDACTED


def test_every_occurrence_and_every_secret() -> None:
    r = Redactor([HF, MASTER])
    out = r.redact(f"{HF}{MASTER} {HF}")
    assert HF not in out and MASTER not in out
    assert out == f"hf_a{REDACTED}m4st{REDACTED} hf_a{REDACTED}"


def test_longest_secret_wins() -> None:
    short, long = "abcdef123456", "abcdef123456-extended"
    r = Redactor([short, long])
    assert r.redact(f"x {long} y") == f"x abcd{REDACTED} y"
    assert "extended" not in r.redact(long)


def test_add_rebuilds() -> None:
    r = Redactor()
    assert r.redact(f"t={MASTER}") == f"t={MASTER}"
    r.add(MASTER)
    assert r.redact(f"t={MASTER}") == f"t=m4st{REDACTED}"
    r.add("")  # ignored, would otherwise match everywhere
    assert r.redact("plain text") == "plain text"


def test_regex_metacharacters_in_secret_are_literal() -> None:
    secret = "a.b*c+d?(e)[f]"
    r = Redactor([secret])
    assert r.redact(f"x {secret} y") == f"x a.b{REDACTED} y"
    assert r.redact("x aXbbbcdde y") == "x aXbbbcdde y"


def test_from_environ_picks_secret_variables() -> None:
    env = {
        "MASTER_TOKEN": MASTER,
        "HF_TOKEN": HF,
        "HUGGING_FACE_HUB_TOKEN": "hub-token-value",
        "WANDB_API_KEY": "wandb-key-value",
        "DB_PASSWORD": "hunter2hunter2",
        "AWS_SECRET": "aws-secret-value",
        "SHORT_TOKEN": "abc",  # too short
        "TLS_KEY": "/etc/instance.key",  # a path, not a key
        "MODEL_NAME": "meta-llama/Llama-3-8B",  # not a secret name
    }
    r = Redactor.from_environ(env)
    assert set(r.secrets) == {
        MASTER,
        HF,
        "hub-token-value",
        "wandb-key-value",
        "hunter2hunter2",
        "aws-secret-value",
    }
    assert r.redact("meta-llama/Llama-3-8B abc /etc/instance.key") == "meta-llama/Llama-3-8B abc /etc/instance.key"
    assert "hunter2hunter2" not in r.redact("pw hunter2hunter2")


def test_bearer_and_authorization_keep_scheme() -> None:
    r = Redactor()
    assert r.redact("Authorization: Bearer abcdefghijklmnop") == f"Authorization: Bearer abcd{REDACTED}"
    assert r.redact("authorization=Basic dXNlcjpwYXNzd29yZA==;") == f"authorization=Basic dXNl{REDACTED};"
    assert r.redact("'Authorization': 'Token zzzzyyyyxxxx'") == f"'Authorization': 'Token zzz{REDACTED}'"
    assert r.redact("Authorization: rawtokenvalue1234") == f"Authorization: rawt{REDACTED}"
    assert r.redact("sent bearer eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl") == f"sent bearer eyJh{REDACTED}"


def test_signature_values() -> None:
    r = Redactor()
    sig = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo+/w=="
    assert r.redact(f'{{"signature": "{sig}", "cost": 1}}') == f'{{"signature": "QUJD{REDACTED}", "cost": 1}}'
    assert r.redact(f"url?signature={sig}&x=1") == f"url?signature=QUJD{REDACTED}&x=1"
    assert r.redact(f"{{'signature': '{sig}'}}") == f"{{'signature': 'QUJD{REDACTED}'}}"
    assert sig not in r.redact(f"Signature: {sig}")


def test_plain_text_unchanged() -> None:
    r = Redactor([HF])
    text = "INFO 12-01 engine started; signatures verified, bearer of news, no authorization needed"
    assert r.redact(text) == text


def test_redaction_is_idempotent() -> None:
    r = Redactor([HF])
    once = r.redact(f"Authorization: Bearer {HF} signature=abcdefgh12345678 Bearer qwertyuiop12")
    assert r.redact(once) == once


def test_fast_on_ordinary_lines() -> None:
    r = Redactor([HF, MASTER, "another-secret-value"])
    line = "INFO 12-01 10:00:00 engine step 1234 took 12ms, 56 tokens/s, queue 3"
    start = time.perf_counter()
    for _ in range(100_000):
        r.redact(line)
    assert time.perf_counter() - start < 1.0


# Token-like secrets (what MASTER_TOKEN, HF_TOKEN and API keys look like), in any surrounding text,
# including text that looks like an Authorization header or a signature around them.
token_secret = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=6, max_size=40)
context = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["Authorization: ", "authorization: Bearer ", "Bearer ", "signature=", '"signature": "']),
)


@settings(max_examples=150, deadline=None)
@given(secret=token_secret, before=context, after=st.one_of(st.text(max_size=30), st.just(" rejected")))
def test_secret_never_survives(secret: str, before: str, after: str) -> None:
    r = Redactor([secret])
    assert secret not in r.redact(before + secret + after)


# Bearer tokens shorter than 8 characters are deliberately left alone (prose: "bearer of news").
@settings(max_examples=150, deadline=None)
@given(
    secret=st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=8, max_size=40),
    lead=st.sampled_from(["Authorization: ", "authorization=", "Bearer ", "signature: "]),
)
def test_unknown_token_in_secret_shape_never_survives(secret: str, lead: str) -> None:
    assert secret not in Redactor().redact(f"{lead}{secret} rejected")


def test_raw_token_after_authorization_is_not_taken_for_a_scheme() -> None:
    r = Redactor()
    assert r.redact("authorization: abcdef123456 rejected") == f"authorization: abc{REDACTED} rejected"


def test_known_secret_in_a_lead_in_is_masked() -> None:
    r = Redactor(["Bearer"])  # absurd, but a secret must never pass through the kept part
    assert "Bearer" not in r.redact("Authorization: Bearer abcdefghijkl")


def test_processor_redacts_nested_values() -> None:
    class Url:
        def __str__(self) -> str:
            return f"https://host/x?token={MASTER}"

    proc = redact_event(Redactor([MASTER, HF]))
    event = {
        "event": f"got {HF}",
        "line": f"MASTER_TOKEN={MASTER}",
        "n": 3,
        "ok": True,
        "nested": {"headers": [("authorization", "Bearer abcdefghijklmnop")], "t": (MASTER,)},
        "url": Url(),
        "other": 1.5,
    }
    out = proc(None, "info", event)
    assert out["event"] == f"got hf_a{REDACTED}"
    assert out["line"] == f"MASTER_TOKEN=m4st{REDACTED}"
    assert out["n"] == 3 and out["ok"] is True and out["other"] == 1.5
    assert out["nested"] == {"headers": [("authorization", f"Bearer abcd{REDACTED}")], "t": (f"m4st{REDACTED}",)}
    assert out["url"] == f"https://host/x?token=m4st{REDACTED}"


def test_processor_keeps_harmless_objects() -> None:
    class Thing:
        def __str__(self) -> str:
            return "harmless"

    thing = Thing()
    out = redact_event(Redactor([MASTER]))(None, "info", {"event": "x", "thing": thing})
    assert out["thing"] is thing
