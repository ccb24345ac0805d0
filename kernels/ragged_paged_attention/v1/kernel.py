"""Ragged paged attention, v1: one Pallas (Triton backend) call for decode and extend rows.

Grid ``(num_q_blocks, Hkv, k_splits)``. A *q block* holds up to ``block_q = block_m // G`` consecutive
query tokens of ONE row, packed with the G query heads that share kv head ``h`` into ``block_m`` rows
(row i = token i // G, head i % G: GQA packing, so K/V are loaded once per kv head and a decode row
still fills G rows of the dot). As in vLLM's unified attention, row r owns q blocks
``[cu[r] // block_q + r, cu[r + 1] // block_q + r + 1)``, so ``num_q_blocks = N // block_q + R``
covers every row for any ragged split of N tokens, and each program finds its row with a binary
search over ``cu_q_lens`` (no host-side schedule). Programs with no tokens store nothing.

Each program walks its row's slots ``0 .. q_start + last query`` in steps of ``block_k`` slots,
gathering K/V rows of the kv head's flat pool ``[P * ps, hd]`` through the page table (any page
size, including 1), with an online float32 softmax. ``k_splits > 1`` partitions the slot range
across the third grid axis (flash-decoding, for few long rows); the wrapper combines the partial
results by log-sum-exp. Outputs start as zeros (aliased inputs), so padding tokens read 0.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ... import online_softmax
from ...online_softmax import dot_nn, dot_nt

__all__ = ["num_q_blocks", "ragged_paged_attention"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def num_q_blocks(n_tokens: int, n_rows: int, block_q: int) -> int:
    """Grid size over q blocks: every row gets its blocks for any split of n_tokens (vLLM's bound)."""
    return n_tokens // block_q + n_rows


def _find_row(cu_ref, qb, *, n_rows: int, block_q: int):
    """Largest row r with cu[r] // block_q + r <= qb (the key is strictly increasing in r)."""

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = (lo + hi + 1) // 2
        ok = cu_ref[mid] // block_q + mid <= qb
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    steps = max(1, math.ceil(math.log2(max(n_rows, 2))) + 1)
    lo, _ = lax.fori_loop(0, steps, body, (jnp.int32(0), jnp.int32(n_rows - 1)))
    return lo


def _load_rows(ref, rows, cols, mask):
    """Masked gather of ``rows`` (clamped in range by the caller) of a 2-D ref -> [len(rows), hd]."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask[:, None], other=0)


def _kernel(
    cu_ref,
    q_start_ref,
    q_len_ref,
    pt_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    n_rows: int,
    window: int,
    n_tokens: int,
    group: int,
    n_heads: int,
    block_m: int,
    block_k: int,
    page_size: int,
    n_pool_rows: int,
    split_len: int,
    k_splits: int,
    scale: float,
):
    from jax.experimental.pallas import triton as plgpu

    out_refs = refs[len(refs) // 2 :]  # the first half are the aliased zero inputs
    qb, h, ks = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hd = k_ref.shape[-1]
    block_q = block_m // group  # tokens per q block; rows past block_q * G are idle
    r = _find_row(cu_ref, qb, n_rows=n_rows, block_q=block_q)
    local = qb - (cu_ref[r] // block_q + r)  # q block index within the row
    tok0 = cu_ref[r]
    ql = q_len_ref[r]
    qs = q_start_ref[r]

    i = jnp.arange(block_m, dtype=jnp.int32)
    t = local * block_q + i // group  # query index within the row
    head = h * group + i % group
    valid = (i < block_q * group) & (t < ql)
    q_rows = (tok0 + t) * n_heads + head  # rows of q viewed [N * Hq, hd]
    # Masked-off rows point at the spare output row N * Hq: no two rows of a store ever collide (the
    # interpreter emulates a masked store by read-modify-write, where a collision would undo a write).
    o_rows = jnp.where(valid, q_rows, n_tokens * n_heads)
    q_rows = jnp.where(valid, q_rows, 0)
    cols = jnp.arange(hd, dtype=jnp.int32)
    q = _load_rows(q_ref, q_rows, cols, valid)
    limit = qs + t  # last slot each row may see
    kv_end = jnp.where(local * block_q < ql, qs + jnp.minimum(ql, (local + 1) * block_q), 0)
    p_start = ks * split_len
    p_end = jnp.minimum(kv_end, p_start + split_len)
    n_steps = jnp.maximum(p_end - p_start + block_k - 1, 0) // block_k

    def body(j, carry):
        slot = p_start + j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_range = slot < p_end
        col = jnp.minimum(slot // page_size, window - 1)
        page = pt_ref[r * window + col]
        flat = jnp.where(in_range, jnp.clip(page * page_size + slot % page_size, 0, n_pool_rows - 1), 0)
        k = _load_rows(k_ref, flat, cols, in_range)
        v = _load_rows(v_ref, flat, cols, in_range)  # zero past the end: no 0 * NaN
        mask = in_range[None, :] & (slot[None, :] <= limit[:, None]) & valid[:, None]
        return online_softmax.update(carry, dot_nt(q, k) * scale, mask, lambda p: dot_nn(p.astype(v.dtype), v))

    o, m, l = lax.fori_loop(0, n_steps, body, online_softmax.initial_state(block_m, hd))

    if k_splits == 1:
        (o_ref,) = out_refs
        out = online_softmax.normalized(o, l, valid)
        plgpu.store(o_ref.at[o_rows[:, None], cols[None, :]], out.astype(o_ref.dtype), mask=valid[:, None])
    else:
        o_ref, m_ref, l_ref = out_refs
        plgpu.store(o_ref.at[o_rows[:, None], cols[None, :]], o, mask=valid[:, None])
        plgpu.store(m_ref.at[o_rows], m, mask=valid)
        plgpu.store(l_ref.at[o_rows], l, mask=valid)


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_m", "block_k", "k_splits", "num_warps", "num_stages", "interpret")
)
def _ragged_pallas(
    q,
    k_pages,
    v_pages,
    page_table,
    q_start,
    q_len,
    cu_q_lens,
    *,
    scale,
    block_m,
    block_k,
    k_splits,
    num_warps,
    num_stages,
    interpret,
):
    n, hq, hd = q.shape
    hkv, n_pages, ps, _ = k_pages.shape
    r, w = page_table.shape
    group = hq // hkv
    pool_rows = n_pages * ps
    grid_q = num_q_blocks(n, r, block_m // group)
    split_len = _cdiv(_cdiv(w * ps, k_splits), block_k) * block_k

    def full(shape):
        return pl.BlockSpec(shape, lambda i, h, s: (0,) * len(shape))

    pool = pl.BlockSpec((None, pool_rows, hd), lambda i, h, s: (h, 0, 0))
    rows = n * hq + 1  # + the spare row masked-off stores point at
    if k_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows, hd), q.dtype)]
        out_specs = [full((rows, hd))]
    else:  # partial (o, m, l) per split, combined below
        out_shape = [
            jax.ShapeDtypeStruct((k_splits, rows, hd), jnp.float32),
            jax.ShapeDtypeStruct((k_splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((k_splits, rows), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, rows, hd), lambda i, h, s: (s, 0, 0)),
            pl.BlockSpec((None, rows), lambda i, h, s: (s, 0)),
            pl.BlockSpec((None, rows), lambda i, h, s: (s, 0)),
        ]
    # Programs store only their rows' tokens: outputs start as zeros (aliased), so padding reads 0.
    zeros = [jnp.zeros(o.shape, o.dtype) for o in out_shape]
    n_in = 7
    kernel = functools.partial(
        _kernel,
        n_rows=r,
        window=w,
        n_tokens=n,
        group=group,
        n_heads=hq,
        block_m=block_m,
        block_k=block_k,
        page_size=ps,
        n_pool_rows=pool_rows,
        split_len=split_len,
        k_splits=k_splits,
        scale=scale,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(grid_q, hkv, k_splits),
        in_specs=[full((r + 1,)), full((r,)), full((r,)), full((r * w,)), full((n * hq, hd)), pool, pool, *out_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={n_in + j: j for j in range(len(out_shape))},
        interpret=interpret,
        compiler_params=_compiler_params(interpret, num_warps, num_stages),
        name=f"ragged_paged_attention_bm{block_m}_bk{block_k}_ks{k_splits}",
    )(
        cu_q_lens.astype(jnp.int32),
        q_start.astype(jnp.int32),
        q_len.astype(jnp.int32),
        page_table.astype(jnp.int32).reshape(-1),
        q.reshape(n * hq, hd),
        k_pages.reshape(hkv, pool_rows, hd),
        v_pages.reshape(hkv, pool_rows, hd),
        *zeros,
    )
    if k_splits == 1:
        return outs[0][:-1].reshape(n, hq, hd)
    o = online_softmax.combine_splits(*(x[:, :-1] for x in outs))
    return o.astype(q.dtype).reshape(n, hq, hd)


def _check(name: str, ok: bool, msg: str):
    if not ok:
        raise ValueError(f"ragged_paged_attention: {name}: {msg}")


def validate(q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens):
    """Shape checks with both shapes in the message (everything static; values are the caller's)."""
    _check("q", q.ndim == 3, f"expected [N, Hq, hd], got {q.shape}")
    _check("k_pages", k_pages.ndim == 4, f"expected [Hkv, P, ps, hd], got {k_pages.shape}")
    _check("v_pages", v_pages.shape == k_pages.shape, f"shape {v_pages.shape} differs from k_pages {k_pages.shape}")
    _check(
        "q",
        q.shape[2] == k_pages.shape[3],
        f"head_dim {q.shape[2]} (q {q.shape}) != head_dim {k_pages.shape[3]} (k_pages {k_pages.shape})",
    )
    _check(
        "q",
        q.shape[1] % k_pages.shape[0] == 0,
        f"Hq {q.shape[1]} (q {q.shape}) is not a multiple of Hkv {k_pages.shape[0]} (k_pages {k_pages.shape})",
    )
    _check("page_table", page_table.ndim == 2, f"expected [R, W], got {page_table.shape}")
    r = page_table.shape[0]
    for name, x, want in (("q_start", q_start, (r,)), ("q_len", q_len, (r,)), ("cu_q_lens", cu_q_lens, (r + 1,))):
        _check(name, tuple(x.shape) == want, f"shape {tuple(x.shape)}, want {want} for page_table {page_table.shape}")
        _check(name, jnp.issubdtype(x.dtype, jnp.integer), f"dtype {x.dtype} is not an integer type")
    _check("page_table", jnp.issubdtype(page_table.dtype, jnp.integer), f"dtype {page_table.dtype} is not integer")


def ragged_paged_attention(
    q,
    k_pages,
    v_pages,
    page_table,
    q_start,
    q_len,
    cu_q_lens,
    *,
    scale=None,
    block_m=None,
    block_k=None,
    k_splits=None,
    num_warps=None,
    num_stages=None,
    interpret=False,
):
    """Ragged paged attention (Pallas). Shapes as in ``ragged_paged_attention_reference``.

    Tuning (keyword-only, static): ``block_m`` rows per program (tokens x G query heads, a power of two
    >= 16 and >= G), ``block_k`` slots per KV step (power of two >= 16), ``k_splits`` KV partitions,
    ``num_warps``, ``num_stages``. Unset ones come from the tuned table (``tuned_block_sizes``).
    """
    from .tuned_block_sizes import auto_k_splits, get_tuned

    validate(q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens)
    hd, group, ps = q.shape[2], q.shape[1] // k_pages.shape[0], k_pages.shape[2]
    tuned = get_tuned(head_dim=hd, group=group, page_size=ps, dtype=jnp.dtype(q.dtype).name)
    block_m = tuned.block_m if block_m is None else int(block_m)
    block_k = tuned.block_k if block_k is None else int(block_k)
    num_warps = tuned.num_warps if num_warps is None else int(num_warps)
    num_stages = tuned.num_stages if num_stages is None else int(num_stages)
    _check(
        "block_m",
        _is_pow2(block_m) and block_m >= max(16, group),
        f"{block_m} must be a power of two >= max(16, G={group})",
    )
    _check("block_k", _is_pow2(block_k) and block_k >= 16, f"{block_k} must be a power of two >= 16")
    _check("q", _is_pow2(hd) and hd >= 16, f"head_dim {hd} must be a power of two >= 16 (q {q.shape})")
    if k_splits is None:
        n, r, w = q.shape[0], page_table.shape[0], page_table.shape[1]
        programs = num_q_blocks(n, r, max(1, block_m // group)) * k_pages.shape[0]
        k_splits = auto_k_splits(programs=programs, slots=w * ps, block_k=block_k)
    _check("k_splits", int(k_splits) >= 1, f"{k_splits} must be >= 1")
    scale = float(hd**-0.5 if scale is None else scale)
    return _ragged_pallas(
        q,
        k_pages,
        v_pages,
        page_table,
        q_start,
        q_len,
        cu_q_lens,
        scale=scale,
        block_m=block_m,
        block_k=block_k,
        k_splits=int(k_splits),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=bool(interpret),
    )
