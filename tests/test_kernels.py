"""Kernel tests: Pallas kernels (interpret mode on CPU) vs pure-jnp references, and the
references vs naive dense attention / RoPE from scratch on contiguous numpy data."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from timjax import kernels as K
from timjax.kernels import compaction as C
from timjax.kernels import paged_attention as PA

THETA = 10000.0


class _KernelTest:
    """Compiled Pallas kernels (INTERPRET = False) run only where a GPU backend exists; each class has an
    ``...Interpret`` subclass (INTERPRET = True) that runs the same cases through the interpreter on the CPU."""

    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas kernels need a GPU backend (the Interpret subclass runs on the CPU)")


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == jnp.bfloat16 else dict(atol=2e-5, rtol=2e-5)


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def make_cache(rng, *, batch, hkv, hd, ps, maxp, lengths, dtype, garbage=np.nan, extra_pages=3):
    """Dense per-sequence K/V [B, S, Hkv, hd] scattered into a shuffled page pool.

    Unused slots / pages hold ``garbage``; unused page-table entries hold a sentinel."""
    s_max = maxp * ps
    num_pages = batch * maxp + extra_pages
    k_dense = rng.standard_normal((batch, s_max, hkv, hd)).astype(np.float32)
    v_dense = rng.standard_normal((batch, s_max, hkv, hd)).astype(np.float32)
    k_dense = _f32(jnp.asarray(k_dense, dtype))  # exactly representable in dtype
    v_dense = _f32(jnp.asarray(v_dense, dtype))
    perm = rng.permutation(num_pages)
    pt = perm[: batch * maxp].reshape(batch, maxp).astype(np.int32)
    k_pages = np.full((hkv, num_pages, ps, hd), garbage, np.float32)
    v_pages = np.full((hkv, num_pages, ps, hd), garbage, np.float32)
    pt_out = np.full_like(pt, 10**6)  # sentinel beyond the length
    for b in range(batch):
        n = int(lengths[b])
        for s in range(n):
            pg, off = pt[b, s // ps], s % ps
            k_pages[:, pg, off] = k_dense[b, s]
            v_pages[:, pg, off] = v_dense[b, s]
        npg = -(-n // ps)
        pt_out[b, :npg] = pt[b, :npg]
    return (jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(pt_out), k_dense, v_dense, pt)


def naive_attention(q, k, v, scale):
    """q [n_q, Hq, hd], k/v [S, Hkv, hd] (contiguous) -> causal-free full attention rows."""
    hq = q.shape[1]
    g = hq // k.shape[1]
    kk = np.repeat(k, g, axis=1).astype(np.float64)
    vv = np.repeat(v, g, axis=1).astype(np.float64)
    logits = np.einsum("qhd,shd->hqs", q.astype(np.float64), kk) * scale
    return logits, vv


def dense_decode(q, k_dense, v_dense, lengths, scale):
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        n = int(lengths[b])
        if n == 0:
            continue
        logits, vv = naive_attention(q[b][None], k_dense[b, :n], v_dense[b, :n], scale)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[b] = np.einsum("hqs,shd->qhd", w, vv)[0]
    return out


def dense_extend(q, k_dense, v_dense, q_start, q_len, scale):
    out = np.zeros(q.shape, np.float64)
    for b in range(q.shape[0]):
        qs, ql = int(q_start[b]), int(q_len[b])
        for i in range(ql):
            n = qs + i + 1
            logits, vv = naive_attention(q[b, i][None], k_dense[b, :n], v_dense[b, :n], scale)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[b, i] = np.einsum("hqs,shd->qhd", w, vv)[0]
    return out


def _lengths(rng, batch, ps, maxp):
    """0, 1, an exact page multiple, mid-page and a random one."""
    s_max = ps * maxp
    mid_page = ps * (maxp - 1) + ps // 2 + 1 if ps > 1 else s_max - 1
    base = [0, 1, ps * max(1, maxp // 2), mid_page]
    while len(base) < batch:
        base.append(int(rng.integers(1, s_max + 1)))
    return np.asarray(base[:batch], np.int32)


# (page_size, group, dtype, head_dim, tuning)
DECODE_CASES = [
    (1, 1, jnp.float32, 32, {}),
    (4, 2, jnp.bfloat16, 32, {}),
    (16, 4, jnp.float32, 16, {}),
    (4, 4, jnp.bfloat16, 32, dict(use_dot=False)),
    (1, 2, jnp.float32, 32, dict(pages_per_compute_block=4, k_splits=3)),
    (4, 1, jnp.bfloat16, 64, dict(pages_per_compute_block=1, k_splits=2)),
]


class TestPagedDecodeAttention(_KernelTest):
    @pytest.mark.parametrize("ps,group,dtype,hd,tuning", DECODE_CASES)
    def test_kernel_vs_reference_vs_dense(self, ps, group, dtype, hd, tuning):
        rng = np.random.default_rng(ps * 100 + group * 10 + hd)
        batch, hkv = 5, 2
        maxp = max(3, 24 // ps)
        lengths = _lengths(rng, batch, ps, maxp)
        k_pages, v_pages, pt, k_dense, v_dense, _ = make_cache(
            rng, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=lengths, dtype=dtype
        )
        q = jnp.asarray(rng.standard_normal((batch, hkv * group, hd)), dtype)
        lengths_j = jnp.asarray(lengths)
        scale = 0.7 * hd**-0.5 if group == 2 else None
        ref = PA.paged_decode_attention_reference(q, k_pages, v_pages, lengths_j, pt, scale=scale)
        out = PA.paged_decode_attention(
            q, k_pages, v_pages, lengths_j, pt, scale=scale, interpret=self.INTERPRET, **tuning
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        dense = dense_decode(_f32(q), k_dense, v_dense, lengths, hd**-0.5 if scale is None else scale)
        assert np.all(np.isfinite(_f32(out)))
        np.testing.assert_allclose(_f32(ref), dense, **_tol(dtype))
        np.testing.assert_allclose(_f32(out), _f32(ref), **_tol(dtype))
        assert np.all(_f32(out)[lengths == 0] == 0)

    def test_matches_jax_paged_attention(self):
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

        rng = np.random.default_rng(7)
        batch, hkv, group, hd, ps, maxp = 3, 2, 4, 32, 4, 8
        lengths = np.asarray([5, 32, 17], np.int32)
        k_pages, v_pages, _, _, _, pt_full = make_cache(
            rng, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=lengths, dtype=jnp.float32, garbage=0.5
        )
        pt_full = jnp.asarray(pt_full)  # JAX's kernel needs every entry to be a valid page
        q = jnp.asarray(rng.standard_normal((batch, hkv * group, hd)), jnp.float32)
        scale = hd**-0.5
        theirs = jax_pa.paged_attention(
            q * scale,
            k_pages,
            v_pages,
            pt_full,
            jnp.asarray(lengths),
            pages_per_compute_block=4,
            k_splits=1,
            interpret=self.INTERPRET,
        )
        ours = PA.paged_decode_attention(
            q, k_pages, v_pages, jnp.asarray(lengths), pt_full, interpret=self.INTERPRET, pages_per_compute_block=4
        )
        np.testing.assert_allclose(_f32(ours), _f32(theirs), atol=1e-5, rtol=1e-5)


class TestPagedDecodeAttentionInterpret(TestPagedDecodeAttention):
    INTERPRET = True


# (page_size, group, dtype, T, tuning)
EXTEND_CASES = [
    (1, 2, jnp.float32, 5, {}),
    (4, 1, jnp.bfloat16, 8, {}),
    (16, 4, jnp.float32, 7, dict(block_q=2)),
    (4, 2, jnp.bfloat16, 6, dict(use_dot=False, pages_per_compute_block=1, k_splits=2)),
]


class TestPagedExtendAttention(_KernelTest):
    @pytest.mark.parametrize("ps,group,dtype,t,tuning", EXTEND_CASES)
    def test_kernel_vs_reference_vs_dense(self, ps, group, dtype, t, tuning):
        rng = np.random.default_rng(ps * 31 + group + t)
        batch, hkv, hd = 5, 2, 32
        maxp = max(3, 24 // ps)
        s_max = ps * maxp
        # prefill (q_start 0), chunk ending mid-page, chunk ending on a page boundary,
        # an empty chunk (inactive slot), a single-token chunk
        q_start = np.asarray([0, 3, s_max - t, 5, ps], np.int32)
        q_len = np.asarray([t, t - 1, t, 0, 1], np.int32)
        lengths = q_start + q_len
        k_pages, v_pages, pt, k_dense, v_dense, _ = make_cache(
            rng, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=lengths, dtype=dtype
        )
        q = jnp.asarray(rng.standard_normal((batch, t, hkv * group, hd)), dtype)
        args = (q, k_pages, v_pages, jnp.asarray(q_start), jnp.asarray(q_len), pt)
        ref = PA.paged_extend_attention_reference(*args)
        out = PA.paged_extend_attention(*args, interpret=self.INTERPRET, **tuning)
        assert out.shape == q.shape and out.dtype == q.dtype
        dense = dense_extend(_f32(q), k_dense, v_dense, q_start, q_len, hd**-0.5)
        np.testing.assert_allclose(_f32(ref), dense, **_tol(dtype))
        np.testing.assert_allclose(_f32(out), _f32(ref), **_tol(dtype))
        pad = np.arange(t)[None, :] >= q_len[:, None]
        assert np.all(_f32(out)[pad] == 0)

    def test_single_token_extend_equals_decode(self):
        rng = np.random.default_rng(3)
        batch, hkv, group, hd, ps, maxp = 3, 2, 2, 16, 4, 4
        lengths = np.asarray([1, 9, 16], np.int32)
        k_pages, v_pages, pt, *_ = make_cache(
            rng, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=lengths, dtype=jnp.float32
        )
        q = jnp.asarray(rng.standard_normal((batch, hkv * group, hd)), jnp.float32)
        dec = PA.paged_decode_attention_reference(q, k_pages, v_pages, jnp.asarray(lengths), pt)
        ext = PA.paged_extend_attention_reference(
            q[:, None], k_pages, v_pages, jnp.asarray(lengths - 1), jnp.ones_like(jnp.asarray(lengths)), pt
        )
        np.testing.assert_allclose(_f32(ext[:, 0]), _f32(dec), atol=1e-6)


class TestPagedExtendAttentionInterpret(TestPagedExtendAttention):
    INTERPRET = True


def rope_at(x, pos, theta=THETA):
    """Apply RoPE from scratch (float64): x [..., hd] at integer positions pos [...]."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.asarray(pos, np.float64)[..., None] * np.concatenate([inv, inv])
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def make_rope_cache(rng, *, layers, batch, hkv, hd, ps, maxp, lengths, dtype, extra_pages=4):
    """Pages hold rope(raw_k, slot) and v; unowned pages hold recognisable data."""
    s_max = ps * maxp
    num_pages = batch * maxp + extra_pages
    raw = rng.standard_normal((layers, batch, s_max, hkv, hd))
    vd = rng.standard_normal((layers, batch, s_max, hkv, hd))
    kd = rope_at(raw, np.arange(s_max)[None, None, :, None])
    pt = rng.permutation(num_pages)[: batch * maxp].reshape(batch, maxp).astype(np.int32)
    k_pages = rng.standard_normal((layers, hkv, num_pages, ps, hd))
    v_pages = rng.standard_normal((layers, hkv, num_pages, ps, hd))
    for b in range(batch):
        for s in range(int(lengths[b])):
            k_pages[:, :, pt[b, s // ps], s % ps] = kd[:, b, s]
            v_pages[:, :, pt[b, s // ps], s % ps] = vd[:, b, s]
    return (jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(pt), raw, pt)


def slot_view(pages, pt, b, s, ps):
    """[L, Hkv, hd] content of slot s of sequence b."""
    return pages[:, :, pt[b, s // ps], s % ps]


COMPACT_CASES = [(1, jnp.float32, 8), (4, jnp.bfloat16, 4), (16, jnp.float32, 32)]


class TestCompaction(_KernelTest):
    @pytest.mark.parametrize("ps,dtype,block_rows", COMPACT_CASES)
    def test_kernel_vs_reference_vs_rope(self, ps, dtype, block_rows):
        rng = np.random.default_rng(ps)
        layers, batch, hkv, hd = 2, 4, 2, 16
        maxp = max(2, 40 // ps)
        s_max = ps * maxp
        # pruned span mid-sequence (delta < block_rows), span crossing pages with a big
        # delta, a no-op (start == end), and pruning the whole tail (nothing moves)
        start = np.asarray([3, 2, 7, 5], np.int32)
        end = np.asarray([5, s_max - 9, 7, 12], np.int32)
        length = np.asarray([s_max - 1, s_max, 20, 12], np.int32)
        k_pages, v_pages, pt, raw, pt_np = make_rope_cache(
            rng, layers=layers, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=length, dtype=dtype
        )
        args = (k_pages, v_pages, pt, jnp.asarray(start), jnp.asarray(end), jnp.asarray(length))
        k_ref, v_ref = C.compact_pages_reference(*args, rope_theta=THETA)
        k_out, v_out = C.compact_pages(*args, rope_theta=THETA, block_rows=block_rows, interpret=self.INTERPRET)
        tol = _tol(dtype) if dtype == jnp.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(_f32(k_out), _f32(k_ref), **tol)
        np.testing.assert_array_equal(_f32(v_out), _f32(v_ref))

        k0, v0 = _f32(k_pages), _f32(v_pages)
        for name, (ko, vo) in dict(ref=(_f32(k_ref), _f32(v_ref)), kernel=(_f32(k_out), _f32(v_out))).items():
            for b in range(batch):
                d = int(end[b] - start[b])
                new_len = int(length[b]) - d
                for s in range(int(start[b])):  # untouched prefix
                    np.testing.assert_array_equal(slot_view(ko, pt_np, b, s, ps), slot_view(k0, pt_np, b, s, ps))
                    np.testing.assert_array_equal(slot_view(vo, pt_np, b, s, ps), slot_view(v0, pt_np, b, s, ps))
                for j in range(int(start[b]), new_len):
                    src = j + d
                    np.testing.assert_array_equal(
                        slot_view(vo, pt_np, b, j, ps), slot_view(v0, pt_np, b, src, ps), err_msg=name
                    )
                    want = rope_at(raw[:, b, src], j)  # raw key re-encoded at its new position
                    np.testing.assert_allclose(
                        slot_view(ko, pt_np, b, j, ps),
                        want,
                        err_msg=name,
                        **(_tol(dtype) if dtype == jnp.bfloat16 else dict(atol=1e-4, rtol=1e-4)),
                    )
            unowned = np.setdiff1d(np.arange(k0.shape[2]), pt_np.reshape(-1))
            assert unowned.size > 0
            np.testing.assert_array_equal(ko[:, :, unowned], k0[:, :, unowned])
            np.testing.assert_array_equal(vo[:, :, unowned], v0[:, :, unowned])

    def test_rotate_slots(self):
        rng = np.random.default_rng(11)
        layers, batch, hkv, hd, ps, maxp = 2, 3, 2, 16, 1, 24
        length = np.asarray([20, 24, 7], np.int32)
        k_pages, _, pt, raw, pt_np = make_rope_cache(
            rng, layers=layers, batch=batch, hkv=hkv, hd=hd, ps=ps, maxp=maxp, lengths=length, dtype=jnp.float32
        )
        start = np.asarray([4, 0, 3], np.int32)
        count = np.asarray([9, 24, 0], np.int32)
        delta = np.asarray([-3, -17, -2], np.int32)
        args = (k_pages, pt, jnp.asarray(start), jnp.asarray(count), jnp.asarray(delta))
        ref = _f32(C.rotate_slots_reference(*args, rope_theta=THETA))
        out = _f32(C.rotate_slots(*args, rope_theta=THETA, block_rows=8, interpret=self.INTERPRET))
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
        k0 = _f32(k_pages)
        for b in range(batch):
            for s in range(int(length[b])):
                got = slot_view(ref, pt_np, b, s, ps)
                if start[b] <= s < start[b] + count[b]:
                    np.testing.assert_allclose(got, rope_at(raw[:, b, s], s + delta[b]), atol=1e-4, rtol=1e-4)
                else:
                    np.testing.assert_array_equal(got, slot_view(k0, pt_np, b, s, ps))
        unowned = np.setdiff1d(np.arange(k0.shape[2]), pt_np.reshape(-1))
        np.testing.assert_array_equal(out[:, :, unowned], k0[:, :, unowned])


class TestCompactionInterpret(TestCompaction):
    INTERPRET = True


class TestOps:
    def test_auto_is_xla_on_cpu(self):
        assert K.resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
        with pytest.raises(ValueError):
            K.decode_attention(
                jnp.zeros((1, 2, 8)),
                jnp.zeros((1, 2, 2, 8)),
                jnp.zeros((1, 2, 2, 8)),
                jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1), jnp.int32),
                impl="nope",
            )

    def test_register_new_impl(self):
        calls = []

        def fake(q, *a, scale=None, **kw):
            calls.append(scale)
            return q

        K.register("decode_attention", "mosaic_gpu_test", fake)
        q = jnp.ones((1, 2, 8))
        out = K.decode_attention(q, None, None, None, None, scale=0.5, impl="mosaic_gpu_test")
        assert out is q and calls == [0.5]

    @pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
    def test_jit_and_scan_over_layers(self, impl):
        rng = np.random.default_rng(5)
        layers, batch, hkv, group, hd, ps, maxp, t = 2, 2, 2, 2, 16, 4, 4, 3
        lengths = np.asarray([7, 13], np.int32)
        # one cache with layers*hkv heads, split into layers (all layers share the page table)
        k_all, v_all, pt, *_ = make_cache(
            rng, batch=batch, hkv=layers * hkv, hd=hd, ps=ps, maxp=maxp, lengths=lengths, dtype=jnp.float32, garbage=0.0
        )
        kp = k_all.reshape(layers, hkv, *k_all.shape[1:])
        vp = v_all.reshape(layers, hkv, *v_all.shape[1:])
        q = jnp.asarray(rng.standard_normal((layers, batch, t, hkv * group, hd)), jnp.float32)
        q_start = jnp.asarray(lengths - t)
        q_len = jnp.full((batch,), t, jnp.int32)
        lens = jnp.asarray(lengths)

        @jax.jit
        def run(q, kp, vp, q_start, q_len, lens, pt):
            def step(carry, xs):
                ql, kl, vl = xs
                e = K.extend_attention(ql, kl, vl, q_start, q_len, pt, impl=impl)
                d = K.decode_attention(ql[:, -1], kl, vl, lens, pt, impl=impl)
                return carry + 1, (e, d)

            return lax.scan(step, 0, (q, kp, vp))[1]

        e, d = run(q, kp, vp, q_start, q_len, lens, pt)
        for l in range(layers):
            ref_e = PA.paged_extend_attention_reference(q[l], kp[l], vp[l], q_start, q_len, pt)
            ref_d = PA.paged_decode_attention_reference(q[l, :, -1], kp[l], vp[l], lens, pt)
            np.testing.assert_allclose(_f32(e[l]), _f32(ref_e), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(_f32(d[l]), _f32(ref_d), atol=1e-5, rtol=1e-5)
            # the last chunk token sees exactly the decode context
            np.testing.assert_allclose(_f32(e[l][:, -1]), _f32(d[l]), atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
    def test_compact_jit_donated(self, impl):
        rng = np.random.default_rng(9)
        length = np.asarray([30, 17], np.int32)
        k_pages, v_pages, pt, _, _ = make_rope_cache(
            rng, layers=2, batch=2, hkv=1, hd=16, ps=4, maxp=8, lengths=length, dtype=jnp.float32
        )
        start, end = jnp.asarray([6, 2]), jnp.asarray([11, 3])
        want = C.compact_pages_reference(k_pages, v_pages, pt, start, end, jnp.asarray(length), rope_theta=THETA)
        f = jax.jit(functools.partial(K.compact, rope_theta=THETA, impl=impl), donate_argnums=(0, 1))
        got = f(jnp.array(k_pages), jnp.array(v_pages), pt, start, end, jnp.asarray(length))
        np.testing.assert_allclose(_f32(got[0]), _f32(want[0]), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(_f32(got[1]), _f32(want[1]))
        rot = K.rotate_slots(k_pages, pt, start, end - start, -(end - start), rope_theta=THETA, impl=impl)
        rot_ref = C.rotate_slots_reference(k_pages, pt, start, end - start, -(end - start), rope_theta=THETA)
        np.testing.assert_allclose(_f32(rot), _f32(rot_ref), atol=1e-5, rtol=1e-5)
