"""timjax.generate against transformers' greedy generate, continuous batching, the cache under load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import timjax
from timjax.runtime import steps
from timjax.runtime.cache import check_invariants, create_cache
from timjax.runtime.sampling import SamplingParams

N_NEW = 10


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(1)
    return [rs.randint(0, 256, n).tolist() for n in (5, 19, 1, 33)]


@pytest.fixture(scope="module")
def hf_greedy(tiny_pair, prompts):
    hf, _ = tiny_pair
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([p]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
        out.append(ids[0, len(p) :].tolist())
    return out


@pytest.mark.parametrize(
    "impl,page_size",
    [("xla", 1), ("xla", 4), ("xla", 16), ("pallas_interpret", 1), ("pallas_interpret", 4), ("pallas_interpret", 16)],
)
def test_greedy_matches_transformers(tiny_pair, prompts, hf_greedy, impl, page_size):
    _, model = tiny_pair
    # 3 slots for 4 prompts: the last prompt waits for a slot (continuous batching)
    results = timjax.generate(
        model,
        prompts,
        max_new_tokens=N_NEW,
        page_size=page_size,
        max_batch=3,
        impl=impl,
        stop_ids=[],
        engine_options={"check_cache": True},
    )
    for r, ref in zip(results, hf_greedy):
        assert r.finish_reason == "length" and r.error is None
        assert r.tokens == ref
        assert r.stats.generated_tokens == N_NEW and r.stats.tokens_per_s > 0


def test_single_prompt_streaming_and_stop_id(tiny_pair, prompts, hf_greedy):
    _, model = tiny_pair
    seen = []
    stop = hf_greedy[1][4]
    r = timjax.generate(
        model, prompts[1], max_new_tokens=N_NEW, stop_ids=[stop], on_token=lambda i, t: seen.append((i, t))
    )
    k = hf_greedy[1].index(stop)
    assert r.tokens == hf_greedy[1][: k + 1] and r.finish_reason == "stop"
    assert seen == [(0, t) for t in r.tokens]


def test_long_prompt_is_prefilled_in_chunks(tiny_pair):
    hf, model = tiny_pair
    p = np.random.RandomState(3).randint(0, 256, 70).tolist()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, 70:].tolist()
    r = timjax.generate(model, p, max_new_tokens=5, stop_ids=[], page_size=4, engine_options={"max_step_tokens": 16})
    assert r.tokens == ref


def test_out_of_pages_preempts_and_both_finish_exactly(tiny_pair, prompts, hf_greedy):
    _, model = tiny_pair
    # 13 pages of 4 for sequences needing 4 and 11: both start, the pool runs out, the newer one is
    # preempted and resumes once the older one is done; both finish with transformers' tokens.
    results = timjax.generate(
        model,
        [prompts[0], prompts[3]],
        max_new_tokens=N_NEW,
        page_size=4,
        kv_tokens=52,
        stop_ids=[],
        engine_options={"check_cache": True, "overlap": True},  # fixed: "auto" would move the preemption
    )
    assert [r.tokens for r in results] == [hf_greedy[0], hf_greedy[3]]
    assert all(r.finish_reason == "length" for r in results)
    assert results[1].stats.preemptions >= 1 and results[0].stats.preemptions == 0


def test_sampling_is_reproducible_per_seed(tiny_pair, prompts):
    _, model = tiny_pair
    a = timjax.generate(model, prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_ids=[])
    b = timjax.generate(model, prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, stop_ids=[])
    c = timjax.generate(model, prompts[:2], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8, stop_ids=[])
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_bad_prompts_fail_alone(tiny_pair, prompts, hf_greedy):
    _, model = tiny_pair
    results = timjax.generate(model, [prompts[0], [1, 2, 9999]], max_new_tokens=N_NEW, stop_ids=[])
    assert results[0].tokens == hf_greedy[0]
    assert results[1].finish_reason == "error" and "out of range" in results[1].error
    with pytest.raises(ValueError, match="tokenizer"):
        timjax.generate(model, "text needs a tokenizer", max_new_tokens=2)


def _prefill(model, cache, prompts):
    cfg = model.config
    T = 64
    tokens = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    q_len = np.array([len(p) for p in prompts], np.int32)
    rows = np.arange(len(prompts), dtype=np.int32)
    sp = SamplingParams(**jax.device_put(SamplingParams.host(len(prompts))))
    nxt, cache = steps.generate_step(model.params(), cache, rows, tokens, q_len, sp, cfg=cfg, impl="xla")
    return nxt, cache, sp


def test_repeated_steps_do_not_recompile(tiny_pair, prompts):
    _, model = tiny_pair
    cfg = model.config
    cache = create_cache(cfg, num_pages=64, page_size=4, max_seqs=4, max_seq_len=128, dtype=jnp.float32)
    nxt, cache, sp = _prefill(model, cache, prompts)
    rows = jnp.arange(4, dtype=jnp.int32)
    ones = jnp.ones(4, jnp.int32)
    for i in range(6):
        nxt, cache = steps.generate_step(model.params(), cache, rows, nxt[:, None], ones, sp, cfg=cfg, impl="xla")
        if i == 1:
            compiled = steps.generate_step._cache_size()
    assert steps.generate_step._cache_size() == compiled
    check_invariants(cache)


def test_multi_step_decode_loop_matches_transformers(tiny_pair, prompts, hf_greedy):
    _, model = tiny_pair
    cfg = model.config
    cache = create_cache(cfg, num_pages=64, page_size=4, max_seqs=4, max_seq_len=128, dtype=jnp.float32)
    nxt, cache, sp = _prefill(model, cache, prompts)
    out, cache, _, active = steps.decode_loop(
        model.params(),
        cache,
        nxt,
        jnp.ones(4, bool),
        sp,
        jnp.array([-1], jnp.int32),
        jnp.full(4, N_NEW - 1, jnp.int32),
        cfg=cfg,
        impl="xla",
        num_steps=N_NEW + 2,
    )
    out = np.asarray(out)
    for i, ref in enumerate(hf_greedy):
        got = [int(nxt[i])] + [t for t in out[:, i].tolist() if t >= 0]
        assert got == ref
    assert not np.asarray(active).any()  # every budget ran out inside the loop
