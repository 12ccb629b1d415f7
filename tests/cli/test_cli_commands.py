"""The `mcp0` commands on a real data dir, through click's runner: their `--json` shapes,
their errors (one line, non-zero exit), and what they change."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner, Result

import mcp_zero.data_dir as claims
from full_disk import on_a_full_disk
from mcp_zero.audit.log import AuditLog
from mcp_zero.cli.main import AUDIT_LIST_PAGE, main
from mcp_zero.cli.serve import runtime_on
from mcp_zero.config import load_settings
from mcp_zero.kernel.action import Outcome
from mcp_zero.kernel.admin import CHANGE_ADMIN_TOKEN, admin_event
from mcp_zero.kernel.plugins import REPLACED_COPY_KEPT_S
from mcp_zero.rpc.admin import _NoBridge
from mcp_zero.runtime import Runtime
from mcp_zero.security.tokens import hash_token
from mcp_zero.storage.sqlite import SqliteStore
from plugin_builders import loading_plugin

MCP0 = str(Path(sys.executable).parent / "mcp0")
NOTES_DIR = Path(__file__).parents[2] / "src" / "mcp_zero" / "examples" / "plugins" / "notes"
FAULTY_DIR = Path(__file__).parents[1] / "plugins" / "faulty"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def run(data_dir: Path, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, [*args, "--data-dir", str(data_dir)], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def as_json(data_dir: Path, *args: str) -> Any:
    return json.loads(run(data_dir, *args, "--json").stdout)


def test_plugin_commands_print_their_documented_shapes(data_dir: Path) -> None:
    installed = as_json(data_dir, "plugin", "install", str(NOTES_DIR))
    assert installed["name"] == "notes"
    assert "notes_add" in installed["tools"]
    listed = as_json(data_dir, "plugin", "list")
    assert [p["name"] for p in listed] == ["notes"]
    shown = as_json(data_dir, "plugin", "show", "notes")
    tools = {t["name"]: t for t in shown["tools"]}
    assert tools["notes_add"]["inputSchema"]["type"] == "object"
    assert tools["notes_add"]["description"]
    run(data_dir, "agent", "create", "reader", "--plugin", "notes")
    removed = as_json(data_dir, "plugin", "remove", "notes")
    assert removed == {
        "name": "notes",
        "removed": True,
        "detached_from": ["reader"],
        "data_kept": None,  # (it never ran: it has no data)
    }
    assert as_json(data_dir, "plugin", "list") == []
    assert as_json(data_dir, "agent", "show", "reader")["plugins"] == []


def named_plugin(tmp_path: Path, module: str) -> Path:
    """A valid one-tool plugin whose entry module is ``module``."""
    source = tmp_path / f"plugin-{module}"
    source.mkdir()
    (source / f"{module}.py").write_text(
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('clash')\n"
        "@plugin.tool('clash_echo')\n"
        "def echo(ctx, text: str = 'x') -> str:\n"
        "    return text\n"
    )
    manifest = {
        "name": "clash",
        "version": "1.0.0",
        "abi": 1,
        "entry": f"{module}:plugin",
        "tools": [{"name": "clash_echo", "description": "echo", "inputSchema": {"type": "object"}}],
    }
    (source / "plugin.json").write_text(json.dumps(manifest))
    return source


@pytest.mark.parametrize(
    ("module", "clash"),
    [
        ("json", "a module of Python's standard library"),  # the worker has imported it
        ("csv", "a module of Python's standard library"),  # it has not: the plugin's hides it
        ("mcp_zero", "a module the plugin worker itself imports"),
    ],
)
def test_a_plugin_module_named_like_a_stdlib_or_worker_module_is_refused_at_install(
    data_dir: Path, tmp_path: Path, module: str, clash: str
) -> None:
    # It installed, and then could not load: the worker's json was found, not the plugin's.
    refused = run(data_dir, "plugin", "install", str(named_plugin(tmp_path, module)), ok=False)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"mcp0: error: plugin.json: entry: module {module!r} has the name of {clash}: in the "
        f"worker one would hide the other; rename the plugin's module (e.g. to "
        f"plugin_{module}.py) and its entry\n"
    )
    assert not data_dir.exists()  # (refused on a new data dir: none is left)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (  # installed, then tools/list failed (-32603) for every agent it was attached to
            {
                "tools": [
                    {
                        "name": "clash_echo",
                        "description": "echo",
                        "inputSchema": {"type": "object"},
                        "annotations": {"deep": json.loads("[" * 600 + "]" * 600)},
                    }
                ]
            },
            "plugin.json: tools[0].annotations.deep…: nests deeper than 64 levels of arrays "
            "and objects (plugin.json may nest at most 64)",
        ),
        (  # silently the default quotas
            {"quota": {"timeout_ms": 100}},
            "plugin.json: quota: unknown key; a manifest has name, version, abi, runtime, entry, "
            "description, publisher, capabilities, quotas, tools, resources, resourceTemplates, "
            "prompts",
        ),
        ({"runtime": []}, "plugin.json: runtime: must be a string, not list"),  # was a traceback
        (  # echoed whole: a 5,000-character line (found by review)
            {"version": "1" + "x" * 5000},
            f"plugin.json: version: {'1' + 'x' * 63!r}… (5001 characters) is not a version "
            "(e.g. 1.2.0)",
        ),
    ],
)
def test_a_manifest_the_server_could_not_serve_is_refused_at_install(
    data_dir: Path, tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    source = named_plugin(tmp_path, "clash_plugin")
    manifest = json.loads((source / "plugin.json").read_text())
    (source / "plugin.json").write_text(json.dumps({**manifest, **change}))
    refused = run(data_dir, "plugin", "install", str(source), ok=False)
    assert refused.exit_code == 1
    assert refused.stderr == f"mcp0: error: {error}\n"
    assert not data_dir.exists()  # (refused on a new data dir: none is left)


def test_common_options_may_come_before_the_command(data_dir: Path, tmp_path: Path) -> None:
    # "Every command takes --data-dir": before the command it was "no such option"
    runner = CliRunner()
    given = ["--data-dir", str(data_dir), "--json"]
    installed = runner.invoke(main, [*given, "plugin", "install", str(NOTES_DIR)])
    assert installed.exit_code == 0, installed.output
    assert json.loads(installed.stdout)["name"] == "notes"
    # given in both places, the value after the command's name is used
    elsewhere = ["--data-dir", str(tmp_path / "elsewhere")]
    listed = runner.invoke(main, [*elsewhere, "plugin", "list", "--json", *given])
    assert [p["name"] for p in json.loads(listed.stdout)] == ["notes"]


def test_nan_in_a_manifest_is_refused_so_plugin_show_prints_json(
    data_dir: Path, tmp_path: Path
) -> None:
    # Python's json reads NaN; it installed, and plugin show --json printed it (not JSON)
    source = named_plugin(tmp_path, "clash_plugin")
    text = (source / "plugin.json").read_text()
    with_nan = text.replace(
        '"description": "echo"', '"description": "echo", "annotations": {"r": NaN}'
    )
    (source / "plugin.json").write_text(with_nan)
    refused = run(data_dir, "plugin", "install", str(source), ok=False)
    assert refused.exit_code == 1
    assert refused.stderr == (
        "mcp0: error: plugin.json: tools[0].annotations.r: NaN is not a JSON number "
        "(JSON has no NaN or Infinity)\n"
    )
    (source / "plugin.json").write_text(with_nan.replace("NaN", "0.5"))
    run(data_dir, "plugin", "install", str(source))
    shown = run(data_dir, "plugin", "show", "clash", "--json").stdout
    tool = json.loads(shown, parse_constant=lambda c: pytest.fail(f"{c} in plugin show"))["tools"][
        0
    ]
    assert tool["annotations"] == {"r": 0.5}


@pytest.mark.parametrize(
    ("special", "kind"), [("fifo", "a named pipe (FIFO)"), ("socket", "a socket")]
)
def test_a_fifo_or_socket_in_a_plugin_is_one_clear_error(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, special: str, kind: str
) -> None:
    # shutil.copytree cannot copy them: install died with a shutil.Error traceback
    source = named_plugin(tmp_path, "clash_plugin")
    (source / "cache").mkdir()
    if special == "fifo":
        os.mkfifo(source / "cache" / "feed")
    else:
        monkeypatch.chdir(source / "cache")  # a socket path is short (108 bytes at most)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind("feed")
        listener.close()
    refused = run(data_dir, "plugin", "install", str(source), ok=False)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"mcp0: error: cache/feed in {source} is {kind}: a plugin directory may hold only "
        "regular files and directories; remove it, or move it out of the plugin\n"
    )
    assert not data_dir.exists()  # (refused on a new data dir: none is left)
    assert not (data_dir / "plugins" / "clash").exists()  # refused before anything was copied


def refused_install(data_dir: Path, source: Path) -> str:
    """``mcp0 plugin install source`` in a process of its own (bounded: a hang fails): its
    one line of error, checked to be that and no traceback."""
    done = subprocess.run(
        [MCP0, "plugin", "install", str(source), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("mcp0: error: "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.removeprefix("mcp0: error: ").rstrip("\n")


@pytest.mark.parametrize("where", ["plugin.json", "clash_plugin.py"])
def test_a_named_pipe_as_the_manifest_or_the_entry_module_is_refused_without_reading_it(
    data_dir: Path, tmp_path: Path, where: str
) -> None:
    # plugin.json was read before the tree was checked: a pipe as plugin.json hung the
    # install for good, and a pipe as the module was "module file ... not found"
    source = named_plugin(tmp_path, "clash_plugin")
    (source / where).unlink()
    os.mkfifo(source / where)
    said = refused_install(data_dir, source)
    assert (
        said
        == {
            "plugin.json": f"{source}/plugin.json: a named pipe (FIFO), not a regular file; "
            "plugin.json must be a file of JSON",
            "clash_plugin.py": f"plugin.json: entry: module file {source}/clash_plugin.py is a "
            "named pipe (FIFO), not a regular file",
        }[where]
    )
    assert not (data_dir / "plugins" / "clash").exists()


def test_a_file_name_that_is_not_utf8_is_one_clear_error(data_dir: Path, tmp_path: Path) -> None:
    # UnicodeEncodeError traceback (the copy's digest encoded the name)
    source = named_plugin(tmp_path, "clash_plugin")
    (source / "data").mkdir()
    (source / os.fsdecode(b"data/caf\xe9.txt")).write_text("latin-1 name")
    said = refused_install(data_dir, source)
    assert said == (
        f"data/caf\\xe9.txt in {source}: the name is not valid UTF-8 (bytes that cannot be "
        "decoded are shown escaped); rename the file, or move it out of the plugin"
    )
    assert not (data_dir / "plugins" / "clash").exists()


def test_a_file_where_the_plugins_copies_go_is_one_clear_error(
    data_dir: Path, tmp_path: Path
) -> None:
    # FileExistsError traceback from the mkdir of plugins/<name>
    run(data_dir, "agent", "create", "ada")  # lays out the data dir
    (data_dir / "plugins").mkdir(exist_ok=True)
    (data_dir / "plugins" / "clash").write_text("not a directory")
    said = refused_install(data_dir, named_plugin(tmp_path, "clash_plugin"))
    assert said == (
        f"cannot install plugin 'clash': {data_dir.absolute() / 'plugins' / 'clash'} is a file, "
        "where mcp0 keeps installed plugins' copies in a directory; move it out of the data dir"
    )
    assert as_json(data_dir, "plugin", "list") == []


def test_a_copy_that_fails_is_one_clear_error_and_leaves_nothing(
    data_dir: Path, tmp_path: Path
) -> None:
    # A write past RLIMIT_FSIZE fails with EFBIG (Python ignores SIGXFSZ): what a full disk
    # or an unreadable file does to the copy (root reads any file, so that one is not tried).
    source = named_plugin(tmp_path, "clash_plugin")
    (source / "model.bin").write_bytes(b"\0" * (4 << 20))
    run(data_dir, "plugin", "install", str(NOTES_DIR))  # the data dir exists before the limit
    limit = 2 << 20
    mcp0 = str(Path(sys.executable).parent / "mcp0")
    done = subprocess.run(
        [mcp0, "plugin", "install", str(source), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("mcp0: error: cannot copy plugin 'clash' from "), done.stderr
    assert "model.bin" in done.stderr
    assert "File too large" in done.stderr
    assert done.stderr.count("\n") == 1
    assert [p["name"] for p in as_json(data_dir, "plugin", "list")] == ["notes"]
    assert list((data_dir / "plugins" / "clash").iterdir()) == []  # the partial copy is gone


def test_agent_lifecycle_from_the_command_line(data_dir: Path) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    created = as_json(data_dir, "agent", "create", "ada")
    assert created["name"] == "ada"
    assert created["token"].startswith("mcp0_")
    assert as_json(data_dir, "agent", "attach", "ada", "notes")["plugins"] == ["notes"]
    snap = as_json(data_dir, "agent", "snapshot", "ada")
    assert snap["snapshot_id"].startswith("snap_")
    assert as_json(data_dir, "agent", "terminate", "ada")["status"] == "terminated"
    assert as_json(data_dir, "agent", "show", "ada")["status"] == "terminated"
    recovered = as_json(data_dir, "agent", "recover", snap["snapshot_id"])
    assert recovered["status"] == "active"
    assert recovered["plugins"] == ["notes"]
    assert [a["name"] for a in as_json(data_dir, "agent", "list")] == ["ada"]
    # the token is never shown again
    assert "token" not in as_json(data_dir, "agent", "show", "ada")


def test_agent_show_prints_the_plugins_and_state_as_json(data_dir: Path) -> None:
    # It printed Python's reprs: plugins: ['notes'], state: {'k': [1, True, None]} (found by
    # review)
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    runtime = Runtime(load_settings(None, {"data_dir": data_dir}, environ={}))
    try:
        asyncio.run(runtime.agents.spawn("ada", ["notes"], {"k": [1, True, None]}))
    finally:
        runtime.close()
    shown = run(data_dir, "agent", "show", "ada").stdout.splitlines()
    assert shown[:4] == [
        "name: ada",
        'plugins: ["notes"]',
        'state: {"k": [1, true, null]}',
        "status: active",
    ]


@pytest.mark.parametrize("change", ["removed, then another installed", "replaced"])
def test_recover_does_not_attach_another_plugin_installed_under_the_same_name(
    data_dir: Path, tmp_path: Path, change: str
) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    snap = as_json(data_dir, "agent", "snapshot", "ada")
    other = tmp_path / "other-notes"  # someone else's "notes"
    shutil.copytree(NOTES_DIR, other, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((other / "plugin.json").read_text())
    (other / "plugin.json").write_text(json.dumps({**manifest, "version": "9.0.0"}))
    if change == "replaced":
        run(data_dir, "plugin", "install", str(other), "--replace")
    else:
        run(data_dir, "plugin", "remove", "notes")
        run(data_dir, "plugin", "install", str(other))
    # It was attached again by name: the agent got a plugin nobody attached to it.
    recovered = as_json(data_dir, "agent", "recover", snap["snapshot_id"])
    assert recovered["plugins"] == []
    reason = (
        f"the plugin installed under this name now (version 9.0.0) is not the one the "
        f"snapshot saw (version {manifest['version']}); attach it again ('mcp0 agent attach') "
        "if the agent is to have it"
    )
    assert recovered["not_restored"] == [{"plugin": "notes", "reason": reason}]
    assert as_json(data_dir, "agent", "show", "ada")["plugins"] == []
    said = run(data_dir, "agent", "recover", snap["snapshot_id"]).stdout
    assert f"not attached again: notes: {reason}" in said
    audited = [r for r in as_json(data_dir, "audit", "list") if r["verb"] == "recover_agent"]
    # the record shows them as the answer does (it was an object: found by review)
    assert audited[-1]["not_restored"] == [{"plugin": "notes", "reason": reason}]


def test_a_plugin_installed_under_a_removed_ones_name_gets_its_data_only_when_told(
    data_dir: Path, tmp_path: Path
) -> None:
    # Someone else's "notes" installed after the removal of the example read alice's notes
    # (found by review)
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "alice", "--plugin", "notes")
    run(data_dir, "agent", "exec", "alice", "notes_add", '{"text": "alice private"}')
    removed = as_json(data_dir, "plugin", "remove", "notes")
    kept = Path(removed["data_kept"])  # set aside, where no plugin of the name looks
    assert kept.parent == data_dir / "plugin-data"
    assert kept.name.startswith("notes.removed-")
    assert not (data_dir / "plugin-data" / "notes").exists()
    other = tmp_path / "other-notes"
    shutil.copytree(NOTES_DIR, other, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((other / "plugin.json").read_text())
    (other / "plugin.json").write_text(json.dumps({**manifest, "version": "6.6.6"}))
    run(data_dir, "plugin", "install", str(other))
    run(data_dir, "agent", "attach", "alice", "notes")
    listed = as_json(data_dir, "agent", "exec", "alice", "notes_list", "{}")
    assert listed["structuredContent"]["notes"] == []  # another plugin: none of her notes
    again = as_json(data_dir, "plugin", "remove", "notes")["data_kept"]
    # the operator who removed it installs it again, with its data: the last set aside
    # (the other's, which had none, is left where its removal put it)
    shutil.rmtree(again)
    run(data_dir, "plugin", "install", str(NOTES_DIR), "--adopt-data")
    run(data_dir, "agent", "attach", "alice", "notes")
    listed = as_json(data_dir, "agent", "exec", "alice", "notes_list", "{}")
    assert [n["text"] for n in listed["structuredContent"]["notes"]] == ["alice private"]
    records = as_json(data_dir, "audit", "list")
    removals = [r for r in records if r["verb"] == "remove_plugin"]
    assert [r["data_kept"] for r in removals] == [kept.name, Path(again).name]
    installs = [r for r in records if r["verb"] == "install_plugin"]
    assert [r.get("adopted_data") for r in installs] == [None, None, kept.name]


def set_aside_twice(data_dir: Path) -> list[str]:
    """Plugin notes installed and removed twice, its data dir holding "first", then "second":
    the names of the two data dirs its removals set aside, oldest first."""
    kept = []
    for text in ("first", "second"):
        run(data_dir, "plugin", "install", str(NOTES_DIR))
        (data_dir / "plugin-data" / "notes").mkdir(parents=True)
        (data_dir / "plugin-data" / "notes" / "data.txt").write_text(text)
        kept.append(Path(as_json(data_dir, "plugin", "remove", "notes")["data_kept"]).name)
    return kept


def test_adopt_data_takes_the_set_aside_dir_it_names_and_will_not_choose_among_several(
    data_dir: Path,
) -> None:
    # It took the last one set aside, whichever plugin of the name had left it (found by
    # review)
    first, second = set_aside_twice(data_dir)
    refused = run(data_dir, "plugin", "install", str(NOTES_DIR), "--adopt-data", ok=False)
    assert refused.exit_code == 1
    assert f"left data in {data_dir / 'plugin-data'}: {first}, {second}; name" in refused.stderr
    assert as_json(data_dir, "plugin", "list") == []
    unknown = run(
        data_dir, "plugin", "install", "--adopt-data", "notes.removed-x", str(NOTES_DIR), ok=False
    )
    assert unknown.exit_code == 1
    assert "no data dir 'notes.removed-x' of plugin 'notes'" in unknown.stderr
    run(data_dir, "plugin", "install", "--adopt-data", first, str(NOTES_DIR))
    assert (data_dir / "plugin-data" / "notes" / "data.txt").read_text() == "first"
    [install] = [r for r in as_json(data_dir, "audit", "list") if r.get("adopted_data")]
    assert install["adopted_data"] == first
    # now one holds data: the bare flag, even before PATH, takes it
    run(data_dir, "plugin", "remove", "notes")
    run(data_dir, "plugin", "purge-data", second)
    run(data_dir, "plugin", "install", "--adopt-data", str(NOTES_DIR))
    assert (data_dir / "plugin-data" / "notes" / "data.txt").read_text() == "first"


def test_plugin_install_counts_the_tools_in_words(data_dir: Path, tmp_path: Path) -> None:
    # "(1 tools)" (found by a docs review)
    one = run(data_dir, "plugin", "install", str(named_plugin(tmp_path, "clash_plugin")))
    assert one.stdout == "installed clash 1.0.0 (1 tool)\n"
    four = run(data_dir, "plugin", "install", str(NOTES_DIR))
    assert four.stdout.startswith("installed notes 0.1.0 (4 tools)")


def test_plugin_install_says_which_data_dir_it_adopted(data_dir: Path) -> None:
    # A bare --adopt-data chose the set-aside dir and said nothing of it but in the audit log
    # (found by a docs review)
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    (data_dir / "plugin-data" / "notes").mkdir(parents=True)
    (data_dir / "plugin-data" / "notes" / "data.txt").write_text("kept")
    kept = Path(as_json(data_dir, "plugin", "remove", "notes")["data_kept"]).name
    adopted = run(data_dir, "plugin", "install", str(NOTES_DIR), "--adopt-data")
    assert adopted.stdout.endswith(f"; it adopted the data in plugin-data/{kept}\n")
    run(data_dir, "plugin", "remove", "notes")
    run(data_dir, "plugin", "purge-data", "--older-than", "0")
    none = run(data_dir, "plugin", "install", str(NOTES_DIR), "--adopt-data")
    assert none.stdout.endswith("; there was no data set aside to adopt\n")
    (data_dir / "plugin-data" / "notes").mkdir()
    (data_dir / "plugin-data" / "notes" / "data.txt").write_text("again")
    kept = Path(as_json(data_dir, "plugin", "remove", "notes")["data_kept"]).name
    installed = as_json(data_dir, "plugin", "install", str(NOTES_DIR), "--adopt-data")
    assert installed["adopted_data"] == kept
    run(data_dir, "plugin", "remove", "notes")
    assert as_json(data_dir, "plugin", "install", str(NOTES_DIR))["adopted_data"] is None


def test_removed_data_lists_what_removals_set_aside_and_purge_data_deletes_it_audited(
    data_dir: Path,
) -> None:
    first, second = set_aside_twice(data_dir)
    listed = as_json(data_dir, "plugin", "removed-data")
    assert [(e["name"], e["dir"], e["bytes"]) for e in listed] == [
        ("notes", first, len("first")),
        ("notes", second, len("second")),
    ]
    assert listed[0]["path"] == str(data_dir / "plugin-data" / first)
    assert listed[0]["removed_at"] < listed[1]["removed_at"]
    assert listed[0]["removed_at"].endswith("Z")
    assert run(data_dir, "plugin", "removed-data").stdout.splitlines()[1].startswith(second)
    purged = as_json(data_dir, "plugin", "purge-data", first)
    assert purged == {"purged": [listed[0]]}
    assert not (data_dir / "plugin-data" / first).exists()
    assert as_json(data_dir, "plugin", "purge-data", "--older-than", "1") == {"purged": []}
    assert as_json(data_dir, "plugin", "purge-data", "--older-than", "0") == {"purged": [listed[1]]}
    assert os.listdir(data_dir / "plugin-data") == []
    assert run(data_dir, "plugin", "removed-data").stdout == "no data set aside\n"
    records = [r for r in as_json(data_dir, "audit", "list") if r["verb"] == "purge_plugin_data"]
    assert [(r["resource"], r["data_purged"], r["bytes"]) for r in records] == [
        ("notes", first, len("first")),
        ("notes", second, len("second")),
    ]
    assert all(r["outcome"] == "allowed" for r in records)


def test_removed_data_and_purge_data_set_back_a_purge_cut_short_before_its_record(
    data_dir: Path,
) -> None:
    # renamed as its purge began, which was killed before its record (found by review)
    first, second = set_aside_twice(data_dir)
    where = data_dir / "plugin-data"
    os.rename(where / first, where / f".purging-0-{first}")
    assert [e["dir"] for e in as_json(data_dir, "plugin", "removed-data")] == [first, second]
    os.rename(where / first, where / f".purging-0-{first}")
    purged = as_json(data_dir, "plugin", "purge-data", first)
    assert [e["dir"] for e in purged["purged"]] == [first]
    assert os.listdir(where) == [second]


def test_removed_data_lists_on_a_data_dir_it_may_not_write(data_dir: Path) -> None:
    # Its setting back of a purge cut short failed for a user who may only read, after a
    # warning that it had been set back (found by review)
    first, second = set_aside_twice(data_dir)
    where = data_dir / "plugin-data"
    os.rename(where / first, where / f".purging-0-{first}")
    args = ("plugin", "removed-data", "--data-dir", str(data_dir), "--json")
    done = run_shut_out_of(where, *args, mode=0o500)  # (it may read it)
    assert done.returncode == 0, done.stderr
    assert [e["dir"] for e in json.loads(done.stdout)] == [second]
    assert "set aside again" not in done.stderr
    assert sorted(os.listdir(where)) == sorted([f".purging-0-{first}", second])


def test_recover_prints_a_reason_with_control_characters_escaped(data_dir: Path) -> None:
    # the one text output left unescaped (found by review)
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    snap = as_json(data_dir, "agent", "snapshot", "ada")
    (data_dir / "policies" / "no-notes.cedar").write_text(
        '@id("no-notes-attach")\n'
        '@reason("notes is \\u{1b}[31mbanned")\n'
        'forbid (principal, action == Action::"attach_plugin", resource)\n'
        'when { context has plugin && context.plugin == "notes" };\n'
    )
    said = run(data_dir, "agent", "recover", snap["snapshot_id"]).stdout
    assert "\x1b" not in said
    assert r"notes is \x1b[31mbanned" in said


def test_create_with_a_plugin_the_policy_forbids_to_attach_is_refused(data_dir: Path) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    (data_dir / "policies" / "no-notes.cedar").write_text(
        '@id("no-notes-attach")\n'
        '@reason("notes may not be granted to any agent")\n'
        'forbid (principal, action == Action::"attach_plugin", resource)\n'
        'when { context has plugin && context.plugin == "notes" };\n'
    )
    refused = run(data_dir, "agent", "create", "ada", "--plugin", "notes", ok=False)
    assert refused.exit_code != 0
    assert "notes may not be granted to any agent" in refused.output
    assert as_json(data_dir, "agent", "list") == []


def test_recover_that_would_terminate_an_agent_the_policy_keeps_is_refused(
    data_dir: Path,
) -> None:
    # It terminated the agent: only recover_agent was decided (found by review)
    run(data_dir, "agent", "create", "ada")
    active = as_json(data_dir, "agent", "snapshot", "ada")["snapshot_id"]
    run(data_dir, "agent", "terminate", "ada")
    terminated = as_json(data_dir, "agent", "snapshot", "ada")["snapshot_id"]
    run(data_dir, "agent", "recover", active)
    (data_dir / "policies" / "keep-ada.cedar").write_text(
        '@id("keep-ada")\n'
        '@reason("ada may not be terminated")\n'
        'forbid (principal, action == Action::"terminate_agent", resource == Agent::"ada");\n'
    )
    refused = run(data_dir, "agent", "recover", terminated, ok=False)
    assert refused.exit_code != 0
    assert 'policy "keep-ada" forbids' in refused.output
    assert "ada may not be terminated" in refused.output
    assert as_json(data_dir, "agent", "show", "ada")["status"] == "active"


def mcp0_in(cwd: Path, *args: str) -> Any:
    """``mcp0 ARGS --json`` run as a process in directory ``cwd``; its JSON output."""
    done = subprocess.run(
        [MCP0, *args, "--json"], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("recorded", ["by an install with a relative --data-dir", "relative"])
def test_a_plugin_installed_from_one_directory_is_used_and_removed_from_another(
    tmp_path: Path, recorded: str
) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    data = here / "data"
    if recorded == "relative":  # as installs before paths were kept absolute left it
        mcp0_in(here, "plugin", "install", str(NOTES_DIR), "--data-dir", str(data))
        with sqlite3.connect(data / "mcp0.db") as db:
            (path,) = db.execute("SELECT path FROM plugins").fetchone()
            db.execute("UPDATE plugins SET path = ?", (str(Path(path).relative_to(here)),))
    else:
        mcp0_in(here, "plugin", "install", str(NOTES_DIR), "--data-dir", "data")
    (copy,) = (data / "plugins" / "notes").iterdir()
    # a directory of the same name under the other working directory is not the plugin
    decoy = elsewhere / "data" / "plugins" / "notes" / copy.name
    decoy.mkdir(parents=True)
    (decoy / "keep.txt").write_text("not mcp0's")
    mcp0_in(elsewhere, "agent", "create", "ada", "--plugin", "notes", "--data-dir", str(data))
    added = mcp0_in(
        elsewhere, "agent", "exec", "ada", "notes_add", '{"text": "hi"}', "--data-dir", str(data)
    )
    assert added["structuredContent"]["note"]["text"] == "hi"
    mcp0_in(elsewhere, "plugin", "remove", "notes", "--data-dir", str(data))
    long_ago = time.time() - REPLACED_COPY_KEPT_S - 60  # no server drains it: let it go
    os.utime(copy, (long_ago, long_ago))
    mcp0_in(elsewhere, "agent", "terminate", "ada", "--data-dir", str(data))  # a start sweeps
    assert not copy.exists()
    assert (decoy / "keep.txt").read_text() == "not mcp0's"


def test_the_staging_copy_of_a_killed_install_is_swept_once_it_is_old(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")  # the data dir exists before the install dies
    # the install dies (kill -9, a reboot) once it has copied the plugin, before the rename
    dies_after_copy = (
        "import os, signal, sys\n"
        "from mcp_zero.cli.main import main\n"
        "from mcp_zero.kernel import plugins\n"
        "copy_tree = plugins._copy_tree\n"
        "def copy_and_die(*args, **kwargs):\n"
        "    copy_tree(*args, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "plugins._copy_tree = copy_and_die\n"
        "sys.argv = ['mcp0', *sys.argv[1:]]\n"
        "main()\n"
    )
    install = ["plugin", "install", str(NOTES_DIR), "--data-dir", str(data_dir)]
    done = subprocess.run(
        [sys.executable, "-c", dies_after_copy, *install],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9, done.stderr
    (staging,) = (data_dir / "plugins" / "notes").iterdir()
    assert staging.name.startswith(".")
    assert (staging / "plugin.json").is_file()
    # its time may be any (a copy kept the source's): its name says when it began
    long_ago = time.time() - REPLACED_COPY_KEPT_S - 60
    os.utime(staging, (long_ago, long_ago))
    run(data_dir, "agent", "create", "bob")  # a start: an install may still be copying
    assert staging.is_dir()
    started = int(staging.name.split("-")[1])
    assert abs(started - time.time()) < 60
    old = staging.with_name(staging.name.replace(f"-{started}-", f"-{int(long_ago)}-"))
    staging.rename(old)  # as if it had begun over two hours ago
    run(data_dir, "agent", "create", "cy")  # it was kept forever
    assert not old.exists()
    assert as_json(data_dir, "plugin", "list") == []


def test_recover_attaches_again_a_plugin_installed_before_digests_were_kept(
    data_dir: Path,
) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    with sqlite3.connect(data_dir / "mcp0.db") as db:  # as the migration adding it left it
        db.execute("UPDATE plugins SET digest = ''")
    snap = as_json(data_dir, "agent", "snapshot", "ada")
    run(data_dir, "agent", "terminate", "ada")
    recovered = as_json(data_dir, "agent", "recover", snap["snapshot_id"])
    assert (recovered["plugins"], recovered["not_restored"]) == (["notes"], [])
    # a snapshot taken before then did not say which copy it saw: that cannot be proven
    with sqlite3.connect(data_dir / "mcp0.db") as db:
        db.execute("UPDATE snapshots SET data = json_set(data, '$.plugin_copies.notes.sha256', '')")
    recovered = as_json(data_dir, "agent", "recover", snap["snapshot_id"])
    assert recovered["plugins"] == []
    assert (
        "which copy of it the snapshot saw is not known (an older install)"
        in (recovered["not_restored"][0]["reason"])
    )


def test_terminating_a_terminated_agent_is_an_error_and_audited_once(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")
    run(data_dir, "agent", "terminate", "ada")
    again = run(data_dir, "agent", "terminate", "ada", ok=False)
    assert again.exit_code == 1
    assert again.stderr == (
        "mcp0: error: agent 'ada' is already terminated; recover it from a snapshot "
        "('mcp0 agent recover SNAPSHOT_ID') to use it again\n"
    )
    verbs = [r["verb"] for r in as_json(data_dir, "audit", "list") if r["resource"] == "ada"]
    assert verbs == ["spawn_agent", "terminate_agent"]


def test_agent_rotate_token_prints_a_new_token_once_and_the_old_one_stops_working(
    data_dir: Path,
) -> None:
    created = as_json(data_dir, "agent", "create", "ada")
    rotated = as_json(data_dir, "agent", "rotate-token", "ada")
    assert rotated == {**created, "token": rotated["token"]}
    assert rotated["token"].startswith("mcp0_")
    assert rotated["token"] != created["token"]
    text = run(data_dir, "agent", "rotate-token", "ada").stdout
    assert text.startswith("agent ada has a new token (shown once); the old one no longer works")
    latest = text.splitlines()[-1]
    with SqliteStore(data_dir / "mcp0.db") as store:  # (the token a server looks up)
        revoked = (created["token"], rotated["token"])
        assert [store.agent_by_token_hash(hash_token(t)) for t in revoked] == [None, None]
        found = store.agent_by_token_hash(hash_token(latest))
    assert found is not None
    assert found.name == "ada"
    records = [r for r in as_json(data_dir, "audit", "list") if r["resource"] == "ada"]
    assert [(r["verb"], r["transport"]) for r in records] == [
        ("spawn_agent", "cli"),
        ("rotate_agent_token", "cli"),
        ("rotate_agent_token", "cli"),
    ]
    assert not any(t in json.dumps(records) for t in (created["token"], rotated["token"], latest))


def test_agent_rotate_token_of_an_unknown_agent_is_an_error_and_of_a_terminated_one_not(
    data_dir: Path,
) -> None:
    run(data_dir, "agent", "create", "ada")
    unknown = run(data_dir, "agent", "rotate-token", "bob", ok=False)
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("mcp0: error: no agent named 'bob'")
    run(data_dir, "agent", "terminate", "ada")
    terminated = as_json(data_dir, "agent", "rotate-token", "ada")
    assert terminated["status"] == "terminated"
    verbs = [r["verb"] for r in as_json(data_dir, "audit", "list") if r["resource"] == "ada"]
    assert verbs == ["spawn_agent", "terminate_agent", "rotate_agent_token"]


def test_agent_exec_runs_a_tool_through_the_governed_path(data_dir: Path) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    run(data_dir, "agent", "create", "bob")
    added = as_json(data_dir, "agent", "exec", "ada", "notes_add", '{"text": "from the cli"}')
    assert added["structuredContent"]["note"]["text"] == "from the cli"
    denied = run(data_dir, "agent", "exec", "bob", "notes_add", '{"text": "x"}', ok=False)
    assert denied.exit_code == 1
    assert "attached-plugins-only" in denied.stderr
    records = as_json(data_dir, "audit", "list")
    calls = [(r["agent"], r["outcome"]) for r in records if r["verb"] == "call_tool"]
    assert calls == [("ada", "allowed"), ("bob", "denied")]


def test_agent_exec_of_an_unknown_tool_points_to_the_commands_that_list_tools(
    data_dir: Path,
) -> None:
    # it told a command-line user to send tools/list (found by review)
    run(data_dir, "agent", "create", "ada")
    unknown = run(data_dir, "agent", "exec", "ada", "nope", ok=False)
    assert unknown.exit_code == 1
    assert unknown.stderr == (
        "mcp0: error: unknown tool 'nope': 'mcp0 plugin list' shows the plugins installed, "
        "'mcp0 plugin show PLUGIN' their tools\n"
    )
    [record] = as_json(data_dir, "audit", "list", "--limit", "1")
    assert (record["verb"], record["resource"], record["code"]) == (
        "call_tool",
        "nope",
        "tool_not_found",
    )


def test_serve_stdio_with_another_agents_token_says_so_in_plain_words(data_dir: Path) -> None:
    # "the token in MCP0_TOKEN is not agent 'bob''s" (found by review)
    run(data_dir, "agent", "create", "ada")
    bob = as_json(data_dir, "agent", "create", "bob")["token"]
    done = subprocess.run(
        [MCP0, "serve", "--stdio", "--agent", "ada", "--data-dir", str(data_dir)],
        env={**os.environ, "MCP0_TOKEN": bob},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == (
        "mcp0: error: the token in MCP0_TOKEN is not the token of agent 'ada': give --agent "
        "(or MCP0_AGENT) or the agent's token, or both of the same agent"
    )


def test_text_outputs_escape_what_a_terminal_would_act_on(data_dir: Path, tmp_path: Path) -> None:
    # An agent's tool name, a plugin's description or output, printed as they were, could
    # forge a record line of `mcp0 audit list` on the operator's terminal, or hide or
    # reorder one (found by review); --json is JSON as before
    forged = "x\x1b[2K\r      39 allowed  admin            call_tool      delete_everything\n"
    source = tmp_path / "faulty"
    shutil.copytree(FAULTY_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((source / "plugin.json").read_text())
    manifest["description"] = "faulty\r\u202egnp.exe\x85"
    manifest["tools"][0]["description"] = "echoes\x1b]0;a title\x07"
    (source / "plugin.json").write_text(json.dumps(manifest))
    run(data_dir, "plugin", "install", str(source))
    run(data_dir, "agent", "create", "ada", "--plugin", "faulty")
    run(data_dir, "agent", "exec", "ada", forged, ok=False)
    # a name padded to wrap the line where its tail shows as a record of its own, with
    # characters that show as nothing (found by review): spaces are escaped in a field too
    wrapping = "y" * 20 + " " * 40 + "\u200b   9999 allowed  admin  terminate_agent default\ufeff"
    run(data_dir, "agent", "exec", "ada", wrapping, ok=False)
    listed = run(data_dir, "audit", "list").stdout.splitlines()
    assert len(listed) == len(as_json(data_dir, "audit", "list"))  # one line a record
    assert listed[-2].endswith(
        r"call_tool      x\x1b[2K\r\x20\x20\x20\x20\x20\x2039\x20allowed\x20\x20admin"
        + r"\x20" * 12
        + r"call_tool"
        + r"\x20" * 6
        + r"delete_everything\n tool_not_found"
    )
    assert listed[-1].endswith(
        "call_tool      "
        + "y" * 20
        + r"\x20" * 40
        + r"\u200b\x20\x20\x209999\x20allowed\x20\x20admin\x20\x20terminate_agent\x20"
        + r"default\ufeff tool_not_found"
    )
    assert as_json(data_dir, "audit", "list")[-2]["resource"] == forged
    described = r"faulty\r\u202egnp.exe\x85"
    assert run(data_dir, "plugin", "list").stdout.endswith(f" {described}\n")
    shown = run(data_dir, "plugin", "show", "faulty").stdout.splitlines()
    assert shown[1] == described
    assert r"  faulty_echo: echoes\x1b]0;a title\x07" in shown
    # a description padded to wrap the line, its tail showing as a plugin listed of its own
    # (found by review): a run of blanks shows as one space
    manifest["description"] = (
        "notes" + " " * 60 + "\u200b\ufeff  \t" + "shell    6.6.6    runs anything"
    )
    manifest["tools"][0]["description"] = "echoes" + "\u3000" * 50 + "faulty_rm: deletes"
    (source / "plugin.json").write_text(json.dumps(manifest))
    run(data_dir, "plugin", "install", "--replace", str(source))
    assert run(data_dir, "plugin", "list").stdout.endswith(" notes shell 6.6.6 runs anything\n")
    shown = run(data_dir, "plugin", "show", "faulty").stdout.splitlines()
    assert shown[1] == "notes shell 6.6.6 runs anything"
    assert "  faulty_echo: echoes faulty_rm: deletes" in shown
    # a tool's output keeps its lines (and tabs), the rest escaped as well
    echoed = run(
        data_dir, "agent", "exec", "ada", "faulty_echo", '{"text": "a\\u001b[2J\\tb\\nc\\r"}'
    )
    assert echoed.stdout == "a\\x1b[2J\tb\nc\\r\n"


def test_agent_list_takes_a_page_after_a_name(data_dir: Path) -> None:
    for name in ("c", "a", "b"):
        run(data_dir, "agent", "create", name)
    assert [a["name"] for a in as_json(data_dir, "agent", "list")] == ["a", "b", "c"]
    page = as_json(data_dir, "agent", "list", "--after", "a", "--limit", "1")
    assert [a["name"] for a in page] == ["b"]
    assert run(data_dir, "agent", "list", "--after", "c").stdout == "no agents\n"
    assert run(data_dir, "agent", "list", "--limit", "0", ok=False).exit_code == 2


def test_audit_list_prints_a_log_longer_than_a_page_page_by_page(data_dir: Path) -> None:
    # It read the whole log, and made every line, before it printed one: 4 GB for 1.5
    # million records (found by review). Its output is the same, in order and whole.
    run(data_dir, "agent", "create", "a0")  # (the data dir, and its first records)
    runtime = Runtime(load_settings(None, {"data_dir": data_dir, "audit_max_batch": 4096}))

    async def fill() -> None:
        events = ({"verb": "note", "n": n} for n in range(AUDIT_LIST_PAGE + 50))
        await asyncio.gather(*(runtime.audit.submit(event) for event in events))

    try:
        asyncio.run(fill())
        last = runtime.store.audit_head()
    finally:
        runtime.close()
    assert last is not None
    listed = as_json(data_dir, "audit", "list", "--after", "0", "--limit", str(10**9))
    assert [r["seq"] for r in listed] == list(range(1, last.seq + 1))
    lines = run(data_dir, "audit", "list", "--after", "1", "--limit", str(last.seq)).stdout
    assert [int(line.split()[0]) for line in lines.splitlines()] == list(range(2, last.seq + 1))
    few = run(data_dir, "audit", "list", "--limit", "2", "--json").stdout
    assert few == json.dumps(listed[-2:], indent=2, sort_keys=True) + "\n"


def test_audit_list_shows_the_newest_records_unless_told_where_to_start(data_dir: Path) -> None:
    for n in range(6):
        run(data_dir, "agent", "create", f"a{n}")
    every = [r["seq"] for r in as_json(data_dir, "audit", "list", "--after", "0")]
    assert every == list(range(1, len(every) + 1))
    assert [r["seq"] for r in as_json(data_dir, "audit", "list", "--limit", "3")] == every[-3:]
    first = as_json(data_dir, "audit", "list", "--after", "0", "--limit", "3")
    assert [r["seq"] for r in first] == every[:3]
    newest = run(data_dir, "audit", "list", "--limit", "2")  # a text listing says what it left out
    assert newest.stdout.split()[0] == str(every[-2])
    assert f"records {every[-2]}-{every[-1]} of {every[-1]}" in newest.stderr
    assert "records" not in run(data_dir, "audit", "list").stderr  # all of them: nothing to say


def test_errors_are_one_line_and_exit_non_zero(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "someone")
    missing = run(data_dir, "agent", "show", "nobody", ok=False)
    assert missing.exit_code == 1
    assert missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("mcp0: error: no agent named 'nobody'")
    bad_plugin = run(data_dir, "agent", "create", "ada", "--plugin", "nope", ok=False)
    assert "no plugin named 'nope'" in bad_plugin.stderr
    bad_args = run(data_dir, "agent", "exec", "ada", "notes_add", "not json", ok=False)
    assert bad_args.exit_code == 2
    for number in ("NaN", "Infinity", "-Infinity"):  # Python's json reads them; JSON has none
        not_json = run(
            data_dir, "agent", "exec", "ada", "notes_add", f'{{"text": {number}}}', ok=False
        )
        assert not_json.exit_code == 2
        assert f"{number} is not a JSON number" in not_json.stderr
    # SQLite would read a negative LIMIT as no limit at all
    huge = str(1 << 80)  # past what SQLite binds: a usage error, not a traceback
    for option in (("--limit", "-5"), ("--limit", "0"), ("--after", "-1"), ("--after", huge)):
        bad_page = run(data_dir, "audit", "list", *option, ok=False)
        assert bad_page.exit_code == 2
        assert option[0] in bad_page.stderr


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["agent", "exec", "ada", "bad\udcff", "{}"], "TOOL"),
        (["agent", "exec", "ada", "notes_add", '{"text": "\udcff"}'], "[ARGUMENTS]"),
        (["agent", "attach", "ada", "p\udcff"], "PLUGIN"),
        (["agent", "create", "bo", "--plugin", "p\udcff"], "--plugin"),
        (["agent", "show", "a\udcff"], "NAME"),
        (["agent", "list", "--after", "a\udcff"], "--after"),
        (["agent", "terminate", "a\udcff"], "NAME"),
        (["agent", "rotate-token", "a\udcff"], "NAME"),
        (["agent", "recover", "s\udcff"], "SNAPSHOT_ID"),
        (["plugin", "remove", "p\udcff"], "NAME"),
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error(
    data_dir: Path, args: list[str], name: str
) -> None:
    # (bytes that are not UTF-8 reach Python as lone surrogates) they were tracebacks from the
    # store, the policy engine or the audit log, a call recorded as holding a huge integer
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    before = as_json(data_dir, "audit", "verify")["count"]
    refused = run(data_dir, *args, ok=False)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        f"mcp0: error: invalid value for '{name}': it is not text: its bytes are not UTF-8"
    )
    assert as_json(data_dir, "audit", "verify")["count"] == before  # nothing was done


@pytest.mark.parametrize(
    "args", [["audit", "list", "--json"], ["agent", "list"], ["plugin", "show", "notes", "--json"]]
)
def test_a_reader_that_stops_ends_the_command_quietly(data_dir: Path, args: list[str]) -> None:
    # (``mcp0 audit list --json | head -c 10``) it said "mcp0: error: Broken pipe"
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    mcp0 = Path(sys.executable).parent / "mcp0"
    with subprocess.Popen(
        [str(mcp0), *args, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as command:
        assert command.stdout is not None
        assert command.stderr is not None
        command.stdout.close()  # the reader is gone before the command writes a line
        stderr = command.stderr.read()
        status = command.wait(timeout=60)
    assert (status, stderr) == (1, b"")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("_bad", "invalid agent name '_bad': use 1-64 letters, digits"),
        ("has space", "invalid agent name 'has space': use 1-64 letters, digits"),
        ("Admin", "'admin' names the administrator in policies and audit records"),
    ],
)
def test_agent_create_with_a_name_no_agent_may_have_is_a_usage_error(
    data_dir: Path, name: str, why: str
) -> None:
    # A bad value, which docs/cli.md counts a usage error: it exited 1, after laying out a
    # data dir and taking it away again (found by a docs review)
    refused = run(data_dir, "agent", "create", name, ok=False)
    assert refused.exit_code == 2
    lines = refused.stderr.splitlines()
    assert lines[0].endswith(" agent create [OPTIONS] NAME")  # (the usage line)
    assert lines[-1].startswith(f"mcp0: error: {why}")
    assert not data_dir.exists()


def test_serve_stdio_without_an_agent_is_a_usage_error_naming_every_way_to_give_one(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It exited 1 as an authentication failure, and did not name MCP0_AGENT, which it takes
    # (found by a docs review)
    run(data_dir, "agent", "create", "ada")
    monkeypatch.delenv("MCP0_AGENT", raising=False)
    monkeypatch.setenv("MCP0_TOKEN", "")  # (empty: none)
    refused = run(data_dir, "serve", "--stdio", ok=False)
    assert refused.exit_code == 2
    lines = refused.stderr.splitlines()
    assert lines[0].endswith(" serve [OPTIONS]")  # (the usage line)
    assert lines[-1] == (
        "mcp0: error: --stdio needs the agent the session runs as: --agent NAME (or "
        "MCP0_AGENT), or the agent's token in MCP0_TOKEN"
    )


@pytest.mark.parametrize("variable", ["MCP0_AGENT", "MCP0_TOKEN"])
def test_an_agent_or_token_variable_that_is_not_utf8_is_a_usage_error(
    data_dir: Path, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(data_dir, "agent", "create", "ada")
    monkeypatch.setenv(variable, "ada\udcff")
    refused = run(data_dir, "serve", "--stdio", ok=False)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        f"mcp0: error: {variable} is not text: its bytes are not UTF-8"
    )


@pytest.mark.parametrize("value", ["abc", "1_0", " 4", "\uff14", "-1"])
def test_audit_list_takes_only_digits_after_and_says_so(data_dir: Path, value: str) -> None:
    # int() took "1_0", " 4" and full-width digits; click called the others "not a valid
    # integer range"
    run(data_dir, "agent", "create", "ada")
    refused = run(data_dir, "audit", "list", "--after", value, ok=False)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        f"mcp0: error: invalid value for '--after': {value!r} is not a whole number in the "
        "digits 0-9"
    )


@pytest.mark.parametrize("value", ["8_390", "\uff18\uff13\uff19\uff10"])
def test_serve_takes_a_port_in_the_digits_0_9_only(data_dir: Path, value: str) -> None:
    refused = run(data_dir, "serve", "--port", value, ok=False)
    assert refused.exit_code == 2
    assert "is not a whole number in the digits 0-9" in refused.stderr


def test_serve_with_agent_but_without_stdio_is_a_usage_error(data_dir: Path) -> None:
    # A client's configuration that forgot --stdio got an HTTP server: its "mcp0 listening on"
    # line on stdout was no JSON-RPC to the client, and --agent was ignored (found by review)
    done = subprocess.run(
        [MCP0, "serve", "--agent", "ada", "--port", "0", "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1] == (
        "mcp0: error: --agent names the agent of a stdio session: add --stdio (an HTTP "
        "server's clients send their agents' tokens)"
    )
    assert not data_dir.exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--host", "0.0.0.0"],
        ["--port", "9000"],
        ["--anonymous-agent", "ada"],
        ["--no-examples"],
        ["--tls-cert", "cert.pem", "--tls-key", "key.pem"],
    ],
)
def test_serve_stdio_refuses_the_options_of_an_http_server(
    data_dir: Path, option: list[str]
) -> None:
    # they were ignored without a word
    run(data_dir, "agent", "create", "ada")
    refused = run(data_dir, "serve", "--stdio", "--agent", "ada", *option, ok=False)
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[-1] == (
        f"mcp0: error: {option[0]} is for an HTTP server; a stdio session (--stdio) has no use "
        "for it: drop it"
    )


@pytest.mark.parametrize("variable", ["MCP0_AGENT", "MCP0_TOKEN"])
def test_serve_without_stdio_warns_that_it_ignores_a_stdio_sessions_variable(
    data_dir: Path, variable: str
) -> None:
    # (said before the server starts: here it cannot listen on an address of another machine)
    done = subprocess.run(
        [MCP0, "serve", "--host", "192.0.2.1", "--data-dir", str(data_dir)],
        env={**os.environ, variable: "ada"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    warning, error = done.stderr.splitlines()
    assert warning.endswith(
        f" WARNING mcp_zero.serve: {variable} is set, and ignored: it is for a stdio session "
        "(mcp0 serve --stdio); the clients of an HTTP server send their agents' tokens"
    )
    assert error.startswith("mcp0: error: cannot listen on 192.0.2.1:")


def test_agent_exec_refuses_arguments_nested_deeper_than_a_tool_takes(data_dir: Path) -> None:
    # 5,000 levels were a RecursionError traceback
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    for depth in (254, 5000):  # the object itself is a level: 253 is the pipeline's most
        nested = '{"text": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
        refused = run(data_dir, "agent", "exec", "ada", "notes_add", nested, ok=False)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.splitlines()[-1] == (
            "mcp0: error: invalid value: ARGUMENTS nest deeper than 253 levels, more than a "
            "tool takes"
        )
    at_most = '{"text": ' + "[" * 252 + "]" * 252 + "}"
    called = run(data_dir, "agent", "exec", "ada", "notes_add", at_most, ok=False)
    assert called.exit_code == 1  # through the governed path: the tool's schema wants a string
    assert "text" in called.stderr


@pytest.mark.parametrize(
    ("args", "usage", "error"),
    [
        (["agent", "show"], "Usage: mcp0 agent show [OPTIONS] NAME", "missing argument 'NAME'."),
        (["agent", "list", "--bogus"], "Usage: mcp0 agent list [OPTIONS]", "no such option"),
        (["bogus"], "Usage: mcp0 [OPTIONS] COMMAND [ARGS]...", "no such command 'bogus'."),
        (
            ["audit", "list", "--limit", "0"],
            "Usage: mcp0 audit list [OPTIONS]",
            "invalid value for '--limit': 0 is not in the range",
        ),
    ],
)
def test_usage_errors_keep_the_usage_line_and_end_in_the_documented_error_line(
    tmp_path: Path, args: list[str], usage: str, error: str
) -> None:
    # click printed its own "Error: ..." where the docs promise "mcp0: error: ..."
    done = subprocess.run(
        [MCP0, *args, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[0] == usage
    assert lines[-1].startswith(f"mcp0: error: {error}")
    assert not any(line.startswith("Error") for line in lines)


def test_audit_verify_prints_the_heads_seq_as_well_as_its_hash(data_dir: Path) -> None:
    # The text form printed the head's hash alone, where the docs say to keep its seq too to
    # check later (found by a docs review)
    run(data_dir, "agent", "create", "ada")
    report = as_json(data_dir, "audit", "verify")
    assert run(data_dir, "audit", "verify").stdout == (
        f"ok: {report['count']} records, head seq {report['head_seq']}, "
        f"hash {report['head_hash']}\n"
    )


def test_audit_verify_reports_a_tampered_chain(data_dir: Path) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    report = as_json(data_dir, "audit", "verify")
    assert report["ok"] is True
    # the policy set and the admin token first in force, the install, the agent
    assert report["count"] == 4
    with sqlite3.connect(data_dir / "mcp0.db") as conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("UPDATE audit SET body = replace(body, 'ada', 'eve') WHERE seq = 4")
    broken = run(data_dir, "audit", "verify", "--json", ok=False)
    assert broken.exit_code == 2
    verdict = json.loads(broken.stdout)
    assert verdict["ok"] is False
    assert verdict["seq"] == 4
    assert verdict["reason"]


def test_audit_list_shows_damaged_records_as_such(data_dir: Path) -> None:
    # a body that is not JSON, or an outcome that is not text, was a traceback, --json too
    for name in ("ada", "bob", "cy"):
        run(data_dir, "agent", "create", name)
    with contextlib.closing(sqlite3.connect(data_dir / "mcp0.db")) as conn, conn:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET body = X'41' WHERE seq = 3")
        conn.execute("UPDATE audit SET body = replace(body, '\"allowed\"', 'null') WHERE seq = 4")
    hint = "records altered or damaged since they were written: 3, 4; 'mcp0 audit verify'"
    listed = run(data_dir, "audit", "list", "--json")
    assert hint in listed.stderr
    records = json.loads(listed.stdout)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["damaged"] == "body is not JSON"
    assert (records[3]["resource"], records[3]["outcome"]) == ("bob", None)
    assert records[3]["damaged"] == "hash does not match prev_hash and body"
    text = run(data_dir, "audit", "list")
    assert hint in text.stderr
    lines = text.stdout.splitlines()
    assert " ".join(lines[2].split()) == "3 DAMAGED: body is not JSON"
    assert lines[3].split()[:5] == ["4", "null", "admin", "spawn_agent", "bob"]
    assert lines[3].endswith(" DAMAGED: hash does not match prev_hash and body")
    assert "DAMAGED" not in lines[4]


def test_policy_check_names_the_policies_and_refuses_a_broken_file(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")  # lays out a new data dir, default policy included
    checked = as_json(data_dir, "policy", "check")
    assert "attached-plugins-only" in checked["policies"]
    (data_dir / "policies" / "broken.cedar").write_text("permit (principal, action, resource")
    broken = run(data_dir, "policy", "check", ok=False)
    assert broken.exit_code == 1
    assert "broken.cedar" in broken.stderr


def test_policy_check_counts_the_policies_in_words(data_dir: Path) -> None:
    # none was "ok: 0 policies: ", with nothing after the colon (found by review)
    run(data_dir, "agent", "create", "ada")
    policies = data_dir / "policies"
    for policy in policies.iterdir():
        policy.unlink()
    assert run(data_dir, "policy", "check").stdout == (
        "ok: 0 policies: every action is denied, the admin's too\n"
    )
    (policies / "one.cedar").write_text('@id("only")\npermit (principal, action, resource);\n')
    assert run(data_dir, "policy", "check").stdout == "ok: 1 policy: only\n"


def test_policy_check_checks_a_directory_of_files_without_a_data_dir(tmp_path: Path) -> None:
    # files could be checked only once in a data dir, where a server takes them up at once
    # (found by review)
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    (drafts / "a.cedar").write_text('@id("only")\npermit (principal, action, resource);\n')
    nowhere = tmp_path / "no-data-dir"
    assert as_json(nowhere, "policy", "check", str(drafts)) == {"ok": True, "policies": ["only"]}
    (drafts / "b.cedar").write_text('@id("only")\nforbid (principal, action, resource);\n')
    refused = run(nowhere, "policy", "check", str(drafts), ok=False)
    assert refused.exit_code == 1
    assert refused.stderr == (
        'mcp0: error: b.cedar:1: policy id "only" is already used at a.cedar:1; '
        "give each policy its own @id\n"
    )
    assert not nowhere.exists()
    missing = run(nowhere, "policy", "check", str(tmp_path / "typo"), ok=False)
    assert missing.exit_code == 2


def test_policy_files_with_a_byte_order_mark_are_read(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")
    default = data_dir / "policies" / "default.cedar"
    default.write_text(default.read_text(encoding="utf-8"), encoding="utf-8-sig")
    assert default.read_bytes().startswith(b"\xef\xbb\xbf")
    assert "admin-all" in as_json(data_dir, "policy", "check")["policies"]
    assert as_json(data_dir, "agent", "create", "bob")["name"] == "bob"  # decided by policy


def test_an_editor_lock_file_in_the_policy_dir_does_not_stop_the_commands(
    data_dir: Path,
) -> None:
    run(data_dir, "agent", "create", "ada")
    # Emacs makes this dangling symlink while default.cedar has unsaved changes
    (data_dir / "policies" / ".#default.cedar").symlink_to("someone@host.1234:1700000000")
    assert "admin-all" in as_json(data_dir, "policy", "check")["policies"]
    assert as_json(data_dir, "agent", "create", "bob")["name"] == "bob"


def test_reading_commands_work_while_a_policy_file_is_broken(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    (data_dir / "policies" / "broken.cedar").write_text("permit (principal, action, resource")
    assert [a["name"] for a in as_json(data_dir, "agent", "list")] == ["ada"]
    assert as_json(data_dir, "agent", "show", "ada")["status"] == "active"
    assert [p["name"] for p in as_json(data_dir, "plugin", "list")] == ["notes"]
    assert as_json(data_dir, "plugin", "show", "notes")["tools"]
    assert as_json(data_dir, "audit", "verify")["ok"] is True
    # what changes something is still decided by policy: it fails closed, naming the file
    refused = run(data_dir, "agent", "create", "bob", ok=False)
    assert refused.exit_code == 1
    assert "broken.cedar" in refused.stderr


def test_commands_on_a_mistyped_data_dir_fail_instead_of_creating_one(tmp_path: Path) -> None:
    typo = tmp_path / "typo"
    for command in (
        ("agent", "list"),
        ("agent", "show", "ada"),
        ("agent", "terminate", "ada"),
        ("agent", "rotate-token", "ada"),
        ("agent", "exec", "ada", "notes_list"),
        ("plugin", "list"),
        ("plugin", "remove", "notes"),
        ("audit", "list"),
        ("audit", "verify"),  # an integrity check must not say "ok: 0 records" here
        ("policy", "check"),
    ):
        failed = run(typo, *command, ok=False)
        assert failed.exit_code == 1, command
        assert failed.stderr.startswith(f"mcp0: error: no MCP-ZERO data dir at {typo}"), command
        assert not typo.exists(), command
    # an empty policies dir beside no store is no data dir either (not "ok: 0 policies")
    (typo / "policies").mkdir(parents=True)
    assert "no MCP-ZERO data dir" in run(typo, "policy", "check", ok=False).stderr
    (typo / "policies").rmdir()
    # the commands that set one up still do
    assert as_json(typo, "agent", "create", "ada")["name"] == "ada"
    assert as_json(typo, "agent", "list")[0]["name"] == "ada"


READING_COMMANDS = (
    ("agent", "list"),
    ("agent", "show", "ada"),
    ("plugin", "list"),
    ("plugin", "show", "notes"),
    ("audit", "list"),
    ("audit", "verify"),
)


def test_a_missing_relative_data_dir_is_named_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "no MCP-ZERO data dir at .mcp0" said not where it looked: a stdio session's MCP client
    # starts it in a working directory of its own choosing (found by review)
    monkeypatch.chdir(tmp_path)
    listed = CliRunner().invoke(main, ["agent", "list", "--data-dir", "typo"])
    assert listed.exit_code == 1
    assert listed.stderr == (
        f"mcp0: error: no MCP-ZERO data dir at {tmp_path / 'typo'} (no mcp0.db): check "
        "--data-dir, or create one with 'mcp0 serve', 'mcp0 agent create' or 'mcp0 plugin "
        "install'\n"
    )
    served = CliRunner().invoke(main, ["serve", "--stdio", "--agent", "ada"])  # (./.mcp0)
    assert served.exit_code == 1
    assert served.stderr == (
        f"mcp0: error: no MCP-ZERO data dir at {tmp_path / '.mcp0'} (no mcp0.db): a relative "
        "data dir is looked for in the working directory that the MCP client started 'mcp0 "
        f"serve --stdio' in (here {tmp_path}): give --data-dir as an absolute path\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_file_given_as_the_data_dir_is_said_to_be_one(tmp_path: Path) -> None:
    # "cannot read afile/plugins: Not a directory", as if a data dir were damaged (found by
    # review)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for command in (("agent", "list"), ("agent", "create", "ada"), ("serve", "--port", "0")):
        refused = run(afile, *command, ok=False)
        assert refused.exit_code == 1, command
        assert refused.stderr == (
            f"mcp0: error: the data dir {afile} is a file, not a directory: check --data-dir "
            "(a new data dir is made where there is nothing)\n"
        ), command
    assert afile.read_text() == "mine"


def _file_state(directory: Path) -> dict[str, bytes]:
    """The files in ``directory`` but SQLite's shared-memory index (a reader of a WAL store
    may make it) and an empty -wal: what a write would change."""
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file()
        and not p.name.endswith("-shm")
        and not (p.name.endswith("-wal") and p.stat().st_size == 0)
    }


def test_another_programs_database_is_refused_and_left_as_it_is(data_dir: Path) -> None:
    data_dir.mkdir()
    foreign = data_dir / "mcp0.db"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE customers (name TEXT)")
        conn.execute("INSERT INTO customers VALUES ('ada')")
        conn.commit()
    before = _file_state(data_dir)
    # a reading command added mcp0's tables, switched the file to WAL and printed []
    for command in (*READING_COMMANDS, ("agent", "create", "ada"), ("admin", "rotate-token")):
        refused = run(data_dir, *command, ok=False)
        assert refused.exit_code == 1, command
        assert refused.stderr == (
            f"mcp0: error: {foreign} is not an MCP-ZERO store (it holds another program's "
            "tables); it was left as it is: give a data dir of its own (--data-dir)\n"
        ), command
        assert _file_state(data_dir) == before, command
        assert [p.name for p in data_dir.iterdir()] == ["mcp0.db"], command


def test_reading_commands_neither_create_nor_migrate_a_store(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")
    db = data_dir / "mcp0.db"
    # a store an older release wrote (schema version 2): reading commands say so
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'first_start_done'")
        conn.execute("DROP TABLE recorded")
        conn.execute("PRAGMA user_version = 2")
    before = _file_state(data_dir)
    for command in READING_COMMANDS:
        refused = run(data_dir, *command, ok=False)
        assert refused.exit_code == 1, command
        assert "was written by an older release: 'mcp0 serve'" in refused.stderr, command
        assert _file_state(data_dir) == before, command
    # a changing command migrates it; then they read it
    run(data_dir, "agent", "create", "bob")
    assert [a["name"] for a in as_json(data_dir, "agent", "list")] == ["ada", "bob"]
    # an empty mcp0.db (a first start killed as it began: before it wrote store-made) is
    # not set up yet
    db.unlink()
    db.touch()
    (data_dir / "store-made").unlink()
    for command in READING_COMMANDS:
        refused = run(data_dir, *command, ok=False)
        assert "is not set up yet" in refused.stderr, command
        assert db.stat().st_size == 0, command


def _without_file_permission_override() -> None:
    """(In the child, before exec.) Drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER
    from the bounding set: root then obeys file modes as any owner does (tests run as root in
    CI, where a chmod binds no one; nobody cannot run this venv's Python under /root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def run_shut_out_of(
    directory: Path, *args: str, mode: int = 0o000
) -> subprocess.CompletedProcess[str]:
    """``mcp0 ARGS`` as a process that may not use ``directory`` (mode 000, or ``mode``; as
    root, without the capabilities that override it); the directory's mode is 700 after."""
    os.chmod(directory, mode)
    try:
        return subprocess.run(
            [MCP0, *args],
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=_without_file_permission_override if os.geteuid() == 0 else None,
        )
    finally:
        os.chmod(directory, 0o700)


def test_a_data_dir_file_a_command_may_not_use_is_one_error_line(data_dir: Path) -> None:
    # An unreadable plugins/ made every changing command (and serve) die with a traceback
    # (found by review)
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    plugins = data_dir / "plugins"
    done = run_shut_out_of(plugins, "agent", "create", "bob", "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert done.stderr == f"mcp0: error: Permission denied: {plugins}\n"


def test_policy_check_on_a_policy_directory_it_cannot_read_is_an_error(data_dir: Path) -> None:
    # It said "ok: 0 policies" (Path.glob lists nothing there), found by review
    run(data_dir, "agent", "create", "ada")
    policies = data_dir / "policies"
    done = run_shut_out_of(policies, "policy", "check", "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert done.stderr == (
        f"mcp0: error: cannot read policy directory {policies}: Permission denied\n"
    )


def test_reading_commands_work_on_a_data_dir_they_may_not_write(data_dir: Path) -> None:
    # "cannot create database ... Permission denied" though it exists
    run(data_dir, "agent", "create", "ada")
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    os.chmod(data_dir / "mcp0.db", 0o400)
    os.chmod(data_dir, 0o500)
    try:
        as_root = os.geteuid() == 0

        def read(*command: str) -> Any:
            done = subprocess.run(
                [MCP0, *command, "--data-dir", str(data_dir), "--json"],
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=_without_file_permission_override if as_root else None,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        if as_root:  # the child may indeed not write there
            probe = subprocess.run(
                ["touch", str(data_dir / "probe")],
                capture_output=True,
                preexec_fn=_without_file_permission_override,
            )
            assert probe.returncode == 1, probe
        assert [a["name"] for a in read("agent", "list")] == ["ada"]
        assert read("agent", "show", "ada")["status"] == "active"
        assert [p["name"] for p in read("plugin", "list")] == ["notes"]
        assert read("plugin", "show", "notes")["tools"]
        assert read("audit", "list")
        assert read("audit", "verify")["ok"] is True
        assert sorted(p.name for p in data_dir.glob("mcp0.db*")) == ["mcp0.db"]
    finally:
        os.chmod(data_dir, 0o700)


def test_admin_rotate_token_writes_a_new_private_token_and_audits_it(data_dir: Path) -> None:
    run(data_dir, "plugin", "install", str(NOTES_DIR))  # lays out the data dir
    token_file = data_dir / "admin.token"
    before = token_file.read_text()
    rotated = as_json(data_dir, "admin", "rotate-token")
    assert rotated == {"admin_token_file": str(token_file), "rotated": True}
    after = token_file.read_text()
    assert after.strip().startswith("mcp0_")
    assert after != before
    said = run(data_dir, "admin", "rotate-token").output
    assert str(token_file) in said
    assert token_file.read_text().strip() not in said  # the token stays in its file
    assert token_file.stat().st_mode & 0o777 == 0o600
    verbs = [r["verb"] for r in as_json(data_dir, "audit", "list")]
    assert verbs.count("change_admin_token") == 3  # the first token, then two rotations


def test_a_removed_admin_token_is_written_again_only_by_a_rotation(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The next changing command wrote a new one, silently, and a running server took it up:
    # the admin API its removal closed was open again (found by review)
    from mcp_zero.cli.serve import _announce
    from mcp_zero.runtime import FirstStart

    run(data_dir, "plugin", "install", str(NOTES_DIR))
    token_file = data_dir / "admin.token"
    token_file.unlink()
    run(data_dir, "agent", "create", "ada", "--plugin", "notes")
    assert not token_file.exists()
    # what `mcp0 serve` says of it (it printed the file's path, as if it held the token)
    settings = load_settings(None, {"data_dir": data_dir}, environ={})
    _announce(settings, 8390, FirstStart([], None), admin_closed=True, as_json=False)
    assert f"admin API closed: no token in {token_file} " in capsys.readouterr().out
    run(data_dir, "admin", "rotate-token")
    assert token_file.read_text().startswith("mcp0_")


def test_agent_exec_starts_only_the_plugin_of_its_tool(data_dir: Path, tmp_path: Path) -> None:
    # A plugin that hangs as it loads held every one-off call for its 15 s start timeout.
    marker = data_dir / "plugin-data" / "stuck" / "was-started"  # where it may write
    run(data_dir, "plugin", "install", str(NOTES_DIR))
    run(
        data_dir, "plugin", "install", str(loading_plugin(tmp_path / "stuck", marker, name="stuck"))
    )
    run(data_dir, "agent", "create", "ada", "--plugin", "notes", "--plugin", "stuck")
    added = as_json(data_dir, "agent", "exec", "ada", "notes_add", '{"text": "not held up"}')
    assert added["structuredContent"]["note"]["text"] == "not held up"
    assert not marker.exists()  # its worker was never started


@pytest.mark.anyio
async def test_a_plugin_that_hangs_as_it_loads_does_not_hold_up_the_others(
    tmp_path: Path,
) -> None:
    # A server waits a bounded time for its plugins before it serves: one that hangs while
    # loading goes on starting (its calls would wait for it), the others serve at once.
    marker = tmp_path / "data" / "plugin-data" / "stuck" / "loading"  # where it may write
    runtime = Runtime(load_settings(None, {"data_dir": tmp_path / "data"}, environ={}))
    runtime.install_plugin(loading_plugin(tmp_path / "stuck", marker, name="stuck"))
    runtime.install_plugin(NOTES_DIR)
    token = (await runtime.agents.spawn("ada", ["notes", "stuck"])).token
    try:
        with anyio.fail_after(10):  # its start timeout is 15 s: waiting for it fails here
            await runtime.start(wait=0.5)
        assert marker.read_text().isdigit()  # it is being started
        assert "stuck" not in runtime.plugins.failed  # not failed: still starting
        principal = runtime.agents.authenticate(token)
        with anyio.fail_after(10):
            added = await runtime.kernel.call_tool(
                principal,
                "notes_add",
                {"text": "served"},
                _NoBridge(),
                request_id="r1",
                transport="test",
            )
        assert added["structuredContent"]["note"]["text"] == "served"
    finally:
        await runtime.aclose()


def test_admin_rotate_token_at_once_from_many_processes_leaves_one_whole_token(
    data_dir: Path,
) -> None:
    # all wrote admin.token.tmp: one renamed another's away, a FileNotFoundError traceback
    run(data_dir, "agent", "create", "ada")
    rotate = [MCP0, "admin", "rotate-token", "--data-dir", str(data_dir)]
    rotations = [subprocess.Popen(rotate, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for rotation in rotations:
        _, err = rotation.communicate(timeout=60)
        assert rotation.returncode == 0, err
        assert err == ""
    token = (data_dir / "admin.token").read_text()
    assert token.startswith("mcp0_")
    assert token.count("\n") == 1
    assert not [
        p.name for p in data_dir.iterdir() if "admin.token" in p.name and p.name != "admin.token"
    ]
    assert len(_token_records(data_dir)) == 8


ON_A_FULL_DISK = """
import json, os, sqlite3, subprocess, sys
root, mcp0 = sys.argv[1], sys.argv[2]
data = os.path.join(root, "data")
create = [mcp0, "agent", "create", "ada", "--data-dir", data]
subprocess.run(create, check=True, capture_output=True)
token = open(os.path.join(data, "admin.token")).read()
# a reader keeps SQLite's -wal and -shm in place: opening the store needs no new space
held = sqlite3.connect(os.path.join(data, "mcp0.db"))
held.execute("SELECT count(*) FROM agents").fetchall()
filler = os.open(os.path.join(root, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(filler, bytes(4096))
except OSError:
    pass
done = subprocess.run(
    [mcp0, "admin", "rotate-token", "--data-dir", data], capture_output=True, text=True
)
print(json.dumps({
    "returncode": done.returncode,
    "stderr": done.stderr,
    "files": sorted(os.listdir(data)),
    "token_kept": open(os.path.join(data, "admin.token")).read() == token,
}))
"""


def test_admin_rotate_token_on_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # an OSError traceback, and admin.token.tmp left behind
    # A real full disk (full_disk.on_a_full_disk)
    disk = tmp_path / "disk"
    seen = json.loads(on_a_full_disk(disk, ON_A_FULL_DISK, MCP0))
    assert seen["returncode"] == 1
    assert seen["stderr"] == (
        f"mcp0: error: cannot write a new admin token to {disk}/data/admin.token: No space left "
        "on device; the old token still works\n"
    )
    assert seen["token_kept"]
    assert not [name for name in seen["files"] if "admin.token" in name and name != "admin.token"]


def _rotation_killed_at_its_record(data_dir: Path) -> None:
    """Run `mcp0 admin rotate-token` while another connection holds the store's write lock,
    and kill -9 it once it has written the new token (it waits for the lock to record it)."""
    token_files = data_dir / "admin.token"

    def seen() -> set[tuple[str, int]]:
        found = set()
        for path in data_dir.glob("admin.token*"):
            with contextlib.suppress(FileNotFoundError):
                found.add((path.name, path.stat().st_ino))
        return found

    before = seen()
    held = sqlite3.connect(data_dir / "mcp0.db", isolation_level=None)
    try:
        held.execute("BEGIN IMMEDIATE")
        rotation = subprocess.Popen(
            [MCP0, "admin", "rotate-token", "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while seen() == before:  # (a bounded wait for the new token to be written)
                assert rotation.poll() is None, rotation.communicate()[1]
                assert time.monotonic() < deadline, f"{token_files} never changed"
                time.sleep(0.01)
        finally:
            rotation.kill()
            rotation.communicate(timeout=10)
    finally:
        held.close()  # (rolls back)


def _open_runtime(data_dir: Path) -> None:
    Runtime(load_settings(None, {"data_dir": data_dir}, environ={})).close()


def _token_records(data_dir: Path) -> list[dict[str, Any]]:
    """The records of rotations (not of the first token, nor of hand edits)."""
    return [
        r
        for r in as_json(data_dir, "audit", "list")
        if r["verb"] == "change_admin_token" and "rotation" in r
    ]


def test_a_rotation_killed_before_its_record_leaves_the_old_token(data_dir: Path) -> None:
    # the new token was written first, its record after: a kill between them left a token
    # nobody recorded
    run(data_dir, "agent", "create", "ada")
    token_file = data_dir / "admin.token"
    old = token_file.read_text()
    _rotation_killed_at_its_record(data_dir)
    _open_runtime(data_dir)  # (what any server or command that changes things does first)
    assert token_file.read_text() == old
    assert [p.name for p in data_dir.glob("admin.token*")] == ["admin.token"]
    assert _token_records(data_dir) == []
    assert as_json(data_dir, "audit", "verify")["ok"]


def test_a_rotation_killed_after_its_record_is_put_in_force(data_dir: Path) -> None:
    run(data_dir, "agent", "create", "ada")
    token_file = data_dir / "admin.token"
    _rotation_killed_at_its_record(data_dir)
    [staged] = [p for p in data_dir.glob("admin.token*") if p.name != "admin.token"]
    new = staged.read_text()
    # as if it had been killed just after its record committed: the record it was making
    rotation = staged.name.removesuffix(".next").rsplit("-", 1)[1]
    with SqliteStore(data_dir / "mcp0.db") as store, AuditLog(store) as log:
        log.append_sync(
            admin_event(
                CHANGE_ADMIN_TOKEN, "admin.token", "cli", Outcome.ALLOWED, {"rotation": rotation}
            )
        )
    _open_runtime(data_dir)
    assert token_file.read_text() == new
    assert [p.name for p in data_dir.glob("admin.token*")] == ["admin.token"]
    assert [r.get("rotation") for r in _token_records(data_dir)] == [rotation]
    # and a rotation after it goes through as ever
    run(data_dir, "admin", "rotate-token")
    assert token_file.read_text() != new
    assert len(_token_records(data_dir)) == 2


@pytest.mark.parametrize("limit", [1000, 64000], ids=["as-it-lays-out", "in-the-store"])
@pytest.mark.parametrize("command", [("serve", "--port", "0"), ("agent", "create", "ada")])
def test_a_first_command_out_of_disk_space_leaves_no_data_dir_behind(
    tmp_path: Path, command: tuple[str, ...], limit: int
) -> None:
    # A first `mcp0 serve` on a full disk left admin.token, keys/, policies/ and part of a
    # store, and so did any command that failed while it laid the data dir out (found by
    # review). A write past RLIMIT_FSIZE fails with EFBIG, as one on a full disk fails.
    data = tmp_path / "data"
    done = subprocess.run(
        [MCP0, *command, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("mcp0: error: "), done.stderr
    assert not data.exists()


def test_a_setting_up_command_that_fails_leaves_no_data_dir_behind(tmp_path: Path) -> None:
    # It laid out a whole data dir (keys, token, store) and marked its first start done: the
    # first `mcp0 serve` there then installed no example and printed no token (found by
    # review)
    bad_manifest = tmp_path / "bad"
    bad_manifest.mkdir()
    (bad_manifest / "plugin.json").write_text("{not json")
    unknown_plugin = ("agent", "create", "ada", "--plugin", "nope")
    for command in (unknown_plugin, ("plugin", "install", str(bad_manifest))):
        fresh = tmp_path / "fresh"
        assert run(fresh, *command, ok=False).exit_code == 1, command
        assert not fresh.exists(), command
    # in a directory that was there, what it made stays, but the first start is serve's
    mine = tmp_path / "mine"
    mine.mkdir()
    assert run(mine, *unknown_plugin, ok=False).exit_code == 1
    runtime = Runtime(load_settings(None, {"data_dir": mine}, environ={}))
    try:
        assert not runtime.store.first_start_done()
    finally:
        runtime.close()


def _lock_on(directory: Path, pid: int) -> str | None:
    """How process ``pid`` stands to a flock on ``directory``: "holds", "waits" or None."""
    inode = f":{directory.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waits = fields[1] == "->"
        owner, lock = fields[5:7] if waits else fields[4:6]
        if owner == str(pid) and lock.endswith(inode):
            return "waits" if waits else "holds"
    return None


def _until_lock_or_exit(directory: Path, process: subprocess.Popen[str], stand: str) -> None:
    """Return once ``process`` stands to a flock on ``directory`` as ``stand`` says, or ended."""
    deadline = time.monotonic() + 30
    while process.poll() is None and _lock_on(directory, process.pid) != stand:
        assert time.monotonic() < deadline, f"the command never came to {stand} the lock"
        time.sleep(0.005)


class _FirstCommandFailed(Exception):
    pass


def _fail_first_command(data: Path, during: Callable[[Runtime], None]) -> None:
    """Run a command on the data dir ``data`` (in this process) that calls ``during`` and
    fails."""
    with runtime_on(load_settings(None, {"data_dir": data}, environ={})) as runtime:
        during(runtime)
        raise _FirstCommandFailed


def _while_it_fails(data: Path, *command: str) -> subprocess.Popen[str]:
    """``mcp0 COMMAND`` on ``data``, started by a first command on it (in this process) once
    it holds the data dir, and seen waiting for it before that command fails."""
    others: list[subprocess.Popen[str]] = []

    def start_another(_: Runtime) -> None:
        other = subprocess.Popen(
            [MCP0, *command, "--data-dir", str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        others.append(other)
        _until_lock_or_exit(data, other, "waits")

    with pytest.raises(_FirstCommandFailed):
        _fail_first_command(data, start_another)
    return others[0]


def test_a_first_command_that_fails_removes_no_data_dir_another_command_used(
    tmp_path: Path,
) -> None:
    # Two commands started together where no data dir was: the one that failed (a plugin
    # that is not there) removed the data dir as one it had made, with the agent the other
    # had created in it, its token shown (found by review). Now the other waits while the
    # first one runs, and lays the data dir out anew once it is removed.
    data = tmp_path / "data"
    other = _while_it_fails(data, "agent", "create", "bob")
    out, err = other.communicate(timeout=60)
    assert other.returncode == 0, err
    assert out.startswith("agent bob created")
    assert [agent["name"] for agent in as_json(data, "agent", "list")] == ["bob"]


def test_a_first_command_removes_no_data_dir_another_laid_out_before_it(tmp_path: Path) -> None:
    # The command that made the directory is not always the first to lock it: another that
    # found it there may lay it out first, and it is theirs then
    data = tmp_path / "data"
    data.mkdir()  # made by this process, as a first command's claim makes it...
    run(data, "agent", "create", "bob")  # ...laid out by another before it takes the lock
    claim = claims.lock_data_dir(data, made=True)
    assert claim is not None
    assert not claim.fresh
    claim.abandon()  # what the first command does as it fails
    assert [agent["name"] for agent in as_json(data, "agent", "list")] == ["bob"]


def test_a_data_dir_whose_layout_was_killed_midway_is_laid_out_by_the_next_command(
    tmp_path: Path,
) -> None:
    # the claim dies with its process: a first command killed as it lays the data dir out
    # (kill -9) leaves it to the next, not refused forever
    data = tmp_path / "data"
    first = subprocess.Popen(
        [MCP0, "agent", "create", "ada", "--data-dir", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not data.exists():
        assert first.poll() is None, "it ended without making the data dir"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    _until_lock_or_exit(data, first, "holds")
    first.kill()
    first.wait(timeout=30)
    run(data, "agent", "create", "bob")
    assert "bob" in [agent["name"] for agent in as_json(data, "agent", "list")]


def test_a_command_on_a_data_dir_removed_as_it_waited_for_it_fails_saying_so(
    tmp_path: Path,
) -> None:
    # a command that needs an existing data dir found it there, as the one laying it out
    # ran, and must not lay out a new one once that one failed and removed it
    data = tmp_path / "data"
    other = _while_it_fails(data, "admin", "rotate-token")
    _, err = other.communicate(timeout=60)
    assert other.returncode == 1
    assert err == (
        f"mcp0: error: no MCP-ZERO data dir at {data} any more: the command that was laying "
        "it out failed, and removed it\n"
    )
    assert not data.exists()
