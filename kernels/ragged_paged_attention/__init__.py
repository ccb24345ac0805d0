"""Ragged paged attention: decode rows (q_len 1) and extend rows (q_len many) in one call.

``reference.py`` is the pure-JAX path (CPU production, test oracle); ``v1/`` the Pallas (Triton) kernel.
Versioned folders (as in tpu-inference) let a new kernel land beside the old one and be compared.
"""

from .reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention_reference"]
