"""Decode throughput: timjax (Pallas / XLA attention, per-step and multi-step) vs JAX's Pallas paged
attention (kernel level) vs transformers' ``generate``, with random Qwen3 weights.

    python bench/decode.py                                   # 20m shape, batch 1 8, CPU-sized run
    python bench/decode.py --shape 20m --batch 1 8 32 --json bench/out/decode_20m_cpu.json
    python bench/decode.py --shape 8b --dtype bfloat16 --batch 1 8 32 --prompt-len 1024   # on an H100

Every timjax figure goes through the real jitted functions: ``steps.generate_step`` (prefill with the same
function, then one decode step per dispatch, cache donated) and ``steps.decode_loop`` (``--steps`` decode
steps per dispatch). Beside each step time the weight-bandwidth floor (bytes of weights read per step /
memory bandwidth) and the ratio measured/floor are printed. Rows that do not apply on this machine say
"n/a" with the reason instead of a number.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/decode.py` from the repo root

import timjax
from bench.common import (
    H100_SXM_GBS,
    Stopwatch,
    Timing,
    environment,
    load_average,
    log,
    measure_host_bandwidth_gbs,
    on_gpu,
    print_table,
    write_json,
)
from timjax import kernels
from timjax.base.buckets import cdiv
from timjax.base.config import Qwen3Config
from timjax.qwen3.model import as_dtype, random_model
from timjax.qwen3.params import FLOAT32_PARAMS, param_shapes
from timjax.runtime import steps
from timjax.runtime.cache import create_cache, kv_bytes_per_token
from timjax.runtime.sampling import SamplingParams

QWEN_VOCAB = 151936

SHAPES: dict[str, Qwen3Config] = {
    # A few-layer toy for smoke runs.
    "tiny": Qwen3Config(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    ),
    # ~20.0M params, Qwen3-like proportions (GQA 2:1, head_dim 64, SwiGLU 3x, tied embeddings) with a
    # 32k vocabulary (a 151936 vocab alone would be 39M params at hidden 256).
    "20m": Qwen3Config(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    # Qwen3-0.6B.
    "0.6b": Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    # Qwen3-8B (and TIM-8b).
    "8b": Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}

NA_CPU = "n/a on CPU"


# ---------------------------------------------------------------------------------------------- sizes
def step_weight_bytes(cfg: Qwen3Config, dtype) -> int:
    """Bytes of weights one decode step must read: every layer, the final norm and the LM head (the
    embedding table too when tied, as the LM head). An untied embedding lookup reads B rows: ignored."""
    item = as_dtype(dtype).itemsize
    total = 0
    for path, shape in param_shapes(cfg).items():
        if path == "embed" and not cfg.tie_word_embeddings:
            continue
        total += int(np.prod(shape)) * (4 if path in FLOAT32_PARAMS else item)
    return total


def total_weight_bytes(cfg: Qwen3Config, dtype) -> int:
    item = as_dtype(dtype).itemsize
    return sum(int(np.prod(s)) * (4 if p in FLOAT32_PARAMS else item) for p, s in param_shapes(cfg).items())


def available_memory_bytes() -> int:
    if on_gpu():
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------- timjax
def greedy(batch: int) -> SamplingParams:
    return SamplingParams(**{k: jnp.asarray(v) for k, v in SamplingParams.host(batch).items()})


def _cache_size(fn) -> int | None:
    try:
        return fn._cache_size()
    except Exception:  # noqa: BLE001
        return None


def new_cache(cfg, B, max_seq_len, page_size, dtype):
    pages_per_seq = cdiv(max_seq_len, page_size)
    return create_cache(
        cfg, num_pages=B * pages_per_seq, page_size=page_size, max_seqs=B, max_seq_len=max_seq_len, dtype=dtype
    )


def prefill(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl):
    """A fresh cache holding ``prompt`` [B, T] in every slot, via ``generate_step``; returns (next tokens, cache, s)."""
    cache = new_cache(cfg, B, max_seq_len, page_size, dtype)
    rows = jnp.arange(B, dtype=jnp.int32)
    q_len = jnp.full((B,), prompt.shape[1], jnp.int32)
    with Stopwatch() as sw:
        tok, cache = steps.generate_step(params, cache, rows, jnp.asarray(prompt), q_len, greedy(B), cfg=cfg, impl=impl)
        jax.block_until_ready((tok, cache))
    return tok, cache, sw.s


def bench_step(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl, n_steps, warmup=2) -> dict[str, Any]:
    """ms per decode step: one ``generate_step`` dispatch per token, cache donated, timed one by one."""
    _, _, first_prefill_s = prefill(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl)  # compiles prefill
    tok, cache, prefill_s = prefill(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl)
    rows = jnp.arange(B, dtype=jnp.int32)
    ones = jnp.ones((B,), jnp.int32)
    sampling = greedy(B)
    compile_s = None
    for i in range(warmup):
        t0 = time.perf_counter()
        tok, cache = steps.generate_step(params, cache, rows, tok[:, None], ones, sampling, cfg=cfg, impl=impl)
        jax.block_until_ready((tok, cache))
        if i == 0:
            compile_s = time.perf_counter() - t0
    n_compiled = _cache_size(steps.generate_step)
    t = Timing()
    for _ in range(n_steps):
        t0 = time.perf_counter()
        tok, cache = steps.generate_step(params, cache, rows, tok[:, None], ones, sampling, cfg=cfg, impl=impl)
        jax.block_until_ready((tok, cache))
        t.samples.append(time.perf_counter() - t0)
    recompiled = (_cache_size(steps.generate_step) or 0) - (n_compiled or 0)
    assert not bool(np.asarray(cache.oom).any()), "benchmark cache ran out of pages"
    return {
        "timing": t,
        "prefill_s": prefill_s,
        "first_decode_call_s": compile_s,
        "first_prefill_call_s": first_prefill_s,
        "recompiles_during_timing": recompiled,
    }


def bench_loop(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl, n_steps, repeats) -> dict[str, Any]:
    """ms per decode step inside ``steps.decode_loop`` (``n_steps`` steps per dispatch)."""
    tok, cache, _ = prefill(params, cfg, B, prompt, max_seq_len, page_size, dtype, impl)
    active = jnp.ones((B,), bool)
    stop_ids = jnp.full((1,), -1, jnp.int32)
    budget = jnp.full((B,), 1 << 30, jnp.int32)
    sampling = greedy(B)
    t = Timing()
    compile_s = None
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        sampled, cache, tok, active = steps.decode_loop(
            params, cache, tok, active, sampling, stop_ids, budget, cfg=cfg, impl=impl, num_steps=n_steps
        )
        jax.block_until_ready((sampled, cache))
        dt = time.perf_counter() - t0
        if i == 0:
            compile_s = dt
        else:
            t.samples.append(dt / n_steps)
    assert bool(np.asarray(active).all()), "a slot stopped inside the timed loop"
    return {"timing": t, "first_call_s": compile_s, "steps_per_dispatch": n_steps}


def bench_engine(model, B, prompt, n_new, repeats, page_size, impl) -> dict[str, Any]:
    """End to end ``timjax.generate`` (the engine's host loop): (t(N) - t(1)) / (N - 1) per token, on one
    long-lived ``Engine`` (as a server keeps one): building an engine per call adds ~0.4 s of allocation
    whose spread, divided by N - 1, would swamp the step. The prompts' pages hit the prefix cache in both
    runs alike, so the difference is N - 1 decode steps."""
    from timjax.engine import Engine

    prompts = [list(map(int, p)) for p in prompt]
    # One max_seq_len (a whole number of pages): one compiled cache shape, and it sidesteps the Engine's default
    # pool size (max_batch * max_seq_len tokens), short by up to a page per slot when not a multiple of page_size.
    max_seq_len = cdiv(len(prompts[0]) + n_new, page_size) * page_size
    engine = Engine(model, max_batch=B, page_size=page_size, max_seq_len=max_seq_len, impl=impl)

    def run(n):
        res = timjax.generate(engine, prompts, max_new_tokens=n, stop_ids=[])
        assert all(r.stats.generated_tokens == n for r in res), [r.finish_reason for r in res]

    return per_token_timing(run, n_new, repeats)


def bench_ragged_step(model, B, prompt, n_new, page_size, impl, repeats, decode=False) -> dict[str, Any]:
    """ms per decode step of the bare ragged step (``steps.ragged_generate_step``) on the cache and shapes the
    engine uses for the same request (``Engine``'s slots, page-table width and window), inputs kept on the
    device: the engine's floor. Prefill through the same step. ``decode``: the decode specialization the
    engine takes when no row feeds more than one token (else the ragged kernel)."""
    from timjax.base.buckets import bucket, cdiv, pow2
    from timjax.engine import Engine
    from timjax.engine.runner import MIN_KV_WINDOW

    cfg, params = model.config, model.params()
    max_seq_len = cdiv(prompt.shape[1] + n_new, page_size) * page_size
    eng = Engine(model, max_batch=B, page_size=page_size, max_seq_len=max_seq_len, impl=impl)
    cache, S, T = eng.cache, eng.cache.max_seqs, prompt.shape[1]
    kv_pages = min(pow2(cdiv(T + n_new, page_size), lo=cdiv(MIN_KV_WINDOW, page_size)), cache.max_pages_per_seq)
    keep = steps.Edits(jnp.full(S, 1 << 30, jnp.int32), *jnp.zeros((4, 0), jnp.int32))  # no edit
    # every n_new - 1 steps the rows are cut back to the prompt (inside the step, as the engine's edits are)
    rewind = steps.Edits(jnp.full(S, T, jnp.int32), *jnp.zeros((4, 0), jnp.int32))
    edits = keep

    def packed(tokens, q_len):
        n = bucket(max(int(q_len.sum()), min(8, S)))
        tok = jnp.zeros(n, jnp.int32).at[: tokens.size].set(tokens.reshape(-1))
        row = (
            jnp.zeros(n, jnp.int32)
            .at[: tokens.size]
            .set(jnp.repeat(jnp.arange(S), q_len, total_repeat_length=tokens.size))
        )
        cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_len)]).astype(jnp.int32)
        return steps.Packed(tok, row, jnp.arange(S, dtype=jnp.int32), q_len, cu)

    sp = greedy(S)
    q_len = jnp.zeros(S, jnp.int32).at[:B].set(T)
    kw = dict(cfg=cfg, impl=impl, kv_pages=kv_pages)
    p = packed(jnp.asarray(prompt), q_len)
    tok, _, cache = steps.ragged_generate_step(
        params, cache, p, edits, sp, **kw, max_new_pages=cdiv(p.tokens.size, page_size) + 1
    )
    ones = jnp.zeros(S, jnp.int32).at[:B].set(1)
    t = Timing()
    for i in range(2 + repeats * n_new):
        edits = rewind if i % (n_new - 1) == 0 else keep
        p = packed(tok[:B], ones)
        t0 = time.perf_counter()
        tok, _, cache = steps.ragged_generate_step(
            params, cache, p, edits, sp, **kw, max_new_pages=cdiv(p.tokens.size, page_size) + 1, decode=decode
        )
        jax.block_until_ready(tok)
        if i >= 2:
            t.samples.append(time.perf_counter() - t0)
    assert not bool(np.asarray(cache.oom).any()), "benchmark cache ran out of pages"
    return {"timing": t, "kv_pages": kv_pages, "slots": S}


def per_token_timing(run, n_new: int, repeats: int) -> dict[str, Any]:
    """Decode time per token of an end-to-end generate: (t(N) - t(1)) / (N - 1), which cancels the prefill.
    ``run(n)`` generates n tokens; both lengths are run once first to compile."""
    for n in (1, n_new):
        run(n)
    t1, tn = Timing(), Timing()
    for _ in range(repeats):
        for n, t in ((1, t1), (n_new, tn)):
            t0 = time.perf_counter()
            run(n)
            t.samples.append(time.perf_counter() - t0)
    return {"timing": Timing([(tn.median - t1.median) / (n_new - 1)]), "t1_s": t1, "tN_s": tn}


# ---------------------------------------------------------------------------------------------- transformers
def missing_optional(module: str) -> str | None:
    """None when ``module`` can be imported, else the note for a skipped row (torch is only in the test
    extra: a default install benchmarks timjax alone)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return f"skipped: {module} is not installed (pip install -e '.[test]' adds it)"
    return None


def hf_config(cfg: Qwen3Config):
    import transformers

    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    return transformers.Qwen3Config(**d)


def bench_torch(cfg, dtype, B, prompt, n_new, repeats, threads) -> dict[str, Any]:
    import torch
    import transformers

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[str(as_dtype(dtype))]
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_config(cfg)).to(tdtype).eval()
    ids = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n

    res = {
        **per_token_timing(run, n_new, repeats),
        "device": device,
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    del model
    gc.collect()
    return res


# ---------------------------------------------------------------------------------------------- kernels alone
def bench_kernels(cfg, dtype, B, context, page_size, repeats, include_interpret) -> list[dict[str, Any]]:
    """One layer's decode attention at equal shapes: ours (Pallas), JAX's shipped Pallas paged attention, and
    the XLA reference (timjax's CPU path). Each kernel jitted and timed alone."""
    Hq, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dt = as_dtype(dtype)
    k_splits, ppcb = 16, 8  # JAX kernel defaults; pages per sequence must be a multiple of both
    pages_per_seq = cdiv(context, page_size)
    maxp = cdiv(pages_per_seq, k_splits * ppcb) * (k_splits * ppcb) if on_gpu() else pages_per_seq
    num_pages = B * pages_per_seq
    key = jax.random.key(1)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (B, Hq, hd), jnp.float32).astype(dt)
    k_pages = jax.random.normal(kk, (Hkv, num_pages, page_size, hd), jnp.float32).astype(dt)
    v_pages = jax.random.normal(kv, (Hkv, num_pages, page_size, hd), jnp.float32).astype(dt)
    perm = np.random.default_rng(0).permutation(num_pages).reshape(B, pages_per_seq)
    table = np.zeros((B, maxp), np.int32)
    table[:, :pages_per_seq] = perm
    table = jnp.asarray(table)
    lengths = jnp.full((B,), context, jnp.int32)
    kv_bytes = 2 * B * context * Hkv * hd * dt.itemsize

    def timed(name, fn, note=""):
        f = jax.jit(fn)
        try:
            with Stopwatch() as sw:
                jax.block_until_ready(f(q, k_pages, v_pages, lengths, table))
            t = Timing()
            for _ in range(max(repeats, 5)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(q, k_pages, v_pages, lengths, table))
                t.samples.append(time.perf_counter() - t0)
            out = np.asarray(f(q, k_pages, v_pages, lengths, table), np.float32)
            return {"kernel": name, "timing": t, "first_call_s": sw.s, "note": note, "out": out, "kv_bytes": kv_bytes}
        except Exception as e:  # noqa: BLE001 - report, don't crash the whole benchmark
            return {"kernel": name, "timing": None, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"}

    rows = [
        timed(
            "xla reference (timjax impl=xla)", lambda q, k, v, l, t: kernels.decode_attention(q, k, v, l, t, impl="xla")
        )
    ]
    if on_gpu():
        rows.append(
            timed(
                "timjax Pallas (impl=pallas)",
                lambda q, k, v, l, t: kernels.decode_attention(q, k, v, l, t, impl="pallas"),
            )
        )
        from jax.experimental.pallas.ops.gpu.paged_attention import (
            paged_attention as jax_paged,
        )

        rows.append(
            timed(
                f"jax.experimental paged_attention (k_splits={k_splits}, ppcb={ppcb})",
                lambda q, k, v, l, t: jax_paged(q, k, v, t, l, k_splits=k_splits, pages_per_compute_block=ppcb),
            )
        )
    else:
        if include_interpret:
            rows.append(
                timed(
                    "timjax Pallas interpret (not a perf path)",
                    lambda q, k, v, l, t: kernels.decode_attention(q, k, v, l, t, impl="pallas_interpret"),
                )
            )
        else:
            rows.append({"kernel": "timjax Pallas (impl=pallas)", "timing": None, "note": NA_CPU})
        rows.append(
            {"kernel": "jax.experimental paged_attention", "timing": None, "note": NA_CPU + " (Triton/GPU kernel)"}
        )
    ref = rows[0].get("out")
    for r in rows:
        out = r.pop("out", None)
        if out is not None and ref is not None:
            r["max_abs_diff_vs_xla"] = float(np.max(np.abs(out - ref)))
    return rows


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="20m")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="default: bfloat16 on GPU, float32 on CPU (bf16 matmuls are not a fast CPU path in XLA or torch)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 1 8 on CPU, 1 8 32 on GPU")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed (and steps per decode_loop dispatch)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the multi-step measurements (median)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help=f"memory bandwidth for the floor; default {H100_SXM_GBS:g} (H100 SXM) on GPU, measured on CPU",
    )
    p.add_argument(
        "--kernel-context",
        type=int,
        default=None,
        help="context length of the kernel-level comparison (default prompt-len + steps)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["pallas", "xla", "loop", "engine", "kernels", "torch"],
        choices=["pallas", "xla", "loop", "engine", "kernels", "torch"],
        help="'engine' adds end-to-end timjax.generate (host loop included)",
    )
    p.add_argument(
        "--include-interpret",
        action="store_true",
        help="on CPU, time the Pallas kernel in interpret mode (slow; not a performance path)",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch.set_num_threads values to try, each its own row; the fastest is the peer for the "
        "speedup column (default on CPU: 1 and os.cpu_count(); torch's intra-op threads spin and "
        "lose badly on a loaded machine, so one thread can win)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="write all numbers and the environment here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    gpu = on_gpu()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    batches = args.batch or ([1, 8, 32] if gpu else [1, 8])
    cfg = SHAPES[args.shape]
    env = environment()
    if args.bandwidth_gbs is not None:
        bw, bw_src = args.bandwidth_gbs, "--bandwidth-gbs"
    elif gpu:
        bw, bw_src = H100_SXM_GBS, "H100 SXM spec (default on GPU; pass --bandwidth-gbs for other GPUs)"
    else:
        bw, bw_src = measure_host_bandwidth_gbs(), "measured: numpy copy of 256 MiB, (read+write bytes)/best time"
    w_step = step_weight_bytes(cfg, dtype)
    floor_s = w_step / (bw * 1e9)
    log(
        f"shape {args.shape}: {cfg.num_params() / 1e6:.1f}M params, {dtype}, weights read per step "
        f"{w_step / 1e6:.1f} MB, bandwidth {bw:.1f} GB/s ({bw_src}) -> floor {floor_s * 1e3:.3f} ms/step"
    )
    log(f"{env['device_kind']} ({env['jax_backend']}), {env['cpu_model']}, {env['cpu_count']} cpus")

    total_w = total_weight_bytes(cfg, dtype)
    avail = available_memory_bytes()
    results: list[dict[str, Any]] = []
    kernel_rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def add(method, B, timing=None, note="", **extra):
        ms = timing.median * 1e3 if timing is not None and timing.samples else None
        results.append(
            {
                "method": method,
                "batch": B,
                "ms_per_step": ms,
                "tokens_per_s": B / (ms / 1e3) if ms else None,
                "floor_ms": floor_s * 1e3,
                "ratio_to_floor": ms / (floor_s * 1e3) if ms else None,
                "note": note,
                "timing": timing,
                **extra,
            }
        )
        if ms is not None:
            log(f"  {method:<44} B={B:<3} {ms:9.3f} ms/step  {B / (ms / 1e3):10.1f} tok/s  {note}")
        else:
            log(f"  {method:<44} B={B:<3} {note}")

    model = None
    if total_w * 1.3 > avail:
        notes.append(
            f"timjax skipped: weights {total_w / 2**30:.1f} GiB do not fit ({avail / 2**30:.1f} GiB available)"
        )
        log(notes[-1])
    else:
        with Stopwatch() as sw:
            model = random_model(cfg, dtype=dtype, seed=args.seed)
            params = model.params()
            jax.block_until_ready(params)
        log(f"random timjax model built in {sw.s:.1f}s")

    rng = np.random.default_rng(args.seed)
    n = args.steps
    # One cache width for every timjax variant: the XLA reference gathers the whole page-table row.
    max_seq_len = args.prompt_len + n * (args.repeats + 1) + 8
    for B in batches:
        log(f"batch {B}:")
        prompt = rng.integers(0, cfg.vocab_size, size=(B, args.prompt_len), dtype=np.int32)
        kv_read = B * (args.prompt_len + n) * kv_bytes_per_token(cfg, dtype)
        if model is not None:
            if "pallas" in args.methods:
                if gpu or args.include_interpret:
                    impl = "pallas" if gpu else "pallas_interpret"
                    r = bench_step(
                        params, cfg, B, prompt, max_seq_len, args.page_size, dtype, impl, n if gpu else min(n, 4)
                    )
                    add(
                        f"timjax generate_step, {impl}",
                        B,
                        r.pop("timing"),
                        "" if gpu else "interpret mode: NOT a performance path",
                        **r,
                    )
                else:
                    add("timjax generate_step, pallas", B, None, NA_CPU + " (interpret mode only; --include-interpret)")
            if "xla" in args.methods:
                r = bench_step(params, cfg, B, prompt, max_seq_len, args.page_size, dtype, "xla", n)
                add("timjax generate_step, xla", B, r.pop("timing"), "1 step/dispatch", **r)
            if "loop" in args.methods:
                r = bench_loop(params, cfg, B, prompt, max_seq_len, args.page_size, dtype, "xla", n, args.repeats)
                add("timjax decode_loop, xla", B, r.pop("timing"), f"{n} steps/dispatch", **r)
                if gpu:
                    r = bench_loop(
                        params, cfg, B, prompt, max_seq_len, args.page_size, dtype, "pallas", n, args.repeats
                    )
                    add("timjax decode_loop, pallas", B, r.pop("timing"), f"{n} steps/dispatch", **r)
            if "engine" in args.methods:
                r = bench_ragged_step(model, B, prompt, n, args.page_size, "auto", args.repeats)
                add("timjax ragged_generate_step (bare)", B, r.pop("timing"), "the ragged kernel", **r)
                r = bench_ragged_step(model, B, prompt, n, args.page_size, "auto", args.repeats, decode=True)
                add("timjax ragged_generate_step (bare, decode)", B, r.pop("timing"), "the engine's decode step", **r)
                r = bench_engine(model, B, prompt, n, args.repeats, args.page_size, "auto")
                add("timjax.generate (engine, end to end)", B, r.pop("timing"), "(t(N)-t(1))/(N-1)", **r)
            if "kernels" in args.methods:
                ctx = args.kernel_context or (args.prompt_len + n)
                for kr in bench_kernels(cfg, dtype, B, ctx, args.page_size, args.repeats * 5, args.include_interpret):
                    kr.update(batch=B, context=ctx)
                    kernel_rows.append(kr)
                    t = kr["timing"]
                    log(f"  kernel {kr['kernel']:<52} " + (f"{t.median * 1e6:9.1f} us" if t else kr["note"]))
        if "torch" in args.methods:
            torch_w = total_weight_bytes(cfg, dtype)  # torch keeps the embedding and (tied) head once
            missing = missing_optional("torch")
            if missing:  # an optional peer: say so in its row and keep the rest of the run (and its JSON)
                log(f"  transformers generate: {missing}")
                add("transformers generate (torch)", B, None, missing)
                continue
            import torch

            if args.shape == "8b" and not torch.cuda.is_available():
                add("transformers generate (torch)", B, None, "skipped: 8b shape on CPU torch (too slow / too big)")
            elif torch_w * 1.3 > available_memory_bytes():
                add("transformers generate (torch)", B, None, "skipped: weights do not fit in memory")
            else:
                for threads in args.torch_threads or ([None] if gpu else [1, os.cpu_count()]):
                    r = bench_torch(cfg, dtype, B, prompt, n, args.repeats, threads)
                    add(
                        f"transformers generate (torch {r['device']}, {r['threads']} thr)",
                        B,
                        r.pop("timing"),
                        "(t(N)-t(1))/(N-1)",
                        **r,
                    )
        gc.collect()

    # ------------------------------------------------------------------ report
    print()
    title = (
        f"decode, shape {args.shape} ({cfg.num_params() / 1e6:.1f}M params), {dtype}, prompt {args.prompt_len}, "
        f"{n} steps, page {args.page_size}; {env['device_kind']}; floor = {w_step / 1e6:.1f} MB weights / "
        f"{bw:.1f} GB/s"
    )
    peer: dict[int, float] = {}  # the fastest transformers row per batch
    for r in results:
        if r["method"].startswith("transformers") and r["ms_per_step"]:
            peer[r["batch"]] = min(peer.get(r["batch"], float("inf")), r["ms_per_step"])
    rows = []
    for r in results:
        vs = peer.get(r["batch"]) / r["ms_per_step"] if r["ms_per_step"] and peer.get(r["batch"]) else None
        rows.append(
            [
                r["method"],
                r["batch"],
                r["ms_per_step"],
                r["tokens_per_s"],
                r["floor_ms"],
                r["ratio_to_floor"],
                f"{vs:.2f}x" if vs else "-",
                r["note"],
            ]
        )
    table_main = print_table(
        ["method", "batch", "ms/step", "tok/s", "floor ms", "meas/floor", "speedup vs best torch", "note"],
        rows,
        title=title,
    )
    table_k = ""
    if kernel_rows:
        print()
        krows = []
        for kr in kernel_rows:
            t = kr["timing"]
            us = t.median * 1e6 if t else None
            gbs = kr["kv_bytes"] / t.median / 1e9 if t else None
            krows.append([kr["kernel"], kr["batch"], kr["context"], us, gbs, kr.get("max_abs_diff_vs_xla"), kr["note"]])
        table_k = print_table(
            ["kernel (one layer, decode)", "batch", "context", "us", "KV GB/s", "max|diff| vs xla", "note"],
            krows,
            title=f"kernel level: Hq={cfg.num_attention_heads} "
            f"Hkv={cfg.num_key_value_heads} hd={cfg.head_dim}, {dtype}, page {args.page_size}",
        )
    for note in notes:
        print("note:", note)
    env["loadavg_end"] = load_average()
    payload = {
        "env": env,
        "args": vars(args),
        "shape": args.shape,
        "config": cfg,
        "dtype": dtype,
        "num_params": cfg.num_params(),
        "weight_bytes_per_step": w_step,
        "bandwidth_gbs": bw,
        "bandwidth_source": bw_src,
        "floor_ms": floor_s * 1e3,
        "max_seq_len": max_seq_len,
        "results": results,
        "kernels": kernel_rows,
        "notes": notes,
        "tables": {"decode": table_main, "kernels": table_k},
    }
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
