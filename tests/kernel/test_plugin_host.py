"""The plugin host: installing (a private copy, recorded in the store), unique tool names,
removing, and a running host following installs and removals made by another process."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_zero import fdio
from mcp_zero.audit.chain import read_event
from mcp_zero.errors import (
    Conflict,
    ManifestError,
    PluginFailure,
    PluginNotFound,
    StorageError,
)
from mcp_zero.kernel import plugin_data
from mcp_zero.kernel.action import Outcome, Principal, Verb
from mcp_zero.kernel.admin import admin_event
from mcp_zero.kernel.plugins import (
    MAX_OVERLAP_STEPS,
    MAX_PLUGIN_BYTES,
    REPLACED_COPY_KEPT_S,
    _clashes,
    _Offer,
    _templates_overlap,
    _walk_templates,
)
from mcp_zero.runtime import Runtime
from mcp_zero.sandbox.isolation import landlock_abi
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.storage.base import PluginRecord
from plugin_builders import loading_plugin, write_plugin

pytestmark = pytest.mark.anyio
TESTS_DIR = Path(__file__).parents[1]
FAULTY_DIR = TESTS_DIR / "plugins" / "faulty"
CONFORMANCE_DIR = TESTS_DIR / "plugins" / "conformance"
NOTES_DIR = TESTS_DIR.parent / "src" / "mcp_zero" / "examples" / "plugins" / "notes"
FAULTY_TOOLS = {
    "faulty_echo",
    "faulty_crash",
    "faulty_hang",
    "faulty_raise",
    "faulty_nap",
    "faulty_progress",
    "faulty_ask_between",
    "faulty_ask_then_answer",
    "faulty_started_then_wait",
    "faulty_log_levels",
    "faulty_close_then_finish",
    "faulty_bump",
    "faulty_bump_later",
    "faulty_daemon",
    "faulty_runner",
}


def edited_copy(tmp_path: Path, source: Path, **changes: Any) -> Path:
    """A copy of a plugin dir with top-level manifest fields changed."""
    target = tmp_path / f"{source.name}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((target / "plugin.json").read_text())
    manifest.update(changes)
    (target / "plugin.json").write_text(json.dumps(manifest))
    return target


@asynccontextmanager
async def running_faulty(make_runtime: Any) -> AsyncIterator[Runtime]:
    """A runtime with the faulty plugin installed and its workers started; closed after."""
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    try:
        with anyio.fail_after(30):
            await runtime.plugins.refresh(force=True)
        yield runtime
    finally:
        await runtime.aclose()


async def assert_refresh_changes(runtime: Runtime) -> None:
    """The host's next refresh finds a change (within 30 s)."""
    with anyio.fail_after(30):
        assert await runtime.plugins.refresh() is True


async def test_install_copies_the_plugin_and_records_it(make_runtime: Any, tmp_path: Path) -> None:
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    manifest = runtime.plugins.install(source).manifest
    assert manifest.name == "faulty"
    record = runtime.store.get_plugin("faulty")
    assert record is not None
    installed = Path(record.path)
    assert installed.is_relative_to(runtime.settings.plugins_dir)
    assert (installed / "faulty_plugin.py").read_text() == (source / "faulty_plugin.py").read_text()
    # later edits to the source do not change what runs
    (source / "faulty_plugin.py").write_text("raise SystemExit('edited')\n")
    assert "edited" not in (installed / "faulty_plugin.py").read_text()


async def test_an_installed_copy_is_readable_to_a_root_servers_workers(
    make_runtime: Any, tmp_path: Path
) -> None:
    # (they run as nobody; the copy is inside the server's 0700 data dir)
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    for path in (source, *source.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)
    runtime.plugins.install(source)
    record = runtime.store.get_plugin("faulty")
    assert record is not None
    copy = runtime.plugins.copy_path(record)
    assert {oct(p.stat().st_mode & 0o777) for p in copy.rglob("*.py")} == {"0o644"}
    assert oct(copy.stat().st_mode & 0o777) == "0o755"
    assert oct(runtime.settings.data_dir.stat().st_mode & 0o777) == "0o700"


async def test_installing_twice_needs_replace(make_runtime: Any) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    with pytest.raises(Conflict, match="already installed"):
        runtime.plugins.install(FAULTY_DIR)
    assert runtime.plugins.install(FAULTY_DIR, replace=True).manifest.name == "faulty"


async def test_tool_names_must_be_unique_across_plugins(make_runtime: Any, tmp_path: Path) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    twin = edited_copy(tmp_path, FAULTY_DIR, name="faulty-twin")
    with pytest.raises(Conflict, match=r"faulty_echo|faulty_crash"):
        runtime.plugins.install(twin)
    assert runtime.store.get_plugin("faulty-twin") is None


def race(*installs: Callable[[], object]) -> list[object]:
    """Run the installs in threads released at once (as two `mcp0 plugin install` processes,
    each with a Runtime of its own); what each returned or raised, in order."""
    barrier = threading.Barrier(len(installs))
    outcomes: list[object] = [None] * len(installs)

    def run(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            outcomes[i] = installs[i]()
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(installs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def slow_copy(tmp_path: Path, **changes: Any) -> Path:
    """A faulty copy with 32 MiB more to copy: installing it takes a while."""
    source = edited_copy(tmp_path, FAULTY_DIR, **changes)
    (source / "blob.bin").write_bytes(bytes(32 << 20))
    return source


@pytest.mark.parametrize("clash", ["same name", "same tool names"])
async def test_of_two_installs_racing_one_wins_and_the_other_gets_a_conflict(
    make_runtime: Any, tmp_path: Path, clash: str
) -> None:
    # Both checked before either wrote: both were installed (the second over the first,
    # or two plugins serving the same tools).
    first, second = make_runtime(), make_runtime()  # one data dir, two stores
    source_a = slow_copy(tmp_path)
    source_b = slow_copy(tmp_path) if clash == "same name" else slow_copy(tmp_path, name="twin")
    outcomes = race(
        lambda: first.plugins.install(source_a), lambda: second.plugins.install(source_b)
    )
    conflicts = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(conflicts) == 1, outcomes
    said = "already installed" if clash == "same name" else "already provided by plugin"
    assert said in conflicts[0].message
    (record,) = first.store.list_plugins()
    assert (Path(record.path) / "faulty_plugin.py").is_file()
    # the loser's copy is gone: only the recorded one is left
    assert [p.name for p in (first.settings.plugins_dir).glob("*/*")] == [Path(record.path).name]


async def test_an_invalid_manifest_is_refused(make_runtime: Any, tmp_path: Path) -> None:
    runtime: Runtime = make_runtime()
    with pytest.raises(ManifestError):
        runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, runtime="docker"))
    with pytest.raises(ManifestError):
        runtime.plugins.install(tmp_path / "missing")
    assert runtime.store.list_plugins() == []


async def test_a_symbolic_link_in_a_plugin_is_refused_before_anything_is_copied(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    (source / ".git").mkdir()
    (source / ".git" / "root").symlink_to("/")  # in what is not copied: harmless
    (source / "everything").symlink_to("/")  # would copy the whole file system
    with pytest.raises(ManifestError, match=r"everything .*symbolic link"):
        runtime.plugins.install(source)
    assert runtime.store.list_plugins() == []
    assert not (runtime.settings.plugins_dir / "faulty").exists()  # nothing was copied


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other users (chown)")
async def test_a_hard_link_to_another_users_file_is_refused(
    make_runtime: Any, tmp_path: Path
) -> None:
    # Where fs.protected_hardlinks is 0, a user can link any file into a plugin directory
    # (/etc/shadow): root's install copied it, for the plugin's workers to read (found by
    # review). A link to a file of the directory's owner is the owner's to give.
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    user, other = 4242, 4343
    os.chown(source, user, user)
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret")
    os.chown(secret, other, other)
    os.link(secret, source / "shadow")
    with pytest.raises(
        ManifestError, match=r"shadow in .* is a hard link to a file of another user \(uid 4343\)"
    ):
        runtime.plugins.install(source)
    assert runtime.store.list_plugins() == []
    os.chown(secret, user, user)  # the owner's own file, linked: a file of the plugin's
    runtime.plugins.install(source)
    copy = runtime.plugins.copy_path(runtime.store.list_plugins()[0])
    assert (copy / "shadow").read_text() == "root:$6$secret"


async def test_a_plugin_json_other_than_the_one_decided_on_is_not_installed(
    make_runtime: Any, tmp_path: Path
) -> None:
    # The policy decided on the plugin.json read first (runtime.install_plugin), the install
    # read it again: a user who owns the directory root installs from could swap in another
    # plugin meanwhile, installed under a decision (and an audit record) made for the first
    # (found by review). The host is given the manifest decided on, and refuses another.
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    decided = load_manifest(source)
    swapped = {**json.loads((source / "plugin.json").read_text()), "name": "shell"}
    (source / "plugin.json").write_text(json.dumps(swapped))
    with pytest.raises(ManifestError, match="changed after the install of plugin 'faulty'"):
        runtime.plugins.install(source, decided=decided)
    assert runtime.store.list_plugins() == []
    assert not (runtime.settings.plugins_dir / "shell").exists()  # nothing was copied
    runtime.plugins.install(source, decided=load_manifest(source))  # the one decided on
    assert [r.name for r in runtime.store.list_plugins()] == ["shell"]


async def test_a_plugin_over_the_size_limit_is_refused(make_runtime: Any, tmp_path: Path) -> None:
    runtime: Runtime = make_runtime()
    source = edited_copy(tmp_path, FAULTY_DIR)
    with (source / "blob.bin").open("wb") as blob:  # sparse: the size, without the disk
        blob.truncate(MAX_PLUGIN_BYTES + 1)
    with pytest.raises(ManifestError, match="more than a plugin may"):
        runtime.plugins.install(source)
    assert runtime.store.list_plugins() == []


async def test_a_plugin_deeper_than_a_copy_goes_is_refused_by_name(
    deep_tree: Callable[[Path, int], None], make_runtime: Any, tmp_path: Path
) -> None:
    # 129 levels failed as a copy (a StorageError), 1,500 raised RecursionError in the check
    # before it (os.walk): both are the plugin's fault, said as such (found by review)
    runtime: Runtime = make_runtime()
    for levels in (fdio.MAX_DEPTH, 1500):
        source = edited_copy(tmp_path, FAULTY_DIR)
        deep_tree(source / "deep", levels)  # (directories down to levels + 1 deep)
        with pytest.raises(ManifestError, match=f"more than {fdio.MAX_DEPTH} levels deep"):
            runtime.plugins.install(source)
    assert runtime.store.list_plugins() == []
    source = edited_copy(tmp_path, FAULTY_DIR)
    deep_tree(source / "deep", fdio.MAX_DEPTH - 1)  # as deep as a plugin may go
    runtime.plugins.install(source)
    copy = runtime.plugins.copy_path(runtime.store.list_plugins()[0])
    assert fdio.tree_bytes(copy / "deep") == (fdio.MAX_DEPTH - 1) * 3  # all of it copied


async def test_a_removed_plugins_data_dir_however_deep_is_listed_and_purged(
    deep_tree: Callable[[Path, int], None], make_runtime: Any
) -> None:
    # A plugin can make its data dir 1,500 levels deep: listing what removals set aside,
    # purging it or adopting it raised RecursionError (os.walk, shutil.rmtree)
    runtime: Runtime = make_runtime()
    where = runtime.settings.plugin_data_dir
    runtime.plugins.install(FAULTY_DIR)
    deep_tree(where / "faulty", 1500)
    kept = runtime.plugins.remove("faulty").data_kept
    assert kept is not None
    (aside,) = plugin_data.set_aside(where)
    assert (aside.dir, aside.bytes) == (kept.name, 1500 * 3)
    runtime.purge_plugin_data(kept.name)
    assert plugin_data.set_aside(where) == []
    assert os.listdir(where) == []


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG in this process, as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


async def test_a_copy_that_fails_half_way_leaves_the_installed_version(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    before = runtime.store.get_plugin("faulty")
    assert before is not None
    files = sorted(p.name for p in Path(before.path).iterdir())
    bigger = edited_copy(tmp_path, FAULTY_DIR)
    (bigger / "blob.bin").write_bytes(b"x" * (2 << 20))
    with file_size_limit(1 << 20), pytest.raises(StorageError, match=r"blob\.bin: .*too large"):
        runtime.plugins.install(bigger, replace=True)
    assert runtime.store.get_plugin("faulty") == before
    assert sorted(p.name for p in Path(before.path).iterdir()) == files
    assert [p.name for p in Path(before.path).parent.iterdir()] == [Path(before.path).name]


async def test_remove_leaves_the_copy_to_the_drain_then_the_sweep(make_runtime: Any) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    copy = installed_copy(runtime)
    runtime.plugins.remove("faulty")
    assert runtime.store.get_plugin("faulty") is None
    assert copy.is_dir()  # a server may still run calls on it (its drain deletes it)
    with pytest.raises(PluginNotFound):
        runtime.plugins.remove("faulty")
    make_runtime()
    assert copy.is_dir()  # removed just now: a start leaves it
    backdate(copy)
    make_runtime()
    assert not copy.exists()


async def test_a_removed_plugins_data_goes_to_a_later_one_of_its_name_only_when_told(
    make_runtime: Any, tmp_path: Path
) -> None:
    # Another plugin installed under a removed one's name read its users' data as its own
    # (found by review): a removal sets the data dir aside, an install takes it back only
    # when told to adopt it
    runtime: Runtime = make_runtime()
    plugin_data = runtime.settings.plugin_data_dir
    data = plugin_data / "faulty"
    runtime.plugins.install(FAULTY_DIR)
    assert runtime.plugins.remove("faulty").data_kept is None  # (it never ran: no data dir)
    runtime.plugins.install(FAULTY_DIR)
    (data / ".tmp").mkdir(parents=True)  # as its worker's start makes it
    (data / "users.db").write_text("alice's")
    runtime.plugins.install(FAULTY_DIR, replace=True)  # an upgrade keeps its data
    kept = runtime.plugins.remove("faulty").data_kept
    assert kept is not None
    assert kept.parent == plugin_data
    assert kept.name.startswith("faulty.removed-")
    assert not data.exists()
    assert (kept / "users.db").read_text() == "alice's"
    other = edited_copy(tmp_path, FAULTY_DIR, version="6.6.6")
    runtime.plugins.install(other)  # another plugin of the name: it starts with no data
    assert not data.exists()
    assert runtime.plugins.remove("faulty").data_kept is None
    runtime.plugins.install(FAULTY_DIR, adopt_data=True)  # the same plugin, back
    assert (data / "users.db").read_text() == "alice's"
    assert not kept.exists()
    # a removal made before data dirs were set aside left it in place: refused, or adopted
    runtime.store.delete_plugin("faulty")
    with pytest.raises(Conflict, match=r"faulty holds the data of a plugin 'faulty' removed"):
        runtime.plugins.install(other)
    with pytest.raises(Conflict, match="--adopt-data"):
        runtime.plugins.install(other, replace=True)  # (nothing installed to replace)
    assert runtime.store.get_plugin("faulty") is None
    runtime.plugins.install(FAULTY_DIR, adopt_data=True)
    assert (data / "users.db").read_text() == "alice's"


async def test_a_removal_or_adoption_rolled_back_puts_the_data_dir_back(
    make_runtime: Any,
) -> None:
    # the data dir is renamed in the transaction: one that does not commit renames it back
    runtime: Runtime = make_runtime()
    data = runtime.settings.plugin_data_dir / "faulty"
    runtime.plugins.install(FAULTY_DIR)
    data.mkdir(parents=True)
    (data / "users.db").write_text("alice's")

    def unrecordable(_: Any) -> dict[str, Any]:
        raise StorageError("disk full")

    def failing(write: Callable[[], Any]) -> Any:  # the write's transaction is rolled back
        return runtime.audit.append_with(write, unrecordable)

    with pytest.raises(StorageError):
        runtime.plugins.remove("faulty", commit=failing)
    assert (data / "users.db").read_text() == "alice's"
    assert runtime.store.get_plugin("faulty") is not None
    kept = runtime.plugins.remove("faulty").data_kept
    assert kept is not None
    with pytest.raises(StorageError):
        runtime.plugins.install(FAULTY_DIR, adopt_data=True, commit=failing)
    assert (kept / "users.db").read_text() == "alice's"
    assert not data.exists()
    assert runtime.store.get_plugin("faulty") is None
    with pytest.raises(StorageError):  # a purge too: the data dir is back where it was
        plugin_data.purge(runtime.settings.plugin_data_dir, kept.name, runtime.store, failing)
    assert (kept / "users.db").read_text() == "alice's"
    assert [a.dir for a in plugin_data.set_aside(runtime.settings.plugin_data_dir)] == [kept.name]


def test_a_purge_cut_short_is_finished_as_its_record_says(make_runtime: Any) -> None:
    # A purge killed between its rename and its commit left the dir hidden, and the next
    # purge of another dir deleted it unrecorded (found by review): now it is deleted only
    # if its record is in the log, else set aside again, by the next purge or runtime
    runtime: Runtime = make_runtime()
    where = runtime.settings.plugin_data_dir
    kept = []
    for text in ("first", "second", "third"):
        runtime.plugins.install(FAULTY_DIR)
        (where / "faulty").mkdir(parents=True)
        (where / "faulty" / "users.db").write_text(text)
        removal = runtime.plugins.remove("faulty")
        assert removal.data_kept is not None
        kept.append(removal.data_kept.name)
    first, second, third = kept
    # both renamed as their purges began (the log empty then); only the second's record
    # was committed
    os.rename(where / first, where / f".purging-0-{first}")
    os.rename(where / second, where / f".purging-0-{second}")
    runtime.audit.append_sync(
        admin_event(
            Verb.PURGE_PLUGIN_DATA, "faulty", "cli", Outcome.ALLOWED, {"data_purged": second}
        )
    )
    assert plugin_data.set_aside(where) == [plugin_data.find(where, third)]
    runtime.purge_plugin_data(third)
    assert os.listdir(where) == [first]
    assert (where / first / "users.db").read_text() == "first"
    purges = [
        event["data_purged"]
        for event in map(read_event, runtime.store.read_audit())
        if event["verb"] == Verb.PURGE_PLUGIN_DATA
    ]
    assert purges == [second, third]
    # cut short again: a runtime finishes it as it opens
    os.rename(where / first, where / f".purging-0-{first}")
    make_runtime()
    assert [aside.dir for aside in plugin_data.set_aside(where)] == [first]


def test_a_damaged_record_where_a_purge_is_looked_for_is_no_record_of_it(
    make_runtime: Any,
) -> None:
    # A record holding the set-aside dir's name whose body is not JSON (damaged) made the
    # search for the purge's record, and so the runtime's start, fail with a bare
    # JSONDecodeError (found by a bug hunt): it is no record of the purge, and the dir is
    # set aside again, its data kept
    runtime: Runtime = make_runtime()
    where = runtime.settings.plugin_data_dir
    runtime.plugins.install(FAULTY_DIR)
    (where / "faulty").mkdir(parents=True)
    (where / "faulty" / "users.db").write_text("kept")
    kept = runtime.plugins.remove("faulty").data_kept
    assert kept is not None
    os.rename(where / kept.name, where / f".purging-0-{kept.name}")
    runtime.audit.append_sync(
        admin_event(
            Verb.PURGE_PLUGIN_DATA, "faulty", "cli", Outcome.ALLOWED, {"data_purged": kept.name}
        )
    )
    runtime.install_plugin(NOTES_DIR)  # (audited: the damaged record is not the newest)
    runtime.close()
    db = sqlite3.connect(runtime.settings.db_path, isolation_level=None)
    try:  # behind the store's back, as a disk's fault or an attacker would
        db.execute("DROP TRIGGER audit_no_update")
        db.execute(
            "UPDATE audit SET body = CAST(? AS BLOB) WHERE instr(body, CAST(? AS BLOB))",
            (f'{{"data_purged": "{kept.name}", damaged', "data_purged"),
        )
    finally:
        db.close()
    make_runtime()  # finishes the purge cut short as it opens
    assert [aside.dir for aside in plugin_data.set_aside(where)] == [kept.name]
    assert (where / kept.name / "users.db").read_text() == "kept"


class HeldBridge:
    """A bridge that holds a call's question to its client until told to answer, then
    answers as ``bridge`` (the kernel tests' KernelBridge), which does all else."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bridge, name)

    async def request(
        self, method: str, params: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        self.asked.set()
        await self.answer.wait()
        answer: dict[str, Any] = await self.bridge.request(method, params, key)
        return answer


async def test_a_removed_plugins_last_call_writes_where_its_data_was_set_aside(
    make_runtime: Any, bridge: Any, tmp_path: Path
) -> None:
    # A call of a removed plugin that wrote after another plugin of its name was installed
    # wrote into the new one's data dir: the new plugin read it (found by review). Its
    # worker is confined to its data dir's inode, which the removal renamed.
    source = tmp_path / "keeper"
    source.mkdir()
    manifest = {
        "name": "keeper",
        "version": "1.0.0",
        "abi": 1,
        "runtime": "process",
        "entry": "keeper_plugin:plugin",
        "description": "writes once its client answers",
        "tools": [
            {"name": name, "description": name, "inputSchema": {"type": "object"}}
            for name in ("keeper_write", "keeper_list")
        ],
    }
    (source / "plugin.json").write_text(json.dumps(manifest))
    (source / "keeper_plugin.py").write_text(
        "from mcp_zero.plugin import Context, Plugin\n"
        "plugin = Plugin('keeper')\n"
        "@plugin.tool('keeper_write')\n"
        "async def keeper_write(ctx: Context) -> str:\n"
        "    await ctx.sample('go on?', max_tokens=1)\n"
        "    (ctx.data_dir / 'secrets.txt').write_text(\"first users' secrets\")\n"
        "    return 'written'\n"
        "@plugin.tool('keeper_list')\n"
        "def keeper_list(ctx: Context) -> str:\n"
        "    return ' '.join(sorted(p.name for p in ctx.data_dir.iterdir()))\n"
    )
    other = edited_copy(tmp_path, source, version="2.0.0", publisher="another")
    runtime: Runtime = make_runtime()
    runtime.install_plugin(source)
    principal = Principal("alice", frozenset({"keeper"}))
    held = HeldBridge(bridge)
    try:
        with anyio.fail_after(20):
            await runtime.plugins.refresh(force=True)
            writing = asyncio.ensure_future(
                runtime.kernel.call_tool(
                    principal, "keeper_write", {}, held, request_id="w", transport="test"
                )
            )
            await held.asked.wait()
            removal = runtime.remove_plugin("keeper")
            runtime.install_plugin(other)  # no data in the way: no --adopt-data needed
            held.answer.set()
            assert (await writing)["content"][0]["text"] == "written"
            await runtime.plugins.refresh()
            listed = await runtime.kernel.call_tool(
                principal, "keeper_list", {}, bridge, request_id="l", transport="test"
            )
        assert listed["content"][0]["text"] == ".tmp"
        assert removal.data_kept is not None
        assert (removal.data_kept / "secrets.txt").read_text() == "first users' secrets"
        records = [json.loads(e.body) for e in runtime.store.read_audit(0, 1000)]
        [removed] = [r for r in records if r.get("verb") == "remove_plugin"]
        assert removed["data_kept"] == removal.data_kept.name
    finally:
        await runtime.aclose()


async def test_a_copied_data_dir_uses_and_touches_only_its_own_copies(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    original = installed_copy(runtime)
    data = runtime.settings.data_dir
    copied = tmp_path / "copied-data"
    shutil.copytree(data, copied, symlinks=True)
    other = make_runtime(data_dir=copied)
    record = other.store.get_plugin("faulty")
    assert record is not None
    assert (
        other.plugins.copy_path(record) == copied.absolute() / "plugins" / "faulty" / original.name
    )
    other.plugins.remove("faulty")
    backdate(copied / "plugins" / "faulty" / original.name)
    make_runtime(data_dir=copied)  # its sweep
    assert not (copied / "plugins" / "faulty" / original.name).exists()
    assert original.is_dir()  # the first data dir's copy is untouched


def backdate(path: Path) -> None:
    """Make ``path`` look older than a replaced copy is kept: the next sweep takes it."""
    long_ago = time.time() - REPLACED_COPY_KEPT_S - 60
    os.utime(path, (long_ago, long_ago))


def installed_copy(runtime: Runtime) -> Path:
    record = runtime.store.get_plugin("faulty")
    assert record is not None
    return runtime.plugins.copy_path(record)


async def test_a_replaced_copy_is_kept_for_a_draining_server_then_swept_at_a_start(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    first = installed_copy(runtime)
    runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, version="2.0.0"), replace=True)
    second = installed_copy(runtime)
    runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, version="3.0.0"), replace=True)
    current = installed_copy(runtime)
    assert first.is_dir()  # a server may still run calls on them
    assert second.is_dir()
    backdate(first)  # replaced before any call could still run on it
    make_runtime()  # a start (a CLI command, a server) sweeps
    assert not first.exists()
    assert second.is_dir()
    assert current.is_dir()


async def test_a_running_server_sweeps_old_replaced_copies_when_plugins_change(
    make_runtime: Any, tmp_path: Path
) -> None:
    """Not only at its next start: under frequent replaces a server up for months would keep
    every copy its refreshes never loaded (a probe: 20 of 30 left behind)."""
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    await runtime.start(wait=10)
    try:
        # a copy replaced again before this server's refresh loaded it: it never drains it
        never_loaded = installed_copy(runtime).parent / "2.0.0-replaced"
        shutil.copytree(FAULTY_DIR, never_loaded)
        os.utime(never_loaded)  # made now (copytree kept the source's time)
        cli = make_runtime()  # another process's install, as `mcp0 plugin install` makes
        backdate(never_loaded)  # (after: a Runtime sweeps as it starts)
        cli.plugins.install(edited_copy(tmp_path, FAULTY_DIR, version="3.0.0"), replace=True)
        current = installed_copy(cli)
        with anyio.fail_after(20):
            while never_loaded.exists():
                await anyio.sleep(0.05)
        assert current.is_dir()
    finally:
        await runtime.aclose()


async def test_refresh_indexes_tools_resources_and_prompts(make_runtime: Any) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    runtime.plugins.install(CONFORMANCE_DIR)
    host = runtime.plugins
    changes: list[int] = []
    host.on_change = lambda: changes.append(1)
    try:
        with anyio.fail_after(30):
            assert await host.refresh(force=True) is True
            assert await host.refresh() is False  # nothing changed since
        assert changes == [1]
        assert {n for n, e in host.tools.items() if e.plugin == "faulty"} == FAULTY_TOOLS
        assert host.tools["test_simple_text"].plugin == "conformance"
        assert host.resource_owner("test://static-text") == "conformance"
        assert host.resource_owner("test://template/42/data") == "conformance"
        assert host.resource_owner("test://template/a/b/data") is None  # {id} is one segment
        assert host.resource_owner("other://x") is None
        assert host.prompts["test_simple_prompt"][0] == "conformance"
        with pytest.raises(PluginNotFound):
            host.runtime("notes")
    finally:
        await runtime.aclose()


async def test_a_running_host_follows_another_process(make_runtime: Any) -> None:
    async with running_faulty(make_runtime) as server:
        assert "notes_add" not in server.plugins.tools
        # `mcp0 plugin install` on the same data dir, in another Runtime
        cli = Runtime(server.settings)
        try:
            cli.plugins.install(NOTES_DIR)
        finally:
            cli.close()
        await assert_refresh_changes(server)
        assert server.plugins.tools["notes_add"].plugin == "notes"
        assert "notes" in server.plugins.runtimes
        cli = Runtime(server.settings)
        try:
            cli.plugins.remove("faulty")
        finally:
            cli.close()
        await assert_refresh_changes(server)
        assert not any(e.plugin == "faulty" for e in server.plugins.tools.values())
        assert "faulty" not in server.plugins.runtimes


async def test_a_replaced_plugin_restarts_with_the_new_manifest(
    make_runtime: Any, tmp_path: Path
) -> None:
    async with running_faulty(make_runtime) as runtime:
        old = runtime.plugins.runtime("faulty")
        runtime.plugins.install(
            edited_copy(tmp_path, FAULTY_DIR, description="second edition"), replace=True
        )
        await assert_refresh_changes(runtime)
        assert runtime.plugins.runtime("faulty") is not old
        assert runtime.plugins.manifests["faulty"].description == "second edition"


async def test_installing_another_plugin_leaves_running_workers_alone(
    make_runtime: Any,
) -> None:
    async with running_faulty(make_runtime) as runtime:
        faulty = runtime.plugins.runtime("faulty")
        pids_before = list(faulty.pids)  # type: ignore[attr-defined]
        runtime.plugins.install(NOTES_DIR)
        await assert_refresh_changes(runtime)
        # the same runtime, the same workers: no second set started beside the first
        assert runtime.plugins.runtime("faulty") is faulty
        assert faulty.pids == pids_before  # type: ignore[attr-defined]
        assert len(runtime.plugins.runtime("notes").pids) == 1  # type: ignore[attr-defined]


async def nap_on(runtime: Any, seconds: float, bridge: Any) -> dict[str, Any]:
    result: dict[str, Any] = await runtime.call_tool(
        "faulty_nap", {"seconds": seconds}, agent="a", bridge=bridge, timeout=90
    )
    return result


async def gone(runtime: Any) -> None:
    """Until the runtime's workers have all exited (bounded)."""
    with anyio.fail_after(20):
        while runtime.pids:
            await anyio.sleep(0.05)


@pytest.mark.parametrize("change", ["replace", "remove"])
async def test_calls_in_flight_finish_when_their_plugin_is_replaced_or_removed(
    make_runtime: Any, bridge: Any, change: str
) -> None:
    async with running_faulty(make_runtime) as runtime:
        old = runtime.plugins.runtime("faulty")
        napping = asyncio.ensure_future(nap_on(old, 1.0, bridge))
        await anyio.sleep(0.3)  # the call is running in the old worker
        if change == "replace":
            runtime.plugins.install(FAULTY_DIR, replace=True)
        else:
            runtime.plugins.remove("faulty")
        await assert_refresh_changes(runtime)
        assert not napping.done()
        if change == "replace":  # new calls go to the new code meanwhile
            new = runtime.plugins.runtime("faulty")
            assert new is not old
            assert (await nap_on(new, 0.0, bridge))["content"][0]["text"] == "napped 0.0"
            assert not napping.done()
        else:
            assert "faulty_nap" not in runtime.plugins.tools
        with anyio.fail_after(20):
            result = await napping
        assert result["content"][0]["text"] == "napped 1.0"  # not cut off
        await gone(old)  # and then the old workers leave


async def test_closing_the_host_stops_a_replaced_plugin_still_draining(
    make_runtime: Any, bridge: Any
) -> None:
    async with running_faulty(make_runtime) as runtime:
        old = runtime.plugins.runtime("faulty")
        waiting = asyncio.ensure_future(nap_on(old, 60.0, bridge))
        await anyio.sleep(0.3)
        runtime.plugins.install(FAULTY_DIR, replace=True)
        await assert_refresh_changes(runtime)
        with anyio.fail_after(20):
            await runtime.plugins.close()  # does not wait out the 60 s call
        with pytest.raises(PluginFailure):  # cancelled, or killed: not left hanging
            await waiting
        await gone(old)


async def test_a_reinstall_of_the_same_version_restarts_it(make_runtime: Any) -> None:
    async with running_faulty(make_runtime) as runtime:
        old = runtime.plugins.runtime("faulty")
        runtime.plugins.install(FAULTY_DIR, replace=True)  # new code, same manifest
        await assert_refresh_changes(runtime)
        assert runtime.plugins.runtime("faulty") is not old


async def test_a_plugin_whose_data_dir_cannot_be_made_fails_alone_until_it_can(
    make_runtime: Any, bridge: Any
) -> None:
    # A file where its data dir goes: the server died at start with a traceback, and a
    # running one could take up no install any more, every second (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(FAULTY_DIR)
    in_the_way = runtime.settings.plugin_data_dir / "faulty"
    in_the_way.write_text("in the way")
    try:
        with anyio.fail_after(30):
            await runtime.start()
        faulty = runtime.plugins.runtime("faulty")  # (no failure of its code: not failed)
        assert "cannot make its data dir" in faulty.start_failure  # type: ignore[attr-defined]
        runtime.plugins.install(NOTES_DIR)  # and later installs are taken up
        with anyio.fail_after(30):
            await runtime.plugins.refresh()
        assert runtime.plugins.runtime("notes").pids  # type: ignore[attr-defined]
        # Once the way is clear, a call starts it (it needed a reinstall: found by review)
        in_the_way.unlink()
        await runtime.agents.spawn("alice", ["faulty"])  # (a call that waits for a worker
        with anyio.fail_after(30):  # looks its agent up again)
            result = await runtime.kernel.call_tool(
                runtime.agents.principal("alice"),
                "faulty_echo",
                {"text": "made"},
                bridge,
                request_id="d1",
                transport="test",
            )
        assert result["content"] == [{"type": "text", "text": "made"}]
        assert in_the_way.is_dir()
    finally:
        await runtime.aclose()


async def test_a_plugin_whose_worker_is_killed_as_it_starts_is_started_again(
    make_runtime: Any, bridge: Any, tmp_path: Path
) -> None:
    # A worker killed while it loaded (by the OOM killer, say) left its plugin failed, every
    # call told to fix and reinstall it, until a reinstall or a restart (found by review)
    source = tmp_path / "once"
    source.mkdir()
    tool = {"name": "once_echo", "description": "echo", "inputSchema": {"type": "object"}}
    (source / "plugin.json").write_text(
        json.dumps(
            {"name": "once", "version": "1", "abi": 1, "entry": "once:plugin", "tools": [tool]}
        )
    )
    (source / "once.py").write_text(
        "import os, pathlib, signal\nfrom mcp_zero.plugin import Plugin\n"
        "first = pathlib.Path('started-once')\n"  # (in its data dir, its cwd)
        "if not first.exists():\n    first.touch()\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "plugin = Plugin()\n@plugin.tool('once_echo')\ndef echo(ctx): return 'again'\n"
    )
    runtime: Runtime = make_runtime()
    runtime.plugins.install(source)
    try:
        with anyio.fail_after(20):
            await runtime.start()
        assert "once" not in runtime.plugins.failed
        await runtime.agents.spawn("alice", ["once"])  # (a call that waits for a worker
        with anyio.fail_after(20):  # looks its agent up again)
            result = await runtime.kernel.call_tool(
                runtime.agents.principal("alice"),
                "once_echo",
                {},
                bridge,
                request_id="k1",
                transport="test",
            )
        assert result["content"] == [{"type": "text", "text": "again"}]
    finally:
        await runtime.aclose()


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("faulty_plugin:nothere", "module 'faulty_plugin' has no attribute 'nothere'"),
        ("faulty_plugin:asyncio", "'faulty_plugin:asyncio' is module, not a"),
    ],
)
async def test_an_entry_naming_no_plugin_says_what_it_names(
    make_runtime: Any, tmp_path: Path, entry: str, says: str
) -> None:
    # a missing attribute read "'faulty_plugin:nothere' is NoneType" (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, entry=entry))
    try:
        with anyio.fail_after(30):
            await runtime.start()
        assert says in runtime.plugins.failed["faulty"]
    finally:
        await runtime.aclose()


async def test_a_plugin_that_cannot_start_does_not_take_the_others_down(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    broken = edited_copy(tmp_path, FAULTY_DIR)
    (broken / "faulty_plugin.py").write_text("raise RuntimeError('broken at import')\n")
    runtime.plugins.install(broken)
    runtime.plugins.install(NOTES_DIR)
    try:
        with anyio.fail_after(30):
            await runtime.start()
        assert "notes" not in runtime.plugins.failed
        assert "broken at import" in runtime.plugins.failed["faulty"]
        with pytest.raises(PluginFailure, match="could not start"):
            runtime.plugins.runtime("faulty")
        assert runtime.plugins.runtime("notes").pids  # type: ignore[attr-defined]
    finally:
        await runtime.aclose()


def pids_of(runtime: Runtime, name: str) -> list[int]:
    pids: list[int] = runtime.plugins.runtimes[name].pids  # type: ignore[attr-defined]
    return pids


async def test_plugins_get_workers_only_within_the_servers_max_workers(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime(max_workers=3)
    quotas = {"timeout_ms": 1500, "memory_mb": 256, "max_concurrency": 16, "workers": 2}
    runtime.plugins.install(CONFORMANCE_DIR)  # 1 worker
    runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, quotas=quotas))  # 2 workers
    runtime.plugins.install(NOTES_DIR)  # 1 worker: one too many
    try:
        with anyio.fail_after(30):
            await runtime.start()
        assert len(pids_of(runtime, "conformance")) == 1
        assert len(pids_of(runtime, "faulty")) == 2
        assert pids_of(runtime, "notes") == []  # not started at all
        with pytest.raises(PluginFailure) as refused:
            runtime.plugins.runtime("notes")
        assert str(refused.value) == (
            "plugin 'notes' is not running: it needs 1 worker process (quotas.workers) and 0 of "
            "the server's max_workers = 3 are free (held by faulty (2), conformance (1)); lower "
            "its quotas.workers, remove a plugin, or raise max_workers"
        )
        # A removal frees workers: the refused plugin starts at the next refresh.
        runtime.plugins.remove("faulty")
        await assert_refresh_changes(runtime)
        assert "notes" not in runtime.plugins.failed
        assert len(runtime.plugins.runtime("notes").pids) == 1  # type: ignore[attr-defined]
        # A plugin asking for more than the whole budget is refused whatever runs.
        runtime.plugins.install(edited_copy(tmp_path, FAULTY_DIR, quotas={**quotas, "workers": 4}))
        await assert_refresh_changes(runtime)
        assert pids_of(runtime, "faulty") == []
        assert "needs 4 worker processes" in runtime.plugins.failed["faulty"]
        assert "1 of the server's max_workers = 3 are free" in runtime.plugins.failed["faulty"]
    finally:
        await runtime.aclose()


async def test_plugins_left_idle_hold_no_workers_of_max_workers(make_runtime: Any) -> None:
    # A stdio session starts only its agent's plugins: the others must not take the
    # workers its agent's need, nor those of the plugins it takes up later
    runtime: Runtime = make_runtime(max_workers=1)
    runtime.plugins.install(CONFORMANCE_DIR)  # 1 worker each
    runtime.plugins.install(FAULTY_DIR)
    runtime.plugins.install(NOTES_DIR)
    runtime.plugins.starts_only = {"notes"}
    try:
        with anyio.fail_after(30):
            await runtime.start()
        assert len(pids_of(runtime, "notes")) == 1  # though conformance comes first
        assert pids_of(runtime, "conformance") == pids_of(runtime, "faulty") == []
        assert not runtime.plugins.failed
        runtime.plugins.take_up({"notes", "faulty"})  # attached later: no worker left for it
        assert "0 of the server's max_workers = 1 are free" in runtime.plugins.failed["faulty"]
        assert pids_of(runtime, "conformance") == []
    finally:
        await runtime.aclose()


async def test_a_plugin_refused_workers_names_one_failing_to_start_that_holds_them(
    make_runtime: Any, tmp_path: Path
) -> None:
    # "0 of the server's max_workers = 16 are free" while a plugin stuck in its start's
    # backoff held them: which, and why, the message did not say (found by review)
    runtime: Runtime = make_runtime(max_workers=2)
    dying = write_plugin(
        tmp_path / "dying",
        "dying",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        ["dying_echo"],
        quotas={"workers": 2},
    )
    runtime.plugins.install(dying)
    try:
        with anyio.fail_after(30):
            await runtime.start()
        assert "dying" not in runtime.plugins.failed  # (it is started again, after a backoff)
        runtime.plugins.install(NOTES_DIR)
        await assert_refresh_changes(runtime)
        assert runtime.plugins.failed["notes"] == (
            "it needs 1 worker process (quotas.workers) and 0 of the server's max_workers = 2 "
            "are free (held by dying (2, failing to start: kept for when it starts)); lower "
            "its quotas.workers, remove a plugin, or raise max_workers"
        )
    finally:
        await runtime.aclose()


async def test_a_copy_is_dated_by_its_install_not_by_its_source(
    make_runtime: Any, tmp_path: Path
) -> None:
    # copytree gives a copy its source's times: an old source made a fresh install look
    # replaced long ago, and the next start swept the copy in use
    source = edited_copy(tmp_path, FAULTY_DIR)
    backdate(source)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(source)
    assert time.time() - installed_copy(runtime).stat().st_mtime < 600


async def test_a_start_waits_only_for_the_plugins_it_is_told_to_and_starts_them_all(
    make_runtime: Any, tmp_path: Path
) -> None:
    # `mcp0 serve --stdio` waits for its agent's plugins: another plugin that hung as it
    # loaded held up every client's launch by the whole wait (found by review)
    pid_file = tmp_path / "data" / "plugin-data" / "slow" / "slow.pid"  # its data dir
    runtime: Runtime = make_runtime()
    runtime.plugins.install(loading_plugin(tmp_path / "slow", pid_file))
    runtime.plugins.install(Path(__file__).parents[1] / "sandbox" / "kit")
    try:
        with anyio.fail_after(20):  # (the whole wait is 60 s)
            await runtime.plugins.refresh(force=True, wait=60, wait_for={"kit"})
        assert runtime.plugins.starting == {"slow"}  # not waited for, but started
        assert runtime.plugins.runtimes["kit"].ready()
        assert not runtime.plugins.failed
        with anyio.fail_after(20):
            while not pid_file.exists():
                await anyio.sleep(0.02)
    finally:
        await runtime.aclose()


@pytest.mark.parametrize("change", ["replace", "remove"])
async def test_a_call_waiting_for_a_plugin_removed_or_replaced_as_it_starts_is_answered(
    make_runtime: Any, bridge: Any, tmp_path: Path, change: str
) -> None:
    # The call waited on the start that the removal cancelled: it got CancelledError (an
    # HTTP request never answered), and the worker went on loading long after.
    pid_file = tmp_path / "data" / "plugin-data" / "slow" / "slow.pid"  # its data dir
    source = loading_plugin(tmp_path / "slow", pid_file)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(source)
    try:
        with anyio.fail_after(10):
            await runtime.plugins.refresh(force=True, wait=0.2)  # it goes on starting
        principal = Principal("alice", frozenset({"slow"}))
        waiting = asyncio.ensure_future(
            runtime.kernel.call_tool(
                principal, "slow_echo", {}, bridge, request_id="w1", transport="test"
            )
        )
        with anyio.fail_after(20):
            while not pid_file.exists() or not pid_file.read_text():
                await anyio.sleep(0.02)
        pid = int(pid_file.read_text())
        await anyio.sleep(0.1)
        assert not waiting.done()
        if change == "replace":
            runtime.plugins.install(source, replace=True)
        else:
            runtime.plugins.remove("slow")
        with anyio.fail_after(10):  # (a replacing copy hangs as it loads too: do not wait)
            assert await runtime.plugins.refresh(wait=0.2)
        with (
            anyio.fail_after(20),
            pytest.raises(PluginFailure, match="while it was still starting"),
        ):
            await waiting
        [record] = [
            body
            for entry in runtime.store.read_audit(0, 1000)
            if (body := json.loads(entry.body)).get("request_id") == "w1"
        ]
        assert (record["outcome"], record["code"]) == ("error", "plugin_failure")
        with pytest.raises(ProcessLookupError):  # the removed copy's worker is gone
            os.kill(pid, 0)
    finally:
        await runtime.aclose()


async def test_a_plugin_cannot_reach_the_servers_secrets(
    make_runtime: Any, bridge: Any, tmp_path: Path
) -> None:
    # A worker ran as the server's user with nothing between it and the data dir: it could
    # read the admin token, the signing keys and the audit database, and, through /proc,
    # the server's environment (MCP0_TOKEN of a stdio server).
    runtime: Runtime = make_runtime()
    runtime.plugins.install(Path(__file__).parents[1] / "sandbox" / "kit")
    await runtime.start()
    data = runtime.settings.data_dir
    own = data / "plugin-data" / "kit" / "notes.txt"
    secrets = [runtime.settings.admin_token_path, runtime.settings.db_path]
    try:
        held = runtime.plugins.runtimes["kit"].sandbox  # type: ignore[attr-defined]
        with anyio.fail_after(20):
            result = await runtime.kernel.call_tool(
                Principal("alice", frozenset({"kit"})),
                "reach",
                {
                    "read": [*map(str, secrets), f"/proc/{os.getpid()}/environ"],
                    "write": [str(own), str(data / "policies" / "allow-all.cedar")],
                },
                bridge,
                request_id="r1",
                transport="test",
            )
    finally:
        await runtime.aclose()
    reached = result["structuredContent"]
    assert reached[f"write {own}"] == "ok"
    if landlock_abi() >= 1:
        denied = [f"read {s}" for s in secrets] + [f"write {data / 'policies' / 'allow-all.cedar'}"]
        # not there at all in the worker's mounts (Landlock refuses them where those fail)
        refused = "FileNotFoundError" if held["mounts_confined"] else "PermissionError"
        assert {k: reached[k] for k in denied} == dict.fromkeys(denied, refused)
    # the server is non-dumpable once started, and a root server's worker holds no capability;
    # where the worker has a /proc of its own, the server is not even there
    hidden = "FileNotFoundError" if held["processes_hidden"] else "PermissionError"
    assert reached[f"read /proc/{os.getpid()}/environ"] == hidden


def serving_plugin(
    directory: Path,
    name: str,
    *,
    prompts: tuple[str, ...] = (),
    resources: tuple[str, ...] = (),
    templates: tuple[str, ...] = (),
) -> Path:
    """Plugin ``name`` serving these prompts, resource URIs and templates (and no tool)."""
    directory.mkdir(parents=True)
    manifest = {
        "name": name,
        "version": "1.0.0",
        "abi": 1,
        "entry": f"{name}_plugin:plugin",
        "prompts": [{"name": p} for p in prompts],
        "resources": [{"uri": u, "name": f"r{i}"} for i, u in enumerate(resources)],
        "resourceTemplates": [{"uriTemplate": t, "name": f"t{i}"} for i, t in enumerate(templates)],
    }
    (directory / "plugin.json").write_text(json.dumps(manifest))
    code = ["from mcp_zero.plugin import Plugin", f"plugin = Plugin({name!r})"]
    for i, prompt in enumerate(prompts):
        code += [f"@plugin.prompt({prompt!r})", f"def p{i}(ctx):", f"    return {name!r}"]
    for i, uri in enumerate(resources):
        code += [f"@plugin.resource({uri!r})", f"def r{i}(ctx):", f"    return {name!r}"]
    for i, template in enumerate(templates):
        code += [
            f"@plugin.resource_template({template!r})",
            f"def t{i}(ctx, **variables):",
            f"    return {name!r}",
        ]
    (directory / f"{name}_plugin.py").write_text("\n".join(code) + "\n")
    return directory


def _long_template(var: str, end: str, k: int = 200) -> str:
    """A template of ``k`` variables in a row: no URI matches it and one of another ``end``,
    but a walk of the two visits ~(2k)² states to show it (its last variable, after ``end``,
    keeps the two from being told apart by their literal ends alone)."""
    return "x://" + "".join(f"{{{var}{i}}}" for i in range(k)) + end + "/{tail}"


def test_templates_are_compared_in_few_steps_each_and_each_pair_once() -> None:
    # two plugins of 20 such templates each: 400 pairs, walked at every reindex on the loop
    mine = _Offer((), (), (), tuple(_long_template("a", f"Z{i:02}") for i in range(20)))
    theirs = _Offer((), (), (), tuple(_long_template("b", f"Y{i:02}") for i in range(20)))
    steps = [_walk_templates(a, b)[1] for a in mine.templates for b in theirs.templates]
    assert max(steps) <= 5_000  # a few ms each (it took up to 200,000)
    assert len(list(_clashes(mine, theirs))) == 400  # each held to overlap
    before = _templates_overlap.cache_info()
    assert len(list(_clashes(mine, theirs))) == 400
    after = _templates_overlap.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (400, 0)
    # below the cap, the answer is exact
    assert _walk_templates("mem://{+rest}", "mem://t/{id}/data")[1] < MAX_OVERLAP_STEPS
    assert _templates_overlap("mem://{+rest}", "mem://t/{id}/data") is True
    assert _templates_overlap("mem://a/{x}", "mem://b/{x}") is False


def test_templates_told_apart_by_their_literal_ends_are_all_the_walk_would_tell_apart() -> None:
    # Two plugins of 1,500 templates each were compared pair by pair (2.25 million walks,
    # ~30 s) within the install's transaction and on the server's loop (found by review).
    # A pair whose literal beginnings or ends differ is skipped: here, on random templates,
    # the clashes found are exactly those of walking every pair.
    rng = random.Random(7)
    pieces = ["a", "b", "/", "ab", "{x}", "{+y}", "{z}/"]

    def template() -> str:
        return "s://" + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))

    mine = tuple(dict.fromkeys(template() for _ in range(150)))
    theirs = tuple(dict.fromkeys(template() for _ in range(150)))
    found = {
        (c.mine[1], c.theirs[1])
        for c in _clashes(_Offer((), (), (), mine), _Offer((), (), (), theirs))
    }
    walked = {(a, b) for a in mine for b in theirs if _templates_overlap(a, b) is not False}
    assert found == walked
    assert 0 < len(walked) < len(mine) * len(theirs) / 2  # (both kinds of pairs are there)


@pytest.mark.parametrize(
    ("zeta", "alpha", "refusal"),
    [
        (
            {"prompts": ("greet",)},
            {"prompts": ("greet",)},
            "prompt 'greet' of plugin 'alpha' is already provided by plugin 'zeta'",
        ),
        (
            {"resources": ("mem://shared",)},
            {"resources": ("mem://shared",)},
            "resource 'mem://shared' of plugin 'alpha' is already served by plugin 'zeta'",
        ),
        (
            {"templates": ("mem://t/{id}",)},
            {"templates": ("mem://t/{name}",)},
            "resource template 'mem://t/{name}' of plugin 'alpha' matches URIs that resource "
            "template 'mem://t/{id}' matches too, of plugin 'zeta'",
        ),
        (
            {"resources": ("mem://notes/today",)},
            {"templates": ("mem://notes/{day}",)},
            "resource template 'mem://notes/{day}' of plugin 'alpha' matches resource "
            "'mem://notes/today' of plugin 'zeta'",
        ),
        (
            {"templates": ("mem://notes/{day}",)},
            {"resources": ("mem://notes/today",)},
            "resource 'mem://notes/today' of plugin 'alpha' matches resource template "
            "'mem://notes/{day}' of plugin 'zeta'",
        ),
        # one URI however escaped, as reads look it up: the other plugin got its reads, or
        # neither did (found by review)
        (
            {"resources": ("mem://abc",)},
            {"resources": ("mem://%61bc",)},
            "resource 'mem://%61bc' of plugin 'alpha' is resource 'mem://abc' (one URI, "
            "escaped otherwise), already served by plugin 'zeta'",
        ),
        (
            {"resources": ("http://h/%7Euser",)},
            {"resources": ("http://h/~user",)},
            "resource 'http://h/~user' of plugin 'alpha' is resource 'http://h/%7Euser' (one "
            "URI, escaped otherwise), already served by plugin 'zeta'",
        ),
        (
            {"templates": ("mem://%61/{id}",)},
            {"resources": ("mem://a/1",)},
            "resource 'mem://a/1' of plugin 'alpha' matches resource template 'mem://%61/{id}' "
            "of plugin 'zeta'",
        ),
        (  # a catch-all would take the other plugin's URIs
            {"templates": ("mem://t/{id}/data",)},
            {"templates": ("mem://{+rest}",)},
            "resource template 'mem://{+rest}' of plugin 'alpha' matches URIs that resource "
            "template 'mem://t/{id}/data' matches too, of plugin 'zeta'",
        ),
        (  # two that would take long to tell apart are held to overlap, and told so
            {"templates": (_long_template("a", "Z"),)},
            {"templates": (_long_template("b", "Y"),)},
            f"resource template {_long_template('b', 'Y')!r} of plugin 'alpha' is held to match "
            f"URIs that resource template {_long_template('a', 'Z')!r} matches too (too long to "
            "compare: shorten either), of plugin 'zeta'",
        ),
    ],
)
async def test_prompts_resources_and_templates_another_plugin_serves_are_refused_at_install(
    make_runtime: Any, tmp_path: Path, zeta: Any, alpha: Any, refusal: str
) -> None:
    # They were installed, and the first plugin in name order took them over: agents of the
    # plugin installed first got policy_denied for its own prompts and resources.
    runtime: Runtime = make_runtime()
    runtime.plugins.install(serving_plugin(tmp_path / "zeta", "zeta", **zeta))
    with pytest.raises(Conflict) as refused:
        runtime.plugins.install(serving_plugin(tmp_path / "alpha", "alpha", **alpha))
    assert refused.value.message.startswith(refusal + "; "), refused.value.message
    assert [r.name for r in runtime.store.list_plugins()] == ["zeta"]


async def test_a_resource_declared_escaped_is_read_under_its_listed_uri(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # A read is looked up in normal form, the index held URIs as declared: a resource listed
    # as http://h/%7Euser was no plugin's, resource_not_found (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(
        serving_plugin(
            tmp_path / "zeta",
            "zeta",
            resources=("http://h/%7Euser", "mem://%61bc"),
            templates=("t://%41/{id}",),
        )
    )
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"zeta"}))
        listed = [r["uri"] for r in runtime.kernel.listing(ada, "resources")[0]]
        assert listed == ["http://h/%7Euser", "mem://%61bc"]
        for uri in (*listed, "http://h/~user", "http://h/%7euser", "t://%41/1", "t://A/1"):
            read = await runtime.kernel.read_resource(
                ada, uri, bridge, request_id="escaped", transport="t"
            )
            assert read["contents"][0]["text"] == "zeta", uri
    finally:
        await runtime.aclose()


async def test_templates_no_uri_matches_twice_and_other_names_are_accepted(
    make_runtime: Any, tmp_path: Path
) -> None:
    runtime: Runtime = make_runtime()
    runtime.plugins.install(
        serving_plugin(
            tmp_path / "zeta",
            "zeta",
            prompts=("greet",),
            resources=("mem://zeta",),
            templates=("mem://a/{x}", "mem://t/{id}/data", "other://{+rest}"),
        )
    )
    runtime.plugins.install(
        serving_plugin(
            tmp_path / "alpha",
            "alpha",
            prompts=("hello",),
            resources=("mem://alpha",),
            templates=("mem://b/{x}", "mem://t/{id}", "mem://t/{a}/{b}/data"),
        )
    )
    assert sorted(r.name for r in runtime.store.list_plugins()) == ["alpha", "zeta"]


def recorded_as_an_older_install(runtime: Runtime, source: Path, manifest: dict[str, Any]) -> None:
    """Plugin ``source`` installed as an older version left it: copied, and recorded with
    ``manifest`` without the checks installs make now."""
    name = manifest["name"]
    copy = runtime.settings.plugins_dir / name / "1.0.0-old"
    shutil.copytree(source, copy)
    runtime.store.put_plugin(PluginRecord(name, "1.0.0", manifest, str(copy), time.time()))


async def test_what_two_plugins_installed_before_the_check_both_serve_neither_serves(
    make_runtime: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A data dir whose plugins were installed before install refused collisions: the first
    # plugin in name order silently served what both declared.
    runtime: Runtime = make_runtime()
    runtime.plugins.install(
        serving_plugin(
            tmp_path / "zeta",
            "zeta",
            prompts=("greet", "zeta_only"),
            resources=("mem://shared",),
            templates=("mem://t/{id}",),
        )
    )
    alpha = serving_plugin(
        tmp_path / "alpha",
        "alpha",
        prompts=("greet",),
        resources=("mem://shared", "mem://alpha"),
        templates=("mem://{+rest}",),
    )
    recorded_as_an_older_install(runtime, alpha, load_manifest(alpha).to_dict())
    host = runtime.plugins
    try:
        with anyio.fail_after(30):
            await host.refresh(force=True, only=())
        assert "greet" not in host.prompts
        assert host.prompts["zeta_only"][0] == "zeta"
        assert host.resource_owner("mem://shared") is None
        assert host.resource_owner("mem://t/1") is None  # alpha's catch-all matches it too
        assert host.resource_owner("mem://elsewhere") is None
        assert host.resource_owner("mem://alpha") == "alpha"  # alpha's alone
        logged = [r.getMessage() for r in caplog.records if r.name == "mcp_zero.plugins"]
        assert (
            "prompt 'greet' of plugin 'alpha' is already provided by plugin 'zeta': neither "
            "plugin serves it until one of them is removed, or reinstalled without it"
        ) in logged
    finally:
        await runtime.aclose()


async def test_an_older_installs_backtracking_pattern_is_not_served_and_said(
    make_runtime: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Installs now refuse a pattern the linear-time regex engine cannot run (lookaround,
    # backreferences: what made argument checks backtrack for minutes); a plugin an older
    # version installed with one is not served, and the log says why, the others served
    runtime: Runtime = make_runtime()
    runtime.plugins.install(NOTES_DIR)
    source = write_plugin(tmp_path / "old", "old", "plugin = None\n", ["old_tool"])
    manifest = load_manifest(source).to_dict()
    manifest["tools"][0]["inputSchema"] = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": r"(a|a)+\1b"}},
    }
    recorded_as_an_older_install(runtime, source, manifest)
    host = runtime.plugins
    try:
        with anyio.fail_after(30):
            await host.refresh(force=True, only=())
        assert "old_tool" not in host.tools
        assert "notes_add" in host.tools
        logged = [r.getMessage() for r in caplog.records if r.name == "mcp_zero.plugins"]
        assert any(
            m.startswith("plugin 'old' is not served: ") and "without lookaround" in m
            for m in logged
        ), logged
    finally:
        await runtime.aclose()


def file_reading_plugin(directory: Path) -> Path:
    """Plugin ``pfile``: ``pfile_read`` says it started (``started`` in its data dir), waits
    for ``go`` there (60 s at most), then reads ``payload.txt`` beside its module."""
    directory.mkdir(parents=True)
    (directory / "plugin.json").write_text(
        json.dumps(
            {
                "name": "pfile",
                "version": "1.0.0",
                "abi": 1,
                "entry": "pfile_plugin:plugin",
                "quotas": {"timeout_ms": 90_000},
                "tools": [
                    {"name": "pfile_read", "description": "r", "inputSchema": {"type": "object"}}
                ],
            }
        )
    )
    (directory / "payload.txt").write_text("payload of the first copy")
    (directory / "pfile_plugin.py").write_text(
        "import pathlib, time\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('pfile')\n"
        "@plugin.tool('pfile_read')\n"
        "def read(ctx):\n"
        "    (ctx.data_dir / 'started').write_text('yes')\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not (ctx.data_dir / 'go').exists() and time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    return (pathlib.Path(__file__).parent / 'payload.txt').read_text()\n"
    )
    return directory


@pytest.mark.parametrize("other", ["agent exec", "serve --stdio"])
async def test_a_copy_is_not_deleted_while_another_process_runs_a_call_from_it(
    make_runtime: Any, tmp_path: Path, other: str
) -> None:
    # The server deleted a replaced copy once its own calls were done: a call of `mcp0 agent
    # exec` or of a `serve --stdio` session running from it then failed, FileNotFoundError.
    source = file_reading_plugin(tmp_path / "pfile")
    server: Runtime = make_runtime()
    server.plugins.install(source)
    await server.start()
    data = server.settings.data_dir
    own = data / "plugin-data" / "pfile"
    mcp0 = str(Path(sys.executable).parent / "mcp0")
    try:
        created = subprocess.run(
            [mcp0, "agent", "create", "a1", "--plugin", "pfile", "--data-dir", str(data)],
            capture_output=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stderr
        old = installed_copy_of(server, "pfile")
        async with other_process_calling(mcp0, other, data, tmp_path / "stderr") as answer:
            with anyio.fail_after(60):
                while not (own / "started").exists():
                    await anyio.sleep(0.02)
            server.plugins.install(source, replace=True)
            await assert_refresh_changes(server)
            with anyio.fail_after(30):  # the server's old workers drained, its copy let go
                while server.plugins._leaving:
                    await anyio.sleep(0.02)
            assert old.is_dir()
            backdate(old)
            server.plugins.sweep_copies()  # a sweep leaves it too, however old
            assert old.is_dir()
            (own / "go").write_text("go")
            with anyio.fail_after(60):
                assert "payload of the first copy" in await answer()
            # the other process let go of it last, and deleted it; the new copy stays
            with anyio.fail_after(30):
                while old.exists():
                    await anyio.sleep(0.02)
        assert installed_copy_of(server, "pfile").is_dir()
    finally:
        await server.aclose()


@asynccontextmanager
async def other_process_calling(
    mcp0: str, how: str, data: Path, stderr: Path
) -> AsyncIterator[Callable[[], Any]]:
    """Another process calling ``pfile_read`` as agent a1 (``mcp0 agent exec``, or in a
    ``serve --stdio`` session); yields what waits for its answer's text. Ended after."""
    stdio = how == "serve --stdio"
    args = (
        ["serve", "--stdio", "--agent", "a1"]
        if stdio
        else ["agent", "exec", "a1", "pfile_read", "{}"]
    )
    with stderr.open("wb") as errors:
        proc = await asyncio.create_subprocess_exec(
            mcp0,
            *args,
            "--data-dir",
            str(data),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def send(message: dict[str, Any]) -> None:
        stdin.write(json.dumps(message).encode() + b"\n")
        await stdin.drain()

    async def reply(to: int) -> dict[str, Any]:
        while True:
            line = await stdout.readline()
            assert line, stderr.read_text()
            message: dict[str, Any] = json.loads(line)
            if message.get("id") == to:
                return message

    async def answer() -> str:
        if stdio:
            text: str = (await reply(2))["result"]["content"][0]["text"]
            return text
        out = await stdout.read()
        assert await proc.wait() == 0, stderr.read_text()
        return out.decode()

    try:
        if stdio:
            with anyio.fail_after(60):
                await send(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "initialize",
                        "params": {
                            "protocolVersion": "2025-06-18",
                            "capabilities": {},
                            "clientInfo": {"name": "t", "version": "1"},
                        },
                    }
                )
                await reply(1)
                await send({"jsonrpc": "2.0", "method": "notifications/initialized"})
                await send(
                    {
                        "jsonrpc": "2.0",
                        "id": 2,
                        "method": "tools/call",
                        "params": {"name": "pfile_read", "arguments": {}},
                    }
                )
        yield answer
    finally:
        if proc.returncode is None:
            stdin.close()
            with anyio.move_on_after(20):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def installed_copy_of(runtime: Runtime, name: str) -> Path:
    record = runtime.store.get_plugin(name)
    assert record is not None
    return runtime.plugins.copy_path(record)


def flooding_plugin(directory: Path) -> Path:
    """Plugin ``flood`` serving flood://one and flood://done; its tool ``flood_start``
    returns at once, and a job it started then says that flood://one changed, and once
    the file ``go`` is in its data dir, says so ``n`` times more, then once that
    flood://done changed."""
    return write_plugin(
        directory,
        "flood",
        "import asyncio\n"
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('flood')\n"
        "jobs = set()\n"
        "@plugin.resource('flood://one')\n"
        "def one(ctx):\n"
        "    return 'one'\n"
        "@plugin.resource('flood://done')\n"
        "def done(ctx):\n"
        "    return 'done'\n"
        "@plugin.tool('flood_start')\n"
        "async def flood_start(ctx, n):\n"
        "    async def job():\n"
        "        ctx.resource_updated('flood://one')\n"
        "        while not (ctx.data_dir / 'go').exists():\n"
        "            await asyncio.sleep(0.01)\n"
        "        for _ in range(n):\n"
        "            ctx.resource_updated('flood://one')\n"
        "        ctx.resource_updated('flood://done')\n"
        "    jobs.add(asyncio.get_running_loop().create_task(job()))\n"
        "    return 'started'\n",
        ["flood_start"],
        resources=[{"uri": "flood://one", "name": "one"}, {"uri": "flood://done", "name": "d"}],
    )


async def test_updates_after_a_call_to_a_client_that_does_not_read_wait_once_per_uri(
    make_runtime: Any, tmp_path: Path, bridge: Any
) -> None:
    # The URI was let go as its announcement began: while a client that did not read held
    # it up, every later update started an announcement of its own, without bound (found by
    # review). Now one being told is told once more after, however often it changed.
    runtime: Runtime = make_runtime()
    runtime.plugins.install(flooding_plugin(tmp_path / "flood"))
    told: list[str] = []
    done, read, told_again = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def announce(uri: str) -> None:
        told.append(uri)
        if uri == "flood://done":
            done.set()
        elif told.count(uri) == 1:
            (runtime.settings.plugin_data_dir / "flood" / "go").touch()  # the flood, now
            await read.wait()  # the client does not read
        else:
            told_again.set()

    runtime.plugins.on_resource_updated = announce
    await runtime.start()
    try:
        ada = Principal("ada", frozenset({"flood"}))
        with anyio.fail_after(20):
            started = await runtime.kernel.call_tool(
                ada, "flood_start", {"n": 300}, bridge, request_id="f", transport="test"
            )
            assert started["content"][0]["text"] == "started"
            await done.wait()  # (sent after the 300: all of them were heard meanwhile)
            assert told.count("flood://one") == 1
            read.set()
            await told_again.wait()
        assert told.count("flood://one") == 2
    finally:
        await runtime.aclose()
