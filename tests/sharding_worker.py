"""Measurements on forced CPU devices for tests/test_sharding.py (run in a subprocess: the device count
must be fixed before JAX starts). Usage: ``python tests/sharding_worker.py OUT.json meshes MESH...`` (meshes
written ``TPxDP``) or ``OUT.json runtime``. Writes one JSON object."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

N_DEVICES = 8
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
).strip()

import jax
import jax.numpy as jnp
import numpy as np

import timjax
from timjax.base.config import Qwen3Config
from timjax.qwen3.model import random_model
from timjax.runtime import sharding

# Tiny, float32, and shaped so every axis tp splits divides by 4 (vocab, heads, MLP) while the vocab
# does not dominate (so "bytes per device ~ total / tp" is a real test of the weights' split).
CFG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "model_type": "qwen3",
    "architectures": ["Qwen3ForCausalLM"],
    "torch_dtype": "float32",
}


def checkpoint(root: Path, **overrides) -> tuple[Path, Path]:
    """A random model exported as an HF directory and converted to a timjax directory."""
    from timjax.convert import convert_hf_to_timjax, export_timjax_to_hf

    raw = {**CFG, **overrides}
    cfg = Qwen3Config.from_hf_dict(raw)
    model = random_model(cfg, dtype="float32", seed=3)
    tag = f"kv{cfg.num_key_value_heads}"
    hf = export_timjax_to_hf((cfg, model.params()), root / f"hf_{tag}", progress=False)
    tj = convert_hf_to_timjax(hf, root / f"tj_{tag}", dtype="float32", progress=False)
    return Path(hf), Path(tj)


def tokens(batch: int = 4, t: int = 12) -> np.ndarray:
    return np.random.RandomState(0).randint(0, CFG["vocab_size"], size=(batch, t))


def spec_list(x) -> list:
    """An array's PartitionSpec as a list with one entry per axis (None = replicated)."""
    spec = list(x.sharding.spec)
    return spec + [None] * (x.ndim - len(spec))


def bytes_report(tree, mesh) -> dict:
    per_dev = sharding.device_bytes(tree)
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return {"total": total, "per_device": [per_dev.get(d, 0) for d in mesh.devices.flat]}


def ragged_args(cache, chunks: list[list[int]], lengths=None, compactions=()):
    """Packed rows (one per slot; an empty chunk = no row) and edits for ``steps.ragged_*_step``."""
    from timjax.base.buckets import bucket, cdiv
    from timjax.runtime import steps

    S = cache.max_seqs
    q_len = np.array([len(c) for c in chunks] + [0] * (S - len(chunks)), np.int32)
    total = int(q_len.sum())
    N = bucket(max(total, 8))
    toks = np.zeros(N, np.int32)
    toks[:total] = [t for c in chunks for t in c]
    token_row = np.zeros(N, np.int32)
    token_row[:total] = np.repeat(np.arange(S, dtype=np.int32), q_len)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    packed = steps.Packed(toks, token_row, np.arange(S, dtype=np.int32), q_len, cu)
    comp = np.zeros((4, 2), np.int32)
    for i, c in enumerate(compactions):
        comp[:, i] = c
    lengths = np.asarray(cache.lengths) if lengths is None else np.asarray(lengths, np.int32)
    edits = steps.Edits(lengths, *comp)
    kw = {"kv_pages": cache.max_pages_per_seq, "max_new_pages": cdiv(N, cache.page_size) + 1}
    return packed, edits, kw


def flat_step_args(cache, chunks, **edit):
    """The engine's per-step inputs (``steps.flatten_inputs``) and static kwargs for ``flat_*_step``."""
    from timjax.runtime.steps import flat_layout, flatten_inputs

    packed, edits, kw = ragged_args(cache, chunks, **edit)
    ints, floats = flatten_inputs(packed, edits, decode_inputs(cache.max_seqs)[3])
    kw["layout"] = flat_layout(packed.tokens.shape[0], cache.max_seqs, edits.slot.shape[0])
    return ints, floats, kw


def step_hlo(model, mesh, cache, impl: str) -> str:
    """The compiled step the engine runs (``flat_generate_step``: edits + forward + sample over a mixed
    batch of extend and decode rows) on the sharded params and pool."""
    from timjax.runtime.steps import flat_generate_step

    ints, floats, kw = flat_step_args(cache, [[1] * 8, [2], [3] * 5, [4]], compactions=[(0, 1, 2, 3)])
    lowered = flat_generate_step.lower(model.params(), cache, ints, floats, cfg=model.config, impl=impl, **kw)
    return lowered.compile().as_text()


def paged_parity(model, ref, mesh) -> dict:
    """The ragged step on the mesh against one device: extend chunks, then decode rows, then a step whose
    edits compact one slot (shift-mode pruning) and cut another (re-encode), and a key rotation, all
    through the shard_map'd kernels."""
    from timjax import kernels
    from timjax.runtime import cache as cache_mod
    from timjax.runtime.steps import ragged_logits_step

    impl = sharding.sharded_impl(mesh, "xla")
    kw = {"num_pages": 32, "page_size": 4, "max_seqs": 4, "max_seq_len": 64, "dtype": jnp.float32}
    caches = [cache_mod.create_cache(ref.config, **kw), sharding.create_cache(model.config, mesh, **kw)]
    runs = [(ref, "xla"), (model, impl)]
    rng = np.random.RandomState(1)
    chunks = [list(rng.randint(0, CFG["vocab_size"], n)) for n in (8, 5, 8, 3)]
    nxt = [[int(t)] for t in rng.randint(0, CFG["vocab_size"], 4)]
    results = []
    for (m, im), c in zip(runs, caches):

        def step(c, chunks, m=m, im=im, **edit):
            packed, edits, kw = ragged_args(c, chunks, **edit)
            logits, _, c = ragged_logits_step(m.params(), c, packed, edits, cfg=m.config, impl=im, **kw)
            return np.asarray(logits), c

        l1, c = step(c, chunks)
        l2, c = step(c, nxt)  # lengths now 9, 6, 9, 4
        l3, c = step(c, nxt, lengths=[5, 3, 10, 5], compactions=[(0, 2, 6, 9)])  # slot 1: cut to 3
        pt = c.page_table[:2, :4]
        k_rot = kernels.rotate_slots(
            c.k,
            pt,
            jnp.asarray([1, 0]),
            jnp.asarray([3, 4]),
            jnp.asarray([-2, 5]),
            rope_theta=m.config.rope_theta,
            impl=im,
        )
        results.append(
            (
                l1,
                l2,
                l3,
                cache_mod.gather_slots(c, 0, 6)[0],
                np.asarray(k_rot),
                spec_list(c.k) if hasattr(c.k.sharding, "spec") else [],
            )
        )
    (a1, a2, a3, ak, ar, _), (b1, b2, b3, bk, br, spec) = results
    rep = br.shape[0] // ar.shape[0]  # replicated kv heads: copy j of the sharded pool is head j // rep
    bk, br = bk[:, ::rep], br[::rep]
    return {
        "extend_logits_diff": float(np.abs(a1 - b1).max()),
        "decode_logits_diff": float(np.abs(a2 - b2).max()),
        "after_compact_logits_diff": float(np.abs(a3 - b3).max()),
        "compacted_k_diff": float(np.abs(ak - bk).max()),
        "rotated_k_diff": float(np.abs(ar - br).max()),
        "pool_spec_after": spec,
    }


def measure(mesh_name: str, root: Path, ref_logits: np.ndarray, ref_model, ref_gen: dict) -> dict:
    tp, dp = (int(x) for x in mesh_name.split("x"))
    mesh = sharding.make_mesh(tp=tp, dp=dp)
    out: dict = {"tp": tp, "dp": dp}
    _, tj = checkpoint(root) if not (root / "tj_kv4").exists() else (None, root / "tj_kv4")
    model = timjax.load(tj, "float32", mesh=mesh, tokenizer=False)
    out["logits_max_abs_diff"] = float(np.abs(timjax.logits(model, tokens()) - ref_logits).max())
    out["param_specs"] = {k: spec_list(v) for k, v in sharding._flat(model.params()).items()}
    out["weights"] = bytes_report(model.params(), mesh)
    cache = sharding.create_cache(
        model.config, mesh, num_pages=32, page_size=4, max_seqs=4, max_seq_len=64, dtype=jnp.float32
    )
    out["kv"] = bytes_report((cache.k, cache.v), mesh)
    out["kv_spec"] = spec_list(cache.k)
    hlo = step_hlo(model, mesh, cache, sharding.sharded_impl(mesh, "xla"))
    out["collectives"] = [
        {"op": c.op, "shapes": c.shapes, "group": c.group_size, "times": c.times}
        for c in sharding.hlo_collectives(hlo, tp * dp)
    ]
    out["param_shapes"] = sorted(
        {tuple(x.shape) for x in jax.tree.leaves(model.params())}
        | {tuple(x.shape[1:]) for x in jax.tree.leaves(model.params()["layers"])}
    )
    out["pool_shape"] = list(cache.k.shape)
    full = mesh_name == FULL_MESH  # the costlier checks (each compiles more steps) on one mesh
    if full:
        out["paged"] = paged_parity(model, ref_model, mesh)
    gen = generate_all(model, sampled=full)
    out["generate"] = {k: [a == b for a, b in zip(ref_gen[k], gen[k])] for k in gen}
    return out


def kv_replicated(root: Path) -> dict:
    """Hkv = 2 < tp = 4: kv heads are replicated so each shard holds one (and its 2 query heads)."""
    _, tj = checkpoint(root, num_key_value_heads=2)
    ref = timjax.load(tj, "float32", tokenizer=False)
    mesh = sharding.make_mesh(tp=4, dp=1)
    model = timjax.load(tj, "float32", mesh=mesh, tokenizer=False)
    cache = sharding.create_cache(
        model.config, mesh, num_pages=8, page_size=4, max_seqs=2, max_seq_len=32, dtype=jnp.float32
    )
    return {
        "logits_max_abs_diff": float(np.abs(timjax.logits(model, tokens()) - timjax.logits(ref, tokens())).max()),
        "k_proj_shape": list(model.params()["layers"]["k_proj"].shape),
        "k_proj_local": list(model.params()["layers"]["k_proj"].addressable_shards[0].data.shape),
        "pool_local": list(cache.k.addressable_shards[0].data.shape),
        "checkpoint_kv_heads": model.checkpoint_kv_heads,
        "paged": paged_parity(model, ref, mesh),
    }


def tim_replay(model, doc, reposition: str, buffer: int = 1) -> dict:
    """Replay a TIM tree through the runtime with pruning; record the model's own (masked greedy) token at
    every step: it depends on the whole cache after every prune, re-encode and shift."""
    from timjax.engine import Engine, Request
    from timjax.engine.tim_controller import ReplayText, TimController
    from timjax.tim.grammar import llg_tokenizer
    from timjax.tim.schema import tim_schema
    from timjax.tim.traces import serialise

    llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, [151645])
    prompt = model.tokenizer("Think it through.")["input_ids"]
    ctrl = TimController(
        model,
        tim_schema(max_depth=5),
        max_new_tokens=20_000,
        prompt_len=len(prompt),
        pruning_buffer=buffer,
        override=ReplayText(serialise(doc), llt),
    )
    raw, on_token = [], ctrl.on_token
    ctrl.on_token = lambda token, seq: (raw.append(int(token)), on_token(token, seq))[1]
    engine = Engine(model, max_batch=1, page_size=4, max_seq_len=256, reposition=reposition)
    r = engine.run([Request(prompt, 20_000, controller=ctrl)])[0]
    return {
        "raw": raw,
        "tokens": list(map(int, r.tokens)),
        "tree": r.response.model_dump_json() if r.response else None,
        "pruned": [list(p) for p in r.pruned_paths],
        "working": r.working_memory_text,
        "finish": r.finish_reason,
        "prune_events": r.stats.prune_events,
    }


GENERATE = {"greedy": {}, "sampled": {"temperature": 0.8, "top_p": 0.9, "seed": 5}}


FULL_MESH = "2x2"


def generate_all(model, sampled: bool = True) -> dict:
    """timjax.generate: 5 prompts through 2-row engines (continuous batching), greedy, and sampled with
    per-request seeds."""
    prompts = [list(map(int, r)) for r in tokens(5, 7)]
    return {
        name: [list(map(int, r.tokens)) for r in timjax.generate(model, prompts, max_new_tokens=8, max_batch=2, **kw)]
        for name, kw in GENERATE.items()
        if sampled or name == "greedy"
    }


def cli_tp4(root: Path, tok_dir: Path, cfg: Qwen3Config, ref_model) -> dict:
    """``timjax generate --tp 4`` (in-process, same code path as the command) against ``--tp 1``."""
    import contextlib
    import io

    from timjax.convert import export_timjax_to_hf

    from timjax.cli import main as cli

    hf = export_timjax_to_hf((cfg, ref_model.params()), root / "hf_cli", tokenizer_dir=tok_dir, progress=False)
    runs = {}
    for tp in (1, 4):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli(
                [
                    "generate",
                    str(hf),
                    "--prompt",
                    "The tree",
                    "--prompt",
                    "A list",
                    "--max-new-tokens",
                    "4",
                    "--dtype",
                    "float32",
                    "--json",
                    "--tp",
                    str(tp),
                ]
            )
        runs[tp] = {"rc": rc, "results": json.loads(buf.getvalue())}
    return {
        "rc": [runs[1]["rc"], runs[4]["rc"]],
        "equal": [a["tokens"] == b["tokens"] for a, b in zip(runs[1]["results"], runs[4]["results"])],
        "n_tokens": [len(b["tokens"]) for b in runs[4]["results"]],
    }


def tim_trees(root: Path) -> dict:
    """TIM generation with pruning in both reposition modes: tp=4 (kv heads replicated) against one device."""
    from timjax.base.vocab import build_qwen3_tokenizer, load_qwen3_tokenizer
    from timjax.tim.traces import synthetic_document

    tok_dir = build_qwen3_tokenizer(root / "tok")
    tok = load_qwen3_tokenizer(str(tok_dir))
    cfg = Qwen3Config(
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        eos_token_id=151645,
    )
    ref = random_model(cfg, dtype="float32", seed=3, tokenizer=tok)
    sharded = sharding.shard_model(ref, sharding.make_mesh(tp=4, dp=1))
    doc = synthetic_document(depth=3, breadth=2, roots=1, words=2, seed=1)
    out = {
        mode: {"ref": tim_replay(ref, doc, mode), "sharded": tim_replay(sharded, doc, mode)}
        for mode in ("reencode", "shift")
    }
    out["cli"] = cli_tp4(root, Path(tok_dir), cfg, ref)
    return out


def export_cuda(mesh_name: str) -> dict:
    """jax.export of the sharded step with the Pallas kernels for platforms=["cuda"] (no GPU needed)."""
    from functools import partial

    from jax import export

    from timjax.runtime.steps import flat_generate_step

    tp, dp = (int(x) for x in mesh_name.split("x"))
    mesh = sharding.make_mesh(tp=tp, dp=dp)
    model = sharding.shard_model(random_model(Qwen3Config.from_hf_dict(CFG), dtype="bfloat16"), mesh)
    cache = sharding.create_cache(
        model.config, mesh, num_pages=32, page_size=16, max_seqs=4, max_seq_len=128, dtype=jnp.bfloat16
    )
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    ints, floats, kw = flat_step_args(cache, [[1] * 8, [2], [3] * 5, [4]], compactions=[(0, 1, 2, 3)])
    step = jax.jit(partial(flat_generate_step, cfg=model.config, impl=sharding.sharded_impl(mesh, "pallas"), **kw))
    exp = export.export(
        step, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    )(jax.tree.map(spec, model.params()), jax.tree.map(spec, cache), ints, floats)
    text = exp.mlir_module()
    return {
        "platforms": list(exp.platforms),
        "nr_devices": exp.nr_devices,
        "triton_calls": text.count("xla.gpu.triton"),
        "manual": text.count("sdy.manual_computation"),
        "pool_split": '#sdy.sharding<@mesh, [{"tp"}, {}, {}, {}]>' in text,
    }


def decode_inputs(rows: int):
    from timjax.runtime.sampling import SamplingParams

    sp = SamplingParams(
        jnp.zeros(rows),
        jnp.zeros(rows, jnp.int32),
        jnp.ones(rows),
        jnp.zeros(rows, jnp.uint32),
        jnp.zeros(rows, jnp.int32),
    )
    return jnp.arange(rows, dtype=jnp.int32), jnp.zeros((rows, 1), jnp.int32), jnp.ones(rows, jnp.int32), sp


def prefix_cache(root: Path) -> dict:
    """Prompts sharing a 37-token prefix: greedy tokens with the prefix cache on, on tp=2 (one engine) and
    on dp=2 x tp=2 (``generate``: an index per replica), against one device with the cache off."""
    from timjax.engine import Engine, Request

    _, tj = checkpoint(root / "prefix")
    model = timjax.load(tj, "float32", tokenizer=False)
    rs = np.random.RandomState(0)
    base = rs.randint(0, 256, 37).tolist()
    prompts = [base + rs.randint(0, 256, k).tolist() for k in (3, 5, 9, 2)]
    shape = dict(max_batch=2, page_size=4, max_seq_len=96)
    ref = Engine(model, **shape, prefix_cache=False).run([Request(p, 6) for p in prompts])
    tp = Engine(sharding.shard_model(model, sharding.make_mesh(tp=2, dp=1)), **shape, check_cache=True)
    got = tp.run([Request(p, 6) for p in prompts])
    dp = timjax.generate(model, prompts, max_new_tokens=6, max_batch=2, page_size=4, stop_ids=[],
                         mesh=sharding.make_mesh(tp=2, dp=2))
    return {
        "ref": [r.tokens for r in ref],
        "tp2": [r.tokens for r in got],
        "tp2_hit_tokens": tp.stats().prefix_cache_hit_tokens_total,
        "dp2": [r.tokens for r in dp],
    }


def main() -> None:
    """``python tests/sharding_worker.py OUT.json meshes MESH...`` or ``... OUT.json runtime`` (two halves
    that a test runs side by side)."""
    import time

    dest, part, meshes = sys.argv[1], sys.argv[2], sys.argv[3:]
    seconds: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if part == "meshes":
            hf, tj = checkpoint(root)
            ref = timjax.load(tj, "float32", tokenizer=False)
            ref_logits = timjax.logits(ref, tokens())
            ref_gen = timed("reference generate", generate_all, ref)
            result = {m: timed(m, measure, m, root, ref_logits, ref, ref_gen) for m in meshes}

            def hf_dir():
                mesh = sharding.make_mesh(tp=2, dp=2)
                model = timjax.load(hf, "float32", mesh=mesh, tokenizer=False)
                return {
                    "logits_max_abs_diff": float(np.abs(timjax.logits(model, tokens()) - ref_logits).max()),
                    "weights": bytes_report(model.params(), mesh),
                }

            result["hf_dir"] = timed("hf_dir", hf_dir)
        else:
            result["kv_replicated"] = timed("kv_replicated", kv_replicated, root)
            result["tim"] = timed("tim", tim_trees, root)
            result["export_cuda"] = timed("export", export_cuda, "4x2")
            result["prefix_cache"] = timed("prefix_cache", prefix_cache, root)
    result["seconds"] = seconds
    Path(dest).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
