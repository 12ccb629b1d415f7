"""fdio.read_regular: a regular file's bytes, and nothing else read or left open.
fdio.remove_tree and tree_bytes: a tree however deep, nothing outside it touched."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcp_zero.fdio import NotRegularFile, read_regular, remove_tree, tree_bytes, walk_up


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


def test_a_tree_deeper_than_python_recurses_is_counted_and_removed(
    deep_tree: Callable[[Path, int], None], tmp_path: Path
) -> None:
    # A plugin can make a data dir 1,500 levels deep: listing, purging or adopting it after
    # the plugin's removal raised RecursionError (os.walk, shutil.rmtree: found by review)
    deep_tree(tmp_path / "deep", 1500)
    assert tree_bytes(tmp_path / "deep") == 1500 * 3
    before = open_descriptors()
    remove_tree(tmp_path / "deep")
    assert open_descriptors() == before
    assert os.listdir(tmp_path) == []
    remove_tree(tmp_path / "deep")  # gone already: no error
    assert tree_bytes(tmp_path / "deep") == 0


def test_links_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("kept")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "to-dir").symlink_to(outside)
    (tmp_path / "tree" / "to-file").symlink_to(outside / "keep")
    assert tree_bytes(tmp_path / "tree") == 0
    remove_tree(tmp_path / "tree")
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (outside / "keep").read_text() == "kept"


def test_a_directory_moved_out_while_walked_stops_the_walk(tmp_path: Path) -> None:
    # going back up through "..", the walk would be in the moved directory's new parent:
    # it checks it is the one it left, so a removal never deletes outside its tree
    (tmp_path / "tree" / "a" / "b").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "b" / "file").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("kept")
    walked = walk_up(tmp_path / "tree")
    _, name, _ = next(walked)
    assert name == "file"
    os.rename(tmp_path / "tree" / "a" / "b", tmp_path / "elsewhere" / "b")
    with pytest.raises(OSError, match="moved while walked"):
        next(walked)
    assert (tmp_path / "elsewhere" / "keep").read_text() == "kept"


@contextlib.contextmanager
def undeletable(file: Path) -> Iterator[None]:
    """``file`` made one the OS refuses to delete, for as long as the block runs: for root
    (who deletes what a mode protects) immutable (``chattr +i``, ext4's and tmpfs's), for
    another user in a directory without write permission."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(file)], check=True)
        undo = ["chattr", "-i", str(file)]
    else:
        file.parent.chmod(0o500)
        undo = ["chmod", "700", str(file.parent)]
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_what_cannot_be_removed_is_left_and_said(tmp_path: Path) -> None:
    (tmp_path / "tree" / "locked").mkdir(parents=True)
    (tmp_path / "tree" / "locked" / "file").write_text("x")
    (tmp_path / "tree" / "other").write_text("y")
    with undeletable(tmp_path / "tree" / "locked" / "file"):
        with pytest.raises(PermissionError):
            remove_tree(tmp_path / "tree")
        assert os.listdir(tmp_path / "tree") == ["locked"]  # all else deleted
        remove_tree(tmp_path / "tree", ignore_errors=True)
        assert os.listdir(tmp_path / "tree" / "locked") == ["file"]
