"""Two JAX processes on one host (2 forced CPU devices each, gloo collectives) driving one tp=4 model in
lockstep, for tests/test_sharding_multihost.py.

    python tests/multihost_worker.py make DIR                  # a tiny timjax checkpoint in DIR
    python tests/multihost_worker.py run DIR PROCESS_ID PORT   # prints one JSON line
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]


def make(directory: str) -> None:
    from pathlib import Path

    from timjax.convert import convert_hf_to_timjax, export_timjax_to_hf

    from timjax.base.config import Qwen3Config
    from timjax.qwen3.model import random_model

    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    model = random_model(cfg, dtype="float32", seed=3)
    hf = export_timjax_to_hf((cfg, model.params()), Path(directory) / "hf", progress=False)
    convert_hf_to_timjax(hf, Path(directory) / "tj", dtype="float32", progress=False)


def run(directory: str, process_id: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import timjax
    from timjax.runtime import sharding

    sharding.initialize_distributed(f"localhost:{port}", 2, process_id)
    mesh = sharding.make_mesh(tp=4, dp=1)  # spans both processes
    model = timjax.load(f"{directory}/tj", "float32", mesh=mesh, tokenizer=False)
    local = {d.id for d in jax.local_devices()}
    local_bytes = sum(
        s.data.nbytes for x in jax.tree.leaves(model.params()) for s in x.addressable_shards if s.device.id in local
    )
    sampled = timjax.generate(model, PROMPTS, max_new_tokens=8, max_batch=2)
    with jax.default_device(jax.local_devices()[0]):  # the single-device reference, on this process alone
        ref = timjax.load(f"{directory}/tj", "float32", tokenizer=False)
        expected = timjax.generate(ref, PROMPTS, max_new_tokens=8, max_batch=2)
        total = sum(x.nbytes for x in jax.tree.leaves(ref.params()))
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "local_share": local_bytes / total,
                "tokens": [list(map(int, r.tokens)) for r in sampled],
                "expected": [list(map(int, r.tokens)) for r in expected],
                "finish": [r.finish_reason for r in sampled],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
