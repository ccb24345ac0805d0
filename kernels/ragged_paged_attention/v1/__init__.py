"""Ragged paged attention v1: Triton-backend Pallas kernel (see kernel.py)."""

from .kernel import num_q_blocks, ragged_paged_attention, validate
from .tuned_block_sizes import TUNED, Tuning, auto_k_splits, get_tuned

__all__ = ["TUNED", "Tuning", "auto_k_splits", "get_tuned", "num_q_blocks", "ragged_paged_attention", "validate"]
