"""The engine's scheduler and controller protocol: parking, preemption, isolation, dispatch counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import timjax
from timjax.base.buckets import cdiv
from timjax.base.config import Qwen3Config
from timjax.engine import Action, Engine, PlainController, PruneOp, Request, SeqState
from timjax.engine.runner import Runner
from timjax.engine.scheduler import Scheduler
from timjax.runtime import cache as cache_mod
from timjax.runtime import steps
from timjax.runtime.cache import check_invariants

N_NEW = 8


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(7)
    return [rs.randint(0, 256, n).tolist() for n in (6, 13, 3, 21)]


class ParkingController(PlainController):
    """Parks after ``park_after`` sampled tokens for ``polls`` polls, then feeds ``inject`` (a tool result, say)
    followed by nothing else: the next sample comes after the injected tokens."""

    def __init__(self, *, park_after: int, polls: int, inject: list[int], log: list, **kw):
        super().__init__(**kw)
        self.park_after, self.polls, self.inject, self.log = park_after, polls, inject, log
        self.parked_polls = 0

    def on_token(self, token, seq):
        action = super().on_token(token, seq)
        if len(seq.generated) == self.park_after and action.finish is None:
            self.log.append(("park", len(self.log)))
            return Action(feed=action.feed, park=True)
        return action

    def poll(self, seq):
        self.parked_polls += 1
        self.log.append(("poll", self.parked_polls))
        if self.parked_polls < self.polls:
            return None
        return Action(feed=list(self.inject))


class ForcingController(PlainController):
    """The same tokens as ParkingController without parking: the injected tokens follow the sampled one."""

    def __init__(self, *, park_after: int, inject: list[int], **kw):
        super().__init__(**kw)
        self.park_after, self.inject = park_after, inject

    def on_token(self, token, seq):
        action = super().on_token(token, seq)
        if len(seq.generated) == self.park_after and action.finish is None:
            return Action(feed=action.feed + list(self.inject))
        return action


# One engine shape for every test here (a tight pool: 10 pages of 4 tokens for requests needing 3-7 pages
# each), so the steps compile once for the module; the alone runs use the same engine, one request a run.
# overlap fixed on: "auto" decides from timings, which moves preemptions, and these tests count them
ENGINE = dict(max_batch=4, page_size=4, max_seq_len=64, kv_tokens=40, check_cache=True, overlap=True)


def _run(model, reqs, **kw):
    return Engine(model, **{**ENGINE, **kw}).run(reqs)


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return Engine(tiny_pair[1], **ENGINE)


@pytest.fixture(scope="module")
def alone(engine, prompts):
    """Greedy tokens of each prompt served alone."""
    return [engine.run([Request(p, N_NEW)])[0].tokens for p in prompts]


def test_parked_sequence_waits_while_the_others_decode(tiny_pair, prompts, alone):
    alone_tokens = alone
    _, model = tiny_pair
    inject = [5, 6, 7]
    log: list = []

    def on_token(i, tok):
        log.append(("token", i))

    parked = ParkingController(park_after=2, polls=4, inject=inject, log=log, max_new_tokens=N_NEW)
    plain = [PlainController(max_new_tokens=N_NEW) for _ in prompts[1:]]
    reqs = [Request(prompts[0], N_NEW, controller=parked)] + [
        Request(p, N_NEW, controller=c) for p, c in zip(prompts[1:], plain)
    ]
    results = Engine(model, **ENGINE).run(reqs, on_token=on_token)
    assert parked.parked_polls == 4 and all(r.finish_reason == "length" for r in results)
    polls = [i for i, e in enumerate(log) if e[0] == "poll"]
    between = log[polls[0] : polls[-1]]
    assert ("token", 0) not in between and any(e[0] == "token" for e in between)  # the others went on
    # the same token stream without parking: the injected tokens written straight after the sampled one
    forced = ForcingController(park_after=2, inject=inject, max_new_tokens=N_NEW)
    ref = _run(model, [Request(prompts[0], N_NEW, controller=forced)])[0]
    assert results[0].tokens == ref.tokens
    assert [r.tokens for r in results[1:]] == alone_tokens[1:]


def test_a_pool_too_small_for_all_preempts_and_every_request_matches_alone(engine, prompts, alone):
    results = engine.run([Request(p, N_NEW) for p in prompts])
    assert all(r.finish_reason == "length" and r.error is None for r in results)
    assert [r.tokens for r in results] == alone
    assert sum(r.stats.preemptions for r in results) > 0  # three running need 12 pages of the 10
    # every page came back: free, or cached by the prefix index with no slot mapping it
    assert int(engine.cache.num_free) + engine.stats().prefix_cache_pages == engine.cache.num_pages


def test_a_request_bigger_than_the_pool_fails_alone_with_a_clear_error(engine, prompts, alone):
    big = list(range(42))  # 42 prompt tokens > 40 in the pool: it can never fit, even alone
    results = engine.run([Request(prompts[0], N_NEW), Request(big, N_NEW), Request(prompts[2], N_NEW)])
    assert results[1].finish_reason == "error"
    assert "more than the whole pool of 10 pages" in results[1].error
    assert [results[0].tokens, results[2].tokens] == [alone[0], alone[2]]


def test_growth_past_the_pool_fails_that_sequence_only(engine, prompts, alone):
    # prompt 32 + 8 new tokens fill the 40 slots; the 9th token cannot be written; the others finish
    long = list(range(1, 33))
    results = engine.run([Request(long, 20), Request(prompts[2], N_NEW)])
    assert results[0].finish_reason == "error" and "more than the whole pool" in results[0].error
    assert len(results[0].tokens) >= 8  # what it wrote before is kept
    assert results[1].tokens == alone[2]


def test_long_lived_engine_does_not_recompile_across_calls(tiny_pair):
    _, model = tiny_pair
    eng = timjax.Engine(model, max_batch=4, page_size=4, max_seq_len=64)
    rs = np.random.RandomState(3)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, d, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
    # the first calls compile the buckets they reach (packed tokens 8 and 16; 1 or 4 decode rows; 4 pages)
    first = timjax.generate(eng, [rs.randint(0, 256, n).tolist() for n in (5, 9, 2)], max_new_tokens=4, stop_ids=[])
    first.append(timjax.generate(eng, rs.randint(0, 256, 7).tolist(), max_new_tokens=4, stop_ids=[]))
    n0 = len(compiles)
    for lengths in [(4, 6, 4), (1, 11, 1, 1), (8,), (3, 3)]:  # then other lengths and counts: no compile
        prompts = [rs.randint(0, 256, n).tolist() for n in lengths]
        out = timjax.generate(eng, prompts, max_new_tokens=4, stop_ids=[])
        assert all(r.stats.generated_tokens == 4 for r in out)
    assert len(compiles) == n0, f"{len(compiles) - n0} compiles after the first call"
    assert all(r.stats.generated_tokens == 4 for r in first)


class MaskedForcingPruner(PlainController):
    """Samples under a mask (every token but 0), forces tokens and prunes cached spans: every kind of row."""

    wants_mask = True

    def __init__(self, *, fail: str | None = None, **kw):
        super().__init__(**kw)
        self.fail = fail
        self.n = 0

    def fill_mask(self, out):
        if self.fail == "fill_mask":
            raise RuntimeError("mask broke")
        out[:] = -1
        out[0] &= ~1  # token 0 is never allowed

    def on_token(self, token, seq):
        assert token != 0
        if self.fail == "on_token" and self.n == 2:
            raise RuntimeError("token broke")
        self.n += 1
        action = super().on_token(token, seq)
        if action.finish is None:
            if self.n % 3 == 0:
                action.feed += [7, 8, 9]  # grammar-forced tokens, say
            if self.n % 4 == 0 and len(seq.cached) > 6:
                action.prune = [PruneOp(2, 5)]
            if self.fail == "poll" and self.n == 2:
                action.park = True
        return action

    def poll(self, seq):
        raise RuntimeError("poll broke")

    def finish(self, seq, result):
        if self.fail == "finish":
            raise RuntimeError("finish broke")


@pytest.mark.parametrize("reposition", ["reencode", "shift"])
def test_at_most_two_dispatches_per_iteration(tiny_pair, prompts, monkeypatch, reposition):
    _, model = tiny_pair
    calls = []
    from timjax.engine import core, runner

    for mod in (steps, cache_mod, core, runner):
        for name in dir(mod):
            fn = getattr(mod, name)
            if callable(fn) and hasattr(fn, "lower"):  # a jitted function: each call is a dispatch
                monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name, **k: (calls.append(_n), _fn(*a, **k))[1])
    per_iteration = []
    last = [0]

    def on_step(engine, running):
        per_iteration.append(len(calls) - last[0])
        last[0] = len(calls)

    reqs = [Request(p, 12, controller=MaskedForcingPruner(max_new_tokens=12)) for p in prompts[:3]]
    reqs.append(Request(list(range(3, 30)), 6))  # a long prompt chunked beside them (budget 16)
    eng = Engine(model, **{**ENGINE, "max_step_tokens": 16}, reposition=reposition)
    results = eng.run(reqs, on_step=on_step)
    assert all(r.error is None for r in results), [r.error for r in results]
    assert max(per_iteration) <= 2 and 2 in per_iteration
    assert sum(r.stats.reencoded_tokens for r in results) > 0 if reposition == "reencode" else True
    assert eng.counters["tokens"] / eng.counters["computed"] > 0.5


@pytest.mark.parametrize("method", ["fill_mask", "on_token", "poll", "finish"])
def test_a_controller_exception_ends_only_its_sequence(tiny_pair, prompts, method):
    _, model = tiny_pair
    reqs = [
        Request(p, N_NEW, controller=MaskedForcingPruner(max_new_tokens=N_NEW, fail=f))
        for p, f in zip(prompts[:3], [None, method, None])
    ]
    results = _run(model, reqs)
    assert results[1].finish_reason == "error" and f"controller.{method} raised RuntimeError" in results[1].error
    ok = _run(model, [reqs[0].__class__(prompts[0], N_NEW, controller=MaskedForcingPruner(max_new_tokens=N_NEW))])[0]
    assert results[0].finish_reason == results[2].finish_reason == "length"
    assert results[0].tokens == ok.tokens


def test_non_finite_logits_end_the_sequence_with_an_error(tiny_pair, prompts):
    _, model = tiny_pair
    params = jax.tree.map(lambda x: x, model.params())
    params["layers"]["down_proj"] = params["layers"]["down_proj"].at[0, 0, 0].set(jnp.nan)
    bad = timjax.Qwen3(model.config, dtype="float32", params=params)
    results = _run(bad, [Request(p, N_NEW) for p in prompts[:2]])
    for r in results:
        assert r.finish_reason == "error" and "non-finite logits" in r.error and r.tokens == []


# ---------------------------------------------------------------------------------------------- page-table invariants
CFG = Qwen3Config(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=512,
)


@jax.jit
def _prepare(cache, packed, edits):
    cache, q_len = steps.prepare(
        cache, packed, edits, kv_pages=8, max_new_pages=cdiv(16, 4) + 1, rope_theta=10000.0, impl="xla"
    )
    return cache.replace(lengths=cache.lengths.at[packed.rows].add(q_len))


class _FakeModel:
    config = CFG
    dtype = jnp.float32

    @staticmethod
    def params():
        return {}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "step", "step", "step", "prune", "finish"]), st.integers(0, 10**6)),
        min_size=5,
        max_size=40,
    ),
    st.sampled_from(["reencode", "shift"]),
)
def test_page_table_invariants_under_random_schedules(ops, reposition):
    """Admissions, steps (with preemption under a tight pool), prunes and finishes in random order: after
    every step the device allocator and the scheduler's page count agree, and every page is owned once."""
    runner = Runner(
        _FakeModel(), max_batch=4, page_size=4, max_seq_len=32, num_pages=10, impl="xla", reposition=reposition
    )
    sched = Scheduler(slots=4, max_batch=4, num_pages=10, page_size=4, max_step_tokens=16)
    seqs = []
    for op, x in ops:
        resident = sched.resident
        if op == "admit":
            s = SeqState(
                len(seqs), Request([1] * (1 + x % 20), 8), PlainController(max_new_tokens=8), pending=[1] * (1 + x % 20)
            )
            seqs.append(s)
            sched.add(s)
        elif op == "prune" and resident:
            s = resident[x % len(resident)]
            n = s.working_tokens
            if n > 2:
                a = x % (n - 1)
                runner.prune(s, [PruneOp(a, a + 1 + (x // 7) % (n - a - 1))])
                if not s.pending:
                    s.pending = [2]
        elif op == "finish" and resident:
            sched.remove(resident[x % len(resident)])
        elif op == "step":
            plan = sched.plan()
            for s, _ in plan.failed:
                sched.remove(s)
            edits = runner._edits(sched.slots)
            packed, _ = runner_pack(plan.rows)
            runner.cache = _prepare(runner.cache, packed, edits)
            assert not np.asarray(runner.cache.oom).any()
            for r in plan.rows:
                r.seq.cached += r.seq.pending[: r.n]
                r.seq.pending = r.seq.pending[r.n :] or ([3] if r.samples else [])
            check_invariants(runner.cache)
            lengths = np.asarray(runner.cache.lengths)
            for slot, s in enumerate(sched.slots):
                assert lengths[slot] == (len(s.cached) if s is not None else 0)
            assert int(runner.cache.num_free) == sched.free_pages()
            assert len(sched.resident) <= 4


def runner_pack(rows):
    from timjax.engine.runner import pack_rows

    return pack_rows(rows, 4)
