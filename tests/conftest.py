"""Fixtures for tests anywhere under tests/."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcp_zero import fdio


def _deep_tree(root: Path, depth: int) -> None:
    root.mkdir(parents=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        file = os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(file, b"abc")
        os.close(file)
        os.mkdir("d", dir_fd=fd)
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)


@pytest.fixture
def deep_tree(tmp_path: Path) -> Iterator[Callable[[Path, int], None]]:
    """Makes ``root``/d/d/…/d, ``depth`` levels below ``root``, with a 3-byte file ``f`` at
    each level but the last (through descriptors: os.makedirs recurses, as os.walk and
    shutil.rmtree do, and fails some 1,000 levels down). After the test it deletes all of
    tmp_path, wherever the trees went: pytest's own clean-up of old tmp dirs would meet them
    runs later and fail on them. Name it before the fixtures whose files are in tmp_path
    (its clean-up comes after theirs)."""
    yield _deep_tree
    fdio.remove_tree(tmp_path, ignore_errors=True)
