"""Prefix caching: requests sharing a long prefix, cache on vs off (issue 24).

One random model (a shape whose step is not dominated by the LM head), one engine shape. For a shared
prefix of each ``--prefix`` length (random tokens standing for tool schemas and instructions), ``--requests``
requests = the prefix + a distinct 16-32 token suffix, ``--new-tokens`` greedy tokens each, no stop ids:

- batch: all requests added at once to a fresh engine (a cold cache: the first requests compute the prefix,
  the later ones map it): time to first token (TTFT, from enqueue: queueing included) p50 / p99, and
  throughput (generated tokens / wall time);
- alone: one request on an engine whose cache already holds the prefix (an earlier request with another
  suffix): its TTFT, the time a request that shares a warm system prompt waits.

Then the same number of requests with unrelated prompts (no sharing): throughput with the cache on must
not be lower. Each figure is the median of ``--repeats`` runs with the min and max; compilation is
excluded (a warm-up of every configuration first).

    python bench/prefix_cache.py --json bench/prefix_cache_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start

import numpy as np  # noqa: E402

from bench.common import environment, print_table, write_json  # noqa: E402
from timjax.base.config import Qwen3Config  # noqa: E402
from timjax.engine import Engine, Request  # noqa: E402
from timjax.qwen3.model import Qwen3  # noqa: E402

SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=4096,
)


def shared_prompts(n: int, prefix: int, seed: int) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    base = rs.randint(1, SHAPE["vocab_size"], prefix).tolist()
    return [base + rs.randint(1, SHAPE["vocab_size"], rs.randint(16, 33)).tolist() for _ in range(n)]


def distinct_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rs = np.random.RandomState(seed)
    return [rs.randint(1, SHAPE["vocab_size"], length + rs.randint(0, 17)).tolist() for _ in range(n)]


def batch(make_engine, prompts, new: int) -> dict:
    engine = make_engine()  # a fresh pool: nothing cached yet
    t0 = time.perf_counter()
    results = engine.run([Request(p, new) for p in prompts])
    wall = time.perf_counter() - t0
    assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
    ttft = [r.stats.first_token_s for r in results]
    tokens = sum(len(r.tokens) for r in results)
    st = engine.stats()
    return {
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1e3,
        "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1e3,
        "hit_tokens": st.prefix_cache_hit_tokens_total,
        "evictions": st.prefix_cache_evictions_total,
    }


def alone(make_engine, prompts, new: int) -> dict:
    engine = make_engine()
    engine.run([Request(prompts[0], new)])  # caches the prefix (cache on)
    r = engine.run([Request(prompts[1], new)])[0]
    return {"ttft_ms": r.stats.first_token_s * 1e3}


def spread(runs: list[dict], key: str) -> dict:
    xs = [r[key] for r in runs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict, d: int = 1) -> str:
    return f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--distinct-len", type=int, default=256, help="prompt tokens of the no-sharing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/out/prefix_cache_cpu.json")
    args = ap.parse_args()

    model = Qwen3(Qwen3Config(**SHAPE), dtype="float32")
    max_len = max(args.prefix) + 32 + args.new_tokens

    def make(on: bool):
        return lambda: Engine(
            model, max_batch=args.max_batch, page_size=16, max_seq_len=max_len, max_step_tokens=512, prefix_cache=on
        )

    workloads = {f"shared {p}": shared_prompts(args.requests, p, seed=p) for p in args.prefix}
    workloads["no sharing"] = distinct_prompts(args.requests, args.distinct_len, seed=1)
    for prompts in workloads.values():  # warm-up: every compiled shape of both modes
        for on in (False, True):
            batch(make(on), prompts, args.new_tokens)
            alone(make(on), prompts, args.new_tokens)
    rows, out = [], {}
    for name, prompts in workloads.items():
        for on in (False, True):
            runs = [batch(make(on), prompts, args.new_tokens) for _ in range(args.repeats)]
            lone = [alone(make(on), prompts, args.new_tokens) for _ in range(args.repeats)]
            out[f"{name}, cache {'on' if on else 'off'}"] = {"batch": runs, "alone": lone}
            rows.append(
                [
                    name,
                    "on" if on else "off",
                    fmt(spread(runs, "tok_s"), 0),
                    fmt(spread(runs, "ttft_p50_ms"), 0),
                    fmt(spread(runs, "ttft_p99_ms"), 0),
                    fmt(spread(lone, "ttft_ms")),
                    runs[0]["hit_tokens"],
                ]
            )
    text = print_table(
        [
            "prompts",
            "prefix cache",
            "batch tok/s",
            "batch TTFT p50 ms",
            "batch TTFT p99 ms",
            "alone TTFT ms",
            "hit tokens",
        ],
        rows,
        title=f"{args.requests} requests, {args.new_tokens} new tokens, max_batch {args.max_batch}, page 16, "
        f"512 tokens a step; median (min-max) of {args.repeats}",
    )
    write_json(args.json, {"env": environment(), "args": vars(args), "shape": SHAPE, "results": out, "table": text})


if __name__ == "__main__":
    main()
