"""The process runtime with real worker subprocesses (the misbehaving ``kit`` plugin)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import resource
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sandbox_support import KIT_DIR, RecordingBridge

from mcp_zero.audit import AuditLog
from mcp_zero.errors import (
    InvalidParams,
    ManifestError,
    PluginCrashed,
    PluginFailure,
    PluginLoadFailure,
    PromptNotFound,
    ResourceNotFound,
    ToolNotFound,
    ToolTimeout,
)
from mcp_zero.sandbox.isolation import landlock_abi
from mcp_zero.sandbox.manifest import load_manifest, parse_manifest
from mcp_zero.sandbox.ownership import worker_identity
from mcp_zero.sandbox.process import ProcessRuntime, _backoff
from mcp_zero.sandbox.stderr import BURST_LINES, LINES_PER_S, StderrBudget
from mcp_zero.sandbox.worker_process import (
    WorkerOutputs,
    WorkerProcess,
    spawn_failure,
    worker_outputs,
)
from mcp_zero.storage import AuditEntry, SqliteStore
from plugin_builders import write_plugin
from requires import require, require_root

pytestmark = pytest.mark.anyio
ANSWERS = {
    "sampling/createMessage": {"role": "assistant", "content": {"type": "text", "text": "42"}},
    "elicitation/create": {"action": "accept", "content": {"pick": "a"}},
}


async def call(rt, tool, args=None, *, bridge=None, timeout=5.0, agent="alice"):
    return await rt.call_tool(
        tool, args or {}, agent=agent, bridge=bridge or RecordingBridge(), timeout=timeout
    )


async def test_sync_tool_returns_text(make_runtime):
    rt = await make_runtime()
    assert await call(rt, "echo", {"text": "hey"}) == {"content": [{"type": "text", "text": "hey"}]}


async def test_async_tool_dict_becomes_structured_content(make_runtime):
    rt = await make_runtime()
    result = await call(rt, "aecho", {"text": "x"}, agent="bob")
    assert result["structuredContent"] == {"text": "x", "agent": "bob"}
    assert json.loads(result["content"][0]["text"]) == {"text": "x", "agent": "bob"}
    assert "isError" not in result


async def test_content_blocks_and_explicit_results(make_runtime):
    rt = await make_runtime()
    blocks = await call(rt, "blocks")
    assert [b["type"] for b in blocks["content"]] == ["text", "image", "text"]
    assert blocks["content"][1]["mimeType"] == "image/png"
    explicit = await call(rt, "explicit")
    assert explicit == {
        "content": [{"type": "text", "text": "partial"}],
        "structuredContent": {"n": 1},
        "isError": True,
    }


async def test_tool_errors_become_error_results_and_worker_stays(make_runtime):
    rt = await make_runtime()
    pid = rt.pids[0]
    refused = await call(rt, "fail", {"how": "tool"})
    assert refused == {"content": [{"type": "text", "text": "the tool refused"}], "isError": True}
    crashed = await call(rt, "fail", {"how": "other"})
    assert crashed["isError"] is True
    assert crashed["content"][0]["text"] == "KeyError: 'boom'"
    wrong_args = await call(rt, "echo", {"nope": 1})
    assert wrong_args["isError"] is True
    assert "TypeError" in wrong_args["content"][0]["text"]
    assert rt.pids == [pid]


async def test_async_tool_results_and_failures(make_runtime):
    rt = await make_runtime()
    pid = rt.pids[0]
    refused = await call(rt, "afail", {"how": "tool"})
    assert refused == {"content": [{"type": "text", "text": "the tool refused"}], "isError": True}
    crashed = await call(rt, "afail", {"how": "other"})
    assert crashed == {"content": [{"type": "text", "text": "KeyError: 'boom'"}], "isError": True}
    wrong = await call(rt, "afail", {"how": "object"})
    assert wrong["isError"] is True
    assert wrong["content"][0]["text"].startswith("TypeError: a tool cannot return object")
    unprintable = await call(rt, "afail", {"how": "unprintable"}, timeout=3)
    assert unprintable["isError"] is True
    assert unprintable["content"][0]["text"] == (
        "Unprintable: (its message could not be made: RuntimeError)"
    )
    number = await call(rt, "afail", {"how": "number"})
    assert number == {"content": [{"type": "text", "text": "7"}]}
    long = await call(rt, "afail", {"how": "long"})
    assert long["content"][0]["text"] == "x" * (1 << 20) + "y"
    assert "isError" not in long
    assert rt.pids == [pid]


@pytest.mark.parametrize("how", ["surrogate", "long_surrogate"])
async def test_an_async_tool_returning_text_that_is_no_utf8_gets_an_error_result(make_runtime, how):
    # A str with a lone surrogate killed the task before it answered: the call timed out
    # and the worker was killed as ignoring its cancel, with others' calls (found by review)
    rt = await make_runtime(cancel_grace=0.2)
    pid = rt.pids[0]
    with anyio.fail_after(3):
        result = await call(rt, "afail", {"how": how})
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("result is not JSON: ")
    assert "surrogate" in result["content"][0]["text"]
    assert (await call(rt, "whoami"))["structuredContent"]["pid"] == pid


@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("dict", "structuredContent.mean is nan"),
        ("structured", "structuredContent.bounds[1] is inf"),
        ("block", "content[0].annotations.priority is nan"),
        ("number", "the result is -inf"),
    ],
)
async def test_a_result_holding_nan_or_infinity_is_an_error_result(make_runtime, how, where):
    # JSON has no NaN: it was sent as "NaN" in the text block (not JSON) and null beside it
    rt = await make_runtime()
    pid = rt.pids[0]
    result = await call(rt, "not_finite", {"how": how})
    assert result["isError"] is True
    assert "structuredContent" not in result
    message = result["content"][0]["text"]
    assert message.startswith(f"TypeError: {where}, which JSON cannot express")
    assert (await call(rt, "echo"))["content"][0]["text"] == "hi"
    assert rt.pids == [pid]


async def test_unknown_tool_resource_prompt(make_runtime):
    rt = await make_runtime()
    b = RecordingBridge()
    with pytest.raises(ToolNotFound):
        await call(rt, "no_such_tool")
    with pytest.raises(ResourceNotFound):
        await rt.read_resource("kit://nothing", agent="a", bridge=b, timeout=5)
    with pytest.raises(ResourceNotFound, match="no item missing"):
        await rt.read_resource("kit://items/missing", agent="a", bridge=b, timeout=5)
    with pytest.raises(PromptNotFound):
        await rt.get_prompt("nope", {}, agent="a", bridge=b, timeout=5)
    with pytest.raises(InvalidParams):
        await rt.get_prompt("greet", {}, agent="a", bridge=b, timeout=5)


async def test_resources_prompts_completion(make_runtime):
    rt = await make_runtime()
    b = RecordingBridge()
    hello = await rt.read_resource("kit://hello", agent="carol", bridge=b, timeout=5)
    assert hello == {
        "contents": [{"uri": "kit://hello", "mimeType": "text/plain", "text": "hello carol"}]
    }
    item = await rt.read_resource("kit://items/a%20b", agent="a", bridge=b, timeout=5)
    assert item["contents"][0]["text"] == "item a b"
    prompt = await rt.get_prompt("greet", {"name": "Ann"}, agent="a", bridge=b, timeout=5)
    assert prompt == {
        "messages": [{"role": "user", "content": {"type": "text", "text": "Say hello to Ann"}}]
    }
    done = await rt.complete(
        {"type": "ref/prompt", "name": "greet"},
        {"name": "name", "value": "al"},
        None,
        agent="a",
        timeout=5,
    )
    assert done == {"completion": {"values": ["alice", "albert"], "total": 2, "hasMore": False}}
    nothing = await rt.complete(
        {"type": "ref/prompt", "name": "greet"},
        {"name": "other", "value": ""},
        None,
        agent="a",
        timeout=5,
    )
    assert nothing["completion"]["values"] == []


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("surrogate", "result is not JSON: str is not valid UTF-8"),
        ("object", "result is not JSON: "),
        ("text_int", "TypeError: a contents dict's 'text' must be a str, not int"),
        ("huge", "the result is over 40.0 MiB as JSON; it may be at most 32 MiB"),
        ("wrong_type", "TypeError: a resource handler returns str, bytes or a contents dict"),
    ],
)
async def test_a_resource_no_result_can_carry_is_the_plugins_failure(make_runtime, how, says):
    # It was answered with a tool's error result ({"content": [...], "isError": true}), which
    # clients refuse as a ReadResourceResult, or passed on ({"text": 5}), or made the
    # caller's InvalidParams (found by review)
    rt = await make_runtime()
    pid = rt.pids[0]
    uri = f"kit://unsendable/{how}"
    with pytest.raises(PluginFailure, match=re.escape(f"failed in resource '{uri}': {says}")):
        await rt.read_resource(uri, agent="a", bridge=RecordingBridge(), timeout=5)
    with pytest.raises(PluginFailure, match="result is not JSON: str is not valid UTF-8"):
        await rt.get_prompt("unsendable", {}, agent="a", bridge=RecordingBridge(), timeout=5)
    assert rt.pids == [pid]


async def test_slow_calls_overlap(make_runtime):
    rt = await make_runtime()
    for tool in ("slow_sync", "slow_async"):
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call, rt, tool, {"seconds": 0.4})
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, (
            f"{tool}: three 0.4 s calls took {elapsed:.2f} s, so they did not overlap"
        )


async def test_progress_log_and_requests_are_relayed_in_order(make_runtime):
    rt = await make_runtime()
    b = RecordingBridge(ANSWERS)
    result = await call(rt, "chatty", {"question": "meaning?"}, bridge=b)
    assert result["structuredContent"] == {
        "answer": ANSWERS["sampling/createMessage"],
        "choice": ANSWERS["elicitation/create"],
    }
    assert [kind for kind, _ in b.events] == [
        "progress",
        "log",
        "request",
        "progress",
        "request",
        "progress",
    ]
    assert b.events[0] == ("progress", (1, 3, "starting"))
    assert b.events[1] == ("log", ("info", {"asked": "meaning?"}, "kit"))
    method, params = b.events[2][1]
    assert method == "sampling/createMessage"
    assert params["messages"][0]["content"]["text"] == "meaning?"
    assert params["maxTokens"] == 10
    assert b.events[-1] == ("progress", (3, 3, "done"))


def test_a_worker_start_failing_for_want_of_open_files_says_so():
    # uvloop reported it as "[Errno -1] Unknown error -1" (found by review)
    unknown = OSError(-1, "Unknown error -1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, hard))
        assert spawn_failure(unknown).startswith("too many open files (")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert spawn_failure(unknown) == str(unknown)  # room enough: not that
    assert spawn_failure(FileNotFoundError(2, "No such file")) == "[Errno 2] No such file"


async def test_progress_and_logs_that_break_mcps_schema_are_not_relayed(make_runtime):
    # Frames written past the plugin API reached clients as progress "abc", a total of
    # {"x": 1}, level "bogus" (found by review): only what MCP's notifications carry goes
    rt = await make_runtime()
    b = RecordingBridge(ANSWERS)
    result = await call(rt, "forged_notes", bridge=b)
    assert result["content"][0]["text"] == "forged"
    assert b.events == [("progress", (1, 2, "real")), ("log", ("info", "real", None))]


async def test_progress_that_does_not_increase_is_not_relayed(make_runtime):
    # MCP: the progress value "MUST increase with each notification"; a plugin's 5, 3, 3
    # reached the client as sent (found by review)
    rt = await make_runtime()
    b = RecordingBridge(ANSWERS)
    result = await call(rt, "progress_steps", {"steps": [5, 3, 3, 7, 7.5, 7.5]}, bridge=b)
    assert result["content"][0]["text"] == "stepped"
    assert b.events == [("progress", (p, 10, None)) for p in (5, 7, 7.5)]


async def test_sync_handler_requests_and_client_errors(make_runtime):
    rt = await make_runtime()
    b = RecordingBridge(ANSWERS)
    result = await call(rt, "chatty_sync", {"question": "q"}, bridge=b)
    assert result["structuredContent"]["answer"] == ANSWERS["sampling/createMessage"]
    assert ("log", ("warning", "from a thread", None)) in b.events
    refusing = RecordingBridge()  # supports no client requests
    failed = await call(rt, "chatty_sync", {"question": "q"}, bridge=refusing)
    assert failed["isError"] is True
    assert "client does not support sampling/createMessage" in failed["content"][0]["text"]


async def test_crash_fails_the_call_and_the_next_call_gets_a_new_worker(make_runtime):
    rt = await make_runtime()
    first = rt.pids[0]
    with pytest.raises(PluginCrashed, match="exited with status 7"):
        await call(rt, "crash", {"status": 7})
    with anyio.fail_after(10):
        who = await call(rt, "whoami")
    assert who["structuredContent"]["pid"] != first


async def test_a_worker_dying_with_a_child_on_its_pipes_is_replaced(make_runtime):
    rt = await make_runtime()
    pid = rt.pids[0]
    with pytest.raises(PluginCrashed, match=r"status 7|leaving processes"):
        await call(rt, "fork_then_exit", timeout=10)
    # The child that held the pipes is killed with the group; a new worker serves the next call.
    assert await call(rt, "echo", {"text": "after"}, timeout=10) == {
        "content": [{"type": "text", "text": "after"}]
    }
    assert rt.pids
    assert rt.pids[0] != pid


async def test_a_worker_closing_its_stdout_and_running_on_is_replaced_at_once(tmp_path):
    # The server had the end of its pipe, yet the calls hung until the first one timed out,
    # then failed as if it had ignored a cancel (found by review)
    code = (
        "import os, time\nfrom mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('mute')\ndef mute(ctx):\n"
        "    os.close(ctx._channel._out_fd)\n    time.sleep(30)\n"
        "@plugin.tool('whoami')\ndef whoami(ctx): return {'pid': os.getpid()}\n"
    )
    d = _plugin(tmp_path, code, ["mute", "whoami"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    await rt.start()
    try:
        first = rt.pids[0]
        with anyio.fail_after(2), pytest.raises(PluginCrashed) as crashed:
            await call(rt, "mute", timeout=10)
        assert f"(pid {first}) was killed because it closed its stdout" in str(crashed.value)
        with anyio.fail_after(5):
            who = await call(rt, "whoami")
        assert who["structuredContent"]["pid"] != first
        assert not _running(first)
    finally:
        await rt.close()


async def test_segfault_is_reported_as_a_signal(make_runtime):
    rt = await make_runtime()
    with pytest.raises(PluginCrashed, match="SIGSEGV"):
        await call(rt, "segfault")
    assert (await call(rt, "echo"))["content"][0]["text"] == "hi"


async def test_crash_fails_other_calls_in_flight(make_runtime):
    rt = await make_runtime()
    errors: list[Exception] = []

    async def slow() -> None:
        try:
            await call(rt, "slow_async", {"seconds": 5})
        except PluginCrashed as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(PluginCrashed):
                await call(rt, "crash")
    assert len(errors) == 1


@pytest.mark.parametrize(
    ("timeout", "says"), [(0.997701, "1"), (0.2345, "0.23"), (0.3, "0.3"), (0.0312, "0.031")]
)
async def test_a_timeout_says_its_limit_rounded(make_runtime, timeout, says):
    # A limit left after queueing read "did not finish within 0.997701 s" (found by review)
    rt = await make_runtime()
    with pytest.raises(ToolTimeout, match=rf"did not finish within {re.escape(says)} s;"):
        await call(rt, "slow_async", {"seconds": 2}, timeout=timeout)


async def test_hung_sync_handler_times_out_and_worker_is_replaced(make_runtime, caplog):
    caplog.set_level(logging.WARNING, logger="mcp_zero.sandbox")
    rt = await make_runtime(cancel_grace=0.3)
    first = rt.pids[0]
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match=r"did not finish within 0\.3 s"):
        await call(rt, "hang_sync", timeout=0.3)
    assert time.monotonic() - started < 1.0
    with anyio.fail_after(10):
        while rt.pids == [first]:  # killed once the grace has passed
            await anyio.sleep(0.02)
        who = await call(rt, "whoami")
    assert who["structuredContent"]["pid"] != first
    # and logged, which it was not (only counted): found by review
    killed = [r.getMessage() for r in caplog.records if f"(pid {first})" in r.getMessage()]
    assert any("was killed because" in m and "ignored cancellation" in m for m in killed)


async def test_timeout_kill_fails_other_calls_on_that_worker(make_runtime):
    rt = await make_runtime(cancel_grace=0.2)

    async def hang() -> None:
        with pytest.raises(ToolTimeout):
            await call(rt, "hang_sync", timeout=0.3)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(PluginCrashed, match=r"hang_sync' ignored cancellation"):
                await call(rt, "slow_async", {"seconds": 5})


async def test_cancelled_async_handler_keeps_the_worker(make_runtime):
    rt = await make_runtime(cancel_grace=0.5)
    pid = rt.pids[0]
    with pytest.raises(ToolTimeout):
        await call(rt, "hang_async", timeout=0.2)
    with anyio.move_on_after(0.2):
        await call(rt, "hang_async")  # the caller gives up: cancellation, not a timeout
    with anyio.fail_after(5):
        assert (await call(rt, "echo"))["content"][0]["text"] == "hi"
        await anyio.sleep(0.6)  # past the grace: the worker must not have been killed
        assert (await call(rt, "whoami"))["structuredContent"]["pid"] == pid


async def test_a_cancelled_handler_that_runs_on_kills_no_other_call(make_runtime):
    # A plain handler slow to heed its cancel had the worker killed after the grace, and
    # the other calls on it failed, maybe other agents': one client's notifications/cancelled
    # could fail anyone's call (found by review). Its call's hold on the plugin lasts until
    # the handler has ended.
    rt = await make_runtime(cancel_grace=0.1)
    pid = rt.pids[0]
    bridge = RecordingBridge()
    with anyio.fail_after(10):
        stubborn = asyncio.ensure_future(call(rt, "stubborn", bridge=bridge))
        while ("progress", (1, None, None)) not in bridge.events:  # it runs
            await anyio.sleep(0.01)
        stubborn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stubborn
        # past the grace: the worker serves on
        assert await call(rt, "slow_async", {"seconds": 0.4}, agent="bob") == {
            "content": [{"type": "text", "text": "slept"}]
        }
        assert bridge.events[-1] == ("handler_runs_on", None)  # (it still runs)
        (rt.data_dir / "gate").touch()
        while bridge.events[-1] != ("handler_ended", None):
            await anyio.sleep(0.01)
    assert rt.pids == [pid]


async def test_a_cancelled_handler_that_runs_past_its_time_limit_is_killed(make_runtime, caplog):
    caplog.set_level(logging.WARNING, logger="mcp_zero.sandbox")
    rt = await make_runtime(cancel_grace=0.1)
    first = rt.pids[0]
    bridge = RecordingBridge()
    with anyio.fail_after(10):
        with anyio.move_on_after(0.1):  # its caller gives up
            await call(rt, "hang_sync", bridge=bridge, timeout=0.4)
        while rt.pids == [first]:  # killed once its time limit and the grace have passed
            await anyio.sleep(0.02)
    assert bridge.events == [("handler_runs_on", None), ("handler_ended", None)]
    killed = [r.getMessage() for r in caplog.records if f"(pid {first})" in r.getMessage()]
    assert any(
        "hang_sync' was cancelled and still ran 0.1 s past its time limit (0.4 s)" in m
        for m in killed
    )


async def test_a_call_cancelled_before_its_handler_started_is_answered(make_runtime):
    # A call_tool frame and its cancel frame read at once: the task was cancelled before
    # its first step, its handler never ran, nothing answered, and the worker was killed
    # as ignoring the cancel, failing every other call on it (found by review)
    rt = await make_runtime(cancel_grace=1.0)
    pid = rt.pids[0]

    async def frozen() -> None:
        result = await call(rt, "freeze_loop", {"seconds": 0.4})
        assert result["content"][0]["text"] == "thawed"

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(frozen)
            await anyio.sleep(0.05)  # the worker's loop is blocked: frames wait unread
            with pytest.raises(ToolTimeout):
                await call(rt, "hang_async", timeout=0.05)  # and its cancel, behind it
        await anyio.sleep(1.2)  # past the grace
        assert (await call(rt, "whoami"))["structuredContent"]["pid"] == pid


async def test_plugin_output_does_not_corrupt_the_protocol(make_runtime, caplog):
    caplog.set_level(logging.INFO, logger="mcp_zero.sandbox.plugin.kit")
    rt = await make_runtime()
    assert (await call(rt, "noisy"))["content"][0]["text"] == "still fine"
    assert (await call(rt, "echo", {"text": "after"}))["content"][0]["text"] == "after"
    with anyio.fail_after(5):
        while "noise written to fd 1" not in caplog.text:
            await anyio.sleep(0.01)
    assert "noise from print()" in caplog.text


async def test_a_result_over_the_frame_limit_is_an_error_result(make_runtime):
    rt = await make_runtime()
    first = rt.pids[0]
    # 20 MB of text: orjson would crash a 256 MB worker reserving room for it (SIGSEGV)
    assert (await call(rt, "huge", {"mb": 20}))["content"][0]["text"] == "x" * (20 << 20)
    too_big = await call(rt, "huge", {"mb": 40})
    assert too_big["isError"] is True
    says = "the result is over 40.0 MiB as JSON; it may be at most 32 MiB"
    assert too_big["content"][0]["text"] == says
    assert rt.pids == [first]  # (refused before it was encoded: no memory went to it)
    # built, but no room to encode it: 30 MiB of control characters, 6 bytes each as JSON
    no_room = await call(rt, "huge", {"mb": 30, "char": "\x01"})
    assert no_room["isError"] is True
    assert no_room["content"][0]["text"].startswith(
        "MemoryError: no room to encode the result; the plugin reached its memory quota (256 MiB"
    )
    with anyio.fail_after(10):
        who = await call(rt, "whoami")
    assert who["structuredContent"]["pid"] != first  # replaced after its MemoryError


@pytest.mark.parametrize("kind", ["log", "progress", "resource_updated", "elicit"])
async def test_a_notification_or_request_over_its_limit_fails_the_handler_not_the_worker(
    make_runtime, kind
):
    # orjson crashed the 256 MB worker reserving room for a 20 MiB log line (SIGSEGV), and
    # with it every other agent's call on that worker (found by review)
    rt = await make_runtime()
    first = rt.pids[0]
    b = RecordingBridge()
    mb = 40 if kind == "elicit" else 20  # (a request, as a result, may be up to 32 MiB)
    text = (await call(rt, "loud", {"kind": kind, "mb": mb}, bridge=b))["content"][0]["text"]
    assert text.startswith("ValueError: "), text[:200]
    limit = "32 MiB" if kind == "elicit" else "1 MiB"
    assert f"over {mb}.0 MiB as JSON" in text
    assert f"may be at most {limit}" in text
    assert b.events == []
    assert rt.pids == [first]


async def test_a_log_under_its_limit_from_a_worker_short_of_memory_does_not_crash_it(
    make_runtime,
):
    # 200,000 emoji (800 KB as JSON, under the 1 MiB limit) went to orjson, which crashed
    # the worker (SIGSEGV) reserving room for them with 8 MiB of its quota left: only
    # strings over a million characters went to the stdlib (found by review)
    rt = await make_runtime()
    first = rt.pids[0]
    b = RecordingBridge()
    text = (await call(rt, "crowded_log", {"free_mb": 8, "chars": 200_000}, bridge=b))["content"][
        0
    ]["text"]
    assert text == "logged" or text.startswith("MemoryError"), text[:200]
    assert rt.pids == [first]


async def test_a_request_under_the_frame_limit_reaches_the_client(make_runtime):
    rt = await make_runtime()
    first = rt.pids[0]
    b = RecordingBridge()  # which supports no request
    text = (await call(rt, "loud", {"kind": "elicit", "mb": 20}, bridge=b))["content"][0]["text"]
    assert text == "ClientRequestError: client does not support elicitation/create"
    [(kind, (method, params))] = b.events
    assert (kind, method) == ("request", "elicitation/create")
    assert len(params["message"]) == 20 << 20
    assert rt.pids == [first]


async def test_a_notification_over_its_limit_is_not_relayed(make_runtime, caplog):
    rt = await make_runtime()
    first = rt.pids[0]
    b = RecordingBridge()
    result = await call(rt, "forged_loud_log", {"mb": 2}, bridge=b)
    assert result["content"][0]["text"] == "forged"
    assert b.events == []
    assert "sent a log frame of 2097" in caplog.text
    assert rt.pids == [first]


@pytest.mark.parametrize("room_mb", [45, 120])  # no room to assemble the frame; to parse it
def test_a_server_out_of_memory_reading_a_result_fails_the_call_not_the_worker(tmp_path, room_mb):
    script = Path(__file__).parent / "short_of_memory.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(room_mb), "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["huge"].startswith("McpZeroError: tool 'huge' of plugin 'kit' failed: mcp0 serve")
    assert "ran out of memory reading the 31457337 bytes the plugin sent" in out["huge"]
    assert out["same_worker"] is True  # not killed as breaking the protocol
    assert "broke the protocol" not in done.stderr
    assert "out of memory reading a frame of 31457337 bytes" in done.stderr


async def test_a_worker_flooding_its_pipe_is_killed_at_the_frame_limit(make_runtime):
    rt = await make_runtime()
    first = rt.pids[0]
    with pytest.raises(PluginCrashed, match=r"sent a frame over 32 MiB.*restarted"):
        await call(rt, "flood", {"mb": 48})
    with anyio.fail_after(10):
        who = await call(rt, "whoami")
    assert who["structuredContent"]["pid"] != first


DROPPED = re.compile(r"(\d+) lines \((\d+) bytes\) dropped")


def stderr_seen(caplog, prefix):
    """The kit's stderr lines logged (those starting with ``prefix``), and the lines and
    bytes the log says were dropped."""
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    reports = [DROPPED.search(r.getMessage()) for r in caplog.records]
    dropped = [(int(m[1]), int(m[2])) for m in reports if m]
    return logged, sum(n for n, _ in dropped), sum(b for _, b in dropped), len(dropped)


async def test_a_plugin_writing_stderr_in_a_loop_is_logged_within_its_budget(make_runtime, caplog):
    caplog.set_level(logging.INFO, logger="mcp_zero.sandbox.plugin.kit")
    rt = await make_runtime()
    started = time.monotonic()
    assert (await call(rt, "spew", {"lines": 50_000}))["content"][0]["text"] == "spewed"

    def accounted() -> int:
        logged, dropped, _, _ = stderr_seen(caplog, "spew ")
        return len(logged) + dropped

    with anyio.fail_after(10):
        while accounted() < 50_000:
            await anyio.sleep(0.05)
    elapsed = time.monotonic() - started
    logged, dropped, _, reports = stderr_seen(caplog, "spew ")
    assert len(logged) + dropped == 50_000  # each line is logged or counted, none twice
    assert logged[: BURST_LINES - 5] == [f"spew {i}" for i in range(BURST_LINES - 5)]
    assert len(logged) <= BURST_LINES + LINES_PER_S * elapsed + 1
    assert 1 <= reports <= elapsed / 1.0 + 2  # about one report a second while it drops
    assert (await call(rt, "echo", {"text": "after"}))["content"][0]["text"] == "after"


async def test_stderr_without_newlines_is_logged_in_pieces(make_runtime, caplog):
    caplog.set_level(logging.INFO, logger="mcp_zero.sandbox.plugin.kit")
    rt = await make_runtime()
    assert (await call(rt, "shout", {"mb": 1}))["content"][0]["text"] == "shouted"

    def accounted() -> int:
        logged, _, dropped_bytes, _ = stderr_seen(caplog, "y")
        return sum(len(p) for p in logged) + dropped_bytes

    with anyio.fail_after(10):
        while accounted() < (1 << 20) - (8 << 10):  # the last piece may wait for more
            await anyio.sleep(0.01)
    pieces = stderr_seen(caplog, "y")[0]
    assert max(len(p) for p in pieces) == 8 << 10  # never one 1 MiB line held and logged
    assert accounted() <= 1 << 20
    assert (await call(rt, "echo", {"text": "after"}))["content"][0]["text"] == "after"


async def test_a_plugin_flooding_stderr_costs_the_server_no_work_per_line(
    make_runtime, caplog, monkeypatch
):
    # Each line of a flood of short ones was cut out and passed to the budget, which dropped
    # it: the server's loop was kept busy, and every plugin's calls slowed 10-20 times (found
    # by review). Past the budget the rest is counted, and the pipe is read with pauses.
    caplog.set_level(logging.INFO, logger="mcp_zero.sandbox.plugin.kit")
    handled = [0]
    emit = StderrBudget.emit

    def counted(budget: StderrBudget, raw: bytes) -> bool:
        handled[0] += 1
        return emit(budget, raw)

    monkeypatch.setattr(StderrBudget, "emit", counted)
    rt = await make_runtime()
    written = int((await call(rt, "yes", {"seconds": 0.5}))["content"][0]["text"])

    def accounted() -> int:
        logged, dropped, _, _ = stderr_seen(caplog, "y")
        return len(logged) + dropped

    with anyio.fail_after(5):
        while accounted() < written // 2:
            await anyio.sleep(0.05)
    assert accounted() == written // 2  # each "y" line logged or counted
    assert handled[0] < written // 200  # not one by one
    assert written < 4 << 20  # its writes waited while its stderr was not read


async def test_a_crash_after_a_stderr_flood_is_reported_with_its_last_lines(make_runtime, caplog):
    # Read with pauses, the flood's end was still unread when the worker died: the report
    # quoted lines from before it (found by review)
    caplog.set_level(logging.INFO, logger="mcp_zero.sandbox.plugin.kit")
    rt = await make_runtime()
    with pytest.raises(PluginCrashed):
        await call(rt, "flood_then_crash", {"kb": 512})
    [report] = [r.getMessage() for r in caplog.records if "its last stderr:" in r.getMessage()]
    assert report.endswith("LAST-WORDS-1 | LAST-WORDS-2 | LAST-WORDS-3")


async def test_memory_limit_fails_cleanly_and_worker_is_replaced(make_runtime):
    rt = await make_runtime()
    first = rt.pids[0]
    result = await call(rt, "alloc", {"mb": 1024})  # the kit's limit is 256 MB
    assert result["isError"] is True
    # It said "MemoryError: ", nothing more (found by review)
    assert result["content"][0]["text"] == (
        "MemoryError: the plugin reached its memory quota (256 MiB of address space): raise "
        "quotas.memory_mb in its plugin.json, or make it use less"
    )
    with anyio.fail_after(10):
        who = await call(rt, "whoami")
    assert who["structuredContent"]["pid"] != first
    assert (await call(rt, "alloc", {"mb": 16}))["content"][0]["text"] == f"allocated {16 << 20}"


async def test_worker_is_confined(make_runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("MCP0_TEST_SECRET", "do-not-leak")
    rt = await make_runtime()
    who = (await call(rt, "whoami", agent="dora"))["structuredContent"]
    assert who["agent"] == "dora"
    assert who["cwd"] == who["data_dir"] == str(rt.data_dir)
    assert "MCP0_TEST_SECRET" not in who["env"]
    assert who["pgid"] == who["pid"]  # its own process group
    assert oct(os.stat(rt.data_dir).st_mode & 0o777) == "0o700"


async def test_network_is_cut_when_not_granted(make_runtime):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        rt = await make_runtime()
        result = await call(rt, "connect", {"port": port})
        if rt.network_isolated:
            assert result["isError"] is True
            assert "no network" in result["content"][0]["text"]
        else:
            # Root can always unshare (CI runs as root): only an unprivileged user on a host
            # without user namespaces gets here, where the documented fallback holds — the
            # worker runs with the network and the runtime says so.
            assert os.geteuid() != 0, "as root the worker must get its own network namespace"
            assert result["content"][0]["text"] == "connected"


def _server_layout(tmp_path: Path, filesystem: str = "private") -> tuple[Path, Path, Path]:
    """A server data dir with a secret, the kit's copy and data dir inside it, as
    `mcp0 serve` lays them out; returns (server dir, plugin copy, plugin data dir)."""
    server = tmp_path / "server"
    copy = server / "plugins" / "kit" / "1.0.0-x"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    manifest = json.loads((copy / "plugin.json").read_text())
    manifest["capabilities"]["filesystem"] = filesystem
    (copy / "plugin.json").write_text(json.dumps(manifest))
    (server / "admin.token").write_text("secret")
    (server / "mcp0.db").write_bytes(b"SQLite format 3\x00")
    return server, copy, server / "plugin-data" / "kit"


async def test_a_worker_reaches_only_its_own_files(tmp_path, open_dir):
    server, copy, data = _server_layout(tmp_path)
    elsewhere = open_dir / "elsewhere.txt"  # where Landlock, not the mount view, keeps it out
    elsewhere.write_text("not the plugin's")
    # a service of the same user on a socket file (tmux, ssh-agent, Docker): through it, a
    # plugin would act outside its sandbox
    service = socket.socket(socket.AF_UNIX)
    service.bind(str(tmp_path / "service.sock"))
    service.listen()
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        reached = (
            await call(
                rt,
                "reach",
                {
                    "read": [
                        str(copy / "plugin.json"),  # its own code
                        "/etc/passwd",  # the system's settings
                        str(server / "admin.token"),  # the server's secrets
                        str(server / "mcp0.db"),
                        str(elsewhere),  # anything else the server's user can read
                        "/etc/shadow",  # root's own, where a worker may read
                    ],
                    "write": [str(data / "own.txt"), str(tmp_path / "new.txt")],
                    "signal": [os.getpid()],  # the server
                    "modules": ["fractions", "sqlite3"],  # imports after confinement
                    "unix": [str(tmp_path / "service.sock")],
                    "keyring": True,
                    "io_uring": True,
                },
            )
        )["structuredContent"]
    finally:
        await rt.close()
        service.close()
    confined = landlock_abi() >= 1
    assert rt.syscalls_restricted is True  # (x86_64 and aarch64: CI's machines)
    assert reached[f"unix {tmp_path / 'service.sock'}"] == "PermissionError"
    assert reached["keyring"] == "PermissionError"
    # io_uring makes sockets (IORING_OP_SOCKET) without the socket() the filter sees
    assert reached["io_uring"] == "PermissionError"
    assert rt.files_confined is confined
    allowed = [
        "read " + str(copy / "plugin.json"),
        "read /etc/passwd",
        "write " + str(data / "own.txt"),
    ]
    assert all(reached[key] == "ok" for key in allowed), reached
    assert reached["import fractions"] == reached["import sqlite3"] == "ok"
    denied = [
        f"read {server / 'admin.token'}",
        f"read {server / 'mcp0.db'}",
        f"read {elsewhere}",
        f"write {tmp_path / 'new.txt'}",
    ]
    if confined:
        # The server's files are not there at all in the worker's mounts; elsewhere, what
        # is read-only there and what Landlock refuses
        covered = "FileNotFoundError" if rt.mounts_confined else "PermissionError"
        assert {k: reached[k] for k in denied} == {
            denied[0]: covered,
            denied[1]: covered,
            denied[2]: "PermissionError",
            denied[3]: "OSError" if rt.mounts_confined else "PermissionError",  # EROFS
        }
        assert not (tmp_path / "new.txt").exists()
    else:  # the documented fallback: a kernel without Landlock confines nothing
        assert all(reached[key] == "ok" for key in denied), reached
    if worker_identity() is not None and os.path.exists("/etc/shadow"):
        # root's files are not a root server's workers': they run as nobody, in no group
        assert reached["read /etc/shadow"] == "PermissionError"
    # the server: refused by Landlock from ABI 6, and by the worker's seccomp filter anyway
    assert reached[f"signal {os.getpid()}"] == "PermissionError"


def _sysv_segments() -> set[int]:
    """The keys of the System V shared memory segments this process's IPC namespace holds."""
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


async def test_a_worker_s_system_v_shared_memory_is_its_own_and_within_its_quota(make_runtime):
    # A segment's pages count against no address space once detached, and outlive their
    # maker: a plugin of 256 MiB left 400 MiB of them on the host after its worker had gone,
    # for every other plugin to find by their key (found by a bug hunt)
    first, second = await make_runtime(), await make_runtime()
    require(first.mounts_confined, "its worker has no mount view here")
    key = 0x6D30_0000 + os.getpid() % 0xFFFF
    assert await call(first, "sysv_shm", {"key": key, "mb": 8}) == {
        "content": [{"type": "text", "text": "ok"}]
    }
    assert key not in _sysv_segments()  # not the host's, nor any other process's
    found = await call(second, "sysv_shm", {"key": key})
    assert found["content"][0]["text"] == "ENOENT"  # another plugin's worker: not there
    # (a root server's workers, which may set their namespace's limits: as their /dev/shm)
    if os.geteuid() == 0:
        over = await call(first, "sysv_shm", {"key": key + 1, "mb": 257})
        assert over["content"][0]["text"] == "EINVAL"  # one segment over it
        made = [
            (await call(first, "sysv_shm", {"key": key + 2 + i, "mb": 40}))["content"][0]["text"]
            for i in range(7)
        ]
        assert made == ["ok"] * 6 + ["ENOSPC"]  # 8 + 6 * 40 MiB, and no more


def _mounted_at(path: Path) -> bool:
    """Whether a mount of this process's namespace has ``path`` for its mount point."""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return str(path) in points


async def test_a_worker_can_change_no_file_but_its_own_nor_see_the_servers(tmp_path, open_dir):
    # Landlock does not govern chmod, utime, xattrs or stat: the worker's own mount view does
    server, copy, data = _server_layout(tmp_path)
    (server / "admin.token").chmod(0o600)
    outside = open_dir / "outside.txt"  # a file of the workers' own user
    outside.write_text("the worker user's")
    outside.chmod(0o600)
    if worker_identity() is not None:
        os.chown(outside, *worker_identity())
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        own = data / "own.txt"
        await call(rt, "reach", {"write": [str(own)]})
        paths = [str(server / "admin.token"), str(outside), str(own), "/etc/hostname"]
        reached = (await call(rt, "reach", {"chmod": paths, "stat": paths}))["structuredContent"]
        # its own /proc: the server (and any process it may not trace) is not there
        procs = [f"/proc/{os.getpid()}", f"/proc/{os.getppid()}", "/proc/self/status"]
        seen = (await call(rt, "reach", {"stat": procs}))["structuredContent"]
        who = (await call(rt, "whoami"))["structuredContent"]
    finally:
        await rt.close()
    assert rt.mounts_confined is True  # (root here, and CI; test_isolation runs it unprivileged)
    assert rt.sandbox["processes_hidden"] is True  # (root: unprivileged, it keeps the host's)
    assert seen[f"stat /proc/{os.getpid()}"] == seen[f"stat /proc/{os.getppid()}"] == "ENOENT"
    assert seen["stat /proc/self/status"] == "ok"
    assert reached[f"chmod {server / 'admin.token'}"] == "ENOENT"  # the data dir is covered
    assert reached[f"stat {server / 'admin.token'}"] == "ENOENT"
    assert reached[f"chmod {outside}"] == reached["chmod /etc/hostname"] == "EROFS"
    assert reached[f"stat {outside}"] == "ok"  # (Landlock keeps it from being read)
    assert reached[f"chmod {own}"] == reached[f"stat {own}"] == "ok"
    assert who["cwd"] == str(data)  # its data dir, put back under the cover
    identity = worker_identity()  # a root server's workers are nobody
    assert (who["uid"], who["gid"]) == (identity or (os.getuid(), os.getgid()))
    if identity is not None:
        assert who["groups"] == []
    # none held, none that could come back (the bounding set is emptied before the switch)
    assert set(who["capabilities"].values()) == {"0000000000000000"}, who["capabilities"]
    assert rt.sandbox["unprivileged"] is True
    assert oct((server / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert oct(outside.stat().st_mode & 0o777) == "0o600"
    assert oct(own.stat().st_mode & 0o777) == "0o666"
    assert not _mounted_at(server)  # none of it reached the server's own mounts


async def test_a_plugin_without_filesystem_writes_nowhere(tmp_path):
    server, copy, data = _server_layout(tmp_path, filesystem="none")
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        shm = f"/dev/shm/mcp0-test-{os.getpid()}"
        writes = {"write": [str(data / "own.txt"), shm]}
        reached = (await call(rt, "reach", writes))["structuredContent"]
    finally:
        await rt.close()
    if rt.mounts_confined:  # its data dir is under the cover, /dev/shm read-only
        assert reached[f"write {data / 'own.txt'}"] == "FileNotFoundError"
        assert reached[f"write {shm}"] == "OSError"  # EROFS: no scratch shared with others
    else:
        expected = "PermissionError" if landlock_abi() >= 1 else "ok"
        assert reached[f"write {data / 'own.txt'}"] == expected
        assert reached[f"write {shm}"] == expected
    assert not os.path.exists(shm)


async def test_network_kept_when_granted(make_runtime, tmp_path):
    granted = tmp_path / "granted"
    shutil.copytree(KIT_DIR, granted)
    manifest = json.loads((granted / "plugin.json").read_text())
    manifest["capabilities"]["network"] = True
    (granted / "plugin.json").write_text(json.dumps(manifest))
    with socket.create_server(("127.0.0.1", 0)) as server:
        rt = await make_runtime(granted)
        assert rt.network_isolated is False
        result = await call(rt, "connect", {"port": server.getsockname()[1]})
        assert result["content"][0]["text"] == "connected"


async def test_calls_spread_over_workers(make_runtime, tmp_path):
    two = tmp_path / "two"
    shutil.copytree(KIT_DIR, two)
    manifest = json.loads((two / "plugin.json").read_text())
    manifest["quotas"]["workers"] = 2
    (two / "plugin.json").write_text(json.dumps(manifest))
    rt = await make_runtime(two)
    assert len(rt.pids) == 2
    seen: set[int] = set()

    async def who() -> None:
        seen.add((await call(rt, "whoami"))["structuredContent"]["pid"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, rt, "slow_async", {"seconds": 0.3})
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(who)
    assert seen
    assert seen <= set(rt.pids)
    assert len(seen) == 1


def _plugin(tmp_path: Path, code: str, tools: list[str], **manifest: Any) -> Path:
    return write_plugin(
        tmp_path / "broken", "broken", code, tools, **{"version": "1.0", **manifest}
    )


async def test_import_error_is_a_clear_start_failure(tmp_path):
    d = _plugin(tmp_path, "import no_such_module_here\n", ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with (
        anyio.fail_after(20),
        pytest.raises(PluginLoadFailure, match="No module named 'no_such_module_here'"),
    ):
        await rt.start()
    # no new start can load it: not tried again (a new install is)
    with pytest.raises(PluginFailure, match="runtime is closed"):
        await call(rt, "x")


async def test_an_import_out_of_memory_says_which_quota_it_reached(tmp_path):
    d = _plugin(tmp_path, "x = bytearray(400 << 20)\n", ["x"])  # (its quota: 256 MiB)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    says = "failed to load: MemoryError: the plugin reached its memory quota (256 MiB of "
    with anyio.fail_after(20), pytest.raises(PluginLoadFailure, match=re.escape(says)):
        await rt.start()


# Its first worker, as it loads, is killed (as by the OOM killer), or takes too long to be ready
FIRST_START = {
    "killed": "os.kill(os.getpid(), signal.SIGKILL)",
    "slow": "time.sleep(30)",
}


@pytest.mark.parametrize(("how", "says"), [("killed", "SIGKILL while"), ("slow", "not ready")])
async def test_a_worker_whose_start_failed_once_is_started_again(tmp_path, caplog, how, says):
    # Its plugin stayed failed until it was reinstalled, or the server restarted (found by
    # review)
    code = (
        "import os, pathlib, signal, time\nfrom mcp_zero.plugin import Plugin\n"
        "first = pathlib.Path('started-once')\n"  # (in its data dir, its cwd)
        f"if not first.exists():\n    first.touch()\n    {FIRST_START[how]}\n"
        "plugin = Plugin()\n@plugin.tool('x')\ndef x(ctx): return 'x'\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data", start_timeout=1.0)
    try:
        with anyio.fail_after(10), pytest.raises(PluginFailure) as failed:
            await rt.start()
        assert says in str(failed.value)
        assert str(failed.value).endswith(" (started again in 0.05 s)")
        assert str(failed.value) in caplog.messages
        with anyio.fail_after(10):
            assert (await call(rt, "x"))["content"] == [{"type": "text", "text": "x"}]
        assert rt.start_failure is None
    finally:
        await rt.close()


@pytest.mark.parametrize("failures", [1, 2, 6, 1024, 1025, 10**6])
def test_the_restart_backoff_doubles_up_to_its_longest_however_many_failures(
    failures: int,
) -> None:
    # 1,025 deaths in a row (a plugin crashing on every call, called for 40 minutes) made
    # it an OverflowError, every later call's failure, until a restart (found by review)
    assert _backoff(failures, 2.0) == min(0.05 * 2 ** min(failures - 1, 10), 2.0)
    assert _backoff(failures, 0.0) == 0.0


async def test_a_worker_whose_start_always_fails_is_started_again_only_for_calls(tmp_path):
    code = (
        "import os, signal\n"
        "with open('starts', 'a') as starts: starts.write('.')\n"  # (in its data dir)
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    # (backing off to 10 ms at most: the test's time)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data", max_restart_backoff_s=0.01)
    starts = tmp_path / "data" / "starts"
    try:
        with anyio.fail_after(10), pytest.raises(PluginFailure, match=r"started again in 0\.01 s"):
            await rt.start()
        with anyio.fail_after(20):
            while "started again by the next call" not in (rt.start_failure or ""):
                await asyncio.sleep(0.02)
        assert "failed 6 times in a row" in rt.start_failure
        assert starts.read_text() == "." * 6
        with anyio.fail_after(10), pytest.raises(PluginFailure, match="failed 7 times"):
            await call(rt, "x")
        assert starts.read_text() == "." * 7
    finally:
        await rt.close()


async def test_an_entry_module_the_worker_has_imported_already_is_a_clear_start_failure(
    tmp_path,
):
    # Its import gave the worker's module: "module has no attribute 'plugin'" (found by
    # review). (Installing refuses this name: here the manifest skips that check.)
    d = _plugin(tmp_path, "raise SystemExit('its own orjson was imported')\n", ["x"])
    (d / "broken_plugin.py").rename(d / "orjson.py")
    manifest = parse_manifest(
        {**json.loads((d / "plugin.json").read_text()), "entry": "orjson:plugin"}
    )
    rt = ProcessRuntime(manifest, d, tmp_path / "data")
    with (
        anyio.fail_after(20),
        pytest.raises(
            PluginFailure,
            match=r"module 'orjson', which the manifest's entry 'orjson:plugin' names, is one "
            r"the worker has imported already \(its Python's, not the plugin's\)",
        ),
    ):
        await rt.start()


async def test_worker_dying_at_start_is_reported_with_its_stderr(tmp_path):
    d = _plugin(
        tmp_path, "import os, sys\nprint('dying now', file=sys.stderr)\nos._exit(4)\n", ["x"]
    )
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with (
        anyio.fail_after(20),
        pytest.raises(PluginFailure, match=r"status 4 while starting.*dying now"),
    ):
        await rt.start()


# What a plugin's import may do to claim a sandbox it lacks: rewrite the frames the worker
# sends after it, or write one of its own to the protocol pipe.
_REWRITES_ITS_READY_FRAME = """
import __main__
from mcp_zero.plugin import Plugin
from mcp_zero.sandbox.isolation import MEASURES

_send = __main__.Worker.send


def send(self, frame):
    if frame.get("op") == "ready":
        frame["sandbox"] = dict.fromkeys(MEASURES, True)
    return _send(self, frame)


__main__.Worker.send = send
plugin = Plugin("broken")
plugin.tool("x")(lambda ctx: "x")
"""
_WRITES_A_CONFINED_FRAME = """
import fcntl, json, os, stat
from mcp_zero.plugin import Plugin
from mcp_zero.sandbox.isolation import MEASURES

for fd in map(int, os.listdir("/proc/self/fd")):
    try:
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        written = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
    except OSError:
        continue
    if fd > 2 and pipe and written:  # the protocol pipe
        frame = {"op": "confined", "sandbox": dict.fromkeys(MEASURES, True)}
        os.write(fd, json.dumps(frame).encode() + b"\\n")
plugin = Plugin("broken")
plugin.tool("x")(lambda ctx: "x")
"""


async def test_a_plugin_cannot_rewrite_the_report_of_its_sandbox(tmp_path):
    # The worker reported its sandbox in its ready frame, sent after the plugin's code ran:
    # a plugin with the network claimed network_isolated in the admin API (found by review)
    d = _plugin(tmp_path, _REWRITES_ITS_READY_FRAME, ["x"])
    manifest = json.loads((d / "plugin.json").read_text())
    manifest["capabilities"] = {"network": True}
    (d / "plugin.json").write_text(json.dumps(manifest))
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with anyio.fail_after(20):
        await rt.start()
    try:
        assert rt.sandbox["network_isolated"] is False
        assert rt.network_isolated is False
    finally:
        await rt.close()


async def test_a_plugin_sending_a_sandbox_report_of_its_own_is_refused(tmp_path):
    d = _plugin(tmp_path, _WRITES_A_CONFINED_FRAME, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with (
        anyio.fail_after(20),
        pytest.raises(PluginFailure, match=r"broke the frame protocol \(unexpected confined"),
    ):
        await rt.start()


async def test_code_and_manifest_must_agree(tmp_path):
    code = (
        "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('y')\ndef y(ctx): return 'y'\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with (
        anyio.fail_after(20),
        pytest.raises(ManifestError, match=r"declared but not registered: \['x'\]"),
    ):
        await rt.start()


async def test_a_difference_names_only_what_differs(tmp_path):
    code = (
        "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('x')\ndef x(ctx): return 'x'\n"
        "@plugin.tool('y')\ndef y(ctx): return 'y'\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with anyio.fail_after(20), pytest.raises(ManifestError) as info:
        await rt.start()
    assert info.value.message.endswith("differ (registered but not declared: ['y'])")


async def test_code_and_manifest_spelling_one_uri_otherwise_agree(tmp_path):
    # the manifest's mem://b/%61bc is the code's mem://b/abc: the plugin never started
    code = (
        "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.resource('mem://b/abc')\ndef abc(ctx): return 'abc'\n"
        "@plugin.resource_template('mem://b/%7Eu/{id}')\ndef u(ctx, id): return id\n"
    )
    d = _plugin(
        tmp_path,
        code,
        [],
        resources=[{"uri": "mem://b/%61bc", "name": "abc"}],
        resourceTemplates=[{"uriTemplate": "mem://b/~u/{id}", "name": "u"}],
    )
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    try:
        with anyio.fail_after(20):
            await rt.start()
            read = await rt.read_resource(
                "mem://b/abc", agent="a", bridge=RecordingBridge(), timeout=5
            )
        assert read["contents"][0]["text"] == "abc"
    finally:
        await rt.close()


_MIME_CODE = (
    "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
    "@plugin.resource('mem://m/a', mime_type={a!r})\ndef a(ctx): return '{{}}'\n"
    "@plugin.resource_template('mem://m/t/{{x}}')\ndef t(ctx, x): return '{{}}'\n"
)
_MIME_MANIFEST = {
    "resources": [{"uri": "mem://m/a", "name": "a", "mimeType": "application/json"}],
    "resourceTemplates": [{"uriTemplate": "mem://m/t/{x}", "name": "t", "mimeType": "text/csv"}],
}


async def test_reads_give_the_mime_type_the_manifest_lists(tmp_path):
    # a template listed as text/csv was read as text/plain (found by review)
    d = _plugin(tmp_path, _MIME_CODE.format(a=None), [], **_MIME_MANIFEST)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    try:
        with anyio.fail_after(20):
            await rt.start()
            types = []
            for uri in ("mem://m/a", "mem://m/t/1"):
                read = await rt.read_resource(uri, agent="a", bridge=RecordingBridge(), timeout=5)
                types.append(read["contents"][0]["mimeType"])
        assert types == ["application/json", "text/csv"]
    finally:
        await rt.close()


async def test_a_plugin_of_many_resources_with_mime_types_starts(tmp_path):
    # The types went to the worker in one environment variable, which Linux caps at 128 KiB:
    # 16 templates 8 KiB long, or 1,500 resources, and no worker ever started (found by
    # review)
    templates = [f"mem://m/{'x' * 8000}{n}/{{v}}" for n in range(20)]
    code = "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n" + "".join(
        f"@plugin.resource_template({t!r})\ndef t{n}(ctx, v): return v\n"
        for n, t in enumerate(templates)
    )
    listed = [
        {"uriTemplate": t, "name": f"t{n}", "mimeType": "text/csv"} for n, t in enumerate(templates)
    ]
    d = _plugin(tmp_path, code, [], resourceTemplates=listed)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    try:
        with anyio.fail_after(20):
            await rt.start()
            uri = templates[19].replace("{v}", "1")
            read = await rt.read_resource(uri, agent="a", bridge=RecordingBridge(), timeout=5)
        assert read["contents"][0]["mimeType"] == "text/csv"
    finally:
        await rt.close()


async def test_a_mime_type_the_code_and_manifest_give_otherwise_is_refused(tmp_path):
    d = _plugin(tmp_path, _MIME_CODE.format(a="text/markdown"), [], **_MIME_MANIFEST)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    with anyio.fail_after(20), pytest.raises(PluginLoadFailure) as info:
        await rt.start()
    assert (
        "resource 'mem://m/a' is text/markdown in the code (mime_type=) but application/json "
        "in plugin.json (mimeType)"
    ) in info.value.message


def _loading_forever(tmp_path: Path) -> tuple[Path, Path]:
    """A plugin that, as it loads, writes its pid to a file and then sleeps 1,000 s."""
    pid_file = tmp_path / "data" / "loading.pid"  # the plugin may write only its data dir
    code = (
        f"import os, pathlib, time\npathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
    )
    return _plugin(tmp_path, code + "time.sleep(1000)\n", ["x"]), pid_file


async def _loading_pid(pid_file: Path) -> int:
    with anyio.fail_after(20):
        while not pid_file.exists() or not pid_file.read_text():
            await anyio.sleep(0.02)
    return int(pid_file.read_text())


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stop", ["drain", "close"])
async def test_stopping_a_runtime_still_starting_kills_its_worker_and_fails_waiting_calls(
    tmp_path, stop
):
    # A removed or replaced plugin's start was cancelled, but its worker went on loading
    # (past its start timeout), and the calls waiting for it were cancelled, never answered.
    d, pid_file = _loading_forever(tmp_path)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    starting = asyncio.ensure_future(rt.start())
    waiting = asyncio.ensure_future(call(rt, "x"))
    pid = await _loading_pid(pid_file)
    assert not waiting.done()
    with anyio.fail_after(20):
        await (rt.drain() if stop == "drain" else rt.close())
    assert not _running(pid)  # gone (and reaped) once the runtime says it stopped
    with anyio.fail_after(5), pytest.raises(PluginFailure, match="while it was still starting"):
        await waiting
    with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_call_cancelled_while_its_worker_starts_is_cancelled(tmp_path):
    d, pid_file = _loading_forever(tmp_path)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    starting = asyncio.ensure_future(rt.start())
    try:
        waiting = asyncio.ensure_future(call(rt, "x"))
        pid = await _loading_pid(pid_file)
        waiting.cancel()  # its client gave up: not an error of the plugin
        with anyio.fail_after(5), pytest.raises(asyncio.CancelledError):
            await waiting
        assert _running(pid)  # the start goes on, for other calls
        assert not starting.done()
    finally:
        with anyio.fail_after(20):
            await rt.close()
    assert not _running(pid)


async def test_a_call_waiting_for_its_worker_to_start_times_out_by_its_own_timeout(tmp_path):
    # It waited the whole start timeout (15 s) whatever the plugin's timeout_ms, holding its
    # slots (found by review)
    d, pid_file = _loading_forever(tmp_path)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    starting = asyncio.ensure_future(rt.start())
    try:
        await _loading_pid(pid_file)
        began = time.monotonic()
        with anyio.fail_after(5), pytest.raises(ToolTimeout, match="still starting"):
            await call(rt, "x", timeout=0.3)
        assert time.monotonic() - began < 3
        assert not starting.done()  # the start goes on, for later calls
    finally:
        with anyio.fail_after(20):
            await rt.close()


async def test_a_root_server_runs_a_plugin_whose_source_only_its_owner_could_read(tmp_path):
    source = tmp_path / "kit"
    shutil.copytree(KIT_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (source, *source.rglob("*")):
        path.chmod(0o700 if path.is_dir() else 0o600)
    copy = tmp_path / "server" / "plugins" / "kit"
    shutil.copytree(source, copy)  # as copytree made copies before they were made readable
    rt = ProcessRuntime(load_manifest(copy), copy, tmp_path / "server" / "plugin-data" / "kit")
    await rt.start()
    try:
        who = (await call(rt, "whoami"))["structuredContent"]
    finally:
        await rt.close()
    assert who["uid"] == (worker_identity() or (os.getuid(),))[0]
    assert os.stat(rt.data_dir).st_uid == who["uid"]


async def test_each_worker_has_shared_memory_of_its_own(make_runtime):
    shm = f"/dev/shm/mcp0-test-{os.getpid()}"
    one, two = await make_runtime(), await make_runtime()
    written = (await call(one, "reach", {"write": [shm]}))["structuredContent"]
    again = (await call(one, "reach", {"read": [shm]}))["structuredContent"]
    other = (await call(two, "reach", {"read": [shm]}))["structuredContent"]
    assert written[f"write {shm}"] == "ok"
    if one.mounts_confined:  # a tmpfs of its own on /dev/shm: no scratch shared
        assert again[f"read {shm}"] == "ok"
        assert other[f"read {shm}"] == "FileNotFoundError"
        assert not os.path.exists(shm)
    else:
        os.unlink(shm)


# A root server that may not mount (no CAP_SYS_ADMIN: a container's root): its workers make
# their namespaces in a user namespace, where they could not switch to nobody and stayed
# root (found by review). Run in a child: the test process keeps its capabilities.
WITHOUT_SYS_ADMIN = """
import asyncio, json, os, shutil, sys
from pathlib import Path
from typing import Any
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # (and tests/, for requires)
from test_process_runtime import KIT_DIR, call
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime

def no_unshare():
    # As Docker's default seccomp profile does without CAP_SYS_ADMIN: unshare() is refused
    import ctypes, errno, os, struct
    number = {"x86_64": 272, "aarch64": 97}[os.uname().machine]
    program = [(0x20, 0, 0, 0), (0x15, 0, 1, number), (0x06, 0, 0, 0x50000 | errno.EPERM),
               (0x06, 0, 0, 0x7FFF0000)]
    filters = (ctypes.c_uint64 * len(program))(
        *(code | jt << 16 | jf << 24 | k << 32 for code, jt, jf, k in program))
    prog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(filters))
    libc = ctypes.CDLL(None)
    libc.prctl(38, 1, 0, 0, 0)
    assert libc.prctl(22, 2, ctypes.c_char_p(prog), 0, 0) == 0

async def main():
    server = Path(sys.argv[2])
    if sys.argv[3] == "no-unshare":
        no_unshare()
    copy = server / "plugins" / "kit"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (server / "admin.token").write_text("secret")
    data = server / "plugin-data" / "kit"
    data.mkdir(parents=True)
    (data / "byhand").write_text("another user's")  # (a user not mapped in a namespace)
    os.chown(data / "byhand", 1000, 1000)
    if sys.argv[4] == "handed-over":  # by a server that could switch, before
        os.chown(data, 65534, 65534)
        data.chmod(0o700)
    elif sys.argv[4] == "other-user":  # to another worker_user, before
        for path in (data, data / "mine"):
            path.mkdir(exist_ok=True)
            os.chown(path, 1, 1)
            path.chmod(0o700)
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        who = (await call(rt, "whoami"))["structuredContent"]
        tries = {
            "read": ["/etc/shadow", str(server / "admin.token"), "/proc/%d/cmdline" % os.getpid()],
            "write": [str(data / "own"), "/dev/shm/own"],
        }
        reached = (await call(rt, "reach", tries))["structuredContent"]
    finally:
        await rt.close()
    print(json.dumps({"sandbox": rt.sandbox, "uid": who["uid"], "reached": reached}))

asyncio.run(main())
"""


def _without_sys_admin(
    setpriv: str,
    tmp_path: Path,
    *,
    unshare: bool = True,
    handed_over: bool = False,
    lacking: str = "sys_admin",
    before: str = "-",
) -> tuple[dict[str, Any], str]:
    drop = [setpriv, "--bounding-set", f"-{lacking}", "--inh-caps", f"-{lacking}"]
    child = [sys.executable, "-c", WITHOUT_SYS_ADMIN, str(Path(__file__).parent), str(tmp_path)]
    child += ["unshare" if unshare else "no-unshare", "handed-over" if handed_over else before]
    done = subprocess.run([*drop, *child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.parametrize("handed_over", [False, True], ids=["new", "handed-over-before"])
def test_a_root_worker_that_cannot_switch_keeps_a_data_dir_it_can_use(tmp_path, handed_over):
    # Without CAP_SYS_ADMIN and with unshare() refused (Docker's default): no mount view,
    # so no switch to nobody. The data dir was handed to nobody anyway, and the worker,
    # root without capabilities, could not enter it (found by review): it stays, or goes
    # back to, root's.
    require_root("setpriv")
    setpriv = str(shutil.which("setpriv"))
    report, stderr = _without_sys_admin(setpriv, tmp_path, unshare=False, handed_over=handed_over)
    assert report["sandbox"]["unprivileged"] is False
    assert report["sandbox"]["mounts_confined"] is False
    assert report["uid"] == 0
    data = tmp_path / "plugin-data" / "kit"
    assert report["reached"][f"write {data / 'own'}"] == "ok"
    assert os.stat(data).st_uid == 0
    assert "runs as root" in stderr  # said once, in the server's log


def test_a_root_worker_that_may_not_switch_keeps_its_mount_view_and_its_shared_memory(tmp_path):
    # Without CAP_SETUID: the mount view holds, the switch cannot; its /dev/shm, made for
    # nobody, was closed to it (found by review)
    require_root("setpriv")
    setpriv = str(shutil.which("setpriv"))
    report, stderr = _without_sys_admin(setpriv, tmp_path, lacking="setuid")
    assert "runs as root" in stderr  # said once, in the server's log
    assert report["sandbox"]["mounts_confined"] is True
    assert report["sandbox"]["unprivileged"] is False
    # its own /proc hides the server from it as root too ("invisible" showed gid 0 all)
    assert report["sandbox"]["processes_hidden"] is True
    [server] = [key for key in report["reached"] if key.startswith("read /proc/")]
    assert report["reached"][server] == "FileNotFoundError"
    data = tmp_path / "plugin-data" / "kit"
    assert report["reached"][f"write {data / 'own'}"] == "ok"
    assert report["reached"]["write /dev/shm/own"] == "ok"


def test_a_root_server_without_sys_admin_still_runs_its_workers_as_nobody(tmp_path):
    require_root("setpriv")
    setpriv = str(shutil.which("setpriv"))
    report, stderr = _without_sys_admin(setpriv, tmp_path)
    done = subprocess.CompletedProcess([], 0, "", stderr)
    assert report["sandbox"]["unprivileged"] is True, done.stderr
    assert report["sandbox"]["mounts_confined"] is True
    assert report["sandbox"]["network_isolated"] is True
    assert report["uid"] == worker_identity()[0]  # type: ignore[index]
    assert report["reached"]["read /etc/shadow"] == "PermissionError"
    assert report["reached"][f"read {tmp_path / 'admin.token'}"] == "FileNotFoundError"
    assert report["reached"]["write /dev/shm/own"] == "ok"
    # a file of a user its namespace does not map stays that user's; the start goes on
    assert os.stat(tmp_path / "plugin-data" / "kit" / "byhand").st_uid == 1000
    assert "runs as root" not in done.stderr  # (the warning of a worker that could not)


async def test_a_kept_tree_that_holds_the_data_dir_does_not_bring_it_back(tmp_path):
    # A tree the worker keeps whole (its data dir here; on the import path, a flat-layout
    # project) with the server's data dir inside, below a directory only root may search
    # (covered for nobody): the outer cover put the tree back, server data dir and all,
    # and the inner cover was skipped
    copy = tmp_path / "plugin"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp_path / "data"
    server = data / "server"
    server.mkdir(parents=True)
    (server / "admin.token").write_text("secret")
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        reads = {"read": [str(server / "admin.token")]}
        reached = (await call(rt, "reach", reads))["structuredContent"]
    finally:
        await rt.close()
    covered = "FileNotFoundError" if rt.mounts_confined else "PermissionError"
    assert reached[f"read {server / 'admin.token'}"] == covered


# The same data dir mounted a second time (a bind mount of its tree): the cover is on one
# mount point; Landlock keeps it out on every one (a review found it granted, once the
# tree holding it was granted whole). Run in a mount namespace of its own.
SECOND_MOUNT = """
import asyncio, json, os, shutil, subprocess, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], str(Path(sys.argv[1]).parent)]  # (and tests/, for requires)
from test_process_runtime import KIT_DIR, call
from mcp_zero.sandbox.manifest import load_manifest
from mcp_zero.sandbox.process import ProcessRuntime

async def main():
    base = Path(sys.argv[2])
    copy, data, alias = base / "plugin", base / "data", base / "alias"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    server = data / "server"
    server.mkdir(parents=True)
    (server / "admin.token").write_text("secret")
    alias.mkdir()
    subprocess.run(["mount", "--bind", str(data), str(alias)], check=True)
    rt = ProcessRuntime(load_manifest(copy), copy, data, protect=server)
    await rt.start()
    try:
        paths = [str(server / "admin.token"), str(alias / "server" / "admin.token")]
        reached = (await call(rt, "reach", {"read": paths}))["structuredContent"]
    finally:
        await rt.close()
    print(json.dumps({"sandbox": rt.sandbox, "reached": reached}))

asyncio.run(main())
"""


def test_the_data_dir_mounted_twice_is_out_of_reach_on_both(open_dir):
    require_root("unshare")
    child = [sys.executable, "-c", SECOND_MOUNT, str(Path(__file__).parent), str(open_dir)]
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", *child],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    token = open_dir / "data" / "server" / "admin.token"
    alias = open_dir / "alias" / "server" / "admin.token"
    assert report["reached"][f"read {token}"] == "FileNotFoundError"  # the cover
    assert report["reached"][f"read {alias}"] == "PermissionError"  # Landlock


async def test_a_root_servers_worker_that_cannot_read_an_import_says_why(tmp_path):
    # As nobody it reads its packages as any user: one installed under umask 077 fails to
    # import, and the load error says what to do (a review found the bare PermissionError)
    require_root()  # (the switch to nobody is a root server's)
    name = f"mcp0_test_private_{os.getpid()}"
    private = Path(sysconfig.get_paths()["purelib"]) / f"{name}.py"  # on the worker's path
    plugin = tmp_path / "plugin"
    shutil.copytree(KIT_DIR, plugin, ignore=shutil.ignore_patterns("__pycache__"))
    code = plugin / "kit_plugin.py"
    future = "from __future__ import annotations\n"
    code.write_text(code.read_text().replace(future, f"{future}import {name}\n", 1))
    private.write_text("VALUE = 1\n")
    try:
        private.chmod(0o600)
        rt = ProcessRuntime(load_manifest(plugin), plugin, tmp_path / "data")
        with pytest.raises(PluginFailure, match=r"PermissionError.*must be readable by it"):
            await rt.start()
    finally:
        private.unlink()


@pytest.mark.parametrize("user", ["daemon", "root"])
async def test_the_user_a_root_servers_workers_run_as_is_a_setting(tmp_path, user):
    # worker_user: a dedicated user rather than nobody, or root (workers stay root, without
    # capabilities: for packages that cannot be made readable to all)
    require_root()  # (the switch is a root server's)
    entry = pwd.getpwnam(user)
    copy = tmp_path / "plugin"
    shutil.copytree(KIT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    rt = ProcessRuntime(load_manifest(copy), copy, tmp_path / "data", worker_user=user)
    await rt.start()
    try:
        who = (await call(rt, "whoami"))["structuredContent"]
        own = {"write": [str(tmp_path / "data" / "own")]}
        reached = (await call(rt, "reach", own))["structuredContent"]
    finally:
        await rt.close()
    assert (who["uid"], who["gid"]) == (entry.pw_uid, entry.pw_gid)
    assert rt.sandbox["unprivileged"] is (entry.pw_uid != 0)
    assert reached[f"write {tmp_path / 'data' / 'own'}"] == "ok"
    assert os.stat(tmp_path / "data").st_uid == entry.pw_uid


def test_a_data_dir_of_a_former_worker_user_is_taken_over_in_a_user_namespace(tmp_path):
    # worker_user changed, on a root server without CAP_SYS_ADMIN: the worker's namespace
    # maps root and the new user only, so root there could not enter the former user's
    # 0700 data dir, and every plugin failed to start (found by review)
    require_root("setpriv")
    setpriv = str(shutil.which("setpriv"))
    report, _ = _without_sys_admin(setpriv, tmp_path, before="other-user")
    data = tmp_path / "plugin-data" / "kit"
    assert report["sandbox"]["unprivileged"] is True
    assert report["reached"][f"write {data / 'own'}"] == "ok"
    assert os.stat(data / "mine").st_uid == report["uid"]


def test_a_worker_holds_no_descriptor_the_server_inherited(tmp_path):
    # uvloop's subprocess_exec (the server's loop) does not close inheritable descriptors:
    # a file the server was started with (a shell's `exec 77<>secret`) reached plugin code,
    # past Landlock and the mount view, which govern opening (found by review)
    import uvloop

    secret = tmp_path / "secret.txt"
    secret.write_text("the server's")
    opened = os.open(secret, os.O_RDWR)
    fd = os.dup2(opened, 250)  # (high: no number a worker uses on its own)
    os.close(opened)
    held = f"/proc/self/fd/{fd}"

    async def main() -> dict[str, str]:
        rt = ProcessRuntime(load_manifest(KIT_DIR), KIT_DIR, tmp_path / "data")
        await rt.start()
        try:
            return (await call(rt, "reach", {"stat": [held]}))["structuredContent"]
        finally:
            await rt.close()

    try:
        reached = uvloop.run(main())
    finally:
        os.close(fd)
    assert reached[f"stat {held}"] == "ENOENT"


async def test_a_plugin_dying_by_itself_in_a_loop_is_logged_and_counted(tmp_path, caplog):
    # With no call in flight its deaths were logged nowhere, and the admin API said the
    # plugin ran (found by review)
    code = (
        "import os, threading, time\nfrom mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('x')\ndef x(ctx): return 'x'\n"
        "threading.Thread(target=lambda: (time.sleep(0.1), os._exit(9)), daemon=True).start()\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    caplog.set_level(logging.WARNING, logger="mcp_zero.sandbox.plugin.broken")
    await rt.start()
    try:
        with anyio.fail_after(20):
            while rt.failures_in_a_row < 3:
                await asyncio.sleep(0.05)
    finally:
        await rt.close()
    assert sum("status 9" in r.getMessage() for r in caplog.records) >= 3


async def test_a_worker_asking_to_be_replaced_at_once_backs_off_as_a_crash_does(tmp_path):
    # A worker that sent "retire" right after its start was replaced at once, without end:
    # several restarts a second (found by review)
    code = (
        "from mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('x')\ndef x(ctx): raise MemoryError\n"  # (a worker then asks to go)
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    await rt.start()
    try:
        for _ in range(3):  # each call within a second of its worker's start
            result = await call(rt, "x")
            assert result["isError"] is True
        assert rt.failures_in_a_row >= 2
    finally:
        await rt.close()


async def test_a_worker_flooding_frames_for_no_call_is_killed(tmp_path, caplog):
    # An idle plugin whose thread wrote frames for a call that does not exist kept the
    # server's loop at 100% with no end: no call, so no timeout or kill (found by review)
    code = (
        "import gc, threading, time\nfrom mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "def flood():\n"  # (the worker runs as __main__: found by its class's name)
        "    time.sleep(0.5)\n"  # (once the call was answered: the worker is idle)
        "    worker = next(o for o in gc.get_objects() if type(o).__name__ == 'Worker')\n"
        "    for _ in range(100_000):\n"
        "        worker.send({'op': 'progress', 'call': 987654, 'progress': 1})\n"
        "@plugin.tool('x')\ndef x(ctx):\n"
        "    threading.Thread(target=flood, daemon=True).start()\n    return 'flooding'\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    caplog.set_level(logging.WARNING, logger="mcp_zero.sandbox.plugin.broken")
    await rt.start()
    try:
        assert (await call(rt, "x"))["content"][0]["text"] == "flooding"
        with anyio.fail_after(20):
            while not any("for no call in flight" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
    finally:
        await rt.close()


async def test_a_flood_of_frames_for_no_call_at_a_workers_exit_is_dropped_once_seen(
    tmp_path, caplog
):
    # A child the worker left on its pipe floods it as the worker exits: the pipe is read at
    # the exit, up to 4 MiB, each frame handled in one callback (~0.3-1 s of the server's
    # loop). Once the flood is seen (and the group killed), the rest is dropped unread.
    # (the worker exits once the child has written more than tells a flood: when it exited
    # at once, a busy machine had not run the child yet, and no flood was there to see)
    code = (
        "import os\nfrom mcp_zero.plugin import Plugin\nplugin = Plugin()\n"
        "@plugin.tool('x')\ndef x(ctx):\n"
        "    fd, frame = ctx._channel._out_fd, b'{\"id\":987654}\\n'\n"
        "    started, go = os.pipe()\n"
        "    if os.fork() == 0:\n"
        "        os.write(fd, frame * 2_000)\n"
        "        os.write(go, b'.')\n"
        "        while True:\n"
        "            os.write(fd, frame * 20_000)\n"
        "    os.read(started, 1)\n"
        "    os._exit(3)\n"
    )
    d = _plugin(tmp_path, code, ["x"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    await rt.start()
    [worker] = list(worker_outputs()._workers)
    try:
        with anyio.fail_after(20), pytest.raises(PluginCrashed):
            await call(rt, "x", timeout=10)
        assert any("for no call in flight" in r.getMessage() for r in caplog.records)
        # frames for no call handled one by one: the 1,001 that tell a flood, no more
        assert worker._strays[0] < 2_000, worker._strays
    finally:
        await rt.close()


class UnreadBridge(RecordingBridge):
    """A bridge whose first resource update waits until the client reads (``read`` set),
    which its first request does: the update of a subscriber that does not read."""

    def __init__(self) -> None:
        super().__init__(ANSWERS)
        self.read = asyncio.Event()

    async def resource_updated(self, uri: str) -> None:
        await super().resource_updated(uri)
        await self.read.wait()

    async def request(
        self, method: str, params: dict[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        self.read.set()  # (its frame came after the updates': all of them were heard)
        return await super().request(method, params, key)


async def test_updates_in_a_call_held_up_by_a_subscriber_wait_once_per_uri(make_runtime):
    # Each update frame queued a relay of its own behind the one a subscriber that did not
    # read held up, for as long as the call ran (found by review): now one waiting is told
    # once, however often repeated meanwhile
    rt = await make_runtime()
    b = UnreadBridge()
    assert (await call(rt, "updates_then_ask", {"n": 300}, bridge=b))["content"][0]["text"] == (
        "asked"
    )
    told = [event for event in b.events if event[0] == "resource_updated"]
    assert 1 <= len(told) <= 2  # the one held up, and one of the changes meanwhile


async def test_answers_are_held_while_an_audit_batch_gathers_and_join_it(make_runtime, tmp_path):
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=1.0) as log:
        log.gather_from(worker_outputs())
        first = log.submit({"call": "first"})  # a batch gathers: the workers' answers wait
        answered: list[tuple[Any, bool]] = []

        async def governed() -> AuditEntry:  # as the kernel's one task per call
            result = await call(rt, "aecho", {"text": "held"})
            answered.append((result, first.done()))
            return await log.append({"call": "aecho"})

        recorded = asyncio.create_task(governed())
        await asyncio.sleep(0.3)  # the worker answered long ago; its answer is not read yet
        assert not answered
        with anyio.fail_after(10):
            # taken in as the window closed, and its record submitted before the commit
            second = await recorded
        [(result, committed)] = answered
        assert result["structuredContent"]["text"] == "held"
        assert not committed
        assert [first.result().seq, second.seq] == [1, 2]
        assert (log.stats.batches, log.stats.largest_batch) == (1, 2)
        # Read as they come again: a call outside a batch is not held.
        with anyio.fail_after(0.9):
            await call(rt, "aecho", {"text": "free"})


async def test_a_call_sent_outside_a_batch_opens_one_for_its_answer(make_runtime, tmp_path):
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=1.0) as log:
        outputs = worker_outputs()
        outputs.on_call = log.expect  # as a server's runtime has it
        log.gather_from(outputs)
        try:
            answered: list[Any] = []

            async def governed() -> AuditEntry:
                answered.append(await call(rt, "aecho", {"text": "expected"}))
                return await log.append({"call": "aecho"})

            recorded = asyncio.create_task(governed())
            await asyncio.sleep(0.3)
            assert not answered  # held from the moment it was sent
            with anyio.fail_after(10):
                entry = await recorded
            assert answered[0]["structuredContent"]["text"] == "expected"
            assert entry.seq == 1
            assert (log.stats.batches, log.stats.largest_batch) == (1, 1)
        finally:
            outputs.on_call = None


async def test_a_worker_that_exits_while_its_answers_are_held_is_a_crash(make_runtime, tmp_path):
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=1.0) as log:
        log.gather_from(worker_outputs())
        log.submit({"call": "first"})
        # Its end of file was held too: not taken for a child left holding its pipe.
        with pytest.raises(PluginCrashed, match="exited with status 7"):
            await call(rt, "crash", {"status": 7})
        with anyio.fail_after(10):
            assert await call(rt, "echo", {"text": "after"}) == {
                "content": [{"type": "text", "text": "after"}]
            }


async def test_workers_run_as_batch_work(make_runtime):
    rt = await make_runtime()
    # (its wake-ups do not preempt the server that sent it a call)
    assert os.sched_getscheduler(rt.pids[0]) == os.SCHED_BATCH


async def test_an_answer_held_past_its_calls_time_limit_came_in_time(make_runtime, tmp_path):
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=1.0) as log:
        log.gather_from(worker_outputs())
        log.submit({"call": "first"})  # a batch gathers: the answer below is held
        # answered within its 200 ms, though read only as the window closes: not a timeout
        with anyio.fail_after(10):
            result = await call(rt, "aecho", {"text": "in time"}, timeout=0.2)
        assert result["structuredContent"]["text"] == "in time"


@contextlib.asynccontextmanager
async def steady_audit_load(
    log: AuditLog, every: float, quick_s: float = 0.0
) -> AsyncIterator[WorkerOutputs]:
    """The workers' answers wired to ``log`` as a server's are, and a record submitted every
    ``every`` seconds (0: every loop turn), so that a window is open all the time."""
    outputs = worker_outputs()
    outputs.on_call = log.expect
    outputs.quick_s = quick_s
    log.gather_from(outputs)
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            log.submit({"call": "other"})
            await asyncio.sleep(every)

    loading = asyncio.create_task(load())
    try:
        yield outputs
    finally:
        stop.set()
        await loading
        outputs.on_call = None


BOTH_LOOPS = pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"use_uvloop": True})], ids=["asyncio", "uvloop"]
)


@BOTH_LOOPS
async def test_holds_and_take_ins_at_every_turn_keep_the_answers_whole_and_in_order(make_runtime):
    # What a transport read before a hold reached the frames a loop turn later: a take-in
    # before that overtook it, broke a large frame and had the worker killed (found by
    # review; uvloop's transport showed it; the pipe is now read without one). Held
    # directly, even in the middle of a frame.
    rt = await make_runtime()
    outputs = worker_outputs()
    done = asyncio.Event()

    def busy() -> list[Any]:
        return [w for w in list(outputs._workers) if w.inflight]

    async def churn() -> None:
        while not done.is_set():
            for worker in busy():
                worker.hold_output()
                worker.release_output(take_in=True)  # in the turn the hold began
            await asyncio.sleep(0)
            held = busy()
            for worker in held:
                worker.hold_output()
            await asyncio.sleep(0)
            for worker in held:
                worker.release_output(take_in=True)  # a turn after
            await asyncio.sleep(0)

    churning = asyncio.create_task(churn())
    try:
        with anyio.fail_after(60):
            for _ in range(6):
                result = await call(rt, "huge", {"mb": 2}, timeout=30)
                assert len(result["content"][0]["text"]) == 2 << 20
                small = await call(rt, "aecho", {"text": "small"}, timeout=30)
                assert small["structuredContent"]["text"] == "small"
    finally:
        done.set()
        await churning
        for worker in list(outputs._workers):
            worker.release_output(take_in=False)


@BOTH_LOOPS
async def test_a_worker_exiting_while_windows_keep_holding_it_is_still_a_crash(
    make_runtime, tmp_path
):
    # Its exit waited a turn for what was read; a new hold each turn put it off for ever, and
    # the call ended at its time limit (found by review)
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0.0002) as log:
        async with steady_audit_load(log, every=0, quick_s=1.0):  # turns longer than windows
            for _ in range(3):
                with anyio.fail_after(20), pytest.raises(PluginCrashed, match="status 3"):
                    await call(rt, "crash", {"status": 3}, timeout=10)


async def test_an_answer_taken_in_with_its_window_keeps_its_worker_quick(make_runtime, tmp_path):
    # Read as the window closed, it measured the window, more than the window's worth: every
    # other call opened none (found by review)
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0.05) as log:
        outputs = worker_outputs()
        outputs.quick_s = 0.05
        opened = []

        def expect() -> None:
            opened.append(1)
            log.expect()

        outputs.on_call = expect
        log.gather_from(outputs)
        try:
            for _ in range(4):
                with anyio.fail_after(10):
                    await call(rt, "aecho", {"text": "x"})
                    await log.append({"call": "aecho"})
            assert len(opened) == 4
        finally:
            outputs.on_call = None


FLOODER = """
import os
import time

from mcp_zero.plugin import Plugin

plugin = Plugin("flooder")


@plugin.tool("flood_and_exit")
def flood_and_exit(ctx) -> str:
    fd = ctx._channel._out_fd  # (the worker's protocol pipe, as a child it forks inherits)
    frame = b'{"op":"log","call":%d,"level":"info","data":"x"}\\n' % ctx._call_id
    if os.fork() == 0:
        while True:
            os.write(fd, frame * 64)
    time.sleep(0.05)
    os._exit(3)
"""


async def test_a_worker_that_exits_held_while_its_child_floods_the_pipe_is_ended(
    make_runtime, tmp_path
):
    # On its exit, what it sent was taken in to the end of file: a child writing for ever
    # held the server's loop for ever (found by review). Now only a few MiB are, and the
    # worker is ended as one that left its pipe to another process.
    plugin = write_plugin(tmp_path / "flooder", "flooder", FLOODER, ["flood_and_exit"])
    rt = await make_runtime(plugin)
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=5.0) as log:
        log.gather_from(worker_outputs())
        log.submit({"call": "first"})  # its answers are held from the call on
        with anyio.fail_after(20), pytest.raises(PluginCrashed):
            await call(rt, "flood_and_exit", timeout=15)


async def test_a_large_answer_is_not_held_window_after_window(make_runtime, tmp_path):
    # Each window took in 256 KiB of it and held the rest again: 8 MiB took 32 windows, past
    # a time limit it met unheld by far (found by review)
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=0.1) as log:
        async with steady_audit_load(log, every=0.01):  # a window open all the time
            with anyio.fail_after(20):
                result = await call(rt, "huge", {"mb": 8}, timeout=2.0)
            assert len(result["content"][0]["text"]) == 8 << 20


PARTING = """
import os
from mcp_zero.plugin import Plugin

plugin = Plugin("parting")


@plugin.tool("answer_and_exit")
def answer_and_exit(ctx, kb=1):
    # the whole answer frame written, then gone, in the same breath
    text = "z" * (kb << 10)
    ctx._channel.send({"id": ctx._call_id, "result": {"content": [{"type": "text", "text": text}]}})
    os._exit(5)
"""


@BOTH_LOOPS
@pytest.mark.parametrize("held", [False, True], ids=["read", "held"])
@pytest.mark.parametrize("kb", [1, 1000])
async def test_a_worker_that_answers_and_exits_at_once_is_told_as_the_exit_it_is(
    tmp_path, caplog, kb, held
):
    # Its exit can be reported before the end of its pipe is read: that was taken for a
    # child it left holding the pipe ("killed because it exited, leaving processes...")
    # and so reported (found by review). The pipe is read to its end as the exit comes.
    d = write_plugin(tmp_path / "parting", "parting", PARTING, ["answer_and_exit"])
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data", max_restart_backoff_s=0.01)
    await rt.start()
    try:
        for _ in range(8):
            caplog.clear()
            with anyio.fail_after(10):
                if held:  # (a large answer is taken in 256 KiB at the window's end, and read on)
                    with (
                        SqliteStore(tmp_path / "a.db") as store,
                        AuditLog(store, window=0.005) as log,
                    ):
                        async with steady_audit_load(log, every=0.002):
                            result = await call(rt, "answer_and_exit", {"kb": kb}, timeout=10)
                else:
                    result = await call(rt, "answer_and_exit", {"kb": kb}, timeout=10)
                assert len(result["content"][0]["text"]) == kb << 10
                while not (
                    told := [
                        r.getMessage() for r in caplog.records if "worker (pid" in r.getMessage()
                    ]
                ):
                    await asyncio.sleep(0.01)
            assert "exited with status 5" in told[0], told
    finally:
        await rt.close()


@BOTH_LOOPS
async def test_a_worker_that_exits_as_it_spawns_is_told_gone(tmp_path):
    # Its exit was reported before the spawn returned, while the pipe's other end was still
    # the server's: it never reached its end, and the start waited for the worker to be gone,
    # for ever (found by review, on asyncio's loop kept busy)
    async def busy() -> None:
        while True:
            time.sleep(0.003)  # the loop's turns take a while: other work
            await asyncio.sleep(0)

    others = [asyncio.create_task(busy()) for _ in range(5)]
    try:
        for _ in range(3):
            worker = WorkerProcess(
                "p",
                [sys.executable, "-S", "-c", "raise SystemExit(2)"],
                dict(os.environ),
                tmp_path,
                cancel_grace=0.1,
                on_exit=lambda w: None,
                on_retire=lambda w: None,
            )
            with anyio.fail_after(10), pytest.raises(PluginFailure, match="exited with status 2"):
                await worker.start(5.0)
            with anyio.fail_after(10):
                await worker.wait_gone()
            assert worker._stdout_fd == -1  # (its answers' pipe was closed)
    finally:
        for task in others:
            task.cancel()


@BOTH_LOOPS
async def test_a_call_cancelled_once_its_answer_waits_in_the_pipe_gets_the_answer(
    make_runtime, tmp_path
):
    # Its handler had finished, its answer held (or not yet read) when the client's cancel
    # came: it was recorded "cancelled", though the plugin did what it was asked (found by
    # review). The answer is read as the cancel comes, and the caller gets it.
    rt = await make_runtime()
    with SqliteStore(tmp_path / "a.db") as store, AuditLog(store, window=5.0) as log:
        log.gather_from(worker_outputs())
        log.submit({"call": "first"})  # a batch gathers: the workers' answers wait
        calling = asyncio.create_task(call(rt, "aecho", {"text": "done"}))
        await asyncio.sleep(0.3)  # answered long ago, not read
        assert not calling.done()
        calling.cancel()
        calling.cancel()  # (twice: a closing session's, then its teardown's)
        with anyio.fail_after(10):
            result = await calling
        assert result["structuredContent"]["text"] == "done"
        assert not calling.cancelled()
        assert calling.cancelling() == 0
        # a call still running when cancelled is cancelled, as before
        running = asyncio.create_task(call(rt, "slow_async", {"seconds": 5}))
        await asyncio.sleep(0.3)
        running.cancel()
        with anyio.fail_after(10), pytest.raises(asyncio.CancelledError):
            await running
        assert (await call(rt, "echo", {"text": "after"}))["content"][0]["text"] == "after"


_THREADS_TO_THE_QUOTA = """\
import threading
import time
from mcp_zero.plugin import Plugin

plugin = Plugin("broken")


@plugin.tool("hold")
def hold(ctx):
    # the plugin's memory quota taken by threads that wait (each stack is address space),
    # until no more can start; then "full" written, and held for 2 s
    release = threading.Event()
    waiting = []
    try:
        while True:
            waiting.append(threading.Thread(target=release.wait))
            waiting[-1].start()
    except RuntimeError:
        waiting.pop()
    (ctx.data_dir / "full").touch()
    time.sleep(2)
    release.set()
    return "held"


@plugin.tool("other")
def other(ctx):
    return "ran"
"""


async def test_a_call_no_thread_can_be_started_for_fails_alone(tmp_path):
    # With its memory quota taken, a worker could not start a thread for a second call at
    # once: the RuntimeError ended the worker, and the call running in it failed as crashed
    # (found by review)
    quotas = {"memory_mb": 128, "max_concurrency": 4, "workers": 1, "timeout_ms": 20_000}
    d = _plugin(tmp_path, _THREADS_TO_THE_QUOTA, ["hold", "other"], quotas=quotas)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    await rt.start()
    try:
        holding = asyncio.ensure_future(call(rt, "hold", timeout=20))
        with anyio.fail_after(15):
            while not (rt.data_dir / "full").exists():
                await asyncio.sleep(0.02)
        other = await call(rt, "other", timeout=20)  # a thread of its own: none can start
        assert other.get("isError") is True, other
        assert other["content"][0]["text"].startswith(
            "MemoryError: can't start new thread to run the call; the plugin reached its "
            "memory quota (128 MiB"
        ), other
        assert (await holding)["content"][0]["text"] == "held"
    finally:
        await rt.close()


_FREED_AS_IT_FAILS = """\
import os
import threading
import time
from mcp_zero.plugin import Plugin

plugin = Plugin("broken")
freed = threading.Event()
failing = False
_start = threading.Thread.start


def start(self):
    # the next thread the pool starts fails, but only after the busy one came free
    global failing
    if failing:
        failing = False
        freed.set()
        time.sleep(0.3)  # (the busy thread returns, and takes up the queued call)
        raise RuntimeError("can't start new thread")
    _start(self)


threading.Thread.start = start


@plugin.tool("busy")
def busy(ctx):
    global failing
    failing = True
    freed.wait(10)
    return "done"


@plugin.tool("pid")
def pid(ctx):
    return str(os.getpid())
"""


async def test_a_call_a_thread_takes_up_as_its_own_start_fails_is_answered_once(tmp_path):
    # The pool queues a call before it starts a thread for it: a thread that came free took
    # it up while the failed start answered it as failed too (two answers, and the worker
    # retired for a MemoryError that was not), found by review
    quotas = {"max_concurrency": 4, "workers": 1, "timeout_ms": 20_000}
    d = _plugin(tmp_path, _FREED_AS_IT_FAILS, ["busy", "pid"], quotas=quotas)
    rt = ProcessRuntime(load_manifest(d), d, tmp_path / "data")
    await rt.start()
    try:
        first = (await call(rt, "pid"))["content"][0]["text"]  # (the pool's first thread)
        await asyncio.sleep(0.3)  # (it counts itself idle after it answered: busy takes it)
        busy = asyncio.ensure_future(call(rt, "busy", timeout=20))
        await asyncio.sleep(0.3)  # busy holds the one thread; the next call needs another
        assert (await call(rt, "pid", timeout=20))["content"][0]["text"] == first
        assert (await busy)["content"][0]["text"] == "done"
        await asyncio.sleep(0.5)  # (a retirement would replace the worker now)
        assert (await call(rt, "pid"))["content"][0]["text"] == first
        assert rt.pids == [int(first)]
    finally:
        await rt.close()
