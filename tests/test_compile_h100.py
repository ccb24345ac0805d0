"""Every Pallas kernel compiles for the H100 (sm_90a) with no GPU here: jax.export for CUDA, the Triton IR of
each ``__gpu$xla.gpu.triton`` call through jaxlib's Triton to PTX, then ``ptxas -v --gpu-name=sm_90a``.

Fails on a compile error, on shared memory over 227 KiB per block, and when a TUNED entry of the ragged
kernel spills, hits the register cap or gets its wgmma serialised. The figures (registers, spills, shared
memory) of every configuration go to ``$TIMJAX_SM90_REPORT`` (JSON) when set; kernels/TUNING.md holds the
full sweep. Needs the ``test`` extra (jax-cuda12-plugin, jax-cuda12-pjrt, nvidia-cuda-nvcc-cu12).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import pytest
from timjax.kernels import sm90_compile as SC
from timjax.kernels import tune_sm90
from timjax.kernels.ragged_paged_attention.v1 import TUNED, get_tuned

_FIGURES: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _toolchain_and_report():
    # With JAX_PLATFORMS=cpu the CUDA plugin skips its driver checks; on a GPU machine this skips the
    # version constraints (sm_90a compilation needs no matching driver).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    reason = SC.unavailable_reason()
    if reason:  # the test extra is part of the install: a missing toolchain is a failure, not a skip
        pytest.fail(f"cannot compile for sm_90a: {reason}")
    yield
    path = os.environ.get("TIMJAX_SM90_REPORT")
    if path and _FIGURES:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(_FIGURES, f, indent=1)
        os.replace(tmp, path)


def _compile_all(name, fn, args, *, must_be_clean=False):
    calls = SC.triton_calls(SC.export_cuda(fn, *args))
    assert calls, f"{name}: no Triton custom call in the exported module"
    results = []
    for call in calls:
        res = SC.compile_sm90(call)  # raises on a compile error
        _FIGURES.append(dict(case=name, **res.row()))
        assert res.ok, f"{name} / {res.name}: {res.smem} bytes of shared memory > {SC.H100_SMEM_PER_BLOCK}"
        if must_be_clean:
            assert res.clean, (
                f"{name} / {res.name}: tuned entry is not clean: {res.registers} registers, "
                f"spills {res.spill_stores}/{res.spill_loads} B, wgmma serialized "
                f"{res.wgmma_serialized}"
            )
        results.append(res)
    return results


CASES = tune_sm90.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_compiles_for_sm90(case):
    results = _compile_all(case.name, case.fn, case.args, must_be_clean=case.must_be_clean)
    assert all(r.registers > 0 for r in results)


def test_tuned_table_covers_served_classes():
    """The table the kernel reads has an entry for every shape class we serve, picked by the sweep's rule."""
    for hd, g, ps in tune_sm90.SHAPE_CLASSES:
        assert (hd, g, ps) in TUNED, f"no tuned entry for head_dim {hd}, G {g}, page_size {ps}"
        assert get_tuned(head_dim=hd, group=g, page_size=ps) == TUNED[(hd, g, ps)]


def _tiny_cfg():
    from timjax.base.config import Qwen3Config

    return Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rope_theta=1e6,
    )


@pytest.mark.parametrize("chunk", [1, 8])
def test_generate_step_lowers_and_compiles_for_cuda(chunk):
    """The whole jitted step (reserve pages, write K/V, attention through the Pallas kernels, LM head,
    sampling) exports for CUDA with impl="pallas", and each of its kernels compiles for sm_90a."""
    from timjax.qwen3.model import init_params
    from timjax.runtime import steps
    from timjax.runtime.cache import create_cache
    from timjax.runtime.sampling import SamplingParams

    cfg = _tiny_cfg()
    rows, max_seqs = 4, 8
    params = jax.eval_shape(lambda: init_params(cfg, "bfloat16", jax.random.key(0)))
    cache = jax.eval_shape(lambda: create_cache(cfg, num_pages=64, page_size=16, max_seqs=max_seqs, max_seq_len=256))
    S = jax.ShapeDtypeStruct
    sampling = SamplingParams(
        S((rows,), jnp.float32),
        S((rows,), jnp.int32),
        S((rows,), jnp.float32),
        S((rows,), jnp.uint32),
        S((rows,), jnp.int32),
    )
    fn = functools.partial(steps.generate_step, cfg=cfg, impl="pallas", kv_pages=8)
    args = (params, cache, S((rows,), jnp.int32), S((rows, chunk), jnp.int32), S((rows,), jnp.int32), sampling)
    results = _compile_all(f"generate_step chunk {chunk}", fn, args)
    # one attention call per layer inside the layer scan: at least one kernel, all compiled
    assert len(results) >= 1


@pytest.mark.parametrize("n_tokens,n_edits", [(16, 0), (64, 2)])
def test_ragged_generate_step_lowers_and_compiles_for_cuda(n_tokens, n_edits):
    """The engine's ragged step (cache edits incl. the compaction kernel, the packed forward through the ragged
    kernel, sampling) exports for CUDA with impl="pallas"; every Triton call compiles for sm_90a."""
    from timjax.qwen3.model import init_params
    from timjax.runtime import steps
    from timjax.runtime.cache import create_cache
    from timjax.runtime.sampling import SamplingParams

    cfg = _tiny_cfg()
    rows, max_seqs, ps = 8, 8, 16
    params = jax.eval_shape(lambda: init_params(cfg, "bfloat16", jax.random.key(0)))
    cache = jax.eval_shape(lambda: create_cache(cfg, num_pages=64, page_size=ps, max_seqs=max_seqs, max_seq_len=256))
    S, i32 = jax.ShapeDtypeStruct, jnp.int32
    packed = steps.Packed(
        tokens=S((n_tokens,), i32),
        token_row=S((n_tokens,), i32),
        rows=S((rows,), i32),
        q_len=S((rows,), i32),
        cu_q_lens=S((rows + 1,), i32),
    )
    edits = steps.Edits(
        lengths=S((max_seqs,), i32),
        slot=S((n_edits,), i32),
        start=S((n_edits,), i32),
        end=S((n_edits,), i32),
        length=S((n_edits,), i32),
    )
    sampling = SamplingParams(
        S((rows,), jnp.float32), S((rows,), i32), S((rows,), jnp.float32), S((rows,), jnp.uint32), S((rows,), i32)
    )
    fn = functools.partial(
        steps.ragged_generate_step, cfg=cfg, impl="pallas", kv_pages=8, max_new_pages=-(-n_tokens // ps) + 1
    )
    results = _compile_all(f"ragged_generate_step N{n_tokens} E{n_edits}", fn, (params, cache, packed, edits, sampling))
    names = {r.name.split("_bm")[0] for r in results}
    assert any(n.startswith("ragged_paged_attention") for n in names), names
    assert (n_edits > 0) == ("kv_compact" in names), names


def test_flat_generate_step_lowers_and_compiles_for_cuda():
    """The engine's hot path (one int32 + one float32 transfer a step) with impl="pallas", compiled for sm_90a."""
    from timjax.qwen3.model import init_params
    from timjax.runtime import steps
    from timjax.runtime.cache import create_cache

    cfg = _tiny_cfg()
    n, s, e, ps = 32, 8, 2, 16
    params = jax.eval_shape(lambda: init_params(cfg, "bfloat16", jax.random.key(0)))
    cache = jax.eval_shape(lambda: create_cache(cfg, num_pages=64, page_size=ps, max_seqs=s, max_seq_len=256))
    # tokens, token_row (n each); q_len, lengths, borrowed, top_k, seed, counter (s each); cu_q_lens (s + 1);
    # the compactions (4 x e); no evictions
    ints = jax.ShapeDtypeStruct((2 * n + 7 * s + 1 + 4 * e,), jnp.int32)
    floats = jax.ShapeDtypeStruct((2 * s,), jnp.float32)
    fn = functools.partial(
        steps.flat_generate_step,
        cfg=cfg,
        impl="pallas",
        kv_pages=8,
        max_new_pages=-(-n // ps) + 1,
        layout=steps.flat_layout(n, s, e),
    )
    results = _compile_all(f"flat_generate_step N{n} S{s} E{e}", fn, (params, cache, ints, floats))
    assert {r.name.split("_bm")[0] for r in results} >= {"ragged_paged_attention", "kv_compact"}
