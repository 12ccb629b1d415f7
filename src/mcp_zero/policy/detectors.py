"""Content detectors: which labels a text earns, and redacting what earned them.

Two labels, each a handful of precompiled patterns:

- ``secret``: credentials of well-known shapes (AWS access key ids and secret keys, PEM
  private keys, GitHub, Slack, Google, Stripe, OpenAI and Anthropic keys, JWTs) and a value
  given to a ``password``/``passwd``/``secret``/``api_key``/``token`` name (``token=…``,
  ``"password": "…"``);
- ``pii``: e-mail addresses, payment card numbers (13 to 19 digits, spaces or dashes
  between them allowed, that pass the Luhn check) and US social security numbers.

Policies see the labels of an action's arguments as ``context.labels``; a permit's
``@redact("secret")`` obligation has its result redacted with :func:`redact`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SECRET = "secret"  # noqa: S105 (the name of a label)
PII = "pii"
LABELS = frozenset({SECRET, PII})


def _luhn(match: re.Match[str]) -> bool:
    digits = [int(c) for c in match.group(0) if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        if i % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


@dataclass(frozen=True, slots=True)
class Detector:
    """One pattern of a label. ``check``, when given, must also accept a match; a match with
    a group ``value`` has only that group redacted (``password=[redacted:secret]``)."""

    label: str
    name: str
    pattern: re.Pattern[str]
    check: Callable[[re.Match[str]], bool] | None = None


# A credential-like name, not part of a longer word (``max_tokens`` is not ``token``).
_CREDENTIAL_NAME = (
    r"(?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_.-])*"
    r"(?:password|passwd|secret|api[_-]?key|token)(?:[_.-]?(?:key|value))?(?![A-Za-z0-9])"
)
# Its value after ``=`` or ``:``, quoted or not (in JSON text too, escaped quotes included).
_CREDENTIAL_VALUE = (
    r"(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?"
    r"(?!(?:null|true|false|none)(?![A-Za-z0-9]))(?P<value>[^\s\"'\\,;&{}()\[\]<>]{3,})"
)
_KEY_TAIL = r"(?![A-Za-z0-9_-])"

DETECTORS: tuple[Detector, ...] = (
    Detector(SECRET, "aws_access_key_id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    Detector(
        SECRET,
        "aws_secret_access_key",
        re.compile(
            r"\baws_secret_access_key(?:\\?[\"'])?[ \t]*[:=][ \t]*(?:\\?[\"'])?"
            r"(?P<value>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
            re.IGNORECASE,
        ),
    ),
    Detector(
        SECRET,
        "private_key",
        # a block cut short is still a key: then up to the end of the text
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----"
            r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----|.*)",
            re.DOTALL,
        ),
    ),
    Detector(SECRET, "github_token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b")),
    Detector(SECRET, "github_pat", re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b")),
    Detector(SECRET, "slack_token", re.compile(r"\bxox[abeoprs]-[A-Za-z0-9-]{10,250}" + _KEY_TAIL)),
    Detector(SECRET, "google_api_key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}" + _KEY_TAIL)),
    Detector(SECRET, "stripe_key", re.compile(r"\b(?:sk|rk)_live_[0-9A-Za-z]{16,247}\b")),
    Detector(
        SECRET,
        "openai_anthropic_key",
        # a digit among them: ``sk-`` before hyphenated words is no key
        re.compile(r"\bsk-(?=[A-Za-z0-9_-]{0,250}[0-9])[A-Za-z0-9_-]{20,250}" + _KEY_TAIL),
    ),
    Detector(
        SECRET,
        "jwt",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}" + _KEY_TAIL),
    ),
    Detector(
        SECRET,
        "credential_assignment",
        re.compile(_CREDENTIAL_NAME + _CREDENTIAL_VALUE, re.IGNORECASE),
    ),
    Detector(
        PII,
        "email",
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
    ),
    Detector(
        PII, "payment_card", re.compile(r"(?<![0-9-])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"), _luhn
    ),
    Detector(
        PII,
        "us_ssn",
        re.compile(r"(?<![0-9-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9-])"),
    ),
)
_BY_LABEL: dict[str, tuple[Detector, ...]] = {
    label: tuple(d for d in DETECTORS if d.label == label) for label in LABELS
}


def _any_of(detectors: Iterable[Detector]) -> re.Pattern[str] | None:
    """One pattern that matches where any of ``detectors`` (those without a check) does:
    labelling a text is then one search per label, not one per detector."""
    parts = []
    for detector in detectors:
        flags = ("i" if detector.pattern.flags & re.IGNORECASE else "") + (
            "s" if detector.pattern.flags & re.DOTALL else ""
        )
        source = detector.pattern.pattern.replace("(?P<value>", "(?:")
        parts.append(f"(?{flags}:{source})" if flags else f"(?:{source})")
    return re.compile("|".join(parts)) if parts else None


# (label, one pattern for its detectors without a check, its detectors with one)
_LABELLERS: tuple[tuple[str, re.Pattern[str] | None, tuple[Detector, ...]], ...] = tuple(
    (
        label,
        _any_of(d for d in detectors if d.check is None),
        tuple(d for d in detectors if d.check is not None),
    )
    for label, detectors in sorted(_BY_LABEL.items())
)


def label_text(text: str) -> frozenset[str]:
    """The labels whose detectors find something in ``text``."""
    found: list[str] = []
    for label, any_match, checked in _LABELLERS:
        if any_match is not None and any_match.search(text) is not None:
            found.append(label)
            continue
        for detector in checked:
            if _first(detector, text) is not None:
                found.append(label)
                break
    return frozenset(found)


def redact(value: Any, labels: Iterable[str]) -> tuple[Any, int]:
    """``value`` (JSON: dicts, lists, strings, numbers...) with every match of the detectors
    of ``labels`` in its strings replaced by ``[redacted:<label>]``, and how many matches
    were. Object keys are kept as they are. ``value`` itself is not changed: what changed is
    copied. Raises KeyError for a label that is not one of :data:`LABELS`."""
    detectors = tuple(d for label in sorted(labels) for d in _BY_LABEL[label])
    return _redact(value, detectors)


def _redact(value: Any, detectors: tuple[Detector, ...]) -> tuple[Any, int]:
    if isinstance(value, str):
        return _redact_text(value, detectors)
    if isinstance(value, dict):
        total = 0
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            new, count = _redact(item, detectors)
            if count:
                if out is None:
                    out = dict(value)
                out[key] = new
                total += count
        return (value if out is None else out), total
    if isinstance(value, list):
        total = 0
        items: list[Any] | None = None
        for i, item in enumerate(value):
            new, count = _redact(item, detectors)
            if count:
                if items is None:
                    items = list(value)
                items[i] = new
                total += count
        return (value if items is None else items), total
    return value, 0


def _redact_text(text: str, detectors: tuple[Detector, ...]) -> tuple[str, int]:
    total = 0
    for detector in detectors:
        if _first(detector, text) is None:
            continue
        marker = f"[redacted:{detector.label}]"
        count = 0
        parts: list[str] = []
        end = 0
        for match in detector.pattern.finditer(text):
            if detector.check is not None and not detector.check(match):
                continue
            group = "value" if "value" in detector.pattern.groupindex else 0
            parts.append(text[end : match.start(group)])
            parts.append(marker)
            end = match.end(group)
            count += 1
        parts.append(text[end:])
        text = "".join(parts)
        total += count
    return text, total


def _first(detector: Detector, text: str) -> re.Match[str] | None:
    if detector.check is None:
        return detector.pattern.search(text)
    for match in detector.pattern.finditer(text):
        if detector.check(match):
            return match
    return None
