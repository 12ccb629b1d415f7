"""The conformance fixture plugin returns what the MCP conformance suite checks (0.1.16, and
0.2.0-alpha.12 for MCP 2026-07-28: those fixtures ask the client, tested through the server in
tests/rpc/test_stateless_protocol.py and by the suite itself)."""

from __future__ import annotations

import base64
import json
import time

import pytest
from sandbox_support import CONFORMANCE_DIR, RecordingBridge

from mcp_zero.sandbox.manifest import load_manifest

pytestmark = pytest.mark.anyio
EMPTY_ARGS_TOOLS = {
    "test_simple_text",
    "test_image_content",
    "test_audio_content",
    "test_embedded_resource",
    "test_multiple_content_types",
    "test_tool_with_logging",
    "test_tool_with_progress",
    "test_error_handling",
    "test_elicitation_sep1034_defaults",
    "test_elicitation_sep1330_enums",
    "test_reconnection",
}
# Fixtures of the 2026-07-28 scenarios (conformance 0.2.0-alpha.12).
STATELESS_TOOLS = {
    "test_input_required_result_elicitation",
    "test_input_required_result_sampling",
    "test_input_required_result_list_roots",
    "test_input_required_result_request_state",
    "test_input_required_result_tampered_state",
    "test_input_required_result_multiple_inputs",
    "test_input_required_result_multi_round",
    "test_input_required_result_capabilities",
    "test_missing_capability",
    "test_streaming_elicitation",
    "test_logging_tool",
    "test_custom_headers",
}


async def tool(rt, tool_name, bridge=None, **args):
    return await rt.call_tool(
        tool_name, args, agent="suite", bridge=bridge or RecordingBridge(), timeout=10
    )


def test_manifest_lists_every_fixture_with_descriptions():
    m = load_manifest(CONFORMANCE_DIR)
    names = {t.name for t in m.tools}
    fixed = {"test_sampling", "test_elicitation", "json_schema_2020_12_tool"}
    assert EMPTY_ARGS_TOOLS | fixed | STATELESS_TOOLS == names
    assert all(t.description for t in m.tools)
    schema = m.tool("json_schema_2020_12_tool").to_mcp()["inputSchema"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "address" in schema["$defs"]
    assert schema["additionalProperties"] is False
    assert {"allOf", "if", "then", "else"} <= set(schema)  # SEP-2106 keywords, kept as written
    assert schema["$defs"]["address"]["$anchor"] == "addressDef"
    headers = m.tool("test_custom_headers").param_headers
    assert [(h.path, h.token) for h in headers] == [(("region",), "Region")]
    assert {r.uri for r in m.resources} == {
        "test://static-text",
        "test://static-binary",
        "test://watched-resource",
    }
    assert [t.uri_template for t in m.resource_templates] == ["test://template/{id}/data"]
    assert all(p.description for p in m.prompts)


async def test_content_tools(make_runtime):
    rt = await make_runtime(CONFORMANCE_DIR)
    simple = await tool(rt, "test_simple_text")
    assert simple["content"] == [
        {"type": "text", "text": "This is a simple text response for testing."}
    ]
    img = (await tool(rt, "test_image_content"))["content"][0]
    assert img["type"] == "image"
    assert img["mimeType"] == "image/png"
    assert base64.b64decode(img["data"]).startswith(b"\x89PNG\r\n\x1a\n")
    aud = (await tool(rt, "test_audio_content"))["content"][0]
    assert aud["type"] == "audio"
    assert aud["mimeType"] == "audio/wav"
    assert base64.b64decode(aud["data"])[:4] == b"RIFF"
    emb = (await tool(rt, "test_embedded_resource"))["content"][0]
    assert emb == {
        "type": "resource",
        "resource": {
            "uri": "test://embedded-resource",
            "mimeType": "text/plain",
            "text": "This is an embedded resource content.",
        },
    }
    mixed = (await tool(rt, "test_multiple_content_types"))["content"]
    assert [b["type"] for b in mixed] == ["text", "image", "resource"]
    assert json.loads(mixed[2]["resource"]["text"]) == {"test": "data", "value": 123}
    err = await tool(rt, "test_error_handling")
    assert err["isError"] is True
    assert err["content"][0]["text"] == "This tool intentionally returns an error for testing"
    assert (await tool(rt, "json_schema_2020_12_tool", name="x"))["structuredContent"][
        "name"
    ] == "x"
    assert (await tool(rt, "test_reconnection"))["content"][0]["text"].startswith("Reconnection")


async def test_logging_and_progress_are_spaced_out(make_runtime):
    rt = await make_runtime(CONFORMANCE_DIR)
    b = RecordingBridge()
    started = time.monotonic()
    await tool(rt, "test_tool_with_logging", b)
    assert time.monotonic() - started >= 0.1
    assert [e[1][1] for e in b.events] == [
        "Tool execution started",
        "Tool processing data",
        "Tool execution completed",
    ]
    assert {e[1][0] for e in b.events} == {"info"}
    b = RecordingBridge()
    await tool(rt, "test_tool_with_progress", b)
    assert [e[1][:2] for e in b.events] == [(0, 100), (50, 100), (100, 100)]


async def test_sampling_and_elicitation_go_through_the_client(make_runtime):
    rt = await make_runtime(CONFORMANCE_DIR)
    b = RecordingBridge(
        {
            "sampling/createMessage": {
                "role": "assistant",
                "content": {"type": "text", "text": "This is a test response from the client"},
                "model": "test-model",
            },
            "elicitation/create": {
                "action": "accept",
                "content": {"username": "u", "email": "e@x"},
            },
        }
    )
    sampled = await tool(rt, "test_sampling", b, prompt="Test prompt for sampling")
    assert sampled["content"][0]["text"] == "LLM response: This is a test response from the client"
    method, params = b.events[0][1]
    assert method == "sampling/createMessage"
    assert params == {
        "messages": [
            {"role": "user", "content": {"type": "text", "text": "Test prompt for sampling"}}
        ],
        "maxTokens": 100,
    }
    elicited = await tool(rt, "test_elicitation", b, message="Please provide your information")
    assert elicited["content"][0]["text"].startswith("User response: action=accept")
    _, params = b.events[1][1]
    assert params["message"] == "Please provide your information"
    assert params["requestedSchema"]["required"] == ["username", "email"]

    await tool(rt, "test_elicitation_sep1034_defaults", b)
    props = b.events[2][1][1]["requestedSchema"]["properties"]
    assert {k: v["default"] for k, v in props.items()} == {
        "name": "John Doe",
        "age": 30,
        "score": 95.5,
        "status": "active",
        "verified": True,
    }
    assert props["age"]["type"] == "integer"
    assert props["status"]["enum"] == [
        "active",
        "inactive",
        "pending",
    ]

    await tool(rt, "test_elicitation_sep1330_enums", b)
    props = b.events[3][1][1]["requestedSchema"]["properties"]
    assert "oneOf" not in props["untitledSingle"]
    assert props["untitledSingle"]["enum"]
    assert all({"const", "title"} <= set(o) for o in props["titledSingle"]["oneOf"])
    assert len(props["legacyEnum"]["enumNames"]) == len(props["legacyEnum"]["enum"])
    assert props["untitledMulti"]["items"]["enum"]
    assert props["untitledMulti"]["type"] == "array"
    assert all({"const", "title"} <= set(o) for o in props["titledMulti"]["items"]["anyOf"])

    refused = await tool(rt, "test_sampling", RecordingBridge(), prompt="p")
    assert refused["isError"] is True


async def test_resources(make_runtime):
    rt = await make_runtime(CONFORMANCE_DIR)
    b = RecordingBridge()
    text = await rt.read_resource("test://static-text", agent="s", bridge=b, timeout=5)
    assert text == {
        "contents": [
            {
                "uri": "test://static-text",
                "mimeType": "text/plain",
                "text": "This is the content of the static text resource.",
            }
        ]
    }
    binary = (await rt.read_resource("test://static-binary", agent="s", bridge=b, timeout=5))[
        "contents"
    ][0]
    assert binary["mimeType"] == "image/png"
    assert base64.b64decode(binary["blob"]).startswith(b"\x89PNG")
    templated = (
        await rt.read_resource("test://template/123/data", agent="s", bridge=b, timeout=5)
    )["contents"][0]
    assert templated["uri"] == "test://template/123/data"
    assert templated["mimeType"] == "application/json"
    assert json.loads(templated["text"]) == {
        "id": "123",
        "templateTest": True,
        "data": "Data for ID: 123",
    }
    watched = await rt.read_resource("test://watched-resource", agent="s", bridge=b, timeout=5)
    assert watched["contents"][0]["text"]


async def test_prompts_and_completion(make_runtime):
    rt = await make_runtime(CONFORMANCE_DIR)
    b = RecordingBridge()

    async def prompt(name, **args):
        return await rt.get_prompt(name, args, agent="s", bridge=b, timeout=5)

    simple = await prompt("test_simple_prompt")
    assert simple["messages"] == [
        {
            "role": "user",
            "content": {"type": "text", "text": "This is a simple prompt for testing."},
        }
    ]
    with_args = await prompt("test_prompt_with_arguments", arg1="testValue1", arg2="testValue2")
    assert with_args["messages"][0]["content"]["text"] == (
        "Prompt with arguments: arg1='testValue1', arg2='testValue2'"
    )
    embedded = await prompt(
        "test_prompt_with_embedded_resource", resourceUri="test://example-resource"
    )
    first = embedded["messages"][0]["content"]
    assert first["type"] == "resource"
    assert first["resource"]["uri"] == "test://example-resource"
    assert first["resource"]["text"] == "Embedded resource content for testing."
    picture = await prompt("test_prompt_with_image")
    img = picture["messages"][0]["content"]
    assert img["type"] == "image"
    assert img["data"]
    assert img["mimeType"] == "image/png"
    assert picture["messages"][1]["content"]["text"] == "Please analyze the image above."

    ref = {"type": "ref/prompt", "name": "test_prompt_with_arguments"}
    done = await rt.complete(ref, {"name": "arg1", "value": "test"}, None, agent="s", timeout=5)
    assert done["completion"]["values"] == ["test1", "test2", "testValue1"]
    par = await rt.complete(ref, {"name": "arg1", "value": "par"}, None, agent="s", timeout=5)
    assert par["completion"]["values"] == ["paris", "park", "party"]
    tmpl = {"type": "ref/resource", "uri": "test://template/{id}/data"}
    ids = await rt.complete(tmpl, {"name": "id", "value": "1"}, None, agent="s", timeout=5)
    assert ids["completion"]["values"] == ["1", "123"]
