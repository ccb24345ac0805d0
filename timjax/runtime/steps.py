"""Jitted device steps over the paged KV cache.

One step feeds a chunk of tokens per row (``rows`` index cache slots), writes their K/V into the pages,
attends through ``timjax.kernels`` and returns the float32 logits of each row's last fed token. A chunk
of length 1 is a decode step (the decode kernel); longer chunks are extend steps (prompt prefill, forced
tokens, tool results, re-encoding after pruning). The cache is donated: the page pool is updated in place.

Callers keep shapes in a few buckets (rows padded to a power of two, chunk lengths to a power of two) so
repeated steps reuse compiled code.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from timjax import kernels
from timjax.base.buckets import cdiv
from timjax.base.config import Qwen3Config
from timjax.qwen3.model import Params, forward_hidden, lm_head
from timjax.runtime import sharding
from timjax.runtime.cache import KVCache, layer_pages, push_free, raise_borrowed, reserve, shrink
from timjax.runtime.sampling import SamplingParams, sample


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


def forward_step(
    params: Params,
    cache: KVCache,
    rows: jax.Array,
    tokens: jax.Array,
    q_len: jax.Array,
    *,
    cfg: Qwen3Config,
    impl: str = "auto",
    max_new_pages: int,
    kv_pages: int | None = None,
) -> tuple[jax.Array, KVCache]:
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
    attend = partial(
        _paged_attend,
        page_table=cache.page_table[rows][:, :kv_pages],
        q_start=q_start,
        q_len=q_len,
        page_size=cache.page_size,
        num_pages=cache.num_pages,
        impl=impl,
    )
    x, (k, v) = forward_hidden(params, cfg, tokens, positions, attend, (cache.k, cache.v))
    last = jnp.take_along_axis(x, jnp.maximum(q_len - 1, 0)[:, None, None], axis=1)[:, 0]  # [R, D]
    return lm_head(params, last), cache.replace(k=k, v=v, lengths=cache.lengths.at[rows].add(q_len))


def _max_new_pages(chunk: int, page_size: int) -> int:
    return cdiv(chunk, page_size) + 1


@partial(jax.jit, static_argnames=("cfg", "impl", "kv_pages"), donate_argnames=("cache",))
def logits_step(params, cache, rows, tokens, q_len, *, cfg, impl="auto", kv_pages=None):
    """forward_step alone, for callers that fill a token mask on the host while the device runs."""
    return forward_step(
        params,
        cache,
        rows,
        tokens,
        q_len,
        cfg=cfg,
        impl=impl,
        kv_pages=kv_pages,
        max_new_pages=_max_new_pages(tokens.shape[1], cache.page_size),
    )


@jax.jit
def sample_step(logits: jax.Array, sampling: SamplingParams, bitmask: jax.Array | None = None) -> jax.Array:
    return sample(logits, sampling, bitmask)


@partial(jax.jit, static_argnames=("cfg", "impl", "kv_pages"), donate_argnames=("cache",))
def generate_step(params, cache, rows, tokens, q_len, sampling, bitmask=None, *, cfg, impl="auto", kv_pages=None):
    """Forward and sample in one dispatch: int32 [R] next tokens and the updated cache."""
    logits, cache = forward_step(
        params,
        cache,
        rows,
        tokens,
        q_len,
        cfg=cfg,
        impl=impl,
        kv_pages=kv_pages,
        max_new_pages=_max_new_pages(tokens.shape[1], cache.page_size),
    )
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
        logits, cache = forward_step(
            params, cache, rows, tokens[:, None], active.astype(jnp.int32), cfg=cfg, impl=impl, max_new_pages=1
        )
        active = active & ~cache.oom
        nxt = sample(
            logits, SamplingParams(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, counter), None
        )
        out = jnp.where(active, nxt, -1)
        budget = budget - active
        stopped = jnp.isin(nxt, stop_ids) | (budget <= 0)
        tokens = jnp.where(active, nxt, tokens)
        counter = counter + active
        return (cache, tokens, active & ~stopped, counter, budget), out

    (cache, tokens, active, _, _), sampled = jax.lax.scan(
        body, (cache, tokens, active, sampling.counter, budget), None, length=num_steps
    )
    return sampled, cache, tokens, active


# ---------------------------------------------------------------------------------------------- the ragged step
@partial(
    jax.tree_util.register_dataclass, data_fields=["tokens", "token_row", "rows", "q_len", "cu_q_lens"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Packed:
    """One iteration's tokens, every row's chunk back to back (dimension letters: N packed tokens, R rows).

    tokens int32 [N] (tokens at index >= cu_q_lens[R] are padding); token_row int32 [N] the row of each
    token (padding: any row); rows int32 [R] the cache slot of each row (padding rows: any slot, q_len 0);
    q_len int32 [R]; cu_q_lens int32 [R + 1] prefix sums of q_len."""

    tokens: jax.Array
    token_row: jax.Array
    rows: jax.Array
    q_len: jax.Array
    cu_q_lens: jax.Array


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["lengths", "slot", "start", "end", "length", "borrowed", "evict"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Edits:
    """Cache edits applied at the start of a step, for every affected slot at once (dimension E: edit rows).

    lengths int32 [S]: every slot's length after the edits (<= its length now): 0 releases a finished or
    preempted slot, a cut point truncates for re-encode, ``length - (end - start)`` follows a compaction.
    slot, start, end, length int32 [E]: shift-mode compactions (remove [start, end) of ``length`` cached
    slots, move the suffix down and re-rotate its keys); unused entries have start == end.
    borrowed int32 [S] or None: each slot's leading pages held by the host's prefix index, applied first
    (``timjax.runtime.cache.raise_borrowed``) so a release in the same step leaves them cached.
    evict int32 [Ev] or None: cached pages the prefix index evicted, back to the free stack before the step's
    pages are reserved (-1 = padding)."""

    lengths: jax.Array
    slot: jax.Array
    start: jax.Array
    end: jax.Array
    length: jax.Array
    borrowed: jax.Array | None = None
    evict: jax.Array | None = None


def _apply_edits(cache: KVCache, edits: Edits, *, kv_pages: int, rope_theta: float, impl: str) -> KVCache:
    """Index pages first, compactions (only when one is pending: ``lax.cond``), then one shrink for releases
    and cuts."""
    cache = raise_borrowed(cache, edits.borrowed)
    if edits.slot.shape[0]:
        L, P = cache.num_layers, cache.num_pages

        def compact(kv):
            # Each (edit, layer) pair is a row for the kernel: one call covers every layer of every edit.
            pt = cache.page_table[edits.slot][:, :kv_pages]  # [E, W]
            per_layer = (pt[:, None, :] + (jnp.arange(L, dtype=jnp.int32) * P)[None, :, None]).reshape(-1, pt.shape[1])
            rep = lambda x: jnp.repeat(x, L)
            return kernels.compact(
                *kv, per_layer, rep(edits.start), rep(edits.end), rep(edits.length), rope_theta=rope_theta, impl=impl
            )

        k, v = jax.lax.cond(jnp.any(edits.end > edits.start), compact, lambda kv: kv, (cache.k, cache.v))
        cache = cache.replace(k=k, v=v)
    cache = shrink(cache, jnp.minimum(edits.lengths, cache.lengths))
    if edits.evict is not None:
        cache = push_free(cache, edits.evict)
    return cache.replace(oom=jnp.zeros_like(cache.oom))  # the host read last step's flags in its sync


def prepare(
    cache: KVCache, packed: Packed, edits: Edits, *, kv_pages: int, max_new_pages: int, rope_theta: float, impl: str
) -> tuple[KVCache, jax.Array]:
    """The allocator's part of a step: edits, then pages for every row's chunk. Returns the cache and the
    rows' q_len with rows that got no pages zeroed (they write nothing)."""
    cache = _apply_edits(cache, edits, kv_pages=kv_pages, rope_theta=rope_theta, impl=impl)
    cache = reserve(cache, packed.rows, packed.q_len, max_new_pages=max_new_pages)
    return cache, jnp.where(cache.oom[packed.rows], 0, packed.q_len)


def _ragged_attend(
    q, k, v, layer, kv, *, packed, page_table, q_start, slot, valid, page_size, num_pages, impl, decode=False
):
    """Write the packed chunk's K/V into the pool, then attend: q [1, N, Hq, hd], k, v [1, N, Hkv, hd].
    ``decode`` (static): every row feeds at most one token, so each token attends over its own row's pages
    up to its position with the decode kernel (no tiles, no causal mask inside a chunk)."""
    k_pool, v_pool = kv
    pages = layer_pages(page_table, layer, num_pages)  # [R, W] this layer's physical pages
    col = jnp.clip(slot // page_size, 0, pages.shape[1] - 1)
    page = jnp.where(valid, pages[packed.token_row, col], k_pool.shape[1])  # padding -> dropped
    off = slot % page_size
    k_pool = k_pool.at[:, page, off].set(k[0].transpose(1, 0, 2).astype(k_pool.dtype), mode="drop")
    v_pool = v_pool.at[:, page, off].set(v[0].transpose(1, 0, 2).astype(v_pool.dtype), mode="drop")
    if decode:
        lengths = jnp.where(valid, slot + 1, 0)  # padding tokens attend to nothing (their output is zero)
        out = kernels.decode_attention(q[0], k_pool, v_pool, lengths, pages[packed.token_row], impl=impl)
    else:
        out = kernels.ragged_attention(q[0], k_pool, v_pool, pages, q_start, packed.q_len, packed.cu_q_lens, impl=impl)
    return out[None].astype(q.dtype), (k_pool, v_pool)


def ragged_forward(
    params: Params,
    cache: KVCache,
    packed: Packed,
    edits: Edits,
    *,
    cfg: Qwen3Config,
    impl: str,
    kv_pages: int,
    max_new_pages: int,
    decode: bool = False,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Apply ``edits``, then feed every row's chunk (``decode``: each chunk is at most one token); return float32 logits [R, V] at each row's last token,
    a non-finite flag per row (bool [R]), and the cache. Rows whose pages do not fit (``cache.oom``; the
    scheduler's accounting makes it an internal error) write nothing."""
    cache, q_len = prepare(
        cache, packed, edits, kv_pages=kv_pages, max_new_pages=max_new_pages, rope_theta=cfg.rope_theta, impl=impl
    )
    q_start = cache.lengths[packed.rows]  # [R]
    n = jnp.arange(packed.tokens.shape[0], dtype=jnp.int32)
    slot = q_start[packed.token_row] + n - packed.cu_q_lens[packed.token_row]  # [N] == RoPE position
    valid = (n < packed.cu_q_lens[-1]) & (n - packed.cu_q_lens[packed.token_row] < q_len[packed.token_row])
    packed = dataclasses.replace(packed, q_len=q_len)
    attend = partial(
        _ragged_attend,
        packed=packed,
        page_table=cache.page_table[packed.rows][:, :kv_pages],
        q_start=q_start,
        slot=slot,
        valid=valid,
        page_size=cache.page_size,
        num_pages=cache.num_pages,
        impl=impl,
        decode=decode,
    )
    x, (k, v) = forward_hidden(params, cfg, packed.tokens[None], slot[None], attend, (cache.k, cache.v))
    last = jnp.clip(packed.cu_q_lens[1:] - 1, 0, packed.tokens.shape[0] - 1)  # [R]
    logits = sharding.whole_logits(lm_head(params, x[0, last]), impl)  # replicated for sampling (sharded runs)
    bad = ~jnp.isfinite(logits).all(axis=-1)
    return logits, bad, cache.replace(k=k, v=v, lengths=cache.lengths.at[packed.rows].add(q_len))


_RAGGED_STATIC = ("cfg", "impl", "kv_pages", "max_new_pages", "decode")


@partial(jax.jit, static_argnames=_RAGGED_STATIC, donate_argnames=("cache",))
def ragged_logits_step(params, cache, packed, edits, *, cfg, impl="auto", kv_pages, max_new_pages, decode=False):
    """The ragged forward alone: for iterations with grammar-masked rows (the host fills masks meanwhile)."""
    kw = dict(cfg=cfg, impl=impl, kv_pages=kv_pages, max_new_pages=max_new_pages, decode=decode)
    return ragged_forward(params, cache, packed, edits, **kw)


@partial(jax.jit, static_argnames=_RAGGED_STATIC, donate_argnames=("cache",))
def ragged_generate_step(
    params, cache, packed, edits, sampling, *, cfg, impl="auto", kv_pages, max_new_pages, decode=False
):
    """Edits, forward and sample in one dispatch: (int32 [R] next tokens, bool [R] non-finite, cache)."""
    kw = dict(cfg=cfg, impl=impl, kv_pages=kv_pages, max_new_pages=max_new_pages, decode=decode)
    logits, bad, cache = ragged_forward(params, cache, packed, edits, **kw)
    return sample(logits, sampling), bad, cache


# ---------------------------------------------------------------------------------------------- one transfer a step
def flat_layout(n_tokens: int, n_slots: int, n_edits: int, n_evict: int = 0, decode: bool = False) -> tuple:
    """The static layout of ``flatten_inputs``: (N, S, E, Ev, decode); ``decode``: no row feeds more than one
    token (the decode attention kernel, not the ragged one)."""
    return n_tokens, n_slots, n_edits, n_evict, decode


def flatten_inputs(packed: Packed, edits: Edits, sampling: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Host side: every per-step input in one int32 and one float32 array, so a step costs two small
    transfers instead of fifteen (the host loop's share of a small decode step is mostly transfers)."""
    ints = np.concatenate(
        [
            packed.tokens,
            packed.token_row,
            packed.q_len,
            packed.cu_q_lens,
            edits.lengths,
            edits.slot,
            edits.start,
            edits.end,
            edits.length,
            edits.borrowed if edits.borrowed is not None else np.zeros_like(edits.lengths),
            edits.evict if edits.evict is not None else np.zeros(0, np.int32),
            sampling.top_k,
            np.asarray(sampling.seed, np.uint32).view(np.int32),
            sampling.counter,
        ]
    ).astype(np.int32)
    floats = np.concatenate([sampling.temperature, sampling.top_p]).astype(np.float32)
    return ints, floats


def unflatten_inputs(ints: jax.Array, floats: jax.Array, layout: tuple[int, ...]):
    N, S, E, Ev = (*layout, 0)[:4]  # (a 5th entry, ``decode``, is for the forward)
    sizes = [N, N, S, S + 1, S, E, E, E, E, S, Ev, S, S, S]
    parts, at = [], 0
    for n in sizes:
        parts.append(ints[at : at + n])
        at += n
    tokens, token_row, q_len, cu, lengths, slot, start, end, length, borrowed, evict, top_k, seed, counter = parts
    packed = Packed(tokens, token_row, jnp.arange(S, dtype=jnp.int32), q_len, cu)
    sampling = SamplingParams(floats[:S], top_k, floats[S:], jax.lax.bitcast_convert_type(seed, jnp.uint32), counter)
    return packed, Edits(lengths, slot, start, end, length, borrowed, evict if Ev else None), sampling


_FLAT_STATIC = ("cfg", "impl", "kv_pages", "max_new_pages", "layout")


def _flat_forward(params, cache, ints, floats, prev, *, cfg, impl, kv_pages, max_new_pages, layout):
    packed, edits, sampling = unflatten_inputs(ints, floats, layout)
    if prev is not None:  # overlap: a decode row's input is the previous step's sample, never read by the host
        tokens = jnp.where(packed.tokens < 0, prev[packed.token_row], packed.tokens)
        packed = dataclasses.replace(packed, tokens=tokens)
    decode = bool(layout[4]) if len(layout) > 4 else False
    logits, bad, cache = ragged_forward(
        params, cache, packed, edits, cfg=cfg, impl=impl, kv_pages=kv_pages, max_new_pages=max_new_pages, decode=decode
    )
    # one flag word per row, so the host never reads the (donated) cache for them: 1 non-finite, 2 out of pages
    flags = bad.astype(jnp.int32) | (cache.oom[packed.rows].astype(jnp.int32) << 1)
    return logits, flags, sampling, cache


@partial(jax.jit, static_argnames=_FLAT_STATIC, donate_argnames=("cache",))
def flat_logits_step(params, cache, ints, floats, prev=None, *, cfg, impl="auto", kv_pages, max_new_pages, layout):
    """``ragged_logits_step`` over ``flatten_inputs``; also returns the sampling settings for ``sample_step``.
    ``prev`` int32 [S] (or None): a negative packed token is replaced by its row's entry (the token that
    slot sampled in the step before, never read by the host). The second output is
    the flag word per row (1: non-finite logits, 2: out of pages)."""
    kw = dict(cfg=cfg, impl=impl, kv_pages=kv_pages, max_new_pages=max_new_pages, layout=layout)
    return _flat_forward(params, cache, ints, floats, prev, **kw)


@partial(jax.jit, static_argnames=_FLAT_STATIC, donate_argnames=("cache",))
def flat_generate_step(params, cache, ints, floats, prev=None, *, cfg, impl="auto", kv_pages, max_new_pages, layout):
    """``ragged_generate_step`` over ``flatten_inputs`` (``prev`` and the flags as ``flat_logits_step``)."""
    kw = dict(cfg=cfg, impl=impl, kv_pages=kv_pages, max_new_pages=max_new_pages, layout=layout)
    logits, flags, sampling, cache = _flat_forward(params, cache, ints, floats, prev, **kw)
    return sample(logits, sampling), flags, cache
