"""Sampling inside the jit: bitmask layout, greedy, top-k / top-p, per-sequence seeds."""

import jax.numpy as jnp
import numpy as np

from timjax.sampling import SamplingParams, pack_bitmask, sample, unpack_bitmask


def _params(b, temperature=0.0, top_k=0, top_p=1.0, seed=0, counter=0):
    full = lambda v, dt: jnp.full((b,), v, dt)
    return SamplingParams(full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32),
                          full(seed, jnp.uint32), full(counter, jnp.int32))


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


def test_mask_is_applied_before_greedy_and_sampling():
    rs = np.random.RandomState(1)
    logits = jnp.asarray(rs.randn(4, 70).astype(np.float32))
    allowed = np.zeros((4, 70), bool)
    allowed[np.arange(4), [3, 40, 65, 7]] = True
    allowed[0, 50] = True
    mask = jnp.asarray(pack_bitmask(allowed))
    greedy = np.asarray(sample(logits, _params(4), mask))
    assert all(allowed[i, greedy[i]] for i in range(4))
    for seed in range(20):
        drawn = np.asarray(sample(logits, _params(4, temperature=1.5, seed=seed), mask))
        assert all(allowed[i, drawn[i]] for i in range(4))


def test_greedy_is_argmax_and_seeds_reproduce():
    logits = jnp.asarray(np.random.RandomState(2).randn(5, 50).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(sample(logits, _params(5))), np.argmax(np.asarray(logits), -1))
    a = np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=4)))
    b = np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=4)))
    draws = {tuple(np.asarray(sample(logits, _params(5, temperature=1.0, seed=3, counter=c)))) for c in range(8)}
    np.testing.assert_array_equal(a, b)
    assert len(draws) > 1  # the counter advances the stream


def test_top_k_and_top_p_restrict_support():
    logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2, np.float32)))
    seen_k, seen_p = set(), set()
    for c in range(200):
        seen_k.add(int(sample(logits, _params(2, temperature=1.0, top_k=2, counter=c))[0]))
        seen_p.add(int(sample(logits, _params(2, temperature=1.0, top_p=0.7, counter=c))[0]))
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    # temperature sampling follows the distribution roughly
    draws = [int(sample(logits, _params(2, temperature=1.0, counter=c))[0]) for c in range(400)]
    assert abs(np.mean(np.array(draws) == 0) - 0.5) < 0.1
