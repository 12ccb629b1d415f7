"""The audit log: appends events to the hash chain, group-committed by one writer thread.

Callers on any thread or event loop submit events; one writer thread takes
them in submission order, waits up to ``window`` seconds after the oldest
waiting event (or until ``max_batch`` are waiting) so concurrent appends share
one transaction and one fsync, assigns seq / prev_hash / hash, hands the batch
to :meth:`Store.append_audit_batch`, and only then tells each caller — through
its own event loop — that its entry is durable.

If a batch fails, every caller in it gets :class:`~mcp_zero.errors.StorageError`
and the chain tip goes back to the last durable entry (re-read from the store,
which stays the source of truth), so seqs stay gap-free and no acknowledged
entry is lost or skipped. One process appends to a given log at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeAlias

from mcp_zero.audit.chain import GENESIS, canonical
from mcp_zero.errors import StorageError
from mcp_zero.storage.base import AuditEntry, Store

_Waiter: TypeAlias = asyncio.Future[AuditEntry] | concurrent.futures.Future[AuditEntry]


_MAX_ATTEMPTS = 3


@dataclass(slots=True)
class AuditStats:
    """Counters kept by the writer thread (read them from anywhere)."""

    batches: int = 0  # batches made durable
    events: int = 0  # entries made durable
    failed_batches: int = 0
    failed_events: int = 0
    largest_batch: int = 0


class _Pending:
    __slots__ = ("body", "loop", "queued_at", "ts", "waiter")

    def __init__(
        self,
        body: bytes,
        ts: float,
        waiter: _Waiter,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.body = body
        self.ts = ts
        self.waiter = waiter
        self.loop = loop  # None: ``waiter`` is a concurrent future (append_sync)
        self.queued_at = time.monotonic()


class AuditLog:
    """The append side of a store's audit log.

    ``window`` (seconds) is how long the writer lets a batch gather after its
    oldest event; ``max_batch`` caps a batch. Use :meth:`start` / :meth:`close`
    or ``with AuditLog(store) as log:``.
    """

    def __init__(self, store: Store, *, window: float = 0.002, max_batch: int = 1000) -> None:
        if window < 0:
            raise ValueError("window must be >= 0 seconds")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._store = store
        self._window = window
        self._max_batch = max_batch
        self._cv = threading.Condition(threading.Lock())
        self._pending: deque[_Pending] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._head: AuditEntry | None = None
        self.stats = AuditStats()

    @property
    def head(self) -> AuditEntry | None:
        """The last durable entry this log knows of (None for an empty log)."""
        return self._head

    def start(self) -> None:
        """Read the chain head from the store and start the writer thread.

        Raises ``StorageError`` if the store cannot be read, ``RuntimeError``
        if called twice.
        """
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("AuditLog.start() called twice")
            self._head = self._store.audit_head()
            self._thread = threading.Thread(target=self._run, name="mcp0-audit-writer", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Write every event already submitted, then stop the writer thread.

        Idempotent. Later appends raise ``StorageError``. Raises
        ``StorageError`` if the writer has not finished within ``timeout``.
        """
        with self._cv:
            thread = self._thread
            self._closing = True
            self._cv.notify_all()
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            raise StorageError(
                f"audit writer still busy after {timeout}s: the store is stuck (disk?)",
            )

    async def aclose(self) -> None:
        """:meth:`close` without blocking the event loop while the queue drains."""
        await asyncio.to_thread(self.close)

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
        """Submit ``event`` and return the future its durable entry resolves.

        For callers that must not lose the record when they are cancelled:
        ``await asyncio.shield(log.submit(event))`` (no task is created).
        Raises as :meth:`append`.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditEntry] = loop.create_future()
        self._submit(self._prepare(event, future, loop))
        return future

    def append_sync(self, event: Mapping[str, Any], timeout: float | None = 30.0) -> AuditEntry:
        """:meth:`append` for code without an event loop (the CLI); blocks until durable.

        Raises as :meth:`append`, and ``TimeoutError`` after ``timeout`` seconds.
        """
        future: concurrent.futures.Future[AuditEntry] = concurrent.futures.Future()
        self._submit(self._prepare(event, future, None))
        return future.result(timeout)

    # caller side

    @staticmethod
    def _prepare(
        event: Mapping[str, Any], waiter: _Waiter, loop: asyncio.AbstractEventLoop | None
    ) -> _Pending:
        if "ts" in event:
            raise ValueError("audit events must not carry 'ts': the audit log sets it")
        ts = time.time()
        # Encoded on the caller's thread: a bad event fails here, and later
        # mutation of the caller's dict cannot race the writer.
        body = canonical({**event, "ts": ts})
        return _Pending(body, ts, waiter, loop)

    def _submit(self, pending: _Pending) -> None:
        with self._cv:
            if self._thread is None or self._closing:
                raise StorageError("audit log is not running: start it (or it was closed)")
            self._pending.append(pending)
            waiting = len(self._pending)
            # Wake the writer for a first event or a full batch; otherwise its window runs.
            if waiting == 1 or waiting >= self._max_batch:
                self._cv.notify()

    # writer thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return  # closing, and everything is written
                deadline = self._pending[0].queued_at + self._window
                while len(self._pending) < self._max_batch and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                count = min(len(self._pending), self._max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        for attempt in range(_MAX_ATTEMPTS):
            try:
                entries = self._seal(batch)
                self._store.append_audit_batch(entries)
                break
            except Exception as exc:  # any failure fails the batch, never the writer thread
                before = self._head
                self._resync()
                # Another process (a CLI command beside the server) appended first: chain
                # this batch after its entries and try again. Any other failure is final.
                if self._head != before and attempt + 1 < _MAX_ATTEMPTS:
                    continue
                self.stats.failed_batches += 1
                self.stats.failed_events += len(batch)
                _settle(batch, None, exc)
                return
        self._head = entries[-1]
        self.stats.batches += 1
        self.stats.events += len(entries)
        self.stats.largest_batch = max(self.stats.largest_batch, len(entries))
        _settle(batch, entries, None)

    def _seal(self, batch: list[_Pending]) -> list[AuditEntry]:
        head = self._head
        prev_hex = head.hash if head is not None else GENESIS
        seq = head.seq + 1 if head is not None else 1
        prev = bytes.fromhex(prev_hex)
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


def _settle(
    batch: list[_Pending], entries: list[AuditEntry] | None, error: Exception | None
) -> None:
    """Resolve every waiter of ``batch``: one wake-up per event loop, not per entry."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiter, Any]]] = {}
    for index, pending in enumerate(batch):
        outcome: AuditEntry | StorageError = (
            entries[index] if entries is not None else _batch_failed(error)
        )
        if pending.loop is None:
            _resolve(pending.waiter, outcome)
        else:
            per_loop.setdefault(pending.loop, []).append((pending.waiter, outcome))
    for loop, outcomes in per_loop.items():
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
