"""scripts/_env.sh's choice of the Python that .venv is made with: the first one built for
speed (bench/README.md, "Which Python"), saying so when that is not PATH's python3;
``MCP0_PYTHON`` by hand. Candidates are stand-ins that answer the probe as a fast, a slow or
too old a Python would; the probe itself runs on the system's Python."""

from __future__ import annotations

import subprocess
from pathlib import Path

from requires import require

ENV_SH = Path(__file__).parents[1] / "scripts" / "_env.sh"

#: The probe's answers: Python >= 3.11 built for speed; another >= 3.11; anything else.
FAST, SLOW, OLD = 0, 1, 2


def stand_in(directory: Path, name: str, version: str, status: int) -> Path:
    """An executable ``name`` that answers the probe as a Python ``version`` would with
    ``status``, whatever it is asked."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\necho {version}\nexit {status}\n")
    path.chmod(0o755)
    return path


def find_python(bin_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", "-c", f'set -euo pipefail; source "{ENV_SH}"; mcp0_find_python'],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_python_built_for_speed_is_taken_over_paths_python3_and_said(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    slow = stand_in(bin_dir, "python3", "3.11.7", SLOW)
    fast = stand_in(bin_dir, "python3.12", "3.12.3", FAST)
    done = find_python(bin_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{fast}\n"
    assert f"making .venv with {fast} (3.12.3), built for speed, rather than {slow}" in (
        done.stderr
    )
    # PATH's python3 built for speed: taken, and nothing to say
    stand_in(bin_dir, "python3", "3.11.7", FAST)
    done = find_python(bin_dir)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{slow}\n", "")


def test_mcp0_python_is_taken_as_it_is_unless_it_is_no_python_3_11(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "python3.12", "3.12.3", FAST)
    chosen = stand_in(tmp_path / "mine", "python", "3.11.4", SLOW)
    done = find_python(bin_dir, MCP0_PYTHON=str(chosen))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{chosen}\n", "")
    old = stand_in(tmp_path / "mine", "python3.10", "3.10.12", OLD)
    for wrong in (old, tmp_path / "missing"):
        done = find_python(bin_dir, MCP0_PYTHON=str(wrong))
        assert done.returncode == 1
        assert done.stdout == ""
        assert f"MCP0_PYTHON={wrong} does not run as Python >= 3.11" in done.stderr


def test_the_probe_takes_debians_python_for_one_built_for_speed() -> None:
    # Debian's /usr/bin/python3.11 is built with PGO and LTO and linked statically; its
    # sysconfig describes the shared build beside it, so only the probe's second test finds it
    debian = Path("/usr/bin/python3.11")
    require(debian.exists(), "it needs Debian's python3.11")
    require(Path("/usr/lib/python3.11/ensurepip").is_dir(), "it needs Debian's python3.11-venv")
    probe = subprocess.run(
        ["/bin/bash", "-c", f'source "{ENV_SH}"; "$1" -c "$_MCP0_PYTHON_PROBE"', "-", debian],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == FAST, probe.stderr
    assert probe.stdout.startswith("3.11.")
