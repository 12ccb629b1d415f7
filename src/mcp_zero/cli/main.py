"""``mcp0``: serve, and manage agents, plugins, policies and the audit log of a data dir.

Every command takes ``--config``, ``--data-dir`` and ``--json`` (stable output shapes for
scripts: see docs/cli.md), after its name or before it. Errors print one line to stderr
and exit with status 1; usage errors print the usage line before it and exit with
status 2.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from mcp_zero import __version__
from mcp_zero.errors import ConfigError, McpZeroError

F = TypeVar("F", bound=Callable[..., Any])


class _PathGiven(click.Path):
    """A path option that refuses an empty value (``Path("")`` is the current directory),
    as the setting does from mcp0.toml or the environment."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("it is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


class _Text(click.types.StringParamType):
    """A name or other text given on the command line. Bytes that are not UTF-8 reach Python
    as lone surrogates, which no name, policy or audit record can hold: refused as a usage
    error before the command does anything."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = super().convert(value, param, ctx)
        try:
            text.encode()
        except UnicodeEncodeError:
            self.fail("it is not text: its bytes are not UTF-8", param, ctx)
        return text


_TEXT = _Text()
AUDIT_LIST_PAGE = 10_000  # records `mcp0 audit list` reads (and holds) at a time


def _environ_text(name: str) -> str | None:
    """The environment variable ``name``, refused (a usage error) if it is not text."""
    value = os.environ.get(name)
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise click.UsageError(f"{name} is not text: its bytes are not UTF-8") from None
    return value


class _WholeNumber(click.IntRange):
    """A whole number within a range, in decimal digits only: int() also takes "1_0", " 40"
    and other scripts' digits, and click's own error calls it "a valid integer range"."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            self.fail(f"{value!r} is not a whole number in the digits 0-9", param, ctx)
        return super().convert(value, param, ctx)


def _common(fn: F) -> F:
    """``--config``, ``--data-dir`` and ``--json``, which every command takes, before its
    name (``mcp0 --data-dir X plugin list``) or after it; given in both places, the value
    after it is used."""
    fn = click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_or_before,
        help="Print machine-readable JSON.",
    )(fn)
    fn = click.option(
        "--data-dir",
        type=_PathGiven(path_type=Path),
        default=None,
        callback=_or_before,
        help="Data directory (default ./.mcp0, or $MCP0_DATA_DIR).",
    )(fn)
    fn = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, exists=True),
        default=None,
        callback=_or_before,
        help="Settings file (mcp0.toml).",
    )(fn)
    return fn


def _or_before(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A common option's value, or, when the command was not given it, the one given
    before the command's name (README and docs/cli.md say every command takes them: found
    by review)."""
    if value is None or value is False:
        return ctx.find_root().params.get(param.name or "", value)
    return value


# What a terminal acts on rather than shows: C0 and C1 control characters, DEL, the Unicode
# line and paragraph separators and the bidirectional controls. The text outputs show
# strings that agents and plugins chose (a tool name, a description, a tool's output) with
# them escaped (\x1b, \u2028): else one could forge, hide or reorder a line on the
# operator's terminal (found by review). --json escapes them as JSON does.
_SEPARATORS_AND_BIDI = r"\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_IN_A_FIELD = re.compile(rf"[\x00-\x1f\x7f-\x9f{_SEPARATORS_AND_BIDI}]")
_IN_TEXT = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_SEPARATORS_AND_BIDI}]")  # lines kept


def _escaped(value: Any, unsafe: re.Pattern[str] = _IN_A_FIELD) -> str:
    """``value`` as text to print, what a terminal would act on escaped (``unsafe``: in a
    field of a line, every control character; ``_IN_TEXT``: all but newline and tab)."""
    return unsafe.sub(_escape, str(value))


def _escape(match: re.Match[str]) -> str:
    found = match.group()
    return "\\x20" if found == " " else found.encode("unicode_escape").decode("ascii")


# In a field of an audit record's line, also every space and every character that shows as
# none (zero-width, format, other spaces): a resource padded to wrap the line had its tail
# show as a record of its own on the operator's terminal (found by review); a record line's
# fields are separated by spaces, which a field then cannot hold.
_IN_AN_AUDIT_FIELD = re.compile(
    rf"[\x00-\x20\x7f-\xa0\xad{_SEPARATORS_AND_BIDI}\u1680\u180e\u2000-\u200f\u202f"
    r"\u205f-\u206f\u3000\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]"
)


# A run of blank characters (spaces, and those that show as none) in a line's free text:
# shown as one space. A plugin's description padded to wrap the line had its tail show as
# a line of its own (a plugin listed that is not installed; found by review).
_BLANKS = re.compile(r"[ \t\u00a0\u1680\u2000-\u200d\u202f\u205f\u2060\u3000\ufeff]{2,}")


def _described(text: str) -> str:
    """A description, one of a listing's lines: escaped, each run of blanks one space."""
    return _escaped(_BLANKS.sub(" ", text))


def _fail(message: str) -> None:
    # (one line, though it may quote a plugin's error)
    click.echo(f"mcp0: error: {_escaped(message)}", err=True)
    sys.exit(1)


def _errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except McpZeroError as exc:
            _fail(exc.message)
        except BrokenPipeError:
            # what reads the output stopped (``| head``): the command is done, quietly, as
            # a program that SIGPIPE ends (Python ignores it); the exit's flush of what is
            # still buffered would fail again, so stdout goes nowhere from now on
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except ModuleNotFoundError as exc:
            _fail(f"{exc}: install the server side with: pip install 'mcp-zero[server]'")
        except OSError as exc:  # a file of the data dir the command could not use
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")

    return wrapper  # type: ignore[return-value]


def _out(as_json: bool, value: Any, text: str) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True) if as_json else text)


def _settings(config_file: Path | None, data_dir: Path | None, **overrides: Any) -> Any:
    from mcp_zero.config import load_settings, stray_variables

    settings = load_settings(config_file, {"data_dir": data_dir, **overrides})
    for warning in stray_variables():
        click.echo(f"mcp0: warning: {warning}", err=True)
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        # (else "cannot read afile/plugins: Not a directory", as if a data dir were broken)
        raise ConfigError(
            f"the data dir {os.path.abspath(settings.data_dir)} is a file, not a directory: "
            "check --data-dir (a new data dir is made where there is nothing)"
        )
    return settings


def _existing(settings: Any, *, stdio: bool = False) -> Any:
    """``settings``, if their data dir has been set up: a command that reads or changes what is
    there must not lay out a new one (with new keys) at a mistyped path and report it empty.
    ``stdio``: for a session an MCP client started, in a working directory of its choosing."""
    from mcp_zero.storage.sqlite import holds_no_store

    if holds_no_store(settings.db_path):
        # a lost store is refused as such, not taken for one to set up (the runtime's
        # check: imported only here, the runtime is slow to import for a reading command)
        from mcp_zero.runtime import check_store_not_lost

        check_store_not_lost(settings)
    if not settings.db_path.exists():
        # the path it looked at, absolute: a relative one does not say from where
        looked = os.path.abspath(settings.data_dir)
        if stdio and not settings.data_dir.is_absolute():
            hint = (
                "a relative data dir is looked for in the working directory that the MCP "
                f"client started 'mcp0 serve --stdio' in (here {os.getcwd()}): give "
                "--data-dir as an absolute path"
            )
        else:
            hint = (
                "check --data-dir, or create one with 'mcp0 serve', 'mcp0 agent create' or "
                "'mcp0 plugin install'"
            )
        raise ConfigError(f"no MCP-ZERO data dir at {looked} (no {settings.db_path.name}): {hint}")
    return settings


@contextmanager
def _store(config_file: Path | None, data_dir: Path | None) -> Iterator[Any]:
    """The data dir's store alone, read-only, for commands that only read: they work while
    a policy file is broken (a Runtime would refuse to load), which is when one wants to
    look, and on a data dir they may not write; they create and migrate nothing."""
    from mcp_zero.storage.sqlite import SqliteStore

    db_path = _existing(_settings(config_file, data_dir)).db_path
    with SqliteStore(db_path, read_only=True) as store:
        yield store


@contextmanager
def _runtime(
    config_file: Path | None, data_dir: Path | None, *, create: bool = False
) -> Iterator[Any]:
    """The runtime on the data dir; only ``create`` commands may lay out a new one (and one
    that fails leaves none behind: a full disk, a mistyped --data-dir)."""
    from mcp_zero.cli.serve import runtime_on

    settings = _settings(config_file, data_dir)
    with runtime_on(settings if create else _existing(settings), create=create) as runtime:
        # before the command decides anything under them
        ctx = click.get_current_context(silent=True)
        runtime.record_what_governs(by=ctx.command_path if ctx is not None else "mcp0")
        yield runtime
        if runtime.created:
            # laid out by this command, not by `mcp0 serve`: a later serve installs no
            # examples (marked before a serve waiting for the new data dir is let in)
            runtime.store.finish_first_start()
    runtime.close()


class _UsageError(click.UsageError):
    """A usage error shown as docs/cli.md says errors are: the command's usage line, where
    help is, then one ``mcp0: error: …`` line; exit status 2."""

    def __init__(self, cause: click.UsageError) -> None:
        message = cause.format_message()
        if message[1:2].islower():  # click's "Missing argument": ours start in lower case
            message = message[0].lower() + message[1:]
        super().__init__(message, cause.ctx)

    def show(self, file: IO[Any] | None = None) -> None:
        if self.ctx is not None:
            click.echo(self.ctx.get_usage(), file=file, err=True)
            click.echo(f"Try '{self.ctx.command_path} --help' for help.", file=file, err=True)
        click.echo(f"mcp0: error: {self.message}", file=file, err=True)


@contextmanager
def _documented_usage_errors() -> Iterator[None]:
    try:
        yield
    except (click.exceptions.NoArgsIsHelpError, _UsageError):
        raise  # a group given no command shows its help; one converted already
    except click.UsageError as exc:
        raise _UsageError(exc) from None


class _Main(click.Group):
    """The ``mcp0`` group: click's usage errors (an unknown option, a missing argument, a
    bad value) of every command below it, printed the documented way."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _documented_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _documented_usage_errors():
            return super().invoke(ctx)


@click.group(cls=_Main)
@click.version_option(__version__, prog_name="mcp0")
@_common
def main(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """MCP-ZERO: a governed, verifiable runtime for AI agents and their MCP tools."""


# -- serve ------------------------------------------------------------------------------------


@main.command()
@_common
@click.option("--host", type=_TEXT, default=None, help="Address to listen on (default 127.0.0.1).")
@click.option(
    "--port", type=_WholeNumber(min=0, max=65535), default=None, help="Port (default 8390)."
)
@click.option("--stdio", is_flag=True, help="Speak MCP on stdin/stdout instead of HTTP.")
@click.option(
    "--agent", type=_TEXT, default=None, help="With --stdio: the agent the session runs as."
)
@click.option(
    "--anonymous-agent",
    type=_TEXT,
    default=None,
    help="Let requests without a token act as this agent (loopback only; audited as anonymous).",
)
@click.option("--no-examples", is_flag=True, help="Do not install the example plugin.")
@click.option("--tls-cert", type=_PathGiven(path_type=Path), help="Serve HTTPS: PEM certificate.")
@click.option("--tls-key", type=_PathGiven(path_type=Path), help="With --tls-cert: its key.")
@_errors
def serve(
    config_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
    host: str | None,
    port: int | None,
    stdio: bool,
    agent: str | None,
    anonymous_agent: str | None,
    no_examples: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run the server: MCP at /mcp (or on stdio), admin API at /api/v1."""
    from mcp_zero.cli.serve import STDIO_NEEDS_AN_AGENT, run_http, run_stdio

    # An option of the other mode was ignored: a client's config that forgot --stdio got an
    # HTTP server, whose "listening" line on stdout it could not read (found by review).
    if stdio:
        http_only = {
            "--host": host,
            "--port": port,
            "--anonymous-agent": anonymous_agent,
            "--no-examples": no_examples or None,
            "--tls-cert": tls_cert,
            "--tls-key": tls_key,
        }
        given = next((option for option, value in http_only.items() if value is not None), None)
        if given is not None:
            raise click.UsageError(
                f"{given} is for an HTTP server; a stdio session (--stdio) has no use for it: "
                "drop it"
            )
        agent = agent or _environ_text("MCP0_AGENT")
        if not agent and not _environ_text("MCP0_TOKEN"):
            raise click.UsageError(STDIO_NEEDS_AN_AGENT)
    elif agent is not None:
        raise click.UsageError(
            "--agent names the agent of a stdio session: add --stdio (an HTTP server's "
            "clients send their agents' tokens)"
        )
    settings = _settings(
        config_file,
        data_dir,
        host=host,
        port=port,
        anonymous_agent=anonymous_agent,
        examples=False if no_examples else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    if stdio:
        # its agent must exist already: a mistyped --data-dir must not lay out a new, empty one
        run_stdio(_existing(settings, stdio=True), agent, _environ_text("MCP0_TOKEN"))
    else:
        run_http(settings, as_json=as_json)


# -- agents -----------------------------------------------------------------------------------


@main.group()
def agent() -> None:
    """Create, inspect and terminate agents, and rotate their tokens."""


def _agent_view(record: Any) -> dict[str, Any]:
    from mcp_zero.kernel.agents import agent_view

    return agent_view(record)


def _issued_view(issued: Any) -> dict[str, Any]:
    from mcp_zero.kernel.agents import issued_view

    return issued_view(issued)


@agent.command("create")
@_common
@click.argument("name", type=_TEXT)
@click.option(
    "--plugin", "plugins", type=_TEXT, multiple=True, help="Attach this plugin (repeatable)."
)
@_errors
def agent_create(
    config_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
    name: str,
    plugins: tuple[str, ...],
) -> None:
    """Create agent NAME and print its bearer token (shown only this once)."""
    from mcp_zero.errors import InvalidParams
    from mcp_zero.kernel.agents import check_new_name

    try:
        check_new_name(name)  # a bad value: refused before a data dir is laid out
    except InvalidParams as exc:
        raise click.UsageError(exc.message) from None
    with _runtime(config_file, data_dir, create=True) as rt:
        spawned = asyncio.run(rt.agents.spawn(name, list(plugins), via="cli"))
    _out(
        as_json,
        _issued_view(spawned),
        f"agent {name} created; its token (shown once):\n{spawned.token}",
    )


@agent.command("list")
@_common
@click.option("--after", type=_TEXT, default="", help="The agents named after this one (by name).")
@click.option(
    "--limit",
    type=_WholeNumber(min=1, max=(1 << 63) - 1),
    default=None,
    help="At most this many agents (default: all).",
)
@_errors
def agent_list(
    config_file: Path | None, data_dir: Path | None, as_json: bool, after: str, limit: int | None
) -> None:
    """List agents, by name."""
    with _store(config_file, data_dir) as store:
        views = [_agent_view(a) for a in store.list_agents(after, limit)]
    lines = [
        f"{_escaped(v['name']):24} {_escaped(v['status']):11} "
        f"{_escaped(','.join(v['plugins'])) or '-'}"
        for v in views
    ]
    _out(as_json, views, "\n".join(lines) or "no agents")


@agent.command("show")
@_common
@click.argument("name", type=_TEXT)
@_errors
def agent_show(config_file: Path | None, data_dir: Path | None, as_json: bool, name: str) -> None:
    """Show one agent."""
    from mcp_zero.kernel.agents import require_agent

    with _store(config_file, data_dir) as store:
        view = _agent_view(require_agent(store, name))
    # its plugins and state as JSON (Python's repr of them was no format: found by review)
    lines = [
        f"{k}: {_escaped(v) if isinstance(v, str) else json.dumps(v)}" for k, v in view.items()
    ]
    _out(as_json, view, "\n".join(lines))


@agent.command("attach")
@_common
@click.argument("name", type=_TEXT)
@click.argument("plugin", type=_TEXT)
@_errors
def agent_attach(
    config_file: Path | None, data_dir: Path | None, as_json: bool, name: str, plugin: str
) -> None:
    """Attach PLUGIN to agent NAME."""
    with _runtime(config_file, data_dir) as rt:
        view = _agent_view(asyncio.run(rt.agents.attach(name, plugin, via="cli")))
    _out(as_json, view, f"attached {plugin} to {name}")


@agent.command("terminate")
@_common
@click.argument("name", type=_TEXT)
@_errors
def agent_terminate(
    config_file: Path | None, data_dir: Path | None, as_json: bool, name: str
) -> None:
    """Terminate agent NAME: its token stops working."""
    with _runtime(config_file, data_dir) as rt:
        view = _agent_view(asyncio.run(rt.agents.terminate(name, via="cli")))
    _out(as_json, view, f"agent {name} terminated")


@agent.command("rotate-token")
@_common
@click.argument("name", type=_TEXT)
@_errors
def agent_rotate_token(
    config_file: Path | None, data_dir: Path | None, as_json: bool, name: str
) -> None:
    """Give agent NAME a new bearer token (shown only this once); the old one stops working
    (a running server takes that up within 2 seconds)."""
    with _runtime(config_file, data_dir) as rt:
        rotated = asyncio.run(rt.agents.rotate_token(name, via="cli"))
    _out(
        as_json,
        _issued_view(rotated),
        f"agent {name} has a new token (shown once); the old one no longer works:\n{rotated.token}",
    )


@agent.command("snapshot")
@_common
@click.argument("name", type=_TEXT)
@_errors
def agent_snapshot(
    config_file: Path | None, data_dir: Path | None, as_json: bool, name: str
) -> None:
    """Persist agent NAME's attachments and state; prints the snapshot id."""
    with _runtime(config_file, data_dir) as rt:
        snap = asyncio.run(rt.agents.snapshot(name, via="cli"))
    _out(as_json, {"snapshot_id": snap.id, "agent": snap.agent, "data": snap.data}, snap.id)


@agent.command("recover")
@_common
@click.argument("snapshot_id", type=_TEXT)
@_errors
def agent_recover(
    config_file: Path | None, data_dir: Path | None, as_json: bool, snapshot_id: str
) -> None:
    """Restore an agent from SNAPSHOT_ID (a plugin replaced since is not attached again)."""
    from mcp_zero.kernel.agents import recovery_view

    with _runtime(config_file, data_dir) as rt:
        view = recovery_view(asyncio.run(rt.agents.recover(snapshot_id, via="cli")))
    lines = [f"agent {_escaped(view['name'])} recovered from {_escaped(snapshot_id)}"]
    lines += [
        f"not attached again: {_escaped(n['plugin'])}: {_escaped(n['reason'])}"
        for n in view["not_restored"]
    ]
    _out(as_json, view, "\n".join(lines))


@agent.command("exec")
@_common
@click.argument("name", type=_TEXT)
@click.argument("tool", type=_TEXT)
@click.argument("arguments", type=_TEXT, default="{}")
@_errors
def agent_exec(
    config_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
    name: str,
    tool: str,
    arguments: str,
) -> None:
    """Call TOOL as agent NAME with ARGUMENTS (a JSON object), through the governed path."""
    from mcp_zero.cli.serve import execute_once
    from mcp_zero.kernel.pipeline import MAX_ARGUMENT_DEPTH

    too_deep = f"ARGUMENTS nest deeper than {MAX_ARGUMENT_DEPTH} levels, more than a tool takes"
    try:
        args = json.loads(arguments, parse_constant=_not_json)
    except (json.JSONDecodeError, ValueError) as exc:
        raise click.BadParameter(f"ARGUMENTS is not JSON: {exc}") from None
    except RecursionError:  # past Python's own limit (~1,000 levels)
        raise click.BadParameter(too_deep) from None
    if not isinstance(args, dict):
        raise click.BadParameter("ARGUMENTS must be a JSON object")
    if _depth(args) > MAX_ARGUMENT_DEPTH:
        raise click.BadParameter(too_deep)
    settings = _existing(_settings(config_file, data_dir))
    result = execute_once(settings, name, tool, args)
    texts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
    _out(as_json, result, _escaped("\n".join(texts), _IN_TEXT))
    if result.get("isError"):
        sys.exit(1)


# -- plugins ----------------------------------------------------------------------------------


@main.group()
def plugin() -> None:
    """Install, inspect and remove plugins."""


_PLUGIN_DIR = click.Path(path_type=Path, exists=True, file_okay=False)


@plugin.command("install")
@_common
# (not required of click: see "--adopt-data PATH" below)
@click.argument("path", type=_PLUGIN_DIR, required=False, metavar="PATH")
@click.option("--replace", is_flag=True, help="Replace an installed plugin of the same name.")
@click.option(
    "--adopt-data",
    type=_TEXT,
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[DIR]",
    help="Give it data a removed plugin of the same name left in plugin-data/ (installing "
    "that plugin again): the set-aside DIR 'mcp0 plugin removed-data' lists, or without "
    "DIR the one there is.",
)
@_errors
def plugin_install(
    config_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
    path: Path | None,
    replace: bool,
    adopt_data: str | None,
) -> None:
    """Install the plugin in directory PATH (it holds plugin.json)."""
    if path is None:
        if not adopt_data:
            raise click.UsageError("missing argument 'PATH'", click.get_current_context())
        # "--adopt-data PATH": click took the plugin's directory for the option's DIR
        path = _PLUGIN_DIR.convert(adopt_data, None, click.get_current_context())
        adopt_data = ""
    adopt = False if adopt_data is None else adopt_data or True
    with _runtime(config_file, data_dir, create=True) as rt:
        installed = rt.install_plugin(path, replace=replace, adopt_data=adopt)
    manifest, adopted = installed.manifest, installed.adopted_data
    view = {
        "name": manifest.name,
        "version": manifest.version,
        "tools": [t.name for t in manifest.tools],
        "adopted_data": adopted,
    }
    n = len(manifest.tools)
    text = f"installed {manifest.name} {manifest.version} ({n} tool{'' if n == 1 else 's'})"
    if adopted is not None:  # (which one a bare --adopt-data chose: found by a docs review)
        text += f"; it adopted the data in plugin-data/{adopted}"
    elif adopt:
        text += "; there was no data set aside to adopt"
    _out(as_json, view, _escaped(text))


@plugin.command("list")
@_common
@_errors
def plugin_list(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """List installed plugins."""
    from mcp_zero.rpc.admin import plugin_view

    with _store(config_file, data_dir) as store:
        views = [plugin_view(r.manifest, tools=False) for r in store.list_plugins()]
    lines = [
        f"{_escaped(v['name']):24} {_escaped(v['version']):10} {_described(v['description'])}"
        for v in views
    ]
    _out(as_json, views, "\n".join(lines) or "no plugins")


@plugin.command("show")
@_common
@click.argument("name", type=_TEXT)
@_errors
def plugin_show(config_file: Path | None, data_dir: Path | None, as_json: bool, name: str) -> None:
    """Show plugin NAME with its tools."""
    from mcp_zero.errors import PluginNotFound
    from mcp_zero.rpc.admin import plugin_view

    with _store(config_file, data_dir) as store:
        record = store.get_plugin(name)
    if record is None:
        raise PluginNotFound(f"no plugin named {name!r} is installed")
    view = plugin_view(record.manifest, tools=True)
    head = f"{view['name']} {view['version']} ({view['runtime']})"
    lines = [_escaped(head), _described(view["description"]), ""]
    lines += [
        f"  {_escaped(t['name'])}: {_described(t.get('description', ''))}" for t in view["tools"]
    ]
    _out(as_json, view, "\n".join(lines))


@plugin.command("remove")
@_common
@click.argument("name", type=_TEXT)
@_errors
def plugin_remove(
    config_file: Path | None, data_dir: Path | None, as_json: bool, name: str
) -> None:
    """Remove plugin NAME and detach it from every agent. Its data is set aside in
    plugin-data/, for a later install of it with --adopt-data (a new plugin of the name is not
    given it)."""
    with _runtime(config_file, data_dir) as rt:
        removal = rt.remove_plugin(name)
    detached, kept = removal.detached, removal.data_kept
    text = f"removed {name}" + (f" (detached from {', '.join(detached)})" if detached else "")
    if kept is not None:
        text += (
            f"; its data is set aside in {kept}: a plugin installed later under this name gets it "
            f"only with 'mcp0 plugin install PATH --adopt-data {kept.name}' ('mcp0 plugin "
            "purge-data' deletes it)"
        )
    view = {"name": name, "removed": True, "detached_from": detached}
    _out(as_json, {**view, "data_kept": None if kept is None else str(kept)}, _escaped(text))


@plugin.command("removed-data")
@_common
@_errors
def plugin_removed_data(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """List the data dirs removed plugins left, set aside in plugin-data/."""
    from mcp_zero.kernel.plugin_data import finish_purges, set_aside

    settings = _existing(_settings(config_file, data_dir))
    # as a runtime does as it opens, unless only allowed to read (a listing: found by review)
    if os.access(settings.plugin_data_dir, os.W_OK):
        with _store(config_file, data_dir) as store:
            finish_purges(settings.plugin_data_dir, store)
    found = set_aside(settings.plugin_data_dir)
    lines = [
        f"{_escaped(a.dir):48} {a.removed_at:%Y-%m-%d %H:%M:%S}Z {_size(a.bytes):>10}"
        for a in found
    ]
    _out(as_json, [a.to_json() for a in found], "\n".join(lines) or "no data set aside")


@plugin.command("purge-data")
@_common
@click.argument("dirs", nargs=-1, type=_TEXT, metavar="[DIR]...")
@click.option(
    "--older-than",
    type=_WholeNumber(min=0, max=1 << 20),
    default=None,
    metavar="DAYS",
    help="Every set-aside data dir whose plugin was removed over DAYS days ago.",
)
@_errors
def plugin_purge_data(
    config_file: Path | None,
    data_dir: Path | None,
    as_json: bool,
    dirs: tuple[str, ...],
    older_than: int | None,
) -> None:
    """Delete data dirs removed plugins left (each DIR as 'mcp0 plugin removed-data' lists
    it, or those --older-than says); each deletion is audited."""
    from mcp_zero.kernel.plugin_data import find, set_aside

    if bool(dirs) == (older_than is not None):
        raise click.UsageError("give the DIRs to delete, or --older-than DAYS (not both)")
    with _runtime(config_file, data_dir) as rt:
        # (looked for once the runtime has finished the purges a crash cut short)
        where = rt.settings.plugin_data_dir
        if older_than is None:
            doomed = [find(where, d).dir for d in dict.fromkeys(dirs)]
        else:
            before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=older_than)
            doomed = [a.dir for a in set_aside(where) if a.removed_at < before]
        purged = [rt.purge_plugin_data(d) for d in doomed]
    lines = [f"deleted {_escaped(a.dir)} ({_size(a.bytes)})" for a in purged]
    _out(as_json, {"purged": [a.to_json() for a in purged]}, "\n".join(lines) or "none to delete")


def _size(n: int) -> str:
    """``n`` bytes, for a reader."""
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


# -- audit and policy -------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Read and verify the audit log."""


@audit.command("list")
@_common
@click.option(
    "--after",
    type=_WholeNumber(min=0, max=(1 << 63) - 1),
    default=None,
    help="The records after this sequence number (0: from the first); without it, the newest.",
)
@click.option(
    "--limit",
    type=_WholeNumber(min=1, max=(1 << 63) - 1),
    default=100,
    help="At most this many records (default 100).",
)
@_errors
def audit_list(
    config_file: Path | None, data_dir: Path | None, as_json: bool, after: int | None, limit: int
) -> None:
    """Print audit records, oldest first: the newest LIMIT, or those after --after."""
    from mcp_zero.rpc.admin import audit_view

    # Page by page, each printed as it is read: a whole log at once took 2.6 KB a record (5.7
    # with --json) before the first line, 4 GB for 1.5 million (found by review).
    damaged: list[str] = []
    first = final = 0  # the first and last seq printed (0: none yet)
    with _store(config_file, data_dir) as store:
        head = store.audit_head()
        last = head.seq if head is not None else 0
        start = max(0, last - limit) if after is None else after
        left = limit
        while left > 0:
            page = store.read_audit(start, min(left, AUDIT_LIST_PAGE))
            if not page:
                break
            views = [audit_view(e) for e in page]
            damaged += [str(v["seq"]) for v in views if "damaged" in v]
            if as_json:  # (the array json.dumps(..., indent=2) writes, a page at a time)
                items = json.dumps(views, indent=2, sort_keys=True)[2:-2]  # (no "[\n", "\n]")
                click.echo(("[\n" if not first else ",\n") + items, nl=False)
            else:
                click.echo("\n".join(_audit_line(v) for v in views))
            first, final = first or page[0].seq, page[-1].seq
            left -= len(page)
            start = final
    if as_json:
        click.echo("\n]" if first else "[]")
    elif not first:
        click.echo("no records")
    if damaged:  # (to stderr, with --json too: stdout stays records only)
        click.echo(
            f"records altered or damaged since they were written: {', '.join(damaged)};"
            " 'mcp0 audit verify' checks the whole log",
            err=True,
        )
    if first and not as_json and (first > 1 or final < last):
        # (to stderr: the lines on stdout stay records only)
        click.echo(f"records {first}-{final} of {last}; --after SEQ --limit N for others", err=True)


def _audit_line(view: dict[str, Any]) -> str:
    """A record as ``mcp0 audit list`` prints it."""
    return (
        f"{view['seq']:>8} {_field(view, 'outcome'):8} {_field(view, 'agent'):16} "
        f"{_field(view, 'verb'):14} {_field(view, 'resource')} {_field(view, 'code')}"
        + (f" DAMAGED: {_escaped(view['damaged'])}" if "damaged" in view else "")
    )


def _field(view: dict[str, Any], key: str) -> str:
    """A record's ``key`` for its text line: "" if absent, as JSON if not text (altered),
    escaped."""
    value = view.get(key, "")
    return _escaped(value if isinstance(value, str) else json.dumps(value), _IN_AN_AUDIT_FIELD)


@audit.command("verify")
@_common
@_errors
def audit_verify(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Verify the audit log's hash chain from the first record to the last."""
    from mcp_zero.audit.chain import ChainBroken, verify_store

    with _store(config_file, data_dir) as store:
        try:
            report = verify_store(store)
        except ChainBroken as exc:
            _out(
                as_json,
                {"ok": False, "seq": exc.seq, "reason": exc.reason},
                f"BROKEN at seq {_escaped(exc.seq)}: {_escaped(exc.reason)}",
            )
            sys.exit(2)
    _out(
        as_json,
        {
            "ok": True,
            "count": report.count,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
        },
        # the head's seq as well as its hash: what to keep elsewhere, and look up later
        f"ok: {report.count} records, head seq {report.head_seq}, hash {report.head_hash}",
    )


@main.group()
def admin() -> None:
    """The admin token (the admin API's credential)."""


@admin.command("rotate-token")
@_common
@_errors
def admin_rotate_token(config_file: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Write a new admin token into the data dir; the old one stops working (a running
    server takes the new one up within a second). The token is in the file, not printed."""
    from mcp_zero.kernel.admin_token import rotate_admin_token

    with _runtime(config_file, data_dir) as rt:
        path = rt.settings.admin_token_path
        rotate_admin_token(path, rt.audit, rt.store)  # with its record, or not at all
    _out(
        as_json,
        {"admin_token_file": str(path), "rotated": True},
        f"new admin token in {path}; the old one no longer works",
    )


@main.group()
def policy() -> None:
    """Check policies."""


@policy.command("check")
@click.argument(
    "policy_dir",
    required=False,
    type=_PathGiven(path_type=Path, exists=True, file_okay=False),
)
@_common
@_errors
def policy_check(
    policy_dir: Path | None, config_file: Path | None, data_dir: Path | None, as_json: bool
) -> None:
    """Parse and validate the policies of POLICY_DIR (default: the data dir's) against the
    schema, as a server loads them: files can be checked before they reach one."""
    from mcp_zero.policy.engine import PolicyEngine

    if policy_dir is None:
        policy_dir = _existing(_settings(config_file, data_dir)).policy_dir
    engine = PolicyEngine.load(policy_dir)
    ids = sorted(engine.policies)
    counted = f"{len(ids)} {'policy' if len(ids) == 1 else 'policies'}"
    listed = ", ".join(ids) if ids else "every action is denied, the admin's too"
    text = f"ok: {counted}: {listed}"
    _out(as_json, {"ok": True, "policies": ids}, text)


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (an object of scalars: 1)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            stack.extend(
                (child, level + 1) for child in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity; JSON (and the MCP endpoint) has no such numbers."""
    raise ValueError(f"{constant} is not a JSON number")
