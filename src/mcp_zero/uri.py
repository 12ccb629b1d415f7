"""Resource URIs as MCP-ZERO compares them: one URI, however its characters are escaped.

Stdlib only: the plugin API (mcp_zero.plugin), which workers load, uses it too, so that a
plugin finds its resources in the form the kernel sends them."""

from __future__ import annotations

import re


def normal_uri(uri: str) -> str:
    """``uri`` in RFC 3986 normal form as far as percent-encoding goes (6.2.2.1-2): escapes
    of unreserved characters decoded, the others in upper case. What policy and audit see,
    what plugins are looked up and compared by, so that ``test://x/%31`` is not another
    resource than ``test://x/1``."""
    if "%" not in uri:
        return uri
    return _ESCAPE.sub(_normal_escape, uri)


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()
