"""The float32 online-softmax step both Pallas attention kernels run per KV block (legacy padded
``paged_attention`` and ``ragged_paged_attention.v1``), with their dots and the final normalisation.

A row's running state is ``(o, m, l)``: the unnormalised output, the running max and the running sum
of ``exp(s - m)``. Masked scores count as ``MASK_VALUE`` (not ``-inf``: a row with nothing visible yet
keeps a finite max, so ``exp(m_prev - m_next)`` never sees ``inf - inf``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _precision(x):
    # Triton's default for float32 operands is TF32 (10-bit mantissa): a float32 cache asks for float32 math.
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def dot_nt(a, b):
    """``a [M, K] @ b [N, K]^T -> [M, N]`` in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """``a [M, K] @ b [K, N] -> [M, N]`` in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=jnp.float32)


def initial_state(block_m: int, hd: int):
    return (
        jnp.zeros((block_m, hd), jnp.float32),
        jnp.full((block_m,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
    )


def update(carry, s, mask, pv):
    """One KV block: ``s [M, K]`` scaled scores, ``mask [M, K]`` what each row may see, ``pv(p)`` the
    block's ``p [M, K] @ V`` in float32. Returns the next ``(o, m, l)``."""
    o_prev, m_prev, l_prev = carry
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    corr = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    l_next = corr * l_prev + jnp.sum(p, axis=-1)
    return corr[:, None] * o_prev + pv(p), m_next, l_next


def normalized(o, l, valid=True):
    """``o / l`` for valid rows that saw at least one slot; 0 elsewhere (no 0/0). ``o [..., hd]``, ``l [...]``."""
    ok = valid & (l > 0.0)
    return jnp.where(ok[..., None], o / jnp.where(ok, l, 1.0)[..., None], 0.0)


def combine_splits(o_p, m_p, l_p):
    """The normalised output from the per-split partial states of ``k_splits > 1`` (flash-decoding):
    ``o_p [S, ..., hd]``, ``m_p`` and ``l_p [S, ...]``, rescaled to the common max (log-sum-exp)."""
    m_all = jnp.max(m_p, axis=0)
    corr = jnp.exp(m_p - m_all[None])
    return normalized(jnp.sum(o_p * corr[..., None], axis=0), jnp.sum(l_p * corr, axis=0))
