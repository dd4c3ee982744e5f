"""Keeping secrets out of logs.

This module owns the rule for what counts as a secret in shepherd's output and how it is masked: the
values of secret-looking environment variables (``MASTER_TOKEN``, ``HF_TOKEN``, ``*_TOKEN``, ``*_KEY``,
``*_SECRET``, ``*_PASSWORD``), plus anything in the shape of a bearer token, an ``Authorization`` header
value or a request signature. A secret is shown as at most its first 4 characters and ``…[redacted]``,
never in full. It also provides the structlog processor that applies the rule to every log event.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_ENV_SECRET_LEN", "REDACTED", "Redactor", "redact_event", "mask"]

REDACTED: str = "…[redacted]"

# Environment values shorter than this are skipped: "true", "1", "prod" would hit everywhere.
MIN_ENV_SECRET_LEN: int = 6

_SECRET_ENV_NAMES: frozenset[str] = frozenset({"MASTER_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
_SECRET_ENV_SUFFIXES: tuple[str, ...] = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")

# Bearer tokens (RFC 6750 b64token alphabet). Real ones are long; requiring 8 characters keeps prose
# ("the bearer of bad news") from being masked.
_BEARER_TOKEN: str = r"[A-Za-z0-9\-._~+/]{8,}=*"

# Authorization schemes kept in clear. A closed list: with "any word" as the scheme, the raw token in
# "authorization: <token> rejected" would be taken for the scheme and printed.
_AUTH_SCHEMES: str = r"bearer|basic|digest|token|apikey|api-key|key|jwt|dpop|negotiate|hmac|aws4-hmac-sha256"

# Words the shape rules start with; text containing none of them (lowercased) and no secret skips the
# regex. Substring checks run in C at a fraction of a regex scan's cost, and most log text has none.
_SHAPE_KEYWORDS: tuple[str, ...] = ("authorization", "bearer", "signature")

# The shape-based rules, case-insensitive; each keeps its lead-in (the key, the scheme word) and masks
# only the value. Authorization comes before Bearer so that "Authorization: Bearer x" is handled once.
# Values stop before "…" so that already-masked text is recognised (see Redactor._replace).
_SHAPE_PATTERNS: str = (
    r"(?P<auth_lead>(?i:\bauthorization)[\"']?\s*[:=]\s*[\"']?(?:(?i:" + _AUTH_SCHEMES + r")\s+)?)"
    r"(?P<auth_value>[^\s\"',;}…]+)"
    r"|(?P<bearer_lead>(?i:\bbearer)\s+)(?P<bearer_value>" + _BEARER_TOKEN + r")"
    r"|(?P<sig_lead>[\"']?(?i:\bsignature)[\"']?\s*[:=]\s*[\"']?)(?P<sig_value>[A-Za-z0-9+/_\-]+=*)"
)


def mask(secret: str) -> str:
    """The masked form of a secret: a short prefix (enough to tell tokens apart) and the marker."""
    # Four characters of a long token identify it without weakening it; a short one shows less.
    shown = min(4, len(secret) // 4)
    return secret[:shown] + REDACTED


@dataclass(frozen=True)
class _Compiled:
    """The secrets and the regexes built from them; replaced whole on add(), never mutated, so a
    thread redacting while another adds always sees a consistent set."""

    secrets: tuple[str, ...]
    pattern: re.Pattern[str]
    literals: re.Pattern[str] | None

    @classmethod
    def build(cls, secrets: Iterable[str]) -> _Compiled:
        # Longest first, so a secret that contains another is masked whole rather than in part.
        ordered = tuple(sorted({s for s in secrets if s}, key=lambda s: (-len(s), s)))
        if not ordered:
            return cls(secrets=(), pattern=re.compile(_SHAPE_PATTERNS), literals=None)
        literals = "|".join(re.escape(s) for s in ordered)
        return cls(
            secrets=ordered,
            pattern=re.compile(f"(?P<secret>{literals})|{_SHAPE_PATTERNS}"),
            literals=re.compile(literals),
        )

    def may_hold_secret(self, text: str) -> bool:
        for secret in self.secrets:
            if secret in text:
                return True
        lowered = text.lower()
        for keyword in _SHAPE_KEYWORDS:
            if keyword in lowered:
                return True
        return False

    def replace(self, m: re.Match[str]) -> str:
        group = m.lastgroup
        whole = m.group()
        if group == "secret":
            return mask(whole)
        if m.string.startswith(REDACTED, m.end()):
            # Already masked (text redacted twice): the "value" is the shown prefix; leave it be.
            return whole
        # The shape alternatives end with their "<name>_value" group; the lead-in before it is kept,
        # but a known secret written where a scheme or key is expected must not slip through in it.
        value = m.group(group) if group else whole
        lead = whole[: len(whole) - len(value)]
        if self.literals is not None:
            lead = self.literals.sub(lambda s: mask(s.group()), lead)
        return lead + mask(value)


class Redactor:
    """Masks known secret values and secret-shaped substrings in any text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._compiled: _Compiled = _Compiled.build(secrets)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Redactor:
        """A redactor for the secret-looking variables of an environment.

        Values shorter than ``MIN_ENV_SECRET_LEN`` are ignored (too many false hits), and so are
        absolute paths (``TLS_KEY=/etc/instance.key`` names a file, it is not the key).
        """
        found: list[str] = []
        for name, value in environ.items():
            upper = name.upper()
            if upper not in _SECRET_ENV_NAMES and not upper.endswith(_SECRET_ENV_SUFFIXES):
                continue
            value = value.strip()
            if len(value) < MIN_ENV_SECRET_LEN or value.startswith("/"):
                continue
            found.append(value)
        return cls(found)

    def add(self, secret: str) -> None:
        """Also mask ``secret`` from now on. Empty strings are ignored (they would match everywhere)."""
        compiled = self._compiled
        if not secret or secret in compiled.secrets:
            return
        self._compiled = _Compiled.build((*compiled.secrets, secret))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The known secret values, longest first."""
        return self._compiled.secrets

    def redact(self, text: str) -> str:
        """``text`` with every secret masked."""
        compiled = self._compiled
        if not compiled.may_hold_secret(text):
            return text
        return compiled.pattern.sub(compiled.replace, text)


_Processor = Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]]

# Values that cannot carry a secret and are left as they are (and keep their JSON type).
_PLAIN_TYPES: tuple[type, ...] = (bool, int, float, type(None))


def _redact_value(redactor: Redactor, value: Any) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, dict):
        return {k: _redact_value(redactor, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(redactor, v) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact_value(redactor, v) for v in value)
    # Any other object is rendered with str() later on (JSON default=str, the console renderer), which
    # could print a secret (a URL with a token, an exception message): check that form too.
    text = str(value)
    masked = redactor.redact(text)
    return value if masked == text else masked


def redact_event(redactor: Redactor) -> _Processor:
    """A structlog processor masking secrets in every value of the event dict, nested ones included."""

    def processor(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = _redact_value(redactor, value)
        return event_dict

    return processor
