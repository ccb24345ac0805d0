"""KV-cache compaction for subtask pruning (all layers at once), with RoPE re-rotation.

Layout: k_pages, v_pages [L, Hkv, P, ps, hd] (a single layer [Hkv, P, ps, hd] is also
accepted), page_table int32 [B, maxp]; slot s of sequence b is page
``page_table[b, s // ps]`` at offset ``s % ps``.

``compact``: per sequence b remove slots [start, end) of length slots: slots [end, length)
move to [start, length - (end - start)); moved keys are re-rotated by RoPE for the
position delta -(end - start) (rotate-half convention, float32 math, cast back); values
move unrotated. Slots before ``start`` and pages of other sequences are untouched; the
page table is not changed (the caller frees the tail pages).

``rotate_slots``: keys at slots [start, start + count) of each sequence are rotated in
place by ``delta[b]`` positions (the page_size == 1 fast path, where the caller only
permutes the page table).

Pallas kernels: grid (layer, kv_head, sequence), one program walks its destination slots
in increasing order in blocks of ``block_rows`` rows and updates the pool in place
(``input_output_aliases``). Destination < source always, so a later step never reads a
slot an earlier step wrote; within a step all loads precede all stores, enforced on the
GPU by a CTA barrier (``plgpu.debug_barrier``) between the load and store phases and
after the stores (src/dst windows of one step overlap when delta < block_rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = [
    "compact_pages",
    "compact_pages_reference",
    "rotate_slots",
    "rotate_slots_reference",
    "rope_inv_freq",
]


def rope_inv_freq(head_dim: int, rope_theta: float) -> np.ndarray:
    """[head_dim] float32: inv_freq_i = theta^(-2i/hd) for i < hd/2, tiled twice."""
    inv = 1.0 / (float(rope_theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    return np.concatenate([inv, inv]).astype(np.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_keys(k, delta, rope_theta: float):
    """Rotate keys (last dim hd) by integer position ``delta`` (broadcastable to k[..., 0])."""
    hd = k.shape[-1]
    ang = jnp.asarray(delta, jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(hd, rope_theta))
    k32 = k.astype(jnp.float32)
    return (k32 * jnp.cos(ang) + _rotate_half(k32) * jnp.sin(ang)).astype(k.dtype)


def _as5d(x):
    if x.ndim == 4:
        return x[None], True
    if x.ndim != 5:
        raise ValueError(f"expected [L, Hkv, P, ps, hd] or [Hkv, P, ps, hd], got {x.shape}")
    return x, False


def _phys(page_table, slots, page_size, num_pages):
    """Flat physical row of logical slots [B, S] (clamped into the pool)."""
    maxp = page_table.shape[1]
    col = jnp.clip(slots // page_size, 0, maxp - 1)
    page = jnp.clip(jnp.take_along_axis(page_table.astype(jnp.int32), col, axis=1), 0, num_pages - 1)
    return page * page_size + slots % page_size


# --------------------------------------------------------------------------------------
# Pure-jnp references (the "xla" path)
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rope_theta",))
def compact_pages_reference(k_pages, v_pages, page_table, start, end, length, *, rope_theta: float):
    k5, squeeze = _as5d(k_pages)
    v5, _ = _as5d(v_pages)
    l, hkv, num_pages, ps, hd = k5.shape
    b, maxp = page_table.shape
    n_slots = maxp * ps
    start = start.astype(jnp.int32)
    end = end.astype(jnp.int32)
    length = length.astype(jnp.int32)
    d = end - start
    j = jnp.arange(n_slots, dtype=jnp.int32)[None, :]  # destination slots [1, S]
    valid = (j >= start[:, None]) & (j < (length - d)[:, None]) & (d[:, None] > 0)
    src = _phys(page_table, jnp.where(valid, j + d[:, None], 0), ps, num_pages)
    dst = jnp.where(valid, _phys(page_table, j, ps, num_pages), num_pages * ps)  # OOB->drop
    src, dst = src.reshape(-1), dst.reshape(-1)
    kf = k5.reshape(l, hkv, num_pages * ps, hd)
    vf = v5.reshape(l, hkv, num_pages * ps, hd)
    k_new = rotate_keys(kf[:, :, src], jnp.repeat(-d, n_slots), rope_theta)
    v_new = vf[:, :, src]
    kf = kf.at[:, :, dst].set(k_new, mode="drop", unique_indices=False)
    vf = vf.at[:, :, dst].set(v_new, mode="drop", unique_indices=False)
    k_out, v_out = kf.reshape(k5.shape), vf.reshape(v5.shape)
    if squeeze:
        k_out, v_out = k_out[0], v_out[0]
    return k_out, v_out


@functools.partial(jax.jit, static_argnames=("rope_theta",))
def rotate_slots_reference(k_pages, page_table, start, count, delta, *, rope_theta: float):
    k5, squeeze = _as5d(k_pages)
    l, hkv, num_pages, ps, hd = k5.shape
    b, maxp = page_table.shape
    n_slots = maxp * ps
    start = start.astype(jnp.int32)
    count = count.astype(jnp.int32)
    j = jnp.arange(n_slots, dtype=jnp.int32)[None, :]
    valid = (j >= start[:, None]) & (j < (start + count)[:, None])
    rows = _phys(page_table, jnp.where(valid, j, 0), ps, num_pages)
    dst = jnp.where(valid, rows, num_pages * ps).reshape(-1)
    kf = k5.reshape(l, hkv, num_pages * ps, hd)
    k_new = rotate_keys(kf[:, :, rows.reshape(-1)], jnp.repeat(delta.astype(jnp.int32), n_slots), rope_theta)
    kf = kf.at[:, :, dst].set(k_new, mode="drop")
    out = kf.reshape(k5.shape)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------
# Pallas kernels
# --------------------------------------------------------------------------------------


def _barrier(interpret: bool):
    if not interpret:  # a CTA barrier on the GPU; interpret mode is sequential anyway
        from jax.experimental.pallas import triton as plgpu

        plgpu.debug_barrier()


def _load_rows(ref, rows, cols, mask):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask[:, None], other=0)


def _store_rows(ref, rows, cols, val, mask):
    from jax.experimental.pallas import triton as plgpu

    plgpu.store(ref.at[rows[:, None], cols[None, :]], val, mask=mask[:, None])


def _rotate_loaded(ref, rows, cols, mask, delta, inv_freq):
    """Load rows of keys and return them rotated by ``delta`` positions (float32)."""
    hd = cols.shape[0]
    half = hd // 2
    k = _load_rows(ref, rows, cols, mask).astype(jnp.float32)
    # rotate_half(k)[c] = -k[c + half] (c < half), k[c - half] (c >= half): a second
    # gathered load with permuted columns instead of an in-register shuffle.
    perm = jnp.where(cols < half, cols + half, cols - half)
    sign = jnp.where(cols < half, -1.0, 1.0).astype(jnp.float32)
    k_perm = _load_rows(ref, rows, perm, mask).astype(jnp.float32)
    ang = delta.astype(jnp.float32) * inv_freq  # [hd]
    return k * jnp.cos(ang)[None, :] + (k_perm * sign[None, :]) * jnp.sin(ang)[None, :]


def _compact_kernel(
    pt_ref,
    start_ref,
    end_ref,
    len_ref,
    inv_ref,
    k_in,
    v_in,
    k_ref,
    v_ref,
    *,
    page_size: int,
    max_pages: int,
    block_rows: int,
    interpret: bool,
):
    del k_in, v_in  # aliased with k_ref / v_ref
    b = pl.program_id(2)
    s = start_ref[b]
    e = end_ref[b]
    n = len_ref[b]
    d = e - s
    new_len = n - d
    hd = k_ref.shape[-1]
    cols = jnp.arange(hd, dtype=jnp.int32)
    inv_freq = inv_ref[...]
    n_steps = jnp.where(d > 0, jnp.maximum(new_len - s + block_rows - 1, 0) // block_rows, 0)

    def phys(slot, ok):
        page = pt_ref[jnp.clip(slot // page_size, 0, max_pages - 1)]
        return jnp.where(ok, page * page_size + slot % page_size, 0)

    def body(i, carry):
        j = s + i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
        ok = j < new_len
        src = phys(j + d, ok)
        dst = phys(j, ok)
        k_new = _rotate_loaded(k_ref, src, cols, ok, -d, inv_freq).astype(k_ref.dtype)
        v_new = _load_rows(v_ref, src, cols, ok)
        _barrier(interpret)  # all loads of this step before any store
        _store_rows(k_ref, dst, cols, k_new, ok)
        _store_rows(v_ref, dst, cols, v_new, ok)
        _barrier(interpret)  # stores visible before the next step's loads
        return carry

    lax.fori_loop(0, n_steps, body, 0)


def _rotate_kernel(
    pt_ref,
    start_ref,
    count_ref,
    delta_ref,
    inv_ref,
    k_in,
    k_ref,
    *,
    page_size: int,
    max_pages: int,
    block_rows: int,
    interpret: bool,
):
    del k_in
    b = pl.program_id(2)
    s = start_ref[b]
    c = count_ref[b]
    dl = delta_ref[b]
    hd = k_ref.shape[-1]
    cols = jnp.arange(hd, dtype=jnp.int32)
    inv_freq = inv_ref[...]
    n_steps = jnp.maximum(c + block_rows - 1, 0) // block_rows

    def body(i, carry):
        j = s + i * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
        ok = j < s + c
        page = pt_ref[jnp.clip(j // page_size, 0, max_pages - 1)]
        rows = jnp.where(ok, page * page_size + j % page_size, 0)
        k_new = _rotate_loaded(k_ref, rows, cols, ok, dl, inv_freq).astype(k_ref.dtype)
        _barrier(interpret)  # the permuted load reads columns other threads store
        _store_rows(k_ref, rows, cols, k_new, ok)
        _barrier(interpret)
        return carry

    lax.fori_loop(0, n_steps, body, 0)


def _compiler_params(interpret, num_warps):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


@functools.partial(jax.jit, static_argnames=("rope_theta", "block_rows", "num_warps", "interpret"))
def _compact_pallas(k5, v5, page_table, start, end, length, *, rope_theta, block_rows, num_warps, interpret):
    l, hkv, num_pages, ps, hd = k5.shape
    b, maxp = page_table.shape
    rows = num_pages * ps
    kf = k5.reshape(l, hkv, rows, hd)
    vf = v5.reshape(l, hkv, rows, hd)
    inv = jnp.asarray(rope_inv_freq(hd, rope_theta))
    vec = pl.BlockSpec((b,), lambda i, h, s: (0,))
    pool = pl.BlockSpec((None, None, rows, hd), lambda i, h, s: (i, h, 0, 0))
    kernel = functools.partial(
        _compact_kernel, page_size=ps, max_pages=maxp, block_rows=block_rows, interpret=interpret
    )
    kf, vf = pl.pallas_call(
        kernel,
        grid=(l, hkv, b),
        in_specs=[
            pl.BlockSpec((None, maxp), lambda i, h, s: (s, 0)),
            vec,
            vec,
            vec,
            pl.BlockSpec((hd,), lambda i, h, s: (0,)),
            pool,
            pool,
        ],
        out_specs=[pool, pool],
        out_shape=[jax.ShapeDtypeStruct(kf.shape, kf.dtype), jax.ShapeDtypeStruct(vf.shape, vf.dtype)],
        input_output_aliases={5: 0, 6: 1},
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps),
        name="kv_compact",
    )(
        page_table.astype(jnp.int32),
        start.astype(jnp.int32),
        end.astype(jnp.int32),
        length.astype(jnp.int32),
        inv,
        kf,
        vf,
    )
    return kf.reshape(k5.shape), vf.reshape(v5.shape)


def compact_pages(
    k_pages,
    v_pages,
    page_table,
    start,
    end,
    length,
    *,
    rope_theta: float,
    block_rows: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Pallas compaction; returns new (k_pages, v_pages) (in place when donated)."""
    k5, squeeze = _as5d(k_pages)
    v5, _ = _as5d(v_pages)
    if k5.shape != v5.shape:
        raise ValueError(f"k/v shape mismatch {k5.shape} vs {v5.shape}")
    k_out, v_out = _compact_pallas(
        k5,
        v5,
        page_table,
        start,
        end,
        length,
        rope_theta=float(rope_theta),
        block_rows=int(block_rows),
        num_warps=num_warps,
        interpret=interpret,
    )
    if squeeze:
        k_out, v_out = k_out[0], v_out[0]
    return k_out, v_out


@functools.partial(jax.jit, static_argnames=("rope_theta", "block_rows", "num_warps", "interpret"))
def _rotate_pallas(k5, page_table, start, count, delta, *, rope_theta, block_rows, num_warps, interpret):
    l, hkv, num_pages, ps, hd = k5.shape
    b, maxp = page_table.shape
    rows = num_pages * ps
    kf = k5.reshape(l, hkv, rows, hd)
    inv = jnp.asarray(rope_inv_freq(hd, rope_theta))
    vec = pl.BlockSpec((b,), lambda i, h, s: (0,))
    pool = pl.BlockSpec((None, None, rows, hd), lambda i, h, s: (i, h, 0, 0))
    kernel = functools.partial(_rotate_kernel, page_size=ps, max_pages=maxp, block_rows=block_rows, interpret=interpret)
    kf = pl.pallas_call(
        kernel,
        grid=(l, hkv, b),
        in_specs=[
            pl.BlockSpec((None, maxp), lambda i, h, s: (s, 0)),
            vec,
            vec,
            vec,
            pl.BlockSpec((hd,), lambda i, h, s: (0,)),
            pool,
        ],
        out_specs=pool,
        out_shape=jax.ShapeDtypeStruct(kf.shape, kf.dtype),
        input_output_aliases={5: 0},
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps),
        name="kv_rotate",
    )(page_table.astype(jnp.int32), start.astype(jnp.int32), count.astype(jnp.int32), delta.astype(jnp.int32), inv, kf)
    return kf.reshape(k5.shape)


def rotate_slots(
    k_pages,
    page_table,
    start,
    count,
    delta,
    *,
    rope_theta: float,
    block_rows: int = 32,
    num_warps: int = 4,
    interpret: bool = False,
):
    """Rotate keys at slots [start[b], start[b] + count[b]) of each sequence by delta[b]
    positions, in place (Pallas). k_pages [L, Hkv, P, ps, hd] or [Hkv, P, ps, hd]."""
    k5, squeeze = _as5d(k_pages)
    out = _rotate_pallas(
        k5,
        page_table,
        start,
        count,
        delta,
        rope_theta=float(rope_theta),
        block_rows=int(block_rows),
        num_warps=num_warps,
        interpret=interpret,
    )
    return out[0] if squeeze else out
