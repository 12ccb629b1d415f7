"""What a test needs of the machine: skipped where a developer's machine lacks it, failed in
CI (``CI`` set: ``.ci/run`` sets it), which runs as root on Debian with util-linux and its
``/usr/bin/python3``, so that a test that cannot run there is a failure, not a quiet skip."""

from __future__ import annotations

import os
import shutil

import pytest

#: A command's prefix for a mount namespace of its own, whose mounts (a private /etc/hosts,
#: /etc/passwd) no other process sees.
UNSHARE = ("unshare", "-m", "--propagation", "private")


def require(condition: bool, reason: str) -> None:
    """Go on when ``condition`` holds; otherwise skip, or in CI fail, saying ``reason``."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason)


def require_root(*programs: str) -> None:
    """Root (to switch users, mount, chown to others) and ``programs`` on the PATH."""
    require(os.geteuid() == 0, "it needs root")
    for program in programs:
        require(shutil.which(program) is not None, f"it needs {program} (util-linux)")
