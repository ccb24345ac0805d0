"""Pallas / pure-jnp kernels for timjax: arrays in, arrays out (no model knowledge).

Dimension letters (B, T, N, R, S, L, P, ps, W, hd, Hq, Hkv, G, ...) are defined in kernels/README.md."""

from .compaction import compact_pages, compact_pages_reference, rope_inv_freq, rotate_keys, rotate_slots_reference
from .compaction import rotate_slots as rotate_slots_pallas
from .ops import (
    IMPLS,
    compact,
    decode_attention,
    extend_attention,
    ragged_attention,
    register,
    resolve_impl,
    rotate_slots,
)
from .paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_extend_attention,
    paged_extend_attention_reference,
)
from .ragged_paged_attention import ragged_paged_attention_reference
from .ragged_paged_attention.v1 import ragged_paged_attention

__all__ = [
    "IMPLS",
    "compact",
    "decode_attention",
    "extend_attention",
    "register",
    "resolve_impl",
    "rotate_slots",
    "compact_pages",
    "compact_pages_reference",
    "rotate_slots_pallas",
    "rotate_slots_reference",
    "rope_inv_freq",
    "rotate_keys",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_extend_attention",
    "paged_extend_attention_reference",
    "ragged_attention",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
]
