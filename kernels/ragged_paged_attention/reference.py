"""Pure-JAX ragged paged attention: the "xla" path (CPU production) and the kernels' oracle.

Contract (PLAN.md, contract 2): ``q`` [N, Hq, hd] holds the packed query tokens of R rows; row r owns
flat tokens ``cu_q_lens[r] .. cu_q_lens[r] + q_len[r]`` and its query i sits at cache slot
``q_start[r] + i`` and attends causally to slots ``0 .. q_start[r] + i`` through ``page_table[r]``
[R, W]. Tokens at index >= ``cu_q_lens[R]`` are padding (output zeros).

Work is split into *tiles*: ``block_q`` consecutive query tokens of ONE row (a row of q_len n takes
``cdiv(n, block_q)`` tiles). A tile gathers its row's window of pages once and does a dense masked
softmax over it, so K/V are gathered once per tile rather than once per token, and no row is padded to
the longest chunk. The number of tiles is bounded statically: sum_r cdiv(q_len_r, bq) <=
(N + R * (bq - 1)) // bq. ``block_q`` defaults to half the mean tokens per row (power of two, <= 64): 1
for a decode-only step (one tile per token, no wasted rows), larger when extend chunks dominate, where
fewer tiles mean fewer window gathers (bench/ragged_kernel.py; on the CPU 64 beat 16 by ~1.4x on 4 x 256
prefill chunks and lost ~1.15x on one 512-token chunk beside 15 three-token rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..online_softmax import MASK_VALUE
from ..paged_attention import sanitize_page_table

__all__ = ["default_block_q", "num_tiles", "ragged_paged_attention_reference", "tile_rows"]


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def default_block_q(n_tokens: int, n_rows: int) -> int:
    """Tokens per tile for the reference: half the mean chunk length, a power of two in [1, 64]."""
    return min(64, _next_pow2(max(1, n_tokens // (2 * max(1, n_rows)))))


def num_tiles(n_tokens: int, n_rows: int, block_q: int) -> int:
    """Static upper bound on sum_r cdiv(q_len_r, block_q) when sum_r q_len_r <= n_tokens."""
    bound = (n_tokens + n_rows * (block_q - 1)) // block_q
    return max(1, min(bound, n_rows * -(-n_tokens // block_q)))


def tile_rows(q_len, n_tiles: int, block_q: int):
    """Row and first in-row query index of each tile; tiles past the last real one get q_off >= q_len.

    q_len int32 [R] -> (row [M], q_off [M]) with M = n_tiles."""
    tiles = (q_len + block_q - 1) // block_q  # [R]
    cu_tiles = jnp.cumsum(tiles)  # inclusive
    m = jnp.arange(n_tiles, dtype=jnp.int32)
    row = jnp.searchsorted(cu_tiles, m, side="right").astype(jnp.int32)
    row = jnp.minimum(row, q_len.shape[0] - 1)
    first_tile = cu_tiles[row] - tiles[row]
    q_off = (m - first_tile) * block_q
    # Tiles past the total are dead: push their offset past the row's length.
    q_off = jnp.where(m < cu_tiles[-1], q_off, jnp.iinfo(jnp.int32).max // 2)
    return row, q_off


@functools.partial(jax.jit, static_argnames=("scale", "block_q"))
def ragged_paged_attention_reference(
    q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens, *, scale=None, block_q=None
):
    """q [N, Hq, hd]; k/v_pages [Hkv, P, ps, hd]; page_table int32 [R, W]; q_start, q_len int32 [R];
    cu_q_lens int32 [R + 1] -> [N, Hq, hd] in q.dtype (padding tokens -> 0)."""
    n, hq, hd = q.shape
    hkv, num_pages, ps, _ = k_pages.shape
    r, w = page_table.shape
    g = hq // hkv
    scale = hd**-0.5 if scale is None else scale
    bq = default_block_q(n, r) if block_q is None else int(block_q)
    m = num_tiles(n, r, bq)
    q_start = q_start.astype(jnp.int32)
    q_len = q_len.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    kv_len = jnp.where(q_len > 0, q_start + q_len, 0)  # [R]
    pt = sanitize_page_table(page_table, kv_len, num_pages, ps)  # garbage entries -> page 0

    row, q_off = tile_rows(q_len, m, bq)  # [M]
    i = q_off[:, None] + jnp.arange(bq, dtype=jnp.int32)[None, :]  # in-row query index [M, bq]
    tok_ok = i < q_len[row][:, None]
    tok = jnp.where(tok_ok, cu_q_lens[row][:, None] + i, n)  # flat token, n = dropped
    qt = q[jnp.minimum(tok, n - 1)].reshape(m, bq, hkv, g, hd)

    pages = pt[row]  # [M, W]: the tile's row window, gathered once per tile
    k = jnp.swapaxes(k_pages[:, pages], 0, 1).reshape(m, hkv, w * ps, hd)
    v = jnp.swapaxes(v_pages[:, pages], 0, 1).reshape(m, hkv, w * ps, hd)
    slot = jnp.arange(w * ps, dtype=jnp.int32)
    # Slots past the row's length may hold anything (NaN): zero V there so 0 * NaN never appears.
    v = jnp.where((slot[None, :] < kv_len[row][:, None])[:, None, :, None], v, jnp.zeros((), v.dtype))

    logits = jnp.einsum("mtkgd,mksd->mkgts", qt, k, preferred_element_type=jnp.float32) * scale
    limit = q_start[row][:, None] + i  # last slot each query may see [M, bq]
    mask = (slot[None, None, :] <= limit[:, :, None]) & tok_ok[:, :, None]  # [M, bq, S]
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    p = jnp.where(mask, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("mkgts,mksd->mtkgd", p, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    o = o.reshape(m * bq, hq, hd).astype(q.dtype)
    out = jnp.zeros((n, hq, hd), q.dtype)
    # Every real token is in exactly one tile; dead tile rows carry index n and are dropped.
    return out.at[tok.reshape(-1)].set(o, mode="drop")
