"""Labels and obligations on the governed path: content detectors label an action's arguments
for the policy, and a permit's ``@redact`` obligation redacts the action's result, with real
Cedar, a real Runtime and real plugin workers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from mcp_zero.errors import McpZeroError, PolicyDenied, PolicyError
from mcp_zero.kernel.action import Principal
from mcp_zero.runtime import Runtime
from mcp_zero.storage.sqlite import SqliteStore
from plugin_builders import write_plugin

pytestmark = pytest.mark.anyio
TIMEOUT_S = 20.0
ALL = frozenset({"notes", "faulty", "conformance"})
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
)

NO_SECRETS_OUT = """
@id("no-secrets-out")
@reason("calls carrying secrets are blocked")
forbid (principal, action, resource) when { context.labels.contains("secret") };
"""


def redacting(labels: str) -> str:
    """The default permits of calls and content, carrying ``@redact(labels)``."""
    return f"""
@id("tools-redacted")
@redact("{labels}")
permit (principal is Agent, action == Action::"call_tool", resource is Tool)
when {{ principal.plugins.contains(resource.plugin) }};

@id("content-redacted")
@redact("{labels}")
permit (principal is Agent, action in [Action::"read_resource", Action::"get_prompt",
        Action::"complete"], resource)
when {{ principal.plugins.contains(resource.plugin) }};
"""


def use_policy(runtime: Runtime, name: str, text: str) -> None:
    (runtime.settings.policy_dir / name).write_text(text)
    runtime.policy.reload()


def records(runtime: Runtime, request_id: str) -> list[dict[str, Any]]:
    bodies = (orjson.loads(e.body) for e in runtime.store.read_audit(0, 100_000))
    return [body for body in bodies if body.get("request_id") == request_id]


async def call(
    runtime: Runtime, tool: str, args: dict[str, Any], rid: str, bridge: Any
) -> dict[str, Any]:
    with anyio.fail_after(TIMEOUT_S):
        return await runtime.kernel.call_tool(
            Principal("alice", ALL), tool, args, bridge, request_id=rid, transport="test"
        )


async def test_the_no_secrets_out_policy_denies_calls_carrying_secrets(
    started: Runtime, bridge: Any
) -> None:
    # the default policy reads no labels: no detector runs, and the call goes through
    result = await call(started, "faulty_echo", {"text": f"key {AWS_KEY}"}, "s0", bridge)
    assert result["content"][0]["text"] == f"key {AWS_KEY}"
    [record] = records(started, "s0")
    assert record["outcome"] == "allowed"
    assert "labels" not in record
    assert "obligations" not in record
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    for rid, text in (("s1", f"key {AWS_KEY}"), ("s2", PRIVATE_KEY)):
        with pytest.raises(PolicyDenied) as caught:
            await call(started, "faulty_echo", {"text": text}, rid, bridge)
        assert caught.value.data is not None
        assert caught.value.data["policies"] == ["no-secrets-out"]
        [record] = records(started, rid)
        assert record["outcome"] == "denied"
        assert record["labels"] == ["secret"]
        assert record["policies"] == ["no-secrets-out"]
    clean = await call(started, "faulty_echo", {"text": "nothing secret"}, "s3", bridge)
    assert clean["content"] == [{"type": "text", "text": "nothing secret"}]
    [record] = records(started, "s3")
    assert record["outcome"] == "allowed"
    assert "labels" not in record


async def test_labels_of_all_kinds_are_audited(started: Runtime, bridge: Any) -> None:
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    await call(started, "faulty_echo", {"text": "mail bob@example.com"}, "l1", bridge)
    [record] = records(started, "l1")
    assert record["outcome"] == "allowed"
    assert record["labels"] == ["pii"]
    with pytest.raises(PolicyDenied):
        await call(started, "faulty_echo", {"text": "bob@example.com token=x9y8z7"}, "l2", bridge)
    assert records(started, "l2")[0]["labels"] == ["pii", "secret"]
    with pytest.raises(PolicyDenied):  # a prompt's arguments are labelled too
        with anyio.fail_after(TIMEOUT_S):
            await started.kernel.get_prompt(
                Principal("alice", ALL),
                "test_prompt_with_arguments",
                {"arg1": AWS_KEY, "arg2": "b"},
                bridge,
                request_id="l3",
                transport="test",
            )
    assert records(started, "l3")[0]["labels"] == ["secret"]
    with pytest.raises(PolicyDenied):  # and the value a completion is asked for
        with anyio.fail_after(TIMEOUT_S):
            await started.kernel.complete(
                Principal("alice", ALL),
                {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
                {"name": "arg1", "value": "password=hunter22"},
                None,
                request_id="l4",
                transport="test",
            )
    assert records(started, "l4")[0]["labels"] == ["secret"]


async def test_a_redact_obligation_redacts_secrets_in_what_a_tool_returns(
    started: Runtime, bridge: Any
) -> None:
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("secret"))
    result = await call(
        started, "faulty_echo", {"text": f"key {AWS_KEY}, mail a@b.org"}, "r1", bridge
    )
    assert result["content"] == [{"type": "text", "text": "key [redacted:secret], mail a@b.org"}]
    [record] = records(started, "r1")
    assert record["outcome"] == "allowed"
    assert record["policies"] == ["tools-redacted"]
    assert record["obligations"] == ["redact:secret"]
    assert record["redacted"] == 1
    assert record["labels"] == ["pii", "secret"]
    # structuredContent as well as the text of its content, after the outputSchema check
    added = await call(started, "notes_add", {"text": f"deploy with {PRIVATE_KEY}"}, "r2", bridge)
    assert added["structuredContent"]["note"]["text"] == "deploy with [redacted:secret]"
    assert PRIVATE_KEY not in orjson.dumps(added).decode()
    assert "[redacted:secret]" in added["content"][0]["text"]
    [record] = records(started, "r2")
    assert record["obligations"] == ["redact:secret"]
    assert record["redacted"] == 2
    # a clean result: the obligation ran and found nothing
    clean = await call(started, "faulty_echo", {"text": "plain"}, "r3", bridge)
    assert clean["content"][0]["text"] == "plain"
    [record] = records(started, "r3")
    assert (record["obligations"], record["redacted"]) == (["redact:secret"], 0)
    assert "labels" not in record


async def test_a_pii_obligation_redacts_e_mail_addresses_in_prompts_and_results(
    started: Runtime, bridge: Any
) -> None:
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("pii"))
    result = await call(
        started, "faulty_echo", {"text": f"write to jane@example.com, {AWS_KEY}"}, "p1", bridge
    )
    assert result["content"][0]["text"] == f"write to [redacted:pii], {AWS_KEY}"
    [record] = records(started, "p1")
    assert (record["obligations"], record["redacted"]) == (["redact:pii"], 1)
    with anyio.fail_after(TIMEOUT_S):
        prompt = await started.kernel.get_prompt(
            Principal("alice", ALL),
            "test_prompt_with_arguments",
            {"arg1": "jane@example.com", "arg2": "4111 1111 1111 1111"},
            bridge,
            request_id="p2",
            transport="test",
        )
    text = orjson.dumps(prompt).decode()
    assert "jane@example.com" not in text
    assert "4111 1111 1111 1111" not in text
    assert text.count("[redacted:pii]") == 2
    [record] = records(started, "p2")
    assert (record["obligations"], record["redacted"]) == (["redact:pii"], 2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '@id("odd")\n@redact("nonsense")\npermit (principal, action, resource);\n',
            "odd.cedar:1: policy \"odd\": @redact names unknown label 'nonsense'",
        ),
        (
            '@id("odd")\n@redact("secret")\nforbid (principal, action, resource);\n',
            'odd.cedar:1: policy "odd": @redact is an obligation of an allow; a forbid cannot',
        ),
        (
            '@id("odd")\n@audit("after")\npermit (principal, action, resource);\n',
            'odd.cedar:1: policy "odd": @audit takes "before"',
        ),
        (
            '@id("odd")\n@audit("before")\nforbid (principal, action, resource);\n',
            'odd.cedar:1: policy "odd": @audit is an obligation of an allow; a forbid cannot',
        ),
        (
            '@id("odd")\n@redact("secret")\npermit (principal, action == Action::"list_tools", '
            "resource);\n",
            'odd.cedar:1: policy "odd": @redact cannot apply to the actions it allows (list_tools)',
        ),
        (
            '@id("odd")\n@audit("before")\npermit (principal, action in [Action::"spawn_agent", '
            'Action::"install_plugin"], resource);\n',
            'odd.cedar:1: policy "odd": @audit cannot apply to the actions it allows '
            "(install_plugin, spawn_agent)",
        ),
    ],
)
async def test_a_bad_obligation_is_refused_and_the_policy_set_in_force_stays(
    started: Runtime, bridge: Any, text: str, problem: str
) -> None:
    (started.settings.policy_dir / "odd.cedar").write_text(text)
    with pytest.raises(PolicyError) as caught:
        started.policy.reload()
    assert caught.value.message.startswith(problem)
    result = await call(started, "faulty_echo", {"text": "still here"}, "b1", bridge)
    assert result["content"][0]["text"] == "still here"


AUDITED_FIRST = """
@id("tools-audited-first")
@audit("before")
@redact("secret")
permit (principal is Agent, action == Action::"call_tool", resource is Tool)
when { principal.plugins.contains(resource.plugin) };
"""


async def test_an_audit_before_obligation_records_a_call_durably_before_it_runs(
    started: Runtime, bridge: Any
) -> None:
    """The intent is committed while the plugin still runs (so a kill -9 then leaves it in
    the log), and the outcome follows under the same request id."""
    # (an agent of the store: a call that waited for its intent's record looks it up again)
    await started.agents.spawn("alice", sorted(ALL))
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "audited.cedar", AUDITED_FIRST)
    running = asyncio.ensure_future(call(started, "faulty_nap", {"seconds": 1.0}, "i1", bridge))
    with anyio.fail_after(TIMEOUT_S):
        while not records(started, "i1"):
            await anyio.sleep(0.01)
    assert not running.done()
    [intent] = records(started, "i1")
    assert intent["outcome"] == "intent"
    assert intent["obligations"] == ["audit:before"]
    assert intent["policies"] == ["tools-audited-first"]
    assert (intent["verb"], intent["resource"], intent["agent"]) == (
        "call_tool",
        "faulty_nap",
        "alice",
    )
    await running
    first, outcome = records(started, "i1")
    assert first == intent
    assert outcome["outcome"] == "allowed"
    # it names its intent: request ids are the clients', reused by every session
    [intent_seq] = [
        e.seq
        for e in started.store.read_audit(0, 100_000)
        if orjson.loads(e.body).get("request_id") == "i1"
        and orjson.loads(e.body)["outcome"] == "intent"
    ]
    assert outcome["intent_seq"] == intent_seq
    assert outcome["obligations"] == ["audit:before", "redact:secret"]
    # a call denied never gets one: the obligation is an allow's
    with pytest.raises(PolicyDenied):
        await started.kernel.call_tool(
            Principal("bob", frozenset()),
            "faulty_echo",
            {"text": "x"},
            bridge,
            request_id="i2",
            transport="test",
        )
    assert [r["outcome"] for r in records(started, "i2")] == ["denied"]


async def test_a_secret_after_a_newline_or_an_escape_in_arguments_is_denied(
    started: Runtime, bridge: Any
) -> None:
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    texts = [
        f"x\n{AWS_KEY}",
        "user=bob\npassword=hunter22",
        "a\tghp_" + "a" * 36,
        # a client's JSON spelling it with escapes: \u000a\u0041KIA...
        orjson.loads(b'"x\\u000a\\u0041KIAIOSFODNN7EXAMPLE"'),
    ]
    for n, text in enumerate(texts):
        with pytest.raises(PolicyDenied):
            await call(started, "faulty_echo", {"text": text}, f"n{n}", bridge)
        [record] = records(started, f"n{n}")
        assert (record["outcome"], record["labels"]) == ("denied", ["secret"])


async def test_the_arguments_a_completion_is_given_as_context_are_labelled(
    started: Runtime, bridge: Any
) -> None:
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    with pytest.raises(PolicyDenied), anyio.fail_after(TIMEOUT_S):
        await started.kernel.complete(
            Principal("alice", ALL),
            {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
            {"name": "arg1", "value": "x"},
            {"arguments": {"arg2": AWS_KEY}},
            request_id="c1",
            transport="test",
        )
    assert records(started, "c1")[0]["labels"] == ["secret"]


async def complete_resource(
    runtime: Runtime, principal: Principal, uri: str, argument: str, rid: str
) -> Any:
    """``completion/complete`` of ``argument`` (typed: ``d``) of the resource ``uri``."""
    with anyio.fail_after(TIMEOUT_S):
        return await runtime.kernel.complete(
            principal,
            {"type": "ref/resource", "uri": uri},
            {"name": argument, "value": "d"},
            None,
            request_id=rid,
            transport="test",
        )


async def test_a_resource_completion_is_decided_with_the_labels_of_its_uri(
    started: Runtime, bridge: Any
) -> None:
    """A ref/resource names a URI (or a template): what it carries is labelled as a read's
    URI is, written or escaped, with the value the client typed."""
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    alice = Principal("alice", ALL)
    for rid, uri in (
        ("r1", f"test://template/{AWS_KEY}/data"),
        ("r2", "test://template/password%3Dhunter22/data"),
    ):
        with pytest.raises(PolicyDenied):
            await complete_resource(started, alice, uri, "id", rid)
        [record] = records(started, rid)
        assert (record["outcome"], record["labels"]) == ("denied", ["secret"])
    # the template itself carries nothing
    await complete_resource(started, alice, "test://template/{id}/data", "id", "r3")
    [record] = records(started, "r3")
    assert record["outcome"] == "allowed"
    assert "labels" not in record


async def test_a_template_whose_variables_are_named_as_credentials_is_completed(
    make_runtime: Any, tmp_path: Path
) -> None:
    """A template's own text (``?token={token}``) names its variables: its completion is
    not a credential's; a URI it serves with a token in it is."""
    template = "vault://{name}?token={token}"
    code = (
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('vault')\n"
        f"@plugin.resource_template({template!r})\n"
        "def entry(ctx, name, token):\n"
        "    return name\n"
        f"@plugin.completion(resource_template={template!r}, argument='name')\n"
        "def names(ctx, value, arguments):\n"
        "    return [n for n in ('db', 'dns') if n.startswith(value)]\n"
    )
    listed = {"resourceTemplates": [{"uriTemplate": template, "name": "vault-entry"}]}
    runtime: Runtime = make_runtime()
    runtime.plugins.install(write_plugin(tmp_path / "vault", "vault", code, **listed))
    await runtime.start()
    use_policy(runtime, "no-secrets-out.cedar", NO_SECRETS_OUT)
    alice = Principal("alice", frozenset({"vault"}))
    completed = await complete_resource(runtime, alice, template, "name", "v1")
    assert completed["completion"]["values"] == ["db", "dns"]
    [record] = records(runtime, "v1")
    assert record["outcome"] == "allowed"
    assert "labels" not in record
    uri = "vault://{name}?token=ghp_0123456789abcdefghijklmnopqrstuvwxyzAB"
    with pytest.raises(PolicyDenied):
        await complete_resource(runtime, alice, uri, "name", "v2")
    [record] = records(runtime, "v2")
    assert (record["outcome"], record["labels"]) == ("denied", ["secret"])


NO_SECRET_QUESTIONS = """
@id("no-secret-questions")
@reason("a plugin may not send a secret to the client's model")
forbid (principal, action == Action::"client_request", resource)
when { context.labels.contains("secret") };
"""


async def test_a_client_request_is_decided_with_the_labels_of_what_it_would_send(
    started: Runtime, bridge: Any
) -> None:
    use_policy(started, "no-secret-questions.cedar", NO_SECRET_QUESTIONS)
    result = await call(started, "test_sampling", {"prompt": f"my key is {AWS_KEY}"}, "q1", bridge)
    assert result["isError"] is True  # the client was not asked
    assert "no-secret-questions" in result["content"][0]["text"]
    [asked] = [r for r in records(started, "q1") if r["verb"] == "client_request"]
    assert (asked["outcome"], asked["labels"]) == ("denied", ["secret"])
    assert asked["policies"] == ["no-secret-questions"]
    result = await call(started, "test_sampling", {"prompt": "the capital?"}, "q2", bridge)
    assert result["content"][0]["text"] == "LLM response: sampled"
    [asked] = [r for r in records(started, "q2") if r["verb"] == "client_request"]
    assert asked["outcome"] == "allowed"
    assert "labels" not in asked


async def test_a_read_and_a_subscription_are_decided_with_the_labels_of_their_uri(
    started: Runtime, bridge: Any
) -> None:
    use_policy(started, "no-secrets-out.cedar", NO_SECRETS_OUT)
    kernel, alice = started.kernel, Principal("alice", ALL)
    # a token in a template's variable, as written or escaped (the plugin reads it unescaped)
    for rid, uri in (
        ("u1", f"test://template/{AWS_KEY}/data"),
        ("u2", "test://template/password%3Dhunter22/data"),
    ):
        with pytest.raises(PolicyDenied), anyio.fail_after(TIMEOUT_S):
            await kernel.read_resource(alice, uri, bridge, request_id=rid, transport="test")
        [record] = records(started, rid)
        assert (record["outcome"], record["labels"]) == ("denied", ["secret"])
        # recorded as its client would be shown it redacted, its reasons too: a URI holding
        # a secret was recorded whole, though arguments are recorded as a digest (found by a
        # bug hunt)
        kept = orjson.dumps(record).decode()
        assert AWS_KEY not in kept, kept
        assert "hunter22" not in kept, kept
        assert "[redacted:secret]" in record["resource"]
        with pytest.raises(PolicyDenied):  # nor is it told of the resource's changes
            kernel.check_resource(alice, uri, transport="test")
    with anyio.fail_after(TIMEOUT_S):
        [refused] = await kernel.subscribe(
            alice,
            [f"test://template/{AWS_KEY}/data"],
            method="resources/subscribe",
            request_id="u3",
            transport="test",
        )
    assert isinstance(refused, PolicyDenied)
    [record] = records(started, "u3")
    assert (record["outcome"], record["labels"]) == ("denied", ["secret"])
    with anyio.fail_after(TIMEOUT_S):
        await kernel.read_resource(
            alice, "test://template/7/data", bridge, request_id="u4", transport="test"
        )
    [record] = records(started, "u4")
    assert record["outcome"] == "allowed"
    assert "labels" not in record


async def test_the_obligations_of_a_permit_on_a_template_bind_the_reads_of_its_uris(
    started: Runtime, bridge: Any
) -> None:
    use_policy(
        started,
        "template-redacted.cedar",
        '@id("template-redacted")\n@redact("secret")\n'
        'permit (principal, action == Action::"read_resource", '
        'resource == Resource::"test://template/{id}/data");\n',
    )
    with anyio.fail_after(TIMEOUT_S):
        read = await started.kernel.read_resource(
            Principal("alice", ALL),
            f"test://template/{AWS_KEY}/data",
            bridge,
            request_id="t1",
            transport="test",
        )
    assert AWS_KEY not in read["contents"][0]["text"]
    [record] = records(started, "t1")
    assert record["policies"] == ["attached-plugins-content", "template-redacted"]
    assert record["obligations"] == ["redact:secret"]


async def test_a_secret_in_a_text_that_is_json_is_redacted(started: Runtime, bridge: Any) -> None:
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("secret, pii"))
    text = f"deploy:\n{AWS_KEY}\npassword=hunter22\nmail\tjane@example.com"
    added = await call(started, "notes_add", {"text": text}, "j1", bridge)
    # content[0].text is the JSON of structuredContent: the newlines are \n escapes there
    shown = orjson.dumps(added).decode()
    for leaked in (AWS_KEY, "hunter22", "jane@example.com"):
        assert leaked not in shown
    assert orjson.loads(added["content"][0]["text"]) == added["structuredContent"]


LEAKY_DIR = Path(__file__).parents[1] / "plugins" / "leaky"
LEAKY_KEY = "AKIAIOSFODNN7EXAMPLE"


async def test_a_redact_obligation_redacts_errors_and_credential_named_values(
    started: Runtime, bridge: Any
) -> None:
    started.plugins.install(LEAKY_DIR)
    await started.plugins.refresh(force=True)
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("secret"))
    principal = Principal("alice", ALL | {"leaky"})
    kernel = started.kernel
    with anyio.fail_after(TIMEOUT_S):
        keys = await kernel.call_tool(
            principal, "leaky_keys", {}, bridge, request_id="e0", transport="test"
        )
    assert keys["structuredContent"] == {
        "aws": "[redacted:secret]",
        "password": "[redacted:secret]",
        "db": {"token": "[redacted:secret]"},
    }
    for leaked in (LEAKY_KEY, "hunter22", "s3cr3t-t0ken"):
        assert leaked not in orjson.dumps(keys).decode()
    failing = {
        "e1": kernel.read_resource(
            principal, "leaky://broken", bridge, request_id="e1", transport="test"
        ),
        "e2": kernel.read_resource(
            principal, "leaky://item/7", bridge, request_id="e2", transport="test"
        ),
        "e3": kernel.get_prompt(
            principal, "leaky_prompt", {"a": "z"}, bridge, request_id="e3", transport="test"
        ),
        "e4": kernel.complete(
            principal,
            {"type": "ref/prompt", "name": "leaky_prompt"},
            {"name": "a", "value": "q"},
            None,
            request_id="e4",
            transport="test",
        ),
    }
    for rid, action in failing.items():
        with pytest.raises(McpZeroError) as caught, anyio.fail_after(TIMEOUT_S):
            await action
        error = caught.value
        shown = orjson.dumps([error.message, str(error), error.data]).decode()
        assert "[redacted:secret]" in error.message, rid
        assert LEAKY_KEY not in shown, rid
        assert "hunter22" not in shown, rid
        [record] = records(started, rid)
        assert record["outcome"] == "error", rid
        assert record["obligations"] == ["redact:secret"], rid
        assert record["redacted"] >= 1, rid
        assert LEAKY_KEY not in orjson.dumps(record).decode()


async def test_a_large_result_is_redacted_while_other_calls_go_on(
    started: Runtime, bridge: Any
) -> None:
    started.plugins.install(LEAKY_DIR)
    await started.plugins.refresh(force=True)
    # (an agent of the store: a call that waited for a slot looks it up again)
    await started.agents.spawn("alice", sorted(ALL | {"leaky"}))
    principal = started.agents.principal("alice")
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("secret"))
    kernel = started.kernel
    bulk = asyncio.create_task(
        kernel.call_tool(
            principal, "leaky_bulk", {"mib": 8}, bridge, request_id="bulk", transport="test"
        )
    )
    with anyio.fail_after(TIMEOUT_S):
        while ("log", "info") not in bridge.events:  # it runs: it holds leaky's one slot
            assert not bulk.done(), bulk.result()
            await asyncio.sleep(0.01)
    # These wait for the slot, and get it once the bulk call's plugin has answered: while its
    # ~8 MiB are being redacted, if that leaves the loop free; else only after its record.
    small = [
        asyncio.create_task(
            kernel.call_tool(
                principal, "leaky_keys", {}, bridge, request_id=f"s{i}", transport="test"
            )
        )
        for i in range(3)
    ]
    with anyio.fail_after(60):
        result, *smalls = await asyncio.gather(bulk, *small)
    text = result["content"][0]["text"]
    assert LEAKY_KEY not in text
    assert "hunter22" not in text
    lines = text.count("\n")
    assert text.count("[redacted:secret]") == 2 * lines
    assert all(s["structuredContent"]["aws"] == "[redacted:secret]" for s in smalls)
    seqs = {}
    for entry in started.store.read_audit(0, 100_000):
        body = orjson.loads(entry.body)
        seqs[body.get("request_id")] = entry.seq
        if body.get("request_id") == "bulk":
            assert body["redacted"] == 2 * lines
            assert body["obligations"] == ["redact:secret"]
    assert max(seqs[f"s{i}"] for i in range(3)) < seqs["bulk"]


async def redacting_a_large_result(runtime: Runtime, bridge: Any) -> asyncio.Task[Any]:
    """A call of the leaky plugin's 8 MiB result (request "bulk"), under a policy that
    redacts it, once its plugin has answered and its result is being redacted."""
    (runtime.settings.policy_dir / "default.cedar").unlink()
    use_policy(runtime, "redact.cedar", redacting("secret"))
    bulk = asyncio.create_task(
        runtime.kernel.call_tool(
            Principal("alice", ALL | {"leaky"}),
            "leaky_bulk",
            {"mib": 8},
            bridge,
            request_id="bulk",
            transport="test",
        )
    )
    with anyio.fail_after(TIMEOUT_S):
        while ("log", "info") not in bridge.events:  # it runs
            await asyncio.sleep(0.01)
        while runtime.quotas.inflight("alice"):  # its plugin answered: its result is redacted
            assert not bulk.done(), bulk.result()
            await asyncio.sleep(0.01)
    assert not bulk.done()
    return bulk


async def test_a_call_cancelled_while_its_result_is_redacted_is_answered_as_recorded(
    started: Runtime, bridge: Any
) -> None:
    # The plugin had answered; the cancel cut the redaction, and the call was recorded and
    # answered as cancelled (found by review, as for its record's commit)
    started.plugins.install(LEAKY_DIR)
    await started.plugins.refresh(force=True)
    bulk = await redacting_a_large_result(started, bridge)
    bulk.cancel()
    with anyio.fail_after(TIMEOUT_S):
        result = await bulk
    assert LEAKY_KEY not in result["content"][0]["text"]
    [record] = records(started, "bulk")
    assert record["outcome"] == "allowed"
    assert record["redacted"] > 0


async def test_a_runtime_closed_while_a_result_is_redacted_keeps_the_calls_record(
    make_runtime: Any, bridge: Any
) -> None:
    # A stopping server cut the call off while its large result was redacted (in a thread,
    # not to be cut), then closed the audit log: the record of a call whose plugin had
    # answered was never written (found by review)
    runtime: Runtime = make_runtime()
    runtime.plugins.install(LEAKY_DIR)
    await runtime.start()
    bulk = await redacting_a_large_result(runtime, bridge)
    bulk.cancel()  # as a stopping server does
    with anyio.fail_after(TIMEOUT_S):
        await runtime.aclose()
    with SqliteStore(runtime.settings.db_path) as store:
        bodies = [orjson.loads(e.body) for e in store.read_audit(0, 1000)]
    [record] = [body for body in bodies if body.get("request_id") == "bulk"]
    assert (record["outcome"], record["redacted"] > 0) == ("allowed", True)


async def test_a_large_error_is_redacted_too(started: Runtime, bridge: Any) -> None:
    started.plugins.install(LEAKY_DIR)
    await started.plugins.refresh(force=True)
    (started.settings.policy_dir / "default.cedar").unlink()
    use_policy(started, "redact.cedar", redacting("secret"))
    principal = Principal("alice", ALL | {"leaky"})
    with pytest.raises(McpZeroError) as caught, anyio.fail_after(TIMEOUT_S):
        await started.kernel.read_resource(
            principal, "leaky://broken/bulk", bridge, request_id="big-error", transport="test"
        )
    error = caught.value
    assert len(error.message) > 1 << 20  # (redacted in a thread: see REDACT_OFF_LOOP_CHARS)
    assert LEAKY_KEY not in orjson.dumps([error.message, str(error), error.data]).decode()
    [record] = records(started, "big-error")
    assert record["outcome"] == "error"
    assert record["redacted"] == error.message.count("[redacted:secret]") >= 40_000


async def test_a_permit_that_fails_to_evaluate_binds_its_obligations_and_is_recorded(
    started: Runtime, bridge: Any
) -> None:
    # It might have matched: its @redact holds, and the skipped policy's error is evidence
    use_policy(
        started,
        "careful.cedar",
        '@id("careful")\n@redact("secret")\n'
        'permit (principal, action == Action::"call_tool", resource) '
        "when { 9223372036854775807 + 1 > 0 };",
    )
    result = await call(started, "faulty_echo", {"text": f"key {AWS_KEY}"}, "e1", bridge)
    assert result["content"][0]["text"] == "key [redacted:secret]"
    [record] = records(started, "e1")
    assert record["outcome"] == "allowed"
    assert ["careful" in error for error in record["policy_errors"]] == [True]


async def test_an_output_schema_failure_quoting_a_secret_is_redacted_not_cut(
    make_runtime: Any, tmp_path: Path
) -> None:
    # The message quoting the plugin's output was cut to its first 80 and last 100
    # characters before its redaction: the cut took the credential's name, and its value
    # went out whole (found by a bug hunt)
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    value = "x" * 160 + f" aws_secret_access_key = {secret} " + "y" * 30
    code = (
        "from mcp_zero.plugin import Plugin\n"
        "plugin = Plugin('shaped')\n"
        "@plugin.tool('shaped_get')\n"
        "def get(ctx, long=True):\n"
        f"    return {{'n': {value!r} if long else 'short ' + {secret[:8]!r}}}\n"
    )
    tool = {
        "name": "shaped_get",
        "description": "returns a string where a number is due",
        "inputSchema": {"type": "object"},
        "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    }
    runtime: Runtime = make_runtime()
    runtime.plugins.install(write_plugin(tmp_path / "shaped", "shaped", code, [tool]))
    await runtime.start()
    (runtime.settings.policy_dir / "default.cedar").unlink()
    use_policy(runtime, "redact.cedar", redacting("secret"))
    alice = Principal("alice", frozenset({"shaped"}))
    for rid, long in (("o1", True), ("o2", False)):
        with pytest.raises(McpZeroError) as caught, anyio.fail_after(TIMEOUT_S):
            await runtime.kernel.call_tool(
                alice, "shaped_get", {"long": long}, None, request_id=rid, transport="test"
            )
        shown = orjson.dumps([caught.value.message, caught.value.data]).decode()
        assert secret[-12:] not in shown, shown
        assert "outputSchema at /n" in caught.value.message
        kept = orjson.dumps(records(runtime, rid)).decode()
        assert secret[-12:] not in kept
    # a short message quotes the value whole, as before: it is what the redaction sees
    assert "is not of type" in caught.value.message
