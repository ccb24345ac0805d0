"""The paged KV cache: a device pytree with its page table and free-page state, and jittable
allocation and release.

Layout: ``k, v: [Hkv, L * P, page_size, hd]``. Page ``p`` of layer ``l`` is physical page ``l * P + p``:
one page table serves every layer, and a layer hands the kernels the whole pool with its page table
offset by ``l * P`` (``layer_pages``), so no per-layer slice of the pool is ever materialised (a Pallas
call would copy it). Slot ``s`` of sequence ``b`` lives at page ``page_table[b, s // page_size]``, offset
``s % page_size``. Free pages form a stack
(``free_stack[:num_free]``). Everything lives on the device, so a decode step that crosses a page
boundary takes its page with no host round trip. A request that cannot be met sets ``oom[b]`` and
allocates nothing for ``b``; the host reads the flag with the sampled tokens (it syncs then anyway)
and fails or preempts that one sequence.

Prefix sharing (``timjax.engine.prefix_cache`` decides it on the host): the first ``borrowed[b]`` entries of a
row are pages the host's prefix index holds, read-only and possibly mapped by other rows too. They are
neither free nor owned by the row: ``shrink`` unmaps them without freeing, and a row writes only past them
(the host never lets a row's length fall inside a borrowed page without unmapping it). ``map_prefix``
maps index pages into rows; ``push_free`` returns evicted index pages to the free stack.
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

# Logical axes of the pool k / v (timjax.runtime.sharding maps them to mesh axes: kv heads over tensor parallel).
POOL_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


@partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "page_table", "lengths", "pages_owned", "borrowed", "free_stack", "num_free", "oom"],
    meta_fields=["page_size", "num_layers"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [Hkv, L * P, ps, hd]
    v: jax.Array  # [Hkv, L * P, ps, hd]
    page_table: jax.Array  # int32 [S, max_pages_per_seq]
    lengths: jax.Array  # int32 [S] tokens cached per sequence slot
    pages_owned: jax.Array  # int32 [S] pages in each row's page table (borrowed ones included)
    borrowed: jax.Array  # int32 [S] leading pages of each row held by the host's prefix index (never freed here)
    free_stack: jax.Array  # int32 [P]; free_stack[:num_free] are free
    num_free: jax.Array  # int32 []
    oom: jax.Array  # bool [S] an allocation for this slot failed
    page_size: int
    num_layers: int

    @property
    def num_pages(self) -> int:
        """Pages per layer (what the page table indexes)."""
        return self.k.shape[1] // self.num_layers

    @property
    def max_seqs(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.max_pages_per_seq * self.page_size

    def replace(self, **kw) -> KVCache:
        return dataclasses.replace(self, **kw)


def kv_bytes_per_token(cfg: Qwen3Config, dtype) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for_budget(
    cfg: Qwen3Config,
    dtype,
    page_size: int,
    *,
    tokens: int | None = None,
    memory_fraction: float | None = None,
    device=None,
) -> int:
    """Pool size in pages from a token budget, or from a fraction of the device's free memory."""
    if tokens is not None:
        return max(1, cdiv(tokens, page_size))
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"{device.platform}: the device reports no memory statistics; size the KV pool by tokens")
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return max(1, int(free * memory_fraction) // (kv_bytes_per_token(cfg, dtype) * page_size))


def create_cache(
    cfg: Qwen3Config, *, num_pages: int, page_size: int, max_seqs: int, max_seq_len: int, dtype=jnp.bfloat16
) -> KVCache:
    if not 1 <= page_size <= 64:
        raise ValueError(f"page_size must be in [1, 64], got {page_size}")
    max_pages = cdiv(max_seq_len, page_size)
    shape = (cfg.num_key_value_heads, cfg.num_hidden_layers * num_pages, page_size, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        page_table=jnp.zeros((max_seqs, max_pages), jnp.int32),
        lengths=jnp.zeros((max_seqs,), jnp.int32),
        pages_owned=jnp.zeros((max_seqs,), jnp.int32),
        borrowed=jnp.zeros((max_seqs,), jnp.int32),
        # Popping from the top hands out low page ids first, which keeps small runs readable.
        free_stack=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),
        num_free=jnp.int32(num_pages),
        oom=jnp.zeros((max_seqs,), bool),
        page_size=page_size,
        num_layers=cfg.num_hidden_layers,
    )


def layer_pages(page_table: jax.Array, layer: jax.Array, num_pages: int) -> jax.Array:
    """A page table's entries as physical pages of ``layer`` in the ``[Hkv, L * P, ...]`` pool."""
    return page_table + layer * num_pages


def gather_slots(cache: KVCache, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Host copy of the first ``n`` cached tokens of ``slot``: K and V as [L, Hkv, n, hd] (tests, debugging)."""
    s = np.arange(n)
    pages = np.asarray(cache.page_table)[slot, s // cache.page_size]
    phys = pages[None, :] + np.arange(cache.num_layers)[:, None] * cache.num_pages  # [L, n]
    k, v = np.asarray(cache.k), np.asarray(cache.v)
    off = s % cache.page_size
    return k[:, phys, off[None, :]].transpose(1, 0, 2, 3), v[:, phys, off[None, :]].transpose(1, 0, 2, 3)


def reserve(cache: KVCache, rows: jax.Array, new_tokens: jax.Array, *, max_new_pages: int) -> KVCache:
    """Make room for ``new_tokens[i]`` more tokens in slot ``rows[i]``.

    ``max_new_pages`` (static) bounds the pages one row can need in this call. Rows are served in
    order; a row whose pages do not fit gets none and its ``oom`` flag set (later rows still may fit:
    a smaller request can succeed where a big one failed). Rows may be padded with ``new_tokens == 0``.
    """
    ps = cache.page_size
    owned = cache.pages_owned[rows]
    needed_total = (cache.lengths[rows] + new_tokens + ps - 1) // ps
    too_long = needed_total > cache.max_pages_per_seq
    need = jnp.clip(needed_total - owned, 0, max_new_pages)

    def grant(carry, req):
        (free,) = carry
        n, bad = req
        ok = (n <= free) & ~bad
        return (free - jnp.where(ok, n, 0),), ok

    (_,), ok = jax.lax.scan(grant, (cache.num_free,), (need, too_long))
    need = jnp.where(ok, need, 0)
    start = cache.num_free - jnp.cumsum(need)  # each row pops need[i] pages off the stack top
    j = jnp.arange(max_new_pages)[None, :]
    take = j < need[:, None]  # [R, max_new_pages]
    pages = cache.free_stack[jnp.clip(start[:, None] + need[:, None] - 1 - j, 0, cache.num_pages - 1)]
    col = jnp.where(take, owned[:, None] + j, cache.max_pages_per_seq)  # out of range -> dropped
    page_table = cache.page_table.at[rows[:, None], col].set(pages, mode="drop")
    failed = (needed_total > owned) & ~ok & (new_tokens > 0)
    return cache.replace(
        page_table=page_table,
        pages_owned=cache.pages_owned.at[rows].add(need),
        num_free=cache.num_free - need.sum(),
        # .max, not .set: padded rows may repeat a real row and must not clear its flag.
        oom=cache.oom | jnp.zeros_like(cache.oom).at[rows].max(failed),
    )


def shrink(cache: KVCache, new_lengths: jax.Array) -> KVCache:
    """Set every slot's length to ``new_lengths`` (<= current) and return the pages past it to the pool.
    Borrowed pages past it are unmapped, not freed: the prefix index holds them."""
    ps = cache.page_size
    keep = (new_lengths + ps - 1) // ps
    lo = jnp.maximum(keep, cache.borrowed)  # the first page this slot may free
    freed = jnp.maximum(cache.pages_owned - lo, 0)  # [S]
    offset = cache.num_free + jnp.cumsum(freed) - freed  # where each slot's freed pages go on the stack
    j = jnp.arange(cache.max_pages_per_seq)[None, :]
    give = (j >= lo[:, None]) & (j < cache.pages_owned[:, None])  # [S, maxp]
    dest = jnp.where(give, offset[:, None] + j - lo[:, None], cache.num_pages)  # out of range -> dropped
    free_stack = cache.free_stack.at[dest].set(cache.page_table, mode="drop")
    return cache.replace(
        free_stack=free_stack,
        num_free=cache.num_free + freed.sum(),
        pages_owned=jnp.minimum(cache.pages_owned, keep),
        borrowed=jnp.minimum(cache.borrowed, keep),
        lengths=new_lengths,
    )


def raise_borrowed(cache: KVCache, borrowed: jax.Array | None) -> KVCache:
    """The host's count of index pages per row (it only grows here: a row's own prompt pages entering the
    index). Lowering happens through ``shrink``, which unmaps rather than frees."""
    if borrowed is None:
        return cache
    return cache.replace(borrowed=jnp.maximum(cache.borrowed, borrowed))


def push_free(cache: KVCache, pages: jax.Array) -> KVCache:
    """Hand ``pages`` (-1 = padding) back to the free stack: cached pages the host's prefix index evicted."""
    ok = pages >= 0
    dest = jnp.where(ok, cache.num_free + jnp.cumsum(ok) - 1, cache.num_pages)  # padding -> dropped
    return cache.replace(free_stack=cache.free_stack.at[dest].set(pages, mode="drop"), num_free=cache.num_free + ok.sum())


@partial(jax.jit, donate_argnums=0)
def map_prefix(cache: KVCache, borrowed: jax.Array, slots: jax.Array, pages: jax.Array, n: jax.Array) -> KVCache:
    """Map cached prefixes into newly admitted rows, before their first step: ``borrowed`` [S] (see
    ``raise_borrowed``); row ``slots[i]`` (padding: >= S) drops its previous occupant's own pages and maps
    ``pages[i, :n[i]]`` as its first ``n[i]`` borrowed (full) pages."""
    cache = raise_borrowed(cache, borrowed)
    cache = shrink(cache, cache.lengths.at[slots].set(0, mode="drop"))
    j = jnp.arange(pages.shape[1])[None, :]
    col = jnp.where(j < n[:, None], j, cache.max_pages_per_seq)  # out of range -> dropped
    return cache.replace(
        page_table=cache.page_table.at[slots[:, None], col].set(pages, mode="drop"),
        lengths=cache.lengths.at[slots].set(n * cache.page_size, mode="drop"),
        pages_owned=cache.pages_owned.at[slots].set(n, mode="drop"),
        borrowed=cache.borrowed.at[slots].set(n, mode="drop"),
    )


@partial(jax.jit, donate_argnums=0)
def release(
    cache: KVCache, mask: jax.Array, clear_oom: jax.Array | None = None, borrowed: jax.Array | None = None
) -> KVCache:
    """Free every owned page of the masked slots and clear their lengths and oom flags; ``clear_oom`` also
    clears the flags of slots that keep their pages (they retry the step); ``borrowed``: see ``raise_borrowed``."""
    cache = raise_borrowed(cache, borrowed)
    cache = shrink(cache, jnp.where(mask, 0, cache.lengths))
    keep = ~mask if clear_oom is None else ~(mask | clear_oom)
    return cache.replace(oom=cache.oom & keep)


@partial(jax.jit, donate_argnums=0)
def truncate(cache: KVCache, new_lengths: jax.Array) -> KVCache:
    return shrink(cache, new_lengths)


@partial(jax.jit, donate_argnums=0)
def truncate_slot(cache: KVCache, slot: jax.Array, new_length: jax.Array) -> KVCache:
    """Cut one slot to ``new_length`` tokens, freeing the pages past it (re-encode after pruning)."""
    return shrink(cache, cache.lengths.at[slot].set(new_length))


@partial(jax.jit, static_argnames=("rope_theta", "impl"), donate_argnums=0)
def compact_slot(
    cache: KVCache,
    slot: jax.Array,
    start: jax.Array,
    end: jax.Array,
    length: jax.Array,
    *,
    rope_theta: float,
    impl: str = "auto",
) -> KVCache:
    """Remove slots [start, end) of one sequence with no recompute: the suffix K/V move down and the
    moved keys are re-rotated by -(end - start) positions; pages past the new length are freed.
    With page size 1 only the page table moves and the moved keys are rotated in place."""
    n = end - start
    L, P = cache.num_layers, cache.num_pages
    # Each (layer, sequence) pair is an independent row for the kernels: one call covers every layer.
    rows = lambda x: jnp.full((L,), x, jnp.int32)
    if cache.page_size == 1:
        row = cache.page_table[slot]
        j = jnp.arange(row.shape[0])
        # Pruned pages go to the row's tail (beyond the new length), where shrink frees them.
        src = jnp.where(j < start, j, jnp.where(j < length - n, j + n, j - (length - n) + start))
        src = jnp.where(j < length, src, j)
        page_table = cache.page_table.at[slot].set(row[src])
        per_layer = layer_pages(page_table[slot][None, :], jnp.arange(L)[:, None], P)  # [L, maxp]
        k = kernels.rotate_slots(
            cache.k, per_layer, rows(start), rows(length - end), rows(-n), rope_theta=rope_theta, impl=impl
        )
        cache = cache.replace(k=k, page_table=page_table)
    else:
        per_layer = layer_pages(cache.page_table[slot][None, :], jnp.arange(L)[:, None], P)
        k, v = kernels.compact(
            cache.k, cache.v, per_layer, rows(start), rows(end), rows(length), rope_theta=rope_theta, impl=impl
        )
        cache = cache.replace(k=k, v=v)
    return shrink(cache, cache.lengths.at[slot].set(length - n))


def check_invariants(cache: KVCache, index_pages=None, borrowed=None) -> None:
    """Host-side audit (tests): every page is free, owned by exactly one slot, or held by the host's prefix
    index (``index_pages``, none by default), exactly once; a slot's borrowed pages are index pages.
    ``borrowed``: the host's counts not sent yet (pages entered the index after the last step)."""
    pt = np.asarray(cache.page_table)
    owned = np.asarray(cache.pages_owned)
    borrowed = np.maximum(np.asarray(cache.borrowed), 0 if borrowed is None else borrowed)
    n_free = int(cache.num_free)
    free = np.asarray(cache.free_stack)[:n_free]
    assert (borrowed <= owned).all(), f"a slot borrows more pages than its row maps: {borrowed} > {owned}"
    held = np.concatenate([pt[s, borrowed[s] : owned[s]] for s in range(pt.shape[0])] + [np.zeros(0, np.int32)])
    index = np.asarray(sorted(index_pages or ()), np.int32)
    all_pages = np.concatenate([held, free, index])
    assert all_pages.size == cache.num_pages, f"{all_pages.size} pages accounted for, pool has {cache.num_pages}"
    assert np.unique(all_pages).size == all_pages.size, "a page is owned twice, or both owned and free or cached"
    lent = np.concatenate([pt[s, : borrowed[s]] for s in range(pt.shape[0])] + [np.zeros(0, np.int32)])
    assert np.isin(lent, index).all(), "a slot borrows a page the prefix index does not hold"
    lengths = np.asarray(cache.lengths)
    need = cdiv(lengths, cache.page_size)
    assert (owned >= need).all(), f"a slot holds fewer pages than its length needs: {owned} < {need}"
