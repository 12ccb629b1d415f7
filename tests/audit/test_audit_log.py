"""AuditLog on a real SQLite store: group commit, chaining, failures, restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from pathlib import Path

import anyio
import orjson
import pytest

from mcp_zero.audit import GENESIS, AuditLog, ChainBroken, verify_chain, verify_store
from mcp_zero.audit.log import ROOM_CHECK_S
from mcp_zero.errors import StorageError
from mcp_zero.kernel.pipeline import _audit_failing
from mcp_zero.storage import AuditEntry, SqliteStore

pytestmark = pytest.mark.anyio


class FullDiskStore(SqliteStore):
    """A store whose audit writes fail like a full disk while ``full`` is set."""

    full = False

    def append_audit_batch(self, entries: list[AuditEntry], *, wait: bool = True) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super().append_audit_batch(entries, wait=wait)


def _event(i: int) -> dict[str, object]:
    return {
        "agent": f"a{i % 7}",
        "verb": "call_tool",
        "resource": "echo",
        "outcome": "allowed",
        "i": i,
    }


async def _append_many(log: AuditLog, count: int) -> list[AuditEntry]:
    results: list[AuditEntry | None] = [None] * count

    async def one(i: int) -> None:
        results[i] = await log.append(_event(i))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def test_concurrent_appends_are_gap_free_chained_and_batched(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        log = AuditLog(store)
        log.start()
        try:
            acked = await _append_many(log, 500)
        finally:
            await log.aclose()

        assert sorted(e.seq for e in acked) == list(range(1, 501))
        stored = store.read_audit(limit=1000)
        assert stored == sorted(acked, key=lambda e: e.seq)
        report = verify_store(store)
        assert (report.count, report.head_hash) == (500, stored[-1].hash)
        assert log.stats.events == 500
        assert log.stats.batches <= 50  # group commit: far fewer fsyncs than events
        assert log.stats.largest_batch > 1
        assert log.head == stored[-1]
        # What was acknowledged is the event plus ts, nothing lost.
        by_i = {orjson.loads(e.body)["i"]: e for e in acked}
        assert orjson.loads(by_i[42].body) == {**_event(42), "ts": by_i[42].ts}


async def test_sequential_appends_keep_submission_order(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0) as log:
        seqs = [(await log.append({"i": i})).seq for i in range(20)]
        assert seqs == list(range(1, 21))
        assert [orjson.loads(e.body)["i"] for e in store.read_audit()] == list(range(20))


async def test_restart_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with SqliteStore(path) as store, AuditLog(store) as log:
        await _append_many(log, 30)
        head = log.head
    assert head is not None
    assert head.seq == 30

    with SqliteStore(path) as store, AuditLog(store) as log:
        assert log.head == head
        entry = await log.append({"after": "restart"})
        assert (entry.seq, entry.prev_hash) == (31, head.hash)
        assert verify_store(store).count == 31


async def test_tampered_row_is_found_by_seq(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with SqliteStore(path) as store, AuditLog(store) as log:
        await _append_many(log, 40)

    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_no_update")  # an attacker with file access
    body = raw.execute("SELECT body FROM audit WHERE seq = 17").fetchone()[0]
    raw.execute(
        "UPDATE audit SET body = ? WHERE seq = 17", (bytes(body).replace(b"allowed", b"denied"),)
    )
    raw.commit()
    raw.close()

    with SqliteStore(path) as store:
        with pytest.raises(ChainBroken) as caught:
            verify_store(store, page=7)
        assert caught.value.seq == 17
        # Entries before the tampered one still verify.
        assert verify_chain(store.read_audit(limit=16)).head_seq == 16


async def _written_then_altered(path: Path, records: int, *statements: str) -> None:
    """A log of ``records`` records at ``path``, then ``statements`` run on its database
    behind its back, as an attacker with file access would (its no-update trigger dropped
    first)."""
    with SqliteStore(path) as store, AuditLog(store) as log:
        await _append_many(log, records)
    raw = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in ("DROP TRIGGER audit_no_update", *statements):
            raw.execute(statement)
    finally:
        raw.close()


async def test_a_newest_record_with_a_damaged_hash_is_named_as_such_by_the_appends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every append failed with "non-hexadecimal number found in fromhex()", logged as a
    # full disk ("free space, or raise db_max_mb")
    path = tmp_path / "a.db"
    await _written_then_altered(path, 3, "UPDATE audit SET hash = 'not hex' WHERE seq = 3")
    with SqliteStore(path) as store, AuditLog(store) as log:
        with pytest.raises(StorageError, match=r"newest audit record \(seq 3\) is damaged"):
            await log.append(_event(4))
        failure = str(log.stats.last_failure)  # (the server logs it as it starts: runtime)
        assert "free space" not in failure + caplog.text
        assert "the newest audit record (seq 3) is damaged" in failure


async def test_failed_batch_errors_every_appender_and_the_chain_resumes(tmp_path: Path) -> None:
    with FullDiskStore(tmp_path / "a.db") as store, AuditLog(store) as log:
        before = await _append_many(log, 10)
        store.full = True
        outcomes: list[BaseException | AuditEntry] = []

        async def one(i: int) -> None:
            try:
                outcomes.append(await log.append(_event(i)))
            except StorageError as exc:
                outcomes.append(exc)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(25):
                    tg.start_soon(one, i)
        assert len(outcomes) == 25
        assert all(isinstance(o, StorageError) for o in outcomes)
        assert "database or disk is full" in str(outcomes[0])
        assert log.stats.failed_events == 25
        assert log.head == max(before, key=lambda e: e.seq)

        store.full = False
        after = await _append_many(log, 10)
        assert sorted(e.seq for e in after) == list(range(11, 21))
        assert verify_store(store).count == 20


async def test_really_full_database_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    acked: list[AuditEntry] = []
    with SqliteStore(path, max_size_bytes=96 * 1024) as store, AuditLog(store) as log:
        failure: StorageError | None = None
        with anyio.fail_after(30):
            while failure is None:
                try:
                    acked.append(await log.append({"pad": "x" * 1500, "n": len(acked)}))
                except StorageError as exc:
                    failure = exc
        assert "it reached its size limit" in failure.message
        assert acked  # some fitted before the cap
        # Still full: a retry fails the same way and skips no seq.
        with pytest.raises(StorageError, match="full"):
            await log.append({"pad": "x" * 1500, "retry": True})

    with SqliteStore(path) as store, AuditLog(store) as log:  # space freed (no cap)
        entry = await log.append({"after": "space freed"})
        assert entry.seq == acked[-1].seq + 1
        assert entry.prev_hash == acked[-1].hash
        assert store.read_audit(limit=10_000)[:-1] == acked
        assert verify_store(store).count == len(acked) + 1


async def test_second_appender_chains_after_the_other_process(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with SqliteStore(path) as store_a, SqliteStore(path) as store_b:
        with AuditLog(store_a) as log_a, AuditLog(store_b) as log_b:
            first = await log_a.append({"by": "a"})
            # b read an empty head at start: its seq 1 collides, it re-reads the head and
            # chains after a's entry instead of forking or failing.
            second = await log_b.append({"by": "b"})
            third = await log_a.append({"by": "a", "again": True})
        assert (second.seq, second.prev_hash) == (2, first.hash)
        assert (third.seq, third.prev_hash) == (3, second.hash)
        assert verify_store(store_a).count == 3


async def test_close_drains_submitted_events(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        log = AuditLog(store, window=0.05)
        log.start()
        tasks = [asyncio.ensure_future(log.append({"i": i})) for i in range(100)]
        await asyncio.sleep(0)  # one loop turn: each task runs up to its await, so it has submitted
        await log.aclose()
        with anyio.fail_after(10):
            entries = await asyncio.gather(*tasks)
        assert sorted(e.seq for e in entries) == list(range(1, 101))
        assert len(store.read_audit()) == 100
        with pytest.raises(StorageError, match="not running"):
            await log.append({"late": True})


async def test_bad_events_fail_their_caller_only(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store) as log:
        with pytest.raises(ValueError, match="ts"):
            await log.append({"ts": 1.0})
        with pytest.raises(TypeError):
            await log.append({"obj": object()})
        entry = await log.append({"ok": True})
        assert entry.seq == 1
        assert entry.prev_hash == GENESIS


def test_append_sync_without_an_event_loop(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        log = AuditLog(store)
        with pytest.raises(StorageError, match="not running"):
            log.append_sync({"early": True})
        with log:
            first = log.append_sync({"cli": "agent create"})
            second = log.append_sync({"cli": "plugin install"})
        assert (first.seq, second.seq, second.prev_hash) == (1, 2, first.hash)
        assert verify_store(store).head_hash == second.hash


async def test_cancelled_appender_does_not_withdraw_its_event(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store) as log:
        task = asyncio.ensure_future(log.append({"who": "cancelled"}))
        await asyncio.sleep(0)  # one loop turn: the task submits, then awaits durability
        task.cancel()
        later = await log.append({"who": "later"})
        assert later.seq == 2
        assert task.cancelled()
        assert [orjson.loads(e.body)["who"] for e in store.read_audit()] == ["cancelled", "later"]


def test_start_twice_is_an_error(tmp_path: Path) -> None:
    with (
        SqliteStore(tmp_path / "a.db") as store,
        AuditLog(store) as log,
        pytest.raises(RuntimeError, match="twice"),
    ):
        log.start()


async def test_zero_window_commits_what_one_loop_turn_submitted(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0) as log:
        futures = [log.submit({"i": i}) for i in range(10)]  # one loop turn
        assert not any(f.done() for f in futures)  # nothing is durable before the commit
        with anyio.fail_after(10):
            entries = await asyncio.gather(*futures)
        assert [e.seq for e in entries] == list(range(1, 11))
        assert (log.stats.batches, log.stats.largest_batch) == (1, 10)


async def test_a_full_batch_commits_without_waiting_out_the_window(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        with AuditLog(store, window=60, max_batch=3) as log:
            first = [log.submit({"i": i}) for i in range(3)]
            # The third submit filled the batch: it is durable now, not in a minute.
            assert all(f.done() for f in first)
            assert [f.result().seq for f in first] == [1, 2, 3]
            late = log.submit({"i": 3})
            assert not late.done()  # a new batch, gathering again
            assert (log.stats.batches, log.stats.largest_batch) == (1, 3)
        # Closing the log committed the gathering one.
        assert late.result().seq == 4
        assert verify_store(store).count == 4


async def test_append_sync_on_the_loop_commits_the_gathering_batch_with_it(
    tmp_path: Path,
) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=60) as log:
        gathering = [log.submit({"call": i}) for i in range(3)]
        admin = log.append_sync({"admin": "plugin install"})
        # Submission order is chain order, and the sync append did not wait out the window.
        assert admin.seq == 4
        assert all(f.done() for f in gathering)
        assert [f.result().seq for f in gathering] == [1, 2, 3]
        assert log.stats.batches == 1
        assert verify_store(store).count == 4


def test_close_from_another_thread_resolves_callers_on_their_loop(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        log = AuditLog(store, window=60)
        log.start()
        submitted = threading.Event()
        outcome: list[AuditEntry] = []

        async def caller() -> None:
            future = log.submit({"from": "loop thread"})
            submitted.set()
            outcome.append(await future)

        def run_loop() -> None:
            asyncio.run(caller())

        thread = threading.Thread(target=run_loop)
        thread.start()
        assert submitted.wait(10)
        log.close()  # commits the loop's gathering batch from this thread
        thread.join(10)
        assert not thread.is_alive()
        assert [e.seq for e in outcome] == [1]
        assert len(store.read_audit()) == 1


async def test_a_store_locked_by_another_writer_does_not_hold_up_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with SqliteStore(path) as store, AuditLog(store, window=0) as log:
        other = sqlite3.connect(path, isolation_level=None)  # a CLI command writing
        try:
            other.execute("BEGIN IMMEDIATE")
            first = log.submit({"n": 1})
            # one loop turn: the batch was tried (call_soon runs before this task resumes),
            # found the store locked, and gave the loop back instead of waiting seconds
            await asyncio.sleep(0)
            assert not first.done(), first
            assert log.stats.busy_retries == 1
            second = log.submit({"n": 2})  # joins the waiting batch, after it
            await asyncio.sleep(0)
            assert not second.done()
            other.execute("COMMIT")
        finally:
            other.close()
        with anyio.fail_after(10):
            entries = [await first, await second]
        assert [e.seq for e in entries] == [1, 2]
        assert log.stats.failed_batches == 0
        assert verify_store(store).count == 2


async def test_a_lock_held_past_the_busy_timeout_fails_the_batch_and_the_chain_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.db"
    with SqliteStore(path, busy_timeout=0.2) as store, AuditLog(store, window=0) as log:
        acked = await log.append({"n": 0})
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            first = log.submit({"n": 1})
            await asyncio.sleep(0)
            later = log.submit({"n": 2})  # submitted while the batch waits: fails with it
            with anyio.fail_after(10), pytest.raises(StorageError, match="database is locked"):
                await first
            with pytest.raises(StorageError, match="database is locked"):
                await later
            assert log.stats.failing
            assert log.stats.failed_events == 2
            assert log.stats.busy_retries >= 1
            # and the calls refused meanwhile say so, not "a full disk" (found by review)
            assert "database is locked" in log.stats.last_failure
            assert "database is locked" in str(_audit_failing(log))
            # nor is the lock's holder told to free space, or raise db_max_mb (found by review)
            [logged] = [r.getMessage() for r in caplog.records if "cannot be written" in r.msg]
            for told in (logged, str(_audit_failing(log))):
                assert "another process held it too long" in told
                assert "free space" not in told
                assert "db_max_mb" not in told
        finally:
            other.close()  # (rolls back)
        entry = await log.append({"n": 3})
        assert (entry.seq, entry.prev_hash) == (2, acked.hash)
        assert verify_store(store).count == 2


async def test_admin_changes_in_threads_do_not_fail_the_loops_batches(tmp_path: Path) -> None:
    # Admin changes commit with their records in threads, holding the log's write lock: the
    # loop's batch, which only tried that lock, failed once its busy timeout passed, and
    # the log then refused every call (found by review)
    with SqliteStore(tmp_path / "a.db", busy_timeout=0.2) as store, AuditLog(store) as log:
        stop = threading.Event()
        changes = [0, 0, 0]

        def change(n: int) -> None:
            while not stop.is_set():
                log.append_with(lambda: None, lambda _: {"verb": "attach_plugin", "n": n})
                changes[n] += 1

        threads = [threading.Thread(target=change, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        try:
            with anyio.fail_after(30):
                for _ in range(5):
                    await _append_many(log, 40)
                    await asyncio.sleep(0.1)  # past the 0.2 s busy timeout in all
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert log.stats.failed_batches == 0
        assert not log.stats.failing
        assert min(changes) > 0
        assert verify_store(store).count == 200 + sum(changes)


async def test_a_store_without_room_fails_the_log_before_a_commit_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A disk filled by something else was found only by the next commit, after its call's
    # plugin had acted, and nothing was logged, then or on recovery (found by review)
    caplog.set_level(logging.INFO, logger="mcp_zero.audit")
    with SqliteStore(tmp_path / "a.db", max_size_bytes=1 << 20) as store, AuditLog(store) as log:
        assert log.check_room()
        store._max_size_bytes = (tmp_path / "a.db").stat().st_size + 4096  # nearly full
        assert not log.check_room()  # under 64 KiB of room
        assert log.stats.failing
        # which room: the disk's or the size limit's (this one), and what to do about it
        for told in (log.stats.last_failure, str(_audit_failing(log))):
            assert "is nearly full (less than 64 KiB left under its size limit" in told
            assert "raise db_max_mb and restart" in told
        assert not log.check_room()
        failed = [r for r in caplog.records if "cannot be written" in r.getMessage()]
        assert len(failed) == 1  # once
        store._max_size_bytes = 64 << 20  # room again
        store._audit_conn.execute("PRAGMA max_page_count = 1000000")
        log._room_checked = 0.0  # (past ROOM_CHECK_S)
        assert log.check_room()
        assert not log.stats.failing
        assert any("can be written again" in r.getMessage() for r in caplog.records)


async def test_a_log_failed_on_a_lock_stays_failing_while_the_lock_is_held(
    tmp_path: Path,
) -> None:
    # Room on the disk reopened it within a second while another process still held the
    # lock: the next calls ran their plugins and their records failed (found by review)
    path = tmp_path / "a.db"
    with SqliteStore(path, busy_timeout=0.1) as store, AuditLog(store, window=0) as log:
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with anyio.fail_after(10), pytest.raises(StorageError, match="database is locked"):
                await log.append({"n": 1})
            await asyncio.sleep(ROOM_CHECK_S)
            assert not log.writable()  # asked again: still locked
            assert "database is locked" in log.stats.last_failure
            other.execute("ROLLBACK")
        finally:
            other.close()
        await asyncio.sleep(ROOM_CHECK_S)
        assert log.writable()  # once its record of taking up again is durable (seq 1)
        [resumed] = [json.loads(e.body) for e in store.read_audit(0, 10)]
        assert (resumed["verb"], resumed["failed_events"]) == ("resume_audit_log", 1)
        assert "database is locked" in resumed["failure"]
        assert (await log.append({"n": 2})).seq == 2


@pytest.mark.parametrize("released", [True, False])
async def test_while_a_batch_waits_for_a_lock_calls_are_told_to_wait_until_it_is_done(
    tmp_path: Path, released: bool
) -> None:
    # Calls went on acting while a batch waited for another process's lock: held past the
    # busy timeout, the batch failed, and their records with it (found by review)
    path = tmp_path / "a.db"
    with SqliteStore(path, busy_timeout=0.3) as store, AuditLog(store, window=0) as log:
        assert log.unblocked() is None
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            first = log.submit({"n": 1})
            await asyncio.sleep(0)  # tried once, found locked, put back
            waiter = log.unblocked()
            assert waiter is not None
            assert not waiter.done()
            assert log.stats.blocked_since is not None
            if released:
                other.execute("ROLLBACK")
            with anyio.fail_after(10):
                await asyncio.wait((waiter,))
        finally:
            other.close()
        assert log.unblocked() is None
        assert log.stats.blocked_since is None
        if released:
            assert (await first).seq == 1
            assert not log.stats.failing
        else:
            with pytest.raises(StorageError, match="database is locked"):
                await first
            assert log.stats.failing  # the calls that waited are refused before they act


async def test_a_lock_another_process_holds_holds_calls_before_any_batch_finds_it(
    tmp_path: Path,
) -> None:
    # A call that came a while after another process took the lock acted, as no batch had
    # found it taken yet, and its record failed with the lock held past the busy timeout
    # (found by review). The server's look every second holds calls too.
    path = tmp_path / "a.db"
    with SqliteStore(path, busy_timeout=0.3) as store, AuditLog(store, window=0) as log:
        log.watch_lock()
        assert log.unblocked() is None  # free: nothing held
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            log.watch_lock()
            waiter = log.unblocked()
            assert waiter is not None
            assert log.stats.blocked_since is not None
            other.execute("ROLLBACK")  # let go within the busy timeout: calls go on
            with anyio.fail_after(10):
                await asyncio.wait((waiter,))
            assert not log.stats.failing
            assert log.unblocked() is None
            other.execute("BEGIN IMMEDIATE")  # held past it: the log fails
            log.watch_lock()
            waiter = log.unblocked()
            assert waiter is not None
            with anyio.fail_after(10):
                await asyncio.wait((waiter,))
            assert log.stats.failing
            assert "database is locked" in log.stats.last_failure
        finally:
            other.close()
        assert log.stats.blocked_since is None


class _HeldAnswers:
    """A Gatherer whose answers (futures its callers await) are given only when the log takes
    them in: as a plugin worker's are while its answers' pipe is held."""

    def __init__(self) -> None:
        self.held = False
        self.holds = 0
        self.due: list[asyncio.Future[None]] = []

    def answer_later(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.held:
            self.due.append(future)
        else:  # (read as it comes)
            future.set_result(None)
        return future

    def hold(self) -> None:
        self.held = True
        self.holds += 1

    def release(self, take_in: bool) -> bool:
        self.held = False
        if not take_in:
            return False
        took, self.due = self.due, []
        for future in took:
            future.set_result(None)
        return bool(took)


async def test_calls_answered_while_a_batch_gathers_join_it_at_one_wake_up(
    tmp_path: Path,
) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0.05) as log:
        answers = _HeldAnswers()
        log.gather_from(answers)

        async def call(i: int) -> AuditEntry:
            await answers.answer_later()  # its plugin's answer
            return await log.append({"call": i})

        first = log.submit({"call": "first"})  # a batch begins: the answers are held
        assert answers.held
        assert answers.holds == 1
        calls = [asyncio.create_task(call(i)) for i in range(3)]
        with anyio.fail_after(10):
            entries = [await first, *await asyncio.gather(*calls)]
        # Taken in as the window closed, the answered calls' records joined its batch.
        assert [e.seq for e in entries] == [1, 2, 3, 4]
        assert (log.stats.batches, log.stats.largest_batch) == (1, 4)
        assert not answers.held
        # A batch that takes in nothing commits as it did.
        assert (await log.append({"call": "alone"})).seq == 5
        assert (answers.holds, log.stats.batches) == (2, 2)


@pytest.mark.parametrize("how", ["append_sync", "close"])
async def test_a_batch_taken_early_lets_go_of_what_it_held(tmp_path: Path, how: str) -> None:
    with SqliteStore(tmp_path / "a.db") as store:
        log = AuditLog(store, window=60)
        log.start()
        answers = _HeldAnswers()
        log.gather_from(answers)
        gathering = log.submit({"call": 1})
        assert answers.held
        if how == "append_sync":
            assert log.append_sync({"admin": "change"}).seq == 2
        else:
            log.close()
        # Nothing left held without a window to end it: answers are read as they come.
        assert not answers.held
        assert gathering.done()
        assert gathering.result().seq == 1
        log.close()


async def test_a_call_sent_opens_the_window_its_answer_is_taken_in_with(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0.05) as log:
        answers = _HeldAnswers()
        log.gather_from(answers)

        async def call() -> AuditEntry:
            log.expect()  # as its plugin is sent the call: no batch gathers, one begins
            assert answers.held
            await answers.answer_later()
            return await log.append({"call": 1})

        with anyio.fail_after(10):
            entry = await call()
        assert entry.seq == 1
        assert (answers.holds, log.stats.batches) == (1, 1)
        # A window that closes before the plugin answers commits nothing, and lets go.
        log.expect()
        with anyio.fail_after(10):
            while answers.held:
                await asyncio.sleep(0.01)
        assert log.stats.batches == 1
        assert verify_store(store).count == 1


async def test_a_window_sent_a_batchs_worth_of_calls_lets_go_and_commits_them_full(
    tmp_path: Path,
) -> None:
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=60, max_batch=3) as log:
        answers = _HeldAnswers()
        log.gather_from(answers)

        async def call(i: int) -> AuditEntry:
            log.expect()
            await answers.answer_later()
            return await log.append({"call": i})

        # The third call sent let the answers go: the batch filled and committed at once,
        # not after its minute-long window.
        with anyio.fail_after(10):
            entries = await asyncio.gather(*(call(i) for i in range(3)))
        assert sorted(e.seq for e in entries) == [1, 2, 3]
        assert (log.stats.batches, log.stats.largest_batch) == (1, 3)
        assert not answers.held


async def test_a_log_whose_newest_record_is_damaged_is_failing_from_its_start_and_stays_so(
    tmp_path: Path,
) -> None:
    # It started writable, and reopened after each failed commit once the disk had room and
    # no lock was held: every call between ran its plugin and lost its record (found by
    # review). Taken up again only once a record of that is durable, which cannot follow a
    # damaged one.
    path = tmp_path / "a.db"
    await _written_then_altered(path, 1, "UPDATE audit SET hash = 'zz' WHERE seq = 1")
    with SqliteStore(path) as store, AuditLog(store, window=0) as log:
        assert not log.writable()
        assert "newest audit record (seq 1) is damaged" in str(log.stats.last_failure)
        await asyncio.sleep(ROOM_CHECK_S)
        assert not log.writable()  # room, and no lock: still no record can be made
        assert [e.seq for e in store.read_audit(0, 10)] == [1]


async def test_a_record_another_constraint_refuses_is_not_called_a_collision(
    tmp_path: Path,
) -> None:
    # Any IntegrityError was reported as two processes appending ("only one process may
    # append"), a trigger's refusal too (found by review)
    path = tmp_path / "a.db"
    await _written_then_altered(
        path,
        1,
        "CREATE TRIGGER no_more BEFORE INSERT ON audit "
        "BEGIN SELECT RAISE(ABORT, 'appends are closed'); END",
    )
    with (
        SqliteStore(path) as store,
        AuditLog(store, window=0) as log,
        pytest.raises(StorageError) as refused,
    ):
        await log.append({"n": 2})
    assert "appends are closed" in str(refused.value)
    assert "only one process may append" not in str(refused.value)


async def test_events_lost_in_one_run_are_recorded_by_the_next(tmp_path: Path) -> None:
    # A full db_max_mb is cleared only by a restart: the calls of the failed batch had
    # acted, and the next start recorded nothing of them; only memory had the count
    # (found by review). A note beside the store carries it to the next start's record.
    path, note = tmp_path / "a.db", tmp_path / "audit-lost.json"
    with SqliteStore(path, busy_timeout=0.1) as store:
        with AuditLog(store, window=0, lost_path=note) as log:
            assert log.lost_before == 0
            other = sqlite3.connect(path, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                with anyio.fail_after(10), pytest.raises(StorageError):
                    await asyncio.gather(log.append({"n": 1}), log.append({"n": 2}))
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert json.loads(note.read_bytes())["failed_events"] == 2
            assert "database is locked" in json.loads(note.read_bytes())["failure"]
        # (the process ends before the log is taken up again: the next one says so)
        with AuditLog(store, window=0, lost_path=note) as log:
            assert log.lost_before == 2
            assert log.record_lost_before()
            assert not note.exists()
            assert not log.record_lost_before()  # once
        [said] = [json.loads(e.body) for e in store.read_audit(0, 10)]
        assert (said["verb"], said["failed_before_restart"], said["failed_events"]) == (
            "resume_audit_log",
            2,
            0,
        )
        assert "database is locked" in said["failure"]


async def test_a_resumption_in_the_same_run_says_what_earlier_runs_lost_too(
    tmp_path: Path,
) -> None:
    path, note = tmp_path / "a.db", tmp_path / "audit-lost.json"
    note.write_bytes(b'{"failed_events": 3, "failure": "disk full"}')
    with (
        SqliteStore(path, busy_timeout=0.1) as store,
        AuditLog(store, window=0, lost_path=note) as log,
    ):
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with anyio.fail_after(10), pytest.raises(StorageError):
                await log.append({"n": 1})
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert json.loads(note.read_bytes())["failed_events"] == 4
        await asyncio.sleep(ROOM_CHECK_S)
        assert log.writable()
        [resumed] = [json.loads(e.body) for e in store.read_audit(0, 10)]
        assert (resumed["failed_events"], resumed["failed_before_restart"]) == (1, 3)
        assert not note.exists()


@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_records_gathered_while_failing_come_before_the_resumption(
    tmp_path: Path, where: str
) -> None:
    # The resumption record was committed at once, and what the loop had gathered (the
    # record of a call refused meanwhile) by its batch's timer after it: the log said the
    # refusal came after the log was taken up again (found by review)
    with FullDiskStore(tmp_path / "a.db") as store, AuditLog(store, window=30) as log:
        store.full = True
        with pytest.raises(StorageError, match="disk is full"):
            log.append_sync({"n": "lost"})
        assert log.stats.failing
        refused = log.submit({"n": "refused"})  # gathers for 30 s
        store.full = False
        log._room_checked = 0.0  # (past ROOM_CHECK_S)
        with anyio.fail_after(10):
            if where == "loop":  # a call asks
                assert log.writable()
            else:  # the server's watcher asks, from a thread
                assert await asyncio.to_thread(log.writable)
            assert (await refused).seq == 1
        records = [json.loads(e.body) for e in store.read_audit(0, 10)]
        assert [r.get("n", r.get("verb")) for r in records] == ["refused", "resume_audit_log"]
        assert records[1]["failed_events"] == 1
        assert verify_store(store).count == 2


async def test_records_gathered_while_a_resumption_fails_are_committed_by_their_batch(
    tmp_path: Path,
) -> None:
    # What a resumption took along goes back to its batch when it cannot be written
    with FullDiskStore(tmp_path / "a.db") as store, AuditLog(store, window=0.05) as log:
        store.full = True
        with pytest.raises(StorageError, match="disk is full"):
            log.append_sync({"n": "lost"})
        refused = log.submit({"n": "refused"})
        log._room_checked = 0.0
        assert not log.writable()  # its record fails too
        store.full = False  # (before the loop turns again: the batch is tried then)
        with anyio.fail_after(10):
            assert (await refused).seq == 1  # committed by its batch's timer
        assert log.stats.failing  # (no resumption record yet)
