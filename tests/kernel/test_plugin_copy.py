"""The copy an install makes of a plugin directory (kernel/plugins.py ``_copy_tree``): what
was checked, never what a link points to, also while the source is being changed (it may
be a user's directory that root installs from)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mcp_zero import fdio
from mcp_zero.errors import ManifestError
from mcp_zero.kernel.plugins import _copy_tree
from requires import require_root
from swapping import swapping


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    (source / "pkg" / "__pycache__").mkdir(parents=True)
    (source / "plugin.json").write_text("{}")
    (source / "pkg" / "mod.py").write_text("x = 1")
    (source / "pkg" / "__pycache__" / "mod.pyc").write_bytes(b"\0")
    (source / ".git").write_text("left out")
    return source


def test_the_copy_holds_the_files_and_leaves_out_what_is_ignored(tmp_path: Path) -> None:
    into = tmp_path / "copy"
    into.mkdir()
    _copy_tree(_source(tmp_path), into)
    copied = sorted(str(p.relative_to(into)) for p in into.rglob("*"))
    assert copied == ["pkg", "pkg/mod.py", "plugin.json"]
    assert (into / "pkg" / "mod.py").read_text() == "x = 1"


@pytest.mark.parametrize("kind", ["link", "fifo"])
def test_a_file_that_became_a_link_or_a_fifo_is_refused(tmp_path: Path, kind: str) -> None:
    source = _source(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("root's")
    (source / "data.txt").unlink(missing_ok=True)
    if kind == "link":
        os.symlink(secret, source / "data.txt")
    else:
        os.mkfifo(source / "data.txt")  # (opened for reading it would hang the install)
    into = tmp_path / "copy"
    into.mkdir()
    expected = "a symbolic link" if kind == "link" else "a named pipe"
    with pytest.raises(ManifestError, match=rf"data\.txt .* changed .*{expected}"):
        _copy_tree(source, into)
    assert not (into / "data.txt").exists()


def test_a_file_swapped_for_a_link_meanwhile_never_brings_the_links_target(
    tmp_path: Path,
) -> None:
    # A user who owns the source swaps a checked file with an ignored link to a secret
    # while root copies it: copytree followed the link (found by review)
    source = _source(tmp_path)
    (source / "data.txt").write_text("the plugin's")
    secret = tmp_path / "secret"
    secret.write_text("ROOT-ONLY")
    os.symlink(secret, source / ".hidden")  # ignored, so never checked
    copies = refused = 0
    with swapping(source / "data.txt", source / ".hidden"):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            into = tmp_path / f"copy{copies + refused}"
            into.mkdir()
            try:
                _copy_tree(source, into)
            except ManifestError:
                refused += 1
                continue
            copies += 1
            data = into / "data.txt"
            assert not data.exists() or data.read_text() == "the plugin's"
    assert copies + refused > 10


def test_a_tree_deeper_than_a_walk_goes_fails_the_copy_naming_it(tmp_path: Path) -> None:
    # It was left out, and the install said it had succeeded (found by review)
    source = _source(tmp_path)
    source.joinpath(*map(str, range(fdio.MAX_DEPTH + 10))).mkdir(parents=True)
    into = tmp_path / "copy"
    into.mkdir()
    with pytest.raises(shutil.Error, match=r"source/0/1/2/.*', .*levels deep"):
        _copy_tree(source, into)


def test_a_mount_inside_the_source_is_copied_too(tmp_path: Path) -> None:
    # (a directory on another filesystem was left out, and the install succeeded)
    require_root("unshare")
    source = _source(tmp_path)
    into = tmp_path / "copy"
    into.mkdir()
    copy = (
        "import sys; from pathlib import Path; from mcp_zero.kernel.plugins import _copy_tree; "
        "_copy_tree(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    script = (
        f'mount -t tmpfs none "$1/pkg" && echo "V = 1" > "$1/pkg/helper.py" && '
        f'"{sys.executable}" -c "{copy}" "$1" "$2"'
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "-", source, into],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (into / "pkg" / "helper.py").read_text() == "V = 1\n"
