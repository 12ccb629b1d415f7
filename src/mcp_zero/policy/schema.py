"""The Cedar schema MCP-ZERO validates every policy against, shipped in the package."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cedarpy

SCHEMA_FILE = "schema.cedarschema"


def schema_text() -> str:
    """The schema in Cedar's human-readable schema syntax."""
    # (beside this module: the package runs from files, never from a zip; importlib.resources
    # would cost the server about 1 MiB of memory, with zipfile, for this one read)
    return (Path(__file__).parent / SCHEMA_FILE).read_text(encoding="utf-8")


@cache
def load_schema() -> cedarpy.Schema:
    """The schema, parsed once per process and shared (the handle is immutable)."""
    return cedarpy.Schema.from_str(schema_text())
