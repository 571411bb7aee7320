"""Longest-prefix search over a chained-key sequence in O(log n) membership probes."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def longest_prefix(keys: Sequence[int], held: Callable[[int], bool], known: int = 0) -> int:
    """How many leading ``keys`` satisfy ``held``, given the first ``known`` do.

    An engine's cached set is prefix-closed (a chained key at block i implies blocks 0..i-1, and
    vLLM evicts tails first), so ``held`` over positions is true then false: binary search for the
    boundary. The result ``n`` is verified: ``keys[n-1]`` held (or n == known) and ``keys[n]`` not.
    """
    lo, hi = known, len(keys)  # invariant: keys[:lo] held; keys[hi:] not held
    if lo >= hi:
        return hi
    # Common cases first: a cold request misses at the first probe, a repeat hits at the last.
    if not held(keys[lo]):
        return lo
    lo += 1
    if held(keys[hi - 1]):
        return hi
    hi -= 1
    while lo < hi:
        mid = (lo + hi) // 2
        if held(keys[mid]):
            lo = mid + 1
        else:
            hi = mid
    return lo
