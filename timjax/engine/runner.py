"""The runner: device state (parameters, the paged cache), packing a step, the dispatches and the one sync.

Per iteration the scheduler's rows become one ``Packed`` batch: every row's chunk back to back in a flat
token array whose length is a bucket (``timjax.base.buckets.bucket``), one row per cache slot. Cache edits
that pruning and the scheduler asked for (cuts for re-encode, releases of finished or preempted slots,
shift-mode compactions) travel with the step and are applied at its start, for every slot at once. So an
iteration costs one dispatch, or two when a row samples under a grammar mask: the forward runs while the
host fills the masks, then one sample dispatch. The sampled tokens, a non-finite flag per row and the
allocator's out-of-pages flags come back in one sync. Prefix caching (``timjax.engine.prefix_cache``) adds
each slot's cached-page count and the evicted pages to the step's edits, one ``map_prefix`` dispatch before
a step that admits a cached prefix, and the page table to the sync after a step that completes prompt pages.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from timjax.base.buckets import bucket, cdiv, pow2
from timjax.engine.prefix_cache import PrefixCache
from timjax.engine.protocol import PruneOp, SeqState
from timjax.engine.scheduler import Row
from timjax.runtime import sharding, steps
from timjax.runtime.cache import create_cache, map_prefix, release
from timjax.runtime.sampling import SamplingParams

MAX_COMPACTIONS = 2  # shift-mode compactions per step (more in one step fall back to re-encode)
MIN_KV_WINDOW = 256  # tokens: the smallest page-table window attention looks at
MIN_DECODE_TOKENS = 8  # the smallest packed length (fewer when the engine has fewer slots)


@dataclasses.dataclass
class Launched:
    """A step in flight: ``mask`` rows are filled by the host before ``Runner.collect``."""

    rows: list[Row]
    out: tuple  # device arrays: (tokens, flags, None) or (logits, flags, sampling settings)
    mask: np.ndarray | None  # int32 [S, words] when a row samples under a mask
    tokens: int  # real tokens packed
    computed: int  # packed length N (real + padding)
    want_pages: bool = False  # read the page table back with the sync (prompt pages enter the prefix index)
    sampled: jax.Array | None = None  # int32 [S] once sampled (``Runner.sample``): the next step may read it
    launched_s: float = 0.0


class Runner:
    def __init__(
        self,
        model,
        *,
        max_batch: int,
        page_size: int,
        max_seq_len: int,
        num_pages: int,
        impl: str,
        reposition: str = "reencode",
        prefix_cache: bool = True,
    ):
        self.cfg = model.config
        self.params = model.params()
        self.mesh = getattr(model, "mesh", None)  # sharded model: sharded pool, kernels under shard_map
        self.impl = impl if self.mesh is None else sharding.sharded_impl(self.mesh, impl)
        self.host_inputs = sharding.replicated(self.mesh)  # where per-step host arrays go (None: default device)
        self.reposition = reposition
        kw = dict(
            num_pages=num_pages, page_size=page_size, max_seqs=max_batch, max_seq_len=max_seq_len, dtype=model.dtype
        )
        self.cache = (
            create_cache(self.cfg, **kw) if self.mesh is None else sharding.create_cache(self.cfg, self.mesh, **kw)
        )
        self.words = cdiv(self.cfg.vocab_size, 32)
        # slot -> (sequence, start, end, length) for the next step; dropped if the slot changed hands meanwhile
        self.compactions: dict[int, tuple[SeqState, int, int, int]] = {}
        self.dispatches = 0
        self._maps_warm = False  # map_prefix compiled for every slot count (the first warm step does it)
        self._zeros: jax.Array | None = None  # ``prev`` of a step with no step before it in flight
        # The index belongs to this pool, and the pool to these weights: the salt tells pages of other
        # weights, dtypes or page sizes apart should an index ever outlive them.
        salt = (type(model).__name__, id(self.params), str(model.dtype), page_size)
        self.prefix = (
            PrefixCache(
                page_size=page_size,
                num_slots=self.cache.max_seqs,
                max_pages_per_seq=self.cache.max_pages_per_seq,
                salt=salt,
                mode=reposition,
            )
            if prefix_cache
            else None
        )

    @property
    def slots(self) -> int:
        return self.cache.max_seqs

    # -- pruning: host token lists now, device edits with the next step -----------------------------
    def prune(self, seq: SeqState, ops: list[PruneOp]) -> None:
        """Apply prune ops in order (each names slots of ``cached + pending`` as left by the one before).
        Unfed tokens are simply dropped; cached ones become a cut (re-encode the kept suffix) or, in shift
        mode when they form one span, a compaction applied at the start of the next step."""
        n = len(seq.cached)
        logical = seq.cached + seq.pending
        order = list(range(len(logical)))
        for op in ops:
            del order[op.start : op.end]
        kept = [logical[i] for i in order]
        gone = sorted(set(range(n)) - set(order))
        if not gone:
            seq.pending = kept[n:]
            return
        lo, hi = gone[0], gone[-1] + 1
        shared = len(seq.shared) * self.cache.page_size  # read-only index pages: never compacted or written
        can_shift = (
            (seq.request.reposition or self.reposition) == "shift"
            and hi - lo == len(gone)
            and lo >= shared
            and seq.slot not in self.compactions
            and len(self.compactions) < MAX_COMPACTIONS
        )
        if lo < len(seq.request.prompt):
            # kept prompt tokens may now sit in a context they were not computed in (a shift keeps their K/V):
            # none of this slot's later pages may enter the index
            seq.share_blocked = True
        if lo < shared:  # copy-on-write by recompute: unmap from the page the cut falls in, re-encode from there
            lo = lo // self.cache.page_size * self.cache.page_size
            self.prefix.truncate(seq, lo // self.cache.page_size)
        if can_shift:
            self.compactions[seq.slot] = (seq, lo, hi, n)
            seq.cached, seq.pending = kept[: n - len(gone)], kept[n - len(gone) :]
        else:  # cut the cache at the first pruned slot; the kept suffix is written again at compacted positions
            seq.reencoded += n - lo - len(gone)
            seq.cached, seq.pending = kept[:lo], kept[lo:]

    # -- one step ----------------------------------------------------------------------------------
    def _edits(self, slots: list[SeqState | None]) -> steps.Edits:
        # a shift-mode engine always carries compaction slots (one compiled shape); a re-encode engine only
        # when a shift-mode request asked for one
        shift = self.reposition == "shift" or bool(self.compactions)
        edits = make_edits(slots, self.compactions, MAX_COMPACTIONS if shift else 0)
        self.compactions.clear()
        return edits

    def _sampling(self, rows: list[Row]) -> SamplingParams:
        host = SamplingParams.host(self.slots)
        for r in rows:
            q, i = r.seq.request, r.seq.slot
            host["temperature"][i], host["top_k"][i], host["top_p"][i] = q.temperature, q.top_k, q.top_p
            # draws in flight count: the draw index is the same whether the step before was read yet or not
            ahead = sum(f.samples and not f.void_sample for f in r.seq.flights)
            host["seed"][i], host["counter"][i] = q.seed, r.seq.sampled + ahead
        return SamplingParams(**host)

    def _kv_pages(self, rows: list[Row], edits: steps.Edits) -> int:
        ps = self.cache.page_size
        need = max([cdiv(r.seq.device_len + r.n, ps) for r in rows] + [cdiv(int(x), ps) for x in edits.length])
        # A few buckets, few compiles: powers of two from a 256-token window up to the page table's width.
        return min(pow2(need, lo=cdiv(MIN_KV_WINDOW, ps)), self.cache.max_pages_per_seq)

    def release(self, mask) -> None:
        """Free the masked slots now (no step carries the releases); their index pages stay cached."""
        borrowed = None if self.prefix is None else self.prefix.dev_borrowed.copy()
        self.cache = release(self.cache, mask, None, borrowed)
        if self.prefix is not None:
            self.prefix.dev_borrowed[np.asarray(mask)] = 0

    def _map_prefixes(self, slots: list[SeqState | None]) -> None:
        """Cached prefixes of newly admitted sequences go into their slots first (one ``map_prefix``)."""
        args = self.prefix.flush(slots)
        if args is not None:
            self._map(args)
            self.dispatches += 1

    def _map(self, args: tuple) -> None:
        if self.host_inputs is not None:
            args = jax.device_put(args, self.host_inputs)
        self.cache = map_prefix(self.cache, *args)

    @property
    def min_tokens(self) -> int:
        return min(MIN_DECODE_TOKENS, self.slots)

    def _evict_capacity(self, n_tokens: int) -> int:
        # evictions are bounded by the pages a step can reserve: a capacity the layout fixes anyway
        return 0 if self.prefix is None else cdiv(n_tokens, self.cache.page_size) + self.slots

    def launch(
        self, rows: list[Row], slots: list[SeqState | None], evict: int = 0, prev: Launched | None = None
    ) -> Launched:
        """Dispatch the step (edits + forward, and the sample unless a row needs a mask); returns at once.
        ``evict``: cached pages the prefix index hands back to the free stack first. ``prev``: the step in
        flight before it, whose samples (``SPEC`` in a row's chunk) are read on the device."""
        t0 = time.perf_counter()
        packed, N = pack_rows(rows, self.slots, min_tokens=self.min_tokens)
        edits = self._edits(slots)
        n_evict = self._evict_capacity(N)
        if self.prefix is not None:
            self._map_prefixes(slots)
            if evict:
                self.prefix.evict(evict)
            edits = dataclasses.replace(
                edits, borrowed=self.prefix.dev_borrowed.copy(), evict=self.prefix.take_evicted(n_evict)
            )
            self.prefix.sync(slots)  # after this step's releases, each slot holds its occupant's pages
        masked = any(r.samples and r.seq.controller.wants_mask for r in rows)
        kv_pages = self._kv_pages(rows, edits)
        want = self.prefix is not None and any(self.prefix.may_register(r.seq, r.n) for r in rows)
        sampling = self._sampling(rows)
        prev_tokens = prev.sampled if prev is not None else None
        # a pure decode step (no row feeds more than a token) takes the decode kernel: no price for raggedness
        # (one token alone costs the same either way: no second compiled variant for it)
        decode = N > 1 and bool(packed.q_len.max(initial=0) <= 1)
        out, mask = self._dispatch(packed, edits, sampling, kv_pages, masked, n_evict, prev_tokens, decode)
        return Launched(rows, out, mask, int(packed.cu_q_lens[-1]), N, want, launched_s=t0)

    def _no_prev(self) -> jax.Array:
        if self._zeros is None:
            z = np.zeros(self.slots, np.int32)
            self._zeros = jax.device_put(z, self.host_inputs) if self.host_inputs is not None else jax.device_put(z)
        return self._zeros

    def _dispatch(
        self,
        packed,
        edits: steps.Edits,
        sampling: SamplingParams,
        kv_pages: int,
        masked: bool,
        n_evict: int,
        prev=None,
        decode: bool = False,
    ):
        N = packed.tokens.shape[0]
        ints, floats = steps.flatten_inputs(packed, edits, sampling)
        if self.host_inputs is not None:  # on a mesh: whole on every device (and every process)
            ints, floats = jax.device_put((ints, floats), self.host_inputs)
        kw = dict(
            cfg=self.cfg,
            impl=self.impl,
            kv_pages=kv_pages,
            max_new_pages=cdiv(N, self.cache.page_size) + 1,
            layout=steps.flat_layout(N, self.slots, edits.slot.shape[0], n_evict, decode),
        )
        self.dispatches += 1
        prev = self._no_prev() if prev is None else prev  # always an array: one compiled variant per shape
        if masked:
            logits, flags, sampling, self.cache = steps.flat_logits_step(
                self.params, self.cache, ints, floats, prev, **kw
            )
            return (logits, flags, sampling), np.full((self.slots, self.words), -1, np.int32)
        tokens, flags, self.cache = steps.flat_generate_step(self.params, self.cache, ints, floats, prev, **kw)
        return (tokens, flags, None), None

    # -- compiling ahead of the first request ------------------------------------------------------
    def step_shapes(self, max_step_tokens: int) -> list[tuple[int, int, bool]]:
        """Every (packed length, KV window in pages, decode) a step of this engine can take: the token
        buckets up to the step budget times the power-of-two windows up to the page table's width; the
        lengths a pure decode step reaches (one token a slot at most) also in the decode variant."""
        ps, widest = self.cache.page_size, self.cache.max_pages_per_seq
        lengths = sorted({bucket(n) for n in range(self.min_tokens, bucket(max_step_tokens) + 1)})
        windows = sorted({min(pow2(p, lo=cdiv(MIN_KV_WINDOW, ps)), widest) for p in range(1, widest + 1)})
        most = bucket(max(self.slots, self.min_tokens))  # the longest pure decode step
        return [(n, w, d) for n in lengths for w in windows for d in (True, False) if 1 < n <= most or not d]

    def warm(self, n_tokens: int, kv_pages: int, *, masked: bool, shift: bool, decode: bool = False) -> None:
        """Run the step once at this shape on an idle cache, so its compile happens now and not under a
        request. No row has a token and every slot's length is 0: nothing is written, nothing allocated
        (cached prefix pages stay cached). Only while no sequence
        holds a slot (the edits release every slot)."""
        packed, _ = pack_rows([], self.slots, min_tokens=n_tokens)
        edits = make_edits([None] * self.slots, {}, MAX_COMPACTIONS if shift else 0)
        n_evict = self._evict_capacity(n_tokens)
        if self.prefix is not None:  # as ``launch`` with every slot free
            edits = dataclasses.replace(
                edits, borrowed=self.prefix.dev_borrowed.copy(), evict=self.prefix.take_evicted(n_evict)
            )
            self.prefix.sync([None] * self.slots)
            self._warm_prefix_maps()
        sampling = SamplingParams(**SamplingParams.host(self.slots))
        out, mask = self._dispatch(packed, edits, sampling, kv_pages, masked, n_evict, decode=decode)
        step = Launched([], out, mask, 0, n_tokens)
        self.sample(step)
        jax.block_until_ready(step.sampled)

    def _warm_prefix_maps(self) -> None:
        """Compile ``map_prefix`` for every count of slots one step can map (powers of two up to the slots),
        mapping nothing (every slot id is padding), so that a request's first prefix hit never waits on it."""
        if self._maps_warm:
            return
        k = 1
        while k <= pow2(self.slots):
            self._map(self.prefix.map_args([], self.slots, k))
            k *= 2
        self._maps_warm = True

    def sample(self, step: Launched) -> None:
        """The sample dispatch of a masked step (its masks filled); the step's tokens stay on the device."""
        first, _, sampling = step.out
        if step.mask is not None:
            mask = step.mask if self.host_inputs is None else jax.device_put(step.mask, self.host_inputs)
            first = steps.sample_step(first, sampling, mask)
            self.dispatches += 1
        step.sampled = first

    def collect(self, step: Launched) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The one sync of a sampled step: (tokens [S], non-finite [S], oom [S], the page table when a
        prompt page may enter the prefix index, else None: read before any later step takes the cache)."""
        pt = self.cache.page_table if step.want_pages else None
        tokens, flags, pt = jax.device_get((step.sampled, step.out[1], pt))
        return tokens, (flags & 1) != 0, (flags & 2) != 0, pt


def make_edits(slots: list[SeqState | None], compactions: dict, capacity: int) -> steps.Edits:
    """Every slot's length as the host sees it, steps in flight included (0 for a free slot: its pages go
    back; less than the device holds for a row a controller voided: the write is cut), and the pending
    compactions of slots whose sequence still holds them (``capacity`` entries, unused ones empty)."""
    lengths = np.array([s.device_len if s is not None else 0 for s in slots], np.int32)
    comp = np.zeros((4, capacity), np.int32)
    live = [(slot, c) for slot, c in compactions.items() if slots[slot] is c[0]]
    for i, (slot, (_, start, end, length)) in enumerate(live):
        comp[:, i] = slot, start, end, length
    return steps.Edits(lengths, *comp)


def pack_rows(rows: list[Row], num_slots: int, min_tokens: int = 1) -> tuple[steps.Packed, int]:
    """One row per cache slot (q_len 0 where a slot has no chunk); tokens back to back, padded to a bucket."""
    q_len = np.zeros(num_slots, np.int32)
    chunks: list[list[int]] = [[] for _ in range(num_slots)]
    for r in rows:
        q_len[r.seq.slot] = r.n
        f = r.seq.flight
        chunks[r.seq.slot] = r.seq.pending[f : f + r.n]  # may end in SPEC (-1): read on the device
    total = int(q_len.sum())
    N = bucket(max(total, min_tokens))
    tokens = np.zeros(N, np.int32)
    tokens[:total] = [t for c in chunks for t in c]
    token_row = np.zeros(N, np.int32)
    token_row[:total] = np.repeat(np.arange(num_slots, dtype=np.int32), q_len)
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    return steps.Packed(tokens, token_row, np.arange(num_slots, dtype=np.int32), q_len, cu), N
