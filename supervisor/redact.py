"""Keeping secrets out of everything shepherd says: logs, public answers, reports to the autoscaler.

This module owns the rule for what counts as a secret in shepherd's output and how it is masked: the
values of secret-looking environment variables (``MASTER_TOKEN``, ``HF_TOKEN``, ``*_TOKEN``, ``*_KEY``,
``*_SECRET``, ``*_PASSWORD``), plus anything in the shape of a secret (see ``_SHAPE_PATTERNS``):

- an ``Authorization`` header value, a bearer token, a ``signature`` value (plain or percent-encoded);
- an API-key header or parameter value (``X-Api-Key:``, ``api-key:``, ``x-api-key=``, ``api_key=``,
  ``api%5Fkey=``), 6 characters or more (``api_key=None`` and ``api_key=EMPTY`` are not keys);
- an environment-style assignment ``NAME_TOKEN=``, ``NAME_SECRET=``, ``NAME_PASSWORD=``, ``NAME_KEY=``
  (upper case, as environments are written; 6 characters or more; a value starting with ``/`` is a file
  path and kept), for a model server whose variables shepherd never saw (attach mode);
- a Hugging Face token (``hf_`` and 30 or more letters and digits) anywhere;
- a bare signature-looking value: see ``looks_like_signature`` for the exact shape.

A secret is shown as at most its first 4 characters and ``…[redacted]``, never in full. The redactor
is applied to every log event (``redact_event``, a structlog processor) and, by the StateMachine,
the Lifecycle and the Reporter, to every string that reaches ``/status``, ``/ready`` or the
autoscaler (see ``supervisor/worker.py``). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_BARE_SIGNATURE_LEN",
    "MIN_ENV_SECRET_LEN",
    "REDACTED",
    "Redactor",
    "keep",
    "looks_like_signature",
    "mask",
    "redact_event",
    "redact_value",
]

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

# Values of API-key fields and environment-style assignments: up to a separator, a quote or a closing
# bracket (a Python repr, a query string), 6 characters or more so that placeholders ("None", "EMPTY",
# "null") stay readable.
_FIELD_VALUE: str = r"[^\s\"',;&)}\]…]{6,}"

# Bare signature-looking values: a maximal run of the standard base64 alphabet, then padding. The run
# is only a candidate; looks_like_signature decides (a regex cannot count character classes).
MIN_BARE_SIGNATURE_LEN: int = 64
_BARE_RUN: str = r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{" + str(MIN_BARE_SIGNATURE_LEN) + r",}=*"
_BARE_CANDIDATE: re.Pattern[str] = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{" + str(MIN_BARE_SIGNATURE_LEN) + "}")

# Words the keyword rules start with; text containing none of them (lowercased), none of the
# upper-case suffixes, no secret and no bare candidate skips the full regex. Substring checks run in C
# at a fraction of a regex scan's cost, and most log text has none of them.
_SHAPE_KEYWORDS: tuple[str, ...] = (
    "authorization", "bearer", "signature", "api_key", "api-key", "apikey", "api%5fkey", "hf_",
)
# Environment-style names are matched case-sensitively (see _SHAPE_PATTERNS), so checked as written.
_ENV_KEYWORDS: tuple[str, ...] = ("_TOKEN", "_SECRET", "_PASSWORD", "_KEY")

# The shape-based rules; each keeps its lead-in (the key, the scheme word) and masks only the value
# (the last group of each alternative is named "<name>_value"). Order matters where two could start at
# the same place: Authorization comes before Bearer so that "Authorization: Bearer x" is handled once.
# Values stop before "…" so that already-masked text is recognised (see _Compiled.replace).
_SHAPE_PATTERNS: str = (
    r"(?P<auth_lead>(?i:\bauthorization)[\"']?\s*[:=]\s*[\"']?(?:(?i:" + _AUTH_SCHEMES + r")\s+)?)"
    r"(?P<auth_value>[^\s\"',;}…]+)"
    r"|(?P<bearer_lead>(?i:\bbearer)\s+)(?P<bearer_value>" + _BEARER_TOKEN + r")"
    # "%" too: a percent-encoded signature (%2B, %2F, %3D) is masked whole, not up to its first escape.
    r"|(?P<sig_lead>[\"']?(?i:\bsignature)[\"']?\s*[:=]\s*[\"']?)(?P<sig_value>[A-Za-z0-9+/_\-%]+=*)"
    # X-Api-Key, api-key, api_key, apikey, api%5Fkey, openai_api_key; not preceded by a letter or digit,
    # so "rapikey" is left alone but "x-", "x_" and "openai_" prefixes are not.
    r"|(?P<apikey_lead>(?<![A-Za-z0-9])(?i:(?:x[-_])?api(?:[-_]|%5f)?key)[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<apikey_value>" + _FIELD_VALUE + r")"
    # Case-sensitive on purpose: lower-case "eos_token: </s>" and "pad_token=<pad>" are tokenizer talk.
    r"|(?P<env_lead>\b[A-Z][A-Z0-9_]*_(?:TOKEN|SECRET|PASSWORD|KEY)[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<env_value>(?!/)" + _FIELD_VALUE + r")"
    r"|(?P<hf_value>(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,})"
    r"|(?P<bare_value>" + _BARE_RUN + r")"
)


def looks_like_signature(run: str) -> bool:
    """Whether a run of the base64 alphabet (``[A-Za-z0-9+/]``, ``=`` padding) is masked as a bare signature.

    The shape, chosen so that a 2048-bit RSA signature (344 characters) is always masked and ordinary
    long text is not:

    - at least ``MIN_BARE_SIGNATURE_LEN`` (64) characters before the padding;
    - at least one digit, and upper-case and lower-case letters each at least 20% of its letters and
      digits (random base64: about 42% each): hex digests (``5f0b02c7...``, any case), words, and paths
      holding a digest next to a capitalised name (``Instruct/snapshots/5f0b...``) fall short;
    - the character class (upper, lower, digit) changes between at least 30% of adjacent letters and
      digits: random base64 changes about 62% of the time, words about 10%;
    - lower-case letters come in runs of 3 or fewer on average: random base64 averages 1.7, CamelCase
      identifiers (``Qwen2ForConditionalGeneration...``) 3.5 or more;
    - at most one ``/`` per 16 characters: random base64 has one per 64, paths one per 5 to 15.

    Measured on random bytes: never missed at 256 bytes (344 characters) in 100,000 tries; missed 0.25%
    of the time at 64 bytes (88 characters), the shortest real signature (Ed25519). The URL-safe
    alphabet (``-``, ``_``) is not a bare candidate: model names and cache paths are written with
    those; a URL-safe signature is masked when it follows ``signature``.
    """
    body = run.rstrip("=")
    if len(body) < MIN_BARE_SIGNATURE_LEN or body.count("/") * 16 > len(body):
        return False
    counts = [0, 0, 0]  # upper, lower, digit
    changes = lower_runs = 0
    previous = -1
    for ch in body:
        if "a" <= ch <= "z":
            kind = 1
        elif "A" <= ch <= "Z":
            kind = 0
        elif "0" <= ch <= "9":
            kind = 2
        else:  # "+" and "/" carry no class; the letters on either side are compared directly
            continue
        counts[kind] += 1
        if kind != previous:
            changes += previous >= 0
            lower_runs += kind == 1
        previous = kind
    upper, lower, digits = counts
    total = upper + lower + digits
    return (
        digits > 0
        and upper * 5 >= total
        and lower * 5 >= total
        and changes * 10 >= (total - 1) * 3
        and lower <= 3 * lower_runs
    )


def keep(text: str) -> str:
    """The identity redaction: the default where no redactor is given (tests, tools)."""
    return text


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
        for keyword in _ENV_KEYWORDS:
            if keyword in text:
                return True
        return len(text) >= MIN_BARE_SIGNATURE_LEN and _BARE_CANDIDATE.search(text) is not None

    def replace(self, m: re.Match[str]) -> str:
        group = m.lastgroup
        whole = m.group()
        if group == "secret":
            return mask(whole)
        if m.string.startswith(REDACTED, m.end()):
            # Already masked (text redacted twice): the "value" is the shown prefix; leave it be.
            return whole
        if group == "bare_value" and not looks_like_signature(whole):
            # Not a signature after all, but the run was consumed whole: a known secret inside it
            # (letters and digits only) must still be masked.
            return self.literals.sub(lambda s: mask(s.group()), whole) if self.literals is not None else whole
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
    def from_environ(cls, environ: Mapping[str, str], extra: Iterable[str | None] = ()) -> Redactor:
        """A redactor for the secret-looking variables of an environment, plus the ``extra`` secrets
        (a token given as a flag rather than a variable; None and empty values are skipped).

        Values shorter than ``MIN_ENV_SECRET_LEN`` are ignored (too many false hits), and so are
        absolute paths (``TLS_KEY=/etc/instance.key`` names a file, it is not the key).
        """
        found: list[str] = [secret for secret in extra if secret]
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


def redact_value(redact: Callable[[str], str], value: Any) -> Any:
    """``value`` with ``redact`` applied to every string in it, nested dicts, lists and tuples included
    (dict keys are ours and kept). For a whole public answer (the ``/status`` snapshot) in one call."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, dict):
        return {k: redact_value(redact, v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(redact, v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(redact, v) for v in value)
    # Any other object is rendered with str() later on (JSON default=str, the console renderer), which
    # could print a secret (a URL with a token, an exception message): check that form too.
    text = str(value)
    masked = redact(text)
    return value if masked == text else masked


def redact_event(redactor: Redactor) -> _Processor:
    """A structlog processor masking secrets in every value of the event dict, nested ones included."""
    redact = redactor.redact

    def processor(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            event_dict[key] = redact_value(redact, value)
        return event_dict

    return processor
