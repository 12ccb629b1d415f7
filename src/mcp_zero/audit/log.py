"""The audit log: appends events to the hash chain, group-committed on the caller's loop.

Callers on an event loop :meth:`~AuditLog.submit` events; each loop gathers its
own batch for ``window`` seconds after the batch's first event (or until
``max_batch`` are waiting) so concurrent appends share one transaction and one
fsync. When the window closes, the loop itself assigns seq / prev_hash / hash,
hands the batch to :meth:`Store.append_audit_batch`, and resolves each caller's
future once the batch is durable. Callers without a loop (the CLI) use
:meth:`~AuditLog.append_sync`, which commits at once on the calling thread.

Why on the loop and not on a writer thread: at a steady load each batch is a
handful of events, and a thread costs more than the commit it runs — two
wake-ups per batch, a third to tell the loop, and the GIL passed back and forth
with the loop for every SQLite call (measured: the writer thread alone was 9.5%
of a core at 1,000 calls/s). The commit is on every tool call's path anyway (no
answer goes out before its record is durable), so the loop waiting for the fsync
(~0.2 ms here) delays nothing that was not already waiting for it. The cost is
that other requests (ping, list) also wait while a slow disk syncs.

The group commit does not wait for a lock, though: while another process holds the store's
write lock (a CLI command writing to the same data dir), a batch is not blocked on
it (the store's busy timeout, seconds) but put back, and tried again from the loop
(after 1 ms, then up to every 50 ms) until the store's busy timeout has passed since
its first try; events submitted meanwhile join it. Only then does it fail, as any
failed batch. Callers without a loop (and :meth:`~AuditLog.close`) wait in the store.

If a batch fails, every caller in it gets :class:`~mcp_zero.errors.StorageError`
and the chain tip goes back to the last durable entry (re-read from the store,
which stays the source of truth), so seqs stay gap-free and no acknowledged
entry is lost or skipped. Another process appending to the same store (the CLI
beside a running server) is chained after: a batch that collides with its
entries is re-sealed after the stored head.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeAlias, TypeVar

import orjson

from mcp_zero import fdio
from mcp_zero.audit.chain import GENESIS, canonical
from mcp_zero.errors import StorageError
from mcp_zero.storage.base import AuditEntry, Store, StoreBusy

T = TypeVar("T")
log = logging.getLogger("mcp_zero.audit")

#: What a failed log needs free (on disk, and under the store's size limit) to take calls
#: again: a few batches' worth.
ROOM_BYTES = 64 << 10
ROOM_CHECK_S = 0.5
LOCK_LOOK_S = 0.05  # while calls wait for a lock another process holds, looked at so often

_Waiter: TypeAlias = asyncio.Future[AuditEntry] | concurrent.futures.Future[AuditEntry]
# The running loop, or None outside one: asyncio's C function, without the exception (and
# the Python function around it) that get_running_loop raises there.
_running_loop = asyncio.events._get_running_loop


_MAX_ATTEMPTS = 3

# The group-commit defaults (and ``mcp0 serve``'s, through config.Settings). A batch
# waits up to DEFAULT_WINDOW seconds after its first event, so a steady load pays one
# fsync per few calls; DEFAULT_MAX_BATCH ends the wait early, so many concurrent
# callers do not each sit out the window (measured trade: docs/configuration.md).
DEFAULT_WINDOW = 0.005
DEFAULT_MAX_BATCH = 32

# A batch that found the store locked by another writer is tried again after half the time
# it has waited, within these bounds: soon after a short lock, not 1,000 times a second
# through a long one.
_BUSY_MIN_DELAY = 0.001
_BUSY_MAX_DELAY = 0.05


@dataclass(slots=True)
class AuditStats:
    """Counters of committed and failed batches (read them from anywhere)."""

    batches: int = 0  # batches made durable
    events: int = 0  # entries made durable
    failed_batches: int = 0
    failed_events: int = 0
    largest_batch: int = 0
    busy_retries: int = 0  # times a batch found the store locked by another writer, retried
    failing: bool = False  # a batch failed (a full disk…) and the store has not room again
    # since when a batch waits for another writer's lock (None: none does); calls wait
    blocked_since: float | None = None
    last_failure: str = ""  # why the last failed batch failed


class _Pending:
    """An event submitted, encoded with its time, and who waits for its entry."""

    __slots__ = ("body", "loop", "ts", "waiter")

    def __init__(
        self,
        event: Mapping[str, Any],
        waiter: _Waiter,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        """Raises ValueError if ``event`` carries "ts", TypeError if JSON cannot hold it."""
        if "ts" in event:
            raise ValueError("audit events must not carry 'ts': the audit log sets it")
        ts = time.time()
        # Encoded at submission: a bad event fails its caller only, and later
        # mutation of the caller's dict cannot change what is recorded.
        self.body = canonical({**event, "ts": ts})
        self.ts = ts
        self.waiter = waiter
        self.loop = loop  # None: ``waiter`` is a concurrent future (append_sync)


class _Batch:
    """The events one event loop has gathered, and the timer that commits them."""

    __slots__ = ("busy_since", "expected", "held", "pending", "timer")

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.timer: asyncio.Handle | None = None
        # when the first of ``pending`` found the store locked by another writer (monotonic)
        self.busy_since: float | None = None
        self.held = False  # its loop's Gatherer is held while it gathers
        self.expected = 0  # calls sent to plugins while it gathers (AuditLog.expect)


class Gatherer(Protocol):
    """What on a loop leads to events and can keep back its input: the plugin workers, whose
    answers end calls that then submit their records. While a batch gathers, the log holds
    it (its answers are left unread), and takes in what it sent just before the batch
    commits: a call answered within the window still joins that batch, and the loop is woken
    once for the batch instead of once per answer (measured: docs/architecture.md)."""

    def hold(self) -> None:
        """Leave what it sends unread (a batch began to gather)."""

    def release(self, take_in: bool) -> bool:
        """Read what it sends again; with ``take_in``, first take in, now, what it sent
        meanwhile. True when something was taken in."""


class AuditLog:
    """The append side of a store's audit log.

    ``window`` (seconds) is how long a batch gathers after its first event;
    ``max_batch`` caps a batch. Use :meth:`start` / :meth:`close` or ``with
    AuditLog(store) as log:``.
    """

    def __init__(
        self,
        store: Store,
        *,
        window: float = DEFAULT_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        lost_path: Path | None = None,
    ) -> None:
        if window < 0:
            raise ValueError("window must be >= 0 seconds")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._store = store
        self._window = window
        self._max_batch = max_batch
        # _lock guards the batches and the running state (held for microseconds);
        # _write_lock serialises commits and guards the chain head.
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._batches: dict[asyncio.AbstractEventLoop, _Batch] = {}
        self._started = False
        self._closing = False
        self._head: AuditEntry | None = None
        self.stats = AuditStats()
        self._room_checked = 0.0  # when writable() last asked the store for room
        self._probing = threading.Lock()  # held by the one writable() that looks
        # per loop whose batch waits for another writer's lock: done when it no longer does
        self._unblocked: dict[asyncio.AbstractEventLoop, asyncio.Future[None]] = {}
        self._gatherers: dict[asyncio.AbstractEventLoop, Gatherer] = {}
        # Where a server notes how many of its events failed, until a record says so: the
        # count outlives the process (a full db_max_mb is cleared only by a restart, and
        # the next start recorded nothing of the calls that had acted: found by review)
        self._lost_path = lost_path
        self.lost_before = _read_lost(lost_path)  # failed in earlier runs, not yet recorded

    @property
    def head(self) -> AuditEntry | None:
        """The last durable entry this log knows of (None for an empty log)."""
        return self._head

    def start(self) -> None:
        """Read the chain head from the store; appends are accepted from now on.

        Raises ``StorageError`` if the store cannot be read, ``RuntimeError``
        if called twice.
        """
        with self._lock:
            if self._started:
                raise RuntimeError("AuditLog.start() called twice")
            with self._write_lock:
                self._head = self._store.audit_head()
            # a store already full refuses the first call too, not only those after a failure,
            # and so does a newest record no record can follow (damaged)
            short = self._store.short_of_room(ROOM_BYTES)
            if short is None:
                try:
                    _chained_from(self._head)
                except StorageError as exc:
                    short = exc.message
            if short is not None:
                self.stats.failing = True
                self.stats.last_failure = short
            self._room_checked = time.monotonic()
            self._started = True

    def close(self) -> None:
        """Commit every event already submitted; later appends raise ``StorageError``.

        Idempotent. Call it on the loop that submitted (or after that loop has
        stopped submitting): a batch still gathering on another loop is
        committed here, its callers told through their loop.
        """
        with self._lock:
            self._closing = True
            loops = list(self._batches)
        for loop in loops:
            self._flush(loop, wait=True)

    async def aclose(self) -> None:
        """:meth:`close` from a coroutine."""
        self.close()

    def __enter__(self) -> AuditLog:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def append(self, event: Mapping[str, Any]) -> AuditEntry:
        """Append ``event``; return its entry once it is durable.

        The log adds ``"ts"`` (so ``event`` must not carry one). Cancelling the
        caller does not withdraw a submitted event. Raises ``TypeError`` if
        ``event`` is not JSON-encodable, ``ValueError`` if it has ``"ts"``,
        and ``StorageError`` if the log is not running or its batch failed.
        """
        return await self.submit(event)

    def submit(self, event: Mapping[str, Any]) -> asyncio.Future[AuditEntry]:
        """Submit ``event`` to this loop's batch; return the future its durable entry resolves.

        Once submitted, the event is committed with its batch whatever happens
        to the caller: cancelling the future (or the task awaiting it) only
        stops the waiting. Raises as :meth:`append`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEntry] = loop.create_future()
        pending = _Pending(event, future, loop)
        with self._lock:
            if not self._started or self._closing:  # (as _check_running, a call less per event)
                raise _not_running()
            batch = self._batch(loop)
            batch.pending.append(pending)
            # (a batch waiting for another writer's lock is tried by its timer only)
            full = len(batch.pending) >= self._max_batch and batch.busy_since is None
            gatherer = None
            if not full and batch.timer is None:
                if self._window > 0:
                    gatherer = self._open_window(loop, batch)
                else:  # no window: what this loop turn submits is one batch
                    batch.timer = loop.call_soon(self._flush, loop)
        if full:
            self._flush(loop)
        elif gatherer is not None:
            gatherer.hold()
        return future

    def expect(self) -> None:
        """(On a loop.) A record is on its way: a plugin was sent a call, whose record comes
        once it answers. If no batch gathers on this loop, one begins now, with its window
        and the hold of its gatherer: the answer, taken in as the window closes, costs no
        wake-up of its own, and its record joins that batch (one that closes empty, the
        plugin still at work, commits nothing). Once as many calls as fill a batch
        (``max_batch``) were sent in a window, the gatherer is let go: their answers are
        read as they come, and the batch commits when full, not when its window closes (a
        load that fills batches keeps the loop awake anyway)."""
        loop = _running_loop()
        if loop is None or self._window <= 0:
            return
        hold = let_go = None
        with self._lock:
            if not self._started or self._closing:
                return
            batch = self._batch(loop)
            batch.expected += 1
            if batch.timer is None:
                hold = self._open_window(loop, batch)
            elif batch.held and batch.expected >= self._max_batch:
                batch.held = False
                let_go = self._gatherers.get(loop)
        if hold is not None:
            hold.hold()
        elif let_go is not None:
            let_go.release(take_in=True)

    def _batch(self, loop: asyncio.AbstractEventLoop) -> _Batch:
        """``loop``'s batch, made at its first event (under the log's lock)."""
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = _Batch()
        return batch

    def _open_window(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> Gatherer | None:
        """Begin ``batch``'s window (under the log's lock): the gatherer it holds, if any, for
        the caller to hold once the lock is let go."""
        batch.timer = loop.call_later(self._window, self._flush, loop)
        gatherer = self._gatherers.get(loop)
        batch.held = gatherer is not None
        return gatherer

    def gather_from(self, gatherer: Gatherer) -> None:
        """(On its loop.) Hold ``gatherer`` while this loop's batch gathers, and take in what
        it sent before the batch commits (see :class:`Gatherer`). Replaces the one given
        before on this loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._gatherers[loop] = gatherer

    def append_sync(self, event: Mapping[str, Any]) -> AuditEntry:
        """Append ``event`` at once, for code without an event loop (the CLI).

        Returns once the entry is durable; on a loop's thread, that loop's
        gathering batch is committed first, in the same transaction. Raises as
        :meth:`append`.
        """
        future: concurrent.futures.Future[AuditEntry] = concurrent.futures.Future()
        pending = _Pending(event, future, None)
        items = self._gathered()
        items.append(pending)
        self._commit(items)
        return future.result(0)

    def append_with(self, change: Callable[[], T], event_of: Callable[[T], Mapping[str, Any]]) -> T:
        """Make ``change`` (writes through the log's store) and append the event
        ``event_of`` makes of its result, in one transaction; return what ``change``
        returned. Both are durable then, or — when this raises — neither happened. For the
        actions that change the store (agents, plugins): made apart, a crash between the
        change and its commit left a change with no record. Blocks for one commit. On a
        loop's thread, that loop's gathering batch is committed first, on its own; from
        another thread (the admin API's changes), it commits on its own timer, so its
        records may come after this one. Raises what ``change`` raises, and as
        :meth:`append`."""
        gathered = self._gathered()
        if gathered:
            self._commit(gathered)  # not in our transaction: a refused change must not undo it
        results: list[T] = []

        def write() -> list[AuditEntry]:
            sealed: list[AuditEntry] = []

            def entries_for(result: T) -> list[AuditEntry]:
                future: concurrent.futures.Future[AuditEntry] = concurrent.futures.Future()
                sealed[:] = self._seal([_Pending(event_of(result), future, None)])
                return sealed

            results[:] = [self._store.append_audit_with(change, entries_for)]
            return sealed

        try:
            self._write_chained(write)
        except StorageError as exc:
            # the store's failure, not the change's (a refused change raises its own): a
            # full store refuses calls from now on, before their plugins run, as a failed
            # batch makes it
            if self._store.short_of_room(ROOM_BYTES) is not None:
                self._fail(str(exc))
            raise
        with self._lock:  # (also the loop's thread counts)
            self.stats.batches += 1
            self.stats.events += 1
        return results[0]

    def writable(self) -> bool:
        """Whether calls may run: False from a failed commit until the store has room again
        (``ROOM_BYTES``) and no other process holds its write lock (asked at most every
        ``ROOM_CHECK_S``). A record that still fits does not reopen a full log: its calls'
        records, bigger and more, would not; nor does room while the store is still locked:
        calls taken again would act, and their records fail (found by review)."""
        if not self.stats.failing:
            return True
        # One look at a time (the loop's calls and /readyz, the watcher's thread): a second
        # waited for the first's commit, then wrote a resumption record of its own (review)
        if not self._probing.acquire(blocking=False):
            return False
        try:
            now = time.monotonic()
            if (
                self.stats.failing
                and self._started
                and not self._closing
                and now - self._room_checked >= ROOM_CHECK_S
            ):
                self._room_checked = now
                why = (
                    self._store.short_of_room(ROOM_BYTES)
                    or self._store.write_blocked()
                    or self._record_resumption()
                )
                if why is None:
                    log.warning(
                        "the audit log can be written again (%d events failed meanwhile): "
                        "calls are taken again",
                        self.stats.failed_events,
                    )
                else:
                    self.stats.last_failure = why
        finally:
            self._probing.release()
        return not self.stats.failing

    def _record_resumption(self) -> str | None:
        """Commit the record that the log is taken up again, with how many events failed
        and the last failure: the proof that a commit goes through, which room and a free
        lock are not. An I/O error, a file system remounted read-only or a damaged newest
        record reopened the log within a second, over and over, and each call between ran
        its plugin and lost its record (found by review). What the loops gathered meanwhile
        (the records of calls refused while it failed) is committed first, in the same
        transaction: it came before, and its own timer committed it after the record (found
        by review). None once durable; else why not."""
        failed = self.stats.failed_batches
        taken = self._take_gathered()
        event = self._resumption(self.stats.failed_events, self.stats.last_failure)
        items = [pending for _, gathered, _ in taken for pending in gathered]
        items.append(_Pending(event, concurrent.futures.Future(), None))
        try:
            # Not waiting for another process's lock, nor this log's: on the loop, a wait
            # would stall it up to the busy timeout (found by review)
            entries = self._write_chained(
                functools.partial(self._store_sealed, items, False),
                wait=False,
                lock_timeout=0,
            )
        except StoreBusy as exc:
            self._give_back(taken)
            return f"the audit log's store is still locked by another writer ({exc})"
        except Exception as exc:
            self._give_back(taken)
            return str(exc)
        self.stats.batches += 1
        self.stats.events += len(entries)
        self.stats.largest_batch = max(self.stats.largest_batch, len(entries))
        _settle(items, entries, None)
        for loop, _, _ in taken:
            self._unblock(loop)
        with self._lock:
            if self.stats.failed_batches != failed:  # a batch failed meanwhile: not yet
                return self.stats.last_failure or "a batch failed meanwhile"
            self.stats.failing = False
        self._recorded_lost()
        return None

    def _take_gathered(
        self,
    ) -> list[tuple[asyncio.AbstractEventLoop, list[_Pending], float | None]]:
        """What every loop has gathered and not committed, taken from its batch: each loop,
        its events, and since when its batch has found the store locked (None: it has not)."""
        with self._lock:
            taken = [
                (loop, *_take(batch, loop))
                for loop, batch in self._batches.items()
                if batch.pending
            ]
        for loop, _, _ in taken:
            self._let_go(loop, take_in=False)
        return taken

    def _give_back(
        self, taken: list[tuple[asyncio.AbstractEventLoop, list[_Pending], float | None]]
    ) -> None:
        """Put what :meth:`_take_gathered` took back in front of its batches, to be committed
        (or failed) by their timers, as if it had never been taken."""
        here = _running_loop()
        for loop, gathered, busy_since in taken:
            with self._lock:
                batch = self._batch(loop)
                batch.pending[:0] = gathered
                if busy_since is not None and batch.busy_since is None:
                    batch.busy_since = busy_since
                if batch.timer is not None:
                    continue
                if loop is here:
                    batch.timer = loop.call_soon(self._flush, loop)
                    continue
                with contextlib.suppress(RuntimeError):  # (its loop closed: no one waits)
                    batch.timer = loop.call_soon_threadsafe(self._flush, loop)

    def _resumption(self, failed: int, failure: str) -> dict[str, Any]:
        """The record of the log taken up again after ``failed`` events failed in this
        process (the last failure: ``failure``), and those of earlier runs noted."""
        event: dict[str, Any] = {
            "agent": "admin",  # (the server's own doing, as its admin's: kernel.admin.ADMIN)
            "anonymous": False,
            "verb": "resume_audit_log",
            "resource": "audit",
            "transport": "server",
            "outcome": "allowed",
            "failed_events": failed,
            "failure": failure,
        }
        if self.lost_before:
            event["failed_before_restart"] = self.lost_before
        return event

    def record_lost_before(self) -> bool:
        """(A server, at its start.) If events of an earlier run failed and no record says
        so yet, commit the record that says how many (``resume_audit_log`` with
        ``failed_before_restart``) while the log can be written: True when one was."""
        if not self.lost_before or self.stats.failing:
            return False
        noted = _read_lost_note(self._lost_path)
        self.append_sync(self._resumption(0, str(noted.get("failure", ""))))
        self._recorded_lost()
        return True

    def _recorded_lost(self) -> None:
        """A record now says how many events failed: the note of them goes."""
        self.lost_before = 0
        if self._lost_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lost_path.unlink()

    def _note_lost(self, count: int) -> None:
        """Add ``count`` failed events to the note that outlives the process (written
        whole, then renamed over the last); a note that cannot be written is logged."""
        path = self._lost_path
        if path is None:
            return
        noted = _read_lost_note(path)
        noted["failed_events"] = int(noted.get("failed_events", 0)) + count
        noted["failure"] = self.stats.last_failure
        fresh = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fdio.write_all(fd, orjson.dumps(noted))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(fresh, path)
        except OSError as exc:
            log.warning(
                "could not note in %s that %d audit event(s) failed (%s): only this log says so",
                path,
                noted["failed_events"],
                exc,
            )

    def check_room(self) -> bool:
        """Whether the store has room for a few batches; when it has not, the log fails
        from now on (calls refused before their plugins act, /readyz 503) as a failed commit
        makes it. A server asks every second: a disk filled by something else is found
        before a call acts and then cannot be recorded (found by review)."""
        if self.stats.failing:
            return self.writable()
        short = self._store.short_of_room(ROOM_BYTES)
        if short is None:
            return True
        self._fail(short)
        return False

    def unblocked(self) -> asyncio.Future[None] | None:
        """While this loop's batch waits for another writer's lock (``stats.blocked_since``):
        a future done once that batch has committed or failed; None when it does not wait.
        A call that acted meanwhile would have its record in a batch that may fail (the lock
        held past the busy timeout): calls wait for it before they act (found by review)."""
        loop = _running_loop()
        return self._unblocked.get(loop) if loop is not None else None

    def watch_lock(self) -> None:
        """(On the loop, every second: the server's watcher.) Hold the loop's calls as a
        waiting batch does while another process holds the store's write lock, looked at
        again every ``LOCK_LOOK_S``: the calls that came before a batch had found it taken
        acted, and lost their records with it (found by review). Held past the busy timeout,
        the log fails, and calls are refused; a lock let go lets them act. Nothing is
        failed by a look alone: a command's write holds the lock for milliseconds."""
        loop = _running_loop()
        if loop is None or self.stats.failing or loop in self._unblocked:
            return
        if self._store.write_blocked() is None:
            return
        waiter = self._unblocked[loop] = loop.create_future()
        since = time.monotonic()
        if self.stats.blocked_since is None:
            self.stats.blocked_since = since
        loop.call_later(LOCK_LOOK_S, self._look_again, loop, waiter, since)

    def _look_again(
        self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], since: float
    ) -> None:
        if self._unblocked.get(loop) is not waiter:  # (a batch committed meanwhile, or failed)
            return
        try:
            why = None if self._closing else self._store.write_blocked()
        except StorageError:  # (closed under it: the calls meet that themselves)
            why = None
        if why is not None and time.monotonic() - since >= self._store.busy_timeout:
            self._fail(why)
        elif why is not None:
            loop.call_later(LOCK_LOOK_S, self._look_again, loop, waiter, since)
            return
        self._unblock(loop)

    def _fail(self, why: str) -> None:
        """From now on calls are refused until writable() finds room; logged once."""
        with self._lock:
            self._room_checked = time.monotonic()
            self.stats.last_failure = why
            if self.stats.failing:
                return
            self.stats.failing = True
        # (``why`` says what to do: a full disk's advice was added to a lock's too)
        log.error("the audit log cannot be written (%s): every call is refused until it can", why)

    def _gathered(self) -> list[_Pending]:
        """What this thread's loop has gathered and not committed (taken from its batch);
        raises StorageError when the log is not running."""
        loop = _running_loop()
        with self._lock:
            self._check_running()
            batch = self._batches.get(loop) if loop is not None else None
            items = _take(batch, loop)[0] if batch is not None else []
        if loop is not None:
            self._let_go(loop, take_in=False)
        return items

    def _check_running(self) -> None:
        if not self._started or self._closing:
            raise _not_running()

    # committing

    def _flush(self, loop: asyncio.AbstractEventLoop, *, wait: bool = False) -> None:
        """Commit ``loop``'s batch (its timer, a full batch, or close: ``wait``). On the
        loop's own thread and without ``wait``, a store locked by another writer is not
        waited for: the batch goes back, to be tried again by a timer, until the store's
        busy timeout has passed since its first try."""
        if self._let_go(loop, take_in=not wait):
            return  # committed in this turn of the loop, after what was taken in
        with self._lock:
            batch = self._batches.get(loop)
            if batch is None:
                return
            items, busy_since = _take(batch, loop)
        if not items:
            return
        if wait or loop is not _running_loop():
            self._commit(items)
            self._unblock(loop)
            return
        now = time.monotonic()
        final = busy_since is not None and now - busy_since >= self._store.busy_timeout
        if self._commit(items, wait=False, retry=not final):
            if self._unblocked:  # (a batch waited for a lock: once in a blue moon)
                self._unblock(loop)
            return
        self.stats.busy_retries += 1
        since = now if busy_since is None else busy_since
        if loop not in self._unblocked:
            self._unblocked[loop] = loop.create_future()
            if self.stats.blocked_since is None:
                self.stats.blocked_since = since
        delay = min(max((now - since) / 2, _BUSY_MIN_DELAY), _BUSY_MAX_DELAY)
        with self._lock:  # back in front of what was submitted meanwhile, tried again later
            batch.pending[:0] = items
            batch.busy_since = since
            if batch.timer is not None:
                batch.timer.cancel()
            batch.timer = loop.call_later(delay, self._flush, loop)

    def _let_go(self, loop: asyncio.AbstractEventLoop, *, take_in: bool) -> bool:
        """End the hold of ``loop``'s gatherer, if its batch holds it; with ``take_in``, what
        it sent meanwhile is taken in first. True when something was: the calls it answered
        go on to submit their records (their tasks are due in this turn of the loop), and
        the batch is committed after them, in this turn too (its timer is that)."""
        with self._lock:
            batch = self._batches.get(loop)
            if batch is None or not batch.held:
                return False
            batch.held = False
            gatherer = self._gatherers.get(loop)
        if gatherer is None:
            return False
        if loop is not _running_loop():  # (close, from another thread): the loop lets go
            with contextlib.suppress(RuntimeError):  # (its loop closed: nothing to read)
                loop.call_soon_threadsafe(gatherer.release, False)
            return False
        try:
            took = gatherer.release(take_in)
        except Exception:  # (its failure must not keep the batch from its commit)
            log.exception("taking in what the audit batch held back failed")
            return False
        if not took or not take_in:
            return False
        with self._lock:
            if batch.timer is not None:
                batch.timer.cancel()
            batch.timer = loop.call_soon(self._flush, loop)
        return True

    def _unblock(self, loop: asyncio.AbstractEventLoop) -> None:
        """``loop``'s batch no longer waits for another writer's lock (committed or failed)."""
        waiter = self._unblocked.pop(loop, None)
        if waiter is None:
            return
        if not self._unblocked:
            self.stats.blocked_since = None
        if loop is _running_loop():
            _release(waiter)
        else:  # (close, from another thread)
            with contextlib.suppress(RuntimeError):  # (its loop closed: no one waits)
                loop.call_soon_threadsafe(_release, waiter)

    def _write_chained(
        self,
        write: Callable[[], list[AuditEntry]],
        *,
        wait: bool = True,
        lock_timeout: float | None = None,
    ) -> list[AuditEntry]:
        """Run ``write`` (it seals entries after the head and stores them) under the write
        lock, and advance the head to what it stored. Another process (a CLI command beside
        the server) may have appended first: then chain after its entries and try again.
        Without ``wait``, raises StoreBusy when the write lock is held (or, with
        ``lock_timeout``, still held after that many seconds) (by another thread's
        commit). Any other failure is raised, the head left as the store has it."""
        got = (
            self._write_lock.acquire(timeout=lock_timeout)
            if lock_timeout is not None and not wait
            else self._write_lock.acquire(blocking=wait)
        )
        if not got:
            raise StoreBusy("another thread is committing to the audit log: retry")
        try:
            for attempt in range(_MAX_ATTEMPTS):
                try:
                    entries = write()
                except StoreBusy:
                    raise  # nothing was written: the head stands
                except Exception:
                    before = self._head
                    self._resync()
                    if self._head != before and attempt + 1 < _MAX_ATTEMPTS:
                        continue
                    raise
                self._head = entries[-1]
                return entries
        finally:
            self._write_lock.release()
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _commit(self, batch: list[_Pending], *, wait: bool = True, retry: bool = False) -> bool:
        """Commit ``batch`` and settle its callers: True. ``wait``: for another writer's
        lock, up to the store's busy timeout; if not, with ``retry``, False (nothing written,
        nothing settled) when another writer holds it."""
        try:
            # (a partial, not a closure: no cells and function object made per batch)
            # The last try waits a busy timeout for this log's lock (an admin change
            # committing in a thread), not for another process's
            entries = self._write_chained(
                functools.partial(self._store_sealed, batch, wait),
                wait=wait,
                lock_timeout=None if retry else self._store.busy_timeout,
            )
        except Exception as exc:  # any failure fails the batch, never the log
            if retry and isinstance(exc, StoreBusy):
                return False
            self._fail(str(exc))  # until writable() finds room again
            self.stats.failed_batches += 1
            self.stats.failed_events += len(batch)
            if any(pending.loop is not None for pending in batch):
                self._note_lost(len(batch))
                # (each, a server's: its calls had acted, and how many is evidence; only the
                # first failure said why, and none how many: found by review. A command's
                # own failure is its error line.)
                log.error(
                    "an audit batch of %d event(s) failed; %d since this server started",
                    len(batch),
                    self.stats.failed_events,
                )
            _settle(batch, None, exc)
            return True
        self.stats.batches += 1
        self.stats.events += len(entries)
        self.stats.largest_batch = max(self.stats.largest_batch, len(entries))
        _settle(batch, entries, None)
        return True

    def _store_sealed(self, batch: list[_Pending], wait: bool) -> list[AuditEntry]:
        """Seal ``batch`` after the head and store its entries, in one transaction."""
        entries = self._seal(batch)
        self._store.append_audit_batch(entries, wait=wait)
        return entries

    def _seal(self, batch: list[_Pending]) -> list[AuditEntry]:
        head = self._head
        prev_hex = head.hash if head is not None else GENESIS
        seq = head.seq + 1 if head is not None else 1
        prev = _chained_from(head)
        entries = []
        for pending in batch:
            digest = hashlib.sha256(prev + pending.body).digest()
            entry_hash = digest.hex()
            entries.append(AuditEntry(seq, pending.ts, pending.body, prev_hex, entry_hash))
            prev, prev_hex = digest, entry_hash
            seq += 1
        return entries

    def _resync(self) -> None:
        # The store is the truth about what is durable (a failed commit may
        # still have landed); if it cannot say, keep the last entry we saw land.
        with contextlib.suppress(Exception):
            self._head = self._store.audit_head()


def _chained_from(head: AuditEntry | None) -> bytes:
    """The hash a record after ``head`` chains from. Raises StorageError when no record
    can follow it: its hash is no SHA-256 in hex (say so, not "free space")."""
    if head is None:
        return _GENESIS_BYTES
    try:
        prev = bytes.fromhex(head.hash)
    except ValueError:
        prev = b""
    if len(prev) != 32:
        raise StorageError(
            f"the newest audit record (seq {head.seq}) is damaged: its hash "
            f"{head.hash[:80]!r} is not a SHA-256 in hex, so no record can follow it; "
            "'mcp0 audit verify' tells more"
        )
    return prev


_GENESIS_BYTES = bytes.fromhex(GENESIS)


def _read_lost_note(path: Path | None) -> dict[str, Any]:
    """The note of failed events at ``path``: {} if there is none, or it cannot be read (a
    note half written is never renamed into place)."""
    if path is None:
        return {}
    try:
        noted = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return noted if isinstance(noted, dict) else {}


def _read_lost(path: Path | None) -> int:
    count = _read_lost_note(path).get("failed_events", 0)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _take(
    batch: _Batch, loop: asyncio.AbstractEventLoop | None
) -> tuple[list[_Pending], float | None]:
    """Empty ``loop``'s ``batch`` (under the log's lock) and return what it held, and since
    when it has found the store locked by another writer (None: it has not)."""
    items = batch.pending
    busy_since = batch.busy_since
    batch.pending = []
    batch.busy_since = None
    batch.expected = 0
    if batch.timer is not None:
        # Only a loop's own thread may cancel its timer; elsewhere it is left to
        # fire on an empty batch, which does nothing.
        if loop is not None and loop is _running_loop():
            batch.timer.cancel()
        batch.timer = None
    return items, busy_since


def _settle(
    batch: list[_Pending], entries: list[AuditEntry] | None, error: Exception | None
) -> None:
    """Resolve every waiter of ``batch``: on this thread's loop directly, on others
    with one wake-up per loop."""
    here = _running_loop()
    elsewhere: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, Any]]] = {}
    for index, pending in enumerate(batch):
        outcome: AuditEntry | StorageError = (
            entries[index] if entries is not None else _batch_failed(error)
        )
        if pending.loop is None or pending.loop is here:
            _resolve(pending.waiter, outcome)
        else:
            elsewhere.setdefault(pending.loop, []).append((pending.waiter, outcome))
    for loop, outcomes in elsewhere.items():
        # A closed loop raises RuntimeError: nobody is left waiting there.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, outcomes)


def _resolve_all(outcomes: list[tuple[_Waiter, Any]]) -> None:
    for waiter, outcome in outcomes:
        _resolve(waiter, outcome)


def _resolve(waiter: _Waiter, outcome: AuditEntry | StorageError) -> None:
    if waiter.done():  # the caller was cancelled
        return
    if isinstance(outcome, StorageError):
        waiter.set_exception(outcome)
    else:
        waiter.set_result(outcome)


def _not_running() -> StorageError:
    return StorageError("audit log is not running: start it (or it was closed)")


def _batch_failed(error: Exception | None) -> StorageError:
    """A fresh error per waiter: one exception object must not be raised in many tasks."""
    if isinstance(error, StorageError):
        fresh = StorageError(error.message, data=error.data)
    else:
        fresh = StorageError(
            f"audit log write failed ({error}): the action was not recorded;"
            " fix the store (disk space, permissions) and retry",
            data={"error": type(error).__name__, "detail": str(error)},
        )
    fresh.__cause__ = error
    return fresh
