"""Paged decode / extend attention over a paged KV cache (one layer).

Layout (fixed by the team):
  k_pages, v_pages : [num_kv_heads, num_pages, page_size, head_dim]
  page_table       : int32 [batch, max_pages_per_seq]; slot s of sequence b is
                     page ``page_table[b, s // page_size]`` at offset ``s % page_size``.

Two implementations of each op:
  * ``*_reference``: pure jnp (gather pages, masked float32 softmax). This is the
    production path on CPU ("xla").
  * ``paged_*_attention``: a Pallas kernel written for the Triton backend
    (``pl.pallas_call`` with grid + BlockSpecs, static tuning args), runnable on CPU
    with ``interpret=True``.

Decode is the special case of extend with one query token per sequence
(``q_start = length - 1``, ``q_len = min(length, 1)``), so both share one kernel.

Kernel design: grid ``(batch, kv_head, q_block, k_split)``. The query heads that share a
kv head are grouped (padded to a power of two ``Gp``) and interleaved with the chunk tokens
into ``rows = T * Gp`` rows, so K/V are never materialised per query head. The page pool
of one kv head is viewed flat as ``[num_pages * page_size, head_dim]`` and each step
gathers ``block_k = pages_per_compute_block * page_size`` KV rows through the page table
(per-row pointer gather, which also makes ``page_size == 1`` efficient). Online softmax in
float32; ``k_splits > 1`` partitions the KV range across the grid (flash-decoding) and a
final log-sum-exp combine runs in the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import online_softmax
from .online_softmax import MASK_VALUE, dot_nn, dot_nt

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_extend_attention",
    "paged_extend_attention_reference",
]


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sanitize_page_table(page_table, valid_slots, num_pages: int, page_size: int):
    """Entries past ``cdiv(valid_slots, page_size)`` -> 0, the rest clipped into range."""
    page_table = page_table.astype(jnp.int32)
    maxp = page_table.shape[1]
    n_valid = (valid_slots.astype(jnp.int32) + page_size - 1) // page_size
    col = jnp.arange(maxp, dtype=jnp.int32)[None, :]
    return jnp.where(col < n_valid[:, None], jnp.clip(page_table, 0, num_pages - 1), 0)


# --------------------------------------------------------------------------------------
# Pure-jnp references
# --------------------------------------------------------------------------------------


def _gather_kv(pages, page_table):
    """[Hkv, P, ps, hd] gathered through [B, maxp] -> [B, Hkv, maxp*ps, hd]."""
    hkv, _, ps, hd = pages.shape
    b, maxp = page_table.shape
    g = pages[:, page_table]  # [Hkv, B, maxp, ps, hd]
    return jnp.swapaxes(g, 0, 1).reshape(b, hkv, maxp * ps, hd)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_extend_attention_reference(q, k_pages, v_pages, q_start, q_len, page_table, *, scale=None):
    """q [B, T, Hq, hd]; query i < q_len[b] attends to slots j <= q_start[b] + i."""
    b, t, hq, hd = q.shape
    hkv, num_pages, ps, _ = k_pages.shape
    g = hq // hkv
    scale = hd**-0.5 if scale is None else scale
    q_start = q_start.astype(jnp.int32)
    q_len = q_len.astype(jnp.int32)
    pt = sanitize_page_table(page_table, q_start + q_len, num_pages, ps)
    k = _gather_kv(k_pages, pt)
    v = _gather_kv(v_pages, pt)
    s_len = k.shape[2]
    qr = q.reshape(b, t, hkv, g, hd)
    logits = jnp.einsum("btkgd,bksd->bkgts", qr, k, preferred_element_type=jnp.float32).astype(jnp.float32) * scale
    tok = jnp.arange(t, dtype=jnp.int32)
    slot = jnp.arange(s_len, dtype=jnp.int32)
    row_valid = tok[None, :] < q_len[:, None]  # [B, T]
    mask = (slot[None, None, :] <= (q_start[:, None, None] + tok[None, :, None])) & row_valid[:, :, None]  # [B, T, S]
    mask = mask[:, None, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    w = jax.nn.softmax(logits, axis=-1)
    w = jnp.where(mask, w, 0.0)
    v = jnp.where((slot[None, :] < (q_start + q_len)[:, None])[:, None, :, None], v, 0)
    o = jnp.einsum("bkgts,bksd->btkgd", w, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    o = jnp.where(row_valid[:, :, None, None, None], o, 0.0)
    return o.reshape(b, t, hq, hd).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale",))
def paged_decode_attention_reference(q, k_pages, v_pages, lengths, page_table, *, scale=None):
    """q [B, Hq, hd]; attend over slots < lengths[b]; lengths 0 -> zeros."""
    b, hq, hd = q.shape
    hkv, num_pages, ps, _ = k_pages.shape
    g = hq // hkv
    scale = hd**-0.5 if scale is None else scale
    lengths = lengths.astype(jnp.int32)
    pt = sanitize_page_table(page_table, lengths, num_pages, ps)
    k = _gather_kv(k_pages, pt)
    v = _gather_kv(v_pages, pt)
    s_len = k.shape[2]
    qr = q.reshape(b, hkv, g, hd)
    logits = jnp.einsum("bkgd,bksd->bkgs", qr, k, preferred_element_type=jnp.float32).astype(jnp.float32) * scale
    mask = (jnp.arange(s_len, dtype=jnp.int32)[None, :] < lengths[:, None])[:, None, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    w = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    v = jnp.where(mask[:, 0, 0][:, None, :, None], v, 0)
    o = jnp.einsum("bkgs,bksd->bkgd", w, v.astype(jnp.float32), preferred_element_type=jnp.float32)
    o = jnp.where((lengths > 0)[:, None, None, None], o, 0.0)
    return o.reshape(b, hq, hd).astype(q.dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------


def _attn_kernel(
    q_start_ref,
    q_len_ref,
    pt_ref,
    q_ref,
    k_ref,
    v_ref,
    *out_refs,
    group_p: int,
    block_q: int,
    block_k: int,
    page_size: int,
    max_pages: int,
    split_len: int,
    k_splits: int,
    scale: float,
    use_dot: bool,
):
    b = pl.program_id(0)
    qb = pl.program_id(2)
    ks = pl.program_id(3)
    block_m, hd = q_ref.shape

    qs = q_start_ref[b]
    ql = q_len_ref[b]
    rows = qb * block_m + jnp.arange(block_m, dtype=jnp.int32)
    tok = rows // group_p
    row_valid = tok < ql
    row_limit = qs + tok  # inclusive last slot each row may see
    kv_end = qs + jnp.minimum(ql, (qb + 1) * block_q)  # exclusive, for the whole q block
    p_start = ks * split_len
    p_end = jnp.minimum(kv_end, p_start + split_len)
    n_steps = jnp.maximum(p_end - p_start + block_k - 1, 0) // block_k

    q = q_ref[...]
    if not use_dot:
        q32 = q.astype(jnp.float32)

    def body(i, carry):
        slot = p_start + i * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_range = slot < p_end
        page_col = jnp.minimum(slot // page_size, max_pages - 1)
        page = pt_ref[page_col]
        flat = jnp.where(in_range, page * page_size + slot % page_size, 0)
        k = k_ref[flat, :]  # [block_k, hd] gathered rows
        # Slots past the sequence may hold anything (even NaN): zero V there (p is 0 too).
        v = jnp.where(in_range[:, None], v_ref[flat, :], jnp.zeros((), v_ref.dtype))
        if use_dot:
            s = dot_nt(q, k)
        else:
            s = jnp.sum(q32[:, None, :] * k.astype(jnp.float32)[None, :, :], axis=-1)
        mask = in_range[None, :] & (slot[None, :] <= row_limit[:, None]) & row_valid[:, None]

        def pv(p):
            if use_dot:
                return dot_nn(p.astype(v.dtype), v)
            return jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)

        return online_softmax.update(carry, s * scale, mask, pv)

    o, m, l = lax.fori_loop(0, n_steps, body, online_softmax.initial_state(block_m, hd))

    if k_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = online_softmax.normalized(o, l, row_valid).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = o
        m_ref[...] = m
        l_ref[...] = l


def _choose_block_q(t: int, group_p: int, block_q: int | None) -> int:
    if block_q is not None:
        bq = _next_pow2(block_q)
    else:
        # 32 rows: at hd 128 a 64-row block gets its wgmma serialised by ptxas (kernels/TUNING.md).
        bq = min(max(1, 32 // group_p), _next_pow2(t))
    # Triton dots want >= 16 rows: pad the token dim of the block if the group is small.
    return max(bq, max(1, 16 // group_p))


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "block_q",
        "pages_per_compute_block",
        "k_splits",
        "use_dot",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def paged_extend_attention(
    q,
    k_pages,
    v_pages,
    q_start,
    q_len,
    page_table,
    *,
    scale=None,
    block_q=None,
    pages_per_compute_block=None,
    k_splits=1,
    use_dot=None,
    num_warps=None,
    num_stages=2,
    interpret=False,
):
    """Paged extend (chunked prefill) attention, Pallas kernel.

    q [B, T, Hq, hd]; k_pages/v_pages [Hkv, P, ps, hd]; q_start, q_len int32 [B];
    page_table int32 [B, maxp]. The chunk's K/V are already in the pages. Query i < q_len
    attends to slots j <= q_start + i; padded query rows give zeros. Output [B, T, Hq, hd]
    in q.dtype.
    """
    b, t, hq, hd = q.shape
    hkv, num_pages, ps, hd_k = k_pages.shape
    if hd_k != hd or v_pages.shape != k_pages.shape:
        raise ValueError(f"shape mismatch q={q.shape} k={k_pages.shape} v={v_pages.shape}")
    if hq % hkv:
        raise ValueError(f"num q heads {hq} not a multiple of kv heads {hkv}")
    maxp = page_table.shape[1]
    g = hq // hkv
    gp = _next_pow2(g)
    scale = float(hd**-0.5 if scale is None else scale)

    bq = _choose_block_q(t, gp, block_q)
    tp = _cdiv(t, bq) * bq
    block_m = bq * gp
    n_qb = tp // bq
    ppcb = pages_per_compute_block or max(1, 64 // ps)
    block_k = _next_pow2(ppcb) * ps
    total_slots = maxp * ps
    k_splits = max(1, min(int(k_splits), _cdiv(total_slots, block_k)))
    split_len = _cdiv(_cdiv(total_slots, k_splits), block_k) * block_k
    if use_dot is None:
        use_dot = block_m >= 16 and block_k >= 16 and hd >= 16
    if num_warps is None:
        # sm_90a (kernels/TUNING.md): 64 rows x hd 128 at 4 warps hits 255 registers and ptxas
        # serialises the wgmma; 8 warps halve the per-thread accumulator.
        num_warps = 8 if block_m * hd >= 64 * 128 else 4

    q_start = q_start.astype(jnp.int32)
    q_len = q_len.astype(jnp.int32)
    pt = sanitize_page_table(page_table, q_start + q_len, num_pages, ps)

    # [B, T, Hkv, G, hd] -> [B, Hkv, Tp, Gp, hd] -> [B, Hkv, Tp*Gp, hd]
    qr = q.reshape(b, t, hkv, g, hd).transpose(0, 2, 1, 3, 4)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, tp - t), (0, gp - g), (0, 0)))
    qr = qr.reshape(b, hkv, tp * gp, hd)
    k_flat = k_pages.reshape(hkv, num_pages * ps, hd)
    v_flat = v_pages.reshape(hkv, num_pages * ps, hd)

    kernel = functools.partial(
        _attn_kernel,
        group_p=gp,
        block_q=bq,
        block_k=block_k,
        page_size=ps,
        max_pages=maxp,
        split_len=split_len,
        k_splits=k_splits,
        scale=scale,
        use_dot=bool(use_dot),
    )
    grid = (b, hkv, n_qb, k_splits)
    in_specs = [
        pl.BlockSpec((b,), lambda i, h, j, s: (0,)),  # q_start (scalar reads)
        pl.BlockSpec((b,), lambda i, h, j, s: (0,)),  # q_len
        pl.BlockSpec((None, maxp), lambda i, h, j, s: (i, 0)),  # page-table row
        pl.BlockSpec((None, None, block_m, hd), lambda i, h, j, s: (i, h, j, 0)),  # q
        pl.BlockSpec((None, num_pages * ps, hd), lambda i, h, j, s: (h, 0, 0)),  # k pool
        pl.BlockSpec((None, num_pages * ps, hd), lambda i, h, j, s: (h, 0, 0)),  # v pool
    ]
    if k_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((b, hkv, tp * gp, hd), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, block_m, hd), lambda i, h, j, s: (i, h, j, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((k_splits, b, hkv, tp * gp, hd), jnp.float32),
            jax.ShapeDtypeStruct((k_splits, b, hkv, tp * gp), jnp.float32),
            jax.ShapeDtypeStruct((k_splits, b, hkv, tp * gp), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, block_m, hd), lambda i, h, j, s: (s, i, h, j, 0)),
            pl.BlockSpec((None, None, None, block_m), lambda i, h, j, s: (s, i, h, j)),
            pl.BlockSpec((None, None, None, block_m), lambda i, h, j, s: (s, i, h, j)),
        ]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"paged_attention_bm{block_m}_bk{block_k}",
    )(q_start, q_len, pt, qr, k_flat, v_flat)

    if k_splits == 1:
        o = outs[0]
    else:
        o = online_softmax.combine_splits(*outs).astype(q.dtype)
    o = o.reshape(b, hkv, tp, gp, hd)[:, :, :t, :g]
    o = o.transpose(0, 2, 1, 3, 4).reshape(b, t, hq, hd)
    # Padded query rows are zero already inside the kernel; enforce for the combine path.
    tok_valid = jnp.arange(t, dtype=jnp.int32)[None, :] < q_len[:, None]
    return jnp.where(tok_valid[:, :, None, None], o, jnp.zeros((), o.dtype))


def paged_decode_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    scale=None,
    pages_per_compute_block=None,
    k_splits=1,
    use_dot=None,
    num_warps=None,
    num_stages=2,
    interpret=False,
):
    """Paged decode attention, Pallas kernel.

    q [B, Hq, hd]; attends over slots < lengths[b] (the current token's K/V already
    written). lengths == 0 -> zeros. Output [B, Hq, hd] in q.dtype.
    """
    lengths = lengths.astype(jnp.int32)
    q_start = jnp.maximum(lengths - 1, 0)
    q_len = jnp.minimum(lengths, 1)
    o = paged_extend_attention(
        q[:, None],
        k_pages,
        v_pages,
        q_start,
        q_len,
        page_table,
        scale=scale,
        block_q=1,
        pages_per_compute_block=pages_per_compute_block,
        k_splits=k_splits,
        use_dot=use_dot,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
    )
    return o[:, 0]
