"""Classifying the model server's log lines.

This module owns the log rules: which output lines mean the model has loaded, hit an error, or died
(Vast's ``MODEL_LOAD_LOG_MSG`` / ``MODEL_ERROR_LOG_MSGS`` / ``MODEL_INFO_LOG_MSGS`` style), how a pattern is
written (a plain substring, or a regex after ``re:``), and which kind wins when several match
(FATAL > ERROR > LOADED > INFO). It runs on every output line, so everything is compiled up front and
plain substrings are checked with ``in``. Pure: no I/O.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["REGEX_PREFIX", "Kind", "Match", "Pattern", "LogRules", "split_patterns"]

REGEX_PREFIX: str = "re:"


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


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern; ``source`` is the string as configured (``re:`` prefix included)."""

    source: str
    substring: str | None
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, source: str) -> Pattern:
        """Compile ``source``; raises ValueError naming it if it is empty or an invalid regex."""
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
        assert self.regex is not None
        return self.regex.search(line) is not None


def _parse_all(sources: Iterable[str]) -> tuple[Pattern, ...]:
    return tuple(Pattern.parse(s) for s in sources)


@dataclass(frozen=True)
class LogRules:
    load: tuple[Pattern, ...] = ()
    error: tuple[Pattern, ...] = ()
    fatal: tuple[Pattern, ...] = ()
    info: tuple[Pattern, ...] = ()
    # Every pattern as (kind, source, substring, regex search), in precedence order: one flat loop per
    # line instead of nested loops and method calls.
    _flat: tuple[tuple[Kind, str, str | None, Callable[[str], object] | None], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        flat = tuple(
            (kind, p.source, p.substring, p.regex.search if p.regex is not None else None)
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
            elif search is not None and search(line) is not None:
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
