"""Settings: built-in defaults, then ``mcp0.toml``, then ``MCP0_*`` environment variables,
then command-line options — each later source overriding the earlier ones."""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import os
import pwd
import re
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mcp_zero.audit.log import DEFAULT_MAX_BATCH, DEFAULT_WINDOW
from mcp_zero.errors import ConfigError
from mcp_zero.sandbox.ownership import WORKER_USER
from mcp_zero.sandbox.process import MAX_RESTART_BACKOFF_S

DEFAULT_PORT = 8390
#: Worker processes of all plugins together (``max_workers``): each is a Python process
#: (~26 MiB resident for the notes example), and a manifest may ask for up to 64.
DEFAULT_MAX_WORKERS = 16


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of a server; each is documented in docs/configuration.md."""

    data_dir: Path = Path(".mcp0")
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 1 << 20
    # SSE events all streams keep for resumption (rpc/streams.py MAX_TOTAL_BUFFERED_BYTES)
    sse_buffer_bytes: int = 64 << 20
    rate_limit: float = 200.0  # tool calls per second per agent; 0 disables
    rate_burst: int = 400
    max_concurrency: int = 64  # calls in flight per agent
    max_timeout_s: float = 300.0
    shutdown_grace_s: float = 5.0  # on SIGTERM: how long requests in flight may still run
    max_workers: int = DEFAULT_MAX_WORKERS  # plugin worker processes, all plugins together
    # the longest wait before a worker that keeps dying as it starts is started again
    max_restart_backoff_s: float = MAX_RESTART_BACKOFF_S
    db_max_mb: int = 0  # cap on the SQLite file (small devices); 0: only the disk limits it
    # Group commit of audit events: a batch gathers for up to audit_window_ms after its
    # first event, or until audit_max_batch events wait (see mcp_zero.audit.log).
    audit_window_ms: float = DEFAULT_WINDOW * 1000
    audit_max_batch: int = DEFAULT_MAX_BATCH
    page_size: int = 100  # tools/list, resources/list, prompts/list
    session_idle_s: float = 3600.0
    max_sessions: int = 10_000
    # One agent opening more sessions loses its least recently used one, so it cannot take
    # all of max_sessions from the others.
    max_sessions_per_agent: int = 100
    allowed_origins: tuple[str, ...] = ()  # besides loopback origins
    anonymous_agent: str | None = None
    examples: bool = True
    # /metrics without the admin token on a server listening beyond loopback (on loopback
    # it is always open)
    metrics_public: bool = False
    log_level: str = "info"
    # HTTPS: a PEM certificate chain and its private key (both, or neither for plain HTTP).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Who the plugin workers of a server run as root run as ("root": they stay root,
    # without capabilities)
    worker_user: str = WORKER_USER
    # where each setting not left at its default came from (load_settings): not a setting
    _sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source(self, name: str) -> str:
        """Where setting ``name`` came from, as an error names it: ``option --port``,
        ``environment variable MCP0_PORT``, ``port in mcp0.toml`` or ``the default``."""
        return self._sources.get(name, "the default")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mcp0.db"

    @property
    def policy_dir(self) -> Path:
        return self.data_dir / "policies"

    @property
    def plugins_dir(self) -> Path:
        return self.data_dir / "plugins"

    @property
    def plugin_data_dir(self) -> Path:
        return self.data_dir / "plugin-data"

    @property
    def workers_dir(self) -> Path:
        """Where each server lists the workers it runs (``sandbox.leftovers``)."""
        return self.data_dir / "workers"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    def listen_addresses(self) -> list[str]:
        """The IP addresses a server on ``host`` listens on: the host resolved once, as a
        listening socket's address is (``""`` is every interface). Raises OSError
        (socket.gaierror) when it names none."""
        infos = socket.getaddrinfo(
            self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def on_loopback_only(self) -> bool:
        """Whether every address ``host`` resolves to is a loopback one: decided on what the
        name resolves to, not on how it is spelt (``localhost`` or ``127.example.net`` may
        resolve to a network address)."""
        try:
            return loopback_only(self.listen_addresses())
        except OSError:  # it names no address: nothing to listen on, loopback or not
            return False


def is_loopback(address: str) -> bool:
    """Whether ``address`` is a loopback IP address (127.0.0.0/8, ``::1``, or an IPv4-mapped
    ``::ffff:127.x.y.z``); a name, or anything else that is no IP address, is not."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # (an IPv6 one may have a zone)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def loopback_only(addresses: list[str]) -> bool:
    """Whether a server listening on ``addresses`` (IP addresses) is reached on loopback only."""
    return bool(addresses) and all(map(is_loopback, addresses))


_ENV_PREFIX = "MCP0_"
#: The settings' names (a Settings field starting with "_" is none).
SETTING_NAMES = tuple(f.name for f in fields(Settings) if not f.name.startswith("_"))
#: MCP0_* variables that are no settings: a stdio session's agent and token (cli), and what
#: a server sets for its plugins' workers (sandbox/process.py), which a plugin's own
#: subprocesses inherit.
OTHER_VARIABLES = frozenset(
    {
        "MCP0_AGENT",
        "MCP0_TOKEN",
        "MCP0_PLUGIN_DIR",
        "MCP0_PLUGIN_ENTRY",
        "MCP0_MEMORY_MB",
        "MCP0_MAX_THREADS",
        "MCP0_NETWORK",
        "MCP0_FILESYSTEM",
        "MCP0_PROTECT",
        "MCP0_PARENT_PID",
        "MCP0_WORKER_UID",
        "MCP0_WORKER_GID",
    }
)


_OPTIONAL_PATHS = frozenset({"tls_cert", "tls_key"})
_OPTIONAL_STRINGS = frozenset({"anonymous_agent"})


_DECIMAL = re.compile(
    r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,4})?"
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _Refused(Exception):
    """A value the setting does not take; ``tail`` says why, or what to give instead
    (``"; give a path"``). load_settings names where the value came from before it."""

    def __init__(self, tail: str) -> None:
        super().__init__(tail)
        self.tail = tail


def _coerce(name: str, value: Any, default: Any, *, text: bool = True) -> Any:
    """``value`` (from TOML, the environment or the command line) as the setting's type; a
    value of another kind is refused, never silently made one (``port = true`` is not port
    1, nor ``examples = "treu"`` false). ``text``: a string may spell a number, a boolean or
    a comma-separated list (the environment's and the command line's; TOML has those
    types, so a string there is no number: ``port = "19014"``). A path's leading ``~`` is
    the home directory, wherever the path comes from. Raises _Refused."""
    if name in _OPTIONAL_PATHS and value in (None, ""):
        return None
    path = name in _OPTIONAL_PATHS or isinstance(default, Path)
    if isinstance(value, str) and not path and not _is_text(value):
        # (an MCP0_* variable's bytes that are not UTF-8: lone surrogates, which no name or
        # record can hold; a traceback at the first use of it: found by review)
        raise _Refused(": not text, its bytes are not UTF-8")
    if name in _OPTIONAL_STRINGS:
        if isinstance(value, str) and not value.strip():
            return None  # (as unset: an empty MCP0_ANONYMOUS_AGENT named agent '': by review)
        if value is None or isinstance(value, str):
            return value
        raise _Refused("; give a string")
    if path:
        if isinstance(value, str | Path) and str(value).strip():
            try:
                return Path(value).expanduser()
            except RuntimeError as exc:  # ~user of no such user, or no home to expand
                raise _Refused(f": {exc}") from None
        raise _Refused("; give a path")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Refused("; use true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,30}", value.strip()):
            return int(value)
        raise _Refused("; give a whole number")
    if isinstance(default, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # (float() also takes 1_000 and other scripts' digits, which whole numbers are not
        # taken in: found by review)
        if text and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
            return float(value)
        raise _Refused("; give a number")
    if isinstance(default, tuple):
        items = value.split(",") if text and isinstance(value, str) else value
        if isinstance(items, list | tuple) and all(isinstance(v, str) for v in items):
            return tuple(v.strip() for v in items if v.strip())
        raise _Refused("; give a list of strings")
    if isinstance(default, str) and not isinstance(value, str):
        raise _Refused("; give a string")
    return value


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Resolve settings; ``overrides`` are the command line's options (None: not given).
    Raises ConfigError for an unreadable file or an unknown or bad setting, naming where
    a bad value came from and showing it as it is spelled there."""
    base = Settings()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file is not None:
        import tomllib  # (only with a config file: it costs the server about 0.5 MiB)

        try:
            # utf-8-sig: a byte-order mark (as Notepad saves UTF-8) is not part of the TOML
            raw = tomllib.loads(config_file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        for key, value in _file_section(raw, config_file).items():
            name = key.replace("-", "_")
            if name not in SETTING_NAMES:
                raise ConfigError(
                    f"unknown setting {key!r} in {config_file}; known: "
                    f"{', '.join(sorted(SETTING_NAMES))}"
                )
            # each source checked, also one a later source overrides: a broken file must
            # not go unnoticed until the override is dropped (found by review)
            sources[name] = f"{key} in {config_file}"
            values[name] = _taken(name, value, base, sources[name], text=False)
    env = os.environ if environ is None else environ
    for name in SETTING_NAMES:
        variable = _ENV_PREFIX + name.upper()
        env_value = env.get(variable)
        if env_value is not None:
            sources[name] = f"environment variable {variable}"
            values[name] = _taken(name, env_value, base, sources[name])
    for name, value in (overrides or {}).items():
        if value is not None:
            sources[name] = f"option --{name.replace('_', '-')}"
            values[name] = _taken(name, value, base, sources[name])
    settings = replace(base, **values, _sources=sources)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("tls_cert and tls_key go together: give both for HTTPS, or neither")
    return settings


def stray_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """What to warn of the ``MCP0_*`` variables of ``environ`` (default: the process's) that
    are neither settings nor ``OTHER_VARIABLES``: a mistyped one (``MCP0_RATELIMIT``) was
    ignored without a word, where an unknown key of a config file is an error. Each names
    the nearest setting's variable, if one is near."""
    env = os.environ if environ is None else environ
    settings = [_ENV_PREFIX + name.upper() for name in SETTING_NAMES]
    stray = [
        variable
        for variable in sorted(env)
        if variable.startswith(_ENV_PREFIX)
        and variable not in settings
        and variable not in OTHER_VARIABLES
    ]
    warnings = []
    if stray:
        from difflib import get_close_matches  # (only then: the server saves its memory)
    for variable in stray:
        # (the stdio session's MCP0_AGENT and MCP0_TOKEN are near misses too)
        known = [*settings, "MCP0_AGENT", "MCP0_TOKEN"]
        near = get_close_matches(variable, known, n=1, cutoff=0.75)
        warnings.append(
            f"environment variable {variable} is no setting, and is ignored: "
            + (f"did you mean {near[0]}?" if near else "see docs/configuration.md")
        )
    return warnings


def _taken(name: str, value: Any, base: Settings, where: str, *, text: bool = True) -> Any:
    """``value`` of setting ``name`` from ``where`` (``text``: the environment or the
    command line; else a TOML file), coerced and checked; if the setting does not take it,
    a ConfigError saying where it came from, the value spelled as it is written there."""
    try:
        return _checked(name, _coerce(name, value, getattr(base, name), text=text))
    except _Refused as refused:
        spelled = shlex.quote(str(value)) if text else _in_toml(value)
        if len(spelled) > 80:
            spelled = f"{spelled[:64]}…"
        # (shown escaped: lone surrogates, bytes of the environment that were not UTF-8)
        shown = spelled.encode("utf-8", "backslashreplace").decode()
        tail = refused.tail
        if not text and isinstance(value, str):
            tail += _unquoted(name, value, base)
        raise ConfigError(f"setting {name!r} is {shown} ({where}){tail}") from None


def _unquoted(name: str, value: str, base: Settings) -> str:
    """How to write what TOML string ``value`` means, if the setting takes that but not the
    string (``port = "22067"``: in the environment a value is text, in TOML it is typed)."""
    try:
        meant = _checked(name, _coerce(name, value, getattr(base, name)))
    except _Refused:
        return ""
    written = _in_toml(list(meant) if isinstance(meant, tuple) else meant)
    return f": write {name} = {written} (in TOML a value in quotes is a string)"


def _in_toml(value: Any) -> str:
    """``value`` (as tomllib read it) as TOML spells it: ``true``, ``"22067"``, ``[1, 2]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # (JSON's escapes are TOML's too)
    if isinstance(value, list):
        return f"[{', '.join(_in_toml(item) for item in value)}]"
    if isinstance(value, dict):
        pairs = (f"{_in_toml_key(k)} = {_in_toml(v)}" for k, v in value.items())
        return f"{{ {', '.join(pairs)} }}"
    if isinstance(value, datetime.date | datetime.time):  # (a datetime is a date)
        return value.isoformat()
    return repr(value)  # an int, a float


def _in_toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _is_text(value: str) -> bool:
    """Whether ``value`` is Unicode text (no lone surrogates: bytes that were not UTF-8)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _checked(name: str, value: Any) -> Any:
    """``value`` (of the setting's type) if the setting may take it; else _Refused. Each
    source's value is checked, also one a later source overrides."""
    bounds = next(((low, high) for n, low, high in _RANGES if n == name), None)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise _Refused(f"; it must be in [{_bound(bounds[0])}, {_bound(bounds[1])}]")
    if name == "log_level" and value.lower() not in LOG_LEVELS:
        raise _Refused(f"; use one of {', '.join(LOG_LEVELS)}")
    if name == "worker_user" and value != WORKER_USER:  # (nobody is 65534 where none is)
        try:
            entry = pwd.getpwnam(value)
        except KeyError:
            raise _Refused(
                ", which names no user on this system; name one (the default is nobody), or "
                "root to keep workers root"
            ) from None
        if entry.pw_uid != 0 and entry.pw_gid == 0:
            raise _Refused(
                ", whose group is root's (gid 0): its workers would read the files of root's "
                "group; give the user a group of its own"
            )
    return value


def _bound(number: float) -> str:
    """A bound of ``_RANGES`` as a setting is written: 1000000000, not 1e+09 or 1000000000.0."""
    return str(int(number)) if float(number).is_integer() else repr(number)


def _file_section(raw: dict[str, Any], config_file: Path) -> dict[str, Any]:
    """The settings of a config file: its ``[server]`` table, or its top level when it has
    none. Raises ConfigError for a ``server`` that is not a table and for a key beside the
    ``[server]`` table (it would be ignored)."""
    if "server" not in raw:
        return raw
    server = raw["server"]
    if not isinstance(server, dict):
        raise ConfigError(
            f"'server' in {config_file} is {type(server).__name__} {server!r}; it must be the "
            "[server] table of settings (or give the settings at the top level, without it)"
        )
    beside = sorted(key for key in raw if key != "server")
    if beside:
        key = beside[0]
        where = "setting" if key.replace("-", "_") in SETTING_NAMES else "key"
        raise ConfigError(
            f"{where} {key!r} in {config_file} is at the top level, beside the [server] table, "
            "where it would be ignored; put it under [server] (a key after the [server] line "
            "is in it), or give every setting at the top level without [server]"
        )
    return server


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# Bounds checked once here, so a bad value is one clear error rather than a crash later
# (page_size 0 would make tools/list hand out the same cursor forever).
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("port", 0, 65535),
    ("max_body_bytes", 1, 1 << 40),
    ("sse_buffer_bytes", 0, 1 << 40),
    ("rate_limit", 0, 1e9),  # 0: no limit
    ("rate_burst", 1, 1 << 31),
    ("max_concurrency", 1, 1 << 31),
    ("max_timeout_s", 1e-3, 7 * 86_400),
    ("max_workers", 1, 4096),
    ("max_restart_backoff_s", 0, 3600),
    ("shutdown_grace_s", 0, 3600),
    ("audit_window_ms", 0, 60_000),
    ("audit_max_batch", 1, 1 << 20),
    ("db_max_mb", 0, 1 << 31),
    ("page_size", 1, 1 << 31),
    ("session_idle_s", 1e-3, 365 * 86_400),
    ("max_sessions", 1, 1 << 31),
    ("max_sessions_per_agent", 1, 1 << 31),
)
