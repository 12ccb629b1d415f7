"""The chain format and its verifier, on hand-built entries."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from mcp_zero.audit import (
    GENESIS,
    ChainBroken,
    canonical,
    chain_hash,
    verify_chain,
    verify_store,
)
from mcp_zero.storage import AuditEntry, SqliteStore


def _chain(
    events: list[dict[str, object]], prev: str = GENESIS, first: int = 1
) -> list[AuditEntry]:
    out = []
    for offset, event in enumerate(events):
        ts = 1000.0 + first + offset
        body = canonical({**event, "ts": ts})
        digest = chain_hash(prev, body)
        out.append(AuditEntry(seq=first + offset, ts=ts, body=body, prev_hash=prev, hash=digest))
        prev = digest
    return out


def test_canonical_sorts_keys_at_every_depth_without_whitespace() -> None:
    assert (
        canonical({"b": 1, "a": {"z": [1, 2], "y": "é"}})
        == '{"a":{"y":"é","z":[1,2]},"b":1}'.encode()
    )


def test_hash_is_sha256_of_raw_prev_hash_then_body() -> None:
    body = b'{"ts":1.5}'
    assert chain_hash(GENESIS, body) == hashlib.sha256(bytes(32) + body).hexdigest()
    prev = "ab" * 32
    assert chain_hash(prev, body) == hashlib.sha256(bytes.fromhex(prev) + body).hexdigest()


def test_valid_chain_verifies_whole_and_in_pages() -> None:
    entries = _chain([{"verb": "call_tool", "n": i} for i in range(10)])
    report = verify_chain(entries)
    assert (report.count, report.head_seq, report.head_hash) == (10, 10, entries[-1].hash)

    first = verify_chain(entries[:4])
    rest = verify_chain(entries[4:], first.head_hash, start_seq=first.head_seq + 1)
    assert rest.head_hash == report.head_hash

    empty = verify_chain([])
    assert (empty.count, empty.head_seq, empty.head_hash) == (0, 0, GENESIS)


def test_edited_body_is_reported_at_its_seq() -> None:
    entries = _chain([{"outcome": "denied"}] * 5)
    body = entries[2].body.replace(b"denied", b"allowed")
    entries[2] = replace(entries[2], body=body)
    with pytest.raises(ChainBroken) as caught:
        verify_chain(entries)
    assert caught.value.seq == 3
    assert "seq 3" in caught.value.message


def test_removed_entry_is_reported() -> None:
    entries = _chain([{"i": i} for i in range(5)])
    del entries[1]
    with pytest.raises(ChainBroken) as caught:
        verify_chain(entries)
    assert caught.value.seq == 3
    assert "expected seq 2" in caught.value.reason


def test_chain_must_start_at_genesis() -> None:
    entries = _chain([{"i": 1}], prev="11" * 32)
    with pytest.raises(ChainBroken, match="prev_hash"):
        verify_chain(entries)


@pytest.mark.parametrize("seq", [0, -7])
def test_a_row_stored_below_seq_1_is_reported(tmp_path: Path, seq: int) -> None:
    # it was outside what verification read: "ok" over a table holding a row more
    with SqliteStore(tmp_path / "mcp0.db") as store:
        store.append_audit_batch(_chain([{"i": i} for i in range(3)]))
        assert verify_store(store).count == 3
        forged = _chain([{"agent": "a1", "outcome": "allowed"}])[0]
        store.append_audit_batch([replace(forged, seq=seq)])
        with pytest.raises(ChainBroken) as caught:
            verify_store(store)
    assert caught.value.seq == seq
    assert caught.value.reason == "entry outside the chain, which starts at seq 1"


@pytest.mark.parametrize("twin", [4, 8, 2])
def test_a_seq_stored_twice_is_reported_wherever_the_pages_end(tmp_path: Path, twin: int) -> None:
    # A table re-created without its primary key took a second row of seq 4, chained from
    # seq 3 and saying something else: reading pages of 4 after the last seq read, verify
    # never met it and said ok with the true head (found by review)
    path = tmp_path / "mcp0.db"
    entries = _chain([{"i": i} for i in range(10)])
    with SqliteStore(path) as store:
        store.append_audit_batch(entries)
    forged = _chain([{"agent": "a1", "outcome": "denied"}], entries[twin - 2].hash, twin)[0]
    con = sqlite3.connect(path)
    con.executescript(
        """DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;
        CREATE TABLE audit2 (seq INTEGER, ts REAL NOT NULL, body BLOB NOT NULL,
            prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
        INSERT INTO audit2 SELECT * FROM audit ORDER BY seq;
        DROP TABLE audit; ALTER TABLE audit2 RENAME TO audit;"""
    )
    con.execute(
        "INSERT INTO audit VALUES (?, ?, ?, ?, ?)",
        (forged.seq, forged.ts, forged.body, forged.prev_hash, forged.hash),
    )
    con.commit()
    con.close()
    with SqliteStore(path) as store, pytest.raises(ChainBroken) as caught:
        verify_store(store, page=4)
    if twin % 4:  # inside a page: the chain's order tells
        assert (caught.value.seq, caught.value.reason) == (
            twin,
            f"expected seq {twin + 1} (entries missing?)",
        )
    else:  # the last of a page: the count tells
        assert caught.value.seq == 10
        assert caught.value.reason.startswith("1 row(s) up to here stored beside the chain's")


def test_rehashed_non_canonical_body_is_reported() -> None:
    # A forger who recomputes hashes must still write canonical bodies.
    body = b'{"ts": 1001.0}'
    forged = AuditEntry(1, 1001.0, body, GENESIS, chain_hash(GENESIS, body))
    with pytest.raises(ChainBroken, match="canonical"):
        verify_chain([forged])


def test_rehashed_body_nested_too_deep_to_encode_is_reported() -> None:
    # it raised the encoder's TypeError (past 254 levels) instead
    body = b'{"deep":' + b"[" * 300 + b"]" * 300 + b',"ts":1001.0}'
    forged = AuditEntry(1, 1001.0, body, GENESIS, chain_hash(GENESIS, body))
    with pytest.raises(ChainBroken, match="canonical"):
        verify_chain([forged])


def test_ts_column_must_match_the_hashed_ts() -> None:
    entry = _chain([{"i": 1}])[0]
    with pytest.raises(ChainBroken, match="ts column"):
        verify_chain([replace(entry, ts=entry.ts + 1)])


def test_body_round_trips_to_the_same_bytes() -> None:
    event = {"f": 0.1, "big": 2**63 - 1, "neg": -1e-300, "u": "✓\u2028", "n": None, "l": [True]}
    body = canonical({**event, "ts": 1.25})
    assert canonical(orjson.loads(body)) == body
