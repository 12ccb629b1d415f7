"""MCP-ZERO: a governed, verifiable runtime for AI agents and their MCP tools."""

from pathlib import Path

__version__ = "0.1.0"

#: The directory that holds the ``mcp_zero`` package: the PYTHONPATH of the child
#: processes it starts (plugin workers, the key maker), wherever it is installed.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["PACKAGE_ROOT", "__version__"]
