"""Concurrency quotas per agent and per plugin, and the wall-clock limit of a call.

A call over its agent's limit fails at once with QuotaExceeded: nothing queues
there, so a flood from one agent cannot grow memory. (A plugin's own
``max_concurrency`` is a queue, kernel.pipeline.PluginSlots, in which the
agents take turns, so that flood cannot starve the other agents' calls either.)
Counting needs no lock because the kernel runs on one asyncio event loop (one
thread).
"""

from __future__ import annotations

from mcp_zero.errors import QuotaExceeded

DEFAULT_AGENT_CONCURRENCY = 16
DEFAULT_CALL_TIMEOUT_S = 30.0
MAX_CALL_TIMEOUT_S = 300.0


class QuotaGate:
    """Admits calls while their agent and plugin are under their concurrency limits.

    ``agent_concurrency`` is the default number of calls one agent may have in
    flight (an agent's own limit can be passed to ``enter``). Call timeouts
    fall back to ``default_timeout_s`` and never exceed ``max_timeout_s``.
    Raises ValueError for a limit below 1 or a non-positive timeout.
    """

    def __init__(
        self,
        *,
        agent_concurrency: int = DEFAULT_AGENT_CONCURRENCY,
        default_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        max_timeout_s: float = MAX_CALL_TIMEOUT_S,
    ) -> None:
        if agent_concurrency < 1:
            raise ValueError(f"agent_concurrency must be at least 1, not {agent_concurrency}")
        if default_timeout_s <= 0 or max_timeout_s <= 0:
            raise ValueError("call timeouts must be positive")
        self.agent_concurrency = agent_concurrency
        self.default_timeout_s = min(default_timeout_s, max_timeout_s)
        self.max_timeout_s = max_timeout_s
        self._agents: dict[str, int] = {}
        self._plugins: dict[str, int] = {}
        self._total = 0

    def inflight(self, agent: str) -> int:
        """Calls of ``agent`` in flight now."""
        return self._agents.get(agent, 0)

    def plugin_inflight(self, plugin: str) -> int:
        """Calls into ``plugin`` in flight now."""
        return self._plugins.get(plugin, 0)

    @property
    def total_inflight(self) -> int:
        """Calls in flight now, over all agents."""
        return self._total

    def timeout_for(self, tool_timeout_ms: int | None, plugin_timeout_ms: int | None) -> float:
        """The wall-clock limit of a call, in seconds.

        The tool's own timeout wins over its plugin's, which wins over the
        gate's default; the result never exceeds ``max_timeout_s``. A missing
        or non-positive value counts as not set.
        """
        for ms in (tool_timeout_ms, plugin_timeout_ms):
            if ms is not None and ms > 0:
                return min(ms / 1000.0, self.max_timeout_s)
        return self.default_timeout_s

    def enter(
        self,
        agent: str,
        plugin: str | None = None,
        agent_limit: int | None = None,
        plugin_limit: int | None = None,
    ) -> None:
        """Take one in-flight slot of ``agent`` (and of ``plugin``); give it back with
        :meth:`leave`, whatever happens (the kernel calls both on its hot path: no object
        and no coroutine per call). ``agent_limit`` None: the gate's default;
        ``plugin_limit`` is the manifest's max_concurrency (None: unlimited). Raises
        QuotaExceeded when either is already full."""
        if agent_limit is None:
            agent_limit = self.agent_concurrency
        agents = self._agents
        running = agents.get(agent, 0)
        if running >= agent_limit:
            raise QuotaExceeded(
                f'agent "{agent}" already has {running} calls in flight, its limit of '
                f"{agent_limit}; wait for one to finish, or raise the limit "
                "(setting max_concurrency in mcp0.toml, or MCP0_MAX_CONCURRENCY)",
                data={"scope": "agent", "agent": agent, "limit": agent_limit},
            )
        if plugin is not None:
            plugins = self._plugins
            busy = plugins.get(plugin, 0)
            if plugin_limit is not None and busy >= plugin_limit:
                raise QuotaExceeded(
                    f'plugin "{plugin}" already runs {busy} calls, its max_concurrency of '
                    f"{plugin_limit}; wait for one to finish, or raise quotas.max_concurrency "
                    "in the plugin's manifest",
                    data={"scope": "plugin", "plugin": plugin, "limit": plugin_limit},
                )
            plugins[plugin] = busy + 1
        agents[agent] = running + 1
        self._total += 1

    def leave(self, agent: str, plugin: str | None = None) -> None:
        """Give back what :meth:`enter` took."""
        # Drop zero counts so idle agents and plugins cost no memory.
        running = self._agents[agent] - 1
        if running:
            self._agents[agent] = running
        else:
            del self._agents[agent]
        if plugin is not None:
            busy = self._plugins[plugin] - 1
            if busy:
                self._plugins[plugin] = busy
            else:
                del self._plugins[plugin]
        self._total -= 1
