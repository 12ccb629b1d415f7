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

from mcp_zero.security.tokens import write_secret_file


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the PEM key at ``path``, creating it (mode 0600) if it does not exist."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret_file(path, pem.decode())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.with_suffix(".pub").write_bytes(public)
    return key


if __name__ == "__main__":
    load_or_create_signing_key(Path(sys.argv[1]))
