"""The server's Ed25519 signing key, created on first start and kept in the data dir.

``python -m mcp_zero.security.keys PATH`` creates the key at PATH in a process of its own:
the server does so on first start, because importing ``cryptography`` would keep ~10 MiB
resident in it for a key that a running server does not use yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mcp_zero.security.files import exclusive_lock, write_atomically


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM key at ``path``, creating it (mode 0600) if it does not exist, with its
    public key beside it (``.pub``, 0644).

    Processes that do so at once (the first commands on a new data dir) agree on one key:
    each takes a lock (``path`` + ``.lock``) and looks again under it. The public key is
    written before the private one, so a key on disk always has its ``.pub``; one that does
    not match its key (an earlier release could pair them wrongly) is written anew.
    Raises OSError, and ValueError for a file that holds no Ed25519 private key.
    """
    with exclusive_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            key = loaded
        else:
            key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        public_path = path.with_suffix(".pub")
        if not public_path.exists() or public_path.read_bytes() != public:
            write_atomically(public_path, public, mode=0o644)
        if not path.exists():
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomically(path, pem, mode=0o600)
    return key


if __name__ == "__main__":
    load_or_create_signing_key(Path(sys.argv[1]))
