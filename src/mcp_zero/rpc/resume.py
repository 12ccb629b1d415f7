"""MCP 2026-07-28 ``input_required``: a call that asks the client something spans requests.

That revision has no requests from server to client. A tool that needs the
client (elicitation, sampling, roots) makes its request answer
``resultType: "input_required"`` with the questions and an opaque
``requestState``; the client answers them and sends the same request again with
``inputResponses`` and that ``requestState``.

Here the tool is a running call in a worker, waiting for its answer. So the
call goes on across the requests: it runs as a task of its own
(:class:`Continuation`), a request that finds it asking answers
``input_required`` and parks it under a fresh random ``requestState``, and the
retry delivers the answers and waits for what comes next (the result, or more
questions). Progress and log messages go to whichever request is being answered.
A parked call still counts against its agent's concurrency and its plugin's
wall-clock timeout still runs, but it holds no plugin slot: a call waiting on its
client gives its slot back and takes one again when answered (kernel/pipeline.py
``PluginSlot``; a plain handler's call keeps it), so parked calls cannot starve a
plugin's other callers. One that ends meanwhile (timeout, crash) keeps its answer a
minute so that the retry hears how it ended (:class:`EndedCalls`, within bounds); one
nobody comes back to is cancelled after ``CLIENT_REQUEST_TIMEOUT_S`` (audited as
cancelled). Questions still open when a call ends are answered with an error, so that
each is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import orjson

from mcp_zero.errors import InvalidParams, McpZeroError, MissingClientCapability, QuotaExceeded
from mcp_zero.kernel.action import Principal
from mcp_zero.kernel.pipeline import uncancellable
from mcp_zero.rpc.bridge import CLIENT_REQUEST_TIMEOUT_S
from mcp_zero.rpc.session import (
    JSON,
    Channel,
    ClientRequestFailed,
    Session,
    too_deep_for_plugin,
)

_GATHER_S = 0.005  # a question this soon after the last travels with it
_GATHER_MAX_S = 0.05
_ENDED_KEPT_S = 60.0  # a parked call that ended keeps its answer this long for the retry
# What the answers of ended calls hold at most, the oldest going first: a client that never
# retries made the server keep its every answer, 1 GB in 16 s of 1 MiB ones (found by review).
_ENDED_MAX = 1000
_ENDED_MAX_BYTES = 32 << 20
# An agent's share (its newest answer whatever its size), so that one cannot push out all
# others' answers.
_ENDED_AGENT_MAX = 100
_ENDED_AGENT_MAX_BYTES = 8 << 20
_ENDED_ENTRY_BYTES = 300  # what an answer costs besides its JSON and its request's key
_NOT_KEPT_MAX = 10_000  # requestStates of answers no longer kept, remembered to say so
# What identifies "the same request again": the method and these params.
_SAME = {
    "tools/call": ("name", "arguments"),
    "prompts/get": ("name", "arguments"),
    "resources/read": ("uri",),
}


class Request(NamedTuple):
    """One request of a call that may span several: its channel, its (per-request)
    session and its ``_meta.progressToken``."""

    channel: Channel
    session: Session
    progress_token: Any


class RetryRefused(InvalidParams):
    """A retry refused for its ``requestState`` or ``inputResponses`` before it reached its
    call: a refused request of its agent, audited and rate-limited as one."""


class AnswerNotKept(RetryRefused):
    """A retry of a call that ended while it waited, whose answer is no longer kept: the
    call ran, so the request should not be sent again blindly."""

    code = "answer_not_kept"


class Continuation:
    """One call that may span several requests: a Channel that forwards to the request being
    answered (dropping messages while none is), and the client's pending questions."""

    __slots__ = (
        "_asked",
        "_keys",
        "agent",
        "current",
        "given",
        "key",
        "lacking",
        "pending",
        "progress_token",
        "session",
        "work",
    )

    def __init__(
        self,
        agent: tuple[str, bool],
        key: tuple[Any, ...],
        request: Request,
        given: Any = None,
    ) -> None:
        self.agent = agent  # the agent, and whether token-less (--anonymous-agent)
        self.key = key  # method and identifying params of the original request
        # The request being answered: where messages go, what it declared (its session:
        # capabilities, log level) and its progress token. A retry brings its own.
        self.current: Channel | None = request.channel
        self.session = request.session
        self.progress_token = request.progress_token
        self.work: asyncio.Task[JSON] | None = None
        self.pending: dict[str, tuple[JSON, asyncio.Future[JSON]]] = {}
        self._asked = asyncio.Event()
        self._keys = itertools.count(1)
        self.lacking: set[str] = set()  # capabilities the call was refused
        # Answers the first request brought along (a client that retries without the
        # requestState, as to a server that keeps none): used when that question comes.
        self.given: dict[str, Any] = given if isinstance(given, dict) else {}

    async def send(self, message: JSON) -> None:
        if self.current is not None:
            await self.current.send(message)

    async def close_stream(self) -> None:
        if self.current is not None:
            await self.current.close_stream()

    async def ask(self, method: str, params: JSON, key: str | None = None) -> JSON:
        """What the tool's request to the client becomes: a question for the next
        ``input_required`` answer (under ``key`` if the plugin named it and the name is
        free); returns the client's answer from the retry."""
        if key is None or key in self.pending:
            key = f"q{next(self._keys)}"
            while key in self.pending:
                key = f"q{next(self._keys)}"
        given = self.given.pop(key, None)
        if isinstance(given, dict):
            return given
        future: asyncio.Future[JSON] = asyncio.get_running_loop().create_future()
        self.pending[key] = ({"method": method, "params": params}, future)
        self._asked.set()
        try:
            return await future
        finally:
            self.pending.pop(key, None)

    def lacks(self, capability: str) -> None:
        self.lacking.add(capability)

    def settle(self, work: asyncio.Task[JSON]) -> None:
        """The call ended: its questions still open get an error (their requests end, and
        are audited as failed)."""
        for _, future in list(self.pending.values()):
            if not future.done():
                future.set_exception(
                    ClientRequestFailed("the call ended before its client answered this")
                )

    def answers(self, responses: Any) -> dict[str, JSON]:
        """The answers of a retry to this call's questions (keys we did not ask are
        ignored); InvalidParams when they are not answers."""
        if responses is None:
            return {}
        if not isinstance(responses, dict):
            raise RetryRefused(
                "params.inputResponses must map each key of inputRequests to the client's result",
                data={"path": "/inputResponses"},
            )
        answers = {key: responses[key] for key in self.pending if key in responses}
        for key, result in answers.items():
            if not isinstance(result, dict):
                raise RetryRefused(
                    f"params.inputResponses.{key} must be the client's result (an object)",
                    data={"path": f"/inputResponses/{key}"},
                )
            if too_deep_for_plugin(result):  # refused: the call waits for a usable answer
                raise RetryRefused(
                    f"params.inputResponses.{key} nests too deep to be passed to the plugin",
                    data={"path": f"/inputResponses/{key}"},
                )
        return answers

    def resume(self, request: Request, answers: dict[str, JSON]) -> None:
        """The client's retry: messages go to it now, as its progress token and log level
        say (not the first request's: found by review), its answers to the questions; a
        question it left unanswered is asked again in this retry's answer."""
        self.current = request.channel
        self.session = request.session
        self.progress_token = request.progress_token
        for key, result in answers.items():
            future = self.pending[key][1]
            if not future.done():
                future.set_result(result)
        if self.questions():
            self._asked.set()

    async def outcome(self) -> JSON | None:
        """The call's result, or None when it waits for the client (questions pending)."""
        assert self.work is not None
        asked = asyncio.ensure_future(self._asked.wait())
        try:
            await asyncio.wait({self.work, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
        # Questions asked together (asyncio.gather) come a moment apart over the worker's
        # pipe: gather them into one answer, as long as they keep coming.
        deadline = asyncio.get_running_loop().time() + _GATHER_MAX_S
        while not self.work.done():
            self._asked.clear()
            more = asyncio.ensure_future(self._asked.wait())
            try:
                await asyncio.wait({self.work, more}, timeout=_GATHER_S)
            finally:
                more.cancel()
            if not self._asked.is_set() or asyncio.get_running_loop().time() > deadline:
                break
        if self.work.done():
            return self._result(self.work)
        self._asked.clear()
        return None

    def _result(self, work: asyncio.Task[JSON]) -> JSON:
        """The call's result; but a call that failed after it was refused a capability its
        request did not declare failed for want of it: -32021, naming what it needs."""
        try:
            result = work.result()
        except McpZeroError:
            if not self.lacking:
                raise
            result = {"isError": True}
        if self.lacking and result.get("isError"):
            needed = ", ".join(sorted(self.lacking))
            raise MissingClientCapability(
                f"this call needs the client capability {needed}, which the request's "
                "_meta clientCapabilities does not declare",
                data={"requiredCapabilities": _required(self.lacking)},
            )
        return result

    def questions(self) -> JSON:
        return {
            key: request for key, (request, future) in self.pending.items() if not future.done()
        }


def _required(lacking: set[str]) -> JSON:
    """``lacking`` ("sampling", "elicitation.url"…) as ``requiredCapabilities`` has it."""
    required: JSON = {}
    for name in sorted(lacking):
        capability, _, part = name.partition(".")
        parts = required.setdefault(capability, {})
        if part:
            parts[part] = {}
    return required


class Resumptions:
    """The calls parked while their client answers, by ``requestState``, and the answers of
    those that ended meanwhile (:class:`EndedCalls`)."""

    def __init__(self, limit: int = 1000, timeout_s: float = CLIENT_REQUEST_TIMEOUT_S) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self._parked: dict[str, tuple[Continuation, asyncio.TimerHandle]] = {}
        self.ended = EndedCalls()

    def __len__(self) -> int:
        return len(self._parked)

    async def run(
        self,
        agent: tuple[str, bool],
        method: str,
        params: JSON,
        request: Request,
        start: Callable[[Continuation], Awaitable[JSON]],
    ) -> JSON:
        """Answer one request of a call that may ask the client: start the call (no
        ``requestState``) or resume the parked one, and wait for its result or questions."""
        key = (method, *(params.get(name) for name in _SAME[method]))
        state = params.get("requestState")
        if state is None:
            call = Continuation(agent, key, request, params.get("inputResponses"))
            call.work = asyncio.ensure_future(start(call))
            call.work.add_done_callback(_retrieve)
            call.work.add_done_callback(call.settle)
        else:
            ended = self.ended.take(agent, key, state)
            if ended is not None:
                return ended
            call, answers = self._resume(agent, key, state, params.get("inputResponses"))
            call.resume(request, answers)
        try:
            result = await call.outcome()
        except asyncio.CancelledError:
            work = call.work
            assert work is not None
            work.cancel()  # the client cancelled (or left), or the server stops: so is the call
            with contextlib.suppress(Exception, asyncio.CancelledError):  # (looked at below)
                await uncancellable(work)
            if work.cancelled():
                raise
            # It had its outcome already, which its record says (see uncancellable): that is
            # the answer, not that it was stopped.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            result = call._result(work)
        if result is not None:
            return result
        if len(self._parked) >= self.limit:
            assert call.work is not None
            call.work.cancel()
            raise QuotaExceeded(
                f"{len(self._parked)} calls already wait for their clients' answers, this "
                "server's limit; retry later"
            )
        call.current = None
        token = secrets.token_urlsafe(24)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.timeout_s, self._expire, token)
        self._parked[token] = (call, timer)
        assert call.work is not None
        call.work.add_done_callback(lambda _: self._keep_ended(token))
        return {
            "resultType": "input_required",
            "inputRequests": call.questions(),
            "requestState": token,
        }

    def _resume(
        self, agent: tuple[str, bool], key: tuple[Any, ...], state: Any, responses: Any
    ) -> tuple[Continuation, dict[str, JSON]]:
        """The parked call a retry continues, and its answers; it stays parked when the
        retry is refused."""
        parked = self._parked.get(state) if isinstance(state, str) else None
        if parked is None or parked[0].agent != agent:
            raise _unknown(self.timeout_s)
        call, timer = parked
        if call.key != key:
            raise _another_request()
        answers = call.answers(responses)
        del self._parked[state]
        timer.cancel()
        return call, answers

    def _keep_ended(self, token: str) -> None:
        """A parked call ended (timeout, crash): keep its answer a little for the retry."""
        parked = self._parked.pop(token, None)
        if parked is not None:
            parked[1].cancel()
            self.ended.keep(token, parked[0])

    def principals(self) -> list[Principal]:
        """The callers whose calls wait here (and have not ended)."""
        return [
            Principal(call.agent[0], anonymous=call.agent[1])
            for call, _ in self._parked.values()
            if not _ended(call)
        ]

    def end_agent(self, agent: str) -> None:
        """Cancel the waiting calls of agent ``agent`` (it was terminated)."""
        for token, (call, timer) in list(self._parked.items()):
            if call.agent[0] == agent:
                del self._parked[token]
                timer.cancel()
                if call.work is not None:
                    call.work.cancel()
        self.ended.end_agent(agent)

    def _expire(self, token: str) -> None:
        parked = self._parked.pop(token, None)
        if parked is not None and parked[0].work is not None:
            parked[0].work.cancel()

    def close(self) -> list[asyncio.Task[JSON]]:
        """Cancel the waiting calls (the server stops); their tasks, for the caller to wait
        for their records before the audit log closes (they run outside any request)."""
        works = []
        for call, timer in self._parked.values():
            timer.cancel()
            if call.work is not None:
                call.work.cancel()
                works.append(call.work)
        self._parked.clear()
        self.ended.close()
        return works


class _Kept(NamedTuple):
    """What the retry of a call that ended needs: whose call and which request it was, and
    how it ended (its result's JSON, or its error); with its cost and when it goes."""

    agent: tuple[str, bool]
    key: tuple[Any, ...]
    answer: bytes | Exception
    size: int
    until: float


class EndedCalls:
    """The answers of parked calls that ended before their client came back, each kept
    ``keep_s`` (a minute) for the retry, by ``requestState``: at most ``limit`` answers and
    ``limit_bytes`` of them (their JSON, their request's key and ~300 bytes of bookkeeping),
    of which an agent holds at most ``agent_limit`` and ``agent_bytes`` (its newest whatever
    its size). Past a bound the oldest go first, the agent's own past its share; a retry of
    one gone hears so (:class:`AnswerNotKept`), as long as the last ``_NOT_KEPT_MAX`` are
    remembered."""

    def __init__(
        self,
        keep_s: float = _ENDED_KEPT_S,
        limit: int = _ENDED_MAX,
        limit_bytes: int = _ENDED_MAX_BYTES,
        agent_limit: int = _ENDED_AGENT_MAX,
        agent_bytes: int = _ENDED_AGENT_MAX_BYTES,
    ) -> None:
        self.keep_s = keep_s
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.agent_limit = agent_limit
        self.agent_bytes = agent_bytes
        self.held = 0  # bytes the kept answers cost
        self._kept: dict[str, _Kept] = {}  # the first ended first
        self._agents: dict[tuple[str, bool], dict[str, int]] = {}  # each one's: state -> size
        self._not_kept: dict[str, tuple[str, bool]] = {}  # state -> agent, the oldest first
        # One timer for all (one each would cost ~420 bytes an answer): they go in the order
        # they came.
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, state: str) -> bool:
        return state in self._kept

    def keep(self, state: str, call: Continuation) -> None:
        """Keep how ``call`` (parked under ``state``) ended for its retry, not the call."""
        work = call.work
        assert work is not None
        if work.cancelled():  # (no answer: its retry hears that its state is unknown)
            return
        answer: bytes | Exception
        try:
            # a copy: orjson's bytes take ~16 times their length (15.8 MiB for 1 MiB)
            answer = memoryview(orjson.dumps(call._result(work))).tobytes()
            size = len(answer)
        except Exception as error:
            # its traceback (and what it was raised during) holds the call's frames
            error.__traceback__ = error.__context__ = error.__cause__ = None
            answer, size = error, len(str(error))
        size += len(orjson.dumps(call.key)) + _ENDED_ENTRY_BYTES
        loop = asyncio.get_running_loop()
        self._kept[state] = _Kept(call.agent, call.key, answer, size, loop.time() + self.keep_s)
        self.held += size
        mine = self._agents.setdefault(call.agent, {})
        mine[state] = size
        while len(mine) > 1 and (
            len(mine) > self.agent_limit or sum(mine.values()) > self.agent_bytes
        ):
            self._drop(next(iter(mine)))
        while self._kept and (len(self._kept) > self.limit or self.held > self.limit_bytes):
            self._drop(next(iter(self._kept)))
        if self._timer is None and self._kept:
            self._timer = loop.call_at(next(iter(self._kept.values())).until, self._expire)

    def take(self, agent: tuple[str, bool], key: tuple[Any, ...], state: Any) -> JSON | None:
        """The answer kept for ``state``'s retry by ``agent`` of request ``key`` (its error
        raised), None when none is; AnswerNotKept when it was and is gone."""
        if not isinstance(state, str):
            return None
        kept = self._kept.get(state)
        if kept is None or kept.agent != agent:
            if self._not_kept.get(state) == agent:
                raise AnswerNotKept(
                    "params.requestState is of a call that ended before this retry, and its "
                    "answer is no longer kept (a minute at most, less when many wait): the "
                    "call ran and its audit record, under the first request's id, says how "
                    "it ended; send the request again only if running it twice is harmless",
                    data={"path": "/requestState"},
                )
            return None
        if kept.key != key:
            raise _another_request()
        self._forget(state)
        if isinstance(kept.answer, Exception):
            raise kept.answer
        result: JSON = orjson.loads(kept.answer)
        return result

    def end_agent(self, agent: str) -> None:
        """Forget the answers of agent ``agent`` (it was terminated: no retry of its comes)."""
        for state in [state for state, kept in self._kept.items() if kept.agent[0] == agent]:
            self._forget(state)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._kept.clear()
        self._agents.clear()
        self.held = 0

    def _forget(self, state: str) -> None:
        kept = self._kept.pop(state)
        self.held -= kept.size
        mine = self._agents[kept.agent]
        del mine[state]
        if not mine:
            del self._agents[kept.agent]

    def _drop(self, state: str) -> None:
        """Drop the answer kept for ``state``, remembering that it was (its retry hears so)."""
        self._not_kept[state] = self._kept[state].agent
        if len(self._not_kept) > _NOT_KEPT_MAX:
            del self._not_kept[next(iter(self._not_kept))]
        self._forget(state)

    def _expire(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._kept:
            state, kept = next(iter(self._kept.items()))
            if kept.until > now:
                self._timer = asyncio.get_running_loop().call_at(kept.until, self._expire)
                return
            self._drop(state)
        self._timer = None


def _unknown(wait_s: float) -> RetryRefused:
    return RetryRefused(
        "params.requestState is unknown or expired (an answer is awaited for "
        f"{wait_s:.0f} s): send the request again without it",
        data={"path": "/requestState"},
    )


def _another_request() -> RetryRefused:
    return RetryRefused(
        "params.requestState belongs to another request: a retry repeats the "
        "original request's method and parameters",
        data={"path": "/requestState"},
    )


def _ended(call: Continuation) -> bool:
    return call.work is None or call.work.done()


def _retrieve(task: asyncio.Task[JSON]) -> None:
    """A parked call's outcome may have no reader (its client never came back)."""
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
