"""Jitted device steps over the paged KV cache.

One step feeds a chunk of tokens per row (``rows`` index cache slots), writes their K/V into the pages,
attends through ``timjax.kernels`` and returns the float32 logits of each row's last fed token. A chunk
of length 1 is a decode step (the decode kernel); longer chunks are extend steps (prompt prefill, forced
tokens, tool results, re-encoding after pruning). The cache is donated: the page pool is updated in place.

Callers keep shapes in a few buckets (rows padded to a power of two, chunk lengths to a power of two) so
repeated steps reuse compiled code.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from timjax import kernels
from timjax.cache import KVCache, layer_pages, reserve
from timjax.config import Qwen3Config
from timjax.model import Params, forward_hidden, lm_head
from timjax.sampling import SamplingParams, sample


def _paged_attend(q, k, v, layer, kv, *, page_table, q_start, q_len, page_size, num_pages, impl):
    """Write this chunk's K/V into the pool, then attend over each row's pages.
    q [R, T, Hq, hd]; k, v [R, T, Hkv, hd]; kv = (k_pool, v_pool) each [Hkv, L * P, ps, hd] (see cache.py)."""
    k_pool, v_pool = kv
    R, T = q.shape[:2]
    pages = layer_pages(page_table, layer, num_pages)  # this layer's physical pages
    slot = q_start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [R, T]
    valid = jnp.arange(T)[None, :] < q_len[:, None]
    col = jnp.clip(slot // page_size, 0, pages.shape[1] - 1)
    page = jnp.where(valid, jnp.take_along_axis(pages, col, axis=1), k_pool.shape[1])  # padding -> dropped
    off = slot % page_size
    # Index [:, page, off] keeps Hkv first: the update is [Hkv, R, T, hd].
    k_pool = k_pool.at[:, page, off].set(k.transpose(2, 0, 1, 3).astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[:, page, off].set(v.transpose(2, 0, 1, 3).astype(v_pool.dtype), mode="drop")
    if T == 1:
        out = kernels.decode_attention(q[:, 0], k_pool, v_pool, q_start + q_len, pages, impl=impl)[:, None]
    else:
        out = kernels.extend_attention(q, k_pool, v_pool, q_start, q_len, pages, impl=impl)
    return out.astype(q.dtype), (k_pool, v_pool)


def forward_step(params: Params, cache: KVCache, rows: jax.Array, tokens: jax.Array, q_len: jax.Array, *,
                 cfg: Qwen3Config, impl: str = "auto", max_new_pages: int,
                 kv_pages: int | None = None) -> tuple[jax.Array, KVCache]:
    """Feed ``tokens[i, :q_len[i]]`` to slot ``rows[i]``; return logits [R, V] at each row's last token.

    Rows with ``q_len == 0`` (padding) or whose slot is out of pages (``cache.oom``) write nothing and
    their logits are meaningless; the host reads ``cache.oom`` after the step. ``kv_pages`` (static)
    bounds the page-table columns attention looks at, so its cost follows the live lengths rather than
    ``max_seq_len``; it must cover every row's pages after this step.
    """
    cache = reserve(cache, rows, q_len, max_new_pages=max_new_pages)
    q_len = jnp.where(cache.oom[rows], 0, q_len)
    q_start = cache.lengths[rows]
    positions = q_start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    attend = partial(_paged_attend, page_table=cache.page_table[rows][:, :kv_pages], q_start=q_start, q_len=q_len,
                     page_size=cache.page_size, num_pages=cache.num_pages, impl=impl)
    x, (k, v) = forward_hidden(params, cfg, tokens, positions, attend, (cache.k, cache.v))
    last = jnp.take_along_axis(x, jnp.maximum(q_len - 1, 0)[:, None, None], axis=1)[:, 0]  # [R, D]
    return lm_head(params, last), cache.replace(k=k, v=v, lengths=cache.lengths.at[rows].add(q_len))


def _max_new_pages(chunk: int, page_size: int) -> int:
    return -(-chunk // page_size) + 1


@partial(jax.jit, static_argnames=("cfg", "impl", "kv_pages"), donate_argnames=("cache",))
def logits_step(params, cache, rows, tokens, q_len, *, cfg, impl="auto", kv_pages=None):
    """forward_step alone, for callers that fill a token mask on the host while the device runs."""
    return forward_step(params, cache, rows, tokens, q_len, cfg=cfg, impl=impl, kv_pages=kv_pages,
                        max_new_pages=_max_new_pages(tokens.shape[1], cache.page_size))


@jax.jit
def sample_step(logits: jax.Array, sampling: SamplingParams, bitmask: jax.Array | None = None) -> jax.Array:
    return sample(logits, sampling, bitmask)


@partial(jax.jit, static_argnames=("cfg", "impl", "kv_pages"), donate_argnames=("cache",))
def generate_step(params, cache, rows, tokens, q_len, sampling, bitmask=None, *, cfg, impl="auto", kv_pages=None):
    """Forward and sample in one dispatch: int32 [R] next tokens and the updated cache."""
    logits, cache = forward_step(params, cache, rows, tokens, q_len, cfg=cfg, impl=impl, kv_pages=kv_pages,
                                 max_new_pages=_max_new_pages(tokens.shape[1], cache.page_size))
    return sample(logits, sampling, bitmask), cache


@partial(jax.jit, static_argnames=("cfg", "impl", "num_steps"), donate_argnames=("cache",))
def decode_loop(params, cache, tokens, active, sampling, stop_ids, budget, *, cfg, impl="auto", num_steps):
    """``num_steps`` decode steps for every slot in one dispatch (``lax.scan``), for unconstrained decoding.

    tokens int32 [S]: each slot's last sampled token (not yet in the cache); active bool [S];
    stop_ids int32 [K] (pad with -1); budget int32 [S]: tokens each slot may still sample.
    Returns (sampled [num_steps, S] with -1 after a slot stopped, the updated cache, tokens, active).
    A slot stops after sampling a stop id, when its budget runs out, or when it runs out of pages.
    """
    rows = jnp.arange(tokens.shape[0], dtype=jnp.int32)

    def body(carry, _):
        cache, tokens, active, counter, budget = carry
        logits, cache = forward_step(params, cache, rows, tokens[:, None], active.astype(jnp.int32), cfg=cfg,
                                     impl=impl, max_new_pages=1)
        active = active & ~cache.oom
        nxt = sample(logits, SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p,
                                            sampling.seed, counter), None)
        out = jnp.where(active, nxt, -1)
        budget = budget - active
        stopped = jnp.isin(nxt, stop_ids) | (budget <= 0)
        tokens = jnp.where(active, nxt, tokens)
        counter = counter + active
        return (cache, tokens, active & ~stopped, counter, budget), out

    (cache, tokens, active, _, _), sampled = jax.lax.scan(
        body, (cache, tokens, active, sampling.counter, budget), None, length=num_steps)
    return sampled, cache, tokens, active
