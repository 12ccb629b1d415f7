"""How an ``Action`` is shown to Cedar: the request and the entities it needs.

Principal: ``Agent::"<agent>"`` with ``plugins``, ``anonymous`` and ``admin``.
Target by verb:

- ``call_tool``: ``Tool::"<tool>"`` in ``Plugin::"<plugin>"``
- ``read_resource``: ``Resource::"<uri>"`` in its plugin
- ``get_prompt``: ``Prompt::"<name>"`` in its plugin
- ``client_request``: ``ClientRequest::"<method>"`` in the plugin that asks
- ``complete``: ``Resource`` when the target has a URI scheme (contains ``:``), else ``Prompt``
- ``list_tools``, ``install_plugin``, ``remove_plugin``, ``purge_plugin_data``:
  ``Plugin::"<plugin or resource>"``
- agent verbs (``spawn_agent``, ``attach_plugin``, ...): ``Agent::"<resource>"``; only the
  principal's own entity carries attributes, another agent is known by id alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mcp_zero.kernel.action import Principal, Verb

AGENT = "Agent"
PLUGIN = "Plugin"
TOOL = "Tool"
RESOURCE = "Resource"
PROMPT = "Prompt"
CLIENT_REQUEST = "ClientRequest"

# Verbs whose target belongs to a plugin the agent must have attached.
PLUGIN_VERBS = frozenset(
    {
        Verb.CALL_TOOL,
        Verb.LIST_TOOLS,
        Verb.READ_RESOURCE,
        Verb.GET_PROMPT,
        Verb.COMPLETE,
        Verb.CLIENT_REQUEST,
    }
)
_TARGET_TYPES: dict[Verb, str] = {
    Verb.CALL_TOOL: TOOL,
    Verb.READ_RESOURCE: RESOURCE,
    Verb.GET_PROMPT: PROMPT,
    Verb.CLIENT_REQUEST: CLIENT_REQUEST,
    Verb.LIST_TOOLS: PLUGIN,
    Verb.INSTALL_PLUGIN: PLUGIN,
    Verb.REMOVE_PLUGIN: PLUGIN,
    Verb.PURGE_PLUGIN_DATA: PLUGIN,
    Verb.SPAWN_AGENT: AGENT,
    Verb.TERMINATE_AGENT: AGENT,
    Verb.ROTATE_AGENT_TOKEN: AGENT,
    Verb.ATTACH_PLUGIN: AGENT,
    Verb.SNAPSHOT_AGENT: AGENT,
    Verb.RECOVER_AGENT: AGENT,
}

# (type, id) of an entity, and of the plugin a target belongs to.
Uid = tuple[str, str]


def target_of(
    verb: Verb, resource: str, plugin: str | None, ref: str | None = None
) -> tuple[str, str, Uid | None]:
    """The Cedar type and id of the action's target, and its parent plugin uid. A
    completion's target is a ``Prompt`` when ``ref`` is "prompt", else a ``Resource`` (its
    URI, or template: the client's ``ref/resource``). (Told apart by a ':' in the target,
    a template whose URI has none was a Prompt, and a forbid on it forbade nothing.)"""
    if verb is Verb.COMPLETE:
        rtype = PROMPT if ref == "prompt" else RESOURCE
    else:
        rtype = _TARGET_TYPES[verb]
    if rtype == PLUGIN:
        return PLUGIN, plugin or resource, None
    if rtype == AGENT:
        return AGENT, resource, None
    return rtype, resource, ((PLUGIN, plugin) if plugin else None)


def entities_json(principal: Principal, rtype: str, rid: str, parent: Uid | None) -> str:
    """The Cedar JSON entities a request about this principal and target needs."""
    return batch_entities_json(principal, [(rtype, rid, parent)])


def batch_entities_json(
    principal: Principal, targets: Iterable[tuple[str, str, Uid | None]]
) -> str:
    """The Cedar JSON entities requests about this principal and each target (type, id and
    parent plugin: ``target_of``; no two of one type and id) need."""
    entities: dict[Uid, dict[str, Any]] = {}
    entities[(AGENT, principal.agent)] = {
        "uid": {"type": AGENT, "id": principal.agent},
        "attrs": {
            "plugins": sorted(principal.plugins),
            "anonymous": principal.anonymous,
            "admin": principal.admin,
        },
        "parents": [],
    }
    for rtype, rid, parent in targets:
        if parent is not None:
            entities[parent] = _plugin_entity(parent[1])
        if rtype == PLUGIN:
            entities[(PLUGIN, rid)] = _plugin_entity(rid)
        elif rtype != AGENT:
            entities[(rtype, rid)] = {
                "uid": {"type": rtype, "id": rid},
                "attrs": {"plugin": parent[1] if parent else ""},
                "parents": [{"type": PLUGIN, "id": parent[1]}] if parent else [],
            }
    return json.dumps(list(entities.values()))


def context_json(transport: str, anonymous: bool, labels: Iterable[str], plugin: str | None) -> str:
    """The Cedar request context, as the JSON text cedarpy passes through unchanged."""
    context: dict[str, Any] = {
        "transport": transport,
        "anonymous": anonymous,
        "labels": sorted(labels),
    }
    if plugin is not None:
        context["plugin"] = plugin
    return json.dumps(context)


def describe(agent: str, verb: Verb, target: str) -> str:
    """``agent "bob" to call_tool "notes_add"``: the action in a denial sentence."""
    return f'agent "{agent}" to {verb.value} "{target}"'


def _plugin_entity(name: str) -> dict[str, Any]:
    return {"uid": {"type": PLUGIN, "id": name}, "attrs": {"name": name}, "parents": []}
