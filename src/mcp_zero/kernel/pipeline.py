"""The governed path every agent action takes.

    rate limit → resolve target → policy (Cedar) → arguments vs schema
      → quota admission → sandbox (with timeout) → obligations → audit → result

Every outcome — allowed, denied, error, timeout — is appended to the audit log,
and the caller gets its answer only after that record is durable.

A call holds one of its plugin's ``max_concurrency`` slots while it runs, but not
while it waits for its client (an elicitation, a sampling, the roots; on MCP
2026-07-28 a call parked on ``input_required``): it gives the slot back when it
asks and takes one again, queuing like a new call, before it goes on with the
answer (:class:`PluginSlot`). So calls waiting on their clients, one agent's or
many, cannot keep other agents' calls from running. (Not a plain handler's call:
its worker thread waits with it, so it keeps its slot; see ``GovernedBridge``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote

import orjson

from mcp_zero.audit.log import AuditLog
from mcp_zero.errors import (
    InvalidArguments,
    InvalidParams,
    McpZeroError,
    PluginFailure,
    PluginNotFound,
    PolicyDenied,
    PromptNotFound,
    ResourceNotFound,
    StorageError,
    ToolNotFound,
    ToolTimeout,
    shown,
)
from mcp_zero.kernel.action import Action, Outcome, Principal, Verb
from mcp_zero.kernel.agents import AgentService
from mcp_zero.kernel.client_requests import GovernedBridge
from mcp_zero.kernel.plugins import PluginHost
from mcp_zero.kernel.quotas import QuotaGate
from mcp_zero.policy.decision import PolicyDecision
from mcp_zero.policy.detectors import label_text, label_uri, label_value, redact
from mcp_zero.policy.store import PolicyStore
from mcp_zero.rpc.jsonrpc import RequestId
from mcp_zero.rpc.metrics import Metrics
from mcp_zero.rpc.ratelimit import RateLimiter
from mcp_zero.sandbox.base import TIMEOUT_HINT, ClientBridge, PluginRuntime, seconds
from mcp_zero.sandbox.manifest import MAX_NAME_LENGTH
from mcp_zero.sandbox.worker_process import WorkerOutputs
from mcp_zero.uri import normal_uri

JSON = dict[str, Any]
T = TypeVar("T")
log = logging.getLogger("mcp_zero.kernel")


# A result (or error) holding more than this, in characters of its strings, is redacted off
# the event loop: redaction scans every string with each label's patterns (~75 ms a MiB of
# text here, more where patterns nearly match), which would hold up every other request. A
# smaller one costs less there than the hop to a thread (~1 ms at most).
REDACT_OFF_LOOP_CHARS = 16 << 10


# The lists an agent sees (Kernel.listing), and the verb that decides each item of one.
_LIST_VERBS = {
    "tools": Verb.CALL_TOOL,
    "resources": Verb.READ_RESOURCE,
    "resourceTemplates": Verb.READ_RESOURCE,
    "prompts": Verb.GET_PROMPT,
}
LISTS = tuple(_LIST_VERBS)
# What principals see (plugins and list versions): more than the principals of as many
# sessions as max_sessions allows by default, as the list check goes through all each second.
VIEW_CACHE_SIZE = 16384
# Lists as principals see them (references to the items), those listed most recently.
LIST_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _ListView:
    """What a principal sees over a transport: the plugins it may list, each list's version."""

    visible: frozenset[str]
    versions: dict[str, str]


def _recall(cache: OrderedDict[Any, T], key: Any) -> T | None:
    """``cache[key]`` (now the most recently used), or None."""
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _keep(cache: OrderedDict[Any, T], key: Any, value: T, size: int) -> None:
    """Put ``value`` in ``cache``, dropping the least recently used entry beyond ``size``."""
    cache[key] = value
    if len(cache) > size:
        cache.popitem(last=False)


def _large(value: Any, budget: int = REDACT_OFF_LOOP_CHARS) -> bool:
    """Whether ``value`` (JSON) holds more than ``budget`` characters of strings, an object's
    or a list's item counting as 8; stops counting as soon as it does."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            budget -= len(item)
        elif isinstance(item, dict | list):
            budget -= 8 * len(item)
            if budget >= 0:
                stack.extend(item.values() if isinstance(item, dict) else item)
        if budget < 0:
            return True
    return False


async def uncancellable(future: asyncio.Future[T]) -> T:
    """What ``future`` comes to, waited for whatever cancels the task meanwhile: each is
    withdrawn (``Task.uncancel``). For what follows an action's outcome once it has one (its
    redaction, its record's commit): the action is done, and its caller is to be told what
    its record says, not that it was stopped. Raises what ``future`` raises."""
    withdrawn = 0
    while not future.done():
        # (a waiter of its own that a cancel may cut, not ``future``; not asyncio.shield,
        # three times the Python calls: this runs for every call's record)
        waiter: asyncio.Future[None] = future.get_loop().create_future()
        future.add_done_callback(functools.partial(_wake, waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            withdrawn += 1
    if withdrawn:
        task = asyncio.current_task()
        assert task is not None
        for _ in range(withdrawn):
            task.uncancel()
    return future.result()


def _wake(waiter: asyncio.Future[None], done: asyncio.Future[Any]) -> None:
    """``uncancellable``'s callback: ``done`` is, wake the task waiting for it on ``waiter``."""
    if not waiter.done():  # (else a cancel cut it, and its task waits on another one)
        waiter.set_result(None)


async def _redacted(value: Any, labels: tuple[str, ...]) -> tuple[Any, int]:
    """``redact(value, labels)``, in a thread when ``value`` is large (the loop goes on; the
    thread still holds the GIL through each pattern's scan of one string), not to be cut
    off by a cancel (see ``uncancellable``)."""
    if _large(value):
        return await uncancellable(asyncio.ensure_future(asyncio.to_thread(redact, value, labels)))
    return redact(value, labels)


async def _redact_error(exc: McpZeroError, labels: tuple[str, ...], event: JSON) -> None:
    """Redact ``labels`` from the message and data of an action's error (a plugin's exception
    text), as from its result, and note the obligation in its audit ``event``."""
    (message, data), redacted = await _redacted([exc.message, exc.data], labels)
    if redacted:
        exc.message = message
        exc.args = (message,)
        exc.data = data
    _note_redaction(event, labels, redacted)


def _note_redaction(event: JSON, labels: tuple[str, ...], redacted: int) -> None:
    """The audit ``event`` says the redact obligation ran, and what it replaced."""
    event["obligations"] = event.get("obligations", []) + ["redact:" + label for label in labels]
    event["redacted"] = redacted


def _outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, PolicyDenied):
        return Outcome.DENIED
    if isinstance(exc, ToolTimeout):
        return Outcome.TIMEOUT
    return Outcome.ERROR


# JSON decoders take 1,024 levels of nesting, orjson writes 254 (the audit digest and the
# worker's frames need that), and a frame carries the arguments one level down: deeper
# arguments are refused, and audited (past 254 here, at 254 by the worker's frame).
MAX_ARGUMENT_DEPTH = 253
_TOO_DEEP = hashlib.sha256(b"<arguments nested too deep to encode>").hexdigest()
_UNENCODABLE = hashlib.sha256(b"<arguments JSON cannot carry>").hexdigest()
_NOT_UTF8 = hashlib.sha256(b"<arguments holding text that is not UTF-8>").hexdigest()


def _arguments_digest(arguments: JSON) -> str:
    # The audit log keeps a digest, not the arguments: they may hold personal data.
    try:
        encoded = orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # the call is refused (see call_tool)
        # too deep, or what JSON between programs cannot carry: an integer past 64 bits (a
        # JSON parser reads it as a float, or refuses it), or a string with lone surrogates
        # (a Python caller's: the servers' JSON decoder makes none)
        reason = str(exc)
        if "ecursion" in reason:
            return _TOO_DEEP
        return _NOT_UTF8 if "UTF-8" in reason else _UNENCODABLE
    return hashlib.sha256(encoded).hexdigest()


def completion_arguments(argument: Any, context: Any) -> JSON:
    """What the record of a completion digests as its arguments (``arguments_sha256``): the
    argument completed and the context, as the client sent them (None: it sent none)."""
    return {"argument": argument, "context": context}


def _pointer(parts: Any) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


_MESSAGE_LIMIT = 200


def _brief(message: str) -> str:
    """A validator's message quotes the failing value; keep a huge value from filling it."""
    if len(message) <= _MESSAGE_LIMIT:
        return message
    # The value comes first and the reason last ("… is longer than 10 characters").
    return f"{message[:80]}…({len(message) - 180} characters omitted)…{message[-100:]}"


def _schema_error(exc: Any) -> InvalidArguments:
    path = _pointer(exc.instance_path)
    return InvalidArguments(
        f"invalid arguments at {path}: {_brief(exc.message)}",
        data={"path": path, "schemaPath": _pointer(exc.schema_path)},
    )


def _check_output(tool: str, validator: Any, result: JSON) -> None:
    """The spec requires structured results to match the tool's outputSchema."""
    structured = result.get("structuredContent")
    if structured is None:
        raise PluginFailure(
            f"tool {tool!r} declares an outputSchema but returned no structuredContent"
        )
    problem = next(validator.iter_errors(structured), None)
    if problem is not None:
        path = _pointer(problem.instance_path)
        message = problem.message
        if len(message) > _MESSAGE_LIMIT:
            # Not cut, as _brief cuts arguments' (the caller's own): it quotes the plugin's
            # output, which a @redact obligation redacts from this message, and a cut left
            # a secret without the name its detector knows it by (found by a bug hunt)
            keyword = problem.schema_path[-1] if problem.schema_path else "schema"
            message = f"the value fails the schema's {keyword!r} (its message quotes it)"
        raise PluginFailure(
            f"tool {tool!r} returned structuredContent that does not match its outputSchema "
            f"at {path}: {message}",
            data={"path": path},
        )


async def _wait_for_slot(taking: Awaitable[T], timeout: float, plugin: str, limit: int) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await taking
    except TimeoutError:
        raise ToolTimeout(
            f"plugin {plugin!r} stayed busy with {limit} call{'' if limit == 1 else 's'} (its "
            f"max_concurrency) for {seconds(timeout)} s; retry later or raise the plugin's "
            "max_concurrency quota"
        ) from None


# The enums' values, read once: each ``.value`` is two Python calls (enum's property).
_VERBS = {verb: verb.value for verb in Verb}
_ALLOWED = Outcome.ALLOWED.value
_ERROR = Outcome.ERROR.value
#: The outcome field of the record an ``@audit("before")`` obligation writes before the action
#: runs: not an outcome yet (its own record follows, with the same request_id).
INTENT = "intent"


def _event(
    principal: Principal,
    verb: Verb,
    resource: str | None,
    plugin: str | None,
    request_id: RequestId,
    transport: Any,
) -> JSON:
    """What every audit record of an agent's action starts with. ``request_id`` is the
    JSON-RPC id as the client sent it, an integer or a string (1 and "1" are two requests);
    the admin API's and the CLI's are strings."""
    return {
        "agent": principal.agent,
        "anonymous": principal.anonymous,
        "verb": _VERBS[verb],
        "resource": resource,
        "plugin": plugin,
        "request_id": request_id,
        "transport": transport,
    }


def _recorded_uri(uri: str, labels: frozenset[str]) -> str:
    """``uri``, in whose text or percent-decoded text the detectors found ``labels``, as its
    record keeps it: redacted as written; else (found only once decoded) decoded and
    redacted; else as its digest."""
    shown: str = redact(uri, labels)[0]
    if not label_uri(shown) & labels:
        return shown
    shown = redact(unquote(uri), labels)[0]
    if not label_text(shown) & labels:
        return shown
    digest = hashlib.sha256(uri.encode("utf-8", "surrogatepass")).hexdigest()
    return f"[redacted:{','.join(sorted(labels))}] sha256:{digest}"


def _recorded_reasons(reasons: Iterable[str], event: JSON) -> list[str]:
    """A denial's ``reasons`` as its audit ``event`` records them: with what the labels the
    event notes were found in redacted, as its resource is (a reason names the URI)."""
    labels = event.get("labels")
    if not labels:
        return list(reasons)
    redacted: list[str] = redact(list(reasons), labels)[0]
    return redacted


def _audit_failing(audit: AuditLog) -> StorageError:
    """The refusal of a call whose record could not be kept: before its plugin acts."""
    why = audit.stats.last_failure or "a full disk, or its size limit"
    # (a store found full or damaged at the start had no commit fail: found by review)
    when = "its last commit failed" if audit.stats.failed_batches else "found before a commit"
    return StorageError(
        f"the audit log cannot be written ({when}: {why}); calls are "
        "refused until it can be written again — retry",
        data={"failed_events": audit.stats.failed_events},
    )


class PluginSlots:
    """A plugin's ``max_concurrency`` slots. A call takes a free one at once when no call
    queues for one; otherwise it queues, and a slot given back goes to a queuing call. The
    agents that queue take turns (round robin), each agent's calls first come first served:
    one agent's flood of calls makes its own calls wait, not every other agent's behind
    them. (Taking a free slot is one plain call: an asyncio.Semaphore's ``locked()`` and
    ``acquire()`` were seven Python calls, a generator and a coroutine on every tool call.)"""

    __slots__ = ("_free", "_queues", "_unbegun")

    def __init__(self, limit: int) -> None:
        self._free = limit
        # Calls waiting for a slot, per agent, the agents in turn order (a cancelled call
        # stays until met or it leaves), each told True when given one. A slot is free only
        # while nobody queues: ``give`` hands it to the next agent's first call.
        self._queues: dict[str, deque[asyncio.Future[bool]]] = {}
        # those of calls that have not begun to run (``take_unless_retired``)
        self._unbegun: set[asyncio.Future[bool]] = set()

    def take_free(self) -> bool:
        """Take a slot if one is free (then nobody queues); False, taking none, if not."""
        if self._free > 0:
            self._free -= 1
            return True
        return False

    async def take(self, agent: str) -> None:
        """Take a slot for a call of ``agent``, queuing for one when none is free: a call
        that ran already (its handler waits for it), which stays when they are retired."""
        if not self.take_free():
            await self._queue(agent, self._waiter(agent))

    async def take_unless_retired(self, agent: str) -> bool:
        """Take a slot for a call of ``agent`` that has not begun to run, queuing for one
        when none is free: False, taking none, if they are retired meanwhile (``retire``)."""
        if self.take_free():
            return True
        waiting = self._waiter(agent)
        self._unbegun.add(waiting)
        try:
            return await self._queue(agent, waiting)
        finally:
            self._unbegun.discard(waiting)

    def retire(self) -> None:
        """Their version was replaced or removed: the calls queuing that have not begun to
        run leave the queue, told False (to go to the new version's slots, as a new call
        would); those that ran already stay, and finish here."""
        for agent, queue in list(self._queues.items()):
            for waiting in [waiting for waiting in queue if waiting in self._unbegun]:
                queue.remove(waiting)
                if not waiting.done():
                    waiting.set_result(False)
            if not queue:
                del self._queues[agent]

    def _waiter(self, agent: str) -> asyncio.Future[bool]:
        waiting: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(agent)
        if queue is None:
            queue = self._queues[agent] = deque()
        queue.append(waiting)
        return waiting

    async def _queue(self, agent: str, waiting: asyncio.Future[bool]) -> bool:
        try:
            return await waiting
        except asyncio.CancelledError:
            if not waiting.cancelled():
                if waiting.result():
                    self.give()  # handed a slot as the call was cancelled: on to the next
            else:  # (``give`` drops the cancelled ones it meets)
                self._leave(agent, waiting)
            raise

    def _leave(self, agent: str, waiting: asyncio.Future[bool]) -> None:
        queue = self._queues.get(agent)
        if queue is not None and waiting in queue:
            queue.remove(waiting)
            if not queue:
                del self._queues[agent]

    def take_owed(self) -> None:
        """Take a slot now, free or not, for a handler that runs and cannot queue for one
        (``PluginSlot.handler_runs_on``): with none free, it is owed, and the next one given
        back pays for it instead of going to a queuing call."""
        self._free -= 1

    def give(self) -> None:
        """Give a slot back: to pay for one owed (``take_owed``), else to the first queuing
        call of the agent whose turn it is (that agent's turn comes again after every other
        queuing agent's), else to the free ones."""
        queues = self._queues
        while queues and self._free == 0:  # (below 0: one is owed; above: nobody queues)
            agent = next(iter(queues))
            queue = queues.pop(agent)
            while queue:
                waiting = queue.popleft()
                if not waiting.done():  # (not cancelled)
                    if queue:
                        queues[agent] = queue  # its next call: after the other agents'
                    waiting.set_result(True)
                    return
        self._free += 1


class PluginSlot:
    """One call's claim on one of its plugin's slots (``_plugin_slots``): held while the
    call runs, given back while it has a question open to its client (``GovernedBridge``),
    taken again when the last one is answered; held past the call's end while its handler
    runs on (``handler_runs_on``), taken again at once for that if it was given back."""

    __slots__ = (
        "_agent",
        "_closed",
        "_held",
        "_regaining",
        "_running_on",
        "_slots",
        "_then",
        "_waiting",
    )

    def __init__(self, slots: PluginSlots, agent: str, *, held: bool = True) -> None:
        self._slots = slots  # taken by the caller if ``held`` (not: they were retired)
        self._agent = agent
        self._held = held
        self._closed = False
        self._running_on = False  # its handler runs on after the call (see handler_runs_on)
        self._waiting = 0  # the call's questions to its client not answered yet
        self._regaining: asyncio.Lock | None = None  # made at the first question
        self._then: Callable[[str], None] | None = None  # (outlives_call)

    @property
    def slots(self) -> PluginSlots:
        """The slots its slot is one of."""
        return self._slots

    async def move(self, slots: PluginSlots) -> None:
        """Give the slot back and take one of ``slots`` (its plugin's new version's),
        queuing for it as a new call would: for a call that has not begun to run. Holds
        none after if ``slots`` are retired meanwhile (a version newer still)."""
        if self._held:
            self._held = False
            self._slots.give()
        self._slots = slots
        self._held = await slots.take_unless_retired(self._agent)

    def client_wait_started(self) -> None:
        """The call asked its client something: the slot is free for others meanwhile."""
        if self._closed:
            return
        self._waiting += 1
        if self._held:
            self._held = False
            self._slots.give()

    async def client_wait_ended(self) -> None:
        """A question was answered (or failed). When none is left open, take a slot again,
        queuing behind the calls that wait for one (the worker's timeout bounds the wait),
        before the answer reaches the plugin. An answer while other questions are open
        goes at once: the call still waits on its client."""
        if self._closed:
            return
        self._waiting -= 1
        if self._waiting:
            return
        if self._regaining is None:
            self._regaining = asyncio.Lock()
        async with self._regaining:  # (a question asked and answered meanwhile: once)
            if self._held or self._closed or self._waiting:
                return
            await self._slots.take(self._agent)
            if self._closed or self._waiting:  # the call ended, or asked again, meanwhile
                self._slots.give()
            else:
                self._held = True

    def client_wait_dropped(self) -> None:
        """A question was cut off with its call (cancelled): no slot to take again."""
        if not self._closed:
            self._waiting -= 1

    def handler_runs_on(self) -> Callable[[], None]:
        """The call ends (cancelled, timed out) while its handler still runs: the slot is
        given back once the function returned is called, when the handler has ended, not
        when the call does. So a plugin runs no more than its max_concurrency handlers,
        however many calls a client cancels and sends again (found by review). A call
        cut off while it asks its client takes a slot again at once, owed if none is free
        (``PluginSlots.take_owed``): its handler, waiting for the answer, runs on too (it
        had none: found by review)."""
        self._running_on = True
        if not self._held:
            self._held = True
            self._slots.take_owed()

        def ended() -> None:
            self._running_on = False
            if self._closed and self._held:
                self._held = False
                self._slots.give()
            then, self._then = self._then, None
            if then is not None and self._closed:
                then(self._agent)

        return ended

    def outlives_call(self, then: Callable[[str], None]) -> bool:
        """After :meth:`close`: whether the call's handler still runs on; if so, ``then`` is
        called with the agent once it has ended. The agent's count of calls in flight goes
        with it: a handler its client cancelled still counts against the agent's limit, so
        that cancelling and sending again cannot take every slot of a plugin (found by
        review)."""
        if not self._running_on:
            return False
        self._then = then
        return True

    def close(self) -> None:
        """The call ended: give the slot back if it holds one, and its handler ended too."""
        self._closed = True
        if self._held and not self._running_on:
            self._held = False
            self._slots.give()


class Kernel:
    """Composes policy, quotas, sandbox and audit into the one governed path."""

    def __init__(
        self,
        *,
        plugins: PluginHost,
        policy: PolicyStore,
        audit: AuditLog,
        quotas: QuotaGate,
        metrics: Metrics,
        limiter: RateLimiter | None,
        agents: AgentService,
    ) -> None:
        self.plugins = plugins
        self.agents = agents  # (a call that waited looks its agent up again)
        # calls whose plugin answered, redacting a large result in a thread: a stopping
        # server waits for them to submit their records (settle)
        self._settling: set[asyncio.Task[Any]] = set()
        self.policy = policy
        self.audit = audit
        self.quotas = quotas
        self.metrics = metrics
        self.limiter = limiter
        #: The plugin workers' answers, which the audit log holds while a batch gathers: a
        #: call that queues for a slot (which a held answer would free) has them read now.
        self.answers: WorkerOutputs | None = None
        self._views: OrderedDict[Any, _ListView] = OrderedDict()
        self._lists: OrderedDict[Any, list[JSON]] = OrderedDict()
        # each plugin's slots, with the runtime (the installed version) they are for
        self._slots: dict[str, tuple[PluginRuntime, PluginSlots]] = {}
        plugins.on_leave = self._retire_slots
        # The in-flight gauge is the quota gate's count of calls admitted to their plugins
        # (unless the metrics were given a source of their own).
        metrics.inflight_from(lambda: quotas.total_inflight)

    def _queued(self) -> contextlib.AbstractContextManager[None]:
        return self.answers.queued() if self.answers is not None else contextlib.nullcontext()

    def _hold_shutdown(self) -> None:
        """The current call (its plugin answered) is to record its outcome before the audit
        log closes, however long its large result's redaction takes (settle)."""
        task = asyncio.current_task()
        if task is not None:
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def settle(self) -> None:
        """Wait for the calls whose plugin answered and whose large result is being
        redacted: a stopping server cut them off (their clients get no answer), but their
        records must be written before the audit log closes (the record of a call whose
        plugin had answered was lost: found by review)."""
        while self._settling:
            await asyncio.wait(set(self._settling))

    # -- listing (not audited: it changes nothing and reveals only what policy permits) --------

    def _view(self, principal: Principal, transport: str) -> _ListView:
        # The whole principal: a policy may name the agent, so two agents with the same
        # plugins may see different lists.
        key = (principal, transport, self.policy.generation, self.plugins.version)
        view = _recall(self._views, key)
        if view is None:
            engine = self.policy.engine
            names = list(self.plugins.manifests)
            listable = engine.allowed_each(
                principal, Verb.LIST_TOOLS, [(name, name) for name in names], transport
            )
            visible = frozenset(name for name, ok in zip(names, listable, strict=True) if ok)
            versions: dict[str, str] = {}
            for kind in LISTS:
                items = [(plugin, item) for plugin, _, item in self._items(kind, visible)]
                # With the policy set that decides each item: a reload changes the version
                # of every list that has items (the client lists again, for nothing at worst)
                basis = [engine.digest, items] if items else []
                versions[kind] = hashlib.sha256(orjson.dumps(basis)).hexdigest()[:16]
            view = _ListView(visible, versions)
            _keep(self._views, key, view, VIEW_CACHE_SIZE)
        return view

    def _items(self, kind: str, plugins: frozenset[str]) -> list[tuple[str, str, JSON]]:
        """The items of the list ``kind`` from ``plugins``: each one's plugin, what policy
        knows it by (a template: its own text, as a completion of it is known) and listing."""
        host = self.plugins
        if kind == "tools":
            every = [(t.plugin, name, t.listing) for name, t in host.tools.items()]
        elif kind == "resources":
            every = [(plugin, uri, r) for uri, (plugin, r) in host.resources.items()]
        elif kind == "resourceTemplates":
            every = [(t.plugin, t.listing["uriTemplate"], t.listing) for t in host.templates]
        else:
            every = [(plugin, name, p) for name, (plugin, p) in host.prompts.items()]
        return [item for item in every if item[0] in plugins]

    def list_versions(self, principal: Principal, transport: str = "unknown") -> dict[str, str]:
        """The version of each list (``LISTS``) as the principal sees it over ``transport``:
        a digest of the items of the plugins it may list (``list_tools``) and, when there
        are any, of the policy set that decides which of them it may use. Decides no item:
        checked every second for every session."""
        return self._view(principal, transport).versions

    def listing(
        self, principal: Principal, kind: str, transport: str = "unknown"
    ) -> tuple[list[JSON], str]:
        """The list ``kind`` (of ``LISTS``) as the principal may see it over ``transport``
        (policy may name it): of the plugins it may list, the items it may use (call a tool,
        read a resource or a template's own text, get a prompt; without labels), and the
        list's version (``list_versions``)."""
        view = self._view(principal, transport)
        key = (kind, principal, transport, self.policy.generation, self.plugins.version)
        items = _recall(self._lists, key)
        if items is None:
            candidates = self._items(kind, view.visible)
            targets = [(target, plugin) for plugin, target, _ in candidates]
            usable = self.policy.engine.allowed_each(
                principal, _LIST_VERBS[kind], targets, transport
            )
            items = [item for (_, _, item), ok in zip(candidates, usable, strict=True) if ok]
            _keep(self._lists, key, items, LIST_CACHE_SIZE)
        return items, view.versions[kind]

    def charge(self, principal: Principal) -> None:
        """Take one request from the agent's rate limit, as ``_govern`` does; raises
        RateLimited. For requests that are no governed call (lists, subscriptions): one
        token each, so that an agent cannot send them without limit either."""
        if self.limiter is not None:
            self.limiter.check(principal.agent)

    async def subscribe(
        self,
        principal: Principal,
        uris: list[str],
        *,
        method: str,
        request_id: RequestId,
        transport: str,
    ) -> list[McpZeroError | None]:
        """Decide the principal's subscription to each of ``uris`` (the policy asks
        ``read_resource``: who may read a resource may hear that it changed) and audit each
        outcome as ``_govern`` does, with the request's ``method``. The request takes one
        token of the agent's rate limit first; over it, the request is audited once as
        refused (its first URI, and ``uri_count``: how many it named) and RateLimited is
        raised. Returns, for each URI, None (allowed) or why not (ResourceNotFound,
        PolicyDenied), once the records are durable: a cancel while they commit is withdrawn,
        as a call's is (``uncancellable``), and the caller answers what they say."""
        start = time.perf_counter()
        try:
            self.charge(principal)
        except McpZeroError as limited:
            # One record for the refused request, not one per URI: a listen names up to
            # 1,000, and an agent over its limit must not fill the audit log with them.
            first = normal_uri(uris[0]) if uris else None
            owner = self.plugins.resource_owner(first) if first else None
            refusal = self.audit.submit(
                {
                    **_event(principal, Verb.READ_RESOURCE, first, owner, request_id, transport),
                    "uri_count": len(uris),
                    "method": method,
                    "outcome": _outcome_of(limited).value,
                    "code": limited.code,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                }
            )
            await uncancellable(refusal)
            raise
        verdicts: list[McpZeroError | None] = []
        pending = []
        for given in uris:
            uri = normal_uri(given)
            plugin = self.plugins.resource_owner(uri)
            event: JSON = {
                **_event(principal, Verb.READ_RESOURCE, uri, plugin, request_id, transport),
                "method": method,
            }
            refused: McpZeroError | None = None
            if plugin is None:
                refused = ResourceNotFound(
                    f"no installed plugin serves resource {uri!r}", data={"uri": uri}
                )
            if refused is None:
                context = {"transport": transport}
                decision = self._decision(
                    Action(principal, Verb.READ_RESOURCE, uri, plugin, {}, context), event
                )
                event["policies"] = list(decision.policies)
                event["policies_sha256"] = decision.policies_sha256
                if decision.errors:
                    event["policy_errors"] = list(decision.errors)
                if not decision.allowed:
                    self.metrics.count_denials(decision.denied_by)
                    refused = PolicyDenied(decision.message, data=decision.to_data())
                    event["reasons"] = _recorded_reasons(decision.reasons, event)
            if refused is None:
                event["outcome"] = Outcome.ALLOWED.value
            else:
                event["outcome"] = _outcome_of(refused).value
                event["code"] = refused.code
            event["duration_ms"] = round((time.perf_counter() - start) * 1000, 3)
            pending.append(self.audit.submit(event))
            verdicts.append(refused)
        if pending:  # durable before the caller learns the outcome, which is what they say
            # (it was answered "cancelled" while they committed as allowed: found by review)
            await uncancellable(asyncio.gather(*pending))
        return verdicts

    def check_resource(self, principal: Principal, uri: str, *, transport: str) -> None:
        """Raise unless ``uri`` exists and the principal may read it over ``transport`` (for
        subscriptions: decided as the subscribe and a read are, with their transport)."""
        uri = normal_uri(uri)
        plugin = self.plugins.resource_owner(uri)
        if plugin is None:
            raise ResourceNotFound(
                f"no installed plugin serves resource {uri!r}", data={"uri": uri}
            )
        action = Action(principal, Verb.READ_RESOURCE, uri, plugin, {}, {"transport": transport})
        decision = self._decision(action, {})
        if not decision.allowed:
            raise PolicyDenied(decision.message, data=decision.to_data())

    # -- the governed actions ---------------------------------------------------------------

    def call_tool(
        self,
        principal: Principal,
        name: str,
        arguments: JSON,
        bridge: ClientBridge,
        *,
        request_id: RequestId,
        transport: str,
    ) -> Coroutine[Any, Any, JSON]:
        """Call tool ``name`` as ``principal`` through the governed path; await what this
        returns (the path's coroutine: no coroutine of its own around it, whose frame every
        suspension of the call would resume too) for the tool's result. Raises what the
        path raises (McpZeroError, CancelledError)."""
        entry = self.plugins.tools.get(name)
        plugin = entry.plugin if entry is not None else None
        digest = _arguments_digest(arguments)  # (computed for the audit record anyway)
        refused: McpZeroError | None = None
        if entry is None:
            if len(name) <= MAX_NAME_LENGTH:
                refused = ToolNotFound(
                    f"unknown tool {shown(name)}: tools/list shows the tools you may call",
                    data={"tool": name},
                )
            else:  # (the admin's execute, `mcp0 agent exec`: /mcp refuses it before this)
                refused = InvalidParams(
                    f"the tool name has {len(name)} characters; at most {MAX_NAME_LENGTH} "
                    "are allowed",
                    data={"limit": MAX_NAME_LENGTH},
                )
                name = ""  # audited as /mcp audits it: no part of it
        elif digest == _TOO_DEEP:
            refused = InvalidParams(
                f"the arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels",
                data={"path": "/arguments"},
            )
        elif digest == _UNENCODABLE:
            refused = InvalidParams(
                "the arguments hold an integer past 64 bits, which JSON between programs "
                "cannot carry exactly; send it as a string",
                data={"path": "/arguments"},
            )
        elif digest == _NOT_UTF8:
            refused = InvalidParams(
                "the arguments hold a string that is not valid Unicode (lone surrogates: "
                "bytes that were not UTF-8), which JSON between programs cannot carry",
                data={"path": "/arguments"},
            )
        # (a partial, not a closure: no cell per variable it would capture, on every call)
        run = functools.partial(self._run_tool, name, arguments, bridge, request_id, transport)
        return self._govern(
            Action(principal, Verb.CALL_TOOL, name, plugin, arguments, {"transport": transport}),
            "tools/call",
            request_id,
            run,
            refused,
            {"arguments_sha256": digest},
        )

    async def _run_tool(
        self,
        name: str,
        arguments: JSON,
        bridge: ClientBridge,
        request_id: RequestId,
        transport: str,
        principal: Principal,
        runtime: PluginRuntime,
        timeout: float,
        slot: PluginSlot,
    ) -> JSON:
        """The part of a tool call in its plugin (``call_tool``'s ``run``): its arguments
        checked against the tool's schema, the call, the result against its outputSchema.
        The tool as the plugin serves it now (``_govern`` checked that it does): a call that
        waited while its plugin was replaced runs on the new code, under the new schemas."""
        entry = self.plugins.tools[name]
        t = time.perf_counter()
        errors = entry.validator.iter_errors(arguments)
        first = next(errors, None)
        self.metrics.observe_stage("schema", time.perf_counter() - t)
        if first is not None:
            raise _schema_error(first)
        result = await runtime.call_tool(
            name,
            arguments,
            agent=principal.agent,
            # its requests to the client are governed too, and free its slot while they wait
            bridge=GovernedBridge(
                self,
                bridge,
                principal,
                entry.plugin,
                slot,
                request_id=request_id,
                transport=transport,
            ),
            timeout=timeout,
        )
        if entry.output_validator is not None and not result.get("isError"):
            _check_output(name, entry.output_validator, result)
        return result

    async def read_resource(
        self,
        principal: Principal,
        uri: str,
        bridge: ClientBridge,
        *,
        request_id: RequestId,
        transport: str,
    ) -> JSON:
        uri = normal_uri(uri)  # the plugin, the policy and the audit see one form of it
        plugin = self.plugins.resource_owner(uri)

        async def run(
            principal: Principal, runtime: PluginRuntime, timeout: float, slot: PluginSlot
        ) -> JSON:
            return await runtime.read_resource(
                uri,
                agent=principal.agent,
                bridge=self._client_bridge(bridge, principal, plugin, slot, request_id, transport),
                timeout=timeout,
            )

        missing = None
        if plugin is None:
            missing = ResourceNotFound(
                f"no installed plugin serves resource {uri!r}", data={"uri": uri}
            )
        return await self._govern(
            Action(principal, Verb.READ_RESOURCE, uri, plugin, {}, {"transport": transport}),
            "resources/read",
            request_id,
            run,
            missing,
            {},
        )

    async def get_prompt(
        self,
        principal: Principal,
        name: str,
        arguments: dict[str, str],
        bridge: ClientBridge,
        *,
        request_id: RequestId,
        transport: str,
    ) -> JSON:
        hit = self.plugins.prompts.get(name)
        plugin = hit[0] if hit is not None else None
        digest = _arguments_digest(arguments)  # (computed for the audit record anyway)

        async def run(
            principal: Principal, runtime: PluginRuntime, timeout: float, slot: PluginSlot
        ) -> JSON:
            # as its plugin serves it now: one replaced while the call waited, anew
            owner, prompt = self.plugins.prompts[name]
            declared = [arg["name"] for arg in prompt.get("arguments", [])]
            unknown = sorted(set(arguments) - set(declared))
            if unknown:
                # the plugin's handler would fail on it with a Python TypeError
                takes = ", ".join(declared) if declared else "none"
                raise InvalidParams(
                    f"prompt {name!r} has no argument {', '.join(map(repr, unknown))} "
                    f"(its arguments: {takes}); prompts/list shows them",
                    data={"path": f"/arguments/{unknown[0]}"},
                )
            for arg in prompt.get("arguments", []):
                if arg.get("required") and arg["name"] not in arguments:
                    raise InvalidParams(
                        f"prompt {name!r} needs argument {arg['name']!r}",
                        data={"path": f"/arguments/{arg['name']}"},
                    )
            return await runtime.get_prompt(
                name,
                arguments,
                agent=principal.agent,
                bridge=self._client_bridge(bridge, principal, owner, slot, request_id, transport),
                timeout=timeout,
            )

        missing = None
        if plugin is None:
            missing = PromptNotFound(
                f"unknown prompt {name!r}: prompts/list shows what exists", data={"prompt": name}
            )
        return await self._govern(
            Action(
                principal, Verb.GET_PROMPT, name, plugin, dict(arguments), {"transport": transport}
            ),
            "prompts/get",
            request_id,
            run,
            missing,
            {"arguments_sha256": digest},
        )

    async def complete(
        self,
        principal: Principal,
        ref: JSON,
        argument: JSON,
        context: JSON | None,
        *,
        request_id: RequestId,
        transport: str,
    ) -> JSON:
        kind = "prompt" if ref.get("type") == "ref/prompt" else "resource"
        digest = _arguments_digest(completion_arguments(argument, context))
        if kind == "prompt":
            target = str(ref.get("name", ""))
            hit = self.plugins.prompts.get(target)
            plugin = hit[0] if hit is not None else None
        else:
            target = normal_uri(str(ref.get("uri", "")))  # as read_resource has it
            plugin = self.plugins.resource_owner(target) or self.plugins.template_owner(target)

        async def run(
            principal: Principal, runtime: PluginRuntime, timeout: float, slot: PluginSlot
        ) -> JSON:
            return await runtime.complete(
                ref, argument, context, agent=principal.agent, timeout=timeout
            )

        missing: McpZeroError | None = None
        if plugin is None and kind == "prompt":
            missing = PromptNotFound(f"unknown prompt {target!r}", data={"prompt": target})
        elif plugin is None:
            missing = ResourceNotFound(
                f"no installed plugin serves {target!r}", data={"uri": target}
            )
        # what policy labels: the value the client typed, under the argument's name, and the
        # values of the arguments it gave as context
        typed: JSON = {str(argument.get("name", "")): argument.get("value")}
        given = context.get("arguments") if context is not None else None
        if isinstance(given, dict) and given:
            typed = {"argument": typed, "context": {"arguments": given}}
        return await self._govern(
            Action(
                principal,
                Verb.COMPLETE,
                target,
                plugin,
                typed,
                {"transport": transport, "ref": kind},
            ),
            "completion/complete",
            request_id,
            run,
            missing,
            {"arguments_sha256": digest},
        )

    async def audit_cancelled(
        self,
        principal: Principal,
        verb: Verb,
        target: str,
        *,
        method: str,
        request_id: RequestId,
        transport: str,
        arguments: JSON | None = None,
    ) -> None:
        """Audit an action the client cancelled before it started: it reached neither policy
        nor a plugin, and it is recorded as ``cancelled``, like one cut off while it ran, with
        the digest of its ``arguments`` (a completion's: :func:`completion_arguments`)."""
        event = _event(principal, verb, target, self._owner(verb, target), request_id, transport)
        if verb in (Verb.CALL_TOOL, Verb.GET_PROMPT, Verb.COMPLETE):  # (those with arguments)
            event["arguments_sha256"] = _arguments_digest(arguments or {})
        event.update(outcome=Outcome.ERROR.value, code="cancelled", duration_ms=0.0)
        await self.audit.submit(event)
        self.metrics.count_call(method, Outcome.ERROR.value)

    async def refuse(
        self,
        principal: Principal,
        verb: Verb,
        target: str,
        refusal: McpZeroError,
        *,
        method: str,
        request_id: RequestId,
        transport: str,
        detail: JSON | None = None,
    ) -> NoReturn:
        """Audit a request of the principal refused before it named an action (malformed
        params: ``target`` is what it named, "" if nothing valid), as ``_govern`` audits
        refused calls — over the rate limit it is refused as such — and raise ``refusal``.
        ``detail`` goes into the record (a subscription's ``method``)."""

        async def run(
            principal: Principal, runtime: PluginRuntime, timeout: float, slot: PluginSlot
        ) -> JSON:
            raise AssertionError("a refused request does not run")  # pragma: no cover

        await self._govern(
            Action(principal, verb, target, None, {}, {"transport": transport}),
            method,
            request_id,
            run,
            refusal,
            detail or {},
        )
        raise AssertionError("_govern raises the refusal")  # pragma: no cover

    def _owner(self, verb: Verb, target: str) -> str | None:
        """The plugin that serves ``target`` of an action ``verb``, if one does."""
        if verb is Verb.CALL_TOOL:
            entry = self.plugins.tools.get(target)
            return entry.plugin if entry is not None else None
        if verb is Verb.GET_PROMPT:
            prompt = self.plugins.prompts.get(target)
            return prompt[0] if prompt is not None else None
        if verb is Verb.COMPLETE and target in self.plugins.prompts:
            return self.plugins.prompts[target][0]
        return self.plugins.resource_owner(target) or self.plugins.template_owner(target)

    # -- the one path ---------------------------------------------------------------------

    async def _govern(
        self,
        action: Action,
        method: str,
        request_id: RequestId,
        run: Callable[[Principal, PluginRuntime, float, PluginSlot], Awaitable[JSON]],
        refused: McpZeroError | None,
        detail: JSON,
    ) -> JSON:
        """Govern ``action``: ``run`` it in its plugin's runtime, as the principal of the
        decision that let it, if the rate limit, the policy, the quotas and the audit log let
        it, or raise ``refused`` (a target that does not exist, arguments that cannot be
        carried) once the rate limit is passed. Every outcome is audited before this returns
        or raises."""
        metrics = self.metrics
        start = time.perf_counter()
        principal = action.principal
        transport = action.context.get("transport")
        event = _event(
            principal, action.verb, action.resource, action.plugin, request_id, transport
        )
        event.update(detail)
        result: JSON | None = None
        failure: BaseException | None = None
        # the labels the permits that allowed it have redacted, from its result or its error
        redacting: tuple[str, ...] = ()
        # what was in force when it was decided, once it waits (None: it has not waited)
        decided_under: tuple[int, int] | None = None
        # the stages' seconds, recorded together at the end (None: the stage did not run)
        policy_s: float | None = None
        sandbox_s: float | None = None
        try:
            if self.limiter is not None:
                self.limiter.check(principal.agent)
            if refused is not None:
                raise refused
            t = time.perf_counter()
            try:
                decision = self.decide(action, event)
            finally:  # a denial was decided too
                policy_s = time.perf_counter() - t
            # its record could not be kept: refuse first (writable() asks the store again
            # only once the log failed)
            if self.audit.stats.failing and not self.audit.writable():
                raise _audit_failing(self.audit)
            redacting = decision.redact
            if decision.audit_before:  # an obligation: recorded, durably, before it can act
                decided_under = self._in_force()
                await self._record_intent(event)
            plugin = action.plugin
            assert plugin is not None
            runtime = self.plugins.runtime(plugin)
            quotas = self.plugins.manifests[plugin].quotas
            timeout = self.quotas.timeout_for(None, quotas.timeout_ms)
            self.quotas.enter(principal.agent)
            slot: PluginSlot | None = None
            try:
                slots = self._plugin_slots(plugin, runtime, quotas.max_concurrency)
                t = time.perf_counter()
                queued = starting = 0.0
                held = slots.take_free()
                if not held:  # the plugin is busy: queue, within the time limit
                    if decided_under is None:
                        decided_under = self._in_force()
                    # (none, if its version is replaced meanwhile: it moves to the new one's)
                    with self._queued():
                        held = await _wait_for_slot(
                            slots.take_unless_retired(principal.agent),
                            timeout,
                            plugin,
                            quotas.max_concurrency,
                        )
                    queued = time.perf_counter() - t
                    metrics.observe_stage("quota", queued)
                slot = PluginSlot(slots, principal.agent, held=held)
                try:
                    # It waited (for a slot, its worker, or its intent's record): a change
                    # recorded meanwhile (policies, plugins, its agent) governs it as it would a
                    # new call, and a plugin replaced meanwhile runs it with the new code, under
                    # the new manifest (its schemas: see ``run``; its timeout).
                    while True:
                        while decided_under is not None:
                            changed = self._decide_again(action, event, decided_under)
                            decided_under = None
                            if changed is not None:
                                action, decision = changed
                                redacting = decision.redact
                                if decision.audit_before and "intent_seq" not in event:
                                    decided_under = self._in_force()
                                    await self._record_intent(event)
                            runtime = self.plugins.runtime(plugin)
                            quotas = self.plugins.manifests[plugin].quotas
                            limit = self.quotas.timeout_for(None, quotas.timeout_ms)
                            timeout = max(limit - queued - starting, 0.001)
                            slots = self._plugin_slots(plugin, runtime, quotas.max_concurrency)
                            if slot.slots is not slots:
                                # the new version's max_concurrency holds it, not the old one's
                                # (with the old slots, lowering it let as many run as before:
                                # found by review); a wait, after which it is decided again
                                # (and moves again if its version was replaced meanwhile)
                                decided_under = self._in_force()
                                began = time.perf_counter()
                                with self._queued():
                                    await _wait_for_slot(
                                        slot.move(slots), timeout, plugin, quotas.max_concurrency
                                    )
                                queued += time.perf_counter() - began
                        if not runtime.ready():
                            # its worker is (re)starting (a crash, a slow import): a wait too,
                            # that a change recorded meanwhile is to govern (it ran on the
                            # decision of before: found by review)
                            decided_under = self._in_force()
                            began = time.perf_counter()
                            await runtime.until_ready(timeout, f"{method} of {action.resource!r}")
                            starting += time.perf_counter() - began
                            timeout = max(timeout - (time.perf_counter() - began), 0.001)
                            continue
                        if self.audit.stats.blocked_since is None:
                            break
                        unblocked = self.audit.unblocked()
                        if unblocked is None:
                            break
                        # Records wait for another process's lock, and fail if it is held past
                        # the busy timeout: a call that acted now would lose its record with
                        # them (found by review). It waits for them (a wait too), and is
                        # refused below if they failed.
                        decided_under = self._in_force()
                        await asyncio.wait((unblocked,))  # (a cancel must not cancel it)
                    # (it may have failed while we queued)
                    if self.audit.stats.failing and not self.audit.writable():
                        raise _audit_failing(self.audit)
                    # (as decided again, if it was: its questions to its client are decided for
                    # the principal that is now, not the one it started with: found by review)
                    result = await run(action.principal, runtime, timeout, slot)
                except ToolTimeout as exc:
                    cap = self.quotas.max_timeout_s
                    if quotas.timeout_ms is not None and quotas.timeout_ms / 1000 > cap:
                        exc.message = exc.message.replace(
                            TIMEOUT_HINT,
                            f"the server's max_timeout_s ({cap:g} s) cut the plugin's "
                            f"timeout_ms ({quotas.timeout_ms} ms): raise max_timeout_s, or "
                            "make it faster",
                        )
                        exc.args = (exc.message,)
                    if queued:  # (it ran for what its queueing left of the limit)
                        n = quotas.max_concurrency
                        exc.message += (
                            f" (it waited {seconds(queued)} s of its "
                            f"{seconds(timeout + queued + starting)} s limit for a free slot: "
                            f"the plugin runs {n} call{'' if n == 1 else 's'} at a time, its "
                            "max_concurrency)"
                        )
                        exc.args = (exc.message,)
                    raise
                finally:
                    slot.close()
                    sandbox_s = time.perf_counter() - t
            finally:
                if slot is None or not slot.outlives_call(self.quotas.leave):
                    self.quotas.leave(principal.agent)
            if redacting:  # the obligation of the permits that allowed it
                if _large(result):
                    self._hold_shutdown()
                result, redacted = await _redacted(result, redacting)
                _note_redaction(event, redacting, redacted)
            if result.get("isError"):
                event["tool_error"] = True
        except asyncio.CancelledError as exc:
            failure = exc
            event["outcome"] = _ERROR
            event["code"] = "cancelled"
        except McpZeroError as exc:
            failure = exc
            if redacting:  # a plugin's error message can carry what its result would have
                await _redact_error(exc, redacting, event)
            event["outcome"] = _outcome_of(exc).value
            event["code"] = exc.code
            if isinstance(exc, PolicyDenied) and exc.data:
                event["policies"] = exc.data.get("policies", [])
                event["reasons"] = _recorded_reasons(exc.data.get("reasons", []), event)
        except Exception as exc:
            failure = exc
            event["outcome"] = _ERROR
            event["code"] = "internal"
            log.exception("internal error in %s", method)
        else:
            event["outcome"] = _ALLOWED
        t = time.perf_counter()
        event["duration_ms"] = round((t - start) * 1000, 3)
        # The record must be durable before the caller learns the outcome, and the caller
        # learns what it records: a cancel from here on (the client's, its session's end, a
        # stopping server) is too late to stop the action, and is withdrawn.
        try:
            await uncancellable(self.audit.submit(event))
        except BaseException as exc:
            # the stages that ran are observed all the same; a call whose record failed is
            # counted as an error
            record_failed = isinstance(exc, StorageError)
            outcome = _ERROR if record_failed else None
            metrics.finish_call(method, outcome, policy_s, sandbox_s, None, None)
            if record_failed and isinstance(failure, StorageError):
                raise failure from None  # the refusal says more than its record's failure
            raise
        end = time.perf_counter()
        metrics.finish_call(method, event["outcome"], policy_s, sandbox_s, end - t, end - start)
        if failure is not None:
            raise failure
        assert result is not None
        return result

    def decide(self, action: Action, event: JSON) -> PolicyDecision:
        """The policy's decision on ``action`` (as ``_decision`` makes it) if it allows it,
        noted in the action's audit ``event``; raises PolicyDenied (counted) if not."""
        policy = self.policy
        # (``_decision``, inline: every tools/call comes this way)
        if policy.uses_labels:  # (else detectors need not run)
            self._label(action, event)
        decision = policy.decide(action)
        if decision.allowed and action.verb is not Verb.CALL_TOOL:
            decision = self._as_templates_too(action, decision)
        # the set that decided it, as the decision says: the store may have put another in
        # force by the time the record is written
        event["policies_sha256"] = decision.policies_sha256
        if not decision.allowed:
            self.metrics.count_denials(decision.denied_by)
            raise PolicyDenied(decision.message, data=decision.to_data())
        event["policies"] = decision.policies  # (a tuple: the same JSON as a list)
        if decision.errors:  # policies skipped: what they might have said is evidence
            event["policy_errors"] = decision.errors
        return decision

    def _decision(self, action: Action, event: JSON) -> PolicyDecision:
        """The policy's decision on ``action``, with the labels of what it carries
        (``_label``) and, of a URI a template serves, under the template too
        (``_as_templates_too``)."""
        policy = self.policy
        if policy.uses_labels:  # (else detectors need not run)
            self._label(action, event)
        decision = policy.decide(action)
        return self._as_templates_too(action, decision) if decision.allowed else decision

    def _label(self, action: Action, event: JSON) -> None:
        """Put the labels of what ``action`` carries, if any, in its context and its audit
        ``event``: of the URI it reads, or of its arguments (a tool's, a prompt's, what a
        client request would send), and of the URI a resource's completion names."""
        in_uri: frozenset[str] = frozenset()
        if action.verb is Verb.READ_RESOURCE:
            labels = in_uri = label_uri(action.resource)
        else:
            labels = label_value(action.arguments) if action.arguments else frozenset()
            # a resource's completion: of its URI too, unless it is a template's own text,
            # whose variables (``?token={token}``) are names, not values
            if (
                action.verb is Verb.COMPLETE
                and action.context.get("ref") == "resource"
                and self.plugins.template_owner(action.resource) is None
            ):
                in_uri = label_uri(action.resource)
                labels |= in_uri
        if labels:
            action.context["labels"] = labels
            event["labels"] = sorted(labels)
        if in_uri:
            # Recorded as its client would be shown it redacted: arguments are recorded as a
            # digest, and a URI holding a secret was recorded whole (found by a bug hunt)
            event["resource"] = _recorded_uri(action.resource, in_uri)

    def _as_templates_too(self, action: Action, decision: PolicyDecision) -> PolicyDecision:
        """``decision``, an allow of ``action``, joined with the policy's decisions on it
        under the text of each template of its plugin that serves the URI it reads or
        completes (``PolicyDecision.joined``): a forbid there denies it, as the lists and
        completions know it by that text (a forbid on it hid the template, whose every URI
        could still be read: found by review). Not for a URI a resource serves, nor for a
        template's own text."""
        verb, uri = action.verb, action.resource
        if verb is not Verb.READ_RESOURCE and (
            verb is not Verb.COMPLETE or action.context.get("ref") == "prompt"
        ):
            return decision
        if uri in self.plugins.resources or self.plugins.template_owner(uri) == action.plugin:
            return decision
        for template in self.plugins.templates:
            if template.plugin == action.plugin and template.pattern.match(uri):
                seen_as = Action(
                    action.principal,
                    verb,
                    template.listing["uriTemplate"],
                    action.plugin,
                    {},
                    action.context,
                )
                decision = decision.joined(self.policy.decide(seen_as))
        return decision

    def _in_force(self) -> tuple[int, int]:
        """What decides an action that may change while it waits: the policy set's generation
        and the installed plugins' version (its agent is looked up again)."""
        return self.policy.generation, self.plugins.version

    def _decide_again(
        self, action: Action, event: JSON, decided_under: tuple[int, int]
    ) -> tuple[Action, PolicyDecision] | None:
        """For ``action``, decided under ``decided_under`` (``_in_force``) and then made to
        wait: None if neither the policy set, nor the installed plugins, nor its agent (its
        status, its plugins) changed since; else the action with its principal as it is now,
        and the policy's decision on it, noted in ``event`` instead of the first. Raises what
        a new call would meet: Unauthorized (its agent was terminated), PluginNotFound (its
        plugin no longer serves its target), PolicyDenied."""
        principal = now = action.principal
        plugins_changed = self.plugins.version != decided_under[1]
        try:
            if not principal.admin:  # (the admin is no agent)
                if plugins_changed:  # a removal detached its plugin from every agent, in the store
                    self.agents.forget(principal.agent)
                now = self.agents.principal(principal.agent, anonymous=principal.anonymous)
            if (
                now == principal
                and not plugins_changed
                and self.policy.generation == decided_under[0]
            ):
                return None
            if self._owner(action.verb, action.resource) != action.plugin:
                raise PluginNotFound(
                    f"plugin {action.plugin!r} no longer serves {action.resource!r}: it was "
                    "removed or replaced while this call waited for it; the lists show what "
                    "you may use"
                )
        except McpZeroError:
            # refused before any policy decided it again: its record names no decision (the
            # first one's policies are not what refused it: found by review)
            for key in ("policies", "policies_sha256", "policy_errors"):
                event.pop(key, None)
            raise
        action = Action(
            now, action.verb, action.resource, action.plugin, action.arguments, action.context
        )
        event.pop("policy_errors", None)
        return action, self.decide(action, event)

    async def _record_intent(self, event: JSON) -> None:
        """Commit the ``intent`` record of the action of ``event`` (the ``@audit("before")``
        obligation), and name it in the action's own."""
        event["obligations"] = ["audit:before"]
        intent = await self.audit.submit({**event, "outcome": INTENT})
        # the action's own record names its intent: a request_id is the client's, and every
        # session of every client reuses them
        event["intent_seq"] = intent.seq

    def _client_bridge(
        self,
        bridge: ClientBridge,
        principal: Principal,
        plugin: str | None,
        slot: PluginSlot,
        request_id: RequestId,
        transport: str,
    ) -> GovernedBridge:
        """The bridge a plugin's call gets: its requests to the client are governed too, and
        free the call's plugin slot while they wait for the client."""
        assert plugin is not None
        return GovernedBridge(
            self, bridge, principal, plugin, slot, request_id=request_id, transport=transport
        )

    def _retire_slots(self, runtime: PluginRuntime) -> None:
        """``runtime`` was replaced or removed: the calls queuing for its slots that have not
        begun to run go on at once (to the new version's slots, decided again), not when
        its calls give one back (``PluginSlots.retire``)."""
        held = self._slots.get(runtime.name)
        if held is not None and held[0] is runtime:
            del self._slots[runtime.name]
            held[1].retire()

    def _plugin_slots(self, plugin: str, runtime: PluginRuntime, limit: int) -> PluginSlots:
        """The slots holding ``runtime``, plugin ``plugin``'s, to its manifest's ``limit``
        (max_concurrency) calls at once. Each version installed has its own: the calls a
        replaced one runs finish on its slots, the calls admitted after count against the
        new one's."""
        held = self._slots.get(plugin)
        if held is None or held[0] is not runtime:
            held = self._slots[plugin] = (runtime, PluginSlots(limit))
        return held[1]

    def log_internal_error(self, method: str, exc: BaseException) -> None:
        log.error("internal error handling %s", method, exc_info=exc)
