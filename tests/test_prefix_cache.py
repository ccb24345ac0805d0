"""Prefix caching (issue 24): shared prompt pages computed once, mapped read-only into every request that
starts with them, and never moved or freed under another request by pruning, compaction, preemption,
cancel or eviction. Greedy outputs with the cache on must equal those with it off."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timjax.engine import Action, Engine, PlainController, PruneOp, Request

N_NEW = 8
# A tight pool (12 pages of 4 tokens; a request needs 5-10) so that requests are preempted and cached
# pages are evicted; a small step budget so that prompts are chunked and later requests find earlier
# requests' pages cached.
# Overlap fixed on: "auto" decides from timings, which moves the preemptions and evictions counted here.
ENGINE = dict(
    max_batch=3, page_size=4, max_seq_len=64, kv_tokens=48, max_step_tokens=16, check_cache=True, overlap=True
)


@pytest.fixture(scope="module")
def model(tiny_pair):
    return tiny_pair[1]


@pytest.fixture(scope="module")
def prompts():
    """Four prompts over one 22-token base (5 full shared pages), one over its first 9 tokens, one unrelated."""
    rs = np.random.RandomState(3)
    base = rs.randint(1, 256, 22).tolist()
    tails = [rs.randint(1, 256, n).tolist() for n in (3, 6, 1, 9)]
    return [base + t for t in tails] + [base[:9] + [5, 6], rs.randint(1, 256, 17).tolist()]


class Pruner(PlainController):
    """Plain greedy decoding that, after ``at`` samples, prunes ``span`` = (start, end) of its working memory
    (positions of cached + pending), counted from the end of the prompt when ``from_prompt_end``."""

    def __init__(self, *, at: int, span: tuple[int, int], from_prompt_end: bool = True, **kw):
        super().__init__(**kw)
        self.at, self.span, self.from_end = at, span, from_prompt_end

    def on_token(self, token, seq):
        action = super().on_token(token, seq)
        if len(seq.generated) == self.at and action.finish is None:
            off = len(seq.request.prompt) if self.from_end else 0
            return Action(feed=action.feed, prune=[PruneOp(off + self.span[0], off + self.span[1])])
        return action


def _requests(prompts, reposition):
    """Plain requests and pruning ones (generated spans; in re-encode mode also a span inside the shared
    prompt pages: the copy-on-write path)."""
    reqs = [Request(p, N_NEW) for p in prompts]
    reqs[1] = Request(prompts[1], N_NEW, controller=Pruner(at=4, span=(1, 3), max_new_tokens=N_NEW))
    if reposition == "reencode":
        into = Pruner(at=3, span=(6, 10), from_prompt_end=False, max_new_tokens=N_NEW)
        reqs[2] = Request(prompts[2], N_NEW, controller=into)
    return reqs


def _run(model, prompts, reposition, prefix_cache):
    eng = Engine(model, **ENGINE, reposition=reposition, prefix_cache=prefix_cache)
    res = eng.run(_requests(prompts, reposition))
    assert all(r.error is None for r in res), [r.error for r in res]
    return [r.tokens for r in res], eng.stats()


@pytest.mark.parametrize("reposition", ["reencode", "shift"])
def test_greedy_outputs_with_the_cache_equal_those_without(model, prompts, reposition):
    off, s_off = _run(model, prompts, reposition, False)
    on, s_on = _run(model, prompts, reposition, True)
    assert on == off
    assert s_off.prefix_cache_hit_tokens_total == 0 and s_off.prefix_cache_pages == 0
    assert s_on.prefix_cache_hit_tokens_total >= 40  # at least two requests mapped the 5 shared pages
    assert s_on.prefix_cache_evictions_total > 0  # the pool was tight
    # and a row preempted another (in shift mode here the rows short of pages are speculative ones, which
    # wait for their sample's sync instead of preempting, and the pressure passes without a preemption)
    assert s_on.preemptions_total > 0 or reposition == "shift"
    assert s_on.steps_total < s_off.steps_total  # fewer prompt tokens computed
    assert s_on.kv_pages_free == s_on.kv_pages_total  # idle: cached pages are reclaimable


def test_a_request_that_prunes_and_compacts_leaves_its_sharer_unchanged(model, prompts):
    """A and B map the same cached prompt pages; A prunes a span of the shared pages (copy-on-write: it
    unmaps from that page and re-encodes) and, later, a span of its own tokens (a compaction in shift
    mode). B's output equals B's alone with the cache off, and A's equals A's with the cache off."""
    a, b = prompts[0], prompts[3]

    def pair():
        first = Pruner(at=2, span=(7, 9), from_prompt_end=False, max_new_tokens=N_NEW)
        again = Pruner(at=5, span=(0, 2), max_new_tokens=N_NEW)
        ctrl = first
        on_token = first.on_token

        def both(token, seq):  # the first prune inside the prompt, the second past it
            action = on_token(token, seq)
            if len(seq.generated) == again.at and action.finish is None:
                off = len(seq.request.prompt) - 2  # the first prune took two prompt tokens
                action.prune = [PruneOp(off + again.span[0], off + again.span[1])]
            return action

        ctrl.on_token = both
        return [Request(a, N_NEW, controller=ctrl), Request(b, N_NEW)]

    kw = {**ENGINE, "reposition": "shift"}
    eng = Engine(model, **kw)
    eng.run([Request(a[:24], 1)])  # caches the 5 shared pages (and A's 6th)
    shared = eng.stats().prefix_cache_pages
    res = eng.run(pair())
    assert all(r.error is None for r in res), [r.error for r in res]
    assert eng.stats().prefix_cache_hit_tokens_total >= 2 * 20 and shared >= 5
    b_alone = Engine(model, **kw, prefix_cache=False).run([Request(b, N_NEW)])[0]
    assert res[1].tokens == b_alone.tokens
    a_off = Engine(model, **{**kw, "reposition": "reencode"}, prefix_cache=False).run(pair()[:1])[0]
    assert res[0].tokens == a_off.tokens  # a prune into the shared pages re-encodes, in either mode


def test_each_result_counts_the_prompt_tokens_it_read_from_the_cache(model, prompts):
    """``stats.cached_prompt_tokens``: the full pages of the prompt found in the index at admission (the
    usage the server reports as cached tokens); they add up to the engine's hit counter."""
    eng = Engine(model, **{**ENGINE, "kv_tokens": 256})
    first = eng.run([Request(prompts[0], N_NEW)])[0]  # indexes its 6 full pages (the 5 shared ones and a 6th)
    res = eng.run([Request(p, N_NEW) for p in prompts[1:]])
    assert first.stats.cached_prompt_tokens == 0
    # the 5 shared pages for the base's sharers, 2 pages for the 11-token one (its 9 tokens' first 2 pages)
    assert [r.stats.cached_prompt_tokens for r in res] == [20, 20, 20, 8, 0]
    assert eng.stats().prefix_cache_hit_tokens_total == 68


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt alone, cache off: what every request must produce."""
    eng = Engine(model, **ENGINE, prefix_cache=False)
    return [eng.run([Request(p, N_NEW)])[0].tokens for p in prompts]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 6))),
        min_size=3,
        max_size=9,
    )
)
def test_pages_stay_consistent_under_random_mixes(model, prompts, alone, mix):
    """Requests over shared prompts arrive at random steps and some are cancelled, in a pool that forces
    preemption and eviction. After every step (``check_cache``: ``Engine.check_invariants``) every page is
    free, owned by one slot or cached, once; each cached page's reference count equals the slots mapping it
    and nothing a slot maps is free. Every request that was not cancelled samples what it samples alone."""
    eng = Engine(model, **ENGINE)
    todo = sorted(enumerate(mix), key=lambda x: x[1][1])
    handles, step = [], 0
    while todo or any(not h.done for h, _, _ in handles):
        while todo and todo[0][1][1] <= step:
            _, (k, _, cancel_at) = todo.pop(0)
            handles.append((eng.add(Request(prompts[k], N_NEW)), k, cancel_at))
        for h, _, cancel_at in handles:
            if cancel_at is not None and cancel_at == step:
                h.cancel()
        eng.step()
        step += 1
    for h, k, _ in handles:
        r = h.result()
        if r.finish_reason == "cancelled":
            assert r.tokens == alone[k][: len(r.tokens)]
        else:
            assert r.tokens == alone[k], (k, r.finish_reason, r.error)
    assert int(eng.cache.num_free) + eng.stats().prefix_cache_pages == eng.cache.num_pages


# -- TIM: schema-constrained replays with subtask pruning, over one shared instruction prompt ----------------
@pytest.mark.parametrize("reposition", ["reencode", "shift"])
def test_tim_replays_sample_the_same_with_the_cache_on(qwen3_tokenizer, reposition):
    """Three TIM replays (grammar masks, forced tokens, subtask pruning) over one shared prompt, in a pool
    that forces preemption: every token the device sampled and every working memory equal the cache-off
    run's, and the shared prompt pages were mapped."""
    from conftest import random_tim_model

    from timjax.engine.tim_controller import ReplayText, TimController
    from timjax.tim.grammar import llg_tokenizer
    from timjax.tim.schema import tim_schema
    from timjax.tim.traces import serialise, synthetic_document

    model = random_tim_model(qwen3_tokenizer, max_position_embeddings=256)
    llt = llg_tokenizer(model.tokenizer, 151_936, [151645])
    schema = tim_schema(max_depth=5)
    prompt = model.tokenizer("Think it through, step by step, and answer in the format. " * 3)["input_ids"]
    docs = [synthetic_document(depth=3, breadth=2, roots=1, words=4, seed=40 + i) for i in range(3)]

    def run(prefix_cache):
        raw: dict = {}
        reqs = []
        for i, doc in enumerate(docs):
            ctrl = TimController(
                model,
                schema,
                max_new_tokens=20_000,
                prompt_len=len(prompt),
                pruning_buffer=1,
                override=ReplayText(serialise(doc), llt),
            )
            on_token, log = ctrl.on_token, raw.setdefault(i, [])
            ctrl.on_token = lambda token, seq, _f=on_token, _log=log: (_log.append(token), _f(token, seq))[1]
            reqs.append(Request(prompt, 20_000, controller=ctrl))
        eng = Engine(
            model,
            max_batch=3,
            page_size=4,
            max_seq_len=256,
            kv_tokens=200,
            reposition=reposition,
            check_cache=True,
            prefix_cache=prefix_cache,
            max_step_tokens=32,
            overlap=True,
        )
        res = eng.run(reqs)
        assert all(r.finish_reason == "stop" for r in res), [r.error for r in res]
        return raw, [r.working_memory for r in res], eng.stats()

    raw_off, wm_off, s_off = run(False)
    raw_on, wm_on, s_on = run(True)
    assert raw_on == raw_off and wm_on == wm_off
    assert s_on.prefix_cache_hit_tokens_total >= (len(prompt) - 1) // 4 * 4  # a replay mapped the prompt
    assert s_on.preemptions_total > 0 and s_on.pruned_tokens_total > 0
