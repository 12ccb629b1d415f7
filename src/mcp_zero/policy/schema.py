"""The Cedar schema MCP-ZERO validates every policy against, shipped in the package."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import cedarpy

SCHEMA_FILE = "schema.cedarschema"


def schema_text() -> str:
    """The schema in Cedar's human-readable schema syntax."""
    return files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


@cache
def load_schema() -> cedarpy.Schema:
    """The schema, parsed once per process and shared (the handle is immutable)."""
    return cedarpy.Schema.from_str(schema_text())
