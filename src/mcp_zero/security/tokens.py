"""Bearer tokens: generated once, shown once, stored only as a hash.

Tokens carry 256 random bits, so a single SHA-256 is the right hash (as for
GitHub or PyPI API tokens): a slow password hash would add no safety and cost
every request milliseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from mcp_zero.security.files import write_atomically

PREFIX = "mcp0_"


def new_token() -> str:
    """A fresh random bearer token, ``mcp0_`` followed by 43 URL-safe characters."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(token: str, token_hash: str) -> bool:
    """Constant-time comparison of a presented token with a stored hash."""
    return hmac.compare_digest(hash_token(token), token_hash)


def write_secret_file(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` readable by the owner only (mode 0600), atomically (see
    :func:`mcp_zero.security.files.write_atomically`). Raises OSError; nothing is left behind."""
    write_atomically(path, content.encode(), mode=0o600)
