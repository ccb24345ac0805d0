"""Page-table invariants of the device-side allocator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timjax.base.config import Qwen3Config
from timjax.runtime.cache import check_invariants, create_cache, release, reserve, truncate

CFG = Qwen3Config(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=512,
)


@jax.jit
def _grow(cache, rows, n):
    cache = reserve(cache, rows, n, max_new_pages=8)
    ok = ~cache.oom[rows]
    return cache.replace(lengths=cache.lengths.at[rows].add(jnp.where(ok, n, 0)))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_random_alloc_free_keeps_every_page_owned_once(page_size):
    rs = np.random.RandomState(page_size)
    cache = create_cache(
        CFG, num_pages=96 // page_size + 3, page_size=page_size, max_seqs=4, max_seq_len=128, dtype=jnp.float32
    )
    for step in range(60):
        rows = rs.permutation(4)[:2].astype(np.int32)
        n = rs.randint(0, min(8 * page_size, 20), size=2).astype(np.int32)
        before_len = np.asarray(cache.lengths).copy()
        cache = _grow(cache, jnp.asarray(rows), jnp.asarray(n))
        oom = np.asarray(cache.oom)
        after_len = np.asarray(cache.lengths)
        for r, k in zip(rows, n):
            assert after_len[r] == before_len[r] + (0 if oom[r] else k)
        check_invariants(cache)
        if oom.any() or rs.rand() < 0.2:  # free the failed (or a random) slot, as the host does
            mask = oom | (rs.rand(4) < 0.3)
            cache = release(cache, jnp.asarray(mask))
            assert not np.asarray(cache.oom).any()
            check_invariants(cache)
        if rs.rand() < 0.3:
            lengths = np.asarray(cache.lengths)
            cache = truncate(cache, jnp.asarray((lengths * rs.rand(4)).astype(np.int32)))
            check_invariants(cache)
    cache = release(cache, jnp.ones(4, bool))
    assert int(cache.num_free) == cache.num_pages  # every page came back
    check_invariants(cache)


def test_out_of_pages_fails_only_that_row():
    cache = create_cache(CFG, num_pages=5, page_size=4, max_seqs=3, max_seq_len=64, dtype=jnp.float32)
    cache = _grow(cache, jnp.array([0, 1, 2], jnp.int32), jnp.array([8, 16, 4], jnp.int32))
    # row 0 takes 2 pages, row 1 would need 4 of the 3 left: it fails, row 2 still gets its page
    assert np.asarray(cache.oom).tolist() == [False, True, False]
    assert np.asarray(cache.lengths).tolist() == [8, 0, 4]
    assert int(cache.num_free) == 2
    check_invariants(cache)


def test_sequence_longer_than_page_table_is_flagged_not_truncated():
    cache = create_cache(CFG, num_pages=64, page_size=4, max_seqs=1, max_seq_len=16, dtype=jnp.float32)
    cache = _grow(cache, jnp.array([0], jnp.int32), jnp.array([17], jnp.int32))
    assert bool(cache.oom[0]) and int(cache.lengths[0]) == 0 and int(cache.num_free) == 64


def test_padded_rows_do_not_clear_a_real_rows_flag():
    cache = create_cache(CFG, num_pages=1, page_size=4, max_seqs=2, max_seq_len=64, dtype=jnp.float32)
    cache = _grow(cache, jnp.array([1, 1, 1, 1], jnp.int32), jnp.array([9, 0, 0, 0], jnp.int32))
    assert bool(cache.oom[1])
