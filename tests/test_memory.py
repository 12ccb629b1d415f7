"""Freed memory goes back to the system: a burst of large blocks does not leave the process
resident at its peak (glibc, as on every Linux we ship to)."""

from __future__ import annotations

import subprocess
import sys

import pytest

BURST = """
import sys
from mcp_zero import memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

size, count = int(sys.argv[1]), int(sys.argv[2])
blocks, small = [], []
for i in range(count):  # answers grown piece by piece, small objects between
    block = bytearray(1000)
    while len(block) < size:
        block += bytes(min(size // 8, 64 * 1024))
    blocks.append(bytes(block))
    small.append(str(i) * 30)
peak = rss_mib()
del blocks
freed = rss_mib()
memory.trim()
print(peak, freed, rss_mib())
"""


def burst(size: int, count: int) -> tuple[int, int, int]:
    done = subprocess.run(
        [sys.executable, "-c", BURST, str(size), str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    peak, freed, trimmed = map(int, done.stdout.split())
    assert peak > 300
    return peak, freed, trimmed


@pytest.mark.parametrize("size", [200 << 10, 1 << 20])
def test_smaller_blocks_are_handed_back_by_a_trim(size: int) -> None:
    # (8,000 freed blocks of 200 KiB kept 1,443 of 1,546 MiB resident until a trim)
    peak, _, trimmed = burst(size, (400 << 20) // size)
    assert trimmed < peak / 4, (peak, trimmed)
