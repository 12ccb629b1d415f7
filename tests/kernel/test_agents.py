"""Agents: spawn, authenticate, attach, rotate the token, terminate, snapshot and recover, each
audited."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from mcp_zero.errors import (
    AgentNotFound,
    Conflict,
    InvalidParams,
    PluginNotFound,
    PolicyDenied,
    SnapshotNotFound,
    StorageError,
    Unauthorized,
)
from mcp_zero.kernel.admin_token import rotate_admin_token
from mcp_zero.kernel.agents import recovery_view
from mcp_zero.runtime import Runtime
from mcp_zero.security.tokens import hash_token
from mcp_zero.storage import SnapshotRecord

pytestmark = pytest.mark.anyio
TESTS_DIR = Path(__file__).parents[1]
FAULTY_DIR = TESTS_DIR / "plugins" / "faulty"
NOTES_DIR = TESTS_DIR.parent / "src" / "mcp_zero" / "examples" / "plugins" / "notes"


@pytest.fixture
def runtime(make_runtime: Any) -> Runtime:
    rt: Runtime = make_runtime(anonymous_agent="guest")
    rt.plugins.install(NOTES_DIR)
    rt.plugins.install(FAULTY_DIR)
    return rt


def audited(runtime: Runtime, resource: str) -> list[str]:
    return [
        body["verb"]
        for body in (orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000))
        if body.get("resource") == resource
    ]


async def test_spawn_returns_a_token_and_stores_only_its_hash(runtime: Runtime) -> None:
    spawned = await runtime.agents.spawn("ann", ["notes"], {"mood": "calm"})
    stored = runtime.store.get_agent("ann")
    assert stored is not None
    assert stored.token_hash == hash_token(spawned.token) != spawned.token
    assert spawned.token not in repr(stored)
    principal = runtime.agents.authenticate(spawned.token)
    assert principal.agent == "ann"
    assert principal.plugins == frozenset({"notes"})
    assert principal.anonymous is False
    assert audited(runtime, "ann") == ["spawn_agent"]


async def test_two_agents_get_different_tokens(runtime: Runtime) -> None:
    first = await runtime.agents.spawn("one")
    second = await runtime.agents.spawn("two")
    assert first.token != second.token
    assert runtime.agents.authenticate(second.token).agent == "two"


@pytest.mark.parametrize("name", ["", "-dash-first", "has space", "x" * 65, "slash/name", "ünï"])
async def test_spawn_refuses_bad_names(runtime: Runtime, name: str) -> None:
    with pytest.raises(InvalidParams):
        await runtime.agents.spawn(name)


@pytest.mark.parametrize("name", ["admin", "Admin"])
async def test_no_agent_may_be_named_like_the_administrator(runtime: Runtime, name: str) -> None:
    with pytest.raises(InvalidParams, match="administrator"):
        await runtime.agents.spawn(name)


async def test_spawn_refuses_a_taken_name_and_unknown_plugins(runtime: Runtime) -> None:
    await runtime.agents.spawn("taken")
    with pytest.raises(Conflict):
        await runtime.agents.spawn("taken")
    with pytest.raises(PluginNotFound):
        await runtime.agents.spawn("fresh", ["no-such-plugin"])
    assert runtime.store.get_agent("fresh") is None


async def test_authenticate_refuses_missing_and_wrong_tokens(make_runtime: Any) -> None:
    runtime = make_runtime()  # no anonymous agent
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(None)
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate("forged")


async def test_the_admin_token_is_refused_saying_what_it_is_for(make_runtime: Any) -> None:
    # "invalid or revoked bearer token" sent its holder looking for a typo (found by review)
    runtime = make_runtime()
    runtime.record_what_governs()  # (as a server does before it serves)
    admin = runtime.admin_token()
    with pytest.raises(Unauthorized) as caught:
        runtime.agents.authenticate(admin)
    assert caught.value.message == (
        "this is the admin token, for the admin API (/api/v1); MCP takes an agent's token "
        "('mcp0 agent create NAME' prints one)"
    )
    rotate_admin_token(runtime.settings.admin_token_path, runtime.audit, runtime.store)
    with pytest.raises(Unauthorized) as caught:  # the old one is just a wrong token now
        runtime.agents.authenticate(admin)
    assert caught.value.message == "invalid or revoked bearer token"
    with pytest.raises(Unauthorized, match=r"^this is the admin token"):
        runtime.agents.authenticate(runtime.admin_token())


async def test_attach_takes_effect_at_once_and_is_idempotent(runtime: Runtime) -> None:
    spawned = await runtime.agents.spawn("bea", ["notes"])
    assert runtime.agents.authenticate(spawned.token).plugins == frozenset({"notes"})
    await runtime.agents.attach("bea", "faulty")
    again = await runtime.agents.attach("bea", "faulty")
    assert again.plugins == runtime.agents.get("bea").plugins == ["notes", "faulty"]
    # recorded once: the second changed nothing (each was a record: found by review)
    assert audited(runtime, "bea") == ["spawn_agent", "attach_plugin"]
    assert runtime.agents.authenticate(spawned.token).plugins == frozenset({"notes", "faulty"})
    with pytest.raises(PluginNotFound):
        await runtime.agents.attach("bea", "nope")
    with pytest.raises(AgentNotFound):
        await runtime.agents.attach("nobody", "notes")


async def test_terminate_revokes_the_token_at_once(runtime: Runtime) -> None:
    spawned = await runtime.agents.spawn("cid", ["notes"])
    runtime.agents.authenticate(spawned.token)  # cached now
    await runtime.agents.terminate("cid")
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(spawned.token)
    with pytest.raises(Unauthorized):
        runtime.agents.principal("cid")
    assert runtime.agents.get("cid").status == "terminated"
    with pytest.raises(Conflict, match="already terminated"):
        await runtime.agents.terminate("cid")
    assert audited(runtime, "cid") == ["spawn_agent", "terminate_agent"]
    with pytest.raises(Conflict, match="already terminated"):  # not given plugins either
        await runtime.agents.attach("cid", "faulty")
    assert runtime.agents.get("cid").plugins == ["notes"]


async def test_rotate_token_revokes_the_old_token_at_once_and_records_neither(
    runtime: Runtime,
) -> None:
    spawned = await runtime.agents.spawn("rho", ["notes"], {"k": 1})
    admitted = runtime.agents.admit(spawned.token)  # remembered now, as a request's head is
    rotated = await runtime.agents.rotate_token("rho")
    assert rotated.token != spawned.token
    assert (rotated.agent.plugins, rotated.agent.state) == (["notes"], {"k": 1})
    assert not runtime.agents.stands(admitted)  # (a body still coming is authenticated again)
    with pytest.raises(Unauthorized, match="invalid or revoked"):
        runtime.agents.authenticate(spawned.token)
    assert runtime.agents.authenticate(rotated.token).agent == "rho"
    stored = runtime.store.get_agent("rho")
    assert stored is not None
    assert stored.token_hash == hash_token(rotated.token)
    assert audited(runtime, "rho") == ["spawn_agent", "rotate_agent_token"]
    record = orjson.dumps(records_of(runtime, "rho")[-1]).decode()
    for secret in (spawned.token, rotated.token, hash_token(spawned.token), stored.token_hash):
        assert secret not in record
    assert orjson.loads(record)["policies"] == ["admin-all"]  # (the default policy permits it)


async def test_rotate_token_refuses_an_unknown_agent(runtime: Runtime) -> None:
    with pytest.raises(AgentNotFound):
        await runtime.agents.rotate_token("nobody")
    assert not runtime.store.list_agents()


async def test_a_terminated_agent_rotated_stays_terminated_and_comes_back_with_the_new_token(
    runtime: Runtime,
) -> None:
    # An agent terminated because its token leaked, then recovered, came back with the
    # leaked token: its token could not be rotated while it was terminated
    spawned = await runtime.agents.spawn("tau", ["notes"])
    snap = await runtime.agents.snapshot("tau")
    await runtime.agents.terminate("tau")
    rotated = await runtime.agents.rotate_token("tau")
    assert rotated.agent.status == "terminated"
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(rotated.token)
    await runtime.agents.recover(snap.id)
    assert runtime.agents.authenticate(rotated.token).agent == "tau"
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(spawned.token)
    assert audited(runtime, "tau") == [
        "spawn_agent",
        "snapshot_agent",
        "terminate_agent",
        "rotate_agent_token",
        "recover_agent",
    ]


async def test_a_rotation_whose_record_cannot_be_written_keeps_the_old_token(
    runtime: Runtime,
) -> None:
    spawned = await runtime.agents.spawn("ups", ["notes"])
    refuse_audit_of(runtime, "rotate_agent_token")
    with pytest.raises(StorageError):
        await runtime.agents.rotate_token("ups")
    assert runtime.agents.authenticate(spawned.token).agent == "ups"


async def test_rotate_token_is_decided_by_policy(runtime: Runtime) -> None:
    (runtime.settings.policy_dir / "no-rotation.cedar").write_text(
        '@id("no-rotation-by-api")\n'
        '@reason("tokens are rotated only with mcp0 on the server\'s machine")\n'
        'forbid (principal, action == Action::"rotate_agent_token", resource)\n'
        'unless { context.transport == "cli" };\n'
    )
    runtime.policy.reload()
    spawned = await runtime.agents.spawn("phi", ["notes"])
    with pytest.raises(PolicyDenied):
        await runtime.agents.rotate_token("phi")
    assert runtime.agents.authenticate(spawned.token).agent == "phi"
    rotated = await runtime.agents.rotate_token("phi", via="cli")
    assert runtime.agents.authenticate(rotated.token).agent == "phi"
    assert [(r["verb"], r["outcome"]) for r in records_of(runtime, "phi")] == [
        ("spawn_agent", "allowed"),
        ("rotate_agent_token", "denied"),
        ("rotate_agent_token", "allowed"),
    ]


async def test_recover_of_a_snapshot_from_before_a_rotation_keeps_the_new_token(
    runtime: Runtime,
) -> None:
    spawned = await runtime.agents.spawn("psi", ["notes"])
    snap = await runtime.agents.snapshot("psi")
    rotated = await runtime.agents.rotate_token("psi")
    await runtime.agents.terminate("psi")
    await runtime.agents.recover(snap.id)
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(spawned.token)
    assert runtime.agents.authenticate(rotated.token).agent == "psi"


async def test_snapshot_and_recover_restore_plugins_state_and_token(runtime: Runtime) -> None:
    spawned = await runtime.agents.spawn("dee", ["notes", "faulty"], {"step": 3})
    snap = await runtime.agents.snapshot("dee")
    assert snap.id.startswith("snap_")
    copies = {
        name: {"version": record.version, "sha256": record.digest}
        for name in ("notes", "faulty")
        if (record := runtime.store.get_plugin(name)) is not None
    }
    assert len(copies["notes"]["sha256"]) == 64
    assert snap.data == {
        "plugins": ["notes", "faulty"],
        "plugin_copies": copies,
        "state": {"step": 3},
        "status": "active",
    }
    await runtime.agents.terminate("dee")
    recovery = await runtime.agents.recover(snap.id)
    recovered = recovery.agent
    assert recovery.not_restored == {}
    assert recovered.status == "active"
    assert recovered.plugins == ["notes", "faulty"]
    assert recovered.state == {"step": 3}
    assert runtime.agents.authenticate(spawned.token).plugins == frozenset({"notes", "faulty"})
    assert audited(runtime, "dee") == [
        "spawn_agent",
        "snapshot_agent",
        "terminate_agent",
        "recover_agent",
    ]
    with pytest.raises(SnapshotNotFound):
        await runtime.agents.recover("snap_nothing")


async def test_unknown_names_and_ids_a_client_sent_are_not_echoed_whole(runtime: Runtime) -> None:
    # A 60,000-character snapshot id or agent name came back whole in the 404's message
    # (found by review): a long one is shown by its start and its length
    long = "x" * 60_000
    await runtime.agents.spawn("eve", [])
    attempts = [
        (lambda: runtime.agents.recover(long), SnapshotNotFound),
        (lambda: runtime.agents.snapshot(long), AgentNotFound),
        (lambda: runtime.agents.attach("eve", long), PluginNotFound),
    ]
    for attempt, raised in attempts:
        with pytest.raises(raised) as caught:
            await attempt()
        assert len(str(caught.value)) < 200
        assert "(60000 characters)" in str(caught.value)


async def test_removing_a_plugin_detaches_it_so_a_namesake_is_attached_to_no_one(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("ann", ["notes", "faulty"])
    await runtime.agents.spawn("bob", ["faulty"])
    await runtime.agents.spawn("cyd", ["notes"])
    assert runtime.remove_plugin("faulty").detached == ["ann", "bob"]
    assert runtime.agents.get("ann").plugins == ["notes"]
    assert runtime.agents.get("bob").plugins == []
    runtime.plugins.install(FAULTY_DIR)  # a new plugin under the old name
    assert runtime.agents.get("bob").plugins == []
    removal = [orjson.loads(e.body) for e in runtime.store.read_audit(0, 1000)][-1]
    assert removal["verb"] == "remove_plugin"
    assert removal["detached_from"] == ["ann", "bob"]


async def test_recover_drops_plugins_removed_since_the_snapshot(runtime: Runtime) -> None:
    await runtime.agents.spawn("eve", ["notes", "faulty"])
    snap = await runtime.agents.snapshot("eve")
    runtime.plugins.remove("faulty")
    recovery = await runtime.agents.recover(snap.id)
    assert recovery.agent.plugins == ["notes"]
    assert recovery.not_restored == {"faulty": "it is not installed any more"}


async def test_recover_attaches_a_plugin_reinstalled_with_the_same_files(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("fay", ["faulty"])
    snap = await runtime.agents.snapshot("fay")
    runtime.plugins.install(FAULTY_DIR, replace=True)  # the same files: the same plugin
    recovery = await runtime.agents.recover(snap.id)
    assert recovery.agent.plugins == ["faulty"]
    assert recovery.not_restored == {}


async def test_anonymous_agent_is_used_without_a_token(runtime: Runtime) -> None:
    await runtime.agents.spawn("guest", ["notes"])
    principal = runtime.agents.authenticate(None)
    assert principal.agent == "guest"
    assert principal.anonymous is True


async def test_anonymity_does_not_leak_between_token_less_and_named_use(runtime: Runtime) -> None:
    # the admin's execute (principal by name) and a token-less caller share an agent:
    # each must see the anonymity of its own request, whatever came first
    await runtime.agents.spawn("guest", ["notes"])
    assert runtime.agents.principal("guest").anonymous is False
    assert runtime.agents.authenticate(None).anonymous is True
    assert runtime.agents.principal("guest").anonymous is False
    assert runtime.agents.authenticate(None).anonymous is True


async def test_terminated_anonymous_agent_refuses_token_less_calls(runtime: Runtime) -> None:
    await runtime.agents.spawn("guest", ["notes"])
    runtime.agents.authenticate(None)
    await runtime.agents.terminate("guest")
    with pytest.raises(Unauthorized):
        runtime.agents.authenticate(None)


async def test_agent_management_is_decided_by_policy_and_denials_are_audited(
    runtime: Runtime,
) -> None:
    (runtime.settings.policy_dir / "cli-only.cedar").write_text(
        '@id("spawn-from-cli-only")\n'
        '@reason("agents are created only with mcp0 on the server\'s machine")\n'
        'forbid (principal, action == Action::"spawn_agent", resource)\n'
        'unless { context.transport == "cli" };\n'
    )
    runtime.policy.reload()
    with pytest.raises(PolicyDenied) as caught:
        await runtime.agents.spawn("eve", ["notes"], via="admin")
    assert caught.value.data is not None
    assert caught.value.data["policies"] == ["spawn-from-cli-only"]
    assert runtime.store.get_agent("eve") is None
    spawned = await runtime.agents.spawn("eve", ["notes"], via="cli")
    assert spawned.agent.name == "eve"
    records = [
        orjson.loads(e.body)
        for e in runtime.store.read_audit(0, 10_000)
        if orjson.loads(e.body).get("resource") == "eve"
    ]
    assert [(r["outcome"], r["transport"]) for r in records] == [
        ("denied", "admin"),
        ("allowed", "cli"),
    ]
    assert records[0]["reasons"] == ["agents are created only with mcp0 on the server's machine"]
    # counted as every denial is (it was not: found by review)
    metrics = runtime.metrics.render()[0].decode()
    assert 'mcp0_policy_denials_total{policy="spawn-from-cli-only"} 1' in metrics


def refuse_audit_of(runtime: Runtime, verb: str) -> None:
    """From now on the database refuses to store a record of ``verb`` (as a full disk would
    refuse it): a trigger, made through a connection of its own."""
    import sqlite3

    with sqlite3.connect(runtime.store.path) as conn:
        conn.execute(
            f"CREATE TRIGGER refuse_{verb} BEFORE INSERT ON audit WHEN CAST(NEW.body AS TEXT) LIKE"
            f" '%\"verb\":\"{verb}\"%' BEGIN SELECT RAISE(ABORT, 'no room for {verb}'); END"
        )


async def test_a_change_whose_record_cannot_be_written_is_not_made(runtime: Runtime) -> None:
    # The change and its record are one transaction: a crash (or a full disk) between the
    # two left an agent, a termination, a plugin nobody had recorded.
    await runtime.agents.spawn("kept", ["notes"])
    before = runtime.store.list_agents()

    refuse_audit_of(runtime, "spawn_agent")
    with pytest.raises(StorageError):
        await runtime.agents.spawn("ghost", ["notes"])
    assert runtime.store.get_agent("ghost") is None

    refuse_audit_of(runtime, "terminate_agent")
    with pytest.raises(StorageError):
        await runtime.agents.terminate("kept")
    kept = runtime.store.get_agent("kept")
    assert kept is not None
    assert kept.status == "active"

    refuse_audit_of(runtime, "remove_plugin")
    with pytest.raises(StorageError):
        runtime.remove_plugin("faulty")
    assert runtime.store.get_plugin("faulty") is not None

    refuse_audit_of(runtime, "install_plugin")
    with pytest.raises(StorageError):
        runtime.install_plugin(NOTES_DIR, replace=True)
    installed = runtime.store.get_plugin("notes")
    assert installed is not None
    copies = sorted(p.name for p in (runtime.plugins.plugins_dir / "notes").iterdir())
    assert copies == [Path(installed.path).name]  # the refused install's copy is gone

    assert [a.name for a in runtime.store.list_agents()] == [a.name for a in before]


async def test_allowed_admin_actions_are_audited_with_the_policies_that_decided_them(
    runtime: Runtime,
) -> None:
    # Their records named neither the permits that allowed them nor the policies that failed
    # to evaluate, as a tool call's do (docs/policy.md says they do: found by review)
    (runtime.settings.policy_dir / "ops.cedar").write_text(
        '@id("ops-terminate-bare")\n'
        'permit (principal, action == Action::"terminate_agent", resource)\n'
        "when { resource.plugins.isEmpty() };\n"  # (fails: known by id alone)
        '@id("ops-attach-notes")\n'
        'permit (principal, action == Action::"attach_plugin", resource)\n'
        'when { context has plugin && context.plugin == "notes" };\n'
    )
    runtime.policy.reload()
    await runtime.agents.spawn("eve", ["notes"])
    await runtime.agents.attach("eve", "faulty")
    snap = await runtime.agents.snapshot("eve")
    await runtime.agents.terminate("eve")
    await runtime.agents.recover(snap.id)
    runtime.install_plugin(NOTES_DIR, replace=True)
    runtime.remove_plugin("faulty")
    records = [
        r
        for r in (orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000))
        if r["agent"] == "admin" and r["transport"] != "files"
    ]
    decided = [(r["verb"], r["policies"], r.get("policy_errors")) for r in records]
    error = (
        'policy "ops-terminate-bare": it reads an attribute of Agent::"eve": an agent other '
        "than the one acting is known by its id alone"
    )
    both = ["admin-all", "ops-attach-notes"]  # (a spawn and a recover: its attaches' too)
    assert decided == [
        ("spawn_agent", both, None),
        ("attach_plugin", ["admin-all"], None),
        ("snapshot_agent", ["admin-all"], None),
        ("terminate_agent", ["admin-all"], [error]),
        ("recover_agent", both, None),
        ("install_plugin", ["admin-all"], None),
        ("remove_plugin", ["admin-all"], None),
    ]


NO_FAULTY_ATTACH = (
    '@id("no-faulty-attach")\n'
    '@reason("faulty may not be granted to any agent")\n'
    'forbid (principal, action == Action::"attach_plugin", resource)\n'
    'when { context has plugin && context.plugin == "faulty" };\n'
)


def records_of(runtime: Runtime, resource: str) -> list[dict[str, Any]]:
    return [
        body
        for body in (orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000))
        if body.get("resource") == resource
    ]


@pytest.mark.parametrize("via", ["admin", "cli"])
async def test_a_plugin_the_policy_forbids_to_attach_is_not_granted_by_spawn_either(
    runtime: Runtime, via: str
) -> None:
    (runtime.settings.policy_dir / "no-faulty.cedar").write_text(NO_FAULTY_ATTACH)
    runtime.policy.reload()
    with pytest.raises(PolicyDenied) as caught:
        await runtime.agents.spawn("eve", ["notes", "faulty"], via=via)
    assert caught.value.data is not None
    assert caught.value.data["policies"] == ["no-faulty-attach"]
    assert runtime.store.get_agent("eve") is None
    # decided and audited as the standalone attach is, naming the plugin
    await runtime.agents.spawn("eve", ["notes"], via=via)
    with pytest.raises(PolicyDenied):
        await runtime.agents.attach("eve", "faulty", via=via)
    denials = [
        (r["verb"], r["transport"], r["plugin"], r["policies"])
        for r in records_of(runtime, "eve")
        if r["outcome"] == "denied"
    ]
    assert denials == [("attach_plugin", via, "faulty", ["no-faulty-attach"])] * 2
    assert runtime.agents.get("eve").plugins == ["notes"]


async def test_recover_leaves_out_a_plugin_the_policy_forbids_to_attach(
    runtime: Runtime,
) -> None:
    await runtime.agents.spawn("eve", ["notes", "faulty"], {"step": 1})
    snap = await runtime.agents.snapshot("eve")
    await runtime.agents.terminate("eve")
    (runtime.settings.policy_dir / "no-faulty.cedar").write_text(NO_FAULTY_ATTACH)
    runtime.policy.reload()
    recovery = await runtime.agents.recover(snap.id)
    assert recovery.agent.plugins == ["notes"]
    assert (recovery.agent.status, recovery.agent.state) == ("active", {"step": 1})
    assert list(recovery.not_restored) == ["faulty"]
    assert "faulty may not be granted to any agent" in recovery.not_restored["faulty"]
    assert runtime.agents.get("eve").plugins == ["notes"]
    records = records_of(runtime, "eve")
    denied, recovered = records[-2:]
    assert (denied["verb"], denied["outcome"], denied["plugin"]) == (
        "attach_plugin",
        "denied",
        "faulty",
    )
    assert denied["policies"] == ["no-faulty-attach"]
    assert recovered["verb"] == "recover_agent"
    assert recovered["not_restored"] == recovery_view(recovery)["not_restored"]


KEEP_EVE = (
    '@id("keep-eve")\n'
    '@reason("eve may not be terminated")\n'
    'forbid (principal, action == Action::"terminate_agent", resource == Agent::"eve");\n'
)


@pytest.mark.parametrize("via", ["admin", "cli"])
async def test_recover_that_would_terminate_an_agent_the_policy_keeps_is_refused(
    runtime: Runtime, via: str
) -> None:
    # Recovering a snapshot taken while the agent was terminated terminated it, though the
    # policy forbids that terminate: only recover_agent was decided (found by review)
    spawned = await runtime.agents.spawn("eve", ["notes"], {"step": 1})
    active = await runtime.agents.snapshot("eve")
    await runtime.agents.terminate("eve")
    terminated = await runtime.agents.snapshot("eve")
    await runtime.agents.recover(active.id)
    (runtime.settings.policy_dir / "keep-eve.cedar").write_text(KEEP_EVE)
    runtime.policy.reload()
    with pytest.raises(PolicyDenied) as caught:
        await runtime.agents.recover(terminated.id, via=via)
    assert caught.value.data is not None
    assert caught.value.data["policies"] == ["keep-eve"]
    assert "eve may not be terminated" in str(caught.value)
    assert runtime.agents.get("eve").status == "active"
    assert runtime.agents.authenticate(spawned.token).agent == "eve"
    denied = records_of(runtime, "eve")[-1]  # (and no recover_agent record after it)
    assert (denied["verb"], denied["outcome"], denied["transport"], denied["policies"]) == (
        "terminate_agent",
        "denied",
        via,
        ["keep-eve"],
    )
    # a terminated agent kept so, or brought back, is the recover's alone to decide
    (runtime.settings.policy_dir / "keep-eve.cedar").unlink()
    runtime.policy.reload()
    await runtime.agents.terminate("eve")
    (runtime.settings.policy_dir / "keep-eve.cedar").write_text(KEEP_EVE)
    runtime.policy.reload()
    assert (await runtime.agents.recover(terminated.id, via=via)).agent.status == "terminated"
    assert (await runtime.agents.recover(active.id, via=via)).agent.status == "active"


async def test_recover_that_terminates_is_recorded_with_the_terminate_permit(
    runtime: Runtime,
) -> None:
    (runtime.settings.policy_dir / "ops.cedar").write_text(
        '@id("ops-terminate")\npermit (principal, action == Action::"terminate_agent", resource);\n'
    )
    runtime.policy.reload()
    await runtime.agents.spawn("eve", [])
    active = await runtime.agents.snapshot("eve")
    await runtime.agents.terminate("eve")
    terminated = await runtime.agents.snapshot("eve")
    await runtime.agents.recover(active.id)
    await runtime.agents.recover(terminated.id)
    made_active, made_terminated = records_of(runtime, "eve")[-2:]
    assert (made_active["status"], made_active["policies"]) == ("active", ["admin-all"])
    assert (made_terminated["status"], made_terminated["policies"]) == (
        "terminated",
        ["admin-all", "ops-terminate"],
    )


async def test_admin_actions_name_the_policy_set_that_decided_them(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin action's record, allowed or denied, names the policy set that decided it
    (``policies_sha256``), as a call's does (found by review); a recover and its attaches
    are decided by one set, though another comes into force while a denied attach of it is
    audited."""
    first = runtime.policy.engine.digest
    await runtime.agents.spawn("eve", ["faulty", "notes"])  # (with an attach of each)
    snap = await runtime.agents.snapshot("eve")
    runtime.install_plugin(NOTES_DIR, replace=True)
    policy_dir = runtime.settings.policy_dir
    (policy_dir / "no-faulty.cedar").write_text(NO_FAULTY_ATTACH)
    second = runtime.policy.reload().digest
    append = runtime.audit.append

    async def append_then_reload(event: dict[str, Any]) -> Any:
        entry = await append(event)
        if event["outcome"] == "denied":  # (of faulty, before notes is decided)
            (policy_dir / "more.cedar").write_text(
                '@id("more")\npermit (principal, action, resource) when { false };\n'
            )
            runtime.policy.reload()
        return entry

    monkeypatch.setattr(runtime.audit, "append", append_then_reload)
    recovery = await runtime.agents.recover(snap.id)
    assert recovery.agent.plugins == ["notes"]
    assert runtime.policy.engine.digest not in (first, second)
    decided = [
        (r["verb"], r["outcome"], r["policies_sha256"])
        for r in (orjson.loads(e.body) for e in runtime.store.read_audit(0, 10_000))
    ]
    assert decided == [
        ("spawn_agent", "allowed", first),
        ("snapshot_agent", "allowed", first),
        ("install_plugin", "allowed", first),
        ("attach_plugin", "denied", second),
        ("recover_agent", "allowed", second),
    ]


async def test_spawn_and_recover_records_say_what_the_agent_became(runtime: Runtime) -> None:
    # A recover that revoked the agent's token, or made it work again, was recorded with its
    # snapshot's id alone, and the snapshots are not chained: the log did not say so; nor
    # did a spawn's record say what state the agent began with (found by review)
    await runtime.agents.spawn("fay", ["notes", "faulty"], {"step": 1, "k": [True, None]})
    active = await runtime.agents.snapshot("fay")
    await runtime.agents.terminate("fay")
    terminated = await runtime.agents.snapshot("fay")
    await runtime.agents.recover(active.id)
    await runtime.agents.recover(terminated.id)
    spawned, *_, made_active, made_terminated = records_of(runtime, "fay")
    state = hashlib.sha256(b'{"k":[true,null],"step":1}').hexdigest()  # (not the state)
    assert (spawned["plugins"], spawned["state_sha256"]) == (["notes", "faulty"], state)
    became = [
        (r["snapshot_id"], r["status"], r["plugins"], r["state_sha256"])
        for r in (made_active, made_terminated)
    ]
    assert became == [
        (active.id, "active", ["notes", "faulty"], state),
        (terminated.id, "terminated", ["notes", "faulty"], state),
    ]


async def test_recover_refuses_a_snapshot_whose_state_could_not_be_shown(
    runtime: Runtime,
) -> None:
    # (taken before spawn refused such a state: restored, it would break the agent listing)
    await runtime.agents.spawn("deep", ["notes"])
    state: dict[str, Any] = {}
    for _ in range(252):
        state = {"a": state}
    runtime.store.put_snapshot(
        SnapshotRecord(id="snap_deep", agent="deep", data={"plugins": [], "state": state})
    )
    with pytest.raises(InvalidParams, match="at most 252 levels"):
        await runtime.agents.recover("snap_deep")
    assert runtime.agents.get("deep").plugins == ["notes"]
    assert audited(runtime, "deep") == ["spawn_agent"]
