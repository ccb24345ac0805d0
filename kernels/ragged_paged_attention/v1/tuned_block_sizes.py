"""Tuned launch parameters for the v1 ragged kernel, per (head_dim, group, page_size) shape class.

The figures behind each entry (registers, spills, shared memory from ptxas for sm_90a, no GPU needed)
are in kernels/TUNING.md, produced by tests/test_compile_h100.py. Keys not in the table fall back to
the rule the sweep keeps picking: ``block_m`` 32 rows x ``block_k`` 64 slots at 4 warps, one stage (64-row
blocks at hd 128 get their wgmma serialised by ptxas; 128 rows at 4 warps hit 255 registers and spill).
"""

from __future__ import annotations

from typing import NamedTuple


class Tuning(NamedTuple):
    block_m: int  # rows per program: tokens x G query heads
    block_k: int  # KV slots per step
    num_warps: int
    num_stages: int


# (head_dim, group, page_size) -> Tuning, chosen from the ptxas figures in kernels/TUNING.md.
# BEGIN TUNED (written by python -m timjax.kernels.tune_sm90)
TUNED: dict[tuple[int, int, int], Tuning] = {
    (64, 2, 16): Tuning(block_m=32, block_k=64, num_warps=4, num_stages=2),
    (128, 2, 1): Tuning(block_m=32, block_k=64, num_warps=4, num_stages=2),
    (128, 2, 16): Tuning(block_m=32, block_k=64, num_warps=4, num_stages=1),
    (128, 4, 1): Tuning(block_m=32, block_k=64, num_warps=4, num_stages=2),
    (128, 4, 16): Tuning(block_m=32, block_k=64, num_warps=4, num_stages=1),
}
# END TUNED


def get_tuned(*, head_dim: int, group: int, page_size: int, dtype=None) -> Tuning:
    """The launch parameters for a shape class; ``dtype`` float32 (IEEE float32 dots: FMA units, not tensor
    cores, and far more registers) gets the small blocks that compile clean for it: 16 rows x 16 slots at
    head_dim 128 (every larger block spills), 16 x 32 at head_dim <= 64 (kernels/TUNING.md, CI cases)."""
    if dtype is not None and str(dtype) == "float32":
        return Tuning(
            block_m=max(16, 1 << (max(group, 1) - 1).bit_length()),
            block_k=16 if head_dim >= 128 else 32,
            num_warps=4,
            num_stages=1,
        )
    hit = TUNED.get((head_dim, group, page_size))
    if hit is not None:
        return hit
    block_m = max(32, 1 << (max(group, 1) - 1).bit_length())  # a block holds at least one token's G heads
    if block_m <= 32:
        return Tuning(block_m=block_m, block_k=64, num_warps=4, num_stages=1)
    return Tuning(block_m=block_m, block_k=16, num_warps=8, num_stages=1)


H100_SMS = 132


def auto_k_splits(*, programs: int, slots: int, block_k: int, sms: int = H100_SMS) -> int:
    """KV partitions so that a step with few q blocks (small-batch decode) still fills the GPU: enough splits
    for ~2 programs per SM, each split at least 4 KV steps long, at most 16. 1 once the q blocks suffice."""
    if programs >= 2 * sms:
        return 1
    by_fill = -(-2 * sms // max(1, programs))
    by_len = max(1, slots // (4 * block_k))
    return max(1, min(by_fill, by_len, 16))
