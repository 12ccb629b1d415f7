"""The hash chain that makes the audit log tamper-evident, and its verifier.

Exact format, so a verifier we did not write can check a log:

- **Body.** An entry's ``body`` is the event the kernel passed plus ``"ts"``
  (submission time, Unix seconds as a float), encoded by
  ``orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)``: UTF-8 JSON, no
  whitespace, object keys sorted by code point at every depth, non-ASCII
  characters unescaped, floats in shortest round-trip form, NaN/Infinity as
  ``null``. Decoding a body and re-encoding it the same way gives the same bytes.
  ``entry.ts`` repeats the body's ``"ts"`` so it can be queried.
- **Hash.** ``hash = SHA-256(bytes.fromhex(prev_hash) || body)``, hex-encoded
  lowercase: the 32 raw bytes of the previous entry's hash, then the body bytes.
- **Chain.** Entry ``seq`` 1 has ``prev_hash = GENESIS`` (64 ``"0"``); entry
  ``n + 1`` has ``prev_hash`` = entry ``n``'s ``hash``. Seqs are gap-free, so an
  entry's seq is its position in the chain (it is not repeated in the body).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from mcp_zero.errors import McpZeroError
from mcp_zero.storage.base import AuditEntry, Store

GENESIS = "0" * 64
HASH_MISMATCH = "hash does not match prev_hash and body"
NOT_CANONICAL = "body is not in canonical form"

_CANONICAL = orjson.OPT_SORT_KEYS


class ChainBroken(McpZeroError):
    """The audit log fails verification at entry ``seq`` (``data`` holds seq and reason)."""

    code = "audit_chain_broken"
    http_status = 500

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(
            f"audit log broken at seq {seq}: {reason}; the log was altered or damaged"
            " after it was written — keep the file as evidence and restore from a backup",
            data={"seq": seq, "reason": reason},
        )
        self.seq = seq
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What a successful verification covered: ``count`` entries, ending at ``head_*``."""

    count: int
    head_seq: int  # 0 when no entry was checked
    head_hash: str  # the last entry's hash, or ``expected_prev`` when none was checked


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The canonical JSON bytes of ``obj`` (see the module docstring).

    Raises ``TypeError`` (``orjson.JSONEncodeError``) for values JSON cannot hold
    or non-string keys.
    """
    return orjson.dumps(obj, option=_CANONICAL)


def chain_hash(prev_hash: str, body: bytes) -> str:
    """``SHA-256(bytes.fromhex(prev_hash) || body)`` as lowercase hex."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + body).hexdigest()


def verify_chain(
    entries: Iterable[AuditEntry],
    expected_prev: str = GENESIS,
    *,
    start_seq: int | None = None,
) -> ChainReport:
    """Check that ``entries`` form an unbroken chain continuing from ``expected_prev``.

    ``entries`` must be consecutive, in seq order. The first must have seq
    ``start_seq``; when not given it is 1 if ``expected_prev`` is ``GENESIS``,
    otherwise whatever the first entry says (verifying a later page). For each
    entry checks the seq, ``prev_hash``, the recomputed ``hash``, that the body
    is canonical JSON of an object, and that its ``"ts"`` equals ``entry.ts``.

    Raises :class:`ChainBroken` naming the first entry that fails.
    """
    prev = expected_prev
    expected_seq = start_seq
    if expected_seq is None and expected_prev == GENESIS:
        expected_seq = 1
    count = 0
    head_seq = 0
    for entry in entries:
        if expected_seq is not None and entry.seq != expected_seq:
            raise ChainBroken(entry.seq, f"expected seq {expected_seq} (entries missing?)")
        if entry.prev_hash != prev:
            raise ChainBroken(entry.seq, "prev_hash does not match the previous entry's hash")
        if chain_hash(prev, entry.body) != entry.hash:
            raise ChainBroken(entry.seq, HASH_MISMATCH)
        _check_body(entry)
        prev = entry.hash
        head_seq = entry.seq
        expected_seq = entry.seq + 1
        count += 1
    return ChainReport(count=count, head_seq=head_seq, head_hash=prev)


def verify_store(store: Store, *, page: int = 10_000) -> ChainReport:
    """Verify a store's whole audit log from GENESIS, ``page`` entries at a time.

    Raises :class:`ChainBroken` at the first bad entry (a row below seq 1, outside the
    chain, first), and :class:`~mcp_zero.errors.StorageError` if the store cannot be read.
    """
    lowest = store.lowest_audit_seq()
    if lowest is not None and lowest < 1:
        raise ChainBroken(lowest, "entry outside the chain, which starts at seq 1")
    outside = store.audit_rows_outside()
    if outside:
        head = store.audit_head()
        raise ChainBroken(
            head.seq + 1 if head is not None else 1,
            f"{outside} row(s) whose seq is not an integer, outside the chain",
        )
    report = ChainReport(count=0, head_seq=0, head_hash=GENESIS)
    while True:
        batch = store.read_audit(after_seq=report.head_seq, limit=page)
        if not batch:
            # Each page is read after the last seq of the one before: a second row of that
            # seq (a table re-created without its primary key, a forged record chained from
            # the one before) was never read, and the head still matched (found by review).
            # Rows appended meanwhile have higher seqs.
            stored = store.audit_rows_upto(report.head_seq)
            if stored != report.count:
                raise ChainBroken(
                    report.head_seq,
                    f"{stored - report.count} row(s) up to here stored beside the chain's "
                    "(a seq stored twice: the table was altered)",
                )
            return report
        part = verify_chain(batch, report.head_hash, start_seq=report.head_seq + 1)
        report = ChainReport(
            count=report.count + part.count, head_seq=part.head_seq, head_hash=part.head_hash
        )


def hash_matches(entry: AuditEntry) -> bool:
    """Whether ``entry.hash`` is the hash of its ``prev_hash`` and body: whether the entry is
    as written, as far as it alone tells (its place in the chain is :func:`verify_chain`'s)."""
    try:
        return chain_hash(entry.prev_hash, entry.body) == entry.hash
    except ValueError:  # a prev_hash that is not hex
        return False


def read_event(entry: AuditEntry) -> dict[str, Any]:
    """The event ``entry``'s body holds; raises :class:`ChainBroken` if it holds none (the
    body is not a JSON object), without checking the chain."""
    try:
        event = orjson.loads(entry.body)
    except orjson.JSONDecodeError:
        raise ChainBroken(entry.seq, "body is not JSON") from None
    if not isinstance(event, dict):
        raise ChainBroken(entry.seq, "body is not a JSON object")
    return event


def readable_event(entry: AuditEntry) -> dict[str, Any]:
    """The event ``entry``'s body holds, or an empty one if it holds none (a damaged record,
    which ``mcp0 audit verify`` names): for a search of the log, to which it is no match.
    A damaged record that held a marker searched for at start made the start fail with a
    bare JSONDecodeError (found by a bug hunt)."""
    try:
        return read_event(entry)
    except ChainBroken:
        return {}


def _check_body(entry: AuditEntry) -> None:
    event = read_event(entry)
    try:
        in_form = canonical(event) == entry.body
    except TypeError:  # nested deeper than the encoder goes: no body we wrote
        in_form = False
    if not in_form:
        raise ChainBroken(entry.seq, NOT_CANONICAL)
    if event.get("ts") != entry.ts:
        raise ChainBroken(entry.seq, "ts column differs from the body's ts")
