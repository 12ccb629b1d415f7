"""``notifications/{tools,resources,prompts}/list_changed``: a session is told when what it
sees in one of those lists changes, and only then, and only of that list.

The same goes for MCP 2026-07-28's ``subscriptions/listen`` streams (:class:`Listener`),
each for the lists it asked about.

What a session sees depends on its agent's attached plugins, on the installed plugins and
on the policies. Each can change in this process (the admin API) or in another (the CLI
writes the store), so sessions are checked when the plugin host reports a new index and
every second. A check compares each list's version (``Kernel.list_versions``: a digest,
cached, which decides no item) with the one the session was last told of: a few dictionary
lookups per session. Only a list request decides what of the list the agent may use. After
a policy reload or a plugin change, each agent's view is worked out again (one Cedar batch
over the installed plugins per agent with a session): the check lets the loop run other
work every few milliseconds meanwhile, and one check runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from mcp_zero.errors import Unauthorized
from mcp_zero.kernel.action import Principal
from mcp_zero.kernel.agents import Admission, AgentService
from mcp_zero.kernel.pipeline import Kernel
from mcp_zero.rpc.session import JSON, Channel, Session

log = logging.getLogger("mcp_zero.list_changes")
# Each notification and the lists (Kernel.listing kinds) it speaks for.
NOTICES = {
    "notifications/tools/list_changed": ("tools",),
    "notifications/resources/list_changed": ("resources", "resourceTemplates"),
    "notifications/prompts/list_changed": ("prompts",),
}
CHECK_INTERVAL_S = 1.0
YIELD_AFTER_S = 0.005  # how long a check works before the loop runs other work
# why a session or stream ends (_Now.look), as its log line says it: "agent 'x' <why>"
TERMINATED = "was terminated"
ROTATED = "has a new token (the one this was opened with was rotated)"

Listeners = Callable[[], Iterable[tuple[Session, Channel | None]]]


class Mailbox:
    """What a listen stream is still to send, in the order first posted; a notice already
    waiting is not posted again (one ``resources/updated`` of a URI, one ``list_changed`` of
    a list, however often it changed until the client is told), so a client that reads
    slowly holds at most one notice per resource and list it listens to. ``None`` ends the
    stream, after what waits."""

    __slots__ = ("_ended", "_notes", "_posted")

    def __init__(self) -> None:
        self._notes: dict[tuple[str, str | None], JSON] = {}
        self._ended = False
        self._posted = asyncio.Event()

    @property
    def ended(self) -> bool:
        """Whether the stream is to end (what waits is still sent first)."""
        return self._ended

    def qsize(self) -> int:
        """Notices waiting (and the end, once posted)."""
        return len(self._notes) + self._ended

    def put_nowait(self, note: JSON | None) -> None:
        if note is None:
            self._ended = True
        elif not self._ended:
            params = note.get("params")
            uri = params.get("uri") if isinstance(params, dict) else None
            self._notes.setdefault((note["method"], uri), note)
        self._posted.set()

    async def get(self) -> JSON | None:
        """The oldest notice waiting (waiting for one); None once the stream is to end."""
        while not self._notes:
            if self._ended:
                return None
            self._posted.clear()
            await self._posted.wait()
        key = next(iter(self._notes))
        return self._notes.pop(key)


class Listener:
    """One open ``subscriptions/listen`` request (MCP 2026-07-28): the list notices and the
    resources it asked for, the list versions its client knows, and its mailbox."""

    __slots__ = ("credential", "mailbox", "notices", "principal", "uris", "views")

    def __init__(
        self,
        principal: Principal,
        notices: frozenset[str],
        uris: frozenset[str],
        credential: str | None = None,
    ) -> None:
        self.principal = principal
        self.credential = credential  # its session's (Session.credential)
        self.notices = notices  # of NOTICES
        self.uris = uris
        self.views: dict[str, str] = {}
        self.mailbox = Mailbox()  # None: the server ends it


class ListChanges:
    """Tells the sessions ``listeners`` returns (with the channel for server-initiated
    messages, or None where there is none) when their lists change."""

    def __init__(
        self,
        kernel: Kernel,
        agents: AgentService,
        listeners: Listeners,
        streams: Callable[[], Iterable[Listener]] = tuple,
        ended: Callable[[Session, str], Awaitable[None]] | None = None,
        at_work: Callable[[], Iterable[Principal]] = tuple,
        end_agent: Callable[[str], None] | None = None,
        transport: str = "http",
    ) -> None:
        self.kernel = kernel
        self.transport = transport  # what its sessions' lists are decided for (policy)
        self.agents = agents
        self.listeners = listeners
        self.streams = streams  # the open listen streams
        # ends a session (its transport's way) whose agent was terminated, or whose token was
        # rotated: given why, as "agent 'x' <why>"
        self.ended = ended
        self.at_work = at_work  # whose sessionless calls run now
        self.end_agent = end_agent  # stops a terminated agent's sessionless calls
        self._checks: set[asyncio.Task[None]] = set()
        # A check after a policy reload or a plugin install works out each agent's view
        # again (a Cedar batch over the installed plugins): with thousands of sessions,
        # seconds to minutes of work. It lets the loop run other work after this long.
        self.yield_after_s = YIELD_AFTER_S
        self._running: asyncio.Future[None] | None = None  # the check under way
        self._again = False  # asked for while one ran: it checks once more

    def seen(self, session: Session) -> None:
        """Take what ``session`` sees now as what its client knows (a new session)."""
        session.views = versions(self.kernel, session.principal, self.transport)

    def poke(self) -> None:
        """Check soon (from synchronous code: the plugin host's ``on_change``)."""
        task = asyncio.get_running_loop().create_task(self.check())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def run(self, interval: float = CHECK_INTERVAL_S) -> None:
        """Check every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:
                log.exception("checking the sessions' lists failed; trying again")

    async def check(self) -> None:
        """Bring each session's principal up to date (its agent's plugins may have changed)
        and send it a ``list_changed`` for each list whose version changed. One check runs at
        a time: asked for meanwhile, it runs once more, and this returns after that."""
        running = self._running
        if running is not None:
            self._again = True
            await asyncio.wait((running,))  # (cancelling this waiter cancels not that check)
            return
        running = self._running = asyncio.get_running_loop().create_future()
        try:
            self._again = True
            while self._again:
                self._again = False
                await self._check_once()
        finally:
            self._running = None
            running.set_result(None)

    async def _check_once(self) -> None:
        # What was open as it began (one opened meanwhile took its first look itself: the
        # next check has it); and, after each wait, what it knows of the agents read again:
        # a token rotated or a plugin attached meanwhile ended a new token's stream, or sent
        # a stream opened since a notice of nothing (found by review)
        sessions, streams = list(self.listeners()), list(self.streams())
        # (found by review: a reload with 3,000 sessions held every request for 63 s, a call
        # that ended in time among them, recorded as a timeout): it lets others run meanwhile
        now = _Now(self.kernel, self.agents, self.transport, self.yield_after_s)
        for session, channel in sessions:
            await now.let_others_run()
            if session.closed:
                continue
            looked = now.look(session.principal, session.credential)
            if isinstance(looked, str):  # terminated, or rotated: it ends, streams and all
                if self.ended is not None:
                    await self.ended(session, looked)
                    now.forget()
                continue
            session.principal, current = looked
            if not session.views:  # a session no one took a first look at
                session.views = current
                continue
            changed = _changed(session.views, current, NOTICES)
            session.views = current  # before sending: a check meanwhile finds nothing new
            if channel is not None and changed:
                for method in changed:
                    await channel.send({"jsonrpc": "2.0", "method": method})
                now.forget()
        if self.end_agent is not None:
            for principal in {p.agent: p for p in self.at_work()}.values():
                if now.look(principal) == TERMINATED:
                    self.end_agent(principal.agent)
        for stream in streams:
            await now.let_others_run()
            if stream.mailbox.ended:
                continue
            looked = now.look(stream.principal, stream.credential)
            if isinstance(looked, str):  # terminated, or rotated: the stream ends
                stream.mailbox.put_nowait(None)
                continue
            stream.principal, current = looked
            for method in _changed(stream.views, current, stream.notices):
                stream.mailbox.put_nowait({"jsonrpc": "2.0", "method": method})
            stream.views = current


def versions(kernel: Kernel, principal: Principal, transport: str) -> dict[str, str]:
    """The version of each list as ``principal`` sees it over ``transport``."""
    return kernel.list_versions(principal, transport)


def _changed(known: dict[str, str], current: dict[str, str], notices: Iterable[str]) -> list[str]:
    """The notices (of ``notices``) whose lists changed from ``known`` to ``current``."""
    return [
        method
        for method in notices
        if any(known.get(kind) != current[kind] for kind in NOTICES[method])
    ]


class _Now:
    """One check's view of the principals (their agents' plugins may have changed in another
    process) and of what each sees: many sessions and streams share one."""

    def __init__(
        self, kernel: Kernel, agents: AgentService, transport: str, yield_after_s: float
    ) -> None:
        self.kernel = kernel
        self.agents = agents
        self.transport = transport
        self._yield_after_s = yield_after_s
        self._worked_since = time.perf_counter()
        self._admissions: dict[tuple[str, bool], Admission | None] = {}
        self._read: set[tuple[str, bool]] = set()  # admissions read from the store by this check
        self._versions: dict[Principal, dict[str, str]] = {}

    def forget(self) -> None:
        """Forget the principals and versions looked at (the check waited: they may have
        changed), not which agents were read from the store this check: reading one again
        for each of its sessions (a rotation) cost a read and a cache rebuild per session
        (found by review)."""
        self._admissions.clear()
        self._versions.clear()

    async def let_others_run(self) -> None:
        """Once the check has worked ``yield_after_s`` on end, let the loop run what waits,
        and forget what may have changed meanwhile."""
        if time.perf_counter() - self._worked_since >= self._yield_after_s:
            await asyncio.sleep(0)
            self.forget()
            self._worked_since = time.perf_counter()

    def _admit(self, key: tuple[str, bool]) -> None:
        try:
            self._admissions[key] = self.agents.admission(key[0], anonymous=key[1])
        except Unauthorized:
            self._admissions[key] = None

    def look(
        self, known: Principal, credential: str | None = None
    ) -> tuple[Principal, dict[str, str]] | str:
        """The principal as it is now and what it sees; or why what it opened ends: its
        agent was terminated (:data:`TERMINATED`), or ``credential`` (the hash of the token
        it was opened with) is no longer its agent's token (:data:`ROTATED`)."""
        key = (known.agent, known.anonymous)
        if key not in self._admissions:
            self._admit(key)
        admitted = self._admissions[key]
        if admitted is not None and credential not in (None, admitted.token_hash):
            if key not in self._read:
                # What is remembered may be older than the session: rotated by another
                # process, and the session opened with the new token at once (it was ended:
                # found by review). The store says; and then the old token opens no other.
                self.agents.forget(known.agent)
                self._admit(key)
                self._read.add(key)
                admitted = self._admissions[key]
            if admitted is not None and credential != admitted.token_hash:
                return ROTATED
        if admitted is None:
            return TERMINATED
        principal = admitted.principal
        if principal != known:
            # Changed by another process: the token cache must not hand the old plugins
            # back to the client that relists on this notice.
            self.agents.forget(known.agent)
        current = self._versions.get(principal)
        if current is None:
            current = self._versions[principal] = versions(self.kernel, principal, self.transport)
        return principal, current
