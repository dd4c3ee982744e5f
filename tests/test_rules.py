"""Tests for supervisor.rules: pattern syntax (substring, re:, json:), precedence, and splitting env values."""

from __future__ import annotations

import json
import time

import pytest

from supervisor.rules import Kind, LogRules, Match, split_patterns


def test_substring_match() -> None:
    rules = LogRules.build(load=["Application startup complete."])
    line = "INFO:     Application startup complete."
    assert rules.match(line) == Match(kind=Kind.LOADED, pattern="Application startup complete.", line=line)
    assert rules.match("INFO:     Application startup") is None


def test_substring_is_literal_and_case_sensitive() -> None:
    rules = LogRules.build(error=["CUDA out of memory (x.*)"])
    assert rules.match("torch: CUDA out of memory (x.*) tried") is not None
    assert rules.match("torch: CUDA out of memory (xyz) tried") is None
    assert rules.match("torch: cuda out of memory (x.*) tried") is None


def test_regex_patterns() -> None:
    rules = LogRules.build(error=[r"re:^ERROR .* failed$"], info=[r"re:\d+ tokens/s"])
    m = rules.match("ERROR step 3 failed")
    assert m is not None and m.kind is Kind.ERROR and m.pattern == r"re:^ERROR .* failed$"
    assert rules.match("WARN ERROR step 3 failed") is None
    assert rules.match("ERROR step 3 failed later") is None
    info = rules.match("throughput 42 tokens/s")
    assert info is not None and info.kind is Kind.INFO


def test_precedence_fatal_error_loaded_info() -> None:
    rules = LogRules.build(load=["ready"], error=["oops"], fatal=["dead"], info=["note"])
    assert rules.match("note ready oops dead").kind is Kind.FATAL  # type: ignore[union-attr]
    assert rules.match("note ready oops").kind is Kind.ERROR  # type: ignore[union-attr]
    assert rules.match("note ready").kind is Kind.LOADED  # type: ignore[union-attr]
    assert rules.match("note").kind is Kind.INFO  # type: ignore[union-attr]
    assert rules.match("nothing here") is None


def test_first_pattern_of_a_kind_is_reported() -> None:
    rules = LogRules.build(error=["Traceback", "re:Error$"])
    m = rules.match("Traceback ... ValueError")
    assert m is not None and m.pattern == "Traceback"
    m = rules.match("ValueError")
    assert m is not None and m.pattern == "re:Error$"


def test_invalid_regex_names_the_pattern() -> None:
    with pytest.raises(ValueError, match=r"re:\(unclosed"):
        LogRules.build(load=["fine"], error=["re:(unclosed"])


@pytest.mark.parametrize("bad", ["", "re:"])
def test_empty_pattern_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        LogRules.build(info=[bad])


def test_empty_rules() -> None:
    assert LogRules.build().empty
    assert LogRules.build().match("anything") is None
    assert not LogRules.build(info=["x"]).empty


def test_match_is_cheap() -> None:
    rules = LogRules.build(
        load=["Application startup complete.", "re:Uvicorn running on"],
        error=["Traceback (most recent call last)", "CUDA out of memory", "re:^ERROR\\b"],
        fatal=["Segmentation fault", "re:RuntimeError: CUDA error"],
        info=["Downloading", "re:Loading model weights took"],
    )
    line = "INFO 12-01 10:00:00 metrics.py:341] Avg prompt throughput: 0.0 tokens/s, Running: 0 reqs"
    start = time.perf_counter()
    for _ in range(100_000):
        assert rules.match(line) is None
    assert time.perf_counter() - start < 1.0


def test_split_patterns_newlines_and_literal_backslash_n() -> None:
    assert split_patterns("a\n  b  \n\n") == ("a", "b")
    assert split_patterns(r"Uvicorn running\nre:^ERROR\n") == ("Uvicorn running", "re:^ERROR")
    assert split_patterns("one\r\ntwo") == ("one", "two")
    assert split_patterns("") == ()
    assert split_patterns("  \n \\n ") == ()


def test_split_patterns_accepts_json_list() -> None:
    assert split_patterns('["a", " b ", ""]') == ("a", "b")
    # Not JSON: split as usual, brackets and all.
    assert split_patterns("[INFO] ready\n[ERROR] x") == ("[INFO] ready", "[ERROR] x")


# -- json: field tests on structured log lines

# TGI v3.3.7's router line (router/src/server.rs:2302): tracing JSON with the event flattened.
TGI_CONNECTED = ('{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","message":"Connected",'
                 '"target":"text_generation_router::server","filename":"router/src/server.rs","line_number":2302}')


def test_json_pattern_matches_fields_whatever_the_order_and_spacing() -> None:
    rules = LogRules.build(load=["json:message=Connected,target^=text_generation_router"])
    m = rules.match(TGI_CONNECTED)
    assert m is not None and m.kind is Kind.LOADED
    assert m.pattern == "json:message=Connected,target^=text_generation_router"
    # The substring the tgi backend used before matches neither this line nor the reordered one.
    assert '"message":"Connected","target":"text_generation_router"' not in TGI_CONNECTED
    reordered = '{"target": "text_generation_router", "message": "Connected", "level": "INFO"}'
    assert rules.match(reordered) is not None
    assert rules.match('{"message":"Connected","target":"text_generation_launcher"}') is None
    assert rules.match('{"message":"Connected!","target":"text_generation_router"}') is None  # = is exact
    assert rules.match('{"target":"text_generation_router"}') is None  # a missing field fails its test


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("json:msg=ready", "ready", True),
        ("json:msg=ready", "ready now", False),
        ("json:msg^=rea", "ready", True),
        ("json:msg^=eady", "ready", False),
        ("json:msg$=eady", "ready", True),
        ("json:msg$=rea", "ready", False),
        ("json:msg*=ead", "ready", True),
        ("json:msg*=xyz", "ready", False),
        ("json:msg=", "", True),  # = with nothing: the field is the empty string
    ],
)
def test_json_operators(pattern: str, value: str, matches: bool) -> None:
    line = json.dumps({"msg": value})
    assert (LogRules.build(info=[pattern]).match(line) is not None) is matches


def test_json_dotted_path_reaches_nested_fields() -> None:
    # TGI's launcher (tracing JSON without flatten_event) nests the message under `fields`.
    line = ('{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","fields":{"message":"Shard ready in 1.2s"},'
            '"target":"text_generation_launcher","span":{"rank":0,"name":"shard-manager"}}')
    assert LogRules.build(info=["json:fields.message^=Shard ready in,span.name=shard-manager"]).match(line)
    assert LogRules.build(info=["json:message^=Shard ready in"]).match(line) is None
    assert LogRules.build(info=["json:fields.message.deeper=x"]).match(line) is None  # a string has no fields


def test_json_only_string_values_compare() -> None:
    rules = LogRules.build(info=["json:line_number=2302"])
    assert rules.match(TGI_CONNECTED) is None
    assert rules.match('{"line_number":"2302"}') is not None


def test_json_line_may_have_a_prefix_and_a_tail() -> None:
    rules = LogRules.build(error=["json:level=ERROR"])
    assert rules.match('[ 8081] {"level":"ERROR","msg":"x"} (cut)') is not None
    assert rules.match('{"level":"ERROR"') is None  # cut short: not JSON
    assert rules.match("level=ERROR, but no JSON") is None
    assert rules.match('["level", "ERROR"]') is None  # JSON, not an object
    assert rules.match("{not json} level=ERROR") is None


def test_json_escaped_values_are_decoded() -> None:
    # The raw-text pre-check must not hide a value that the line spells with escapes.
    rules = LogRules.build(load=["json:message=Connected,target^=text_generation_router"])
    assert rules.match('{"message":"\\u0043onnected","target":"text_generation_router::server"}') is not None
    assert rules.match('{"message":"Conn\\"ected","target":"text_generation_router"}') is None


def test_json_value_escapes_for_commas_and_backslashes() -> None:
    rules = LogRules.build(fatal=[r"json:msg=a\,b,path=C:\\x"])
    assert rules.match(json.dumps({"msg": "a,b", "path": "C:\\x"})) is not None
    assert rules.match(json.dumps({"msg": "a", "path": "C:\\x"})) is None
    # `=` inside a value is plain text: the first `=` ends the key.
    assert LogRules.build(info=["json:msg=a=b"]).match('{"msg":"a=b"}') is not None


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("json:", "no field test"),
        ("json:message", "is not key=value"),
        ("json:=x", "empty field name"),
        ("json:a..b=x", "empty field name"),
        ("json:message^=", "empty value"),
        ("json:message=x,", "is not key=value"),  # an empty test after the comma
        (r"json:message=\x", r"write \\, for a comma"),
    ],
)
def test_bad_json_patterns_name_the_pattern(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        LogRules.build(load=[bad])
    assert repr(bad) in str(info.value)


def test_json_patterns_come_from_the_environment_like_the_others() -> None:
    # MODEL_LOAD_LOG_MSG & co. are split first; a json: pattern is one line of them.
    value = "json:message=Connected,target^=text_generation_router\nre:^ready$"
    patterns = split_patterns(value)
    assert patterns == ("json:message=Connected,target^=text_generation_router", "re:^ready$")
    rules = LogRules.build(load=patterns)
    assert rules.match(TGI_CONNECTED) is not None and rules.match("ready") is not None


def test_json_match_is_cheap_on_lines_without_the_values() -> None:
    # The raw-text pre-check keeps a busy server's ordinary lines from being parsed as JSON.
    rules = LogRules.build(load=["json:message=Connected,target^=text_generation_router"])
    line = ('{"timestamp":"2025-12-18T16:58:43.123456Z","level":"INFO","message":"Success",'
            '"target":"text_generation_router::server","filename":"router/src/server.rs","line_number":432}')
    start = time.perf_counter()
    for _ in range(100_000):
        assert rules.match(line) is None
    assert time.perf_counter() - start < 1.0
