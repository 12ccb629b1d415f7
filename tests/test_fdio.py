"""fdio.read_regular: a regular file's bytes, and nothing else read or left open."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mcp_zero.fdio import NotRegularFile, read_regular


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_regular_file_and_a_link_to_one_are_read(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert read_regular(tmp_path / "a") == read_regular(tmp_path / "b") == b"abc"


def test_what_is_not_a_regular_file_is_refused_naming_it_and_nothing_is_left_open(
    tmp_path: Path,
) -> None:
    # A directory's descriptor was left open (fdopen raised before anything closed it): one
    # a second while a directory named *.cedar sat in the policy dir, until the server ran out
    # of them; a socket was "[Errno 6] No such device or address" (found by review)
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "sock"))
        before = open_descriptors()
        for name, kind in [
            ("dir", "a directory"),
            ("fifo", "a named pipe (FIFO)"),
            ("zero", "a device file"),
            ("sock", "a socket"),
        ]:
            for _ in range(3):
                with pytest.raises(NotRegularFile) as refused:
                    read_regular(tmp_path / name)
                assert str(refused.value) == f"{tmp_path / name} is {kind}, not a regular file"
        assert open_descriptors() == before


def test_a_missing_file_is_the_os_error_it_is(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "nope")
