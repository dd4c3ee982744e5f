r"""Classifying the model server's log lines.

This module owns the log rules: which output lines mean the model has loaded, hit an error, or died
(Vast's ``MODEL_LOAD_LOG_MSG`` / ``MODEL_ERROR_LOG_MSGS`` / ``MODEL_INFO_LOG_MSGS`` style), how a pattern is
written, and which kind wins when several match (FATAL > ERROR > LOADED > INFO). It runs on every output
line, so everything is compiled up front and plain substrings are checked with ``in``. Pure: no I/O.

A pattern is one of:

- a plain substring (case-sensitive): ``Application startup complete.``
- a regex after ``re:``, searched anywhere in the line: ``re:^ERROR \d+``
- field tests on a JSON log line after ``json:``, comma-separated, all of which must hold:
  ``json:message=Connected,target^=text_generation_router``. The line's JSON object starts at its first
  ``{``. A key is a field name, or a dotted path into nested objects (``fields.message``, the shape of
  tracing's JSON without ``flatten_event``). The operators are CSS's attribute selectors: ``=`` equals,
  ``^=`` starts with, ``*=`` contains, ``$=`` ends with; only string values are compared (a number or an
  object never matches). A value runs to the next comma; write ``\,`` for a comma and ``\\`` for a
  backslash inside it. Field tests exist because structured loggers do not promise a key order or a
  fixed ``target`` (TGI 2.1+ logs the module path ``text_generation_router::server`` where 2.0 logged
  ``text_generation_router``), which a substring of the raw line cannot follow.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REGEX_PREFIX", "JSON_PREFIX", "Kind", "Match", "FieldTest", "JsonPattern", "Pattern", "LogRules",
           "split_patterns"]

REGEX_PREFIX: str = "re:"
JSON_PREFIX: str = "json:"


class Kind(enum.Enum):
    LOADED = "loaded"
    ERROR = "error"
    FATAL = "fatal"
    INFO = "info"


@dataclass(frozen=True)
class Match:
    kind: Kind
    pattern: str
    line: str


# `^=` starts with, `*=` contains, `$=` ends with (CSS's attribute selectors); plain `=` equals.
_OPERATOR_MARKS: str = "^*$"
_DECODER: json.JSONDecoder = json.JSONDecoder()


@dataclass(frozen=True)
class FieldTest:
    """One ``key<op>value`` test of a ``json:`` pattern."""

    path: tuple[str, ...]
    op: str
    value: str

    def holds(self, record: dict[str, Any]) -> bool:
        node: Any = record
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        if not isinstance(node, str):
            return False
        if self.op == "=":
            return node == self.value
        if self.op == "^=":
            return node.startswith(self.value)
        if self.op == "$=":
            return node.endswith(self.value)
        return self.value in node  # "*="


def _split_tests(body: str, source: str) -> list[str]:
    """Split at unescaped commas, resolving ``\\,`` and ``\\\\``."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(body)
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, "")
            if escaped not in (",", "\\"):
                raise ValueError(f"in log pattern {source!r}: write \\, for a comma and \\\\ for a backslash")
            current.append(escaped)
        elif ch == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class JsonPattern:
    """A ``json:`` pattern: field tests on the JSON object a line holds."""

    tests: tuple[FieldTest, ...]
    # Text that must appear in the raw line for the tests to hold, checked before any JSON is parsed
    # (see `search`).
    needles: tuple[str, ...]

    @classmethod
    def parse(cls, source: str) -> JsonPattern:
        body = source[len(JSON_PREFIX) :]
        if not body:
            raise ValueError(f"no field test in log pattern {source!r}")
        tests: list[FieldTest] = []
        for part in _split_tests(body, source):
            # The first `=` ends the operator (keys hold no `=`; values may), and the character before
            # it says which operator.
            eq = part.find("=")
            if eq < 0:
                raise ValueError(f"in log pattern {source!r}: {part!r} is not key=value, key^=, key*= or key$=")
            op = part[eq - 1 : eq + 1] if eq > 0 and part[eq - 1] in _OPERATOR_MARKS else "="
            key = part[: eq + 1 - len(op)].strip()
            value = part[eq + 1 :]
            path = tuple(key.split("."))
            if not key or not all(path):
                raise ValueError(f"in log pattern {source!r}: empty field name in {part!r}")
            if op != "=" and not value:
                # "starts with nothing" holds for every string: almost surely a mistake.
                raise ValueError(f"in log pattern {source!r}: empty value after {op!r} in {part!r}")
            tests.append(FieldTest(path=path, op=op, value=value))
        return cls(tests=tuple(tests), needles=tuple(t.value for t in tests if t.value))

    def search(self, line: str) -> bool:
        # The cheap pass first, so that the lines of a chatty server cost one `in` per needle, not a JSON
        # parse. It is exact: a line without a backslash holds no JSON escape, so each string value
        # appears in it verbatim, and so does any part of one that a test asks for. A line with a
        # backslash may spell a value with escapes (`\u0043onnected`): parse it.
        if "\\" not in line:
            for needle in self.needles:
                if needle not in line:
                    return False
        start = line.find("{")
        if start < 0:
            return False
        try:
            # raw_decode: text after the object (a cut marker, a trailing comment) is ignored.
            record, _end = _DECODER.raw_decode(line, start)
        except ValueError:
            return False
        if not isinstance(record, dict):
            return False
        return all(test.holds(record) for test in self.tests)


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``source`` is the string as configured (``re:``/``json:`` prefix included)."""

    source: str
    substring: str | None
    regex: re.Pattern[str] | None
    fields: JsonPattern | None = None

    @classmethod
    def parse(cls, source: str) -> Pattern:
        """Compile ``source``; raises ValueError naming it if it is empty, an invalid regex or bad field tests."""
        if source.startswith(JSON_PREFIX):
            return cls(source=source, substring=None, regex=None, fields=JsonPattern.parse(source))
        if source.startswith(REGEX_PREFIX):
            expression = source[len(REGEX_PREFIX) :]
            if not expression:
                raise ValueError(f"empty regex in log pattern {source!r}")
            try:
                return cls(source=source, substring=None, regex=re.compile(expression))
            except re.error as e:
                raise ValueError(f"invalid regex in log pattern {source!r}: {e}") from None
        if not source:
            # An empty substring would match every line.
            raise ValueError("empty log pattern")
        return cls(source=source, substring=source, regex=None)

    def matches(self, line: str) -> bool:
        if self.substring is not None:
            return self.substring in line
        if self.fields is not None:
            return self.fields.search(line)
        assert self.regex is not None
        return self.regex.search(line) is not None

    @property
    def search(self) -> Callable[[str], object] | None:
        """The test of a regex or ``json:`` pattern, truthy when a line matches; None for a substring."""
        if self.regex is not None:
            return self.regex.search
        if self.fields is not None:
            return self.fields.search
        return None


def _parse_all(sources: Iterable[str]) -> tuple[Pattern, ...]:
    return tuple(Pattern.parse(s) for s in sources)


@dataclass(frozen=True)
class LogRules:
    load: tuple[Pattern, ...] = ()
    error: tuple[Pattern, ...] = ()
    fatal: tuple[Pattern, ...] = ()
    info: tuple[Pattern, ...] = ()
    # Every pattern as (kind, source, substring, search), in precedence order: one flat loop per line
    # instead of nested loops and method calls. `search` is a regex's or a `json:` pattern's test.
    _flat: tuple[tuple[Kind, str, str | None, Callable[[str], object] | None], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        flat = tuple(
            (kind, p.source, p.substring, p.search)
            for kind, patterns in (
                (Kind.FATAL, self.fatal),
                (Kind.ERROR, self.error),
                (Kind.LOADED, self.load),
                (Kind.INFO, self.info),
            )
            for p in patterns
        )
        object.__setattr__(self, "_flat", flat)

    @classmethod
    def build(
        cls,
        load: Iterable[str] = (),
        error: Iterable[str] = (),
        fatal: Iterable[str] = (),
        info: Iterable[str] = (),
    ) -> LogRules:
        """Compile the pattern strings; raises ValueError naming the first bad one."""
        return cls(load=_parse_all(load), error=_parse_all(error), fatal=_parse_all(fatal), info=_parse_all(info))

    def match(self, line: str) -> Match | None:
        """The highest-precedence rule ``line`` matches (the first such pattern of that kind), or None."""
        for kind, source, substring, search in self._flat:
            if substring is not None:
                if substring in line:
                    return Match(kind=kind, pattern=source, line=line)
            # A regex answers a Match (always truthy) or None; a `json:` pattern answers a bool.
            elif search is not None and search(line):
                return Match(kind=kind, pattern=source, line=line)
        return None

    @property
    def empty(self) -> bool:
        """No pattern of any kind is configured."""
        return not self._flat


def split_patterns(value: str) -> tuple[str, ...]:
    """Split an environment value holding several patterns.

    Patterns are separated by newlines or by a literal two-character ``\\n`` (as people write it in env
    files); each is stripped and empty ones are dropped. A value that is a JSON list of strings is
    accepted as well.
    """
    stripped = value.strip()
    if stripped.startswith("["):
        try:
            parsed = json.loads(stripped)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed):
            return tuple(p.strip() for p in parsed if p.strip())
    parts = value.replace("\\n", "\n").split("\n")
    return tuple(p.strip() for p in parts if p.strip())
