"""The /metrics exposition, read back with prometheus_client's text-format parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rpc_live import NOTES_DIR, make_runtime, serve

from mcp_zero.policy import write_default_policies
from mcp_zero.rpc.metrics import CONTENT_TYPE, DEFAULT_BUCKETS, STAGES, Metrics
from mcp_zero.runtime import Runtime
from requires import UNSHARE, require_root


def samples(metrics: Metrics) -> dict[str, list[Sample]]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE
    return {
        family.name: list(family.samples)
        for family in text_string_to_metric_families(body.decode())
    }


def value(found: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in found if s.name == name and s.labels == labels]
    assert len(matches) == 1, (name, labels, found)
    return matches[0]


def test_families_and_types_are_declared() -> None:
    body, _ = Metrics().render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert families == {
        "mcp0_calls": "counter",
        "mcp0_policy_denials": "counter",
        "mcp0_stage_seconds": "histogram",
        "mcp0_inflight_calls": "gauge",
        "mcp0_plugin_restarts": "counter",
        "mcp0_unauthorized": "counter",
    }


def test_counters_count_by_label() -> None:
    m = Metrics()
    for _ in range(3):
        m.count_call("tools/call", "allowed")
    m.count_call("tools/call", "denied")
    m.count_call("resources/read", "allowed")
    m.count_denial("attached-plugins-only")
    m.count_denial("attached-plugins-only")
    m.count_plugin_restart("ocr")
    m.count_unauthorized("mcp")
    m.count_unauthorized("mcp")
    m.count_unauthorized("admin")
    found = samples(m)
    calls = found["mcp0_calls"]
    assert value(calls, "mcp0_calls_total", method="tools/call", outcome="allowed") == 3
    assert value(calls, "mcp0_calls_total", method="tools/call", outcome="denied") == 1
    assert value(calls, "mcp0_calls_total", method="resources/read", outcome="allowed") == 1
    denials = found["mcp0_policy_denials"]
    assert value(denials, "mcp0_policy_denials_total", policy="attached-plugins-only") == 2
    restarts = found["mcp0_plugin_restarts"]
    assert value(restarts, "mcp0_plugin_restarts_total", plugin="ocr") == 1
    refused = found["mcp0_unauthorized"]
    assert value(refused, "mcp0_unauthorized_total", endpoint="mcp") == 2
    assert value(refused, "mcp0_unauthorized_total", endpoint="admin") == 1


def test_stage_histogram_matches_prometheus_client() -> None:
    observations = [0.0, 4e-6, 1e-5, 4e-5, 0.0003, 0.0003, 0.002, 0.7, 10.0, 42.0]
    ours = Metrics()
    for seconds in observations:
        ours.observe_stage("policy", seconds)
    registry = CollectorRegistry()
    oracle = Histogram(
        "mcp0_stage_seconds", "oracle", ["stage"], buckets=DEFAULT_BUCKETS, registry=registry
    )
    for seconds in observations:
        oracle.labels("policy").observe(seconds)
    expected = next(
        f for f in text_string_to_metric_families(generate_latest(registry).decode())
    ).samples
    got = [s for s in samples(ours)["mcp0_stage_seconds"] if s.labels.get("stage") == "policy"]

    def as_set(found: list[Sample]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for s in found
            if not s.name.endswith("_created")
        }

    assert as_set(got) == as_set(expected)
    assert value(got, "mcp0_stage_seconds_count", stage="policy") == len(observations)


def test_every_stage_is_exposed_before_its_first_call() -> None:
    found = samples(Metrics())["mcp0_stage_seconds"]
    for stage in STAGES:
        assert value(found, "mcp0_stage_seconds_count", stage=stage) == 0
        assert value(found, "mcp0_stage_seconds_bucket", stage=stage, le="+Inf") == 0


def test_a_finished_call_observes_the_stages_that_ran_and_counts_its_outcome() -> None:
    m = Metrics()
    m.finish_call("tools/call", "allowed", 0.0002, 0.003, 0.004, 0.008)
    m.finish_call("tools/call", "denied", 0.0001, None, 0.004, 0.005)  # refused by policy
    m.finish_call("tools/call", None, 0.0001, 0.2, None, None)  # its wait cancelled: not counted
    found = samples(m)
    stages = found["mcp0_stage_seconds"]
    counts = {"policy": 3, "sandbox": 2, "audit": 2, "total": 2, "schema": 0, "auth": 0}
    for stage, count in counts.items():
        assert value(stages, "mcp0_stage_seconds_count", stage=stage) == count
    assert value(stages, "mcp0_stage_seconds_sum", stage="sandbox") == pytest.approx(0.203)
    assert value(stages, "mcp0_stage_seconds_bucket", stage="sandbox", le="0.005") == 1
    calls = found["mcp0_calls"]
    assert value(calls, "mcp0_calls_total", method="tools/call", outcome="allowed") == 1
    assert value(calls, "mcp0_calls_total", method="tools/call", outcome="denied") == 1
    assert len([s for s in calls if s.name == "mcp0_calls_total"]) == 2


def test_unknown_stage_gets_its_own_series() -> None:
    m = Metrics()
    m.observe_stage("detectors", 0.001)
    found = samples(m)["mcp0_stage_seconds"]
    assert value(found, "mcp0_stage_seconds_count", stage="detectors") == 1


def test_inflight_gauge_follows_calls_or_a_source() -> None:
    m = Metrics()
    m.call_started()
    m.call_started()
    m.call_finished()
    assert value(samples(m)["mcp0_inflight_calls"], "mcp0_inflight_calls") == 1
    live = [7]
    sourced = Metrics(inflight=lambda: live[0])
    assert value(samples(sourced)["mcp0_inflight_calls"], "mcp0_inflight_calls") == 7
    live[0] = 2
    assert value(samples(sourced)["mcp0_inflight_calls"], "mcp0_inflight_calls") == 2


def test_label_values_are_escaped() -> None:
    m = Metrics()
    nasty = 'weird "policy"\\with\nnewline'
    m.count_denial(nasty)
    found = samples(m)["mcp0_policy_denials"]
    assert value(found, "mcp0_policy_denials_total", policy=nasty) == 1


# -- what is counted -------------------------------------------------------------------------

DENIALS_POLICY = """
@id("notes-redacted")
@reason("notes, with e-mail addresses redacted")
@redact("pii")
permit (principal is Agent, action == Action::"call_tool", resource in Plugin::"notes")
when { principal.plugins.contains(resource.plugin) };

@id("no-notes-for-eve")
forbid (principal == Agent::"eve", action, resource in Plugin::"notes");
"""


@pytest.mark.anyio
async def test_a_denial_is_counted_once_under_what_denied_it(tmp_path: Path) -> None:
    # A default deny was counted under every permit it names, none of which denied it: one
    # call counted attached-plugins-only 1 and notes-redacted 1 (found by review)
    write_default_policies(tmp_path / "data" / "policies")
    (tmp_path / "data" / "policies" / "notes.cedar").write_text(DENIALS_POLICY)
    runtime = make_runtime(tmp_path / "data")
    runtime.plugins.install(NOTES_DIR)
    bob = await runtime.agents.spawn("bob", [])
    eve = await runtime.agents.spawn("eve", ["notes"])
    async with serve(runtime) as live:
        refused = await live.client(bob.token).call("notes_list")
        assert refused["error"]["data"]["policies"] == ["attached-plugins-only", "notes-redacted"]
        forbidden = await live.client(eve.token).call("notes_list")
        assert forbidden["error"]["data"]["policies"] == ["no-notes-for-eve"]
    found = samples(runtime.metrics)
    denials = {s.labels["policy"]: s.value for s in found["mcp0_policy_denials"]}
    assert denials == {"default-deny": 1, "no-notes-for-eve": 1}
    assert (
        value(found["mcp0_calls"], "mcp0_calls_total", method="tools/call", outcome="denied") == 2
    )
    # and the policy stage timed the decisions that denied them: it left them out, so its
    # count was below the auth and audit stages' (found by the operator probe)
    stages = found["mcp0_stage_seconds"]
    assert value(stages, "mcp0_stage_seconds_count", stage="policy") == 2
    assert value(stages, "mcp0_stage_seconds_count", stage="audit") == 2


# -- who may read /metrics -------------------------------------------------------------------


async def get_metrics(
    tmp_path: Path, token: str | None = None, **settings: Any
) -> tuple[httpx2.Response, Runtime]:
    """GET /metrics of a live server with ``settings`` (served on 127.0.0.1 whatever its
    ``host`` says: what counts is whether the server believes it listens beyond loopback)."""
    runtime = make_runtime(tmp_path / "data", **settings)
    async with serve(runtime) as live:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if token == "admin":
            headers = {"Authorization": f"Bearer {runtime.admin_token()}"}
        async with httpx2.AsyncClient(verify=False, timeout=20) as http:
            with anyio.fail_after(20):
                response = await http.get(f"{live.base}/metrics", headers=headers)
        return response, runtime


@pytest.mark.anyio
@pytest.mark.parametrize("token", [None, "not-the-admin-token"])
async def test_metrics_beyond_loopback_need_the_admin_token(
    tmp_path: Path, token: str | None
) -> None:
    response, runtime = await get_metrics(tmp_path, token, host="0.0.0.0")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="mcp0"'
    assert "/metrics needs 'Authorization: Bearer <admin token>'" in response.text
    assert "mcp0_calls" not in response.text
    found = samples(runtime.metrics)["mcp0_unauthorized"]
    assert value(found, "mcp0_unauthorized_total", endpoint="metrics") == 1


# A server on "localhost" where /etc/hosts (a private one, bound over it in a mount namespace
# of its own) makes it every interface; /metrics asked for from this machine.
METRICS_OF_LOCALHOST_ELSEWHERE = """
set -e
echo "0.0.0.0 localhost" > "$1/hosts"
mount --bind "$1/hosts" /etc/hosts
exec "$2" -c '
import json, subprocess, sys, urllib.error, urllib.request
mcp0 = sys.executable.rsplit("/", 1)[0] + "/mcp0"
server = subprocess.Popen(
    [mcp0, "serve", "--data-dir", sys.argv[1], "--host", "localhost", "--port", "0",
     "--no-examples", "--json"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
)
try:
    url = json.loads(server.stdout.readline())["url"]
    try:
        with urllib.request.urlopen(url.replace("/mcp", "/metrics"), timeout=30) as got:
            status, body = got.status, got.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    print(json.dumps({"url": url, "status": status, "body": body}))
finally:
    server.terminate()
    server.wait(30)
' "$1/d"
"""


def test_metrics_of_a_loopback_name_resolving_beyond_it_need_the_admin_token(
    tmp_path: Path,
) -> None:
    # "localhost" was loopback by its spelling: served to anyone, whatever it resolved to
    # (found by review). The name is resolved for real, through a private /etc/hosts.
    require_root("unshare")
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", METRICS_OF_LOCALHOST_ELSEWHERE, "-", str(tmp_path), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["url"].startswith("http://127.0.0.1:")  # (it listens on every interface)
    assert seen["status"] == 401
    assert "mcp0_calls" not in seen["body"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("token", "settings"),
    [
        ("admin", {"host": "0.0.0.0"}),  # the admin token opens them
        (None, {"host": "0.0.0.0", "metrics_public": True}),  # as the setting says
        (None, {}),  # on loopback they are open
    ],
)
async def test_metrics_are_served_to_whom_they_are_open(
    tmp_path: Path, token: str | None, settings: dict[str, Any]
) -> None:
    response, _ = await get_metrics(tmp_path, token, **settings)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    assert "mcp0_calls" in response.text


@pytest.mark.anyio
async def test_probes_answer_get_only_and_metrics_only_to_this_host(tmp_path: Path) -> None:
    # /healthz, /readyz and /metrics answered POST and DELETE with 200, and a page on
    # another host (DNS rebinding) read a loopback server's counters (found by review)
    runtime = make_runtime(tmp_path / "data")
    async with serve(runtime) as live, httpx2.AsyncClient(verify=False, timeout=20) as http:
        with anyio.fail_after(20):
            for path in ("/healthz", "/readyz", "/metrics"):
                for method in ("POST", "PUT", "DELETE"):
                    refused = await http.request(method, f"{live.base}{path}")
                    assert refused.status_code == 405, (method, path)
                    assert refused.headers["allow"] == "GET, HEAD"
                assert (await http.head(f"{live.base}{path}")).status_code in (200, 503)
            rebound = await http.get(
                f"{live.base}/metrics", headers={"Host": "attacker.example:80"}
            )
            assert rebound.status_code == 403
            assert "mcp0_calls" not in rebound.text
            assert (await http.get(f"{live.base}/metrics")).status_code == 200
