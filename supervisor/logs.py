"""Logging setup: one JSON object per line on stdout, for shepherd and for the libraries it uses.

This module owns the shape of shepherd's log output (``timestamp`` in ISO 8601 UTC, ``level``, ``logger``,
``event``, then the event's fields), the choice between JSON and human console rendering, level
filtering, redaction of secrets in every event, and the routing of stdlib ``logging`` records (hypercorn,
httpx, quart) through the same renderer. structlog events take the fast path (a filtering bound logger
writing straight to the stream); stdlib records go through ``structlog.stdlib.ProcessorFormatter`` on a
handler attached to the root logger. Both write whole lines to one sink, flushed per line.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from supervisor.redact import Redactor, redact_event

try:
    import orjson
except ImportError:  # optional: the stdlib json module is the fallback
    orjson = None  # type: ignore[assignment]

__all__ = ["LEVELS", "configure_logging", "get_logger"]

FORMATS: tuple[str, ...] = ("auto", "json", "console")

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Libraries that log every request at INFO; at WARNING they only speak up when something is wrong.
_CHATTY_LOGGERS: tuple[str, ...] = ("httpx", "httpcore")

# The keys every line starts with, in this order; the event's own fields follow.
_LEADING_KEYS: tuple[str, ...] = ("timestamp", "level", "logger", "event")


class _LineSink:
    """Writes whole lines to a text stream and flushes each one (containers read stdout live).

    Serves both as structlog's logger (every method takes the rendered line; ``name`` is what
    ``add_logger_name`` reads) and as the stdlib handler's output. All sinks made with ``named`` share
    one lock, so lines never interleave mid-line.
    """

    def __init__(self, stream: TextIO, name: str = "", lock: threading.Lock | None = None) -> None:
        self.stream: TextIO = stream
        self.name: str = name
        self._lock: threading.Lock = lock if lock is not None else threading.Lock()

    def named(self, name: str) -> _LineSink:
        return _LineSink(self.stream, name, self._lock)

    def msg(self, message: str) -> None:
        with self._lock:
            try:
                try:
                    self.stream.write(message + "\n")
                except UnicodeEncodeError:
                    # A non-UTF-8 stdout (console rendering, LANG=C): escape rather than lose the line.
                    encoding = getattr(self.stream, "encoding", None) or "ascii"
                    safe = message.encode(encoding, "backslashreplace").decode(encoding)
                    self.stream.write(safe + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                # stdout gone (closed pipe, closed file): losing a log line must not take the
                # supervisor down with it.
                pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _SinkHandler(logging.Handler):
    """Root-logger handler writing formatted stdlib records to the sink; also marks our handler so a
    second configure_logging replaces it instead of adding another."""

    def __init__(self, sink: _LineSink, level: int) -> None:
        super().__init__(level)
        self.sink: _LineSink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.sink.msg(line)


class _SinkFactory:
    """structlog logger factory: ``get_logger(name)`` gets a sink named ``name`` (one per name, reused,
    because uncached loggers call the factory on every event)."""

    def __init__(self, sink: _LineSink) -> None:
        self._sink: _LineSink = sink
        self._named: dict[str, _LineSink] = {}

    def __call__(self, *args: Any) -> _LineSink:
        name = str(args[0]) if args else ""
        named = self._named.get(name)
        if named is None:
            named = self._named[name] = self._sink.named(name)
        return named


def _order_keys(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Humans and log viewers read the first keys; keep them in a fixed place.
    ordered: dict[str, Any] = {}
    for key in _LEADING_KEYS:
        if key in event_dict:
            ordered[key] = event_dict.pop(key)
    ordered.update(event_dict)
    return ordered


def _json_dumps(stream: TextIO) -> Callable[..., str]:
    """The fastest serializer that is safe for ``stream``."""
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("_", "-")
    utf8 = encoding in ("utf-8", "utf8")

    def stdlib_dumps(obj: Any, **_: Any) -> str:
        # ASCII output is valid on any stdout encoding and survives lone surrogates.
        return json.dumps(obj, default=str, ensure_ascii=True)

    if orjson is None or not utf8:
        return stdlib_dumps

    options = orjson.OPT_NON_STR_KEYS

    def fast_dumps(obj: Any, **_: Any) -> str:
        try:
            return orjson.dumps(obj, default=str, option=options).decode("utf-8")
        except (TypeError, orjson.JSONEncodeError):
            # orjson refuses a few things json accepts (lone surrogates, ints over 64 bits).
            return stdlib_dumps(obj)

    return fast_dumps


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def configure_logging(fmt: str, level: str, redactor: Redactor, stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging to write to ``stream`` (default: stdout).

    ``fmt``: "auto" (console on a TTY, else JSON), "json" or "console". ``level``: a level name, applied
    to structlog events and stdlib records alike. Safe to call again: the previous setup is replaced.
    """
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    level_no = LEVELS.get(level.strip().lower())
    if level_no is None:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    out: TextIO = stream if stream is not None else sys.stdout
    console = fmt == "console" or (fmt == "auto" and _is_tty(out))

    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(out))
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_dumps(out))

    # Exceptions and stacks are formatted before redaction, so a secret in a traceback is masked too.
    # The fields added after redaction (level, logger name, timestamp) are ours and hold no secrets.
    finish: list[Processor] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact_event(redactor),
    ]
    annotate: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Processor] = [_order_keys, renderer]

    sink = _LineSink(out)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *finish, *annotate, *render],
        # Filtering happens in the bound logger's methods: a filtered-out call costs next to nothing.
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=_SinkFactory(sink),
        # Not cached, so that loggers created at import time follow a later configure_logging.
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, *annotate],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish, *render],
    )
    handler = _SinkHandler(sink, level_no)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SinkHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_no)
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger whose events carry ``logger=name``.

    Lazy: it can be created at import time and follows the latest configure_logging.
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
