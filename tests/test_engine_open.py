"""The open engine: requests join, stream and leave while it runs (timjax.engine.core.Engine).

A tiny random Qwen3 (vocabulary 256); the TIM-like behaviours (grammar masks, forced tokens, pruning, parked
tool calls) come from the controllers of tests/test_engine.py, so every kind of row and every kind of
request-state change runs through the same loop.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
import resource
import threading
import time

import numpy as np
import pytest
from conftest import make_hf_model, timjax_from_hf
from test_engine import MaskedForcingPruner, ParkingController

from timjax.base.buckets import cdiv
from timjax.base.errors import ParameterError
from timjax.base.validation import ENGINE_OPTIONS
from timjax.engine import (
    Engine,
    EngineFull,
    EngineStats,
    EngineStopped,
    FinishedEvent,
    PlainController,
    Request,
    RequestParams,
    TokenEvent,
)

N_NEW = 10
# One shape for the module (8 slots, a pool of 40 pages of 4 tokens, at most 16 tokens a step): the steps
# compile once for every test here (two packed lengths, with and without a mask).
SHAPE = dict(max_batch=8, page_size=4, max_seq_len=64, kv_tokens=160, max_step_tokens=16, check_cache=True)
LONG = 24  # new tokens: seven requests this long need more than the 40 pages (preemption)


@pytest.fixture(scope="module")
def model(tiny_pair):
    return tiny_pair[1]


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(11)
    return [rs.randint(1, 256, n).tolist() for n in (5, 9, 3, 12, 7, 4, 10, 6)]


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, **SHAPE)


def _make(kind: str, prompt, n_new=N_NEW):
    """A request of one kind: plain, pruner (masked sampling, forced tokens, cached spans pruned), parker (parks
    after 2 tokens for 3 polls, then a 3-token "tool result" is written)."""
    if kind == "plain":
        ctrl = PlainController(max_new_tokens=n_new)
    elif kind == "pruner":
        ctrl = MaskedForcingPruner(max_new_tokens=n_new)
    else:
        ctrl = ParkingController(park_after=2, polls=3, inject=[5, 6, 7], log=[], max_new_tokens=n_new)
    return Request(list(prompt), n_new, controller=ctrl)


KINDS = ("plain", "pruner", "parker")


@pytest.fixture(scope="module")
def alone(engine, prompts):
    """Each (kind, prompt) served alone: its tokens."""
    out = {(k, i): engine.run([_make(k, p)])[0].tokens for k in KINDS for i, p in enumerate(prompts)}
    out.update({("long", i): engine.run([_make("plain", p, LONG)])[0].tokens for i, p in enumerate(prompts)})
    return out


def _step_until(engine, cond, limit=500):
    for _ in range(limit):
        if cond():
            return
        engine.step()
    raise AssertionError("the condition never held")


def _slot_pages_match(engine, free_before: set[int]) -> set[int]:
    """After a step: a slot that was free before it (its sequence ended, was cancelled or preempted, at the
    latest during the step before) owns no page; a resident one at least what its cached tokens need.
    Returns the free slots now."""
    owned = np.asarray(engine.cache.pages_owned)
    ps = engine.cache.page_size
    free = {slot for slot, seq in enumerate(engine.loop.sched.slots) if seq is None}
    for slot in free & free_before:
        assert owned[slot] == 0, f"slot {slot} has been free for a step but owns {owned[slot]} pages"
    for slot, seq in enumerate(engine.loop.sched.slots):
        if seq is not None:
            assert owned[slot] >= cdiv(len(seq.cached), ps)
    return free


# -- the door --------------------------------------------------------------------------------------------
def test_bad_params_name_the_field_and_the_queue_is_bounded(model):
    eng = Engine(model, **SHAPE, max_waiting=2)
    with pytest.raises(ParameterError, match=r"invalid top_p=1\.5"):
        eng.add_request([1, 2], {"top_p": 1.5})
    with pytest.raises(ParameterError, match=r"invalid stop_ids\[0\]=999"):
        eng.add_request([1, 2], RequestParams(stop_ids=[999]))
    with pytest.raises(ParameterError, match="invalid stop="):
        eng.add_request([1, 2], {"stop": ["x"]})  # no tokenizer
    with pytest.raises(ParameterError, match="invalid max_new_tokens=0"):
        RequestParams.coerce(max_new_tokens=0)
    a = eng.add_request([1, 2, 3], {"max_new_tokens": 2}, request_id="a")
    with pytest.raises(ParameterError, match="invalid request_id='a'"):
        eng.add_request([1, 2], request_id="a")
    eng.add_request([4, 5], {"max_new_tokens": 2})
    with pytest.raises(EngineFull):
        eng.add_request([6], {"max_new_tokens": 2})
    assert eng.stats().waiting == 2
    eng.stop(drain=True)
    assert a.result(0).finish_reason == "length" and len(a.result().tokens) == 2
    with pytest.raises(EngineStopped):
        eng.add_request([1])
    # generate's engine_options table matches the Engine signature (validation may not import the engine)
    sig = inspect.signature(Engine.__init__).parameters
    extra = {p for p, v in sig.items() if v.kind == v.KEYWORD_ONLY} - set(__import__("timjax.base.validation").base.validation.GENERATE)
    assert extra == set(ENGINE_OPTIONS)


# -- joining a running batch -----------------------------------------------------------------------------
@pytest.mark.parametrize("moment", ["decode", "prune", "parked", "preempt"])
def test_a_request_joining_mid_run_gets_its_greedy_tokens_alone(model, engine, prompts, alone, moment):
    """Seven requests run; the eighth joins at the named moment; all eight get what they get alone."""
    kind = {"decode": "plain", "prune": "pruner", "parked": "parker", "preempt": "long"}[moment]
    eng = engine
    n_new = LONG if moment == "preempt" else N_NEW
    make = lambda p: _make("plain" if kind == "long" else kind, p, n_new)  # noqa: E731
    hs = [eng.add(make(p), request_id=f"{moment}-{i}") for i, p in enumerate(prompts[:7])]
    p0 = eng.counters["preemptions"]
    seqs = lambda: [s for s in eng.loop.live()]  # noqa: E731
    cond = {
        "decode": lambda: len(seqs()) == 7 and all(len(s.generated) >= 2 for s in seqs()),
        "prune": lambda: any(s.reencoded > 0 for s in seqs()),
        "parked": lambda: any(s.parked for s in seqs()),
        "preempt": lambda: eng.counters["preemptions"] > p0,
    }[moment]
    _step_until(eng, cond)
    late = eng.add(_make("plain", prompts[7]), request_id=f"{moment}-late")
    _step_until(eng, lambda: late.done and all(h.done for h in hs))
    assert late.result().tokens == alone[("plain", 7)]
    assert [h.result().tokens for h in hs] == [alone[(kind, i)] for i in range(7)]
    assert int(eng.cache.num_free) + eng.stats().prefix_cache_pages == eng.cache.num_pages


# -- cancellation ----------------------------------------------------------------------------------------
def test_cancel_at_random_points_of_mixed_requests(engine, prompts, alone):
    """200 mixed requests (masked + pruning, parked "tool calls", plain) stream through the engine; 60 of
    them are cancelled at random step boundaries. After every step the page table holds (no page twice,
    the free count exact, freed slots own nothing); every request not cancelled gets its tokens alone; a
    cancelled one got a prefix of them."""
    rng = random.Random(2026)
    todo = [(rng.choice(KINDS), rng.randrange(len(prompts))) for _ in range(200)]
    cancel = set(rng.sample(range(len(todo)), 60))
    handles: dict[int, object] = {}
    n_steps, free = 0, set()
    while todo or any(not h.done for h in handles.values()):
        for _ in range(rng.randint(0, 3)):  # arrivals at random boundaries
            if todo:
                k, i = todo.pop()
                handles[len(handles)] = eng_add = engine.add(_make(k, prompts[i]))
                eng_add.key = (k, i)
        live = [j for j, h in handles.items() if j in cancel and not h.done]
        if live and rng.random() < 0.3:
            handles[rng.choice(live)].cancel()
        engine.step()
        n_steps += 1
        engine.check_invariants()
        free = _slot_pages_match(engine, free)
    # every page is free again, or cached by the prefix index with no slot mapping it
    assert int(engine.cache.num_free) + engine.stats().prefix_cache_pages == engine.cache.num_pages
    assert engine.stats().kv_pages_free == engine.cache.num_pages
    cancelled = 0
    for j, h in handles.items():
        r, want = h.result(), alone[h.key]
        if r.finish_reason == "cancelled":
            cancelled += 1
            assert j in cancel and r.tokens == want[: len(r.tokens)]
        else:
            assert r.tokens == want, (j, h.key, r.finish_reason, r.error)
    assert cancelled >= 30, cancelled
    assert engine.stats().running == 0 and engine.stats().parked == 0


def test_deadline_ends_a_request_with_timeout_and_frees_its_pages(engine, prompts):
    # parked for ever: the deadline must still end it (and the engine must not wait on its "tool")
    forever = ParkingController(park_after=2, polls=10**9, inject=[1], log=[], max_new_tokens=N_NEW)
    h = engine.add(Request(prompts[0], N_NEW, controller=forever), timeout_s=0.3)
    other = engine.add_request(prompts[1], {"max_new_tokens": N_NEW})
    t0 = time.monotonic()
    _step_until(engine, lambda: h.done and other.done, limit=10**6)
    r = h.result()
    assert r.finish_reason == "timeout" and len(r.tokens) == 2 and time.monotonic() - t0 < 5
    assert other.result().finish_reason == "length"
    engine.step()
    assert int(engine.cache.num_free) + engine.stats().prefix_cache_pages == engine.cache.num_pages


def test_warmup_compiles_every_step_a_staggered_mixed_run_takes(model, prompts, alone):
    """After ``Engine.warmup`` the loop never compiles a step: requests of every kind (masked, forced,
    pruning, parked) joining at staggered moments meet only shapes compiled ahead of them. In the background
    the warmup yields to requests: one sent while it runs is served, with its greedy tokens."""
    import jax

    from timjax.runtime import steps
    from timjax.runtime.cache import map_prefix

    jax.clear_caches()  # the module's earlier tests compiled these shapes: start from none
    compiled = (steps.flat_generate_step, steps.flat_logits_step, steps.sample_step, map_prefix)
    eng = Engine(model, **SHAPE)
    eng.start()
    try:
        # packed lengths 8, 12, 16 (budget 16) and the pure-decode 8 x one KV window x mask or not
        assert eng.warmup(background=True) == 8
        early = eng.add(_make("pruner", prompts[0]))
        assert early.result(timeout=120).tokens == alone[("pruner", 0)]
        _wait(lambda: eng.stats().warmup_shapes_left == 0, timeout=120)
        before = [f._cache_size() for f in compiled]
        assert before[0] == 4 and before[1] == 4 and before[2] >= 1
        assert before[3] == 4  # a prefix hit mapping 1, 2, 4 or 8 slots in one step
        handles = []
        for i, p in enumerate(prompts):
            handles.append((KINDS[i % 3], i, eng.add(_make(KINDS[i % 3], p))))
            time.sleep(0.02 * (i % 3))  # joins at staggered steps
        for kind, i, h in handles:
            assert h.result(timeout=120).tokens == alone[(kind, i)]
        assert eng.stats().prefix_cache_hit_tokens_total > 0  # prompts[0] again: its first page was mapped
    finally:
        eng.stop()
    assert [f._cache_size() for f in compiled] == before


# -- streaming -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(qwen3_tokenizer):
    """The tiny model with a real tokenizer: its 256 ids are Qwen's byte tokens, so greedy output is full
    of partial UTF-8 characters (what incremental detokenization must hold back)."""
    m = timjax_from_hf(make_hf_model(seed=1))
    m.tokenizer = qwen3_tokenizer
    return m


def test_streamed_tokens_and_text_equal_the_final_result(text_model, prompts):
    eng = Engine(text_model, **SHAPE)
    eng.start()
    try:
        sync = [eng.add_request(p, {"max_new_tokens": 24, "stop_ids": []}) for p in prompts[:4]]
        sync.append(eng.add(_make("pruner", prompts[4], 24)))
        sync.append(eng.add(_make("parker", prompts[5], 24)))
        got: dict[str, list] = {}

        def consume(h):
            got[h.request_id] = list(h)

        threads = [threading.Thread(target=consume, args=(h,)) for h in sync]
        for t in threads:
            t.start()

        async def consume_async(hs):  # an asyncio loop on another thread than the engine's
            async def one(h):
                return [ev async for ev in h], await h.aresult()

            return await asyncio.gather(*(one(h) for h in hs))

        asyncs = [eng.add_request(p, {"max_new_tokens": 24, "stop_ids": []}) for p in prompts[6:]]
        async_out = asyncio.run(consume_async(asyncs))
        for t in threads:
            t.join(30)
    finally:
        eng.stop()
    streams = [(h, got[h.request_id]) for h in sync] + [(h, evs) for h, (evs, _) in zip(asyncs, async_out)]
    for h, evs in streams:
        r = h.result()
        assert isinstance(evs[-1], FinishedEvent) and evs[-1].result is r
        toks = [t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids]
        assert toks == r.tokens and len(toks) == 24
        text = "".join(ev.text for ev in evs if isinstance(ev, TokenEvent))
        assert text == text_model.tokenizer.decode(r.tokens)
    assert [r for _, r in async_out] == [h.result() for h in asyncs]
    # at least one stream held back a partial character (a delta ended before its token's bytes did)
    assert any(ev.token_ids and not ev.text for _, evs in streams for ev in evs if isinstance(ev, TokenEvent))


def test_a_busy_asyncio_consumer_gets_one_wakeup_and_one_event_for_what_it_missed(model, prompts, alone, monkeypatch):
    """The loop thread posts each request's tokens to the consumers' asyncio loop through one mailbox: while
    that loop is busy, every post joins the one drain already scheduled, and each handle then yields the
    tokens it missed as one TokenEvent (not one wakeup and one event per token)."""
    from timjax.engine import handle as handle_mod

    drains = []
    real = handle_mod._Mailbox._drain
    monkeypatch.setattr(handle_mod._Mailbox, "_drain", lambda self: (drains.append(1), real(self)))
    eng = Engine(model, **SHAPE)
    eng.start()
    try:

        async def main():
            hs = [eng.add(_make("plain", p)) for p in prompts[:4]]
            tasks = [asyncio.ensure_future(_collect(h)) for h in hs]
            await asyncio.sleep(0)  # the consumers subscribe (the first tokens may already be buffered)
            for h in hs:  # this loop is busy (blocked) until every request has finished
                h.result(timeout=60)
            return hs, await asyncio.gather(*tasks)

        hs, streams = asyncio.run(main())
    finally:
        eng.stop()
    for i, (h, evs) in enumerate(zip(hs, streams)):
        toks = [t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids]
        assert toks == h.result().tokens == alone[("plain", i)]
        assert isinstance(evs[-1], FinishedEvent)
        assert len(evs) <= 3  # what arrived before the loop blocked, one event for the rest, the end
    assert len(drains) <= 2, drains  # at most one before the loop blocked, one after, for 4 x 10 tokens


async def _collect(h):
    return [ev async for ev in h]


# -- the loop thread -------------------------------------------------------------------------------------
def test_stop_drains_running_requests_and_cancels_when_asked(model, prompts, alone):
    eng = Engine(model, **SHAPE)
    eng.start()
    hs = [eng.add(_make("parker", p)) for p in prompts[:4]]
    eng.stop(drain=True)
    assert [h.result(0).tokens for h in hs] == [alone[("parker", i)] for i in range(4)]
    eng.start()
    forever = ParkingController(park_after=1, polls=10**9, inject=[1], log=[], max_new_tokens=N_NEW)
    h = eng.add(Request(prompts[0], N_NEW, controller=forever))
    _wait(lambda: eng.stats().parked == 1)
    eng.stop(drain=False)
    assert h.result(0).finish_reason == "cancelled"
    s = eng.stats()
    assert isinstance(s, EngineStats) and s.kv_pages_free == s.kv_pages_total and s.running == 0


def _wait(cond, timeout=30.0):
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, "timed out"
        time.sleep(0.005)


SOAK = 2000


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_soak_many_short_requests_leave_no_pages_or_memory_behind(model):
    """2,000 requests of 1-2 new tokens through a running engine: every page is free at the end, the
    engine holds no request, and RSS grows by less than 64 MiB after a 200-request warm-up."""
    eng = Engine(model, **{**SHAPE, "check_cache": False}, max_waiting=SOAK)
    eng.start()
    rs = np.random.RandomState(5)
    try:
        warm = [eng.add_request(rs.randint(1, 256, 3).tolist(), {"max_new_tokens": 2}) for _ in range(200)]
        [h.result(60) for h in warm]
        gc.collect()
        rss0 = _rss_mb()
        hs = []
        for i in range(SOAK):
            hs.append(eng.add_request(rs.randint(1, 256, 1 + i % 6).tolist(), {"max_new_tokens": 1 + i % 2}))
            if i % 64 == 63:
                hs[-1].result(60)
        results = [h.result(60) for h in hs]
    finally:
        eng.stop()
    assert all(r.finish_reason == "length" and len(r.tokens) == 1 + i % 2 for i, r in enumerate(results))
    del hs, results, warm
    gc.collect()
    s = eng.stats()
    assert s.kv_pages_free == s.kv_pages_total
    assert int(eng.cache.num_free) + s.prefix_cache_pages == eng.cache.num_pages
    assert s.requests_finished_total == SOAK + 200 and not eng._ids and not eng.loop.live()
    grew = _rss_mb() - rss0
    assert grew < 64, f"RSS grew by {grew:.1f} MiB over {SOAK} requests"


def test_readme_open_engine_example(capsys):
    """The README's open-engine block runs as written on the shipped tiny TIM and prints what it says."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("<!-- open-engine-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md:open-engine-example", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.strip().splitlines()
    kinds = {line.split()[0] for line in lines[:-3]}
    assert {"subtask_opened", "subtask_closed", "pruned", "tool_call_started", "tool_call_finished"} <= kinds
    assert lines[-3:] == ["35 5", "cancelled", "0"], lines[-3:]
