"""Block keys: the chained hash of full KV blocks, computed the same way everywhere.

vLLM caches only *full* blocks of ``block_size`` tokens, each identified by a hash that covers
its parent's hash, so a block key names the whole prefix up to and including that block. The
router never trusts an engine's own hash numbers (they are seeded per process); it recomputes
keys from token ids with this module, scoped by model, LoRA adapter and cache salt.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

TOKEN_ID_BYTES = 4  # each token id hashes as one uint32


def chain_root(model: str, lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The seed of a hash chain: requests that differ in model, adapter or salt never share keys."""
    scope = f"{model}\x00{lora_name or ''}\x00{cache_salt or ''}".encode()
    return int(xxhash.xxh3_64_intdigest(scope))


def block_keys(
    tokens: Sequence[int], block_size: int, root: int, *, max_blocks: int | None = None
) -> list[int]:
    """Chained 64-bit keys of the full blocks of ``tokens``; a trailing partial block has none."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n_blocks = len(tokens) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        return []
    buf = token_bytes(tokens[: n_blocks * block_size])
    return chain_bytes(buf, block_size * TOKEN_ID_BYTES, root)


def token_bytes(tokens: Sequence[int]) -> bytes | memoryview:
    """Token ids as the (native-order) uint32 bytes that keys are hashed over.

    A uint32 array is viewed in place (the router keeps prompts as such); anything else is copied.
    """
    if isinstance(tokens, array) and tokens.typecode == "I":
        return memoryview(tokens).cast("B")
    return array("I", tokens).tobytes()


def chain_bytes(buf: bytes | memoryview, step: int, parent: int) -> list[int]:
    """Chained keys of ``buf`` cut into ``step``-byte blocks (whole blocks only), from ``parent``."""
    keys: list[int] = []
    digest = xxhash.xxh3_64_intdigest
    for off in range(0, len(buf) - step + 1, step):
        parent = digest(buf[off : off + step], seed=parent)
        keys.append(parent)
    return keys


def extend_keys(parent: int, tokens: Sequence[int], block_size: int) -> list[int]:
    """Keys of ``tokens`` (a whole number of blocks) continuing a chain from ``parent``."""
    if len(tokens) % block_size:
        raise ValueError("extend_keys takes whole blocks only")
    return block_keys(tokens, block_size, parent)
