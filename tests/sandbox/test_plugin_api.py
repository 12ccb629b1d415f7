"""The plugin-author API and result normalisation, without a worker."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import enum
import re
import uuid
from pathlib import Path

import orjson
import pytest

from mcp_zero.plugin import (
    Content,
    Context,
    Plugin,
    ToolResult,
    audio,
    embedded_resource,
    image,
    message,
    resource_link,
    text,
)
from mcp_zero.sandbox import results
from mcp_zero.sandbox.frames import LARGE_FRAME_CHARS, MAX_DEPTH, encode_frame


class _Shade(enum.Enum):
    DARK = "dark"


@dataclasses.dataclass
class _Cell:
    row: int
    _hidden: int


def test_helpers_build_mcp_blocks():
    assert image(b"\x01\x02", "image/gif") == {
        "type": "image",
        "data": "AQI=",
        "mimeType": "image/gif",
    }
    assert base64.b64decode(audio(b"RIFF")["data"]) == b"RIFF"
    assert embedded_resource("a://b", blob=b"\x00")["resource"] == {"uri": "a://b", "blob": "AA=="}
    assert resource_link("a://b", "b", mime_type="text/plain") == {
        "type": "resource_link",
        "uri": "a://b",
        "name": "b",
        "mimeType": "text/plain",
    }
    with pytest.raises(ValueError, match="exactly one"):
        embedded_resource("a://b")
    with pytest.raises(ValueError, match="role"):
        message("system", "x")


def test_tool_results_are_normalised():
    assert results.tool_result("hi") == {"content": [{"type": "text", "text": "hi"}]}
    assert results.tool_result(None) == {"content": []}
    assert results.tool_result({"a": 1}) == {
        "content": [{"type": "text", "text": '{"a":1}'}],
        "structuredContent": {"a": 1},
    }
    # A plain dict that happens to have "type" is data, a Content block is content.
    assert "structuredContent" in results.tool_result({"type": "text", "text": "x"})
    assert results.tool_result(text("x")) == {"content": [{"type": "text", "text": "x"}]}
    assert results.tool_result([text("a"), "b"])["content"][1] == {"type": "text", "text": "b"}
    assert results.tool_result(3) == {"content": [{"type": "text", "text": "3"}]}
    assert results.tool_result(ToolResult(["x"], {"k": 1}, True))["isError"] is True
    with pytest.raises(TypeError):
        results.tool_result(object())
    with pytest.raises(TypeError):
        results.tool_result([{"not": "a block"}])


def test_blocks_the_official_sdk_makes_are_sent_without_their_nulls() -> None:
    # model_dump writes the fields not set as null (annotations, _meta, priority...): such
    # blocks were refused, though the SDK's own client takes them (found by review)
    from mcp import types

    made = [
        types.TextContent(type="text", text="hi", annotations=types.Annotations(audience=["user"])),
        types.ResourceLink(type="resource_link", uri="a://b", name="b"),
        types.EmbeddedResource(
            type="resource",
            resource=types.TextResourceContents(uri="a://b", text="t"),
        ),
    ]
    sent = results.tool_result([m.model_dump(by_alias=True, mode="json") for m in made])
    assert sent["content"] == [
        {"type": "text", "text": "hi", "annotations": {"audience": ["user"]}},
        {"type": "resource_link", "uri": "a://b", "name": "b"},
        {"type": "resource", "resource": {"uri": "a://b", "text": "t"}},
    ]
    types.CallToolResult.model_validate(sent)


@pytest.mark.parametrize(
    ("returned", "problem"),
    [
        ([{"type": "image"}], "content[0] has no 'data', which its type 'image' needs"),
        (["ok", {"type": "text", "text": 5}], "content[1].text must be a str, not int"),
        (Content(type="audio", data="AA==", mimeType=None), "has no 'mimeType', which its type"),
        (Content(type="audio", data="AA==", mimeType=3), "content[0].mimeType must be a str"),
        ([{"type": "resource", "resource": {"uri": "a://b"}}], "exactly one of 'text' or 'blob'"),
        ([{"type": "resource", "resource": {"text": "t"}}], "content[0].resource has no 'uri'"),
        (
            [{"type": "resource_link", "uri": "a://b"}],
            "has no 'name', which its type 'resource_link' needs",
        ),
        ([text("x", annotations={"priority": 2})], "priority must be a number from 0 to 1"),
        ([text("x", annotations={"audience": ["system"]})], "audience must be a list of"),
        ([{"type": "video", "data": ""}], "content[0] is not a content block"),
    ],
)
def test_a_malformed_content_block_is_refused_not_sent(returned: object, problem: str) -> None:
    # the official client refused the whole response for one such block (found by review)
    with pytest.raises(TypeError, match=re.escape(problem)):
        results.tool_result(returned)


def test_a_prompt_message_of_a_role_mcp_has_not_is_refused():
    with pytest.raises(TypeError, match=r"messages\[1\]\.role must be 'user' or 'assistant'"):
        results.prompt_result(["hi", {"role": "system", "content": "you are root"}])
    with pytest.raises(TypeError, match=r"messages\[0\]\.content has no 'data'"):
        results.prompt_result({"messages": [{"role": "user", "content": {"type": "image"}}]})


@dataclasses.dataclass
class _Point:
    x: int
    when: datetime.date


def test_a_dict_results_text_is_the_json_of_its_structured_content():
    # the text was json.dumps(default=str) of it, the frame orjson's: the two disagreed
    returned = {
        "at": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "p": _Point(3, datetime.date(2026, 1, 2)),
    }
    result = results.tool_result(returned)
    sent = orjson.loads(encode_frame({"id": 1, "result": result}))["result"]
    assert sent["structuredContent"] == {
        "at": "2026-01-02T03:04:05",
        "p": {"x": 3, "when": "2026-01-02"},
    }
    assert orjson.loads(sent["content"][0]["text"]) == sent["structuredContent"]


def test_structured_content_other_than_an_object_is_refused():
    with pytest.raises(TypeError, match=r"structuredContent must be a dict .*, not list"):
        results.tool_result(ToolResult("x", [1, 2]))  # type: ignore[arg-type]


def test_a_tool_result_of_one_string_or_block_is_one_block_not_split():
    # a str is iterable: taken as a list, "done" was four one-letter text blocks
    assert results.tool_result(ToolResult("done", {"n": 1})) == {
        "content": [{"type": "text", "text": "done"}],
        "structuredContent": {"n": 1},
    }
    assert ToolResult("done").content == ["done"]
    assert ToolResult(text("a block")).content == [{"type": "text", "text": "a block"}]
    assert ToolResult(b for b in ("a", "b")).content == ["a", "b"]
    for wrong in (7, b"bytes"):
        with pytest.raises(TypeError, match="a str, a content block or a list of them"):
            ToolResult(wrong)


def test_a_large_frame_with_nan_is_refused_not_written_as_nan():
    # past LARGE_FRAME_CHARS the stdlib encodes, and it writes NaN, which no JSON reader takes
    frame = {"id": 1, "result": {"big": "x" * (LARGE_FRAME_CHARS + 1), "n": float("nan")}}
    with pytest.raises(TypeError, match="not JSON compliant"):
        encode_frame(frame)


def test_a_large_result_nested_deeper_than_the_server_encodes_is_refused_by_the_worker():
    # The stdlib took it, orjson in the server did not: the client got HTTP 500 while the
    # call was audited as allowed (found by review)
    deep: object = "x" * (LARGE_FRAME_CHARS + 1)
    for _ in range(MAX_DEPTH):
        deep = [deep]
    with pytest.raises(TypeError, match=f"deeper than {MAX_DEPTH}"):
        encode_frame({"id": 1, "result": {"structuredContent": {"v": deep}}})
    fits: object = "x" * (LARGE_FRAME_CHARS + 1)
    for _ in range(MAX_DEPTH - 1):  # (under the frame: as deep as may be)
        fits = [fits]
    assert orjson.loads(encode_frame({"id": 1, "v": fits}))["id"] == 1


_EXOTIC_VALUES = [
    2**64 - 1,
    -(2**63),
    2**64,
    -(2**63) - 1,
    {1: 2},
    {"k": {None: 1}},
    datetime.datetime(2020, 1, 2, 3, 4, 5, 6),
    datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
    datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone(-datetime.timedelta(seconds=3599))),
    datetime.date(2020, 1, 2),
    datetime.time(1, 2, 3, 4),
    datetime.time(1, 2, tzinfo=datetime.UTC),
    uuid.UUID(int=5),
    _Shade.DARK,
    _Cell(1, 2),
    (1, "a"),
    {1, 2},
    b"bytes",
]


@pytest.mark.parametrize("value", _EXOTIC_VALUES, ids=repr)
def test_a_value_encodes_the_same_in_a_large_frame_as_in_a_small_one(value: object) -> None:
    # past LARGE_FRAME_CHARS the stdlib encoded: an int past 64 bits was written (and read
    # back as a float), a datetime refused, an int key taken, where orjson did otherwise
    large = "x" * (LARGE_FRAME_CHARS + 1)
    outcomes = []
    for padding in ("x", large):
        try:
            outcomes.append(orjson.loads(encode_frame({"v": value, "s": padding}))["v"])
        except TypeError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_a_tool_result_structured_is_converted_as_a_dict_result_is():
    when = datetime.datetime(2020, 1, 1, 12, 0, 0, 0, datetime.UTC)
    sent = results.tool_result(ToolResult("x", {"at": when, "shade": _Shade.DARK}))
    assert (
        sent["structuredContent"]
        == results.tool_result({"at": when, "shade": _Shade.DARK})["structuredContent"]
    )
    assert sent["structuredContent"] == {"at": "2020-01-01T12:00:00+00:00", "shade": "dark"}


def test_a_resource_links_icons_must_be_a_list_of_icons():
    link = {"type": "resource_link", "uri": "a://b", "name": "b"}
    for icons in ("notalist", ["a.png"], [{"mimeType": "image/png"}], [{"src": 5}]):
        with pytest.raises(TypeError, match=r"content\[0\]\.icons"):
            results.tool_result([{**link, "icons": icons}])
    fine = [{**link, "icons": [{"src": "https://x/a.png", "sizes": ["48x48"]}]}]
    assert results.tool_result(fine)["content"] == fine


def test_an_embedded_resources_meta_must_be_a_dict():
    block = {"type": "resource", "resource": {"uri": "a://b", "text": "t", "_meta": 5}}
    with pytest.raises(TypeError, match=r"content\[0\]\.resource\._meta must be a dict"):
        results.tool_result([block])


def test_a_prompt_result_holds_only_what_mcp_gives_it():
    with pytest.raises(TypeError, match=r"description must be a str, not int"):
        results.prompt_result({"description": 5, "messages": ["hi"]})
    with pytest.raises(TypeError, match="not 'extra'"):
        results.prompt_result({"messages": ["hi"], "extra": {"x": 1}})
    with pytest.raises(TypeError, match="_meta must be a dict"):
        results.prompt_result({"messages": ["hi"], "_meta": 5})
    # a str is iterable: "hi" was two messages, "h" and "i"
    with pytest.raises(TypeError, match="messages must be a list, not str"):
        results.prompt_result({"messages": "hi"})


def test_a_prompt_with_nan_is_refused_naming_where():
    block = {"type": "text", "text": "x", "annotations": {"priority": float("nan")}}
    with pytest.raises(TypeError, match=r"messages\[0\]\.content\.annotations\.priority is nan"):
        results.prompt_result([block])


def test_a_read_gives_the_uri_read_and_the_declared_mime_type():
    html = {"text": "<script></script>", "mimeType": "text/html"}
    with pytest.raises(TypeError, match="'notes://other', not the 'evil://r' read"):
        results.resource_result("evil://r", {**html, "uri": "notes://other"}, None)
    with pytest.raises(TypeError, match="'text/html', but the resource's is 'text/plain'"):
        results.resource_result("evil://r", html, "text/plain")
    assert results.resource_result("evil://r", html, None)["contents"] == [
        {**html, "uri": "evil://r"}
    ]
    same = {"text": "t", "uri": "evil://%72", "mimeType": "text/plain"}  # (r, escaped)
    assert results.resource_result("evil://r", same, "text/plain")["contents"] == [
        {"text": "t", "uri": "evil://r", "mimeType": "text/plain"}
    ]


class _Sink:
    def __init__(self) -> None:
        self.frames: list[dict[str, object]] = []

    def notify(self, frame: dict[str, object]) -> None:
        self.frames.append(frame)


@pytest.mark.parametrize(("progress", "total"), [(float("nan"), None), (1, float("inf"))])
def test_progress_must_be_a_finite_number(progress: float, total: float | None) -> None:
    sink = _Sink()
    ctx = Context("a", Path("."), 1, sink)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        ctx.progress(progress, total)
    ctx.progress(1, 2, "half")
    assert sink.frames == [
        {"op": "progress", "call": 1, "progress": 1, "total": 2, "message": "half"}
    ]


def test_resource_prompt_completion_results():
    assert results.resource_result("u://x", b"\x00", None)["contents"][0] == {
        "uri": "u://x",
        "mimeType": "application/octet-stream",
        "blob": "AA==",
    }
    assert (
        results.prompt_result([message("assistant", "hi"), image(b"")])["messages"][1]["role"]
        == "user"
    )
    assert results.prompt_result({"description": "d", "messages": ["x"]})["description"] == "d"
    many = results.completion_result([str(i) for i in range(150)])["completion"]
    assert len(many["values"]) == 100
    assert many["total"] == 150
    assert many["hasMore"] is True


def test_registration_and_template_matching():
    p = Plugin("t")

    @p.tool("a.b-c_1")
    async def t(ctx):
        return None

    @p.resource_template("docs://{+path}")
    def doc(ctx, path):
        return path

    @p.resource_template("items://{id}/v/{version}")
    def item(ctx, id, version):
        return id

    assert p.tools["a.b-c_1"].is_async is True
    handler, variables = p.match_resource("docs://a/b%20c.md")
    assert handler.fn is doc
    assert variables == {"path": "a/b c.md"}
    assert p.match_resource("items://7/v/2")[1] == {"id": "7", "version": "2"}
    assert p.match_resource("items://7/x/v/2") is None
    with pytest.raises(ValueError, match="registered twice"):
        p.tool("a.b-c_1")(t)
    # found as the kernel sends a read's URI: in normal form (found by review)
    p.resource("mem://%61bc")(t)
    p.resource_template("t://%7E/{x}")(item)
    assert p.match_resource("mem://abc") == (p.resources["mem://%61bc"], {})
    assert p.match_resource("mem://%61b%63") == (p.resources["mem://%61bc"], {})
    assert p.match_resource("t://~/7")[1] == {"x": "7"}
    with pytest.raises(ValueError, match=r"resource 'mem://abc' is registered twice \(escaped"):
        p.resource("mem://abc")(t)


def test_a_template_variable_escaping_no_utf8_matches_no_resource():
    # %FF and %FE both reached the handler as U+FFFD: two URIs, one value (found by review)
    p = Plugin("t")
    p.resource_template("items://{id}")(lambda ctx, id: id)
    assert p.match_resource("items://%C3%A9")[1] == {"id": "é"}
    with pytest.raises(LookupError, match=r"no resource 'items://%FF': its 'id' is not UTF-8"):
        p.match_resource("items://%FF")
    with pytest.raises(ValueError, match="1-128"):
        p.tool("bad name")
    for bad in ("", "a b", "x" * 129):  # as the manifest refuses them (found by review)
        with pytest.raises(ValueError, match=r"prompt name .* must be 1-128"):
            p.prompt(bad)
    with pytest.raises(ValueError, match="unsupported URI template"):
        p.resource_template("q://x{?page}")
    with pytest.raises(ValueError, match="exactly one"):
        p.completion(argument="a")
    assert isinstance(text("x"), Content)


def test_a_mime_type_is_the_manifests_whatever_the_case_of_its_names() -> None:
    # text/markdown in the code against text/Markdown in plugin.json took the plugin down at
    # load, though RFC 2045 makes them one type (found by review)
    plugin = Plugin()

    @plugin.resource("mem://m/a", mime_type="Text/Markdown; Charset=utf-8")
    def a(ctx: Context) -> str:
        return "a"

    plugin.declare_mime_types({"mem://m/a": "text/markdown;charset=utf-8"})
    with pytest.raises(ValueError, match=r"but text/plain in plugin\.json"):
        plugin.declare_mime_types({"mem://m/a": "text/plain"})
    other = Plugin()
    other.resource("mem://m/b", mime_type="text/plain")(a)
    with pytest.raises(ValueError, match="charset=latin1"):  # (a value's case is its own)
        other.declare_mime_types({"mem://m/b": "text/plain; charset=latin1"})


def test_a_nan_in_a_dataclass_of_a_result_is_named_where_it_is() -> None:
    # a bare "Out of range float values are not JSON compliant" (found by review)
    returned = {"a": [_Point(x=float("nan"), when=datetime.date(2026, 1, 2))]}  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^structuredContent\.a\[0\]\.x is nan, which JSON"):
        results.tool_result(returned)
