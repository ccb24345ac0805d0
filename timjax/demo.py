"""The built-in default job (``timjax demo``).

``run_demo``: the shipped tiny TIM (``timjax/tiny_tim``, trained here by ``timjax train
timjax/train/configs/tiny_tim.json``) solves an arithmetic problem by recursive decomposition, calling the
calculator over MCP inside the inference, with subtask pruning (buffer 1); the tree is printed with its
pruned subtask lists marked, with the stats, and the answer is checked against exact arithmetic.

``run_long_demo`` (``timjax demo --long``): one problem whose reasoning tree is at least twice the working
memory it is given, with pruning off (it stops at the limit) and on (full tree length, peak working memory,
share pruned, answer checked).

``run_random_demo`` (``timjax demo --random-qwen3``): everything else timjax does, on a small random Qwen3
with the real Qwen3 vocabulary, offline:

1. write a Hugging Face checkpoint (safetensors + config + tokenizer) for a random Qwen3-shaped model;
2. convert it to a timjax checkpoint and load it back;
3. check the full-sequence forward against the paged runtime's prefill;
4. generate text (unconstrained, continuous batching);
5. replay a deep synthetic TIM reasoning tree through the runtime with and without subtask pruning, and
   print the tree with its pruned parts marked.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

# A depth-3 problem the shipped model solves; its held-out accuracy is in bench/RESULTS.md (issue 9). Buffer 1
# here: this tree has two subtask lists, so a buffer of 2 would keep both and nothing would be pruned.
DEMO_QUESTION = "Calculate -(7 * (7 - 12))."


def run_demo(
    question: str = DEMO_QUESTION,
    *,
    model_dir: str | None = None,
    pruning_buffer: int | None = 1,
    reposition: str = "reencode",
    impl: str = "auto",
) -> dict:
    """The tiny TIM solves ``question`` with the calculator over MCP; returns a summary (``ok``: the answer is
    right and the tree is complete)."""
    import jax

    import timjax
    from timjax.api import default_model_path
    from timjax.tim.display import format_tree
    from timjax.tim.schema import tim_schema
    from timjax.train.corpus import check_answer, fmt_int, parse_expression, value
    from timjax.train.tools_adapter import tool_servers

    say = lambda *a: print(*a, flush=True)
    t_start = time.perf_counter()
    path = model_dir or default_model_path()
    model = timjax.load(path, dtype="float32")
    n_params = model.config.num_params()
    say(
        f"timjax demo on {jax.devices()[0].platform} (jax {jax.__version__}): the tiny TIM "
        f"({n_params / 1e6:.2f}M parameters, {model.config.vocab_size}-token vocabulary) from {path}"
    )
    expr = question.split(" ", 1)[1].rstrip(".?")
    expected = fmt_int(value(parse_expression(expr)))
    say(f"question: {question}   (exact answer: {expected})")
    say(f"tools over MCP: calculator, lookup; prune buffer {pruning_buffer} ({reposition}); greedy decoding")
    t0 = time.perf_counter()
    r = timjax.generate(
        model,
        question,
        schema=tim_schema(),
        tools=tool_servers(),
        pruning_buffer=pruning_buffer,
        reposition=reposition,
        max_new_tokens=1024,
        impl=impl,
    )
    wall = time.perf_counter() - t0
    tree = r.response if r.response is not None else r.partial_response
    if tree is not None:
        say("the reasoning tree (subtask lists pruned from working memory marked):")
        say("\n".join("  " + line for line in format_tree(tree, r.pruned_paths, width=80).splitlines()))
    st = r.stats
    say(
        f"{r.finish_reason}{': ' + r.error if r.error else ''}: {st.generated_tokens} tokens written "
        f"({st.tool_calls} calculator calls), peak working memory {st.peak_working_tokens} tokens, "
        f"KV pruned {st.pruned_share:.0%} in {st.prune_events} prune events, {st.tokens_per_s:.0f} tok/s, "
        f"{wall:.1f}s"
    )
    answer = None if r.response is None else r.response.answer
    ok = r.finish_reason == "stop" and answer is not None and check_answer(expected, answer)
    say(f"answer: {answer!r}; expected {expected}: {'correct' if ok else 'WRONG'}")
    say(f"demo {'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.1f}s")
    return {
        "ok": ok,
        "answer": answer,
        "expected": expected,
        "finish_reason": r.finish_reason,
        "tokens": st.generated_tokens,
        "tool_calls": st.tool_calls,
        "peak_working_tokens": st.peak_working_tokens,
        "pruned_share": st.pruned_share,
        "pruned_paths": r.pruned_paths,
        "wall_s": wall,
    }


def run_long_demo(
    *,
    model_dir: str | None = None,
    context: int = 1024,
    k: int = 2,
    pruning_buffer: int = 1,
    seed: int = 23,
    impl: str = "auto",
) -> dict:
    """``timjax demo --long``: one problem of the beyond-context family (``timjax.eval.long``: a reference
    tree of at least ``k`` x ``context`` tokens whose pruned working memory fits the context) solved with the
    working memory capped at ``context`` tokens, once with pruning off (it must stop at the limit) and once
    with ``pruning_buffer``; prints the full tree length, the peak working memory, the share pruned and the
    checked answer. ``ok``: pruning off stopped at the limit and the pruned run's answer is right."""
    import jax

    import timjax
    from timjax.api import default_model_path
    from timjax.eval.long import long_problems
    from timjax.eval.run import hit_context
    from timjax.tim.display import format_tree
    from timjax.tim.schema import tim_schema
    from timjax.tools.runner import ToolRunner
    from timjax.train.corpus import solved
    from timjax.train.tools_adapter import tool_servers

    say = lambda *a: print(*a, flush=True)
    t_start = time.perf_counter()
    path = str(model_dir or default_model_path())
    model = timjax.load(path, dtype="float32")
    say(f"timjax demo --long on {jax.devices()[0].platform}: the TIM at {path}; working memory capped at C = {context}")
    prob = long_problems(1, k, context, path, seed=seed)[0]
    d = prob.data
    say(f"question: {prob.question}   (exact answer: {prob.answer})")
    say(
        f"reference tree: {d['tree_tokens']} tokens = {d['tree_tokens'] / context:.2f} C; its peak working memory "
        f"with buffer 1 / 2: {d['peak_buf1']} / {d['peak_buf2']} tokens ({d['peak_buf1'] / context:.2f} / "
        f"{d['peak_buf2'] / context:.2f} C)"
    )
    runs = {}
    with ToolRunner(tool_servers()) as runner:
        for buf in (None, pruning_buffer):
            t0 = time.perf_counter()
            r = timjax.generate(
                model,
                prob.question,
                schema=tim_schema(),
                tools=runner,
                pruning_buffer=buf,
                max_seq_len=context,
                max_new_tokens=(k + 2) * context,
                impl=impl,
            )
            runs[buf] = r
            st = r.stats
            answer = None if r.response is None else r.response.answer
            say(
                f"pruning {'off' if buf is None else f'buffer {buf}'}: {r.finish_reason}"
                f"{' (' + r.error + ')' if r.error else ''}; wrote {st.generated_tokens} tokens "
                f"({st.generated_tokens / context:.2f} C), peak working memory {st.peak_working_tokens} "
                f"({(st.peak_working_tokens or 0) / context:.2f} C), KV pruned {st.pruned_share:.0%}, "
                f"{st.tool_calls} tool calls, {time.perf_counter() - t0:.0f}s; answer {answer!r}: "
                f"{'correct' if solved(prob, r) else 'WRONG'}"
            )
    pruned = runs[pruning_buffer]
    tree = pruned.response if pruned.response is not None else pruned.partial_response
    if tree is not None:
        say(f"the tree written with buffer {pruning_buffer} (pruned subtask lists marked):")
        say("\n".join("  " + line for line in format_tree(tree, pruned.pruned_paths, width=100).splitlines()))
    off_stopped = hit_context(runs[None])
    ok = off_stopped and solved(prob, pruned)
    say(
        f"pruning off {'stopped at the context limit' if off_stopped else 'did NOT stop at the limit'}; "
        f"with buffer {pruning_buffer} the answer is {'right' if solved(prob, pruned) else 'wrong'}"
    )
    say(f"demo --long {'OK' if ok else 'FAILED'} in {time.perf_counter() - t_start:.0f}s")
    st = pruned.stats
    return {
        "ok": ok,
        "question": prob.question,
        "expected": prob.answer,
        "answer": None if pruned.response is None else pruned.response.answer,
        "context": context,
        "reference_tree_tokens": d["tree_tokens"],
        "tree_tokens": st.generated_tokens,
        "peak_working_tokens": st.peak_working_tokens,
        "pruned_share": st.pruned_share,
        "finish_reason": pruned.finish_reason,
        "no_pruning_finish": runs[None].finish_reason,
        "no_pruning_error": runs[None].error,
    }


def run_random_demo(
    work_dir: str | None = None, *, page_size: int = 16, depth: int = 4, breadth: int = 3, impl: str = "auto"
) -> dict:
    """The runtime on a random Qwen3 with the real vocabulary (``timjax demo --random-qwen3``)."""
    import jax

    import timjax
    from timjax.base.config import Qwen3Config
    from timjax.base.vocab import IM_END_ID, QWEN3_MODEL_VOCAB, build_qwen3_tokenizer
    from timjax.convert import convert_hf_to_timjax, export_timjax_to_hf
    from timjax.engine import Engine, Request
    from timjax.engine.tim_controller import ReplayText, TimController
    from timjax.qwen3.model import init_params
    from timjax.tim.display import format_tree
    from timjax.tim.grammar import llg_tokenizer
    from timjax.tim.schema import tim_schema
    from timjax.tim.traces import serialise, synthetic_document

    tmp = tempfile.TemporaryDirectory(prefix="timjax-demo-") if work_dir is None else None
    root = Path(work_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    say = lambda *a: print(*a, flush=True)

    say(f"timjax demo on {jax.devices()[0].platform} (jax {jax.__version__}); work dir {root}")
    cfg = Qwen3Config(
        vocab_size=QWEN3_MODEL_VOCAB,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        eos_token_id=IM_END_ID,
        torch_dtype="float32",
    )
    tok_dir = build_qwen3_tokenizer(root / "tokenizer")
    hf_dir = root / "hf-random-qwen3"
    params = init_params(cfg, "float32", jax.random.key(0))
    export_timjax_to_hf((cfg, params), hf_dir, tokenizer_dir=tok_dir, overwrite=True, progress=False)
    say(f"1. wrote a random Qwen3 ({cfg.num_params() / 1e6:.1f}M params, real Qwen3 vocabulary) to {hf_dir}")

    tj_dir = convert_hf_to_timjax(hf_dir, root / "timjax-random-qwen3", dtype="float32", overwrite=True)
    model = timjax.load(tj_dir, dtype="float32")
    say(f"2. converted to {tj_dir} and loaded it")

    ids = model.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    ref = timjax.logits(model, ids)
    engine = Engine(model, max_batch=1, page_size=page_size, max_seq_len=64, impl=impl)
    from timjax.runtime import steps

    logits, _ = steps.logits_step(
        model.params(),
        engine.cache,
        np.zeros(1, np.int32),
        np.array([ids + [0] * (16 - len(ids))], np.int32),
        np.array([len(ids)], np.int32),
        cfg=cfg,
        impl=engine.impl,
    )
    err = float(np.abs(np.asarray(logits)[0] - ref[-1]).max())
    say(f"3. reference forward vs paged prefill: max |logit diff| = {err:.2e}")
    summary["prefill_max_abs_diff"] = err

    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]
    t0 = time.perf_counter()
    results = timjax.generate(
        model, prompts, max_new_tokens=24, temperature=0.8, top_p=0.95, seed=0, page_size=page_size, impl=impl
    )
    say(
        f"4. generated {sum(r.stats.generated_tokens for r in results)} tokens for {len(prompts)} prompts in "
        f"{time.perf_counter() - t0:.1f}s (random weights, so the text is noise):"
    )
    for p, r in zip(prompts, results):
        say(f"   {p!r} -> {r.text[:60]!r} [{r.finish_reason}]")

    doc = synthetic_document(depth=depth, breadth=breadth, roots=2, words=6, seed=1)
    text = serialise(doc)
    schema = tim_schema(max_depth=depth + 1)
    llt = llg_tokenizer(model.tokenizer, cfg.vocab_size, [IM_END_ID])
    prompt = model.tokenizer("Solve the problem step by step.")["input_ids"]
    say(
        f"5. TIM: replaying a synthetic reasoning tree (depth {depth}, breadth {breadth}, "
        f"{len(model.tokenizer(text)['input_ids'])} tokens) through the runtime; position limit "
        f"{cfg.max_position_embeddings}"
    )
    runs = {}
    for buffer in (None, 2):
        ctrl = TimController(
            model,
            schema,
            max_new_tokens=100_000,
            prompt_len=len(prompt),
            pruning_buffer=buffer,
            override=ReplayText(text, llt),
        )
        eng = Engine(model, max_batch=1, page_size=page_size, max_seq_len=cfg.max_position_embeddings, impl=impl)
        r = eng.run([Request(prompt, 100_000, controller=ctrl)])[0]
        runs[buffer] = r
        st = r.stats
        say(
            f"   pruning {'off' if buffer is None else f'buffer {buffer}'}: {r.finish_reason}"
            f"{' (' + r.error + ')' if r.error else ''}; {st.generated_tokens} tokens written, peak working memory "
            f"{st.peak_working_tokens}, KV pruned {st.pruned_share:.0%} in {st.prune_events} events, "
            f"{st.tokens_per_s:.0f} tok/s"
        )
    best = runs[2]
    if best.response is not None:
        say("   the complete tree (pruned subtask lists marked):")
        say("\n".join("     " + line for line in format_tree(best.response, best.pruned_paths, width=70).splitlines()))
    summary.update(
        tim_finish=best.finish_reason,
        tim_tokens=len(best.tokens),
        tim_peak_working=best.stats.peak_working_tokens,
        tim_pruned_share=best.stats.pruned_share,
        no_pruning_finish=runs[None].finish_reason,
    )
    if tmp is not None:
        tmp.cleanup()
    ok = err < 1e-3 and best.finish_reason == "stop" and runs[None].finish_reason == "length"
    say("demo " + ("OK" if ok else "FAILED"))
    summary["ok"] = ok
    return summary
