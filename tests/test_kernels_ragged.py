"""Ragged paged attention: the pure-JAX reference against a dense float64 computation, and the Pallas
kernel against both (compiled where a GPU backend exists, interpreted on the CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from timjax import kernels as K
from timjax.kernels.ragged_paged_attention import ragged_paged_attention_reference as reference


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-5)


def make_batch(rng, rows, *, n_tokens, hkv, group, hd, ps, window, dtype, garbage=np.nan, extra_pages=3):
    """A ragged batch from ``rows`` = [(q_start, q_len), ...] (q_len 0 = padding row).

    Returns device inputs (q, k_pages, v_pages, page_table, q_start, q_len, cu_q_lens) and the dense
    per-row K/V [R, S, Hkv, hd] (float32, exactly representable in dtype). Pages are shuffled; unused
    pool slots hold ``garbage`` (NaN by default); unused page-table entries hold wild values."""
    r = len(rows)
    q_start = np.asarray([s for s, _ in rows], np.int32)
    q_len = np.asarray([n for _, n in rows], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    assert cu[-1] <= n_tokens
    s_max = window * ps
    num_pages = r * window + extra_pages
    kd = _f32(jnp.asarray(rng.standard_normal((r, s_max, hkv, hd)), dtype))
    vd = _f32(jnp.asarray(rng.standard_normal((r, s_max, hkv, hd)), dtype))
    perm = rng.permutation(num_pages)[: r * window].reshape(r, window).astype(np.int32)
    k_pages = np.full((hkv, num_pages, ps, hd), garbage, np.float32)
    v_pages = np.full((hkv, num_pages, ps, hd), garbage, np.float32)
    pt = rng.choice([-7, 10**6, num_pages], size=(r, window)).astype(np.int32)
    for b in range(r):
        n = int(q_start[b] + q_len[b]) if q_len[b] else 0
        assert n <= s_max
        for s in range(n):
            k_pages[:, perm[b, s // ps], s % ps] = kd[b, s]
            v_pages[:, perm[b, s // ps], s % ps] = vd[b, s]
        pt[b, : -(-n // ps)] = perm[b, : -(-n // ps)]
    q = rng.standard_normal((n_tokens, hkv * group, hd)).astype(np.float32)
    q[cu[-1]:] = garbage  # padding tokens may hold anything too
    args = (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(pt),
            jnp.asarray(q_start), jnp.asarray(q_len), jnp.asarray(cu))
    return args, kd, vd


def dense_ragged(q, kd, vd, q_start, q_len, cu, scale):
    """float64 causal attention token by token from contiguous K/V."""
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape, np.float64)
    g = q.shape[1] // kd.shape[2]
    for b in range(len(q_start)):
        for i in range(int(q_len[b])):
            t = int(cu[b]) + i
            n = int(q_start[b]) + i + 1
            k = np.repeat(kd[b, :n], g, axis=1).astype(np.float64)  # [n, Hq, hd]
            v = np.repeat(vd[b, :n], g, axis=1).astype(np.float64)
            logits = np.einsum("hd,shd->hs", q[t], k) * scale
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[t] = np.einsum("hs,shd->hd", w, v)
    return out


# Mixed batches: decode rows (q_len 1), extend rows (chunk at 0, mid-page, ending on a page boundary),
# padding rows (q_len 0) and padding tokens at the end. (rows, page_size, window)
MIXED = {
    "ps1": ([(4, 1), (0, 5), (9, 3), (0, 0), (11, 1)], 1, 16),
    "ps16": ([(20, 1), (0, 7), (29, 3), (0, 0), (47, 1), (5, 11)], 16, 4),
}


class TestRaggedReference:
    @pytest.mark.parametrize("name", sorted(MIXED))
    @pytest.mark.parametrize("group,dtype", [(1, jnp.float32), (2, jnp.bfloat16), (4, jnp.float32)])
    @pytest.mark.parametrize("block_q", [None, 1, 4])
    def test_vs_dense(self, name, group, dtype, block_q):
        rows, ps, window = MIXED[name]
        rng = np.random.default_rng(len(rows) * 7 + group)
        n_tokens = sum(n for _, n in rows) + 3
        args, kd, vd = make_batch(rng, rows, n_tokens=n_tokens, hkv=2, group=group, hd=16, ps=ps,
                                  window=window, dtype=dtype)
        out = reference(*args, block_q=block_q)
        assert out.shape == args[0].shape and out.dtype == dtype
        q, *_, q_start, q_len, cu = args
        want = dense_ragged(_f32(q), kd, vd, _f32(q_start), _f32(q_len), _f32(cu), 16**-0.5)
        got = _f32(out)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, **_tol(dtype))
        assert np.all(got[int(cu[-1]):] == 0)

    def test_matches_extend_reference_and_ops(self):
        """Rows of equal q_len packed flat == the padded [B, T] extend reference; ops dispatches."""
        rng = np.random.default_rng(1)
        rows = [(3, 4), (0, 4), (12, 4)]
        args, *_ = make_batch(rng, rows, n_tokens=12, hkv=2, group=2, hd=16, ps=4, window=5,
                              dtype=jnp.float32, garbage=0.25)
        q, kp, vp, pt, qs, ql, cu = args
        ext = K.paged_extend_attention_reference(q.reshape(3, 4, 4, 16), kp, vp, qs, ql, pt, scale=0.3)
        rag = K.ragged_attention(q, kp, vp, pt, qs, ql, cu, scale=0.3, impl="xla")
        np.testing.assert_allclose(_f32(rag), _f32(ext).reshape(12, 4, 16), atol=1e-6)

    def test_decode_only_equals_decode_reference(self):
        rng = np.random.default_rng(2)
        rows = [(6, 1), (0, 1), (15, 1), (0, 0)]
        args, *_ = make_batch(rng, rows, n_tokens=4, hkv=1, group=4, hd=16, ps=4, window=4, dtype=jnp.float32)
        q, kp, vp, pt, qs, ql, cu = args
        lengths = jnp.where(ql > 0, qs + ql, 0)
        dec = K.paged_decode_attention_reference(q, kp, vp, lengths, pt)
        rag = K.ragged_attention(q, kp, vp, pt, qs, ql, cu)
        np.testing.assert_allclose(_f32(rag)[:3], _f32(dec)[:3], atol=1e-6)
        assert np.all(_f32(rag)[3] == 0)

    def test_jit_scan_over_layers_with_offset_tables(self):
        """The engine's use: one pool for all layers, the page table offset per layer, inside scan."""
        rng = np.random.default_rng(3)
        rows = [(2, 1), (0, 6)]
        n_layers, window = 2, 3
        per_layer = [make_batch(rng, rows, n_tokens=8, hkv=2, group=2, hd=16, ps=4, window=window,
                                dtype=jnp.float32, extra_pages=0)[0] for _ in range(n_layers)]
        p = per_layer[0][1].shape[1]
        kp = jnp.concatenate([a[1] for a in per_layer], axis=1)
        vp = jnp.concatenate([a[2] for a in per_layer], axis=1)
        q = jnp.stack([a[0] for a in per_layer])
        pts = jnp.stack([jnp.where((a[3] >= 0) & (a[3] < p), a[3] + l * p, a[3]) for l, a in enumerate(per_layer)])
        _, _, _, _, qs, ql, cu = per_layer[0]

        @jax.jit
        def run(q, kp, vp, pts):
            def step(c, xs):
                return c, K.ragged_attention(xs[0], kp, vp, xs[1], qs, ql, cu, impl="xla")
            return jax.lax.scan(step, 0, (q, pts))[1]

        out = run(q, kp, vp, pts)
        for l, a in enumerate(per_layer):
            np.testing.assert_allclose(_f32(out[l]), _f32(reference(*a)), atol=1e-6)

    def test_unknown_impl(self):
        rng = np.random.default_rng(4)
        args, *_ = make_batch(rng, [(0, 1)], n_tokens=1, hkv=1, group=1, hd=8, ps=1, window=1, dtype=jnp.float32)
        with pytest.raises(ValueError, match="ragged_attention"):
            K.ragged_attention(*args, impl="nope")
