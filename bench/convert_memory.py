"""Peak host memory of `convert_hf_to_timjax` (and `export_timjax_to_hf`) on a large synthetic checkpoint.

Writes a sharded bf16 checkpoint with Qwen3-8B shapes (vocab 151936, hidden 4096, intermediate 12288,
32/8 heads of 128) but fewer layers, filled with random finite bf16 values (numpy + safetensors, no torch),
then converts it in a subprocess and reports that subprocess's peak RSS (``wait4`` rusage ``ru_maxrss``)
against the checkpoint and largest-shard sizes; likewise for exporting it back. Cleans up afterwards.

    python bench/convert_memory.py [--layers 7] [--shard-gb 1.5] [--workdir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import numpy as np
from safetensors.numpy import save_file

GB = 1e9


def qwen3_8b_config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in save_pretrained's order."""
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    specs = [("model.embed_tokens.weight", (V, D))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (hq * hd, D)),
            (p + "self_attn.k_proj.weight", (hkv * hd, D)),
            (p + "self_attn.v_proj.weight", (hkv * hd, D)),
            (p + "self_attn.o_proj.weight", (D, hq * hd)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
        ]
    specs += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return specs


def random_bf16(shape, rng) -> np.ndarray:
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16) & np.uint16(0xBFFF)  # exponent < 128: finite, |x| < 2
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(root: Path, layers: int, shard_bytes: float) -> tuple[int, int, int]:
    root.mkdir(parents=True)
    cfg = qwen3_8b_config(layers)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    specs = tensor_specs(cfg)
    shards, cur, size = [], [], 0
    for name, shape in specs:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map, total, largest = {}, 0, 0
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_bf16(shape, rng) for name, shape in group}
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: fname for name, _ in group})
        sz = (root / fname).stat().st_size
        total += sz
        largest = max(largest, sz)
        print(f"  wrote {fname}: {sz / GB:.2f} GB", flush=True)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total, largest, len(shards)


_HWM = (
    "\nfor _l in open('/proc/self/status'):\n"
    "    if _l.startswith('VmHWM'): print('VMHWM_KB', _l.split()[1], flush=True)\n"
)


def run_measured(code: str) -> tuple[float, float, float]:
    """Run python code in a child; return (child VmHWM bytes, wait4 ru_maxrss bytes, wall seconds).

    VmHWM is the child's own peak resident set. ru_maxrss is what RUSAGE_CHILDREN reports; on Linux it
    also counts the parent's RSS at fork time, which is why the checkpoint is generated in another child.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code + _HWM], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    hwm = next(int(line.split()[1]) for line in out.splitlines() if line.startswith("VMHWM_KB")) * 1024
    return hwm, usage.ru_maxrss * 1024, time.perf_counter() - t0  # Linux: ru_maxrss is in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--shard-gb", type=float, default=1.5)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="timjax-convert-mem-", dir=args.workdir))
    try:
        hf, tj, back = work / "hf", work / "tj", work / "back"
        print(f"writing synthetic Qwen3-8B-shaped checkpoint ({args.layers} layers) to {hf}", flush=True)
        # generated in a child so this process stays small (see run_measured)
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import convert_memory as m; "
                f"print('SIZES', *m.write_checkpoint(m.Path({str(hf)!r}), {args.layers}, {args.shard_gb * GB}))",
            ],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        print(r.stdout, end="")
        total, largest, n_shards = (int(v) for v in r.stdout.split("SIZES")[1].split())
        layer_bytes = sum(int(np.prod(s)) * 2 for n, s in tensor_specs(qwen3_8b_config(1)) if ".layers.0." in n)
        embed_bytes = 151936 * 4096 * 2

        base_rss, _, _ = run_measured("import timjax.convert, orbax.checkpoint, safetensors")
        conv_rss, conv_maxrss, conv_s = run_measured(
            f"from timjax.convert import convert_hf_to_timjax; convert_hf_to_timjax({str(hf)!r}, {str(tj)!r}, progress=False)"
        )
        exp_rss, exp_maxrss, exp_s = run_measured(
            f"from timjax.convert import export_timjax_to_hf; export_timjax_to_hf({str(tj)!r}, {str(back)!r}, "
            f"max_shard_bytes={int(args.shard_gb * GB)}, progress=False)"
        )
        tj_bytes = sum(f.stat().st_size for f in tj.rglob("*") if f.is_file())
        print()
        print(
            f"checkpoint: {total / GB:.2f} GB in {n_shards} shards, largest shard {largest / GB:.2f} GB; "
            f"one layer {layer_bytes / GB:.2f} GB, embed/lm_head {embed_bytes / GB:.2f} GB each"
        )
        print(f"baseline (imports only) peak RSS: {base_rss / GB:.2f} GB")
        print(
            f"convert: peak RSS {conv_rss / GB:.2f} GB (ru_maxrss {conv_maxrss / GB:.2f} GB), {conv_s:.1f} s, "
            f"timjax dir {tj_bytes / GB:.2f} GB"
        )
        print(f"export:  peak RSS {exp_rss / GB:.2f} GB (ru_maxrss {exp_maxrss / GB:.2f} GB), {exp_s:.1f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
