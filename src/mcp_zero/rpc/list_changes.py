"""``notifications/{tools,resources,prompts}/list_changed``: a session is told when what it
sees in one of those lists changes, and only then, and only of that list.

What a session sees depends on its agent's attached plugins, on the installed plugins and
on the policies. Each can change in this process (the admin API) or in another (the CLI
writes the store), so sessions are checked when the plugin host reports a new index and
every second. A check compares each list's version (``Kernel.listing``: a digest, cached)
with the one the session was last told of: a few dictionary lookups per session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from mcp_zero.errors import Unauthorized
from mcp_zero.kernel.action import Principal
from mcp_zero.kernel.agents import AgentService
from mcp_zero.kernel.pipeline import Kernel
from mcp_zero.rpc.session import Channel, Session

log = logging.getLogger("mcp_zero.list_changes")
# Each notification and the lists (Kernel.listing kinds) it speaks for.
NOTICES = {
    "notifications/tools/list_changed": ("tools",),
    "notifications/resources/list_changed": ("resources", "resourceTemplates"),
    "notifications/prompts/list_changed": ("prompts",),
}
LISTS = tuple(kind for kinds in NOTICES.values() for kind in kinds)
CHECK_INTERVAL_S = 1.0

Listeners = Callable[[], Iterable[tuple[Session, Channel | None]]]


class ListChanges:
    """Tells the sessions ``listeners`` returns (with the channel for server-initiated
    messages, or None where there is none) when their lists change."""

    def __init__(self, kernel: Kernel, agents: AgentService, listeners: Listeners) -> None:
        self.kernel = kernel
        self.agents = agents
        self.listeners = listeners
        self._checks: set[asyncio.Task[None]] = set()

    def seen(self, session: Session) -> None:
        """Take what ``session`` sees now as what its client knows (a new session)."""
        session.views = self._versions(session.principal)

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
        and send it a ``list_changed`` for each list whose version changed."""
        principals: dict[tuple[str, bool], Principal | None] = {}
        seen: dict[Principal, dict[str, str]] = {}  # many sessions share a principal
        for session, channel in list(self.listeners()):
            if session.closed:
                continue
            known = session.principal
            key = (known.agent, known.anonymous)
            if key not in principals:
                principals[key] = self._current(known)
            principal = principals[key]
            if principal is None:
                continue  # the agent was terminated: its next request is refused
            if principal != known:
                # Changed by another process: the token cache must not hand the old
                # plugins back to the client that relists on this notice.
                self.agents.forget(known.agent)
                session.principal = principal
            versions = seen.get(principal)
            if versions is None:
                versions = seen[principal] = self._versions(principal)
            if not session.views:  # a session no one took a first look at
                session.views = versions
                continue
            changed = [
                method
                for method, kinds in NOTICES.items()
                if any(session.views.get(kind) != versions[kind] for kind in kinds)
            ]
            session.views = versions  # before sending: a check meanwhile finds nothing new
            if channel is not None:
                for method in changed:
                    await channel.send({"jsonrpc": "2.0", "method": method})

    def _current(self, principal: Principal) -> Principal | None:
        try:
            return self.agents.principal(principal.agent, anonymous=principal.anonymous)
        except Unauthorized:
            return None

    def _versions(self, principal: Principal) -> dict[str, str]:
        return {kind: self.kernel.listing(principal, kind)[1] for kind in LISTS}
