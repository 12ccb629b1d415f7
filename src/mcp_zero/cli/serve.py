"""Running the server (HTTP or stdio) and one-off governed calls for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import ssl
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mcp_zero.config import Settings, loopback_only
from mcp_zero.errors import ConfigError, Conflict, StorageError, ToolNotFound, Unauthorized, shown
from mcp_zero.runtime import REFRESH_INTERVAL_S, FirstStart, Runtime
from mcp_zero.sandbox import leftovers, proctree
from mcp_zero.sandbox.worker_process import adopt_orphans, end_adopted, record_workers
from mcp_zero.security.tokens import hash_token
from mcp_zero.storage.base import Store

T = TypeVar("T")

log = logging.getLogger("mcp_zero.serve")


# The server's log lines (stderr), over HTTP and stdio alike.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a terminal acts on, escaped in a log line (tabs and newlines kept): a plugin's stderr
# line or error message carrying ESC sequences recoloured, retitled or rewrote the
# operator's terminal, or set its clipboard (OSC 52), and \r hid the line's start.
_ACTED_ON = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class LogFormatter(logging.Formatter):
    """LOG_FORMAT, with what a terminal would act on shown escaped (``\x1b``)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # (the whole record: a traceback's exception message may quote a plugin too)
        text = super().format(record)
        return _ACTED_ON.sub(lambda found: found.group().encode("unicode_escape").decode(), text)


def _log_to_stderr(settings: Settings) -> None:
    """Send the server's log to stderr (unless the process configured logging already)."""
    if logging.root.handlers:  # (as basicConfig: an embedder's or a test's own set-up)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter())
    logging.root.addHandler(handler)
    logging.root.setLevel(settings.log_level.upper())


STDIO_NEEDS_AN_AGENT = (
    "--stdio needs the agent the session runs as: --agent NAME (or MCP0_AGENT), or the "
    "agent's token in MCP0_TOKEN"
)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop if it is installed (plain asyncio works, only slower), without
    making uvloop the process's event loop policy: a program that runs the CLI's commands in
    its own process (the tests, an embedder) keeps its own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _cannot_listen(settings: Settings, exc: OSError) -> ConfigError:
    where = f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        hint = "is another server using that port? Choose another with --port (or in mcp0.toml)"
    elif isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        hint = "use an address of this machine with --host (or host in mcp0.toml)"
    else:
        hint = "choose another address with --host and --port"
    return ConfigError(f"{where}; {hint}")


def plain_http_warning(settings: Settings, addresses: list[str]) -> str | None:
    """What to tell the operator of a server listening on ``addresses`` that others reach
    without TLS, if it is one."""
    if settings.tls_cert is not None or loopback_only(addresses):
        return None
    if not settings.host:
        where = f"every interface ({', '.join(addresses)})"
    elif addresses == [settings.host]:
        where = settings.host
    else:
        where = f"{settings.host} ({', '.join(addresses)})"
    return (
        f"serving plain HTTP on {where}: bearer tokens cross the network in clear; "
        "give --tls-cert and --tls-key, or put a TLS proxy in front"
    )


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from ``tls_cert`` and ``tls_key`` (TLS 1.2 or later), or None."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(_tls_problem(settings.tls_cert, settings.tls_key, exc)) from exc
    return context


# What a PEM file may hold, by the label of its blocks ("-----BEGIN RSA PRIVATE KEY-----").
_PEM_BLOCKS = {
    "certificate": re.compile(rb"-----BEGIN (TRUSTED )?CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def _tls_problem(cert: Path, key: Path, exc: OSError) -> str:
    """What is wrong with ``cert`` and ``key``, which OpenSSL refused with ``exc`` (its
    "[SSL] PEM lib" names neither the file nor what is wrong with it)."""
    if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
        return f"the TLS key {key} is not the key of the certificate in {cert}"
    for role, path, wanted in (("certificate", cert, "certificate"), ("key", key, "private key")):
        try:
            pem = path.read_bytes()
        except OSError as unreadable:
            return f"cannot read the TLS {role} {path}: {unreadable.strerror or unreadable}"
        held = [kind for kind, block in _PEM_BLOCKS.items() if block.search(pem)]
        if wanted not in held:
            return f"the TLS {role} {path} holds no PEM {wanted}" + (
                f", but a {held[0]}" if held else ""
            )
    return f"cannot use TLS certificate {cert} with key {key}: {exc.strerror or exc}"


def _listen_addresses(settings: Settings) -> list[str]:
    """The addresses the server listens on: its host resolved once, here, and bound as it
    resolved (what is decided of them, loopback or not, holds of what is bound: a name
    resolved again could name other addresses). Fails before the data dir is touched (and a
    first start's token shown to nobody) when one cannot be bound; the server's own bind
    can still lose a race, see run_http."""
    try:
        addresses = settings.listen_addresses()
        if settings.port != 0:
            for address in addresses:
                family, kind, proto, _, bound = socket.getaddrinfo(
                    address, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
                )[0]
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:  # (as the server's: IPv6 only)
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(bound)
    except OSError as exc:
        raise _cannot_listen(settings, exc) from exc
    return addresses


@contextlib.contextmanager
def runtime_on(settings: Settings, *, create: bool = True) -> Iterator[Runtime]:
    """The runtime on ``settings``' data dir (made if there is none and ``create``), closed
    if the block fails; a data dir it made
    (none was there) is removed then, with all it made: a command or first start that
    failed (a full disk, a refused first action) leaves none behind. Other processes wait
    for a data dir it laid out until the block has ended (``Runtime.claim``): none has used
    it when it is removed. When the block succeeds, closing the runtime is the caller's."""
    runtime = Runtime(settings, create=create, hold_new=True)
    try:
        yield runtime
    except BaseException:
        runtime.close()
        runtime.claim.abandon()
        raise
    runtime.claim.release()


def _prepare(
    settings: Settings, *, on_loopback_only: bool, first_start: bool = False
) -> tuple[Runtime, FirstStart]:
    """The runtime, with the data dir's first start done if ``first_start`` (the example
    plugins installed and the default agent's token, if this start made them); the caller
    records it finished once the token is shown. ``on_loopback_only``: whether every
    address the server listens on is a loopback one (token-less access needs it)."""
    anonymous = settings.anonymous_agent
    # (named as settings errors name it: it may come from the environment or a file)
    given = f"setting 'anonymous_agent' is {anonymous!r} ({settings.source('anonymous_agent')})"
    if anonymous and not on_loopback_only:
        raise ConfigError(
            f"{given}, refused on {settings.host or 'every interface'}: token-less access "
            "is allowed only when "
            "every address the server listens on is a loopback one (127.0.0.1, ::1, or a "
            "name that resolves to loopback addresses only)"
        )
    done = FirstStart([], None)
    with runtime_on(settings) as runtime:
        # the first start's install and agent are decided by policy: the set (and token)
        # in force recorded before them (Runtime.start would have, after: found by review)
        runtime.record_what_governs()
        if first_start:
            done = asyncio.run(runtime.finish_first_start(record=False))
        if anonymous and runtime.store.get_agent(anonymous) is None:
            raise ConfigError(
                f"{given}, which names no agent; create it first with 'mcp0 agent create "
                f"{anonymous} --plugin ...'"
            )
    return runtime, done


def _take_over_workers(settings: Settings) -> None:
    """Before this server starts workers: end what a dead one's left, become the subreaper
    (what a plugin orphans comes to the server, not init, and the server sweeps it:
    mcp_zero.sandbox.proctree), and list its own workers from now on. In this order: the
    old records go before this server's are written."""
    _end_left_behind(settings)
    adopt_orphans()
    record_workers(settings.workers_dir)


def _end_left_behind(settings: Settings) -> None:
    """End what plugins of a server on this data dir started and left running when that
    server went without ending them (``kill -9``, the OOM killer): its workers die with it
    (their parent-death signal), what they started is re-parented to init. Found in the
    sessions of the workers it listed, and by their environment (a record lost, a process
    that left its worker's session)."""
    killed = set(leftovers.end_sessions(leftovers.left_sessions(settings.workers_dir)))
    roots = proctree.left_behind(str(settings.plugin_data_dir.resolve()))
    killed.update(pid for root in roots for pid in proctree.kill_tree(root, include_root=True))
    if killed:
        log.warning(
            "ended %d process(es) that plugins of a server no longer running left behind: %s",
            len(killed),
            ", ".join(map(str, sorted(killed))),
        )


def run_http(settings: Settings, *, as_json: bool = False) -> None:
    """Serve MCP over streamable HTTP until SIGTERM or SIGINT."""
    from mcp_zero.rpc.http import HttpApp
    from mcp_zero.rpc.wire import HttpServer, raise_open_files_limit

    _log_to_stderr(settings)
    for variable in ("MCP0_AGENT", "MCP0_TOKEN"):
        # who a stdio session runs as; ignored, not refused: an environment is shared (a
        # shell's, a service manager's), a command line is this server's
        if variable in os.environ:
            log.warning(
                "%s is set, and ignored: it is for a stdio session (mcp0 serve --stdio); the "
                "clients of an HTTP server send their agents' tokens",
                variable,
            )
    tls = _tls_context(settings)
    addresses = _listen_addresses(settings)
    loopback = loopback_only(addresses)
    warning = plain_http_warning(settings, addresses)
    if warning is not None:
        log.warning("%s", warning)
    runtime, first_start = _prepare(settings, on_loopback_only=loopback, first_start=True)
    _take_over_workers(settings)
    raise_open_files_limit()  # (connections are bounded by what it allows: HttpServer)
    app = HttpApp(runtime, on_loopback_only=loopback)
    server = HttpServer(
        app, addresses, settings.port, max_body_bytes=settings.max_body_bytes, tls=tls
    )

    async def started() -> None:
        await app.startup()
        try:
            await server.start()  # listening only once the plugins run: /readyz is 200 at once
        except OSError as exc:
            await app.shutdown()
            raise _cannot_listen(settings, exc) from exc
        # only now, as the token is shown: a start killed before (its plugins starting, the
        # listen) has the next start give agent default a new token. (Read first: a restart
        # writes nothing, so another process's write lock does not hold it up.)
        if not runtime.store.first_start_done():
            runtime.store.finish_first_start()
        closed = runtime.admin_token_hash is None
        _announce(settings, server.port, first_start, admin_closed=closed, as_json=as_json)

    try:
        _run(
            server.run(
                on_start=started,
                on_stop=app.shutdown,
                listen=False,
                grace=settings.shutdown_grace_s,
            )
        )
    finally:
        end_adopted()


def _announce(
    settings: Settings, port: int, first_start: FirstStart, *, admin_closed: bool, as_json: bool
) -> None:
    installed, token = first_start.installed, first_start.token
    scheme = "https" if settings.tls_cert is not None else "http"
    every_interface = _names_every_interface(settings.host)
    host = _local_address(settings.host) if every_interface else settings.host
    host = f"[{host}]" if ":" in host else host  # (an IPv6 one)
    url = f"{scheme}://{host}:{port}/mcp"
    info: dict[str, Any] = {
        "url": url,
        "every_interface": every_interface,
        "data_dir": str(settings.data_dir),
        "admin_token_file": str(settings.admin_token_path),
        "admin_api_open": not admin_closed,  # (a removed token stays removed: closed)
        "plugins_installed": installed,
    }
    if token:
        info["agent"] = {"name": "default", "token": token, "reissued": first_start.reissued}
    if as_json:
        print(json.dumps(info), flush=True)
        return
    if installed:
        print(f"installed example plugins: {', '.join(installed)}", flush=True)
    if token and first_start.reissued:
        print(
            "agent 'default' was made by a first start that did not finish, its token maybe "
            "never shown; its new token (shown once, the old one no longer works):",
            flush=True,
        )
        print(f"  {token}", flush=True)
    elif token:
        print(
            "created agent 'default' with the example plugins; its token (shown once):", flush=True
        )
        print(f"  {token}", flush=True)
    if admin_closed:  # (its file removed or emptied: no start writes it again)
        print(
            f"admin API closed: no token in {settings.admin_token_path} "
            "('mcp0 admin rotate-token' writes one)",
            flush=True,
        )
    else:
        print(f"admin token: {settings.admin_token_path}", flush=True)
    if every_interface:
        print(f"mcp0 listening on every interface, port {port}; on this machine: {url}", flush=True)
    else:
        print(f"mcp0 listening on {url}", flush=True)


def _names_every_interface(host: str) -> bool:
    """Whether ``host`` is a wildcard (``""``, ``0.0.0.0``, ``::``, and spellings such as
    ``0``): a server listens on every interface, and the host is no address a client can
    connect to. Decided as the listening socket's address is, by resolving it."""
    if not host:
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:  # (it was listened on: resolved as well then)
        return False
    return all(ipaddress.ip_address(str(info[4][0])).is_unspecified for info in infos)


def _local_address(wildcard: str) -> str:
    """The loopback address a client on this machine reaches a server on ``wildcard`` at."""
    return "::1" if ":" in wildcard else "127.0.0.1"


def run_stdio(settings: Settings, agent: str | None, token: str | None) -> None:
    """Serve one MCP session on stdin/stdout as ``agent`` (or the agent of ``token``)."""
    from mcp_zero.rpc.stdio import serve_stdio

    if sys.stdin is None or sys.stdout is None:  # (started with `<&-` or `>&-`)
        closed = "stdin" if sys.stdin is None else "stdout"
        raise ConfigError(f"--stdio speaks MCP on stdin and stdout, and {closed} is closed")
    # (as the HTTP server's: it had no times, found by review)
    _log_to_stderr(settings)
    # a stdio session's agent exists already: the first start is left to an HTTP server
    runtime, _ = _prepare(settings, on_loopback_only=settings.on_loopback_only())
    try:
        if agent:
            principal = runtime.agents.principal(agent)
            # both: the token must be that agent's (it was ignored, even a wrong one)
            if token and runtime.agents.authenticate(token).agent != principal.agent:
                raise Unauthorized(
                    f"the token in MCP0_TOKEN is not the token of agent {agent!r}: give "
                    "--agent (or MCP0_AGENT) or the agent's token, or both of the same agent"
                )
        elif token:
            principal = runtime.agents.authenticate(token)
        else:
            raise Unauthorized(STDIO_NEEDS_AN_AGENT)
    except Exception:
        runtime.close()
        raise
    _take_over_workers(settings)
    try:
        # (bound to its token, if it came with one: the session ends when it is rotated)
        credential = hash_token(token) if token else None
        _run(serve_stdio(runtime, principal, handle_signals=True, credential=credential))
    finally:
        end_adopted()


def execute_once(settings: Settings, agent: str, tool: str, arguments: dict[str, Any]) -> Any:
    """Call one tool as ``agent`` through the governed path, in this process. Raises
    Conflict when the agent is terminated while the call runs (by a server, or another
    command): the call is stopped and audited as ``cancelled``, as a server's would be."""
    from mcp_zero.rpc.admin import _NoBridge

    async def run() -> Any:
        runtime = Runtime(settings, create=False)
        try:
            principal = runtime.agents.principal(agent)
            await runtime.start(only=())  # one call: start only the plugin that serves it
            entry = runtime.plugins.tools.get(tool)
            if entry is not None:
                await runtime.plugins.start_plugin(entry.plugin)
            call = asyncio.create_task(
                runtime.kernel.call_tool(
                    principal,
                    tool,
                    arguments,
                    _NoBridge(),
                    request_id=f"cli-{secrets.token_hex(8)}",
                    transport="cli",
                )
            )
            watch = asyncio.create_task(_until_not_active(runtime.store, agent))
            try:
                await asyncio.wait((call, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:  # (also when this is cancelled: Ctrl-C)
                watch.cancel()
                if not call.done():
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        # (its record is written meanwhile: as cancelled, unless its plugin
                        # had answered; then as it ended, and that is the answer)
                        await call
            if call.cancelled():
                raise Conflict(f"agent {agent!r} was terminated while the call ran; it was stopped")
            try:
                return call.result()
            except ToolNotFound as exc:  # (audited as such; the kernel's advice is a client's)
                raise ToolNotFound(
                    f"unknown tool {shown(tool)}: 'mcp0 plugin list' shows the plugins "
                    "installed, 'mcp0 plugin show PLUGIN' their tools",
                    data=exc.data,
                ) from None
        finally:
            await runtime.aclose()

    return asyncio.run(run())


async def _until_not_active(store: Store, agent: str) -> None:
    """Return once ``agent`` is no longer active: terminated by a server or another command
    on the data dir (a server's sessions hear of it from its watcher; this process has
    none), looking at the store as often as that watcher does."""
    while True:
        await asyncio.sleep(REFRESH_INTERVAL_S)
        try:
            record = await asyncio.to_thread(store.get_agent, agent)
        except StorageError:
            continue  # (the store busy past its timeout: look again at the next poll)
        if record is None or record.status != "active":
            return
