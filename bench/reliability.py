"""What the reliability checks cost (issue 10), each as a ratio to the work it sits beside, in one run:

1. ``check_finite`` (the NaN/inf scan conversion runs on every tensor) vs reading the same tensor from a
   file with ``readinto`` (what conversion does before it; page cache warm, so this is the fastest read).
2. ``close_partial_json`` on a cut TIM document vs ``json.loads`` of the whole document (what a finished
   sequence pays instead).
3. ``check_generate`` (the validation layer at the top of ``timjax.generate``) vs the cheapest complete
   ``generate`` call (tiny model, compiled, one token).

Median of ``--repeats`` with min-max spread.

    python bench/reliability.py [--mb 256] [--repeats 7] [--json bench/out/reliability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import numpy as np


def timed(fn, repeats: int) -> dict:
    fn()  # warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


def ratio(a: dict, b: dict) -> str:
    return f"{a['median_s'] / b['median_s']:.3g}x (spread {a['min_s'] / b['max_s']:.3g}-{a['max_s'] / b['min_s']:.3g})"


def bench_finite(mb: int, repeats: int) -> dict:
    from timjax.convert.safetensors_io import check_finite

    n = mb * 2**20 // 2
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32).astype(ml_dtypes.bfloat16)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(x.tobytes())
        path = f.name
    try:
        buf = np.empty_like(x)

        def read():
            with open(path, "rb") as fh:
                fh.readinto(buf.view(np.uint8))

        r, c = timed(read, repeats), timed(lambda: check_finite("bench", "x", x), repeats)
    finally:
        os.unlink(path)
    return {
        "tensor_mb": mb,
        "read": r,
        "check_finite": c,
        "ratio": ratio(c, r),
        "ns_per_element": c["median_s"] / n * 1e9,
    }


def bench_partial(repeats: int) -> dict:
    from timjax.tim.partial_json import close_partial_json
    from timjax.tim.traces import serialise, synthetic_document

    text = serialise(synthetic_document(depth=5, breadth=3, roots=2, words=12, seed=0))
    cut = text[: int(len(text) * 0.97)]
    full, part = timed(lambda: json.loads(text), repeats), timed(lambda: close_partial_json(cut), repeats)
    return {
        "document_bytes": len(text.encode()),
        "json_loads": full,
        "close_partial_json": part,
        "ratio": ratio(part, full),
    }


def bench_validation(repeats: int) -> dict:
    import timjax
    from timjax.base.config import Qwen3Config
    from timjax.base.validation import check_generate

    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
    )
    m = timjax.random_model(cfg, dtype="float32")
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    args = {
        "model": m,
        "prompt": prompts,
        "max_new_tokens": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 1,
        "stop": (),
        "stop_ids": None,
        "max_batch": 8,
        "page_size": 16,
        "max_seq_len": None,
        "kv_tokens": None,
        "kv_memory_fraction": None,
        "impl": "auto",
        "chat": False,
        "system": None,
        "on_token": None,
        "progress": False,
        "schema": None,
        "pruning_buffer": None,
        "reposition": "reencode",
        "engine_options": None,
    }
    gen = timed(
        lambda: timjax.generate(m, prompts, max_new_tokens=1, temperature=0.7, top_p=0.9, top_k=5, seed=1), repeats
    )
    val = timed(lambda: [check_generate(args) for _ in range(100)], repeats)
    val = {k: v / 100 for k, v in val.items()}
    return {"generate_1_token": gen, "check_generate": val, "ratio": ratio(val, gen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="size of the bf16 tensor scanned for NaN/inf")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import jax

    out = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python"] + sys.argv),
        "finite": bench_finite(args.mb, args.repeats),
        "partial_json": bench_partial(args.repeats),
        "validation": bench_validation(args.repeats),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
