"""Content detectors: which labels a text earns, and redacting what earned them.

Two labels, each a handful of precompiled patterns:

- ``secret``: credentials of well-known shapes (AWS access key ids and secret keys, PEM
  private keys, GitHub, GitLab, npm, Slack, Google, Stripe, OpenAI and Anthropic keys,
  JWTs, HTTP ``Bearer``/``Basic`` credentials, a URL's password) and a value given to a
  credential's name (``password``, ``pwd``, ``*_PASS``, ``passphrase``, ``secret``,
  ``api_key``, ``private_key``, ``token``…, after a separator or as a camelCase word:
  ``token=…``, ``"accessToken": "…"``, ``{"name": "DB_PASSWORD", "value": "…"}``,
  ``{"Key": …, "Value": …}``; ``auth``, ``authorization`` and ``credentials`` when their
  value looks like a token), but not a pagination cursor (``page_token``, ``nextToken``…);
- ``pii``: e-mail addresses, in any script (not ``git@host:path`` nor a URL's login),
  payment card numbers (13 to 19 digits, spaces or dashes between them allowed, starting as
  card numbers do and passing the Luhn check; after a minus sign too, not after a digit and a
  dash) and US social security numbers (valid ones, not part of a longer code).

Policies see the labels of what an action carries (its arguments, the URI it reads) as
``context.labels``; a permit's ``@redact("secret")`` obligation has its result redacted
with :func:`redact`.
"""

from __future__ import annotations

import base64
import codecs
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

SECRET = "secret"  # noqa: S105 (the name of a label)
PII = "pii"
LABELS = frozenset({SECRET, PII})


# The first digits card networks issue under (Visa 4; Mastercard 51-55, 22-27; Amex 34, 37;
# Diners 30, 36, 38, 39; JCB 35; Discover and UnionPay 6): a number that starts otherwise,
# such as a time in milliseconds (17…), is no card, whatever its check digit says.
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[04-9]|6")


def _luhn(match: re.Match[str]) -> bool:
    digits = [int(c) for c in match.group(0) if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    if not _CARD_PREFIX.match("".join(map(str, digits[:2]))):
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
    groups named ``value…`` has only the one that matched redacted (``password=[redacted:
    secret]``); ``begin``, when given, gives where a match really begins (before where the
    pattern starts it), or None to drop it. ``hints``: strings one of which a text holds
    wherever the pattern matches (in the text lower-cased when ``fold``), so a text without
    them is not searched."""

    label: str
    name: str
    pattern: re.Pattern[str]
    check: Callable[[re.Match[str]], bool] | None = None
    hints: tuple[str, ...] = ("",)  # ("": any text)
    fold: bool = False
    begin: Callable[[str, int], int | None] | None = None


def _after(chars: str, prefix: int) -> str:
    """Put after a token's first ``prefix`` characters (a literal: ``re`` then skips ahead to
    it), it holds where the token starts not right after one of ``chars``, or right after a
    JSON escape (``\\n``, ``\\t``, ``\\u000a``...: in a text that is itself JSON). A token
    of unbounded length is given its own characters as ``chars``, so that a run of them is
    tried once, at its start (and after a dash that starts it): what keeps the search linear
    in the text; one of bounded length is tried at each of its literals (at most a few
    hundred characters each). Right after a URL's percent-escape (``%20ghp_…``,
    ``token%3Dghp_…``) counts too."""
    ahead = rf"[\s\S]{{{prefix}}}"
    return (
        rf"(?:(?<![{chars}]{ahead})|(?<=\\[nrtbf]{ahead})|(?<=\\u[0-9A-Fa-f]{{4}}{ahead})"
        rf"|(?<=%[0-9A-Fa-f]{{2}}{ahead})|(?<=(?<![{chars}])-{ahead}))"
    )


# A credential-like name, not part of a longer word (``max_tokens`` is not ``token``); it may
# end a longer name (``DB_PASSWORD``, ``client_secret``). (Its first letter first: ``re``
# skips ahead to the few places where one of them is.)
# ``pass`` only ends a longer name (``DB_PASS``, not ``pass: 12 of 14``); ``pwd`` is none
# when its value is a path (``PWD=/home/me``: a working directory). A pagination cursor is
# named as a token but gives no access: ``page_token``, ``nextPageToken``, ``NextToken``,
# ``continuation_token``, ``pagination_token``, ``cursor_token``, ``sync_token`` are none.
_PATH = r"(?:[/~.]|[A-Za-z]:[\\/])"
_SEPARATOR = r"(?:\\?[\"'])?[ \t]*+[:=][ \t]*+(?:\\?[\"'])?"
_CURSOR = "".join(
    rf"(?<!{word}[_.-]t)(?<!{word}t)"
    for word in ("page", "next", "continuation", "pagination", "cursor", "sync")
)
_CREDENTIAL_NAME = (
    r"(?:(?<=p)ass(?:word|wd|phrase)|(?<=[A-Za-z0-9]_p)ass|(?<=p)wd(?!"
    + _SEPARATOR
    + _PATH
    + r")|(?<=s)ecret|(?<=a)pi[_-]?key|(?<=t)"
    + _CURSOR
    + r"oken|(?<=p)rivate[_.-]?key)"
    r"(?:[_.-]?(?:access[_.-]?)?(?:key|value))?(?![A-Za-z0-9])"
)
# (nor one already redacted)
_NOT_A_VALUE = r"(?!(?:null|true|false|none)(?![A-Za-z0-9])|\[redacted:)"
_NOT_A_QUOTED_VALUE = r"(?!(?:null|true|false|none)\\?[\"']|\[redacted:)"
# Its value after ``=`` or ``:``: a quoted one whole, to its closing quote (escapes inside
# considered; an escaped quote ``\"`` opens and closes it in a text of escaped JSON), an
# unquoted one to the next whitespace, quote or backslash (or ``&name=``, in a URL).
# (A group repeated without backtracking is an atomic group here, ``(?>(?:…){3,})``, never
# a possessive repeat ``(?:…){3,}+``: CPython before 3.11.5 matches the latter wrongly when
# the group can backtrack or holds a lookahead, gh-100061 and gh-106052; Debian 12's Python
# is 3.11.2, on which ``token=abc&page=2`` lost its ``&page=``.)
_CREDENTIAL_VALUE = (
    r"(?:\\?[\"'])?[ \t]*+[:=][ \t]*+(?:"
    rf"\"(?P<value_dq>{_NOT_A_QUOTED_VALUE}(?>(?:[^\"\\\n]|\\[^\n]){{3,}}))\""
    rf"|'(?P<value_sq>{_NOT_A_QUOTED_VALUE}(?>(?:[^'\\\n]|\\[^\n]){{3,}}))'"
    rf"|\\\"(?P<value_esc>{_NOT_A_QUOTED_VALUE}(?>(?:[^\"\\\n]|\\[^\"\n]){{3,}}))\\\""
    rf"|(?:\\?[\"'])?(?P<value>{_NOT_A_VALUE}"
    r"(?>(?:[^\s\"'\\&]|&(?![A-Za-z_][A-Za-z0-9_]{0,64}=)){3,})))"
)
# A name alone (an object's key), whose value is then a credential.
CREDENTIAL_KEY = re.compile(
    r"(?:[A-Za-z0-9]{1,64}[_.-]|[A-Za-z0-9]{0,63}[a-z0-9](?=[PSTA])){0,8}[pPsStTaA](?i:"
    + _CREDENTIAL_NAME
    + ")",
    re.ASCII,
)
# Names whose value is a credential only when it looks like one — no space, not a path, and
# 8 characters with a digit among them or 12 without: ``auth=dXNlcjpwYXNz``, not ``auth:
# required``, ``credentials: 'include'`` nor ``GOOGLE_APPLICATION_CREDENTIALS=/keys/a.json``.
_AUTH_NAME = r"(?:(?<=a)uth(?:orization)?|(?<=c)redentials?)(?![A-Za-z0-9])"
_TOKEN_LIKE = (
    r"(?!" + _PATH + r"|\[redacted:)"
    r"(?:(?=[^\s\"'\\&,;0-9]{0,250}+[0-9])[^\s\"'\\&,;]{8,}+|[^\s\"'\\&,;]{12,}+)"
)
_AUTH_KEY = re.compile(
    r"(?:[A-Za-z0-9]{1,64}[_.-]|[A-Za-z0-9]{0,63}[a-z0-9](?=[AC])){0,8}[aAcC](?i:"
    + _AUTH_NAME
    + ")",
    re.ASCII,
)
_AUTH_VALUE = re.compile(_TOKEN_LIKE)
_DIRECTORY = re.compile(_PATH)
_KEY_TAIL = r"(?![A-Za-z0-9_-])"
_WORD_TAIL = r"(?![A-Za-z0-9_])"
_KEY = "A-Za-z0-9_-"
_WORD = "A-Za-z0-9_"

# An e-mail address is found at its ``@`` (``re`` skips ahead to it); its local part, at
# most 64 characters, is then read back from there. Both may hold letters of any script
# (``jöhn@exämple.com``, ``用户@例子.广告``). Where words are not spaced apart (Thai,
# Japanese, Chinese; Korean, whose particles follow a word unspaced), the text an address
# stands in is not part of it: a local part, and a domain's last label, is all of those
# scripts or of none (in ``请联系jane@example.com获取``, the address is ``jane@example.com``).
_UNSPACED = (
    "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0003134f"
)
# (``git@github.com:org/repo.git``, ``deploy@host:~/app``: a remote's path, not an address)
_EMAIL_DOMAIN = re.compile(
    rf"@(?:[^\W_]++(?>(?:-[^\W_]*+)*)\.){{1,10}}"
    rf"(?:[^\W\d_{_UNSPACED}]{{2,63}}+(?![^\W{_UNSPACED}])|[{_UNSPACED}]{{2,63}}+)"
    # not an scp-style remote: ``:`` then a path (``~``, ``/``, ``org/repo.git``) or a
    # port; ``jane@example.com:hunter2`` is still an address
    + r"(?![A-Za-z0-9.-]*+:(?:[~/]|[0-9]++(?![A-Za-z_])|[A-Za-z0-9_.-]*+/))"
)
_LOCAL_REVERSED = re.compile(rf"(?:[^\W{_UNSPACED}]|[.%+-]){{1,64}}|[{_UNSPACED}0-9._%+-]{{1,64}}")
# what precedes a URL's login, read backwards: ``https://`` or ``postgres://app:`` (or
# ``https:\/\/``: in JSON that escapes a slash)
_USERINFO_REVERSED = re.compile(r"(?::[^\s:/@?#\"'\\]{0,256}+)?(?://|/\\/\\):")
_HEX4 = re.compile(r"[0-9A-Fa-f]{4}")


def _local_part(text: str, at: int) -> int | None:
    """Where the local part of the address whose ``@`` is at ``at`` begins (a JSON escape
    before it is not part of it), or None when there is none."""
    low = max(at - 64, 0)
    run = _LOCAL_REVERSED.match(text[low:at][::-1])
    if run is None:
        return None
    begin = at - run.end()
    if (
        begin > 0
        and text[begin - 1] in ":/"
        and _USERINFO_REVERSED.match(text[max(begin - 260, 0) : begin][::-1])
    ):
        return None  # ``https://jane@…``, ``postgres://app:pw@…``: a URL's login
    if begin > 0 and text[begin - 1] == "\\":  # ``\njane@…``: the address is ``jane@…``
        if text[begin] in "nrtbf":
            begin += 1
        elif text[begin] == "u" and _HEX4.fullmatch(text, begin + 1, begin + 5):
            begin += 5
    return begin if begin < at else None


def _url_password(separator: str) -> re.Pattern[str]:
    """The pattern of a URL's password: ``scheme://user:password@host``
    (``redis://:pw@localhost``), to the last ``@``, with ``separator`` after its scheme:
    ``://``, or ``:\\/\\/`` in JSON that escapes a slash (PHP's, some Java encoders')."""
    start = re.escape(separator)
    return re.compile(
        rf"{start}(?<=[A-Za-z0-9+.-]{start})[^\s:/@?#\"'\\]{{0,256}}+:"
        # a host of any script (``éxample.de``, ``例子.中国``: found by a bug hunt), or
        # ``[::1]``; not one that starts as none does (``@.``, ``@-``, ``@:``)
        r"(?P<value>(?!\[redacted:)[^\s/?#\"'\\]{1,256})@(?=[^\s/?#@:.\"'\\-])"
    )


# What words lack: a digit, a lower-case letter before an upper-case one, base64's padding.
_TOKEN_MARK = re.compile(r"[0-9]|[a-z][A-Z]|=")


def _plausible_token(match: re.Match[str]) -> bool:
    """Whether a ``Bearer``/``Basic`` credential is one, not a word (``Basic understanding``):
    whether it has what words lack. (Decided from the credential alone, so that redacting a
    value, without the name it is given to, takes what labelling it found.)"""
    return _TOKEN_MARK.search(match.string, match.start("value"), match.end("value")) is not None


DETECTORS: tuple[Detector, ...] = (
    Detector(
        SECRET,
        "aws_access_key_id",
        re.compile(r"(?:AKIA|ASIA)" + _after(_WORD, 4) + "[0-9A-Z]{16}" + _WORD_TAIL),
        hints=("AKIA", "ASIA"),
    ),
    Detector(
        SECRET,
        "aws_secret_access_key",
        re.compile(
            r"[aA]"
            + _after("A-Za-z0-9", 1)
            + r"(?i:ws_secret_access_key)(?:\\?[\"'])?[ \t]*+[:=][ \t]*+(?:\\?[\"'])?"
            r"(?P<value>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])",
            re.ASCII,
        ),
        hints=("aws_secret_access_key",),
        fold=True,
    ),
    Detector(
        SECRET,
        "private_key",
        # a block cut short is still a key: then up to the end of the text
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]{1,32} ){0,8}PRIVATE KEY( BLOCK)?-----"
            r"(?:.*?-----END (?:[A-Z0-9]{1,32} ){0,8}PRIVATE KEY( BLOCK)?-----|.*)",
            re.DOTALL,
        ),
        hints=("PRIVATE KEY",),
    ),
    Detector(
        SECRET,
        "github_token",
        re.compile(r"gh" + _after(_WORD, 2) + r"[pousr]_[A-Za-z0-9]{36,255}+" + _WORD_TAIL),
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
    ),
    Detector(
        SECRET,
        "github_pat",
        re.compile(r"github_pat_" + _after(_WORD, 11) + r"[A-Za-z0-9_]{22,255}+" + _WORD_TAIL),
        hints=("github_pat_",),
    ),
    Detector(
        SECRET,
        "gitlab_token",
        re.compile(r"glpat-" + _after(_WORD, 6) + r"[0-9A-Za-z_-]{20,255}+" + _KEY_TAIL),
        hints=("glpat-",),
    ),
    Detector(
        SECRET,
        "npm_token",
        # (not ``npm_config_cache``: npm's own environment variables are no token)
        re.compile(r"npm_" + _after(_WORD, 4) + r"[A-Za-z0-9]{36}" + _WORD_TAIL),
        hints=("npm_",),
    ),
    Detector(
        SECRET,
        "slack_token",
        re.compile(r"xox" + _after(_WORD, 3) + r"[abeoprs]-[A-Za-z0-9-]{10,250}+" + _KEY_TAIL),
        hints=("xox",),
    ),
    Detector(
        SECRET,
        "google_api_key",
        re.compile(r"AIza" + _after(_WORD, 4) + r"[0-9A-Za-z_-]{35}" + _KEY_TAIL),
        hints=("AIza",),
    ),
    Detector(
        SECRET,
        "stripe_key",
        re.compile(r"[sr]k_live_" + _after(_WORD, 8) + r"[0-9A-Za-z]{16,247}+" + _WORD_TAIL),
        hints=("_live_",),
    ),
    Detector(
        SECRET,
        "openai_anthropic_key",
        # a digit among them: ``sk-`` before hyphenated words is no key
        re.compile(
            r"sk-"
            + _after(_WORD, 3)
            + r"(?=[A-Za-z_-]{0,250}+[0-9])[A-Za-z0-9_-]{20,250}+"
            + _KEY_TAIL
        ),
        hints=("sk-",),
    ),
    Detector(
        SECRET,
        "jwt",
        re.compile(
            r"eyJ"
            + _after(_KEY, 3)
            + r"[A-Za-z0-9_-]{8,}+\.eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+"
            + _KEY_TAIL
        ),
        hints=("eyJ",),
    ),
    Detector(
        SECRET,
        "http_authorization",
        re.compile(
            r"[bB](?=[eE][aA][rR][eE][rR]|[aA][sS][iI][cC])"
            + _after(_WORD, 1)
            + r"(?i:earer|asic)[ \t]++"
            r"(?P<value>[A-Za-z0-9._~+/-]{16,}+=*+)",
            re.ASCII,
        ),
        _plausible_token,
        hints=("bearer", "basic"),
        fold=True,
    ),
    Detector(SECRET, "url_password", _url_password("://"), hints=("://",)),
    Detector(SECRET, "url_password_escaped", _url_password(":\\/\\/"), hints=(":\\/\\/",)),
    Detector(
        SECRET,
        "credential_assignment",
        re.compile(
            # a name's start, or a camelCase hump (``accessToken``, ``dbPassword``)
            r"(?:[pPsStTaA]"
            + _after("A-Za-z0-9", 1)
            + r"|(?<=[a-z0-9])[PSTA])"
            + "(?i:"
            + _CREDENTIAL_NAME
            + _CREDENTIAL_VALUE
            + ")",
            re.ASCII,
        ),
        hints=("pass", "pwd", "secret", "api", "token", "private"),
        fold=True,
    ),
    Detector(
        SECRET,
        "credential_token_assignment",
        re.compile(
            # (what follows the first letter looked at first: ``a`` and ``c`` are everywhere)
            r"[aAcC](?=[uU][tT][hH]|[rR][eE][dD])(?:"
            + _after("A-Za-z0-9", 1)
            + r"|(?<=[a-z0-9][AC]))"
            + "(?i:"
            + _AUTH_NAME
            + _SEPARATOR
            + "(?P<value>"
            + _TOKEN_LIKE
            + "))",
            re.ASCII,
        ),
        hints=("auth", "credential"),
        fold=True,
    ),
    Detector(PII, "email", _EMAIL_DOMAIN, hints=("@",), begin=_local_part),
    Detector(
        PII,
        "payment_card",
        # (its digits start a run of them: not right after a digit, nor after a dash that
        # follows one, ``1234-4111…``, a longer code; right after a minus sign, ``-4111…``,
        # ``x-4111 1111…``, they do: a dash there kept a card unfound, found by review)
        re.compile(r"[0-9](?<![0-9][0-9])(?<![0-9]-[0-9])(?:[ -]?[0-9]){12,18}(?![0-9])"),
        _luhn,
    ),
    Detector(
        PII,
        "us_ssn",
        # (area 001-899 but 666, group 01-99, serial 0001-9999; not part of a longer code or
        # number: ``ABC123-45-6789``, ``1123-45-67890``, ``123-45-6789-X``)
        re.compile(
            r"[0-8](?=[0-9]{2}-)"
            + _after(_KEY, 1)
            + r"[0-9]{2}(?<!000)(?<!666)-(?!00)[0-9]{2}-(?!0000)[0-9]{4}"
            + _KEY_TAIL
        ),
        hints=("-",),
    ),
)
_BY_LABEL: dict[str, tuple[Detector, ...]] = {
    label: tuple(d for d in DETECTORS if d.label == label) for label in LABELS
}
_ORDERED = tuple(sorted(_BY_LABEL.items()))


def label_text(text: str) -> frozenset[str]:
    """The labels whose detectors find something in ``text``."""
    found: list[str] = []
    lowered: str | None = None
    for label, detectors in _ORDERED:
        for detector in detectors:
            haystack = text
            if detector.fold:
                if lowered is None:
                    lowered = text.lower()
                haystack = lowered
            for hint in detector.hints:  # (inline: this runs on every governed call)
                if hint in haystack:
                    break
            else:
                continue
            if detector.check is None and detector.begin is None:
                if detector.pattern.search(text) is None:
                    continue
            elif _first(detector, text) is None:
                continue
            found.append(label)
            break
    return frozenset(found)


def label_value(value: Any) -> frozenset[str]:
    """The labels of a JSON value (an action's arguments): of its strings, object keys
    included, each as it is (not as JSON text, where a newline before a secret is ``\\n``),
    and of each ``name=value`` of an object (``{"password": "…"}``)."""
    parts: list[str] = []
    _texts(value, parts)
    return label_text("\n".join(parts)) if parts else frozenset()


def label_uri(uri: str) -> frozenset[str]:
    """The labels of a URI (the target of a read): of it as written and, when it has
    percent-escapes, as its plugin reads them (``password%3Dhunter2`` is ``password=hunter2``
    there)."""
    decoded = unquote(uri) if "%" in uri else uri
    return label_text(uri if decoded == uri else f"{uri}\n{decoded}")


def _texts(value: Any, parts: list[str]) -> None:
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts.append(str(value))  # (in a list: a card number, a PIN under its name)
    elif isinstance(value, dict):
        named = _named_value(value)
        if named is not None:  # {"name": "DB_PASSWORD", "value": "…"} reads as DB_PASSWORD=…
            parts.append(f"{named[0]}={value[named[1]]}")
        for key, item in value.items():
            if isinstance(item, str) or (
                isinstance(item, (int, float)) and not isinstance(item, bool)
            ):
                parts.append(f"{key}={item}")
            elif _credential_value(key, item):  # {"password": ["…"]}: under its name
                nested: list[str] = []
                _texts(item, nested)
                parts.extend(f"{key}={text}" for text in nested)
            else:
                parts.append(str(key))
                _texts(item, parts)
    elif isinstance(value, list):
        for item in value:
            _texts(item, parts)


def redact(value: Any, labels: Iterable[str]) -> tuple[Any, int]:
    """``value`` (JSON: dicts, lists, strings, numbers...) with every match of the detectors
    of ``labels`` in its strings replaced by ``[redacted:<label>]`` (a number in which one
    matches, by that string), and how many matches were; under ``secret``, the value of an
    object's credential-named key too (``{"password": "…"}``). Object keys are kept as they
    are. A tool's result keeps the text that mirrors its structured content the JSON of it.
    ``value`` itself is not changed: what changed is copied. Raises KeyError for a label
    that is not one of :data:`LABELS`."""
    labels = sorted(labels)
    detectors = tuple(d for label in labels for d in _BY_LABEL[label])
    if isinstance(value, dict) and isinstance(value.get("structuredContent"), dict):
        return _redact_tool_result(value, detectors, SECRET in labels)
    return _redact(value, detectors, SECRET in labels)


def _redact_tool_result(
    result: dict[str, Any], detectors: tuple[Detector, ...], keys: bool
) -> tuple[dict[str, Any], int]:
    """A tool's result redacted, with each text of its ``content`` that is the JSON of its
    ``structuredContent`` (a tool returning a dict has one) made the JSON of the redacted
    ``structuredContent``, its matches counted again: redacted as a text of its own, a
    number there would become ``[redacted:pii]``, which is no JSON. What the text's own
    redaction finds is redacted in the ``structuredContent``'s strings too; a text whose
    findings are left there (in a key) keeps its own redaction."""
    structured = result["structuredContent"]
    content = result.get("content")
    if not isinstance(content, list):
        return _redact(result, detectors, keys)
    mirrors = [_mirrors(block, structured) for block in content]
    if not any(mirrors):
        return _redact(result, detectors, keys)
    # (what else it has, ``isError`` or ``_meta``, as an object of its own)
    rest = {
        key: item for key, item in result.items() if key not in ("content", "structuredContent")
    }
    out, total = _redact(rest, detectors, keys)
    new_structured, found = _redact(structured, detectors, keys)
    # The copy's own text is read as well: it may hold what its structuredContent does
    # not (a duplicate key, which the parse that found it a copy kept the last of: found
    # by review), or what the walk of structuredContent missed. That was replaced by the
    # JSON of the structuredContent as it was, found secret and all (found by a bug hunt):
    # what the detectors find in the JSON of the redacted structuredContent (what the walk
    # left) is redacted wherever its strings hold it, and the text becomes its JSON only
    # when none of it is left there (in a key).
    own: dict[int, tuple[str, int]] = {}
    if not found:  # (else the copy becomes the JSON below, unless something is left)
        own = {
            i: _redact_text(block["text"], detectors)
            for i, block in _mirror_blocks(content, mirrors)
        }
    left = False
    mirror = orjson.dumps(new_structured).decode()
    if found or any(count for _, count in own.values()):
        findings: list[str] = []
        _redact_text(mirror, detectors, findings)
        if findings:
            new_structured, more, left = _redact_found(new_structured, _found_strings(findings))
            if more:
                found += more
                mirror = orjson.dumps(new_structured).decode()
    if left and len(own) < sum(mirrors):
        own = {
            i: _redact_text(block["text"], detectors)
            for i, block in _mirror_blocks(content, mirrors)
        }
    total += found
    blocks = list(content)
    for i, block in enumerate(content):
        if not mirrors[i]:
            blocks[i], count = _redact(block, detectors, keys)
        else:
            text, count = own.get(i, ("", 0))
            if left:
                if count:
                    blocks[i] = {**block, "text": text}
            elif found or count:
                blocks[i] = {**block, "text": mirror}
                count = found or count
        total += count
    if not total:
        return result, 0
    return {**result, **out, "content": blocks, "structuredContent": new_structured}, total


def _mirror_blocks(content: list[Any], mirrors: list[bool]) -> Iterator[tuple[int, Any]]:
    return ((i, block) for i, block in enumerate(content) if mirrors[i])


def _found_strings(findings: list[str]) -> frozenset[str]:
    """What the redaction of a JSON text took, as the strings of the value it is the JSON of
    hold it (``p\\"ss`` is ``p"ss``)."""
    found = set(findings)
    for finding in findings:
        if "\\" in finding:
            try:
                unescaped = orjson.loads(f'"{finding}"')
            except orjson.JSONDecodeError:
                continue
            if isinstance(unescaped, str):
                found.add(unescaped)
    found.discard("")
    return frozenset(found)


# How many of what the walk left are looked for inside each string (each is a pass over
# it): past it, a string equal to one is redacted, and the text keeps its own redaction.
_FOUND_SEARCHED = 32


def _redact_found(value: Any, found: frozenset[str]) -> tuple[Any, int, bool]:
    """``value`` with each of ``found`` in its strings replaced by the secret marker, how
    many were, and whether one may be left (in an object key, which is kept as it is)."""
    searched = sorted(found, key=len, reverse=True)[:_FOUND_SEARCHED]
    out, count, left = _replace_found(value, found, searched)
    return out, count, left or len(found) > _FOUND_SEARCHED


def _replace_found(value: Any, found: frozenset[str], searched: list[str]) -> tuple[Any, int, bool]:
    if isinstance(value, str):
        if value in found:
            return _SECRET_MARKER, 1, False
        count = 0
        for finding in searched:
            if finding in value:
                count += value.count(finding)
                value = value.replace(finding, _SECRET_MARKER)
        return value, count, False
    if isinstance(value, dict | list):
        # (an object's and an array's members alike, copied at the first one changed; an
        # object's keys are kept as they are, so one holding a finding is left)
        is_dict = isinstance(value, dict)
        members: Iterable[tuple[Any, Any]] = (
            value.items() if isinstance(value, dict) else enumerate(value)
        )
        total, left = 0, False
        out: Any = None
        for key, item in members:
            if is_dict and isinstance(key, str) and any(finding in key for finding in searched):
                left = True
            new, count, in_item = _replace_found(item, found, searched)
            left = left or in_item
            if count:
                if out is None:
                    out = dict(value) if is_dict else list(value)
                out[key] = new
                total += count
        return (value if out is None else out), total, left
    return value, 0, False


def _mirrors(block: Any, structured: dict[str, Any]) -> bool:
    """Whether a content block is a text holding the JSON of ``structured``."""
    if not isinstance(block, dict) or block.get("type") != "text":
        return False
    text = block.get("text")
    if not isinstance(text, str) or not text.startswith("{"):
        return False
    try:
        return bool(orjson.loads(text) == structured)
    except orjson.JSONDecodeError:
        return False


_SECRET_MARKER = f"[redacted:{SECRET}]"


def _credential_value(key: Any, item: Any) -> bool:
    """Whether ``item`` is the value of a credential given by name: ``"password": "…"``,
    or a list or object under such a name (``"password": ["…"]``) whole. A name is one
    when labelling finds it one in ``key=value`` (``Admin Password``, ``db/password``,
    ``$password``), or when all of ``key`` is one."""
    if isinstance(item, bool) or not isinstance(key, str):
        return False
    if isinstance(item, str):
        raw = item
    elif isinstance(item, (int, float)):
        raw = str(item)
    elif isinstance(item, (list, dict)):
        # (a name whose value is a credential whatever it looks like: not ``auth``)
        return bool(item) and (
            (len(key) <= 128 and CREDENTIAL_KEY.fullmatch(key) is not None)
            or _named_credential(key, "value", _NAMES)
        )
    else:
        return False
    text = raw.strip()
    if len(text) < 3 or text.lower() in ("null", "true", "false", "none"):
        return False
    if len(key) <= 128:  # (the patterns of a whole key backtrack: keys past it are read below)
        if CREDENTIAL_KEY.fullmatch(key) is not None:
            # (``{"PWD": "/home/me"}``: a working directory)
            return not (key[-3:].lower() == "pwd" and _DIRECTORY.match(text))
        if _AUTH_KEY.fullmatch(key) is not None and _AUTH_VALUE.fullmatch(text) is not None:
            return True
    # What a policy saw labelled secret in arguments (``label_value`` reads ``key=value``)
    # is redacted in a result: a key named otherwise than the patterns of a whole key
    # allow (``Client Secret``, ``DB__PASSWORD``, ``db:password``) kept its value in
    # clear (found by a bug hunt).
    return _named_credential(key, raw, _NAMES + _TOKEN_NAMES)


# The detectors of a credential given by name, whose name an object's key may be.
_NAMES = tuple(d for d in DETECTORS if d.name == "credential_assignment")
_TOKEN_NAMES = tuple(d for d in DETECTORS if d.name == "credential_token_assignment")
# How much of a value is read after its key: the detectors decide on its first characters.
_VALUE_READ = 1024


def _named_credential(key: str, value: str, detectors: tuple[Detector, ...]) -> bool:
    """Whether ``detectors`` find a credential given by name in ``key=value``, the name in
    ``key`` and its value past it."""
    lowered = key.lower()
    text = f"{key}={value[:_VALUE_READ]}"
    for detector in detectors:
        if not any(hint in lowered for hint in detector.hints):  # (each key of a result)
            continue
        for match in detector.pattern.finditer(text):
            if match.start() >= len(key):
                break
            if match.end() > len(key):
                return True
    return False


def _redact(value: Any, detectors: tuple[Detector, ...], keys: bool) -> tuple[Any, int]:
    if isinstance(value, str):
        return _redact_text(value, detectors)
    if isinstance(value, dict):
        total = 0
        out: dict[Any, Any] | None = None
        named = _named_value(value) if keys else None  # {"name": "DB_PASSWORD", "value": …}
        for key, item in value.items():
            if (keys and _credential_value(key, item)) or (named is not None and key == named[1]):
                new, count = _SECRET_MARKER, 1
            elif key == "blob" and isinstance(item, str):  # MCP's base64 resource contents
                new, count = _redact_blob(item, value.get("mimeType"), detectors)
            else:
                new, count = _redact(item, detectors, keys)
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
            new, count = _redact(item, detectors, keys)
            if count:
                if items is None:
                    items = list(value)
                items[i] = new
                total += count
        return (value if items is None else items), total
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _redact_number(value, detectors)
    return value, 0


# A number smaller holds nothing the detectors find (a card number has 13 to 19 digits).
_SMALLEST_FOUND = 10**12


def _redact_number(number: float, detectors: tuple[Detector, ...]) -> tuple[Any, int]:
    """A number in which the detectors find something (a card number sent as a number,
    ``4111111111111111`` or ``4111111111111111.0``) as the marker of its label, whole (a
    number partly replaced is no JSON); any other as it was."""
    if abs(number) < _SMALLEST_FOUND:  # (this runs on each number of a result)
        return number, 0
    if isinstance(number, float):
        # one with a fraction, or past 19 digits, is no card number: its digits as str()
        # writes them (1.6898647333460574e+297) are not for the detectors (found by review)
        if not number.is_integer() or abs(number) >= 1e19:
            return number, 0
        number_text = str(int(number))
    else:
        number_text = str(number)
    text = number_text
    for detector in detectors:
        if _first(detector, text) is not None:
            return f"[redacted:{detector.label}]", 1
    return number, 0


# What lenient decoders (Node's Buffer, Python's b64decode) read in a blob and the strict
# alphabet refuses: the URL-safe alphabet (``-`` and ``_``, which Node reads) as the other,
# and any character outside the alphabet (line breaks, whitespace, a stray ``!``) skipped;
# padding left off is added back.
_URL_SAFE = str.maketrans("-_", "+/")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/]+")
# Media types of text: a blob of one is redacted even with bytes that are not UTF-8 (a
# Latin-1 log); a blob of another type only when all of it is UTF-8.
_TEXT_MEDIA_TYPE = re.compile(
    r"text/|application/(?:[\w.-]+\+)?(?:json|xml|yaml|x-yaml|toml|javascript)(?![\w.+-])",
    re.IGNORECASE,
)


def _redact_blob(blob: str, media_type: Any, detectors: tuple[Detector, ...]) -> tuple[str, int]:
    """A base64 ``blob`` whose bytes are text (a ``.env`` file, JSON, a log read as a resource)
    with that text redacted, encoded again (canonically: padded, on one line); one that is
    not text (an image) redacted only where the detectors find something in its letters as
    they are (its bytes are not theirs to read; a string that is no base64, too). Its bytes are
    text when they are UTF-8, or when ``media_type`` says they are text: then a byte that is
    not UTF-8 is kept as it is, and what is around it is read; or when they are UTF-16 text
    without a mark (see :func:`_unmarked_utf16`)."""
    data = _blob_bytes(blob)
    if data is None:  # no base64: a string as any other (under a key "blob" in a result)
        return _redact_text(blob, detectors)
    # A byte order mark, or a charset the media type names, says how its text is encoded: a
    # UTF-16 text read as UTF-8 went out in clear (found by a bug hunt); without either, its
    # zero bytes may (a UTF-16 text without a mark went out in clear, found by review)
    bom, encoding = _blob_encoding(data, media_type)
    if encoding is None:
        encoding = _unmarked_utf16(data)
    if encoding is not None:
        try:
            text = data[len(bom) :].decode(encoding)
            redacted, count = _redact_text(text, detectors)
            if not count:
                return blob, 0
            encoded = bom + redacted.encode(encoding)
            return base64.b64encode(encoded).decode(), count
        except (UnicodeError, LookupError):
            pass  # (not that encoding after all: read as UTF-8, below)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        if not isinstance(media_type, str) or not _TEXT_MEDIA_TYPE.match(media_type):
            # Bytes that are not text, or a string that is no base64 but reads as some
            # once what is outside its alphabet is skipped (a .env file under a key "blob"):
            # what the detectors find in it as it is, redacted (found by review)
            return _redact_text(blob, detectors)
        text = data.decode(errors="surrogateescape")  # (encoded back to the same bytes)
    redacted, count = _redact_text(text, detectors)
    if not count:
        return blob, 0
    return base64.b64encode(redacted.encode(errors="surrogateescape")).decode(), count


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),  # (before UTF-16's, which starts it)
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([A-Za-z0-9_.:-]{1,40})", re.IGNORECASE)


def _blob_encoding(data: bytes, media_type: Any) -> tuple[bytes, str | None]:
    """The byte order mark ``data`` starts with (kept as it is) and the encoding of what
    follows it, or None for UTF-8's (the default): a UTF-16 or UTF-32 one the mark names, or
    the charset of a text ``media_type`` (``text/plain; charset=utf-16``)."""
    if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        for bom, encoding in _BOMS:
            if data.startswith(bom):
                return bom, encoding
    if isinstance(media_type, str) and _TEXT_MEDIA_TYPE.match(media_type):
        charset = _CHARSET.search(media_type)
        if charset is not None:
            name = charset.group(1).lower().replace("_", "-")
            if name in ("utf-16", "utf16", "utf-32", "utf32"):
                # without a mark, in the byte order its zero bytes say (ASCII's high bytes):
                # Python's codec would read the machine's, and write a mark back
                width = 4 if "32" in name else 2
                big = data[0::width].count(0) >= data[width - 1 :: width].count(0)
                return b"", f"utf-{width * 8}-{'be' if big else 'le'}"
            if name not in ("utf-8", "utf8"):
                return b"", name
    return b"", None


# How much of a blob with neither a mark nor a charset is read to tell whether it is UTF-16
# text: all of it is read only when that much is (a blob is at most a frame, 32 MiB).
_SNIFFED_BYTES = 4096
# What text holds none of, in UTF-16 as much as in bytes: a control character other than
# whitespace and ESC (a terminal's colours), a C1 control, U+FFFE and U+FFFF (no characters).
_NOT_TEXT = re.compile(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffe\uffff]")


def _unmarked_utf16(data: bytes) -> str | None:
    """``utf-16-le`` or ``utf-16-be`` when ``data``, which has neither a byte order mark nor
    a charset, is UTF-16 text of mostly ASCII or Latin-1 (.NET's ``Encoding.Unicode`` and
    Windows' wide strings write it so): of even length, the high byte of at least 7 in 8 of
    its first characters zero, and all of it text in that byte order (a zero only as its
    last character); else None. Bytes that are not (an image, an archive, random ones) are
    told at their first :data:`_SNIFFED_BYTES`."""
    if len(data) < 12 or len(data) % 2:  # (6 characters, ``a@b.co``: the shortest finding)
        return None
    head = data[:_SNIFFED_BYTES]
    half = len(head) // 2
    if head[1::2].count(0) * 8 >= half * 7:
        encoding = "utf-16-le"
    elif head[0::2].count(0) * 8 >= half * 7:
        encoding = "utf-16-be"
    else:
        return None
    # (a pair of surrogates the head cuts in two is no sign of bytes that are not text)
    text = head.decode(encoding, errors="replace")
    if len(data) > len(head):
        if _NOT_TEXT.search(text) is not None:
            return None
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:  # (a lone surrogate)
            return None
    end = len(text) - 1 if text.endswith("\0") else len(text)  # (a C string's ending zero)
    return None if _NOT_TEXT.search(text, 0, end) else encoding


def _blob_bytes(blob: str) -> bytes | None:
    """The bytes of a base64 ``blob``, read as lenient decoders read it, or None when it is
    not base64 even to them."""
    try:
        return base64.b64decode(blob, validate=True)
    except ValueError:  # (binascii.Error is one, as is a character that is not ASCII)
        pass
    compact = _NOT_BASE64.sub("", blob.translate(_URL_SAFE))
    if not compact:
        return None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except ValueError:
        return None


# The keys of a name/value pair: an environment list's (``name``), AWS tags' and Consul's
# (``Key``), 1Password fields' (``label``): only the first two were read (found by a bug
# hunt).
_PAIR_NAMES = ("name", "Name", "Key", "key", "label")
_PAIR_VALUES = ("value", "Value")


def _named_value(pair: dict[Any, Any]) -> tuple[str, str] | None:
    """The name and the key of the value of a name/value pair whose name is a credential's
    (``{"name": "DB_PASSWORD", "value": "…"}``, ``{"Key": "DB_PASSWORD", "Value": "…"}``),
    else None."""
    for name_key in _PAIR_NAMES:
        name = pair.get(name_key)
        if isinstance(name, str):
            for key in _PAIR_VALUES:
                if key in pair and _credential_value(name, pair[key]):
                    return name, key
    return None


def _redact_text(
    text: str, detectors: tuple[Detector, ...], findings: list[str] | None = None
) -> tuple[str, int]:
    """``text`` redacted, and how many matches were; what each took added to ``findings``."""
    total = 0
    lowered: str | None = None
    for detector in detectors:
        haystack = text
        if detector.fold:
            if lowered is None:
                lowered = text.lower()
            haystack = lowered
        for hint in detector.hints:
            if hint in haystack:
                break
        else:
            continue
        if _first(detector, text) is None:
            continue
        marker = f"[redacted:{detector.label}]"
        count = 0
        parts: list[str] = []
        end = 0
        for begin, stop in _spans(detector, text):
            if findings is not None:
                findings.append(text[begin:stop])
            parts.append(text[end:begin])
            parts.append(marker)
            end = stop
            count += 1
        parts.append(text[end:])
        text = "".join(parts)
        total += count
    return text, total


def _spans(detector: Detector, text: str) -> Iterator[tuple[int, int]]:
    """Where ``detector`` finds something in ``text``: what is to be redacted of each."""
    groups = [name for name in detector.pattern.groupindex if name.startswith("value")]
    for match in detector.pattern.finditer(text):
        if detector.check is not None and not detector.check(match):
            continue
        group: str | int = next((g for g in groups if match.start(g) >= 0), 0)
        begin = match.start(group)
        if detector.begin is not None:
            real = detector.begin(text, begin)
            if real is None:
                continue
            begin = real
        yield begin, match.end(group)


def _first(detector: Detector, text: str) -> object | None:
    if detector.check is None and detector.begin is None:
        return detector.pattern.search(text)
    if detector.begin is None:  # (no generator to resume: this runs on every governed call)
        for match in detector.pattern.finditer(text):
            if detector.check is not None and detector.check(match):
                return match
        return None
    return next(_spans(detector, text), None)
