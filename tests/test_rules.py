"""Tests for supervisor.rules: pattern syntax, precedence, and splitting env values."""

from __future__ import annotations

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
