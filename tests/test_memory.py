"""Freed memory goes back to the system: a burst of large blocks does not leave the process
resident at its peak (glibc, as on every Linux we ship to)."""

from __future__ import annotations

import subprocess
import sys

BURST = """
import sys
from mcp_zero import memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

assert memory.return_large_blocks()
blocks, small = [], []
for i in range(2000):  # answers of ~200 KiB grown piece by piece, small objects between
    block = bytearray(1000)
    for _ in range(200):
        block += bytes(1000)
    blocks.append(bytes(block))
    small.append(str(i) * 30)
peak = rss_mib()
del blocks
print(peak, rss_mib())
"""


def test_a_burst_of_large_blocks_is_handed_back_when_freed() -> None:
    # (without return_large_blocks glibc kept 1,443 of 1,546 MiB resident for 8,000 blocks)
    done = subprocess.run(
        [sys.executable, "-c", BURST], capture_output=True, text=True, check=True, timeout=60
    )
    peak, after = map(int, done.stdout.split())
    assert peak > 300
    assert after < peak / 4, (peak, after)
