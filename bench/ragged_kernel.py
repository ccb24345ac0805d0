"""Ragged paged attention vs the padded decode / extend calls it replaces (one layer, equal inputs).

    python bench/ragged_kernel.py                                   # CPU: the XLA paths (20m shape)
    python bench/ragged_kernel.py --shape 8b --dtype bfloat16 --json bench/out/ragged_8b_h100.json   # GPU

Mixes (R rows, context C slots before each row's chunk):
  * decode   : 16 rows x 1 token
  * mixed    : 1 row re-encoding 512 tokens + 15 rows of 3 forced tokens (issue 7's example)
  * prefill  : 4 rows x 256 tokens
The padded peer is what the step does today: one extend call over [R, T_max] (and, for decode, the decode
kernel). Both sides see the same pool, page tables and queries; the table reports the median time over
repeats (with min-max), the ratio padded / ragged, and the query positions each computes. On the CPU only
the XLA paths run (Pallas needs a GPU; its interpreter is not a performance path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, load_average, log, on_gpu, print_table, time_fn, write_json  # noqa: E402
from bench.decode import SHAPES  # noqa: E402

MIXES = {
    "decode": [1] * 16,
    "mixed": [512] + [3] * 15,
    "prefill": [256] * 4,
}


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def build(mix: list[int], *, hq: int, hkv: int, hd: int, context: int, page_size: int, dtype, seed: int = 0):
    """Pool, page tables and queries for one mix, in both the ragged and the padded layout."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    r = len(mix)
    q_len = np.asarray(mix, np.int32)
    q_start = np.full(r, context, np.int32)
    window = -(-(context + max(mix)) // page_size)
    n_pages = r * window + 1
    pt = rng.permutation(n_pages)[: r * window].reshape(r, window).astype(np.int32)
    k = jnp.asarray(rng.standard_normal((hkv, n_pages, page_size, hd)), dtype)
    v = jnp.asarray(rng.standard_normal((hkv, n_pages, page_size, hd)), dtype)
    n_tokens = _pow2(int(q_len.sum()))  # the engine buckets N to a power of two
    q_flat = jnp.asarray(rng.standard_normal((n_tokens, hq, hd)), dtype)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    t_max = _pow2(int(q_len.max()))
    idx = np.minimum(cu[:-1, None] + np.arange(t_max)[None, :], n_tokens - 1)
    q_pad = q_flat[jnp.asarray(idx)]  # [R, T_max, Hq, hd], the same queries padded per row
    return dict(
        q_flat=q_flat,
        q_pad=q_pad,
        k=k,
        v=v,
        pt=jnp.asarray(pt),
        q_start=jnp.asarray(q_start),
        q_len=jnp.asarray(q_len),
        cu=jnp.asarray(cu),
        n_tokens=n_tokens,
        t_max=t_max,
        cu_np=cu,
    )


def bench_mix(name: str, d: dict, *, impls: list[str], repeats: int) -> list[dict[str, Any]]:
    import jax

    from timjax import kernels

    rows = []
    real = int(d["cu_np"][-1])
    r = d["pt"].shape[0]
    for impl in impls:
        ragged = jax.jit(
            lambda q, k, v, pt, qs, ql, cu, impl=impl: kernels.ragged_attention(q, k, v, pt, qs, ql, cu, impl=impl)
        )
        args = (d["q_flat"], d["k"], d["v"], d["pt"], d["q_start"], d["q_len"], d["cu"])
        t_r = time_fn(lambda f=ragged, a=args: f(*a), warmup=2, repeats=repeats)
        out_r = np.asarray(ragged(*args), np.float32)
        if d["t_max"] == 1:
            padded = jax.jit(
                lambda q, k, v, lens, pt, impl=impl: kernels.decode_attention(q[:, 0], k, v, lens, pt, impl=impl)[
                    :, None
                ]
            )
            pargs = (d["q_pad"], d["k"], d["v"], d["q_start"] + d["q_len"], d["pt"])
            peer = "decode_attention [R]"
        else:
            padded = jax.jit(
                lambda q, k, v, qs, ql, pt, impl=impl: kernels.extend_attention(q, k, v, qs, ql, pt, impl=impl)
            )
            pargs = (d["q_pad"], d["k"], d["v"], d["q_start"], d["q_len"], d["pt"])
            peer = f"extend_attention [R, {d['t_max']}]"
        t_p = time_fn(lambda f=padded, a=pargs: f(*a), warmup=2, repeats=repeats)
        out_p = np.asarray(padded(*pargs), np.float32)
        diff = max(
            float(np.max(np.abs(out_r[d["cu_np"][i] + j] - out_p[i, j])))
            for i in range(r)
            for j in range(int(d["cu_np"][i + 1] - d["cu_np"][i]))
        )
        rows.append(
            dict(
                mix=name,
                impl=impl,
                rows=r,
                real_tokens=real,
                ragged_positions=d["n_tokens"],
                padded_positions=r * d["t_max"],
                peer=peer,
                ragged=t_r,
                padded=t_p,
                padded_over_ragged=t_p.median / t_r.median,
                max_abs_diff=diff,
            )
        )
        log(
            f"{name} {impl}: ragged {t_r.median * 1e3:.3f} ms, {peer} {t_p.median * 1e3:.3f} ms "
            f"({t_p.median / t_r.median:.2f}x), max|diff| {diff:.2e}"
        )
    return rows


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="20m", help="attention shape (Hq, Hkv, hd) of a model")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on GPU, f32 on CPU")
    ap.add_argument("--context", type=int, default=2048, help="cached slots before each row's chunk")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import jax.numpy as jnp

    cfg = SHAPES[args.shape]
    gpu = on_gpu()
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    impls = ["pallas", "xla"] if gpu else ["xla"]
    env = environment()
    results = []
    for name in args.mixes:
        d = build(
            MIXES[name],
            hq=cfg.num_attention_heads,
            hkv=cfg.num_key_value_heads,
            hd=cfg.head_dim,
            context=args.context,
            page_size=args.page_size,
            dtype=jnp.dtype(dtype),
        )
        results += bench_mix(name, d, impls=impls, repeats=args.repeats)

    def ms(t):
        return f"{t.median * 1e3:.3f} ({t.min * 1e3:.3f}-{t.max * 1e3:.3f})"

    title = (
        f"ragged vs padded attention, one layer: {args.shape} (Hq {cfg.num_attention_heads}, Hkv "
        f"{cfg.num_key_value_heads}, hd {cfg.head_dim}), {dtype}, context {args.context}, page {args.page_size}, "
        f"{env['device_kind']}"
    )
    table = print_table(
        [
            "mix",
            "impl",
            "rows",
            "real tokens",
            "positions ragged / padded",
            "ragged ms (min-max)",
            "padded peer",
            "padded ms (min-max)",
            "padded / ragged",
            "max|diff|",
        ],
        [
            [
                r["mix"],
                r["impl"],
                r["rows"],
                r["real_tokens"],
                f"{r['ragged_positions']} / {r['padded_positions']}",
                ms(r["ragged"]),
                r["peer"],
                ms(r["padded"]),
                f"{r['padded_over_ragged']:.2f}x",
                f"{r['max_abs_diff']:.1e}",
            ]
            for r in results
        ],
        title=title,
    )
    env["loadavg_end"] = load_average()
    payload = {"env": env, "args": vars(args), "dtype": dtype, "results": results, "tables": {"ragged": table}}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
