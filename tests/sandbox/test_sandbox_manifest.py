"""Manifest validation: every mistake is reported with the field it is in."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from sandbox_support import CONFORMANCE_DIR, KIT_DIR, NOTES_DIR

from mcp_zero.errors import ManifestError
from mcp_zero.sandbox.manifest import MAX_MANIFEST_BYTES, Quotas, load_manifest, parse_manifest

GOOD: dict[str, Any] = {
    "name": "notes",
    "version": "0.1.0",
    "abi": 1,
    "runtime": "process",
    "entry": "notes_plugin:plugin",
    "tools": [
        {
            "name": "notes_add",
            "description": "add",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
        }
    ],
}


def variant(**changes: Any) -> dict[str, Any]:
    m = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    return m


def tool(**fields: Any) -> dict[str, Any]:
    t = copy.deepcopy(GOOD["tools"][0])
    t.update(fields)
    return t


def test_minimal_manifest_gets_defaults():
    m = parse_manifest(GOOD)
    assert m.quotas == Quotas(timeout_ms=10_000, memory_mb=256, max_concurrency=8, workers=1)
    assert m.capabilities.network is False
    assert m.capabilities.filesystem == "private"
    assert m.tool("notes_add").input_schema["properties"]["text"] == {"type": "string"}


@pytest.mark.parametrize(
    ("manifest", "field", "says"),
    [
        (variant(name=None), "name", "is required"),
        (variant(name="Bad Name"), "name", "must be 1-64"),
        (variant(version=None), "version", "is required"),
        (variant(abi=2), "abi", "must be 1"),
        (variant(abi=None), "abi", "must be 1"),
        (variant(runtime="docker"), "runtime", "not a known runtime"),
        (variant(entry="no_colon"), "entry", "module:attribute"),
        (variant(tools=[tool(name="")]), "tools[0].name", "1-128 characters"),
        (variant(tools=[tool(name="has space")]), "tools[0].name", "1-128 characters"),
        (variant(tools=[tool(name="x" * 129)]), "tools[0].name", "1-128 characters"),
        (variant(tools=[tool(), tool()]), "tools", "duplicate tool name 'notes_add'"),
        (variant(tools=[tool(description=None)]), "tools[notes_add].description", "is required"),
        (variant(tools=[tool(inputSchema=None)]), "tools[notes_add].inputSchema", "is required"),
        (
            variant(tools=[tool(inputSchema={"type": "string"})]),
            "tools[notes_add].inputSchema",
            "object schema",
        ),
        (
            variant(
                tools=[tool(inputSchema={"type": "object", "properties": {"a": {"type": "nope"}}})]
            ),
            "tools[notes_add].inputSchema",
            "not a valid JSON Schema",
        ),
        (
            variant(
                tools=[tool(inputSchema={"type": "object", "$schema": "https://example.com/s"})]
            ),
            "tools[notes_add].inputSchema.$schema",
            "unknown JSON Schema dialect",
        ),
        (
            variant(tools=[tool(outputSchema={"type": "array"})]),
            "tools[notes_add].outputSchema",
            "object",
        ),
        (variant(tools="x"), "tools", "must be a list"),
        (  # valid JSON Schema, but no validator can be built from it
            variant(
                tools=[
                    tool(
                        inputSchema={
                            "type": "object",
                            "properties": {"a": {"type": "string", "pattern": "("}},
                        }
                    )
                ]
            ),
            "tools[notes_add].inputSchema",
            "is not a usable JSON Schema",
        ),
        (  # a backtracking pattern: (a|a)+\\1b took ~8 ms an item, minutes for 1 MiB
            variant(
                tools=[
                    tool(
                        inputSchema={
                            "type": "object",
                            "properties": {
                                "a": {"type": "array", "items": {"pattern": r"(?:(a|a)+\1b|.)"}}
                            },
                        }
                    )
                ]
            ),
            "tools[notes_add].inputSchema",
            "patterns run in linear time, without lookaround",
        ),
        (
            variant(
                tools=[
                    tool(
                        outputSchema={
                            "type": "object",
                            "properties": {"a": {"type": "string", "pattern": "^(?!admin).*"}},
                        }
                    )
                ]
            ),
            "tools[notes_add].outputSchema",
            "backreferences",
        ),
        (
            variant(
                tools=[
                    tool(
                        inputSchema={
                            "type": "object",
                            "properties": {"a": {"$ref": "https://example.com/s.json"}},
                        }
                    )
                ]
            ),
            "tools[notes_add].inputSchema",
            "Retrieval is disabled",
        ),
        (variant(name="notes\n"), "name", "must be"),
        (variant(version="1.0.0\n"), "version", ""),
        (variant(entry="notes_plugin:plugin\n"), "entry", ""),
        (variant(tools=[tool(name="notes_add\n")]), "tools[0].name", ""),
        (variant(capabilities={"network": "yes"}), "capabilities.network", "true or false"),
        (variant(capabilities={"filesystem": "all"}), "capabilities.filesystem", "one of"),
        (variant(quotas={"timeout_ms": 0}), "quotas.timeout_ms", "integer from 1"),
        (variant(quotas={"memory_mb": "big"}), "quotas.memory_mb", "integer"),
        (variant(quotas={"workers": 100}), "quotas.workers", "from 1 to 64"),
        (variant(quotas={"cpus": 1}), "quotas", "unknown key 'cpus' (known: timeout_ms,"),
        (variant(quota={"timeout_ms": 5}), "quota", "unknown key; a manifest has name,"),
        (variant(quota={}, licence="MIT"), "licence, quota", "unknown keys; a manifest has"),
        (
            variant(capabilities={"net": True}),
            "capabilities",
            "unknown key 'net' (known: network, filesystem)",
        ),
        (variant(capabilities={"filesystem": []}), "capabilities.filesystem", "one of"),
        (variant(abi=1.0), "abi", "must be 1, an integer"),
        (variant(abi=True), "abi", "must be 1, an integer"),
        (variant(runtime=[]), "runtime", "must be a string, not list"),
        (variant(runtime={}), "runtime", "must be a string, not dict"),
        (
            variant(resourceTemplates=[{"uriTemplate": "x://{", "name": "x"}]),
            "resourceTemplates[0].uriTemplate",
            "'x://{' is not a URI template MCP-ZERO serves",
        ),
        (
            variant(resourceTemplates=[{"uriTemplate": "x://{a}/}", "name": "x"}]),
            "resourceTemplates[0].uriTemplate",
            "only {var} and {+var}",
        ),
        (
            variant(resourceTemplates=[{"uriTemplate": "x://{?q}", "name": "x"}]),
            "resourceTemplates[0].uriTemplate",
            "only {var} and {+var}",
        ),
        (
            variant(resourceTemplates=[{"uriTemplate": "x://{a}/{+a}", "name": "x"}]),
            "resourceTemplates[0].uriTemplate",
            "names a variable twice",
        ),
        (
            variant(tools=[tool(annotations={"title": float("nan")})]),
            "tools[0].annotations.title",
            "NaN is not a JSON number",
        ),
        (  # a strict client refused every tools/list holding it (found by review)
            variant(tools=[tool(annotations={"readOnlyHint": "yes", "foo": [1]})]),
            "tools[notes_add].annotations.readOnlyHint",
            "must be true or false, not str",
        ),
        (
            variant(tools=[tool(annotations={"title": 7})]),
            "tools[notes_add].annotations.title",
            "must be a string, not int",
        ),
        (
            variant(quotas={"timeout_ms": float("-inf")}),
            "quotas.timeout_ms",
            "-Infinity is not a JSON number",
        ),
        (
            variant(tools=[tool(annotations={"x": [2**64]})]),
            "tools[0].annotations.x[0]",
            "integer past 64 bits",
        ),
        (
            variant(resources=[{"uri": "a://" + "b" * 8189, "name": "b"}]),
            "resources[0].uri",
            "longer than 8192 characters",
        ),
        (
            variant(resourceTemplates=[{"uriTemplate": "a://{x}" + "b" * 8186, "name": "x"}]),
            "resourceTemplates[0].uriTemplate",
            "longer than 8192 characters",
        ),
        (variant(resources=[{"uri": "a://b"}]), "resources[0].name", "is required"),
        (variant(resources=[{"uri": "a://b", "name": "b"}] * 2), "resources", "duplicate"),
        (  # one URI, however escaped, as reads look it up (found by review)
            variant(resources=[{"uri": "a://b", "name": "b"}, {"uri": "a://%62", "name": "c"}]),
            "resources",
            "duplicate resource uri 'a://%62' (it is 'a://b', escaped otherwise)",
        ),
        (
            variant(
                resourceTemplates=[
                    {"uriTemplate": "a://%7E/{x}", "name": "t"},
                    {"uriTemplate": "a://~/{x}", "name": "u"},
                ]
            ),
            "resourceTemplates",
            "duplicate uriTemplate 'a://~/{x}' (it is 'a://%7E/{x}', escaped otherwise)",
        ),
        (
            variant(prompts=[{"name": "p", "arguments": [{"name": "a", "required": "y"}]}]),
            "prompts[p].arguments[0].required",
            "true or false",
        ),
        (variant(prompts=[{"name": "p"}, {"name": "p"}]), "prompts", "duplicate prompt name"),
        ([], "manifest", "must be an object"),
        # a misspelt key of an entry silently meant its default (found by review)
        (
            variant(tools=[{**GOOD["tools"][0], "outputschema": {"type": "object"}}]),
            "tools[0]",
            "unknown key 'outputschema'",
        ),
        (
            variant(resources=[{"uri": "a://b", "name": "b", "mimetype": "text/plain"}]),
            "resources[0]",
            "unknown key 'mimetype'",
        ),
        (
            variant(resourceTemplates=[{"uriTemplate": "a://{x}", "name": "x", "desc": "d"}]),
            "resourceTemplates[0]",
            "unknown key 'desc'",
        ),
        (variant(prompts=[{"name": "p", "argument": []}]), "prompts[0]", "unknown key"),
        (
            variant(prompts=[{"name": "p", "arguments": [{"name": "a", "requried": True}]}]),
            "prompts[p].arguments[0]",
            "unknown key 'requried'",
        ),
    ],
)
def test_invalid_manifests_name_the_field(manifest, field, says):
    with pytest.raises(ManifestError) as info:
        parse_manifest(manifest)
    assert info.value.data == {"field": field}
    assert field in info.value.message
    assert says in info.value.message


def test_tool_annotations_keys_mcp_does_not_name_pass_as_they_are():
    annotations = {"title": "Add", "readOnlyHint": False, "x-vendor": [1]}
    assert parse_manifest(variant(tools=[tool(annotations=annotations)])).tools[0].annotations == (
        annotations
    )


def nested(depth: int) -> Any:
    """Arrays within arrays, ``depth`` of them."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_manifests_nested_deeper_than_the_server_can_answer_are_refused():
    # the manifest 1, tools 2, the tool 3, annotations 4: 60 more reach the limit of 64
    at_limit = variant(tools=[tool(annotations={"deep": nested(64 - 4)})])
    assert parse_manifest(at_limit).tools[0].annotations == {"deep": nested(60)}
    with pytest.raises(ManifestError) as info:
        parse_manifest(variant(tools=[tool(annotations={"deep": nested(600)})]))
    assert info.value.message == (
        "plugin.json: tools[0].annotations.deep…: nests deeper than 64 levels of arrays "
        "and objects (plugin.json may nest at most 64)"
    )


def test_load_manifest_refuses_nan_infinity_and_nesting_past_the_parser(tmp_path: Path):
    (tmp_path / "notes_plugin.py").write_text("")
    manifest = tmp_path / "plugin.json"
    good = json.dumps(GOOD)
    for number in ("NaN", "Infinity", "-Infinity", "1e400"):
        manifest.write_text(
            good.replace('"abi": 1', f'"abi": 1, "quotas": {{"workers": {number}}}')
        )
        with pytest.raises(ManifestError, match=r"quotas\.workers: -?(NaN|Infinity) is not a JSON"):
            load_manifest(tmp_path)
    manifest.write_text(good.replace('"abi": 1', '"abi": 1, "x": ' + "[" * 100_000 + "]" * 100_000))
    with pytest.raises(ManifestError, match="nests deeper than 64 levels"):
        load_manifest(tmp_path)


def schema_with(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def test_param_headers_are_read_from_plain_properties_chains():
    schema = schema_with(
        region={"type": "string", "x-mcp-header": "Region"},
        opts={
            "type": "object",
            "properties": {"dry": {"type": "boolean", "x-mcp-header": "Dry-Run"}},
        },
    )
    spec = parse_manifest(variant(tools=[tool(inputSchema=schema)])).tools[0]
    assert [(h.path, h.token, h.type) for h in spec.param_headers] == [
        (("opts", "dry"), "Dry-Run", "boolean"),
        (("region",), "Region", "string"),
    ]
    assert spec.to_mcp()["inputSchema"] == schema  # listed as written


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (
            schema_with(tags={"type": "array", "items": {"type": "string", "x-mcp-header": "T"}}),
            'through "properties" alone',
        ),
        (
            {**schema_with(a={"type": "string"}), "anyOf": [schema_with(a={"x-mcp-header": "A"})]},
            'through "properties" alone',
        ),
        (schema_with(a={"type": "string", "x-mcp-header": "Bad Name"}), "header name token"),
        (schema_with(a={"type": "number", "x-mcp-header": "A"}), '"integer" or "boolean"'),
        (
            schema_with(
                a={"type": "string", "x-mcp-header": "Same"},
                b={"type": "string", "x-mcp-header": "same"},
            ),
            "marks both",
        ),
    ],
)
def test_param_headers_mcp_does_not_allow_are_refused(schema, says):
    with pytest.raises(ManifestError) as info:
        parse_manifest(variant(tools=[tool(inputSchema=schema)]))
    assert info.value.data == {"field": "tools[notes_add].inputSchema"}
    assert says in info.value.message


def test_schema_dialect_is_honoured():
    draft7 = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"a": {"type": "string"}},
    }
    assert parse_manifest(variant(tools=[tool(inputSchema=draft7)])).tools[0].input_schema == draft7
    # 2020-12 keywords are kept verbatim for tools/list.
    tools = json.loads((CONFORMANCE_DIR / "plugin.json").read_text())["tools"]
    schema = next(t for t in tools if t["name"] == "json_schema_2020_12_tool")["inputSchema"]
    assert (
        parse_manifest(variant(tools=[tool(inputSchema=schema)])).tools[0].to_mcp()["inputSchema"]
        == schema
    )


def test_to_dict_round_trips():
    for d in (KIT_DIR, NOTES_DIR, CONFORMANCE_DIR):
        m = load_manifest(d)
        assert parse_manifest(json.loads(json.dumps(m.to_dict()))) == m


def test_load_manifest_errors(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"no plugin\.json"):
        load_manifest(tmp_path)
    (tmp_path / "plugin.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"cannot read plugin\.json"):
        load_manifest(tmp_path)
    (tmp_path / "plugin.json").write_text(json.dumps(GOOD))
    with pytest.raises(ManifestError, match=r"notes_plugin\.py not found"):
        load_manifest(tmp_path)
    (tmp_path / "notes_plugin.py").write_text("")
    assert load_manifest(tmp_path).name == "notes"
    # a key twice: JSON keeps the last, silently (found by review)
    twice = json.dumps(GOOD).replace('"name": "notes"', '"name": "notes", "name": "kv2"', 1)
    (tmp_path / "plugin.json").write_text(twice)
    with pytest.raises(ManifestError, match="key 'name' appears twice in one object"):
        load_manifest(tmp_path)


def test_a_plugin_json_over_the_limit_is_refused_unread(tmp_path: Path):
    # every server parses an installed plugin's record again at each refresh, on its event
    # loop, and lists its tools to every client: a 100 MiB plugin.json was taken in whole
    (tmp_path / "notes_plugin.py").write_text("")
    empty = len(json.dumps({**GOOD, "description": ""}))
    at_most = "x" * (MAX_MANIFEST_BYTES - empty)
    (tmp_path / "plugin.json").write_text(json.dumps({**GOOD, "description": at_most + "x"}))
    with pytest.raises(ManifestError, match=r"over 4 MiB, more than plugin\.json may be"):
        load_manifest(tmp_path)
    (tmp_path / "plugin.json").write_text(json.dumps({**GOOD, "description": at_most}))
    assert load_manifest(tmp_path).description == at_most


def test_an_entry_module_the_workers_python_imports_as_it_starts_is_refused(tmp_path: Path):
    # setuptools' distutils-precedence.pth has every Python of its site-packages import
    # _distutils_hack: a plugin module of that name was installed, then never loaded (the
    # worker's import gave setuptools' module: found by review)
    # (this Python starts as the worker's does; the dev extra installs setuptools)
    assert "_distutils_hack" in sys.modules, "setuptools' distutils-precedence.pth is missing"
    (tmp_path / "_distutils_hack.py").write_text("from mcp_zero.plugin import Plugin\n")
    (tmp_path / "plugin.json").write_text(json.dumps(variant(entry="_distutils_hack:plugin")))
    with pytest.raises(ManifestError) as refused:
        load_manifest(tmp_path)
    assert refused.value.message == (
        "plugin.json: entry: module '_distutils_hack' has the name of a module the plugin "
        "worker's Python imports as it starts: in the worker one would hide the other; "
        "rename the plugin's module (e.g. to plugin_distutils_hack.py) and its entry"
    )
