"""TIM generation through the paged runtime: schema-constrained decoding, subtask pruning and position
reuse, checked against fresh prefills and the reference forward."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_tim_model

import timjax
from timjax.engine import Engine, Request
from timjax.engine.tim_controller import ReplayText, TimController, close_partial_json
from timjax.qwen3.model import apply_rope, rope_cos_sin
from timjax.runtime import steps
from timjax.runtime.cache import check_invariants, compact_slot, create_cache, gather_slots
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import tim_schema
from timjax.tim.traces import pruned_view, serialise, synthetic_document

VOCAB = 151_936
SCHEMA = tim_schema(max_depth=5)


@pytest.fixture(scope="module")
def tim_model(qwen3_tokenizer):
    return random_tim_model(qwen3_tokenizer, max_position_embeddings=256)


@pytest.fixture(scope="module")
def llt(tim_model):
    return llg_tokenizer(tim_model.tokenizer, VOCAB, [151645])


def _replay_requests(model, llt, docs, *, buffer, raw=None):
    """Replay requests; ``raw[i]`` collects the tokens the device sampled for doc i (before the override)."""
    prompt = model.tokenizer("Think it through.")["input_ids"]
    reqs = []
    for i, doc in enumerate(docs):
        ctrl = TimController(
            model,
            SCHEMA,
            max_new_tokens=20_000,
            prompt_len=len(prompt),
            pruning_buffer=buffer,
            override=ReplayText(serialise(doc), llt),
        )
        if raw is not None:
            on_token, log = ctrl.on_token, raw.setdefault(i, [])
            ctrl.on_token = lambda token, seq, _f=on_token, _log=log: (_log.append(token), _f(token, seq))[1]
        reqs.append(Request(prompt, 20_000, controller=ctrl))
    return reqs


def _replay(model, llt, doc, *, buffer, reposition="reencode", page_size=4, max_seq_len=256, on_step=None, wrap=None):
    (req,) = _replay_requests(model, llt, [doc], buffer=buffer)
    if wrap:
        wrap(req.controller)
    engine = Engine(
        model, max_batch=1, page_size=page_size, max_seq_len=max_seq_len, reposition=reposition, check_cache=True
    )
    return engine.run([req], on_step=on_step)[0], req.controller


@pytest.mark.parametrize("reposition", ["reencode", "shift"])
def test_preempted_tim_requests_sample_what_they_sample_alone(tim_model, llt, reposition):
    """Three pruning replays in a pool that holds about one and a half of them: the scheduler preempts and
    resumes them; every token the device sampled (greedy under the grammar mask) matches the run alone."""
    docs = [synthetic_document(depth=3, breadth=2, roots=1, words=4, seed=20 + i) for i in range(3)]
    # overlap fixed on: "auto" decides from timings, which moves the preemptions this test needs
    kw = dict(page_size=4, max_seq_len=256, reposition=reposition, check_cache=True, overlap=True)
    alone_raw: dict = {}
    alone = []
    for i, doc in enumerate(docs):
        raw: dict = {}
        alone.append(
            Engine(tim_model, max_batch=1, **kw).run(_replay_requests(tim_model, llt, [doc], buffer=1, raw=raw))[0]
        )
        alone_raw[i] = raw[0]
    peak = max(r.stats.peak_working_tokens for r in alone)
    together_raw: dict = {}
    together = Engine(tim_model, max_batch=3, kv_tokens=peak * 3 // 2, **kw).run(
        _replay_requests(tim_model, llt, docs, buffer=1, raw=together_raw)
    )
    assert all(r.finish_reason == "stop" for r in together), [r.error for r in together]
    assert sum(r.stats.preemptions for r in together) > 0
    assert together_raw == alone_raw
    assert [r.working_memory for r in together] == [r.working_memory for r in alone]


def _fresh_kv(model, tokens, page_size):
    """K/V of a fresh prefill of ``tokens`` (one sequence), as [L, Hkv, T, hd]."""
    T = 1 << (len(tokens) - 1).bit_length()
    cache = create_cache(
        model.config, num_pages=T // page_size + 1, page_size=page_size, max_seqs=1, max_seq_len=T, dtype=jnp.float32
    )
    padded = np.zeros((1, T), np.int32)
    padded[0, : len(tokens)] = tokens
    _, cache = steps.logits_step(
        model.params(),
        cache,
        np.zeros(1, np.int32),
        padded,
        np.array([len(tokens)], np.int32),
        cfg=model.config,
        impl="xla",
    )
    return gather_slots(cache, 0, len(tokens))


@pytest.mark.parametrize("page_size,buffer", [(1, 0), (4, 2)])
def test_reencode_cache_equals_fresh_prefill_after_every_prune(tim_model, llt, page_size, buffer):
    doc = synthetic_document(depth=3, breadth=2, roots=2, words=5, seed=page_size)
    seen = {"ops": 0, "checks": 0, "raw": None, "mask": None}

    def wrap(ctrl):
        fill, on_token = ctrl.fill_mask, ctrl.on_token

        def fill_mask(out):
            fill(out)
            seen["mask"] = out.copy()

        def record(token, seq):
            seen["raw"] = token
            return on_token(token, seq)

        ctrl.fill_mask, ctrl.on_token = fill_mask, record

    def on_step(engine, running):
        if not running:
            return
        seq = running[0]
        ops = seq.controller.memory.stats().prune_ops
        if ops > seen["ops"] and len(seq.pending) <= 1:  # a prune happened and its re-encode has run
            seen["ops"] = ops
            seen["checks"] += 1
            k, v = gather_slots(engine.cache, seq.slot, len(seq.cached))
            k_ref, v_ref = _fresh_kv(tim_model, seq.cached, page_size)
            np.testing.assert_allclose(k, k_ref, atol=2e-4)
            np.testing.assert_allclose(v, v_ref, atol=2e-4)
            # the token sampled from this cache is the masked argmax of the reference forward
            # right padding to a bucket (one compile) cannot change causal logits at earlier positions
            n = len(seq.cached)
            padded = np.zeros(1 << (n - 1).bit_length(), np.int32)
            padded[:n] = seq.cached
            logits = timjax.logits(tim_model, padded)[n - 1]
            allowed = (seen["mask"][np.arange(VOCAB) // 32] >> (np.arange(VOCAB) % 32)) & 1
            assert seen["raw"] == int(np.argmax(np.where(allowed == 1, logits, -np.inf)))

    result, ctrl = _replay(tim_model, llt, doc, buffer=buffer, page_size=page_size, on_step=on_step, wrap=wrap)
    assert result.finish_reason == "stop", result.error
    assert seen["checks"] >= 3 and seen["checks"] == result.stats.prune_events


def test_pruning_runs_far_past_the_position_limit(tim_model, llt):
    doc = synthetic_document(depth=4, breadth=3, roots=1, words=4, seed=11)
    limit = tim_model.config.max_position_embeddings
    off, _ = _replay(tim_model, llt, doc, buffer=None, max_seq_len=limit)
    assert off.finish_reason == "length" and "max_seq_len" in off.error, off.error  # without pruning it cannot finish
    on, _ = _replay(tim_model, llt, doc, buffer=1, max_seq_len=limit)
    assert on.finish_reason == "stop", on.error
    assert len(on.tokens) > 3 * limit and on.stats.peak_working_tokens < limit
    assert on.stats.pruned_share > 0.6
    # nothing lost: the complete tree comes back, and the working memory is the pruned skeleton
    assert on.response.model_dump(mode="json", exclude_none=True) == doc
    assert on.pruned_paths and json.loads(on.working_memory_text) == pruned_view(doc, on.pruned_paths)


@pytest.mark.parametrize("page_size", [1, 4])
def test_shift_mode_keeps_the_same_working_memory(tim_model, llt, page_size):
    doc = synthetic_document(depth=3, breadth=3, roots=1, words=4, seed=5)
    # buffer 1: a list is pruned after its next sibling's tokens are cached, so there is a suffix to move
    a, _ = _replay(tim_model, llt, doc, buffer=1, reposition="reencode", page_size=page_size)
    b, _ = _replay(tim_model, llt, doc, buffer=1, reposition="shift", page_size=page_size)
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.tokens == b.tokens and a.working_memory == b.working_memory
    assert b.stats.reencoded_tokens == 0 < a.stats.reencoded_tokens


@pytest.mark.parametrize("page_size", [1, 4])
def test_compact_slot_moves_and_rotates_a_real_cache(tim_model, page_size):
    cfg = tim_model.config
    rs = np.random.RandomState(0)
    cache = create_cache(
        cfg, num_pages=64 // page_size + 8, page_size=page_size, max_seqs=2, max_seq_len=64, dtype=jnp.float32
    )
    toks = rs.randint(0, 1000, size=(2, 32)).astype(np.int32)
    _, cache = steps.logits_step(
        tim_model.params(), cache, np.arange(2, dtype=np.int32), toks, np.array([30, 25], np.int32), cfg=cfg, impl="xla"
    )
    k0, v0 = gather_slots(cache, 1, 25)
    other = gather_slots(cache, 0, 30)
    free0 = int(cache.num_free)
    start, end = 6, 17
    cache = compact_slot(
        cache, jnp.int32(1), jnp.int32(start), jnp.int32(end), jnp.int32(25), rope_theta=cfg.rope_theta, impl="xla"
    )
    check_invariants(cache)
    assert int(cache.lengths[1]) == 25 - (end - start)
    k1, v1 = gather_slots(cache, 1, 14)
    np.testing.assert_array_equal(k1[:, :, :start], k0[:, :, :start])
    np.testing.assert_array_equal(v1[:, :, start:], v0[:, :, end:])
    # moved keys = old keys rotated by -(end - start): undo position p, apply p - delta
    moved = jnp.asarray(k0[:, :, end:].transpose(0, 2, 1, 3))  # [L, n, Hkv, hd] as "batch=L, T=n"
    pos = jnp.arange(end, 25)[None].repeat(moved.shape[0], 0)
    cos, sin = rope_cos_sin(pos - (end - start), cfg.head_dim, cfg.rope_theta)
    cos0, sin0 = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
    raw = apply_rope(moved, cos0, -sin0)  # inverse rotation
    expect = np.asarray(apply_rope(raw, cos, sin)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(k1[:, :, start:], expect, atol=1e-5)
    for a, b in zip(gather_slots(cache, 0, 30), other):  # the other sequence is untouched
        np.testing.assert_array_equal(a, b)
    assert int(cache.num_free) >= free0  # pages past the new length went back


def test_sampled_tim_generation_stops_on_budget_with_partial_tree(tim_model):
    prompt = tim_model.tokenizer("Plan a trip.")["input_ids"]
    results = timjax.generate(
        tim_model,
        [prompt, prompt],
        schema=SCHEMA,
        pruning_buffer=2,
        max_new_tokens=40,
        temperature=0.9,
        seed=1,
        max_seq_len=256,
    )
    for r in results:
        # the budget bounds the tokens written, grammar-forced ones included; the peak is what the cache held
        assert r.finish_reason == "length" and len(r.tokens) == 40
        assert r.stats.peak_working_tokens <= len(prompt) + 40
        assert r.text.startswith('{"reasoning": [{"')
        partial = close_partial_json(r.text)
        assert isinstance(partial, dict) and r.partial_response == partial
        assert r.response is None
    assert results[0].tokens != results[1].tokens  # per-sequence seeds


def test_text_prompt_gets_the_tim_system_prompt(tim_model):
    from timjax.api import encode_prompt
    from timjax.tim.prompt import tim_system_prompt
    from timjax.tim.schema import ToolSpec

    tools = (
        ToolSpec(
            name="search",
            description="web search",
            input_schema={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        ),
    )
    schema = tim_schema(tools, max_depth=3, max_subtasks=4)
    system = tim_system_prompt(schema)
    assert '"subtasks"' in system and "search(query: string): web search" in system and "3 levels" in system
    ids = encode_prompt(tim_model, "What is 2+2?", chat=True, system=system)
    text = tim_model.tokenizer.decode(ids)
    assert text.index(system) < text.index("What is 2+2?") and "<|im_start|>assistant" in text
    r = timjax.generate(tim_model, "What is 2+2?", schema=schema, max_new_tokens=8, max_seq_len=2048)
    assert r.stats.prompt_tokens == len(ids)
