"""The unit every stage of the pipeline reasons about: who does what to which thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Verb(StrEnum):
    """What an action does. Cedar sees these as ``Action::"<value>"``."""

    CALL_TOOL = "call_tool"
    LIST_TOOLS = "list_tools"
    READ_RESOURCE = "read_resource"
    GET_PROMPT = "get_prompt"
    COMPLETE = "complete"
    CLIENT_REQUEST = "client_request"  # a plugin asks the agent's client (sampling, elicitation)
    SPAWN_AGENT = "spawn_agent"
    TERMINATE_AGENT = "terminate_agent"
    ROTATE_AGENT_TOKEN = "rotate_agent_token"  # noqa: S105 - a verb, not a secret
    ATTACH_PLUGIN = "attach_plugin"
    SNAPSHOT_AGENT = "snapshot_agent"
    RECOVER_AGENT = "recover_agent"
    INSTALL_PLUGIN = "install_plugin"
    REMOVE_PLUGIN = "remove_plugin"
    PURGE_PLUGIN_DATA = "purge_plugin_data"  # delete the data a removal set aside


class Outcome(StrEnum):
    """How an action ended; every outcome is audited."""

    ALLOWED = "allowed"
    DENIED = "denied"
    ERROR = "error"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: an agent, or the admin."""

    agent: str
    plugins: frozenset[str] = frozenset()
    anonymous: bool = False
    admin: bool = False


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a principal asks to do.

    ``resource`` names the target: a tool name for ``call_tool``, a URI for
    ``read_resource``, an agent name for agent verbs. ``plugin`` is the plugin
    that owns the target, when there is one.
    """

    principal: Principal
    verb: Verb
    resource: str
    plugin: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
