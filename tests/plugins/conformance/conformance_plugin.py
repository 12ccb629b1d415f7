"""Fixtures the official MCP conformance suite calls (0.1.16, and 0.2.0-alpha.12 for MCP
2026-07-28), served as an MCP-ZERO plugin.

Names, contents and timings follow the suite's server scenarios
(``tools-call-*``, ``resources-*``, ``prompts-*``, ``completion-complete``,
``json-schema-2020-12``, ``elicitation-sep1034-defaults``,
``elicitation-sep1330-enums``, ``server-sse-polling``).
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from typing import Any

from mcp_zero.plugin import (
    ClientRequestError,
    Context,
    Plugin,
    ToolError,
    audio,
    embedded_resource,
    image,
    message,
    text,
)

plugin = Plugin("conformance")


def _png_1x1_red() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte + one red pixel
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _wav_silence(samples: int = 80, rate: int = 8000) -> bytes:
    data = b"\x00\x00" * samples  # 16-bit mono silence
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(data))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


PNG = _png_1x1_red()
WAV = _wav_silence()
STEP_S = 0.05  # the suite's "~50ms" between notifications


# -- tools ---------------------------------------------------------------------


@plugin.tool("test_simple_text")
def simple_text(ctx: Context) -> str:
    return "This is a simple text response for testing."


@plugin.tool("test_image_content")
def image_content(ctx: Context) -> Any:
    return [image(PNG, "image/png")]


@plugin.tool("test_audio_content")
def audio_content(ctx: Context) -> Any:
    return [audio(WAV, "audio/wav")]


@plugin.tool("test_embedded_resource")
def embedded(ctx: Context) -> Any:
    return [
        embedded_resource(
            "test://embedded-resource",
            text="This is an embedded resource content.",
            mime_type="text/plain",
        )
    ]


@plugin.tool("test_multiple_content_types")
def multiple(ctx: Context) -> Any:
    return [
        text("Multiple content types test:"),
        image(PNG, "image/png"),
        embedded_resource(
            "test://mixed-content-resource",
            text=json.dumps({"test": "data", "value": 123}, separators=(",", ":")),
            mime_type="application/json",
        ),
    ]


@plugin.tool("test_tool_with_logging")
async def with_logging(ctx: Context) -> str:
    ctx.log("info", "Tool execution started", "conformance")
    await asyncio.sleep(STEP_S)
    ctx.log("info", "Tool processing data", "conformance")
    await asyncio.sleep(STEP_S)
    ctx.log("info", "Tool execution completed", "conformance")
    return "Tool with logging executed successfully"


@plugin.tool("test_tool_with_progress")
async def with_progress(ctx: Context) -> str:
    ctx.progress(0, 100)
    await asyncio.sleep(STEP_S)
    ctx.progress(50, 100)
    await asyncio.sleep(STEP_S)
    ctx.progress(100, 100)
    return "Tool with progress executed successfully"


@plugin.tool("test_error_handling")
def error_handling(ctx: Context) -> str:
    raise ToolError("This tool intentionally returns an error for testing")


@plugin.tool("test_sampling")
async def sampling(ctx: Context, prompt: str) -> str:
    try:
        result = await ctx.sample(prompt, max_tokens=100)
    except ClientRequestError as exc:
        raise ToolError(f"Sampling is not available: {exc}") from None
    content = result.get("content")
    blocks = content if isinstance(content, list) else [content]
    said = " ".join(b.get("text", "") for b in blocks if isinstance(b, dict))
    return f"LLM response: {said}"


async def _elicit(ctx: Context, msg: str, schema: dict[str, Any], prefix: str) -> str:
    try:
        result = await ctx.elicit(msg, schema)
    except ClientRequestError as exc:
        raise ToolError(f"Elicitation is not available: {exc}") from None
    content = json.dumps(result.get("content") or {}, separators=(",", ":"))
    return f"{prefix}: action={result.get('action')}, content={content}"


@plugin.tool("test_elicitation")
async def elicitation(ctx: Context, message: str) -> str:
    schema = {
        "type": "object",
        "properties": {
            "username": {"type": "string", "description": "User's response"},
            "email": {"type": "string", "description": "User's email address"},
        },
        "required": ["username", "email"],
    }
    return await _elicit(ctx, message, schema, "User response")


@plugin.tool("test_elicitation_sep1034_defaults")
async def elicitation_defaults(ctx: Context) -> str:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "User name", "default": "John Doe"},
            "age": {"type": "integer", "description": "User age", "default": 30},
            "score": {"type": "number", "description": "User score", "default": 95.5},
            "status": {
                "type": "string",
                "description": "User status",
                "enum": ["active", "inactive", "pending"],
                "default": "active",
            },
            "verified": {"type": "boolean", "description": "Verification status", "default": True},
        },
        "required": [],
    }
    return await _elicit(
        ctx,
        "Please review and update the form fields with defaults",
        schema,
        "Elicitation completed",
    )


@plugin.tool("test_elicitation_sep1330_enums")
async def elicitation_enums(ctx: Context) -> str:
    schema = {
        "type": "object",
        "properties": {
            "untitledSingle": {
                "type": "string",
                "description": "Choose an option",
                "enum": ["option1", "option2", "option3"],
            },
            "titledSingle": {
                "type": "string",
                "description": "Choose a titled option",
                "oneOf": [
                    {"const": "value1", "title": "First Option"},
                    {"const": "value2", "title": "Second Option"},
                    {"const": "value3", "title": "Third Option"},
                ],
            },
            "legacyEnum": {
                "type": "string",
                "description": "Choose a legacy option",
                "enum": ["opt1", "opt2", "opt3"],
                "enumNames": ["Option One", "Option Two", "Option Three"],
            },
            "untitledMulti": {
                "type": "array",
                "description": "Choose multiple options",
                "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
            },
            "titledMulti": {
                "type": "array",
                "description": "Choose multiple titled options",
                "items": {
                    "anyOf": [
                        {"const": "value1", "title": "First Choice"},
                        {"const": "value2", "title": "Second Choice"},
                        {"const": "value3", "title": "Third Choice"},
                    ]
                },
            },
        },
        "required": [],
    }
    return await _elicit(
        ctx, "Please select options from the enum fields", schema, "Elicitation completed"
    )


@plugin.tool("json_schema_2020_12_tool")
def json_schema_2020_12(
    ctx: Context, name: str | None = None, address: Any = None, **contact: Any
) -> Any:
    return {"name": name, "address": address, **contact}


@plugin.tool("test_reconnection")
async def reconnection(ctx: Context) -> str:
    # Close the client's SSE stream mid-call (SEP-1699): the result arrives after the
    # client reconnects with Last-Event-ID, so the tool must outlive the close.
    ctx.close_stream()
    await asyncio.sleep(0.1)
    return "Reconnection test completed successfully"


# -- resources -----------------------------------------------------------------


@plugin.resource("test://static-text", mime_type="text/plain")
def static_text(ctx: Context) -> str:
    return "This is the content of the static text resource."


@plugin.resource("test://static-binary", mime_type="image/png")
def static_binary(ctx: Context) -> bytes:
    return PNG


@plugin.resource("test://watched-resource", mime_type="text/plain")
def watched(ctx: Context) -> str:
    return "Watched resource content"


@plugin.resource_template("test://template/{id}/data", mime_type="application/json")
def template_data(ctx: Context, id: str) -> str:
    return json.dumps(
        {"id": id, "templateTest": True, "data": f"Data for ID: {id}"}, separators=(",", ":")
    )


# -- prompts -------------------------------------------------------------------


@plugin.prompt("test_simple_prompt")
def simple_prompt(ctx: Context) -> str:
    return "This is a simple prompt for testing."


@plugin.prompt("test_prompt_with_arguments")
def prompt_with_arguments(ctx: Context, arg1: str, arg2: str) -> str:
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@plugin.prompt("test_prompt_with_embedded_resource")
def prompt_with_resource(ctx: Context, resourceUri: str) -> Any:
    return [
        message(
            "user",
            embedded_resource(
                resourceUri, text="Embedded resource content for testing.", mime_type="text/plain"
            ),
        ),
        message("user", "Please process the embedded resource above."),
    ]


@plugin.prompt("test_prompt_with_image")
def prompt_with_image(ctx: Context) -> Any:
    return [
        message("user", image(PNG, "image/png")),
        message("user", "Please analyze the image above."),
    ]


# -- completions ---------------------------------------------------------------

_ARG1_VALUES = ["paris", "park", "party", "test1", "test2", "testValue1"]


@plugin.completion(prompt="test_prompt_with_arguments", argument="arg1")
def complete_arg1(ctx: Context, value: str, arguments: dict[str, str]) -> list[str]:
    return [v for v in _ARG1_VALUES if v.startswith(value)]


@plugin.completion(resource_template="test://template/{id}/data", argument="id")
def complete_id(ctx: Context, value: str, arguments: dict[str, str]) -> list[str]:
    return [v for v in ("1", "123", "42") if v.startswith(value)]


# --- MCP 2026-07-28 (conformance 0.2.0-alpha.12, --requirements 2026-07-28) ----------------------
# A question to the client travels in an input_required answer there; `key` names it as the
# scenarios expect. The tool itself just asks and waits, as on a session.


def _said(result: dict[str, Any]) -> str:
    content = result.get("content")
    blocks = content if isinstance(content, list) else [content]
    return " ".join(b.get("text", "") for b in blocks if isinstance(b, dict))


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@plugin.tool("test_input_required_result_elicitation")
async def ir_elicitation(ctx: Context) -> str:
    answer = await ctx.elicit("What is your name?", NAME_SCHEMA, key="user_name")
    return f"Hello, {(answer.get('content') or {}).get('name', 'stranger')}!"


@plugin.tool("test_input_required_result_sampling")
async def ir_sampling(ctx: Context) -> str:
    result = await ctx.sample(
        "What is the capital of France?", max_tokens=100, key="capital_question"
    )
    return f"The client's model said: {_said(result)}"


@plugin.tool("test_input_required_result_list_roots")
async def ir_roots(ctx: Context) -> str:
    result = await ctx.request("roots/list", {}, key="client_roots")
    uris = [r.get("uri", "") for r in result.get("roots", []) if isinstance(r, dict)]
    return f"The client's roots: {', '.join(uris) or 'none'}"


@plugin.tool("test_input_required_result_request_state")
async def ir_request_state(ctx: Context) -> str:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = await ctx.elicit("Please confirm", schema, key="confirm")
    # the server hands the answer over only for the requestState it gave: state-ok
    return f"state-ok: confirmed={(answer.get('content') or {}).get('ok')}"


@plugin.tool("test_input_required_result_tampered_state")
async def ir_tampered_state(ctx: Context) -> str:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    await ctx.elicit("Please confirm", schema, key="confirm")
    return "state-ok"


@plugin.tool("test_input_required_result_multiple_inputs")
async def ir_multiple(ctx: Context) -> str:
    name, greeting, roots = await asyncio.gather(
        ctx.elicit("What is your name?", NAME_SCHEMA, key="user_name"),
        ctx.sample("Generate a greeting", max_tokens=50, key="greeting"),
        ctx.request("roots/list", {}, key="client_roots"),
    )
    who = (name.get("content") or {}).get("name", "stranger")
    return f"{_said(greeting)} {who} ({len(roots.get('roots', []))} roots)"


@plugin.tool("test_input_required_result_multi_round")
async def ir_multi_round(ctx: Context) -> str:
    first = await ctx.elicit("Step 1: What is your name?", NAME_SCHEMA, key="step1")
    color_schema = {
        "type": "object",
        "properties": {"color": {"type": "string"}},
        "required": ["color"],
    }
    second = await ctx.elicit("Step 2: What is your favorite color?", color_schema, key="step2")
    name = (first.get("content") or {}).get("name")
    color = (second.get("content") or {}).get("color")
    return f"{name} likes {color}"


@plugin.tool("test_input_required_result_capabilities")
async def ir_capabilities(ctx: Context) -> str:
    """Asks only what the client can answer: a question it did not declare fails at once."""
    asked = await asyncio.gather(
        ctx.elicit("What is your name?", NAME_SCHEMA, key="user_name"),
        ctx.sample("Generate a greeting", max_tokens=50, key="greeting"),
        return_exceptions=True,
    )
    answered = [a for a in asked if not isinstance(a, ClientRequestError)]
    return f"{len(answered)} of the client's capabilities were used"


@plugin.tool("test_missing_capability")
async def missing_capability(ctx: Context) -> str:
    """Cannot do without sampling: the refusal is not caught, so the request fails (-32021)."""
    return _said(await ctx.sample("Say something", max_tokens=20))


@plugin.tool("test_streaming_elicitation")
async def streaming_elicitation(ctx: Context) -> str:
    ctx.progress(1, 2, "about to ask")
    answer = await ctx.elicit("What is your name?", NAME_SCHEMA)
    return f"Hello, {(answer.get('content') or {}).get('name', 'stranger')}!"


@plugin.tool("test_logging_tool")
async def logging_tool(ctx: Context) -> str:
    for level in ("debug", "info", "warning"):
        ctx.log(level, f"a {level} message")
    return "logged"


@plugin.prompt("test_input_required_result_prompt")
async def ir_prompt(ctx: Context) -> str:
    schema = {
        "type": "object",
        "properties": {"context": {"type": "string"}},
        "required": ["context"],
    }
    answer = await ctx.elicit("What context should the prompt use?", schema, key="user_context")
    return f"Use this context: {(answer.get('content') or {}).get('context', '')}"


@plugin.tool("test_custom_headers")
def custom_headers(ctx: Context, region: str) -> str:
    return f"region={region}"
