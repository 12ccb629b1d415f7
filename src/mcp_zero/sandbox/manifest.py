"""Plugin manifests: ``plugin.json``, parsed and validated once at the edge.

Every field is documented in ``docs/plugins.md``. :func:`parse_manifest` and
:func:`load_manifest` raise :class:`~mcp_zero.errors.ManifestError` naming the
offending field; inside the kernel a :class:`PluginManifest` is trusted.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema_rs

from mcp_zero.errors import ManifestError, shown
from mcp_zero.fdio import NotRegularFile, file_kind, read_regular
from mcp_zero.uri import normal_uri

JSON = dict[str, Any]
ABI_VERSION = 1
RUNTIMES = frozenset({"process"})
FILESYSTEM_MODES = frozenset({"none", "private"})
MANIFEST_FILE = "plugin.json"

_PLUGIN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}\Z")
#: The longest tool or prompt name (MCP clients, and the server's refusal of longer names
#: before they reach the audit log, rely on it).
MAX_NAME_LENGTH = 128
#: The longest resource URI or URI template a manifest may declare, and a client may name.
MAX_URI_LENGTH = 8192
_MCP_NAME = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_NAME_LENGTH}}}\Z")
_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z")
# What the worker imports, besides the standard library and what its interpreter imports
# at start (_started_with): a plugin module of one of these names would be shadowed by it
# and never loaded, or (uvloop, imported once the plugin is) hide it from the worker.
_WORKER_MODULES = frozenset({"__main__", "mcp_zero", "orjson", "uvloop"})
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}\Z")
# The dialects a schema may name in "$schema"; anything else is refused before it is
# looked up (an unknown meta-schema URI would otherwise be fetched over the network).
_DIALECTS = frozenset(
    (
        "http://json-schema.org/draft-04/schema",
        "http://json-schema.org/draft-06/schema",
        "http://json-schema.org/draft-07/schema",
        "https://json-schema.org/draft/2019-09/schema",
        "https://json-schema.org/draft/2020-12/schema",
    )
)
#: How deep arrays and objects may nest in plugin.json. The server writes what it holds
#: into tools/list and admin answers with orjson, which stops at 254 levels (the answer's
#: own take a few); no manifest needs more than a few levels.
MAX_MANIFEST_DEPTH = 64
#: The largest plugin.json: every server parses its record again at each refresh, and lists
#: its tools to every client (a thousand tools with schemas of a few KiB fit).
MAX_MANIFEST_BYTES = 4 << 20
# What orjson writes: a 64-bit integer, signed or not.
_INT_RANGE = (-(2**63), 2**64 - 1)
_TOP_LEVEL_KEYS = (
    "name",
    "version",
    "abi",
    "runtime",
    "entry",
    "description",
    "publisher",
    "capabilities",
    "quotas",
    "tools",
    "resources",
    "resourceTemplates",
    "prompts",
)
_CAPABILITY_KEYS = ("network", "filesystem")
# The keys of each entry of tools[], resources[], resourceTemplates[], prompts[] and a
# prompt's arguments[]: a misspelt one (outputschema) silently meant its default (no
# output checking): found by review.
_TOOL_KEYS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
_TOOL_ANNOTATIONS = {
    "title": str,
    "readOnlyHint": bool,
    "destructiveHint": bool,
    "idempotentHint": bool,
    "openWorldHint": bool,
}
_RESOURCE_KEYS = ("uri", "name", "title", "description", "mimeType")
_TEMPLATE_KEYS = ("uriTemplate", "name", "title", "description", "mimeType")
_PROMPT_KEYS = ("name", "title", "description", "arguments")
_ARGUMENT_KEYS = ("name", "description", "required")
# RFC 6570 level 1 and 2 as the worker compiles them (mcp_zero.plugin): {var} and {+var}.
_TEMPLATE_VAR = re.compile(r"\{(\+?)([A-Za-z0-9_]+)\}")
# (key, default, minimum, maximum)
_QUOTAS = (
    ("timeout_ms", 10_000, 1, 3_600_000),
    ("memory_mb", 256, 32, 65_536),
    ("max_concurrency", 8, 1, 1024),
    ("workers", 1, 1, 64),
)


@dataclass(frozen=True)
class Capabilities:
    """What the plugin may reach: ``network`` (bool), ``filesystem`` (``none`` | ``private``)."""

    network: bool = False
    filesystem: str = "private"


@dataclass(frozen=True)
class Quotas:
    """Per-plugin limits: wall-clock per call, address space per worker, calls, workers."""

    timeout_ms: int = 10_000
    memory_mb: int = 256
    max_concurrency: int = 8
    workers: int = 1


@dataclass(frozen=True)
class ParamHeader:
    """An argument a client repeats in an ``Mcp-Param-<token>`` HTTP header (MCP
    2026-07-28), as the tool's input schema marks it with ``"x-mcp-header": "<token>"``."""

    path: tuple[str, ...]  # property names from the schema's root
    token: str
    type: str  # "string", "integer" or "boolean"


@dataclass(frozen=True)
class ToolSpec:
    """One tool as the manifest declares it (and as ``tools/list`` shows it)."""

    name: str
    description: str
    input_schema: JSON
    output_schema: JSON | None = None
    annotations: JSON | None = None
    title: str | None = None
    param_headers: tuple[ParamHeader, ...] = ()

    def to_mcp(self) -> JSON:
        """The MCP ``Tool`` object, schemas verbatim (``$schema``, ``$defs`` preserved)."""
        out: JSON = {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        }
        if self.title is not None:
            out["title"] = self.title
        if self.output_schema is not None:
            out["outputSchema"] = self.output_schema
        if self.annotations is not None:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True)
class ResourceSpec:
    """A static resource (``resources/list``)."""

    uri: str
    name: str
    description: str | None = None
    mime_type: str | None = None
    title: str | None = None

    def to_mcp(self) -> JSON:
        """The MCP ``Resource`` object."""
        return _resource_listing("uri", self.uri, self)


@dataclass(frozen=True)
class ResourceTemplateSpec:
    """A resource template (``resources/templates/list``), RFC 6570 ``{var}`` / ``{+var}``."""

    uri_template: str
    name: str
    description: str | None = None
    mime_type: str | None = None
    title: str | None = None

    def to_mcp(self) -> JSON:
        """The MCP ``ResourceTemplate`` object."""
        return _resource_listing("uriTemplate", self.uri_template, self)


@dataclass(frozen=True)
class PromptArgument:
    """One prompt argument."""

    name: str
    description: str | None = None
    required: bool = False

    def to_mcp(self) -> JSON:
        """The MCP ``PromptArgument`` object."""
        return _drop_none(
            {"name": self.name, "description": self.description, "required": self.required}
        )


@dataclass(frozen=True)
class PromptSpec:
    """A prompt (``prompts/list``)."""

    name: str
    description: str | None = None
    arguments: tuple[PromptArgument, ...] = ()
    title: str | None = None

    def to_mcp(self) -> JSON:
        """The MCP ``Prompt`` object."""
        out = _drop_none({"name": self.name, "title": self.title, "description": self.description})
        out["arguments"] = [a.to_mcp() for a in self.arguments]
        return out


@dataclass(frozen=True)
class PluginManifest:
    """A validated ``plugin.json``."""

    name: str
    version: str
    entry: str
    abi: int = ABI_VERSION
    runtime: str = "process"
    description: str = ""
    publisher: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    quotas: Quotas = field(default_factory=Quotas)
    tools: tuple[ToolSpec, ...] = ()
    resources: tuple[ResourceSpec, ...] = ()
    resource_templates: tuple[ResourceTemplateSpec, ...] = ()
    prompts: tuple[PromptSpec, ...] = ()

    def tool(self, name: str) -> ToolSpec | None:
        """The declared tool ``name``, or ``None``."""
        for t in self.tools:
            if t.name == name:
                return t
        return None

    def to_dict(self) -> JSON:
        """The manifest as ``plugin.json`` spells it (:func:`parse_manifest` reads it back)."""
        return {
            "name": self.name,
            "version": self.version,
            "abi": self.abi,
            "runtime": self.runtime,
            "entry": self.entry,
            "description": self.description,
            "publisher": self.publisher,
            "capabilities": {
                "network": self.capabilities.network,
                "filesystem": self.capabilities.filesystem,
            },
            "quotas": {key: getattr(self.quotas, key) for key, *_ in _QUOTAS},
            "tools": [t.to_mcp() for t in self.tools],
            "resources": [r.to_mcp() for r in self.resources],
            "resourceTemplates": [r.to_mcp() for r in self.resource_templates],
            "prompts": [p.to_mcp() for p in self.prompts],
        }


def _resource_listing(key: str, target: str, spec: ResourceSpec | ResourceTemplateSpec) -> JSON:
    """A resource or template as MCP lists it: its address under ``key``, then the rest."""
    return _drop_none(
        {
            key: target,
            "name": spec.name,
            "title": spec.title,
            "description": spec.description,
            "mimeType": spec.mime_type,
        }
    )


def _drop_none(d: JSON) -> JSON:
    return {k: v for k, v in d.items() if v is not None}


def _fail(where: str, problem: str) -> ManifestError:
    return ManifestError(f"plugin.json: {where}: {problem}", data={"field": where})


def _str(d: JSON, key: str, where: str, *, required: bool = True) -> str | None:
    value = d.get(key)
    if value is None:
        if required:
            raise _fail(f"{where}{key}", "is required")
        return None
    if not isinstance(value, str):
        raise _fail(f"{where}{key}", f"must be a string, not {type(value).__name__}")
    return value


def _obj(value: Any, where: str) -> JSON:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, not {type(value).__name__}")
    return value


def _list(d: JSON, key: str) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise _fail(key, f"must be a list, not {type(value).__name__}")
    return value


def schema_validator(schema: JSON) -> jsonschema_rs.Validator:
    """The validator the server checks tool arguments and results with (raises as
    ``jsonschema_rs.validator_for``). The dialect follows "$schema", 2020-12 when absent (as
    MCP specifies); it never fetches a $ref. Its ``pattern`` regexes run on the linear-time
    engine (the regex crate): the default, fancy-regex, backtracks, and a plugin's pattern
    such as ``(a|a)+\\1b`` took ~8 ms an array item, minutes of the event loop for an
    agent's 1 MiB of arguments. So lookaround and backreferences are refused, at install.
    (jsonschema-rs: ~0.5 µs a check where the pure-Python jsonschema took ~28 µs.)"""
    return jsonschema_rs.validator_for(
        schema, offline=True, pattern_options=jsonschema_rs.RegexOptions()
    )


def _schema(value: Any, where: str, *, required: bool) -> JSON | None:
    if value is None:
        if required:
            raise _fail(where, 'is required (a JSON Schema with "type": "object")')
        return None
    schema = _obj(value, where)
    if schema.get("type") != "object":
        raise _fail(where, 'must be an object schema ("type": "object")')
    dialect = schema.get("$schema")
    if dialect is not None and str(dialect).rstrip("#") not in _DIALECTS:
        raise _fail(f"{where}.$schema", f"unknown JSON Schema dialect {shown(str(dialect))}")
    try:
        # Checked against its dialect's meta-schema (2020-12 when "$schema" is absent).
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        path = "/".join(str(p) for p in exc.instance_path)
        raise _fail(where, f"is not a valid JSON Schema ({exc.message} at /{path})") from None
    except jsonschema_rs.ReferencingError as exc:
        raise _fail(where, f"is not a usable JSON Schema ({exc})") from None
    try:
        # What the server will build from it: a valid schema can still fail here (a pattern
        # that is not a regex, a $ref it cannot resolve offline).
        schema_validator(schema)
    except Exception as exc:  # the library raises several types; any is the same refusal
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if message.endswith('is not a "regex"'):
            message += (
                " that mcp0 matches: patterns run in linear time, without lookaround "
                "((?=…), (?!…), (?<=…)) or backreferences (\\1)"
            )
        raise _fail(where, f"is not a usable JSON Schema ({message[:300]})") from None
    return schema


def _tool(raw: Any, i: int) -> ToolSpec:
    where = f"tools[{i}]"
    d = _obj(raw, where)
    _known_keys(d, where, _TOOL_KEYS)
    name = _str(d, "name", f"{where}.") or ""
    if not _MCP_NAME.match(name):
        raise _fail(f"{where}.name", f"{shown(name)} must be 1-128 characters of [A-Za-z0-9_.-]")
    where = f"tools[{name}]"
    description = _str(d, "description", f"{where}.") or ""
    annotations = d.get("annotations")
    if annotations is not None:
        _tool_annotations(_obj(annotations, f"{where}.annotations"), f"{where}.annotations")
    input_schema = _schema(d.get("inputSchema"), f"{where}.inputSchema", required=True) or {}
    try:
        headers = param_headers(input_schema)
    except ValueError as exc:
        raise _fail(f"{where}.inputSchema", str(exc)) from None
    return ToolSpec(
        name=name,
        description=description,
        input_schema=input_schema,
        param_headers=headers,
        output_schema=_schema(d.get("outputSchema"), f"{where}.outputSchema", required=False),
        annotations=annotations,
        title=_str(d, "title", f"{where}.", required=False),
    )


def _tool_annotations(annotations: JSON, where: str) -> None:
    """MCP ``ToolAnnotations``: its keys of the wrong type (``"readOnlyHint": "yes"``) made
    strict clients refuse every ``tools/list`` holding the tool (found by review); other
    keys pass, as MCP's schema lets them."""
    for key, kind in _TOOL_ANNOTATIONS.items():
        if key in annotations and not isinstance(annotations[key], kind):
            must = "a string" if kind is str else "true or false"
            raise _fail(f"{where}.{key}", f"must be {must}, not {type(annotations[key]).__name__}")


_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
_HEADER_TYPES = ("string", "integer", "boolean")
# JSON Schema keywords whose values are schemas (one, a list, a map of them): an
# "x-mcp-header" below one of these is not a fixed place in the arguments.
_SUBSCHEMA = frozenset(
    [
        "items",
        "contains",
        "additionalProperties",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    ]
)
_SUBSCHEMAS = frozenset(("allOf", "anyOf", "oneOf", "prefixItems"))
_SUBSCHEMA_MAPS = frozenset(("patternProperties", "dependentSchemas", "$defs", "definitions"))


def param_headers(schema: JSON) -> tuple[ParamHeader, ...]:
    """The ``x-mcp-header`` marks of an input schema; ValueError for one MCP 2026-07-28 does
    not allow: off a plain chain of ``properties``, not a header token, on a property that is
    not a string, integer or boolean, or the same header twice (case-insensitively)."""
    found: list[ParamHeader] = []
    stack: list[tuple[tuple[str, ...] | None, Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        if "x-mcp-header" in node:
            found.append(_param_header(path, node))
        for keyword, value in node.items():
            if keyword == "properties" and isinstance(value, dict):
                for name, sub in value.items():
                    stack.append(((*path, name) if path is not None else None, sub))
            elif keyword in _SUBSCHEMA:
                stack.append((None, value))
            elif keyword in _SUBSCHEMAS and isinstance(value, list):
                stack.extend((None, sub) for sub in value)
            elif keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
                stack.extend((None, sub) for sub in value.values())
    seen: dict[str, ParamHeader] = {}
    for header in found:
        other = seen.setdefault(header.token.lower(), header)
        if other is not header:
            raise ValueError(
                f'"x-mcp-header": {header.token!r} marks both {".".join(other.path)!r} and '
                f"{'.'.join(header.path)!r}"
            )
    return tuple(sorted(found, key=lambda h: h.path))


def _param_header(path: tuple[str, ...] | None, node: JSON) -> ParamHeader:
    token = node["x-mcp-header"]
    if not path:
        raise ValueError(
            '"x-mcp-header" may mark only a property reached through "properties" alone '
            "(not the root, nor inside items, allOf, $defs…)"
        )
    where = ".".join(path)
    if not isinstance(token, str) or not _HEADER_TOKEN.match(token):
        raise ValueError(f'"x-mcp-header" of {where!r} must be an HTTP header name token')
    if node.get("type") not in _HEADER_TYPES:
        raise ValueError(
            f'"x-mcp-header" of {where!r} needs "type": "string", "integer" or "boolean"'
        )
    return ParamHeader(path, token, node["type"])


def _resource(raw: Any, i: int) -> ResourceSpec:
    where = f"resources[{i}]."
    d = _obj(raw, where[:-1])
    _known_keys(d, where[:-1], _RESOURCE_KEYS)
    uri = _str(d, "uri", where) or ""
    if len(uri) > MAX_URI_LENGTH:
        raise _fail(f"{where}uri", f"is longer than {MAX_URI_LENGTH} characters")
    return ResourceSpec(
        uri=uri,
        name=_str(d, "name", where) or "",
        description=_str(d, "description", where, required=False),
        mime_type=_str(d, "mimeType", where, required=False),
        title=_str(d, "title", where, required=False),
    )


def _template(raw: Any, i: int) -> ResourceTemplateSpec:
    where = f"resourceTemplates[{i}]."
    d = _obj(raw, where[:-1])
    _known_keys(d, where[:-1], _TEMPLATE_KEYS)
    uri_template = _str(d, "uriTemplate", where) or ""
    problem = _template_problem(uri_template)
    if len(uri_template) > MAX_URI_LENGTH:
        problem = f"is longer than {MAX_URI_LENGTH} characters"
    if problem is not None:
        raise _fail(f"{where}uriTemplate", f"{shown(uri_template)} {problem}")
    return ResourceTemplateSpec(
        uri_template=uri_template,
        name=_str(d, "name", where) or "",
        description=_str(d, "description", where, required=False),
        mime_type=_str(d, "mimeType", where, required=False),
        title=_str(d, "title", where, required=False),
    )


def _template_problem(template: str) -> str | None:
    """What keeps ``template`` from being a template the worker can serve, or None."""
    names = [m.group(2) for m in _TEMPLATE_VAR.finditer(template)]
    if any(c in "{}" for c in _TEMPLATE_VAR.sub("", template)):
        return (
            "is not a URI template MCP-ZERO serves: only {var} and {+var} "
            "(letters, digits, _) may stand in braces"
        )
    if len(set(names)) != len(names):
        return "names a variable twice"
    return None


def _prompt(raw: Any, i: int) -> PromptSpec:
    where = f"prompts[{i}]"
    d = _obj(raw, where)
    _known_keys(d, where, _PROMPT_KEYS)
    name = _str(d, "name", f"{where}.") or ""
    if not _MCP_NAME.match(name):
        raise _fail(f"{where}.name", f"{shown(name)} must be 1-128 characters of [A-Za-z0-9_.-]")
    args: list[PromptArgument] = []
    for j, a in enumerate(_list(d, "arguments")):
        aw = f"prompts[{name}].arguments[{j}]."
        ad = _obj(a, aw[:-1])
        _known_keys(ad, aw[:-1], _ARGUMENT_KEYS)
        required = ad.get("required", False)
        if not isinstance(required, bool):
            raise _fail(f"{aw}required", "must be true or false")
        args.append(
            PromptArgument(
                name=_str(ad, "name", aw) or "",
                description=_str(ad, "description", aw, required=False),
                required=required,
            )
        )
    _unique([a.name for a in args], f"prompts[{name}].arguments", "argument")
    return PromptSpec(
        name=name,
        description=_str(d, "description", f"{where}.", required=False),
        arguments=tuple(args),
        title=_str(d, "title", f"{where}.", required=False),
    )


def _unique(names: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise _fail(where, f"duplicate {what} {shown(n)}")
        seen.add(n)


def _unique_uris(uris: list[str], where: str, what: str) -> None:
    """As _unique, of URIs (or templates) compared in normal form (normal_uri), as reads are
    looked up: ``mem://%61bc`` is ``mem://abc`` again."""
    seen: dict[str, str] = {}
    for uri in uris:
        normal = normal_uri(uri)
        first = seen.get(normal)
        if first is not None:
            again = "" if first == uri else f" (it is {shown(first)}, escaped otherwise)"
            raise _fail(where, f"duplicate {what} {shown(uri)}{again}")
        seen[normal] = uri


def _known_keys(d: JSON, where: str, known: tuple[str, ...]) -> None:
    """Refuse keys of ``d`` not in ``known`` (a typo would silently mean a default);
    ``where`` "" is the manifest itself."""
    unknown = sorted(set(d) - set(known))
    if not unknown:
        return
    keys = "key" if len(unknown) == 1 else "keys"
    if not where:
        raise _fail(", ".join(unknown), f"unknown {keys}; a manifest has {', '.join(known)}")
    raise _fail(
        where, f"unknown {keys} {', '.join(map(shown, unknown))} (known: {', '.join(known)})"
    )


def _capabilities(raw: Any) -> Capabilities:
    d = _obj(raw if raw is not None else {}, "capabilities")
    _known_keys(d, "capabilities", _CAPABILITY_KEYS)
    network = d.get("network", False)
    if not isinstance(network, bool):
        raise _fail("capabilities.network", "must be true or false")
    fs = d.get("filesystem", "private")
    if not isinstance(fs, str) or fs not in FILESYSTEM_MODES:
        raise _fail("capabilities.filesystem", f"must be one of {sorted(FILESYSTEM_MODES)}")
    return Capabilities(network=network, filesystem=fs)


def _quotas(raw: Any) -> Quotas:
    d = _obj(raw if raw is not None else {}, "quotas")
    _known_keys(d, "quotas", tuple(k for k, *_ in _QUOTAS))
    values: dict[str, int] = {}
    for key, default, low, high in _QUOTAS:
        v = d.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _fail(f"quotas.{key}", f"must be an integer from {low} to {high}")
        values[key] = v
    return Quotas(**values)


def _check_module_name(top: str) -> None:
    """Refuse an entry module named like a module of the standard library or of the worker:
    the worker imports many of those before the plugin (``json`` among them), and then
    ``import`` finds its module instead of the plugin's; one it has not imported yet the
    plugin's would hide, from the plugin and from the worker alike."""
    if top in sys.stdlib_module_names:
        clash = "a module of Python's standard library"
    elif top in _WORKER_MODULES:
        clash = "a module the plugin worker itself imports"
    elif top in _started_with():
        clash = "a module the plugin worker's Python imports as it starts"
    else:
        return
    raise _fail(
        "entry",
        f"module {top!r} has the name of {clash}: in the worker one would hide the other; "
        f"rename the plugin's module (e.g. to plugin_{top.strip('_')}.py) and its entry",
    )


@functools.cache
def _started_with() -> frozenset[str]:
    """The top-level modules the worker's Python has imported before any of its code runs:
    those the ``.pth`` files of its site-packages import (setuptools' ``_distutils_hack``,
    editable installs' finders…), which differ between installs; asked of a Python started
    as the worker is (found by review: ``_distutils_hack`` was installed, then never loaded).
    """
    try:
        started = subprocess.run(
            [sys.executable, "-P", "-s", "-c", "import sys; print(*sys.modules)"],
            capture_output=True,
            text=True,
            env={"LC_ALL": "C.UTF-8"},  # (the worker's environment has none of the server's)
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):  # the worker refuses them as it loads
        return frozenset()
    return frozenset(name.partition(".")[0] for name in started.stdout.split())


def _check_values(manifest: JSON) -> None:
    """Refuse what the server could not write back out as JSON: arrays and objects nested
    deeper than MAX_MANIFEST_DEPTH, NaN and Infinity, integers past 64 bits."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), manifest)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict | list):
            if len(path) >= MAX_MANIFEST_DEPTH:
                raise _fail(
                    _path(path[:4]) + "…",
                    f"nests deeper than {MAX_MANIFEST_DEPTH} levels of arrays and objects "
                    f"(plugin.json may nest at most {MAX_MANIFEST_DEPTH})",
                )
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(((*path, key), value) for key, value in items)
        elif isinstance(node, float) and not math.isfinite(node):
            number = "NaN" if math.isnan(node) else ("Infinity" if node > 0 else "-Infinity")
            raise _fail(_path(path), f"{number} is not a JSON number (JSON has no NaN or Infinity)")
        elif isinstance(node, int) and not _INT_RANGE[0] <= node <= _INT_RANGE[1]:
            raise _fail(_path(path), "is an integer past 64 bits, which JSON tools cannot read")


def _path(path: tuple[str | int, ...]) -> str:
    """``tools[0].annotations.title`` for ("tools", 0, "annotations", "title")."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_manifest(raw: Any) -> PluginManifest:
    """Validate a decoded ``plugin.json``; raises :class:`ManifestError` naming the field."""
    d = _obj(raw, "manifest")
    _check_values(d)
    _known_keys(d, "", _TOP_LEVEL_KEYS)
    name = _str(d, "name", "") or ""
    if not _PLUGIN_NAME.match(name):
        raise _fail("name", f"{shown(name)} must be 1-64 of [a-z0-9_-], starting with a letter")
    version = _str(d, "version", "") or ""
    if not _VERSION.match(version):
        raise _fail("version", f"{shown(version)} is not a version (e.g. 1.2.0)")
    abi = d.get("abi")
    if isinstance(abi, bool) or not isinstance(abi, int) or abi != ABI_VERSION:
        raise _fail(
            "abi",
            f"must be {ABI_VERSION}, an integer (this MCP-ZERO speaks plugin ABI {ABI_VERSION})",
        )
    runtime = d.get("runtime", "process")
    if not isinstance(runtime, str):
        raise _fail("runtime", f"must be a string, not {type(runtime).__name__}")
    if runtime not in RUNTIMES:
        raise _fail(
            "runtime", f"{shown(runtime)} is not a known runtime ({', '.join(sorted(RUNTIMES))})"
        )
    entry = _str(d, "entry", "") or ""
    if not _ENTRY.match(entry):
        raise _fail(
            "entry", f"{shown(entry)} must be 'module:attribute' (e.g. notes_plugin:plugin)"
        )
    tools = tuple(_tool(t, i) for i, t in enumerate(_list(d, "tools")))
    _unique([t.name for t in tools], "tools", "tool name")
    resources = tuple(_resource(r, i) for i, r in enumerate(_list(d, "resources")))
    _unique_uris([r.uri for r in resources], "resources", "resource uri")
    templates = tuple(_template(r, i) for i, r in enumerate(_list(d, "resourceTemplates")))
    _unique_uris([t.uri_template for t in templates], "resourceTemplates", "uriTemplate")
    prompts = tuple(_prompt(p, i) for i, p in enumerate(_list(d, "prompts")))
    _unique([p.name for p in prompts], "prompts", "prompt name")
    return PluginManifest(
        name=name,
        version=version,
        abi=ABI_VERSION,
        runtime=runtime,
        entry=entry,
        description=_str(d, "description", "", required=False) or "",
        publisher=_str(d, "publisher", "", required=False) or "",
        capabilities=_capabilities(d.get("capabilities")),
        quotas=_quotas(d.get("quotas")),
        tools=tools,
        resources=resources,
        resource_templates=templates,
        prompts=prompts,
    )


class _KeyTwice(ValueError):
    """A JSON object of the manifest names a key twice."""


def _once_each(pairs: list[tuple[str, Any]]) -> JSON:
    obj: JSON = {}
    for key, value in pairs:
        if key in obj:
            raise _KeyTwice(key)
        obj[key] = value
    return obj


def load_manifest(plugin_dir: str | Path) -> PluginManifest:
    """Read and validate ``plugin_dir/plugin.json`` and check its entry module exists and
    is not named like a module of the standard library or of the worker.

    Raises :class:`ManifestError` when the file is missing, not JSON, or invalid.
    """
    path = Path(plugin_dir) / MANIFEST_FILE
    try:
        raw = json.loads(_read_regular(path).decode("utf-8"), object_pairs_hook=_once_each)
    except FileNotFoundError:
        raise ManifestError(f"{path}: no plugin.json in the plugin directory") from None
    except _KeyTwice as exc:
        raise ManifestError(
            f"{path}: key {shown(exc.args[0])} appears twice in one object (JSON would keep the "
            "last, silently): keep the one you mean"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read plugin.json ({exc})") from None
    except RecursionError:
        raise ManifestError(
            f"{path}: nests deeper than {MAX_MANIFEST_DEPTH} levels of arrays and objects "
            f"(plugin.json may nest at most {MAX_MANIFEST_DEPTH})"
        ) from None
    manifest = parse_manifest(raw)
    _check_module_name(manifest.entry.partition(":")[0].partition(".")[0])
    module = manifest.entry.partition(":")[0].replace(".", "/")
    base = Path(plugin_dir)
    if not ((base / f"{module}.py").is_file() or (base / module / "__init__.py").is_file()):
        for candidate in (base / f"{module}.py", base / module / "__init__.py"):
            kind = _not_regular(candidate)
            if kind is not None:
                raise _fail("entry", f"module file {candidate} is {kind}, not a regular file")
        raise _fail("entry", f"module file {module}.py not found in {base}")
    return manifest


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, refused (ManifestError) unless it is a regular file (a named
    pipe in its place cannot hang the reader). Raises OSError."""
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES)
    except NotRegularFile as exc:
        raise ManifestError(
            f"{path}: {exc.kind}, not a regular file; plugin.json must be a file of JSON"
        ) from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{path}: over {MAX_MANIFEST_BYTES >> 20} MiB, more than plugin.json may be (it is "
            "read again at every refresh of every server, and listed to every client)"
        )
    return data


def _not_regular(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file (nor a link to one)."""
    try:
        return file_kind(path.stat().st_mode)
    except OSError:
        return None


__all__ = [
    "ABI_VERSION",
    "MAX_MANIFEST_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_URI_LENGTH",
    "Capabilities",
    "PluginManifest",
    "PromptArgument",
    "PromptSpec",
    "Quotas",
    "ResourceSpec",
    "ResourceTemplateSpec",
    "ToolSpec",
    "load_manifest",
    "parse_manifest",
    "schema_validator",
]
