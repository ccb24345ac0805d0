"""Sampling inside the jit: bitmask layout, greedy, top-k / top-p, per-sequence seeds."""

import jax.numpy as jnp
import numpy as np

from timjax.runtime.sampling import SamplingParams, pack_bitmask, unpack_bitmask
from timjax.runtime.steps import sample_step as sample  # jitted: one compile per shape


def _params(b, temperature=0.0, top_k=0, top_p=1.0, seed=0, counter=0):
    full = lambda v, dt: jnp.full((b,), v, dt)
    return SamplingParams(
        full(temperature, jnp.float32),
        full(top_k, jnp.int32),
        full(top_p, jnp.float32),
        full(seed, jnp.uint32),
        full(counter, jnp.int32),
    )


def test_bitmask_layout_bit_j_of_word_i_is_token_32i_plus_j():
    rs = np.random.RandomState(0)
    allowed = rs.rand(3, 100) < 0.3
    packed = pack_bitmask(allowed)
    assert packed.shape == (3, 4) and packed.dtype == np.int32
    for b in range(3):
        for t in range(100):
            assert bool((int(packed[b, t // 32]) >> (t % 32)) & 1) == allowed[b, t]
    np.testing.assert_array_equal(np.asarray(unpack_bitmask(jnp.asarray(packed), 100)), allowed)
    # tokens beyond the words (a padded model vocabulary) are disallowed
    assert not np.asarray(unpack_bitmask(jnp.asarray(packed), 140))[:, 128:].any()


def _rows(b, **kw):
    """Per-row params where counter and seed may be arrays."""
    p = _params(b)
    fields = {k: jnp.broadcast_to(jnp.asarray(v, getattr(p, k).dtype), (b,)) for k, v in kw.items()}
    return SamplingParams(
        **{**{k: getattr(p, k) for k in ("temperature", "top_k", "top_p", "seed", "counter")}, **fields}
    )


def test_mask_is_applied_before_greedy_and_sampling():
    rs = np.random.RandomState(1)
    logits = np.asarray(rs.randn(4, 70).astype(np.float32))
    allowed = np.zeros((4, 70), bool)
    allowed[np.arange(4), [3, 40, 65, 7]] = True
    allowed[0, 50] = True
    greedy = np.asarray(sample(jnp.asarray(logits), _params(4), jnp.asarray(pack_bitmask(allowed))))
    assert all(allowed[i, greedy[i]] for i in range(4))
    n = 80  # 20 seeds x 4 rows in one call
    drawn = np.asarray(
        sample(
            jnp.asarray(np.tile(logits, (20, 1))),
            _rows(n, temperature=1.5, seed=np.repeat(np.arange(20), 4)),
            jnp.asarray(pack_bitmask(np.tile(allowed, (20, 1)))),
        )
    )
    assert all(np.tile(allowed, (20, 1))[i, drawn[i]] for i in range(n))
    assert len(set(drawn[0::4].tolist())) == 2  # row 0 has two allowed tokens; both get drawn


def test_greedy_is_argmax_and_seeds_reproduce():
    logits = jnp.asarray(np.random.RandomState(2).randn(5, 50).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(sample(logits, _params(5))), np.argmax(np.asarray(logits), -1))
    a = np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=4)))
    b = np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=4)))
    draws = {tuple(np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=c)))) for c in range(8)}
    np.testing.assert_array_equal(a, b)
    assert len(draws) > 1  # the counter advances the stream


def test_top_k_and_top_p_restrict_support():
    n = 400
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * n, np.float32)))
    counter = np.arange(n)
    k = np.asarray(sample(logits, _rows(n, temperature=1.0, top_k=2, counter=counter)))
    p = np.asarray(sample(logits, _rows(n, temperature=1.0, top_p=0.7, counter=counter)))
    assert set(k.tolist()) == {0, 1}
    assert set(p.tolist()) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    # plain temperature sampling follows the distribution
    t = np.asarray(sample(logits, _rows(n, temperature=1.0, counter=counter)))
    assert abs(np.mean(t == 0) - 0.5) < 0.08 and set(t.tolist()) == {0, 1, 2, 3}
    # rows mix: a greedy row among sampled rows stays greedy
    mixed = np.asarray(
        sample(logits[:4], _rows(4, temperature=np.array([0, 1, 1, 1], np.float32), counter=np.arange(4)))
    )
    assert mixed[0] == 0
