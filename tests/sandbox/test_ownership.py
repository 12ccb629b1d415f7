"""What a root server prepares for its workers (sandbox/ownership.py): the data dir handed
to their user, its TMPDIR, the plugin's code readable; against a plugin changing its data
dir meanwhile."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from mcp_zero import fdio
from mcp_zero.sandbox.ownership import hand_over, make_tmp, readable_to_all
from requires import require_root
from swapping import swapping

NOBODY = (65534, 65534)


@pytest.fixture
def as_root() -> None:
    require_root()  # (chown to another user)


needs_root = pytest.mark.usefixtures("as_root")


def _owners(top: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (os.lstat(p).st_uid, os.lstat(p).st_gid) for p in (top, *top.rglob("*"))}


@needs_root
def test_handing_a_data_dir_over_skips_files_linked_from_elsewhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "notes.db").write_text("the plugin's")
    outside = tmp_path / "shadow"  # a root file a root worker of old linked into its dir
    outside.write_text("root's")
    elsewhere = tmp_path / "etc"
    (elsewhere / "ssh").mkdir(parents=True)
    os.link(outside, data / "linked")
    os.symlink(outside, data / "pointer")
    os.symlink(elsewhere, data / "into")  # a directory link is not walked into
    hand_over(data, *NOBODY)
    owners = _owners(data)
    assert owners["data"] == owners["sub"] == owners["notes.db"] == NOBODY
    assert owners["pointer"] == owners["into"] == NOBODY  # the links themselves
    assert owners["linked"] == (0, 0)
    assert set(_owners(elsewhere).values()) == {(0, 0)}
    assert (os.stat(outside).st_uid, os.stat(outside).st_gid) == (0, 0)


@needs_root
def test_a_data_dir_already_handed_over_is_not_walked_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    os.chown(data, *NOBODY)
    hand_over(data, *NOBODY)
    assert _owners(data)["sub"] == (0, 0)  # what a plugin cannot make: its dir root's again


@needs_root
def test_a_plugin_swapping_names_during_the_walk_hands_over_nothing_outside(
    tmp_path: Path,
) -> None:
    # A worker of the plugin still running (an upgrade's old one, a second server) swaps a
    # directory of its data dir with a link to a root directory while the server walks it:
    # the server went through the link (found by review, within a few walks)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("root's")
    data = tmp_path / "data"
    (data / "x" / "sub").mkdir(parents=True)
    (data / "x" / "file").write_text("the plugin's")
    os.symlink(victim, data / "link")
    walks = 0
    with swapping(data / "x", data / "link"):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            os.chown(data, 0, 0)  # handed back to root: walked again
            hand_over(data, *NOBODY)
            walks += 1
            assert set(_owners(victim).values()) == {(0, 0)}, f"after {walks} walks"
    assert walks > 10


@needs_root
def test_a_tree_deeper_than_the_walk_goes_is_handed_over_as_far_as_it_goes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    levels = fdio.MAX_DEPTH + 10
    data.joinpath(*map(str, range(levels))).mkdir(parents=True)
    hand_over(data, *NOBODY)  # (os.walk's recursion failed on a deep enough tree)
    owners = _owners(data)
    assert owners["0"] == owners[str(fdio.MAX_DEPTH - 1)] == NOBODY
    assert owners[str(levels - 1)] == (0, 0)


@pytest.mark.parametrize("instead", ["file", "dangling link", "none"])
def test_tmp_is_made_a_directory_of_the_workers_user_whatever_took_its_place(
    tmp_path: Path, instead: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    if instead == "file":
        (data / ".tmp").write_text("not a directory")
    elif instead == "dangling link":
        os.symlink(tmp_path / "nowhere", data / ".tmp")
    identity = NOBODY if os.geteuid() == 0 else None
    make_tmp(data, identity)
    st = os.lstat(data / ".tmp")
    assert stat.S_ISDIR(st.st_mode)  # (lstat: not a link to one)
    assert oct(st.st_mode & 0o777) == "0o700"
    if identity is not None:
        assert (st.st_uid, st.st_gid) == identity
    assert not (tmp_path / "nowhere").exists()


def test_a_plugin_copy_is_made_readable_to_the_workers_user(tmp_path: Path) -> None:
    tree = tmp_path / "copy"
    (tree / "pkg").mkdir(parents=True)
    (tree / "pkg" / "mod.py").write_text("x = 1")
    (tree / "run.sh").write_text("#!/bin/sh")
    os.symlink("/etc/hostname", tree / "pointer")
    for path, mode in ((tree / "pkg" / "mod.py", 0o600), (tree / "run.sh", 0o700)):
        path.chmod(mode)
    for path in (tree, tree / "pkg"):
        path.chmod(0o700)
    before = os.stat("/etc/hostname").st_mode
    readable_to_all(tree)
    modes = {p.name: oct(os.lstat(p).st_mode & 0o777) for p in (tree, *tree.rglob("*"))}
    assert modes == {
        "copy": "0o755",
        "pkg": "0o755",
        "mod.py": "0o644",
        "run.sh": "0o755",
        "pointer": "0o777",  # a link's own mode; what it points to is not touched
    }
    assert os.stat("/etc/hostname").st_mode == before
