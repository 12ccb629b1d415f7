"""MCP-ZERO: a governed, verifiable runtime for AI agents and their MCP tools."""

__version__ = "0.1.0"

__all__ = ["__version__"]
