"""Secret files and the signing key: written whole, private from creation, and safe when
processes write them at once."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_zero.security.tokens import write_secret_file


def test_a_secret_file_is_private_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    write_secret_file(path, "one\n")
    write_secret_file(path, "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]


def test_secret_files_written_at_once_each_land_whole(tmp_path: Path) -> None:
    # all wrote admin.token.tmp: one renamed another's away (FileNotFoundError)
    path = tmp_path / "admin.token"
    failures: list[BaseException] = []
    start = threading.Barrier(8)

    def write(writer: int) -> None:
        start.wait(timeout=10)
        for i in range(50):
            try:
                write_secret_file(path, f"token-{writer}-{i}\n" * 100)
            except Exception as exc:  # any failure fails the test below
                failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    lines = set(path.read_text().splitlines())
    assert len(lines) == 1  # one writer's content, whole
    assert [p.name for p in tmp_path.iterdir()] == ["admin.token"]


def test_a_secret_file_that_cannot_be_written_leaves_the_old_one_and_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin.token"
    write_secret_file(path, "old\n")
    (tmp_path / "taken").mkdir()  # a rename over a directory fails, as a full disk would
    with pytest.raises(IsADirectoryError):
        write_secret_file(tmp_path / "taken", "new\n")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token", "taken"]


def test_signing_keys_made_at_once_by_several_processes_are_one_pair(tmp_path: Path) -> None:
    # each wrote its own key and .pub, through the same .tmp: FileNotFoundError, or a key
    # and a .pub of different keys
    for attempt in range(3):
        key_path = tmp_path / f"data{attempt}" / "keys" / "signing.key"
        key_path.parent.mkdir(parents=True)
        makers = [
            subprocess.Popen(
                [sys.executable, "-m", "mcp_zero.security.keys", str(key_path)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        for maker in makers:
            _, err = maker.communicate(timeout=60)
            assert maker.returncode == 0, err
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert key_path.with_suffix(".pub").read_bytes() == public
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        assert sorted(p.name for p in key_path.parent.iterdir()) == [
            "signing.key",
            "signing.key.lock",
            "signing.pub",
        ]


def test_a_public_key_that_does_not_match_its_key_is_written_anew(tmp_path: Path) -> None:
    from mcp_zero.security.keys import load_or_create_signing_key

    key_path = tmp_path / "signing.key"
    key = load_or_create_signing_key(key_path)
    other = Ed25519PrivateKey.generate().public_key()
    key_path.with_suffix(".pub").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    again = load_or_create_signing_key(key_path)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (
        again.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public
    )
    assert key_path.with_suffix(".pub").read_bytes() == public
