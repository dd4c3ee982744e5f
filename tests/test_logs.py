"""Tests for supervisor.logs: JSON shape, redaction, stdlib routing, levels, console mode, reconfiguring."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import structlog

from supervisor.logs import configure_logging, get_logger
from supervisor.redact import REDACTED, Redactor

HF = "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ"
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back so other tests see the defaults."""
    root = logging.getLogger()
    saved_handlers = list(root.handlers)
    saved_level = root.level
    saved_levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    structlog.reset_defaults()
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def parse(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def setup(level: str = "info", fmt: str = "json", secrets: tuple[str, ...] = (HF,)) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(fmt, level, Redactor(secrets), stream)
    return stream


def test_json_shape_and_key_order() -> None:
    stream = setup()
    before = datetime.now(timezone.utc)
    get_logger("shepherd.child").info("model.log", stream="stdout", line="hello", n=3)
    after = datetime.now(timezone.utc)
    [record] = parse(stream)
    assert list(record)[:4] == ["timestamp", "level", "logger", "event"]
    assert record["level"] == "info"
    assert record["logger"] == "shepherd.child"
    assert record["event"] == "model.log"
    assert record["stream"] == "stdout" and record["line"] == "hello" and record["n"] == 3
    assert TIMESTAMP_RE.match(record["timestamp"]), record["timestamp"]
    stamp = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1)


def test_one_json_object_per_line_even_with_newlines_in_fields() -> None:
    stream = setup()
    get_logger("t").warning("multi\nline", line="a\nb")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["line"] == "a\nb"


def test_token_in_line_field_is_redacted() -> None:
    stream = setup()
    log = get_logger("shepherd.child")
    log.info("model.log", line=f"using token {HF} for download", headers={"authorization": "Bearer abcdefghijkl1234"})
    log.info(f"event text with {HF}")
    text = stream.getvalue()
    assert HF not in text and "abcdefghijkl1234" not in text
    first, second = parse(stream)
    assert first["line"] == f"using token hf_a{REDACTED} for download"
    assert first["headers"] == {"authorization": f"Bearer abcd{REDACTED}"}
    assert second["event"] == f"event text with hf_a{REDACTED}"


def test_exception_formatted_and_redacted() -> None:
    stream = setup()
    try:
        raise RuntimeError(f"bad token {HF}")
    except RuntimeError:
        get_logger("t").exception("failed")
    [record] = parse(stream)
    assert record["level"] == "error"
    assert "RuntimeError: bad token hf_a" in record["exception"]
    assert HF not in stream.getvalue()


def test_stdlib_loggers_routed_through_same_renderer() -> None:
    stream = setup()
    logging.getLogger("hypercorn.error").info("Running on %s", "http://0.0.0.0:3000")
    logging.getLogger("hypercorn.access").warning("GET /x?t=%s 401", HF)
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("quart.app").exception("handler crashed")
    run, access, crash = parse(stream)
    assert list(run)[:4] == ["timestamp", "level", "logger", "event"]
    assert run["logger"] == "hypercorn.error" and run["level"] == "info"
    assert run["event"] == "Running on http://0.0.0.0:3000"
    assert TIMESTAMP_RE.match(run["timestamp"])
    assert access["logger"] == "hypercorn.access" and access["level"] == "warning"
    assert access["event"] == f"GET /x?t=hf_a{REDACTED} 401"
    assert crash["logger"] == "quart.app" and "ZeroDivisionError" in crash["exception"]


def test_httpx_info_suppressed_warnings_kept() -> None:
    stream = setup(level="debug")
    logging.getLogger("httpx").info('HTTP Request: GET http://x "HTTP/1.1 200 OK"')
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("httpx").warning("retrying")
    get_logger("t").debug("debug kept")
    events = [(r["logger"], r["event"]) for r in parse(stream)]
    assert events == [("httpx", "retrying"), ("t", "debug kept")]


def test_level_filters_structlog_and_stdlib() -> None:
    stream = setup(level="warning")
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("hypercorn.error").info("stdlib info")
    logging.getLogger("hypercorn.error").error("stdlib error")
    assert [r["event"] for r in parse(stream)] == ["w", "e", "stdlib error"]


def test_contextvars_merged() -> None:
    stream = setup()
    structlog.contextvars.bind_contextvars(request_id="r-1")
    try:
        get_logger("t").info("proxied")
        logging.getLogger("hypercorn.access").info("access")
    finally:
        structlog.contextvars.clear_contextvars()
    assert [r.get("request_id") for r in parse(stream)] == ["r-1", "r-1"]


def test_console_mode_is_human_text() -> None:
    stream = setup(fmt="console")
    get_logger("shepherd.child").info("model loaded", seconds=12)
    text = stream.getvalue()
    assert "model loaded" in text and "seconds=12" in text and "shepherd.child" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    assert "\x1b[" not in text  # no colours when the stream is not a terminal


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_picks_console_on_tty_and_json_otherwise() -> None:
    tty = FakeTTY()
    configure_logging("auto", "info", Redactor(), tty)
    get_logger("t").info("hello tty")
    assert "hello tty" in tty.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(tty.getvalue().splitlines()[0])

    pipe = io.StringIO()
    configure_logging("auto", "info", Redactor(), pipe)
    get_logger("t").info("hello pipe")
    assert parse(pipe)[0]["event"] == "hello pipe"


def test_reconfigure_replaces_handlers_and_follows_early_loggers() -> None:
    early = get_logger("early")  # created before any configuration, as module-level loggers are
    first = setup()
    second = setup()
    early.info("once")
    logging.getLogger("hypercorn.error").info("stdlib once")
    assert first.getvalue() == ""
    assert [r["event"] for r in parse(second)] == ["once", "stdlib once"]
    ours = [h for h in logging.getLogger().handlers if type(h).__module__ == "supervisor.logs"]
    assert len(ours) == 1


def test_non_utf8_stream_gets_ascii_json() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii", write_through=True)
    configure_logging("json", "info", Redactor(), stream)
    get_logger("t").info("model.log", line="caf\u00e9 \ufffd")
    stream.flush()
    record = json.loads(raw.getvalue().decode("ascii"))
    assert record["line"] == "caf\u00e9 \ufffd"


def test_lone_surrogate_still_logged() -> None:
    stream = setup()
    get_logger("t").info("model.log", line="bad \udcff byte")
    [record] = parse(stream)
    assert record["line"] == "bad \udcff byte"


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", "info", Redactor(), io.StringIO())
    with pytest.raises(ValueError):
        configure_logging("json", "loud", Redactor(), io.StringIO())


def test_fast_enough() -> None:
    stream = setup()
    log = get_logger("shepherd.child")
    n = 20_000
    start = time.perf_counter()
    for i in range(n):
        log.info("model.log", stream="stdout", line=f"INFO engine step {i} took 12ms")
    elapsed = time.perf_counter() - start
    assert stream.getvalue().count("\n") == n
    # 100k events must take at most a couple of seconds: 20k in well under one.
    assert elapsed < 1.0, elapsed
