"""Step time, memory per device and communication per step against the mesh shape (issue 11).

For each mesh (TPxDP) the benchmark shards a random Qwen3 and a KV pool, prefills every row to a context,
then times the decode step (one token per row) of the runtime. It reports:

* step time: median of ``--repeats`` timed steps with the spread, and its ratio to the 1x1 mesh in the same
  run (on forced CPU devices every "device" shares the same cores, so this measures the partitioning's
  overhead, not a speed-up; on GPUs it is the tensor-parallel speed-up);
* memory per device: weights and KV bytes each device holds (its shards), and XLA's temp buffer size for
  the compiled step;
* communication per step, counted from the compiled HLO's collectives: how many run (a collective inside
  the scan over layers counts once per layer) and the bytes each device sends in a ring algorithm.

dp > 1 runs one engine replica per row of the mesh (as ``timjax.generate`` does): a timed step is every
replica's step, dispatched asynchronously and awaited together; replicas communicate nothing.

CPU (forced devices; the device count is fixed before JAX starts):
    python bench/sharding.py --devices 8 --meshes 1x1 2x1 4x1 8x1 2x2 4x2 --json bench/out/sharding_cpu.json
8-GPU machine (H100 x8; no forcing, bf16, a Qwen3-8B layer shape):
    python bench/sharding.py --devices 0 --shape 8b --dtype bfloat16 --layers 8 --rows 32 --context 2048 \\
        --meshes 1x1 2x1 4x1 8x1 4x2 --json bench/out/sharding_h100x8.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8, help="forced CPU devices (0 = use the real devices)")
    p.add_argument("--meshes", nargs="+", default=["1x1", "2x1", "4x1", "8x1", "2x2", "4x2"], help="TPxDP")
    p.add_argument("--shape", choices=["small", "8b"], default="small")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, default=8, help="rows per replica")
    p.add_argument("--context", type=int, default=256, help="tokens cached per row before the timed steps")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--impl", default="auto")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: step time and memory per device against tp")
    p.add_argument("--replot", type=Path, default=None, help="with --plot: redraw from this --json output")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.devices > 0:  # must precede the first jax import
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment, print_table, time_fn
from timjax.base.config import Qwen3Config
from timjax.qwen3.model import random_model
from timjax.runtime import sharding

SHAPES = {
    # Small enough for a 2-core CPU, with heads / MLP / vocab that split 8 ways and a vocabulary that does
    # not drown the layers (the effect measured is the layers' partitioning).
    "small": {
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    "8b": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
}


def config(args) -> Qwen3Config:
    kw = dict(SHAPES[args.shape], max_position_embeddings=max(4096, 2 * args.context), rope_theta=1e6)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    return Qwen3Config(**kw)


def sampling(rows: int):
    from timjax.runtime.sampling import SamplingParams

    return SamplingParams(
        jnp.zeros(rows),
        jnp.zeros(rows, jnp.int32),
        jnp.ones(rows),
        jnp.zeros(rows, jnp.uint32),
        jnp.zeros(rows, jnp.int32),
    )


def packed(rows: int, chunk: int, lengths: np.ndarray):
    """Every row feeds ``chunk`` tokens (the engine's packed layout, see timjax/engine/runner.py)."""
    from timjax.base.buckets import bucket
    from timjax.runtime import steps

    q_len = np.full(rows, chunk, np.int32)
    n = bucket(rows * chunk)
    token_row = np.zeros(n, np.int32)
    token_row[: rows * chunk] = np.repeat(np.arange(rows, dtype=np.int32), chunk)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    p = steps.Packed(np.ones(n, np.int32), token_row, np.arange(rows, dtype=np.int32), q_len, cu)
    e = steps.Edits(lengths.astype(np.int32), *np.zeros((4, 0), np.int32))
    return p, e, n


def replica_state(model, mesh, args):
    """One replica: its cache prefilled to ``--context`` tokens per row and its compiled decode step."""
    from timjax.base.buckets import cdiv
    from timjax.runtime.steps import ragged_generate_step, ragged_logits_step

    cfg, R, ps = model.config, args.rows, args.page_size
    max_len = args.context + 64
    cache = sharding.create_cache(
        cfg,
        mesh,
        num_pages=R * cdiv(max_len, ps),
        page_size=ps,
        max_seqs=R,
        max_seq_len=max_len,
        dtype=jnp.dtype(args.dtype),
    )
    impl = sharding.sharded_impl(mesh, args.impl)
    params = model.params()
    p, e, n = packed(R, args.context, np.zeros(R))
    _, _, cache = ragged_logits_step(
        params, cache, p, e, cfg=cfg, impl=impl, kv_pages=cache.max_pages_per_seq, max_new_pages=cdiv(n, ps) + 1
    )
    p, e, n = packed(R, 1, np.full(R, args.context))
    kw = {"cfg": cfg, "impl": impl, "kv_pages": cdiv(args.context + 32, ps), "max_new_pages": 2}
    e = steps_edits_keep(e)
    step = jax.jit(lambda prm, c: ragged_generate_step(prm, c, p, e, sampling(R), **kw), donate_argnums=1)
    compiled = step.lower(params, cache).compile()
    return {"params": params, "cache": cache, "compiled": compiled}


def steps_edits_keep(e):
    """Decode steps keep every length: edits that shrink nothing (lengths = a large value, min() keeps)."""
    from timjax.runtime import steps

    return steps.Edits(np.full_like(e.lengths, 2**30), e.slot, e.start, e.end, e.length)


def run_mesh(name: str, base_model, args) -> dict:
    tp, dp = (int(x) for x in name.split("x"))
    mesh = sharding.make_mesh(tp=tp, dp=dp)
    reps = sharding.replicas(sharding.shard_model(base_model, mesh))
    states = [replica_state(m, m.mesh, args) for m in reps]

    def one():  # every replica's step, dispatched asynchronously, then all awaited
        outs = []
        for st in states:
            out, _, st["cache"] = st["compiled"](st["params"], st["cache"])
            outs.append(out)
        return outs

    timing = time_fn(one, warmup=2, repeats=args.repeats)
    st = states[0]
    mem = st["compiled"].memory_analysis()
    w = sharding.device_bytes([s["params"] for s in states])
    kv = sharding.device_bytes([(s["cache"].k, s["cache"].v) for s in states])
    comm = sharding.communication_per_step(st["compiled"].as_text(), tp)
    return {
        "mesh": name,
        "tp": tp,
        "dp": dp,
        "step": timing.to_json(),
        "rows_per_step": args.rows * dp,
        "weights_bytes_per_device": max(w.values()),
        "kv_bytes_per_device": max(kv.values()),
        "weights_bytes_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(st["params"])),
        "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "collectives": comm,
    }


def main(args) -> None:
    cfg = config(args)
    base = random_model(cfg, dtype=args.dtype, seed=0)
    results = []
    for name in args.meshes:
        tp, dp = (int(x) for x in name.split("x"))
        if tp * dp > len(jax.devices()):
            print(f"skip {name}: needs {tp * dp} devices, have {len(jax.devices())}", flush=True)
            continue
        results.append(run_mesh(name, base, args))
        print(f"{name}: {results[-1]['step']['median_s'] * 1e3:.2f} ms", flush=True)
    ref = next((r["step"]["median_s"] for r in results if r["mesh"] == "1x1"), None)
    rows = []
    for r in results:
        c = r["collectives"]
        n_ar, n_ag = int(c.get("all-reduce count", 0)), int(c.get("all-gather count", 0))
        sent = sum(v for k, v in c.items() if k.endswith("bytes/device"))
        rows.append(
            [
                r["mesh"],
                r["rows_per_step"],
                r["step"]["median_s"] * 1e3,
                f"{r['step']['min_s'] * 1e3:.2f}-{r['step']['max_s'] * 1e3:.2f}",
                f"{r['step']['median_s'] / ref:.2f}x" if ref else "-",
                r["weights_bytes_per_device"] / 2**20,
                r["kv_bytes_per_device"] / 2**20,
                (r["temp_bytes_per_device"] or 0) / 2**20,
                n_ar,
                n_ag,
                sent / 2**10,
            ]
        )
    print_table(
        [
            "mesh tp x dp",
            "rows",
            "step ms (median)",
            "min-max ms",
            "vs 1x1",
            "weights MiB/dev",
            "KV MiB/dev",
            "temp MiB/dev",
            "all-reduces/step",
            "all-gathers/step",
            "sent KiB/dev/step",
        ],
        rows,
        title=f"ragged decode step, {args.rows} rows per replica x {args.context} context, "
        f"shape {args.shape}, {args.dtype}",
    )
    out = {
        "environment": environment(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "config": cfg.model_dump(),
        "results": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for dp in sorted({r["dp"] for r in results}):
        rs = sorted((r for r in results if r["dp"] == dp), key=lambda r: r["tp"])
        tps = [r["tp"] for r in rs]
        a.errorbar(
            tps,
            [r["step"]["median_s"] * 1e3 for r in rs],
            yerr=[
                [(r["step"]["median_s"] - r["step"]["min_s"]) * 1e3 for r in rs],
                [(r["step"]["max_s"] - r["step"]["median_s"]) * 1e3 for r in rs],
            ],
            marker="o",
            label=f"dp={dp}",
        )
        b.plot(
            tps,
            [(r["weights_bytes_per_device"] + r["kv_bytes_per_device"]) / 2**20 for r in rs],
            marker="o",
            label=f"dp={dp}",
        )
    a.set(xlabel="tp", ylabel="decode step ms (median, min-max)", title="step time")
    b.set(yscale="log", xlabel="tp", ylabel="MiB per device", title="weights + KV per device")
    from matplotlib.ticker import NullFormatter

    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], labels=["1", "2", "4", "8"])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if ARGS.replot:  # redraw from a saved JSON, no measuring
        plot(json.loads(ARGS.replot.read_text())["results"], ARGS.plot)
    else:
        main(ARGS)
