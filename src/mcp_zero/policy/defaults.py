"""The policy a new data directory starts with."""

from __future__ import annotations

from pathlib import Path

from mcp_zero.policy.loader import policy_files

DEFAULT_POLICY_FILE = "default.cedar"

# Each policy carries @id (named in decisions, denials, audit records and metrics)
# and @reason (the sentence a denial quotes).
DEFAULT_POLICIES = """\
// MCP-ZERO default policy. Cedar denies whatever no policy permits.

@id("attached-plugins-only")
@reason("permits only tools of plugins attached to the agent")
permit (
  principal is Agent,
  action == Action::"call_tool",
  resource is Tool
)
when { principal.plugins.contains(resource.plugin) };

@id("attached-plugins-content")
@reason("permits resources, prompts and completions only of plugins attached to the agent")
permit (
  principal is Agent,
  action in [Action::"read_resource", Action::"get_prompt", Action::"complete"],
  resource
)
when { principal.plugins.contains(resource.plugin) };

@id("attached-plugins-client-requests")
@reason("lets only plugins attached to the agent ask its client for sampling, elicitation or roots")
permit (
  principal is Agent,
  action == Action::"client_request",
  resource is ClientRequest
)
when { principal.plugins.contains(resource.plugin) };

@id("attached-plugins-list")
@reason("permits listing the tools only of plugins attached to the agent")
permit (
  principal is Agent,
  action == Action::"list_tools",
  resource is Plugin
)
when { principal.plugins.contains(resource.name) };

@id("admin-all")
@reason("permits the admin every action")
permit (principal is Agent, action, resource)
when { principal.admin };
"""


def write_default_policies(policy_dir: Path) -> bool:
    """Write the default policy file into ``policy_dir`` if it holds no ``*.cedar`` file.

    Creates the directory when missing. Returns True when it wrote the file,
    False when policies were already there (they are never overwritten).
    Raises OSError when the directory cannot be created or written.
    """
    policy_dir.mkdir(parents=True, exist_ok=True)
    if policy_files(policy_dir):
        return False
    target = policy_dir / DEFAULT_POLICY_FILE
    tmp = target.with_suffix(".cedar.tmp")
    tmp.write_text(DEFAULT_POLICIES, encoding="utf-8")
    # A reader never sees half a file: the rename is atomic.
    tmp.replace(target)
    return True
