"""Settings: built-in defaults < mcp0.toml < MCP0_* environment < command-line overrides, and
the errors a user gets for a bad file, key or value."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mcp_zero.cli.main import main
from mcp_zero.cli.serve import _prepare
from mcp_zero.config import DEFAULT_PORT, SETTING_NAMES, Settings, load_settings, stray_variables
from mcp_zero.errors import ConfigError
from requires import UNSHARE, require_root


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mcp0.toml"
    path.write_text(text)
    return path


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mcp0.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nport = 9123\n")
    assert load_settings(path, None, environ={}).port == 9123


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mcp0.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(path, None, environ={})


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(None, None, environ={})
    assert settings == Settings()
    assert settings.port == DEFAULT_PORT
    assert settings.host == "127.0.0.1"
    assert settings.data_dir == Path(".mcp0")
    assert settings.max_body_bytes == 1 << 20
    assert settings.on_loopback_only()


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[server]\nport = 9000\nhost = "127.0.0.2"\npage-size = 7\nrate_limit = 5.5\n'
        'allowed_origins = ["https://app.example.com"]\n',
    )
    from_file = load_settings(config, None, environ={})
    assert (from_file.port, from_file.host, from_file.page_size) == (9000, "127.0.0.2", 7)
    assert from_file.rate_limit == 5.5
    assert from_file.allowed_origins == ("https://app.example.com",)
    env = {"MCP0_PORT": "9100", "MCP0_PAGE_SIZE": "9", "MCP0_EXAMPLES": "false"}
    from_env = load_settings(config, None, environ=env)
    assert (from_env.port, from_env.page_size, from_env.host) == (9100, 9, "127.0.0.2")
    assert from_env.examples is False
    overridden = load_settings(config, {"port": 9200, "host": None}, environ=env)
    assert overridden.port == 9200
    assert overridden.host == "127.0.0.2"  # None means "not given on the command line"
    assert overridden.page_size == 9


def test_top_level_keys_work_without_a_server_table(tmp_path: Path) -> None:
    config = write(tmp_path, 'data_dir = "/srv/mcp0"\nmax_concurrency = 3\n')
    settings = load_settings(config, None, environ={})
    assert settings.data_dir == Path("/srv/mcp0")
    assert settings.max_concurrency == 3


def test_environment_values_are_coerced() -> None:
    settings = load_settings(
        None,
        None,
        environ={
            "MCP0_ALLOWED_ORIGINS": "https://a.example, https://b.example ,",
            "MCP0_EXAMPLES": "0",
            "MCP0_DATA_DIR": "/tmp/elsewhere",
            "MCP0_AUDIT_WINDOW_MS": "5",
            "MCP0_AUDIT_MAX_BATCH": "8",
            "MCP0_ANONYMOUS_AGENT": "guest",
            "MCP0_METRICS_PUBLIC": "yes",
            "MCP0_TOKEN": "not a setting, used by the CLI",
        },
    )
    assert settings.metrics_public is True
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.examples is False
    assert settings.data_dir == Path("/tmp/elsewhere")
    assert settings.audit_window_ms == 5.0
    assert settings.audit_max_batch == 8
    assert settings.anonymous_agent == "guest"


@pytest.mark.parametrize("variable", ["MCP0_ANONYMOUS_AGENT", "MCP0_LOG_LEVEL", "MCP0_HOST"])
def test_an_environment_value_that_is_not_utf8_is_a_config_error(variable: str) -> None:
    # (its bytes reach Python as lone surrogates) a traceback at its first use (found by review)
    with pytest.raises(ConfigError, match="not text, its bytes are not UTF-8"):
        load_settings(None, None, environ={variable: "guest\udcff"})


def test_a_path_from_the_environment_may_hold_any_bytes() -> None:
    settings = load_settings(None, None, environ={"MCP0_DATA_DIR": "/tmp/data\udcff"})
    assert bytes(settings.data_dir) == b"/tmp/data\xff"


def test_an_unknown_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path, "[server]\nport = 9000\nmax_bodysize = 12\n")
    with pytest.raises(ConfigError, match="max_bodysize") as caught:
        load_settings(config, None, environ={})
    assert str(config) in caught.value.message
    assert "max_body_bytes" in caught.value.message  # the known settings are listed


def test_a_setting_beside_the_server_table_is_refused_not_ignored(tmp_path: Path) -> None:
    config = write(tmp_path, "rate_limit = 1\n[server]\nport = 9000\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, None, environ={})
    assert caught.value.message == (
        f"setting 'rate_limit' in {config} is at the top level, beside the [server] table, "
        "where it would be ignored; put it under [server] (a key after the [server] line is "
        "in it), or give every setting at the top level without [server]"
    )
    typo = write(tmp_path, "[sever]\nport = 1\n[server]\nport = 9000\n")
    with pytest.raises(ConfigError, match=r"^key 'sever' in .* beside the \[server\] table"):
        load_settings(typo, None, environ={})
    moved = write(tmp_path, "[server]\nport = 9000\nrate_limit = 1\n")
    assert load_settings(moved, None, environ={}).rate_limit == 1.0


@pytest.mark.parametrize("server", ["5", '"x"', "[1, 2]", "true"])
def test_a_server_that_is_not_a_table_is_a_config_error(tmp_path: Path, server: str) -> None:
    config = write(tmp_path, f"server = {server}\n")
    with pytest.raises(ConfigError, match=r"'server' in .* must be the \[server\] table"):
        load_settings(config, None, environ={})


def test_a_table_that_is_not_server_is_an_unknown_setting(tmp_path: Path) -> None:
    config = write(tmp_path, "[sever]\nport = 9000\n")  # a typo: no [server] at all
    with pytest.raises(ConfigError, match=r"unknown setting 'sever' in .*; known: allowed_"):
        load_settings(config, None, environ={})


def test_config_file_mistakes_are_one_line_from_the_cli(tmp_path: Path) -> None:
    # server = 5 was an AttributeError traceback
    config = write(tmp_path, "server = 5\n")
    result = CliRunner().invoke(
        main, ["agent", "list", "--config", str(config), "--data-dir", str(tmp_path / "d")]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"mcp0: error: 'server' in {config} is int 5; it must be")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("source", "name"),
    [({"MCP0_PORT": "eighty"}, "port"), ({"MCP0_RATE_LIMIT": "fast"}, "rate_limit")],
)
def test_a_bad_value_is_a_config_error_naming_the_setting(
    source: dict[str, str], name: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(None, None, environ=source)


@pytest.mark.parametrize(
    ("text", "environ", "overrides", "error"),
    [
        ("port = true", {}, {}, "setting 'port' is true (port in {file}); give a whole number"),
        (
            "page-size = 0",
            {},
            {},
            "setting 'page_size' is 0 (page-size in {file}); it must be in [1, 2147483648]",
        ),
        (
            "allowed_origins = [1, 'a']",
            {},
            {},
            "setting 'allowed_origins' is [1, \"a\"] (allowed_origins in {file}); give a list "
            "of strings",
        ),
        (
            "rate_limit = inf",
            {},
            {},
            "setting 'rate_limit' is inf (rate_limit in {file}); it must be in [0, 1000000000]",
        ),
        (
            "",
            {"MCP0_EXAMPLES": "treu"},
            {},
            "setting 'examples' is treu (environment variable MCP0_EXAMPLES); use true or false",
        ),
        (
            "",
            {"MCP0_PORT": " 4 x"},
            {},
            "setting 'port' is ' 4 x' (environment variable MCP0_PORT); give a whole number",
        ),
        (
            "",
            {},
            {"port": 70000},
            "setting 'port' is 70000 (option --port); it must be in [0, 65535]",
        ),
        # a value in quotes, which the environment would take: how to write it in TOML
        (
            "port = '22067'",
            {},
            {},
            "setting 'port' is \"22067\" (port in {file}); give a whole number: write port = "
            "22067 (in TOML a value in quotes is a string)",
        ),
        (
            "allowed_origins = 'https://a.example, b.example'",
            {},
            {},
            "setting 'allowed_origins' is \"https://a.example, b.example\" (allowed_origins in "
            '{file}); give a list of strings: write allowed_origins = ["https://a.example", '
            '"b.example"] (in TOML a value in quotes is a string)',
        ),
        (
            "port = '99999'",
            {},
            {},
            "setting 'port' is \"99999\" (port in {file}); give a whole number",
        ),
    ],
)
def test_a_bad_value_says_where_it_came_from_spelled_as_it_is_there(
    tmp_path: Path, text: str, environ: dict[str, str], overrides: dict[str, Any], error: str
) -> None:
    # MCP0_EXAMPLES=treu was "setting 'examples' is 'treu'", port = true in a file "setting
    # 'port' is True": neither said where to look, and True is Python's spelling (found by
    # review)
    config = write(tmp_path, f"[server]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, overrides, environ=environ)
    assert caught.value.message == error.format(file=config)


def test_an_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", None, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(write(tmp_path, "port = = 3\n"), None, environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("page_size", 0),
        ("max_concurrency", 0),
        ("max_body_bytes", 0),
        ("rate_burst", 0),
        ("max_sessions", -1),
        ("port", 70000),
        ("audit_max_batch", 0),
        ("max_workers", 0),
        ("max_workers", 5000),
        ("shutdown_grace_s", -1),
        ("shutdown_grace_s", float("inf")),
        ("max_restart_backoff_s", -1),
        ("max_restart_backoff_s", 3601),
        ("rate_limit", float("inf")),
        ("rate_limit", float("nan")),
        ("max_timeout_s", float("inf")),
        ("session_idle_s", float("inf")),
        ("log_level", "loud"),
    ],
)
def test_out_of_range_values_are_config_errors(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(None, {name: value}, environ={})


def test_data_dir_paths_derive_from_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(None, {"data_dir": tmp_path}, environ={})
    assert settings.db_path == tmp_path / "mcp0.db"
    assert settings.policy_dir == tmp_path / "policies"
    assert settings.admin_token_path == tmp_path / "admin.token"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "127.1", "localhost", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert Settings(host=host).on_loopback_only()


@pytest.mark.parametrize("host", ["0.0.0.0", "", "192.168.1.10", "::", "no-such-host.invalid"])
def test_non_loopback_hosts(host: str) -> None:
    assert not Settings(host=host).on_loopback_only()


# ``name`` resolving to 0.0.0.0, as /etc/hosts (or DNS) may have it: a private /etc/hosts in a
# mount namespace of its own, and there the refused serve and what Settings make of the name
RESOLVING_ELSEWHERE = """
set -e
echo "0.0.0.0 $1" > "$2/hosts"
mount --bind "$2/hosts" /etc/hosts
exec "$3" -c '
import json, subprocess, sys
from mcp_zero.cli.serve import plain_http_warning
from mcp_zero.config import Settings
name, data = sys.argv[1:3]
mcp0 = sys.executable.rsplit("/", 1)[0] + "/mcp0"
served = subprocess.run(
    [mcp0, "serve", "--data-dir", data, "--host", name, "--port", "0",
     "--anonymous-agent", "guest"],
    capture_output=True, text=True, timeout=60,
)
settings = Settings(host=name)
addresses = settings.listen_addresses()
print(json.dumps({
    "returncode": served.returncode,
    "stderr": served.stderr,
    "addresses": addresses,
    "loopback": settings.on_loopback_only(),
    "warning": plain_http_warning(settings, addresses),
}))
' "$1" "$2/d"
"""


@pytest.mark.parametrize("name", ["127.example.net", "localhost"])
def test_a_host_is_loopback_by_what_it_resolves_to_not_by_its_spelling(
    tmp_path: Path, name: str
) -> None:
    # A host spelt like loopback ("localhost", "127.…") was taken for it, whatever it
    # resolved to: the server listened on the network, served token-less requests as the
    # anonymous agent, /metrics to anyone, plain HTTP without a warning (found by review)
    require_root("unshare")
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", RESOLVING_ELSEWHERE, "-", name, str(tmp_path), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["returncode"] != 0
    refused = (
        f"setting 'anonymous_agent' is 'guest' (option --anonymous-agent), refused on {name}: "
    )
    assert refused in seen["stderr"]
    assert not (tmp_path / "d").exists()  # refused before anything was created
    assert (seen["addresses"], seen["loopback"]) == (["0.0.0.0"], False)
    assert seen["warning"].startswith(f"serving plain HTTP on {name} (0.0.0.0): ")


def test_anonymous_agent_is_refused_off_loopback(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {"data_dir": tmp_path / "d", "host": "0.0.0.0", "anonymous_agent": "guest"},
        environ={},
    )
    with pytest.raises(ConfigError, match="loopback"):
        _prepare(settings, on_loopback_only=settings.on_loopback_only())
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_anonymous_agent_must_exist(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {"data_dir": tmp_path / "d", "anonymous_agent": "guest", "examples": False},
        environ={},
    )
    with pytest.raises(ConfigError, match="guest"):
        _prepare(settings, on_loopback_only=True)


@pytest.mark.parametrize("source", ["environment", "file"])
def test_an_anonymous_agent_refused_at_start_is_named_by_where_it_came_from(
    tmp_path: Path, source: str
) -> None:
    # One from MCP0_ANONYMOUS_AGENT was reported as "--anonymous-agent 'ghost': …", an
    # option the operator had not given (found by review)
    environ, config = {}, None
    if source == "environment":
        environ, where = (
            {"MCP0_ANONYMOUS_AGENT": "ghost"},
            "environment variable MCP0_ANONYMOUS_AGENT",
        )
    else:
        config = write(tmp_path, 'anonymous_agent = "ghost"\n')
        where = f"anonymous_agent in {config}"
    given = f"setting 'anonymous_agent' is 'ghost' ({where})"
    for host, loopback, tail in (
        ("0.0.0.0", False, ", refused on 0.0.0.0: token-less access is allowed only when "),
        ("127.0.0.1", True, ", which names no agent; create it first with 'mcp0 agent create "),
    ):
        settings = load_settings(
            config,
            {"data_dir": tmp_path / "d", "host": host, "examples": False},
            environ=environ,
        )
        with pytest.raises(ConfigError) as refused:
            _prepare(settings, on_loopback_only=loopback)
        assert str(refused.value).startswith(given + tail)


def test_the_source_of_a_setting_is_the_last_that_gave_it(tmp_path: Path) -> None:
    config = write(tmp_path, "port = 1\nhost = '::1'\npage_size = 7\n")
    settings = load_settings(config, {"port": 3}, environ={"MCP0_PORT": "2", "MCP0_HOST": "::1"})
    assert settings.source("port") == "option --port"
    assert settings.source("host") == "environment variable MCP0_HOST"
    assert settings.source("page_size") == f"page_size in {config}"
    assert settings.source("rate_limit") == "the default"


def test_a_mistyped_mcp0_variable_is_warned_of_naming_the_nearest_setting(tmp_path: Path) -> None:
    # An unknown key of mcp0.toml is an error, but MCP0_RATELIMIT was ignored without a word
    # (found by review)
    environ = {
        "MCP0_RATELIMIT": "5",
        "MCP0_BOGUS": "1",
        "MCP0_PORT": "9000",  # a setting
        "MCP0_TOKEN": "mcp0_x",  # a stdio session's, no setting
        "MCP0_PARENT_PID": "1",  # a plugin worker's
        "MCP0_TOKN": "mcp0_x",  # (a stdio session's, mistyped)
        "PATH": "/bin",
    }
    assert stray_variables(environ) == [
        "environment variable MCP0_BOGUS is no setting, and is ignored: see docs/configuration.md",
        "environment variable MCP0_RATELIMIT is no setting, and is ignored: did you mean "
        "MCP0_RATE_LIMIT?",
        "environment variable MCP0_TOKN is no setting, and is ignored: did you mean MCP0_TOKEN?",
    ]
    result = CliRunner().invoke(
        main,
        ["agent", "list", "--data-dir", str(tmp_path / "none")],
        env={"MCP0_DATADIR": str(tmp_path)},
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "mcp0: warning: environment variable MCP0_DATADIR is no setting, and is ignored: did "
        "you mean MCP0_DATA_DIR?\nmcp0: error: no MCP-ZERO data dir at "
    )


def test_mcp0_serve_refuses_anonymous_off_loopback_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--host",
            "0.0.0.0",
            "--anonymous-agent",
            "guest",
        ],
    )
    assert result.exit_code != 0
    assert "loopback" in result.output
    assert "Traceback" not in result.output


def test_serve_leaves_the_event_loop_policy_of_its_process_as_it_was(tmp_path: Path) -> None:
    # serve made uvloop the process's policy: in one pytest process the stdio tests that came
    # after it failed on uvloop handles left behind (and an embedder's loop would change)
    before = asyncio.get_event_loop_policy()
    result = CliRunner().invoke(
        main,
        ["serve", "--data-dir", str(tmp_path / "d"), "--host", "0.0.0.0", "--anonymous-agent", "a"],
    )
    assert result.exit_code != 0
    assert asyncio.get_event_loop_policy() is before


def test_plain_http_off_loopback_gets_a_warning_and_https_or_loopback_none(
    tmp_path: Path,
) -> None:
    from mcp_zero.cli.serve import plain_http_warning

    exposed = load_settings(None, {"host": "0.0.0.0"}, environ={})
    warning = plain_http_warning(exposed, ["0.0.0.0"])
    assert warning is not None
    assert "--tls-cert" in warning
    everywhere = plain_http_warning(load_settings(None, {"host": ""}, environ={}), ["0.0.0.0"])
    assert everywhere is not None
    assert everywhere.startswith("serving plain HTTP on every interface (0.0.0.0): ")
    assert plain_http_warning(load_settings(None, {}, environ={}), ["127.0.0.1"]) is None
    tls = {"host": "0.0.0.0", "tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k.pem"}
    assert plain_http_warning(load_settings(None, tls, environ={}), ["0.0.0.0"]) is None


def test_tls_cert_and_key_go_together() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        load_settings(None, {"tls_cert": "c.pem"}, environ={})
    env = {"MCP0_TLS_CERT": "c.pem", "MCP0_TLS_KEY": "k.pem"}
    settings = load_settings(None, None, environ=env)
    assert (settings.tls_cert, settings.tls_key) == (Path("c.pem"), Path("k.pem"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("port = true", "whole number"),  # was port 1
        ("port = 1.5", "whole number"),  # was port 1
        ("examples = 'treu'", "true or false"),  # was false
        ("data_dir = ''", "give a path"),  # was the current directory
        ("allowed_origins = [1, 2]", "list of strings"),
        ("host = 8", "give a string"),
        # TOML has numbers, booleans and arrays: a string is none of them (found by review)
        ("port = '19014'", "whole number"),
        ("examples = 'true'", "true or false"),
        ("max_timeout_s = '2.5'", "give a number"),
        ("allowed_origins = 'https://a.example, https://b.example'", "list of strings"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_not_bent(
    tmp_path: Path, text: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(write(tmp_path, f"[server]\n{text}\n"), None, environ={})


def test_a_bad_file_value_is_refused_also_when_a_later_source_sets_it(tmp_path: Path) -> None:
    # A broken file went unnoticed while --port or MCP0_PORT overrode it (found by review)
    config = write(tmp_path, "[server]\nport = true\nexamples = 'treu'\n")
    with pytest.raises(ConfigError, match="'port'"):
        load_settings(config, {"port": 19071}, environ={"MCP0_PORT": "19072"})
    with pytest.raises(ConfigError, match="'port'"):
        load_settings(None, {"port": 19071}, environ={"MCP0_PORT": "abc"})
    # out of range, an unknown level, no such user: the same (found by the fix's review)
    for text, env, says in (
        ("port = 99999", {"MCP0_PORT": "19072"}, "'port' is 99999"),
        ("log_level = 'bogus'", {"MCP0_LOG_LEVEL": "info"}, "'log_level'"),
        ("rate_limit = -5", {"MCP0_RATE_LIMIT": "5"}, "'rate_limit' is -5"),
        ("worker_user = 'no-such-user-x'", {"MCP0_WORKER_USER": "nobody"}, "'worker_user'"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_settings(write(tmp_path, f"[server]\n{text}\n"), None, environ=env)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MCP0_PORT", "1_8731", "whole number"),
        # (float() took these as 1000 and 10, which whole numbers refuse: found by review)
        ("MCP0_RATE_LIMIT", "1_000", "give a number"),
        ("MCP0_RATE_LIMIT", "\u0661\u0660", "give a number"),
        ("MCP0_SHUTDOWN_GRACE_S", "nan", "give a number"),
        ("MCP0_EXAMPLES", "treu", "true or false"),
        ("MCP0_METRICS_PUBLIC", "public", "true or false"),
    ],
)
def test_an_environment_value_of_the_wrong_kind_is_refused(
    name: str, value: str, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(None, None, environ={name: value})


# The kinds of TOML value each setting takes; every other kind is a ConfigError naming it.
_KINDS: dict[str, set[str]] = {
    **{n: {"int"} for n in ("port", "max_body_bytes", "rate_burst", "max_concurrency")},
    **{
        n: {"int"}
        for n in ("max_workers", "db_max_mb", "audit_max_batch", "page_size", "sse_buffer_bytes")
    },
    **{n: {"int"} for n in ("max_sessions", "max_sessions_per_agent")},
    **{n: {"int", "float"} for n in ("rate_limit", "max_timeout_s", "shutdown_grace_s")},
    **{n: {"int", "float"} for n in ("audit_window_ms", "session_idle_s")},
    "max_restart_backoff_s": {"int", "float"},
    **{n: {"bool"} for n in ("examples", "metrics_public")},
    **{n: {"str"} for n in ("data_dir", "tls_cert", "tls_key", "host", "anonymous_agent")},
    "log_level": set(),  # a string, but "x" is no level
    "worker_user": set(),  # a string, but "x" is no user
    "allowed_origins": {"str", "list"},
}
_VALUES = {
    "int": "5",
    "float": "2.5",
    "bool": "true",
    "str": "'x'",
    "list": "['a']",
    "table": "{ a = 1 }",
    "date": "2026-11-26",
    "list of tables": "[{ a = 1 }]",
}


def test_every_setting_is_in_the_table_of_kinds() -> None:
    assert set(_KINDS) == set(SETTING_NAMES)
    assert set(SETTING_NAMES) == {f.name for f in fields(Settings)} - {"_sources"}


@pytest.mark.parametrize(
    ("name", "kind"),
    [(n, k) for n in sorted(_KINDS) for k in _VALUES if k not in _KINDS[n]],
)
def test_a_setting_of_a_kind_it_does_not_take_is_a_config_error_naming_it(
    tmp_path: Path, name: str, kind: str
) -> None:
    # tls_cert = 5 was a TypeError traceback; anonymous_agent = 5 was taken as it was
    text = f"{name} = {_VALUES[kind]}\n"
    if name in ("tls_cert", "tls_key"):  # (they go together)
        text += f"{'tls_key' if name == 'tls_cert' else 'tls_cert'} = 'x'\n"
    with pytest.raises(ConfigError, match=f"setting '{name}' is "):
        load_settings(write(tmp_path, text), None, environ={})


def test_a_whole_number_with_thousands_of_digits_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'port' is 9999"):  # was int()'s ValueError
        load_settings(None, None, environ={"MCP0_PORT": "9" * 5000})


def test_a_leading_tilde_in_a_path_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = write(
        tmp_path, "data_dir = '~/mcp0'\ntls_cert = '~/tls/cert.pem'\ntls_key = '~/tls/key.pem'\n"
    )
    settings = load_settings(config, None, environ={})
    assert settings.data_dir == tmp_path / "home" / "mcp0"  # was a directory named ~
    assert settings.tls_cert == tmp_path / "home" / "tls" / "cert.pem"
    assert settings.tls_key == tmp_path / "home" / "tls" / "key.pem"
    from_env = load_settings(None, None, environ={"MCP0_DATA_DIR": "~/env"})
    assert from_env.data_dir == tmp_path / "home" / "env"
    with pytest.raises(ConfigError, match="'data_dir' is '~no-such-user-here/x'"):
        load_settings(None, None, environ={"MCP0_DATA_DIR": "~no-such-user-here/x"})


@pytest.mark.parametrize("option", ["--data-dir", "--tls-cert", "--tls-key"])
def test_an_empty_path_option_is_refused_like_an_empty_setting(tmp_path: Path, option: str) -> None:
    mcp0 = str(Path(sys.executable).parent / "mcp0")
    served = subprocess.run(
        [mcp0, "serve", "--port", "0", option, ""],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,  # (it served, from a data dir laid out in the cwd)
    )
    assert served.returncode == 2
    assert served.stderr.endswith(
        f"mcp0: error: invalid value for '{option}': it is empty; give a path\n"
    )
    assert list(tmp_path.iterdir()) == []
    created = subprocess.run(
        [mcp0, "agent", "create", "ada", "--data-dir", ""],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 2
    assert created.stderr.endswith(
        "mcp0: error: invalid value for '--data-dir': it is empty; give a path\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_worker_user_must_name_a_user_of_the_system() -> None:
    assert load_settings(None, None, environ={}).worker_user == "nobody"
    assert load_settings(None, None, environ={"MCP0_WORKER_USER": "root"}).worker_user == "root"
    with pytest.raises(ConfigError, match=r"'worker_user' is no-such-user-here .*names no user"):
        load_settings(None, None, environ={"MCP0_WORKER_USER": "no-such-user-here"})


# A user in root's group, added for this check only: to a copy of /etc/passwd mounted over
# it in a mount namespace of the child's own (the system's is left as it is).
ROOT_GROUP_USER = """
set -e
cp /etc/passwd "$1/passwd"
echo 'wheelie:x:5100:0::/nonexistent:/usr/sbin/nologin' >> "$1/passwd"
mount --bind "$1/passwd" /etc/passwd
exec "$2" -c '
from mcp_zero.config import load_settings
from mcp_zero.errors import ConfigError
try:
    load_settings(None, None, environ={"MCP0_WORKER_USER": "wheelie"})
except ConfigError as exc:
    print(exc)
'
"""


def test_a_worker_user_in_roots_group_is_refused(tmp_path: Path) -> None:
    # its workers would read the files of root's group (found by review)
    require_root("unshare")
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", ROOT_GROUP_USER, "-", str(tmp_path), sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "'worker_user' is wheelie (environment variable MCP0_WORKER_USER), whose group is "
        "root's (gid 0)"
    ) in done.stdout


@pytest.mark.parametrize(
    ("host", "url"),
    [("::1", "http://[::1]:8390/mcp"), ("127.0.0.1", "http://127.0.0.1:8390/mcp")],
)
def test_the_announced_url_brackets_an_ipv6_host(
    host: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # (http://::1:8390/mcp is no URL: found by review)
    from mcp_zero.cli.serve import _announce
    from mcp_zero.runtime import FirstStart

    settings = load_settings(None, {"host": host}, environ={})
    _announce(settings, 8390, FirstStart([], None), admin_closed=False, as_json=True)
    announced = json.loads(capsys.readouterr().out)
    assert (announced["url"], announced["every_interface"]) == (url, False)


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("", "http://127.0.0.1:8390/mcp"),
        ("0.0.0.0", "http://127.0.0.1:8390/mcp"),
        ("0", "http://127.0.0.1:8390/mcp"),  # (inet_aton's spelling of it)
        ("::", "http://[::1]:8390/mcp"),
        ("0::0", "http://[::1]:8390/mcp"),
    ],
)
def test_a_server_on_every_interface_announces_a_url_to_connect_to(
    host: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--host ""` was announced as http://:8390/mcp, and 0.0.0.0 as a URL to connect to
    from mcp_zero.cli.serve import _announce
    from mcp_zero.runtime import FirstStart

    settings = load_settings(None, {"host": host}, environ={})
    _announce(settings, 8390, FirstStart([], None), admin_closed=False, as_json=True)
    announced = json.loads(capsys.readouterr().out)
    assert (announced["url"], announced["every_interface"]) == (url, True)
    _announce(settings, 8390, FirstStart([], None), admin_closed=False, as_json=False)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"mcp0 listening on every interface, port 8390; on this machine: {url}"
    )


def test_every_mcp0_variable_the_source_names_is_a_setting_or_known_to_be_none() -> None:
    # A variable the server sets for its workers, added without its entry in
    # OTHER_VARIABLES, is warned of as a mistyped setting in a plugin's own mcp0 subprocess
    from mcp_zero.config import OTHER_VARIABLES, SETTING_NAMES

    source = Path(__file__).parents[1] / "src" / "mcp_zero"
    named = {
        name
        for path in source.rglob("*.py")
        for name in re.findall(r"[\"'](MCP0_[A-Z][A-Z0-9_]*)[\"']", path.read_text())
    }
    settings = {f"MCP0_{name.upper()}" for name in SETTING_NAMES}
    assert named - settings - OTHER_VARIABLES == set()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_anonymous_agent_is_none(tmp_path: Path, value: str) -> None:
    # (an empty MCP0_ANONYMOUS_AGENT named agent '': every token-less request was refused as
    # that agent's, past the start's checks; found by review)
    assert (
        load_settings(None, None, environ={"MCP0_ANONYMOUS_AGENT": value}).anonymous_agent is None
    )
    text = f"anonymous_agent = '{value}'\n"
    assert load_settings(write(tmp_path, text), None, environ={}).anonymous_agent is None


def test_plain_decimal_spellings_are_numbers() -> None:
    for value, number in (("2.5", 2.5), (".5", 0.5), ("5.", 5.0), ("+1e3", 1000.0), ("7", 7.0)):
        settings = load_settings(None, None, environ={"MCP0_RATE_LIMIT": value})
        assert settings.rate_limit == number
