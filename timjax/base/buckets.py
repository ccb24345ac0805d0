"""Shape buckets: the one power-of-two and the one ceil-div helper of the package.

Every shape a jitted function sees (the packed token count, the page-table window, the cache sizes) is
rounded up to a bucket, so that a long-lived engine compiles each step a handful of times and then never
again, whatever the prompt lengths and batch sizes that arrive.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceil division for non-negative ints."""
    return -(-a // b)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def bucket(n: int) -> int:
    """Packed token counts and pool sizes: 1, 2, 4, 8, then powers of two and their 1.5x (12, 16, 24, 32, 48, ...), so a
    packed step computes at most 33% padding beyond 8 tokens (pure powers of two would allow 50%)."""
    p = pow2(n)
    if p <= 8:
        return p
    return p * 3 // 4 if n <= p * 3 // 4 else p
