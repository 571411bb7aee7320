"""Optional API keys: ``Authorization: Bearer <key>`` checked in constant time, never logged.

Keys come from ``KVSTACK_ROUTER_API_KEYS`` (comma separated) or a file with one key per line,
optionally preceded by a name (``team-a sk-...``); ``#`` starts a comment. A key is known in logs,
metrics and limits only by its name (or ``key-<n>``), never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from kvstack.common.config import ConfigError

ANONYMOUS = "anonymous"


def _digest(secret: bytes) -> bytes:
    # Comparing fixed-length digests keeps the time independent of the key's length too.
    return hashlib.sha256(secret).digest()


def read_keys_file(path: Path) -> list[tuple[str | None, str]]:
    """``(name, key)`` pairs from ``path``."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read api_keys_file {path}: {err}") from err
    pairs: list[tuple[str | None, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise ConfigError(f"api_keys_file {path}:{lineno}: expected '[name] key'")
        pairs.append((words[0], words[1]) if len(words) == 2 else (None, words[0]))
    return pairs


class KeyStore:
    """The accepted keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[tuple[str | None, str]]) -> None:
        self._keys: list[tuple[str, bytes]] = []
        for i, (name, key) in enumerate(keys, 1):
            if not key:
                raise ConfigError("api_keys: an API key may not be empty")
            self._keys.append((name or f"key-{i}", _digest(key.encode())))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: bytes | None) -> str | None:
        """The key's name for an ``Authorization`` header value; None when it is not accepted.

        Anonymous when authentication is off.
        """
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return None
        given = _digest(token.strip())
        found: str | None = None
        for name, digest in self._keys:  # no early exit: every key is compared every time
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found
