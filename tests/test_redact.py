"""Tests for supervisor.redact: secret values, secret shapes (bare signatures, API keys, environment-style
assignments, Hugging Face tokens included), and the structlog processor."""

from __future__ import annotations

import base64
import random
import string
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from supervisor.redact import REDACTED, Redactor, looks_like_signature, mask, redact_event

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
    assume(secret not in lead)  # "signatur" is in "signature: " whatever happens to the value
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


# ---------------------------------------------------------------------------------------------
# Shapes added for public answers (issue 8, finding 6): bare signatures, API-key fields,
# environment-style assignments, Hugging Face tokens.

B64_ALPHABET = string.ascii_letters + string.digits + "+/"


def signature_of(seed: int, size: int = 256) -> str:
    """The base64 text of `size` random bytes: what an RSA signature of `size * 8` bits looks like."""
    return base64.b64encode(random.Random(seed).randbytes(size)).decode()


def test_a_real_rsa_2048_signature_is_masked_without_a_lead_in() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sig = base64.b64encode(key.sign(b'{"url": "http://1.2.3.4:4000"}', padding.PKCS1v15(), hashes.SHA256())).decode()
    assert len(sig) == 344
    out = Redactor().redact(f"rejected request with {sig} from 10.0.0.7")
    assert out == f"rejected request with {sig[:4]}{REDACTED} from 10.0.0.7"


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    size=st.sampled_from([256, 384, 512]),  # RSA 2048, 3072, 4096
    before=st.text(max_size=30),
    after=st.text(max_size=30),
)
def test_bare_signature_never_survives(seed: int, size: int, before: str, after: str) -> None:
    sig = signature_of(seed, size)
    # a space on either side: text glued to the run would be part of it (and is covered below)
    out = Redactor().redact(f"{before} {sig} {after}")
    assert sig not in out
    assert sig[4:40] not in out  # not even a long piece of it


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), size=st.sampled_from([256, 384, 512]))
def test_random_signatures_always_have_the_shape(seed: int, size: int) -> None:
    sig = signature_of(seed, size)
    assert looks_like_signature(sig)
    assert looks_like_signature(sig.rstrip("="))


def test_ed25519_sized_signature_is_masked() -> None:
    sig = "Yb5qJ3n8Kc+Tz0pQ/wL4sRd7VmXe1Hf9GaUo2NkBiE6ZhCyMlW5tS8rAvDgJxPqK0nOe3IuF7cLbY4Tz2Wm9Bg=="
    assert len(sig) == 88
    assert sig not in Redactor().redact(f"sig={sig}")
    assert Redactor().redact(f"bad sig {sig}") == f"bad sig Yb5q{REDACTED}"


@settings(max_examples=200, deadline=None)
@given(digest=st.binary(min_size=16, max_size=64), upper=st.booleans(), sep=st.sampled_from(["", "/", " "]))
def test_hex_digests_are_not_masked(digest: bytes, upper: bool, sep: str) -> None:
    hexed = digest.hex().upper() if upper else digest.hex()
    text = f"snapshots{sep}{hexed}{sep}{hexed}"
    assert Redactor().redact(text) == text


ORDINARY_LONG_TEXT = [
    "/root/.cache/huggingface/hub/models--meta-llama--Meta-Llama-3-8B-Instruct/snapshots/"
    "5f0b02c75b57c5855da9ae460ce51323ea669d8a/config.json",
    "Loading /workspace/ComfyUI/models/checkpoints/sdxl/juggernautXL/v9/RunDiffusionPhoto2 done",
    "NousResearch/Hermes2ProLlama3/snapshots/0a1b2c3d4e5f60718293a4b5c6d7e8f901234567/tokenizer",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "ThisIsAVeryLongCamelCaseIdentifierThatSomeFrameworksLikeToPrintWhenTheyStart2024",
    "Qwen2ForConditionalGenerationWithMultimodalProjectorAndVisionTowerV2XLModelHTTPSConnectionPool",
    "sha256:" + "0123456789abcdef" * 8,
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",  # the alphabet itself
    "Namespace(api_key=None, served_model_name=EMPTY, hf_overrides={})",
    "vllm serve model --api-key EMPTY",
    "tokenizer: eos_token: </s> pad_token=<|endoftext|> bos_token_id=1",
    "TLS_KEY=/etc/instance.key MODEL_KEY: /models/key.pem",
    "using hf_transfer to download; hf_hub offline=False",
]


def test_ordinary_long_text_is_not_masked() -> None:
    r = Redactor()
    for text in ORDINARY_LONG_TEXT:
        assert r.redact(text) == text


def test_looks_like_signature_rules() -> None:
    sig = signature_of(7)
    assert looks_like_signature(sig)
    assert not looks_like_signature(sig[:63])  # too short
    assert not looks_like_signature(sig.lower())  # no upper case
    assert not looks_like_signature(sig.upper())  # no lower case
    assert not looks_like_signature("".join(c for c in sig if not c.isdigit()) * 2)  # no digit
    assert not looks_like_signature("/".join(sig[i:i + 8] for i in range(0, 200, 8)))  # path-like


API_KEY_LEADS = [
    "X-Api-Key: ", "x-api-key: ", "X-API-KEY:", "api-key: ", "Api-Key=", "x-api-key=", "api_key=", "API_KEY=",
    "apikey=", "api%5Fkey=", "Api%5fKey=", "openai_api_key=", "'x-api-key': '", '"X-Api-Key": "', "x_api_key = ",
]


@settings(max_examples=300, deadline=None)
@given(
    lead=st.sampled_from(API_KEY_LEADS),
    key=st.text(alphabet=string.ascii_letters + string.digits + "-_.~+/", min_size=6, max_size=60),
    before=st.sampled_from(["", "GET /v1/models?", "headers: {", "request "]),
    after=st.sampled_from(["", "&model=x", "' }", " rejected", ", next", ")"]),
)
def test_api_key_values_never_survive(lead: str, key: str, before: str, after: str) -> None:
    assume(key not in lead and key not in before and key not in after)
    out = Redactor().redact(f"{before}{lead}{key}{after}")
    assert key not in out
    assert out.startswith(before + lead)  # the field name is kept: the reader knows what was there


def test_api_key_examples() -> None:
    r = Redactor()
    assert r.redact("X-Api-Key: sk-abcdef123456") == f"X-Api-Key: sk-{REDACTED}"
    assert r.redact("GET /g?api_key=abcdef123456&model=llama") == f"GET /g?api_key=abc{REDACTED}&model=llama"
    assert r.redact("GET /generate?api%5Fkey=abcdef123456") == f"GET /generate?api%5Fkey=abc{REDACTED}"
    assert r.redact("{'x-api-key': 'abcdef123456'}") == f"{{'x-api-key': 'abc{REDACTED}'}}"


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(r"[A-Z][A-Z0-9_]{0,12}_(TOKEN|SECRET|PASSWORD|KEY)", fullmatch=True),
    value=st.text(alphabet=string.ascii_letters + string.digits + "-_.~+/=:@", min_size=6, max_size=60),
    sep=st.sampled_from(["=", ": ", "='", '="', " = "]),
)
def test_environment_style_assignments_never_survive(name: str, value: str, sep: str) -> None:
    assume(not value.startswith("/") and value not in name)
    out = Redactor().redact(f"env {name}{sep}{value} set")
    assert value not in out
    assert out.startswith(f"env {name}{sep}")


def test_hf_token_is_masked_anywhere() -> None:
    token = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f"
    r = Redactor()
    assert r.redact(f"401 for token {token}.") == f"401 for token hf_a{REDACTED}."
    assert r.redact(f"HF_TOKEN={token}") == f"HF_TOKEN=hf_a{REDACTED}"
    assert token not in r.redact(f"{{'token': '{token}'}}")


def test_percent_encoded_signature_is_masked_whole() -> None:
    out = Redactor().redact("POST /generate?signature=abcd%2Befgh%2Fijkl%3D%3D&cost=1")
    assert out == f"POST /generate?signature=abcd{REDACTED}&cost=1"


def test_new_shapes_are_idempotent() -> None:
    r = Redactor()
    text = (
        f"X-Api-Key: abcdef123456 HF_TOKEN=hf_{'a1B2' * 9} sig {signature_of(3)} "
        "MY_SECRET=hunter2hunter2 api%5Fkey=zzzzzzzz"
    )
    once = r.redact(text)
    assert REDACTED in once and r.redact(once) == once


def test_a_known_secret_inside_a_non_signature_run_is_masked() -> None:
    secret = "Zq9XyZq9XyZq9Xy0"  # letters and digits only: it joins the run around it
    r = Redactor([secret])
    path = "models/checkpoints/" + "a" * 60 + secret + "b" * 10
    out = r.redact(path)
    assert secret not in out and out.startswith("models/checkpoints/" + "a" * 60 + "Zq9X")


def test_from_environ_adds_extra_secrets() -> None:
    r = Redactor.from_environ({"HOME": "/root"}, extra=(MASTER, None, ""))
    assert r.secrets == (MASTER,)
    assert MASTER not in r.redact(f"token {MASTER}")
