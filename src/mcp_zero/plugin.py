"""The API plugin authors import to write an MCP-ZERO plugin.

A plugin module creates one :class:`Plugin` and registers handlers on it::

    from mcp_zero.plugin import Context, Plugin, ToolError

    plugin = Plugin("greeter")

    @plugin.tool("greet")
    def greet(ctx: Context, name: str) -> str:
        if not name:
            raise ToolError("name must not be empty")
        return f"Hello, {name} (asked by {ctx.agent})"

The module is loaded inside a sandboxed worker process, so it imports nothing
but the standard library from MCP-ZERO (this module is stdlib only). Handlers
may be plain functions (run in a thread pool) or ``async def`` coroutines (run
on the worker's event loop); either way they receive a :class:`Context` first,
then the call's arguments as keyword arguments. An ``async def`` handler must not
block (``time.sleep``, blocking I/O): that stops every call on its worker.

What a tool returns becomes an MCP ``CallToolResult``:

- ``str`` → one text block; ``None`` → no content;
- ``dict`` → ``structuredContent`` plus a text block holding its JSON;
- a content block (:func:`text`, :func:`image`, :func:`audio`,
  :func:`embedded_resource`, :func:`resource_link`) or a list of blocks and
  strings → ``content``;
- a :class:`ToolResult` → exactly that;
- raising :class:`ToolError` → ``isError: true`` with its message; any other
  exception → ``isError: true`` with the exception's type and message.
"""

from __future__ import annotations

import base64
import math
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mcp_zero.sandbox.base import LOG_LEVELS
from mcp_zero.uri import normal_uri

__all__ = [
    "LOG_LEVELS",
    "Channel",
    "ClientRequestError",
    "Content",
    "Context",
    "Handler",
    "NotFoundError",
    "Plugin",
    "ToolError",
    "ToolResult",
    "audio",
    "embedded_resource",
    "image",
    "message",
    "resource_link",
    "text",
]

JSON = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])

#: MCP log levels, least to most severe (RFC 5424 names).
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TEMPLATE_VAR = re.compile(r"\{([+]?)([A-Za-z0-9_]+)\}")


class ToolError(Exception):
    """Raise from a tool to return ``isError: true`` with this message to the model.

    Raised from a resource, prompt or completion handler, it becomes an
    ``InvalidParams`` error for the client.
    """


class NotFoundError(Exception):
    """Raise from a resource-template handler when the URI names nothing."""


class ClientRequestError(Exception):
    """The MCP client answered :meth:`Context.request` with an error, or could not be reached.

    ``code`` is the JSON-RPC error code when the client sent one.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Content(dict[str, Any]):
    """One MCP content block (a ``dict`` marked as content, so it is not taken for data)."""


def text(value: str, *, annotations: JSON | None = None) -> Content:
    """A text content block."""
    block = Content(type="text", text=value)
    if annotations:
        block["annotations"] = annotations
    return block


def image(data: bytes, mime_type: str = "image/png") -> Content:
    """An image content block; ``data`` is the raw image bytes."""
    return Content(type="image", data=base64.b64encode(data).decode("ascii"), mimeType=mime_type)


def audio(data: bytes, mime_type: str = "audio/wav") -> Content:
    """An audio content block; ``data`` is the raw audio bytes."""
    return Content(type="audio", data=base64.b64encode(data).decode("ascii"), mimeType=mime_type)


def embedded_resource(
    uri: str, *, text: str | None = None, blob: bytes | None = None, mime_type: str | None = None
) -> Content:
    """A resource embedded in the result: give exactly one of ``text`` or ``blob``.

    Raises ``ValueError`` when both or neither are given.
    """
    if (text is None) == (blob is None):
        raise ValueError("embedded_resource needs exactly one of text= or blob=")
    resource: JSON = {"uri": uri}
    if mime_type:
        resource["mimeType"] = mime_type
    if text is not None:
        resource["text"] = text
    else:
        assert blob is not None  # for mypy: checked above
        resource["blob"] = base64.b64encode(blob).decode("ascii")
    return Content(type="resource", resource=resource)


def resource_link(
    uri: str,
    name: str,
    *,
    description: str | None = None,
    mime_type: str | None = None,
    title: str | None = None,
) -> Content:
    """A link to a resource the client may read later."""
    block = Content(type="resource_link", uri=uri, name=name)
    if title:
        block["title"] = title
    if description:
        block["description"] = description
    if mime_type:
        block["mimeType"] = mime_type
    return block


def message(role: str, content: str | Content) -> JSON:
    """A prompt message: ``role`` is ``"user"`` or ``"assistant"``; ``content`` a block or str."""
    if role not in ("user", "assistant"):
        raise ValueError(f"prompt message role must be 'user' or 'assistant', not {role!r}")
    return {"role": role, "content": text(content) if isinstance(content, str) else content}


@dataclass(frozen=True, init=False)
class ToolResult:
    """A tool result spelled out: content blocks, optional structured content, error flag.

    ``content`` is a list of content blocks and strings, or a single one of them: a
    ``str`` is one text block, never split into characters. Raises ``TypeError`` for
    anything else.
    """

    content: list[Content | str]
    structured: JSON | None
    is_error: bool

    def __init__(
        self,
        content: str | Content | Iterable[Content | str] = (),
        structured: JSON | None = None,
        is_error: bool = False,
    ) -> None:
        # A str and a block (a dict) are iterable too, but iterating them means nothing here.
        if isinstance(content, str | Content):
            blocks: list[Content | str] = [content]
        elif isinstance(content, dict):
            blocks = [Content(content)]
        elif isinstance(content, Iterable) and not isinstance(content, bytes | bytearray):
            blocks = list(content)
        else:
            raise TypeError(
                "ToolResult content is a str, a content block or a list of them, "
                f"not {type(content).__name__}"
            )
        object.__setattr__(self, "content", blocks)
        object.__setattr__(self, "structured", structured)
        object.__setattr__(self, "is_error", is_error)


class Channel(Protocol):
    """How a :class:`Context` reaches the kernel; the worker implements it."""

    def notify(self, frame: JSON) -> None:
        """Send a notification frame (progress, log); safe from any thread."""

    async def request(
        self, call_id: int, method: str, params: JSON, key: str | None = None
    ) -> JSON:
        """Ask the MCP client, through the kernel, and wait for its answer."""
        ...

    def request_blocking(
        self, call_id: int, method: str, params: JSON, key: str | None = None
    ) -> JSON:
        """:meth:`request` for code running in a worker thread."""
        ...


class Context:
    """What a handler knows about its call and how it talks back to the client.

    ``agent`` is the calling agent's name; ``data_dir`` the plugin's private,
    writable directory (shared by all agents: separate their data yourself).
    """

    __slots__ = ("_call_id", "_channel", "agent", "cancelled", "data_dir")

    def __init__(self, agent: str, data_dir: Path, call_id: int, channel: Channel) -> None:
        self.agent = agent
        self.data_dir = data_dir
        #: Set when the kernel cancelled this call (timeout or client cancel); long-running
        #: sync handlers should check it and return early.
        self.cancelled = False
        self._call_id = call_id
        self._channel = channel

    def progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report progress to the client (dropped if the client asked for none). Never blocks.

        Raises ``ValueError`` for a NaN or infinite ``progress`` or ``total`` (JSON has no
        such numbers, and a client needs a number there), or a notification over 1 MiB as
        JSON.
        """
        if not math.isfinite(progress) or (total is not None and not math.isfinite(total)):
            raise ValueError(f"progress must be a finite number, not {progress!r} of {total!r}")
        self._channel.notify(
            {
                "op": "progress",
                "call": self._call_id,
                "progress": progress,
                "total": total,
                "message": message,
            }
        )

    def log(self, level: str, data: Any, logger: str | None = None) -> None:
        """Send a log message to the client at ``level`` (one of :data:`LOG_LEVELS`).

        Raises ``ValueError`` for an unknown level, or a notification over 1 MiB as JSON.
        Never blocks.
        """
        if level not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
        self._channel.notify(
            {"op": "log", "call": self._call_id, "level": level, "data": data, "logger": logger}
        )

    def resource_updated(self, uri: str) -> None:
        """Tell the clients subscribed to ``uri`` (one of this plugin's resources) that it
        changed: they get ``notifications/resources/updated``. Never blocks; raises
        ``ValueError`` for a ``uri`` over 1 MiB."""
        self._channel.notify({"op": "resource_updated", "call": self._call_id, "uri": uri})

    def close_stream(self) -> None:
        """Ask the transport to close the client's event stream now (SEP-1699 polling).

        Over streamable HTTP the client reconnects with ``Last-Event-ID`` and receives
        the rest of the call, the result included; long calls use this so that no
        connection is held open for their whole length. Elsewhere (stdio) it does
        nothing. Never blocks.
        """
        self._channel.notify({"op": "close_stream", "call": self._call_id})

    async def request(self, method: str, params: JSON, *, key: str | None = None) -> JSON:
        """Send a request to the MCP client (e.g. ``sampling/createMessage``) and return its result.

        Raises :class:`ClientRequestError` when the client refuses or cannot be reached,
        ``ValueError`` for a request over 32 MiB as JSON. Use :meth:`request_sync` from a
        plain (non-async) handler.

        ``key`` names the question where MCP 2026-07-28 carries it (the ``inputRequests``
        of an ``input_required`` result; requests made at once travel together); by
        default the server numbers them.
        """
        return await self._channel.request(self._call_id, method, params, key)

    def request_sync(self, method: str, params: JSON, *, key: str | None = None) -> JSON:
        """:meth:`request` for plain handlers (they run in a thread); blocks until answered."""
        return self._channel.request_blocking(self._call_id, method, params, key)

    async def sample(
        self,
        messages: str | list[JSON],
        *,
        max_tokens: int = 256,
        key: str | None = None,
        **params: Any,
    ) -> JSON:
        """Ask the client's LLM (``sampling/createMessage``); returns the ``CreateMessageResult``.

        ``messages`` is a user prompt or a list of sampling messages; ``params`` adds
        fields such as ``systemPrompt``, ``temperature``, ``modelPreferences``.
        """
        sampling = _sampling(messages, max_tokens, params)
        return await self.request("sampling/createMessage", sampling, key=key)

    def sample_sync(
        self,
        messages: str | list[JSON],
        *,
        max_tokens: int = 256,
        key: str | None = None,
        **params: Any,
    ) -> JSON:
        """:meth:`sample` for plain handlers."""
        sampling = _sampling(messages, max_tokens, params)
        return self.request_sync("sampling/createMessage", sampling, key=key)

    async def elicit(self, message: str, requested_schema: JSON, *, key: str | None = None) -> JSON:
        """Ask the user for input (``elicitation/create``); returns ``{"action", "content"}``."""
        return await self.request(
            "elicitation/create",
            {"message": message, "requestedSchema": requested_schema},
            key=key,
        )

    def elicit_sync(self, message: str, requested_schema: JSON, *, key: str | None = None) -> JSON:
        """:meth:`elicit` for plain handlers."""
        return self.request_sync(
            "elicitation/create",
            {"message": message, "requestedSchema": requested_schema},
            key=key,
        )


def _sampling(messages: str | list[JSON], max_tokens: int, params: JSON) -> JSON:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": {"type": "text", "text": messages}}]
    return {"messages": messages, "maxTokens": max_tokens, **params}


@dataclass(frozen=True)
class Handler:
    """A registered handler and how to run it."""

    fn: Callable[..., Any]
    is_async: bool
    mime_type: str | None = None


@dataclass(frozen=True)
class _Template:
    template: str
    pattern: re.Pattern[str]
    handler: Handler


_CO_COROUTINE = 0x0080  # inspect.CO_COROUTINE, without importing inspect (worker start time)


def _handler(fn: Callable[..., Any], mime_type: str | None = None) -> Handler:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    is_async = code is not None and bool(code.co_flags & _CO_COROUTINE)
    return Handler(fn, is_async, mime_type)


def _compile_template(template: str) -> re.Pattern[str]:
    """An RFC 6570 level-1/2 template (``{var}``, ``{+var}``) as an anchored regex.

    Raises ``ValueError`` for any other expression.
    """
    parts: list[str] = []
    literals: list[str] = []
    pos = 0
    for m in _TEMPLATE_VAR.finditer(template):
        literals.append(template[pos : m.start()])
        parts.append(re.escape(template[pos : m.start()]))
        # {var} stops at reserved characters; {+var} takes them too (paths).
        parts.append(f"(?P<{m.group(2)}>.+)" if m.group(1) else f"(?P<{m.group(2)}>[^/?#]+)")
        pos = m.end()
    literals.append(template[pos:])
    parts.append(re.escape(template[pos:]))
    if any("{" in lit or "}" in lit for lit in literals):
        raise ValueError(f"unsupported URI template expression in {template!r}")
    return re.compile("^" + "".join(parts) + "$")


def declared_mime_types(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The ``mimeType`` a plugin.json (``manifest``, as parsed JSON) gives each resource and
    resource template that has one, by URI or template in normal form."""
    declared: dict[str, str] = {}
    for listed, key in (("resources", "uri"), ("resourceTemplates", "uriTemplate")):
        for item in manifest.get(listed) or ():
            if item.get("mimeType"):
                declared[normal_uri(item[key])] = item["mimeType"]
    return declared


class Plugin:
    """A plugin's handlers, registered with decorators.

    ``name`` is informational (the manifest's name is authoritative). Each
    decorator raises ``ValueError`` on an invalid or duplicate name.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.tools: dict[str, Handler] = {}
        self.resources: dict[str, Handler] = {}
        # the resources by normal_uri: the kernel sends a read's URI in normal form
        self._by_uri: dict[str, Handler] = {}
        self.templates: list[_Template] = []
        self.prompts: dict[str, Handler] = {}
        #: (ref type, prompt name or template, argument name) -> handler
        self.completions: dict[tuple[str, str, str], Handler] = {}

    def tool(self, name: str) -> Callable[[F], F]:
        """Register ``fn(ctx, **arguments)`` as the tool ``name`` (1-128 of [A-Za-z0-9_.-])."""
        if not _NAME.match(name):
            raise ValueError(f"tool name {name!r} must be 1-128 characters of [A-Za-z0-9_.-]")

        def register(fn: F) -> F:
            _unique(self.tools, name, "tool")
            self.tools[name] = _handler(fn)
            return fn

        return register

    def resource(self, uri: str, *, mime_type: str | None = None) -> Callable[[F], F]:
        """Register ``fn(ctx)`` as the static resource ``uri``.

        It returns ``str`` (text), ``bytes`` (blob), a contents dict, or a list of them.
        """

        def register(fn: F) -> F:
            _unique(self.resources, uri, "resource")
            if normal_uri(uri) in self._by_uri:
                raise ValueError(f"resource {uri!r} is registered twice (escaped otherwise)")
            self.resources[uri] = self._by_uri[normal_uri(uri)] = _handler(fn, mime_type)
            return fn

        return register

    def resource_template(
        self, uri_template: str, *, mime_type: str | None = None
    ) -> Callable[[F], F]:
        """Register ``fn(ctx, **variables)`` for URIs matching ``uri_template`` (``{var}``,
        ``{+var}``); variables arrive percent-decoded."""
        pattern = _compile_template(normal_uri(uri_template))

        def register(fn: F) -> F:
            if any(t.template == uri_template for t in self.templates):
                raise ValueError(f"resource template {uri_template!r} is registered twice")
            self.templates.append(_Template(uri_template, pattern, _handler(fn, mime_type)))
            return fn

        return register

    def prompt(self, name: str) -> Callable[[F], F]:
        """Register ``fn(ctx, **arguments)`` as the prompt ``name`` (1-128 of
        [A-Za-z0-9_.-], as the manifest's prompt names).

        It returns a ``str`` (one user message), a list of messages (see :func:`message`)
        or content blocks, or a ``GetPromptResult`` dict with ``messages``.
        """
        if not _NAME.match(name):
            raise ValueError(f"prompt name {name!r} must be 1-128 characters of [A-Za-z0-9_.-]")

        def register(fn: F) -> F:
            _unique(self.prompts, name, "prompt")
            self.prompts[name] = _handler(fn)
            return fn

        return register

    def completion(
        self, *, argument: str, prompt: str | None = None, resource_template: str | None = None
    ) -> Callable[[F], F]:
        """Register ``fn(ctx, value, arguments)`` completing ``argument`` of a prompt or a
        resource template's variable; ``arguments`` holds the values already chosen.

        It returns a list of strings, or ``{"values", "total", "hasMore"}``.
        """
        if (prompt is None) == (resource_template is None):
            raise ValueError("completion needs exactly one of prompt= or resource_template=")
        key = (
            ("ref/prompt", prompt, argument)
            if prompt is not None
            else ("ref/resource", resource_template or "", argument)
        )

        def register(fn: F) -> F:
            _unique(self.completions, key, "completion")
            self.completions[key] = _handler(fn)
            return fn

        return register

    def declare_mime_types(self, declared: dict[str, str]) -> None:
        """Take the manifest's ``mimeType`` of each resource and template (``declared``, by
        URI or template in normal form) as the one its reads give when the decorator gives
        none, so that a listing and a read agree. Raises ``ValueError`` for one the
        decorator gives otherwise. The worker calls it as the plugin loads."""
        for uri, handler in list(self.resources.items()):
            key = normal_uri(uri)
            chosen = _mime_type(f"resource {uri!r}", handler, declared.get(key))
            self.resources[uri] = self._by_uri[key] = chosen
        self.templates = [
            _Template(
                t.template,
                t.pattern,
                _mime_type(
                    f"resource template {t.template!r}",
                    t.handler,
                    declared.get(normal_uri(t.template)),
                ),
            )
            for t in self.templates
        ]

    def match_resource(self, uri: str) -> tuple[Handler, dict[str, str]] | None:
        """The handler serving ``uri`` (however escaped: ``mem://%61bc`` is ``mem://abc``)
        and its template variables, percent-decoded, or ``None``. Raises ``LookupError``
        for a variable whose escapes are not UTF-8 (``%FF``), which no str can hold: each
        became U+FFFD, so that two URIs reached a handler as one value (found by review)."""
        uri = normal_uri(uri)
        handler = self._by_uri.get(uri)
        if handler is not None:
            return handler, {}
        for t in self.templates:
            m = t.pattern.match(uri)
            if m:
                return t.handler, {k: _decoded(uri, k, v) for k, v in m.groupdict().items()}
        return None


def _decoded(uri: str, name: str, value: str) -> str:
    try:
        return urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise LookupError(
            f"no resource {uri!r}: its {name!r} is not UTF-8 once percent-decoded"
        ) from None


def _mime_type(what: str, handler: Handler, declared: str | None) -> Handler:
    if declared is None or _same_type(handler.mime_type, declared):
        return handler
    if handler.mime_type is None:
        return Handler(handler.fn, handler.is_async, declared)
    raise ValueError(
        f"{what} is {handler.mime_type} in the code (mime_type=) but {declared} in "
        "plugin.json (mimeType): give it one type"
    )


def _same_type(given: str | None, declared: str) -> bool:
    """Whether a decorator's MIME type is the manifest's: its type, subtype and parameter
    names are compared without regard to case (RFC 2045), and the spaces around them
    ignored (``text/Markdown`` is ``text/markdown``: found by review)."""
    if given is None:
        return False
    return _type_key(given) == _type_key(declared)


def _type_key(mime_type: str) -> tuple[str, ...]:
    kind, *parameters = mime_type.split(";")
    keyed = []
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        keyed.append(f"{name.strip().lower()}={value.strip()}")
    return (kind.strip().lower(), *sorted(keyed))


def _unique(registry: dict[Any, Handler], key: Any, kind: str) -> None:
    if key in registry:
        raise ValueError(f"{kind} {key!r} is registered twice")
