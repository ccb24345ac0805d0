"""The open engine under Poisson arrivals vs the closed batch (issue 20).

One engine, one random model (a shape whose step is not dominated by the LM head), one set of requests
(random prompts, a fixed number of greedy new tokens, no stop ids). First ``Engine.run`` serves them as
one closed batch: the offline throughput. Then the engine's loop thread serves them arriving as a Poisson
process at 0.5x, 1x and 2x the offline request rate, every request streamed through its handle by an
asyncio consumer: throughput, time to first token (TTFT, from ``add_request``) and inter-token latency
(ITL, between token events, per token), p50 / p99, and open throughput / offline throughput. Each figure
is the median of ``--repeats`` runs, with the min and max beside it. Compilation is excluded (a warm-up run
of both modes first).

    python bench/engine_open.py --json bench/out/engine_open_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
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
from timjax.engine import Engine, Request, TokenEvent  # noqa: E402
from timjax.qwen3.model import Qwen3  # noqa: E402

SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=512,
)


def make_requests(n: int, new: int, seed: int) -> list[tuple[list[int], int]]:
    rs = np.random.RandomState(seed)
    return [(rs.randint(1, SHAPE["vocab_size"], rs.randint(16, 65)).tolist(), new) for _ in range(n)]


def offline(engine: Engine, reqs) -> dict:
    t0 = time.perf_counter()
    results = engine.run([Request(p, n) for p, n in reqs])
    wall = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "req_s": len(reqs) / wall}


async def _open_run(engine: Engine, reqs, rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ttft, itl, done_at = [], [], []

    async def consume(h, t_add):
        last = t_add
        async for ev in h:
            if isinstance(ev, TokenEvent) and ev.token_ids:
                now = time.perf_counter()
                if last == t_add:
                    ttft.append(now - t_add)
                else:
                    itl.extend([(now - last) / len(ev.token_ids)] * len(ev.token_ids))
                last = now
        done_at.append(time.perf_counter())
        return await h.aresult()

    tasks = []
    t0 = time.perf_counter()
    for prompt, new in reqs:
        await asyncio.sleep(rng.exponential(1.0 / rate))
        h = engine.add_request(prompt, {"max_new_tokens": new, "stop_ids": []})
        tasks.append(asyncio.create_task(consume(h, time.perf_counter())))
    results = await asyncio.gather(*tasks)
    wall = max(done_at) - t0
    tokens = sum(len(r.tokens) for r in results)
    assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
    q = lambda xs, p: float(np.percentile(xs, p)) * 1e3  # noqa: E731
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "ttft_p50_ms": q(ttft, 50),
        "ttft_p99_ms": q(ttft, 99),
        "itl_p50_ms": q(itl, 50),
        "itl_p99_ms": q(itl, 99),
    }


def open_run(engine: Engine, reqs, rate: float, seed: int) -> dict:
    engine.start()
    try:
        return asyncio.run(_open_run(engine, reqs, rate, seed))
    finally:
        engine.stop()


def spread(runs: list[dict], key: str) -> dict:
    xs = [r[key] for r in runs]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench/out/engine_open_cpu.json")
    args = ap.parse_args()

    cfg = Qwen3Config(**SHAPE)
    model = Qwen3(cfg, dtype="float32")
    # 64 tokens a step: few packed lengths, so warm-up reaches every compiled shape the runs use
    engine = Engine(model, max_batch=args.max_batch, page_size=16, max_seq_len=128, max_step_tokens=64)
    reqs = make_requests(args.requests, args.new_tokens, seed=0)
    import jax

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, d, **kw: compiles.append(d) if ev == "/jax/core/compile/backend_compile_duration" else None
    )
    off_req_s = offline(engine, reqs)["req_s"]  # warm-up: the closed batch, then one open run per load
    for i, load in enumerate(args.loads):
        open_run(engine, reqs, rate=load * off_req_s, seed=1000 + i)
    n_warm = len(compiles)
    off = [offline(engine, reqs) for _ in range(args.repeats)]
    off_req_s = statistics.median(r["req_s"] for r in off)
    rows, out = [], {"offline": off, "open": {}}
    off_tok = spread(off, "tok_s")
    rows.append(["Engine.run (closed batch)", "-", f"{off_tok['median']:.0f} ({off_tok['min']:.0f}-{off_tok['max']:.0f})", "-", "-", "-", "-", "1.00"])
    for load in args.loads:
        runs = [open_run(engine, reqs, rate=load * off_req_s, seed=10 * i + 1) for i in range(args.repeats)]
        out["open"][str(load)] = runs
        s = {k: spread(runs, k) for k in ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}
        ratio = s["tok_s"]["median"] / off_tok["median"]
        fmt = lambda k, d=1: f"{s[k]['median']:.{d}f} ({s[k]['min']:.{d}f}-{s[k]['max']:.{d}f})"  # noqa: E731
        rows.append(
            [
                f"open engine, Poisson {load:g}x offline rate",
                f"{load * off_req_s:.2f}",
                fmt("tok_s", 0),
                fmt("ttft_p50_ms"),
                fmt("ttft_p99_ms"),
                fmt("itl_p50_ms"),
                fmt("itl_p99_ms"),
                f"{ratio:.2f}",
            ]
        )
    text = print_table(
        ["mode", "arrivals req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tok/s vs offline"],
        rows,
        title=f"{args.requests} requests, prompts 16-64, {args.new_tokens} new tokens, max_batch {args.max_batch}; "
        f"median (min-max) of {args.repeats}",
    )
    print(f"compiles: {n_warm} in warm-up, {len(compiles) - n_warm} during the measured runs")
    out["compiles"] = {"warmup": n_warm, "measured": len(compiles) - n_warm}
    write_json(args.json, {"env": environment(), "args": vars(args), "shape": SHAPE, "results": out, "table": text})


if __name__ == "__main__":
    main()
