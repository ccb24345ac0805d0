"""Ragged paged attention: the pure-JAX reference against a dense float64 computation, and the Pallas
kernel against both (compiled where a GPU backend exists, interpreted on the CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from timjax.kernels.ragged_paged_attention import ragged_paged_attention_reference as reference

from timjax import kernels as K


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
    q[cu[-1] :] = garbage  # padding tokens may hold anything too
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(pt),
        jnp.asarray(q_start),
        jnp.asarray(q_len),
        jnp.asarray(cu),
    )
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
    @pytest.mark.parametrize("block_q", [None, 4])  # None: 1 token per tile at these sizes
    def test_vs_dense(self, name, group, dtype, block_q):
        rows, ps, window = MIXED[name]
        rng = np.random.default_rng(len(rows) * 7 + group)
        n_tokens = sum(n for _, n in rows) + 3
        args, kd, vd = make_batch(
            rng, rows, n_tokens=n_tokens, hkv=2, group=group, hd=16, ps=ps, window=window, dtype=dtype
        )
        out = reference(*args, block_q=block_q)
        assert out.shape == args[0].shape and out.dtype == dtype
        q, *_, q_start, q_len, cu = args
        want = dense_ragged(_f32(q), kd, vd, _f32(q_start), _f32(q_len), _f32(cu), 16**-0.5)
        got = _f32(out)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, **_tol(dtype))
        assert np.all(got[int(cu[-1]) :] == 0)

    @pytest.mark.parametrize("seed", range(6))
    def test_random_splits_vs_dense(self, seed):
        """Random ragged splits (0-9 tokens per row, any start, spare tokens) against the dense computation."""
        rng = np.random.default_rng(100 + seed)
        ps = int(rng.choice([1, 4]))
        window = 32 // ps
        rows = []
        for _ in range(int(rng.integers(1, 7))):
            n = int(rng.integers(0, 10))
            rows.append((int(rng.integers(0, window * ps - n + 1)), n))
        n_tokens = sum(n for _, n in rows) + int(rng.integers(1, 6))
        group = int(rng.choice([1, 2, 4]))
        args, kd, vd = make_batch(
            rng, rows, n_tokens=n_tokens, hkv=1, group=group, hd=8, ps=ps, window=window, dtype=jnp.float32
        )
        block_q = [None, 1, 2, 8][seed % 4]
        q, *_, q_start, q_len, cu = args
        want = dense_ragged(_f32(q), kd, vd, _f32(q_start), _f32(q_len), _f32(cu), 8**-0.5)
        np.testing.assert_allclose(_f32(reference(*args, block_q=block_q)), want, atol=2e-5, rtol=2e-5)

    def test_matches_extend_reference_and_ops(self):
        """Rows of equal q_len packed flat == the padded [B, T] extend reference; ops dispatches."""
        rng = np.random.default_rng(1)
        rows = [(3, 4), (0, 4), (12, 4)]
        args, *_ = make_batch(
            rng, rows, n_tokens=12, hkv=2, group=2, hd=16, ps=4, window=5, dtype=jnp.float32, garbage=0.25
        )
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
        per_layer = [
            make_batch(
                rng, rows, n_tokens=8, hkv=2, group=2, hd=16, ps=4, window=window, dtype=jnp.float32, extra_pages=0
            )[0]
            for _ in range(n_layers)
        ]
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


# (case, group, dtype, tuning): every mixed batch has decode rows, extend rows split over several q
# blocks, a padding row and padding tokens; NaN in unused pool slots and in padding tokens.
KERNEL_CASES = [
    ("ps1", 1, jnp.float32, {}),
    ("ps1", 4, jnp.bfloat16, dict(block_m=16, block_k=16)),
    ("ps1", 2, jnp.float32, dict(k_splits=3, block_k=16)),
    ("ps16", 2, jnp.bfloat16, dict(k_splits=2)),
    ("ps16", 4, jnp.float32, {}),
    ("ps16", 3, jnp.float32, dict(block_m=16)),  # G not a power of two: idle rows in each block
]


class TestRaggedKernel:
    """The Pallas kernel against the reference and the dense computation. Compiled (INTERPRET = False)
    only where a GPU backend exists; the subclass runs the same cases through the interpreter."""

    INTERPRET = False

    def setup_method(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas kernels need a GPU backend (the INTERPRET subclass runs on the CPU)")

    def _kernel(self, *args, **tuning):
        return K.ragged_attention(*args, impl="pallas_interpret" if self.INTERPRET else "pallas", **tuning)

    @pytest.mark.parametrize("name,group,dtype,tuning", KERNEL_CASES)
    def test_mixed_batch(self, name, group, dtype, tuning):
        rows, ps, window = MIXED[name]
        rng = np.random.default_rng(group * 10 + ps)
        n_tokens = sum(n for _, n in rows) + 3
        args, kd, vd = make_batch(
            rng, rows, n_tokens=n_tokens, hkv=2, group=group, hd=16, ps=ps, window=window, dtype=dtype
        )
        out = self._kernel(*args, **tuning)
        assert out.shape == args[0].shape and out.dtype == dtype
        got = _f32(out)
        assert np.all(np.isfinite(got))
        q, *_, q_start, q_len, cu = args
        want = dense_ragged(_f32(q), kd, vd, _f32(q_start), _f32(q_len), _f32(cu), 16**-0.5)
        np.testing.assert_allclose(got, want, **_tol(dtype))
        np.testing.assert_allclose(got, _f32(reference(*args)), **_tol(dtype))
        assert np.all(got[int(cu[-1]) :] == 0)

    @pytest.mark.parametrize("seed", range(2))
    def test_random_splits(self, seed):
        """Random ragged splits with 16-row blocks, so rows span several q blocks and blocks sit idle."""
        rng = np.random.default_rng(200 + seed)
        rows = [(int(rng.integers(0, 20)), int(rng.integers(0, 12))) for _ in range(int(rng.integers(2, 6)))]
        n_tokens = sum(n for _, n in rows) + int(rng.integers(1, 9))
        group = [2, 4][seed]
        args, kd, vd = make_batch(
            rng, rows, n_tokens=n_tokens, hkv=1, group=group, hd=16, ps=4, window=8, dtype=jnp.float32
        )
        got = _f32(self._kernel(*args, block_m=16, block_k=16))
        q, *_, q_start, q_len, cu = args
        want = dense_ragged(_f32(q), kd, vd, _f32(q_start), _f32(q_len), _f32(cu), 16**-0.5)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
        assert np.all(got[int(cu[-1]) :] == 0)

    def test_decode_only_and_scale(self):
        rng = np.random.default_rng(5)
        rows = [(0, 1), (30, 1), (0, 0), (17, 1)]
        args, *_ = make_batch(rng, rows, n_tokens=4, hkv=2, group=2, hd=32, ps=4, window=8, dtype=jnp.float32)
        got = self._kernel(*args, scale=0.3)
        np.testing.assert_allclose(_f32(got), _f32(reference(*args, scale=0.3)), atol=2e-5, rtol=2e-5)
        assert np.all(_f32(got)[3] == 0)  # cu = [0, 1, 2, 2, 3]: token 3 is padding

    def test_row_zeroed_after_packing(self):
        """The engine zeroes q_len of a row that ran out of pages but keeps cu_q_lens: its tokens read 0 and the
        rows after it are unaffected (both paths)."""
        rng = np.random.default_rng(8)
        args, *_ = make_batch(
            rng, [(2, 3), (0, 4), (7, 2)], n_tokens=12, hkv=2, group=2, hd=16, ps=4, window=3, dtype=jnp.float32
        )
        q, kp, vp, pt, qs, ql, cu = args
        ql0 = ql.at[1].set(0)
        got = _f32(self._kernel(q, kp, vp, pt, qs, ql0, cu))
        full = _f32(reference(*args))
        assert np.all(got[3:7] == 0) and np.all(got[9:] == 0)
        np.testing.assert_allclose(got[:3], full[:3], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(got[7:9], full[7:9], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(_f32(reference(q, kp, vp, pt, qs, ql0, cu)), got, atol=2e-5, rtol=2e-5)

    def test_all_rows_padding(self):
        rng = np.random.default_rng(6)
        args, *_ = make_batch(
            rng, [(0, 0), (0, 0)], n_tokens=4, hkv=1, group=2, hd=16, ps=4, window=2, dtype=jnp.float32
        )
        assert np.all(_f32(self._kernel(*args)) == 0)

    def test_in_jit_scan_over_layers(self):
        rng = np.random.default_rng(7)
        rows = [(5, 1), (0, 4)]
        layers = [
            make_batch(rng, rows, n_tokens=6, hkv=1, group=2, hd=16, ps=4, window=3, dtype=jnp.float32)[0]
            for _ in range(2)
        ]
        q = jnp.stack([a[0] for a in layers])
        kp = jnp.stack([a[1] for a in layers])
        vp = jnp.stack([a[2] for a in layers])
        pts = jnp.stack([a[3] for a in layers])
        _, _, _, _, qs, ql, cu = layers[0]

        @jax.jit
        def run(q, kp, vp, pts):
            def step(c, xs):
                return c, self._kernel(xs[0], xs[1], xs[2], xs[3], qs, ql, cu)

            return jax.lax.scan(step, 0, (q, kp, vp, pts))[1]

        out = run(q, kp, vp, pts)
        for l, a in enumerate(layers):
            np.testing.assert_allclose(_f32(out[l]), _f32(reference(*a)), atol=2e-5, rtol=2e-5)


class TestRaggedKernelInterpret(TestRaggedKernel):
    INTERPRET = True


class TestRaggedValidation:
    def _args(self, **over):
        a = dict(
            q=jnp.zeros((8, 4, 16)),
            k_pages=jnp.zeros((2, 6, 4, 16)),
            v_pages=jnp.zeros((2, 6, 4, 16)),
            page_table=jnp.zeros((3, 2), jnp.int32),
            q_start=jnp.zeros((3,), jnp.int32),
            q_len=jnp.zeros((3,), jnp.int32),
            cu_q_lens=jnp.zeros((4,), jnp.int32),
        )
        a.update(over)
        return a

    @pytest.mark.parametrize(
        "over,match",
        [
            (
                dict(q=jnp.zeros((8, 4, 32))),
                r"q: head_dim 32 \(q \(8, 4, 32\)\) != head_dim 16 \(k_pages \(2, 6, 4, 16\)\)",
            ),
            (dict(q=jnp.zeros((8, 3, 16))), r"Hq 3 .* Hkv 2"),
            (dict(v_pages=jnp.zeros((2, 6, 2, 16))), r"v_pages: shape \(2, 6, 2, 16\) differs from k_pages"),
            (
                dict(cu_q_lens=jnp.zeros((3,), jnp.int32)),
                r"cu_q_lens: shape \(3,\), want \(4,\) for page_table \(3, 2\)",
            ),
            (dict(q_len=jnp.zeros((3,))), r"q_len: dtype float32"),
        ],
    )
    def test_bad_shapes(self, over, match):
        with pytest.raises(ValueError, match=match):
            K.ragged_attention(**self._args(**over), impl="pallas_interpret")

    def test_bad_tuning(self):
        with pytest.raises(ValueError, match="block_m: 24 must be a power of two"):
            K.ragged_attention(**self._args(), impl="pallas_interpret", block_m=24)


def _packed(chunks, n):
    """``steps.Packed`` of per-row token chunks back to back, padded to ``n`` tokens."""
    from timjax.runtime import steps

    q_len = [len(c) for c in chunks]
    cu = np.concatenate([[0], np.cumsum(q_len)])
    toks, rows = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for r, c in enumerate(chunks):
        toks[cu[r] : cu[r + 1]], rows[cu[r] : cu[r + 1]] = c, r
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return steps.Packed(i32(toks), i32(rows), i32(np.arange(len(chunks))), i32(q_len), i32(cu))


def test_ragged_step_pallas_interpret_matches_xla():
    """The engine's ragged step end to end (prefill chunks beside a padding row, then decode rows beside an
    extend row): logits and the cache agree between the Pallas kernel (interpreted) and the XLA path."""
    from timjax.base.config import Qwen3Config
    from timjax.qwen3.model import init_params
    from timjax.runtime import steps
    from timjax.runtime.cache import create_cache

    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e4,
    )
    params = init_params(cfg, "float32", jax.random.key(0), std=0.2)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    no_edits = steps.Edits(lengths=i32([99] * 4), slot=i32([]), start=i32([]), end=i32([]), length=i32([]))

    iters = [
        _packed([[1, 2, 3, 4, 5], [6, 7, 8], [], [9]], 16),
        _packed([[10], [11, 12, 13, 14, 15, 16], [17, 18], [19]], 16),
    ]
    out = {}
    for impl in ("xla", "pallas_interpret"):
        cache = create_cache(cfg, num_pages=16, page_size=4, max_seqs=4, max_seq_len=32, dtype=jnp.float32)
        logits = []
        for p in iters:
            lg, bad, cache = steps.ragged_logits_step(
                params, cache, p, no_edits, cfg=cfg, impl=impl, kv_pages=8, max_new_pages=5
            )
            assert not np.any(np.asarray(bad)[np.asarray(p.q_len) > 0])
            logits.append(np.asarray(lg))
        out[impl] = (logits, np.asarray(cache.k), np.asarray(cache.lengths))
    (lx, kx, nx), (lp, kp, np_) = out["xla"], out["pallas_interpret"]
    np.testing.assert_array_equal(nx, np_)
    np.testing.assert_array_equal(nx, [6, 9, 2, 2])
    np.testing.assert_allclose(kp, kx, atol=2e-5, rtol=2e-5)  # layer 2 keys depend on layer 1 attention
    for a, b, p in zip(lx, lp, iters):
        live = np.asarray(p.q_len) > 0
        np.testing.assert_allclose(b[live], a[live], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block_q", [1, 3, 8])
def test_q_block_row_search_covers_every_token_once(block_q):
    """The kernel's per-program row search (run here as plain JAX over an array): over random ragged splits,
    every real token lands in exactly one q block of its own row, inside the static grid."""
    from timjax.kernels.ragged_paged_attention.v1 import kernel as V1

    n_tokens, n_rows = 64, 8
    grid = V1.num_q_blocks(n_tokens, n_rows, block_q)
    find = jax.jit(
        jax.vmap(
            jax.vmap(lambda cu, qb: V1._find_row(cu, qb, n_rows=n_rows, block_q=block_q), in_axes=(None, 0)),
            in_axes=(0, None),
        )
    )
    rng = np.random.default_rng(block_q)
    cus = []
    for _ in range(300):
        q_len = rng.integers(0, 3, n_rows) * rng.integers(0, 20, n_rows)  # many zeros, some long rows
        while q_len.sum() > n_tokens:
            q_len[rng.integers(n_rows)] //= 2
        cus.append(np.concatenate([[0], np.cumsum(q_len)]))
    cus = np.asarray(cus, np.int32)
    rows = np.asarray(find(jnp.asarray(cus), jnp.arange(grid, dtype=jnp.int32)))  # [cases, grid]
    for cu, row in zip(cus, rows):
        local = np.arange(grid) - (cu[row] // block_q + row)
        assert np.all(local >= 0)
        seen = np.zeros(n_tokens, int)
        for qb in range(grid):
            r = row[qb]
            t = local[qb] * block_q + np.arange(block_q)
            t = t[t < cu[r + 1] - cu[r]]
            seen[cu[r] + t] += 1
        assert np.all(seen[: cu[-1]] == 1) and np.all(seen[cu[-1] :] == 0)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_pure_decode_specialization_equals_the_ragged_step(impl):
    """A step where no row feeds more than one token (idle and padding slots among them) gives the same
    logits and cache through the decode kernel (``decode=True``, what the engine takes then) as through the
    ragged kernel, over three steps of growing rows."""
    from timjax.base.config import Qwen3Config
    from timjax.qwen3.model import init_params
    from timjax.runtime import steps
    from timjax.runtime.cache import create_cache

    cfg = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4,
    )  # fmt: skip
    params = init_params(cfg, "float32", jax.random.key(1), std=0.2)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    keep = steps.Edits(lengths=i32([99] * 4), slot=i32([]), start=i32([]), end=i32([]), length=i32([]))

    prefill = _packed([[1, 2, 3, 4, 5], [6, 7], [], [9, 10, 11, 12, 13, 14, 15]], 16)
    decodes = [
        _packed([[20], [21], [], [22]], 8),
        _packed([[23], [], [24], [25]], 8),
        _packed([[26], [27], [28], [29]], 4),
    ]
    out = {}
    for decode in (False, True):
        cache = create_cache(cfg, num_pages=16, page_size=4, max_seqs=4, max_seq_len=32, dtype=jnp.float32)
        kw = dict(cfg=cfg, impl=impl, kv_pages=8, max_new_pages=5)
        _, _, cache = steps.ragged_logits_step(params, cache, prefill, keep, **kw)
        logits = []
        for p in decodes:
            lg, bad, cache = steps.ragged_logits_step(params, cache, p, keep, **kw, decode=decode)
            assert not np.any(np.asarray(bad)[np.asarray(p.q_len) > 0])
            logits.append(np.asarray(lg))
        out[decode] = logits, np.asarray(cache.k), np.asarray(cache.lengths)
    (la, ka, na), (lb, kb, nb) = out[False], out[True]
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(nb, [8, 4, 2, 10])
    np.testing.assert_allclose(kb, ka, atol=2e-5, rtol=2e-5)
    for a, b, p in zip(la, lb, decodes, strict=True):
        live = np.asarray(p.q_len) > 0
        np.testing.assert_allclose(b[live], a[live], atol=2e-5, rtol=2e-5)
