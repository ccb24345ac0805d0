"""The scheduler: admission, the per-step token budget, preemption and parking. Host only, no JAX.

Admission is bounded by a batch cap (the cache's slots) and by free pages, not by a worst-case slot
size: a request is admitted when its pending tokens (a prompt, or the working memory of a preempted
sequence) fit the free pages beside the running ones. Each step packs every running sequence's next
chunk: decode rows (one token) first, then extend rows oldest first, within ``max_step_tokens``; a long
prompt is chunked, so decode rows never wait behind it. When the pages run out the scheduler preempts the
newest sequence (vLLM's policy): its pages are freed, its tokens and controller state kept, and it goes
back to the head of the queue to resume by writing its working memory again. A sequence fails for lack of
pages only when its working memory alone needs more than the whole pool.

The scheduler sees pages through the page size and the tokens each slot caches: the device allocator
(``timjax.runtime.cache``) grants exactly ``cdiv(length, page_size)`` pages per slot, so the host's count is
exact without reading the device. With prefix caching (``timjax.engine.prefix_cache``) a slot's leading
index pages are not its own: each cached page is counted once, and unreferenced cached pages count as
free (they are evicted, least recently used first, when a step needs them). A request admitted with a hit
maps the cached pages of its longest cached prefix and computes only the rest.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from timjax.base.buckets import bucket, cdiv
from timjax.engine.prefix_cache import PrefixCache
from timjax.engine.protocol import SPEC, SeqState


@dataclasses.dataclass
class Row:
    seq: SeqState
    n: int  # tokens of ``seq.pending`` written this step (after the ``seq.flight`` ones in flight)
    samples: bool  # the chunk ends the pending tokens: the step's sample is the sequence's next token
    # set while the step is in flight (overlap), when the controller's answer to the sample before shows the
    # speculation wrong: ``void``: nothing of the row is kept (the next edits cut its write); ``void_sample``:
    # the write is kept, the sample is not (forced tokens come first)
    void: bool = False
    void_sample: bool = False


@dataclasses.dataclass
class Plan:
    rows: list[Row]
    failed: list[tuple[SeqState, str]]  # sequences that can never fit the pool
    preempted: list[SeqState]


class Scheduler:
    def __init__(
        self,
        *,
        slots: int,
        max_batch: int,
        num_pages: int,
        page_size: int,
        max_step_tokens: int,
        prefix: PrefixCache | None = None,
    ):
        self.prefix = prefix
        self.slots: list[SeqState | None] = [None] * slots
        self.max_batch = max_batch
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_step_tokens = max_step_tokens
        self.waiting: deque[SeqState] = deque()
        self.parked_waiting: list[SeqState] = []  # preempted while parked: not admitted until unparked

    # -- state ------------------------------------------------------------------------------------
    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    @property
    def resident(self) -> list[SeqState]:
        return [s for s in self.slots if s is not None]

    def live(self) -> list[SeqState]:
        """Every unfinished sequence: resident, waiting or parked."""
        return self.resident + list(self.waiting) + self.parked_waiting

    def pages(self, seq: SeqState, extra: int = 0) -> int:
        """The slot's own pages (its index pages are counted once, by the index) with ``extra`` more tokens."""
        return cdiv(seq.device_len + extra, self.page_size) - len(seq.shared)

    def used_pages(self) -> int:
        """Pages not reclaimable: slots' own pages and index pages some slot maps."""
        return sum(self.pages(s) for s in self.resident) + (self.prefix.referenced if self.prefix else 0)

    def free_pages(self) -> int:
        return self.num_pages - self.used_pages()

    def evictions(self, rows: list[Row]) -> int:
        """Cached pages to reclaim so the free stack covers this step's rows (the stack holds neither
        slots' pages nor cached ones)."""
        if self.prefix is None:
            return 0
        n = {id(r.seq): r.n for r in rows}
        own = sum(self.pages(s, n.get(id(s), 0)) for s in self.resident)
        return max(0, own + self.prefix.held - self.num_pages)

    def remove(self, seq: SeqState) -> None:
        """Forget a finished sequence (its slot's pages are released by the next step's edits)."""
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        if self.prefix is not None:
            self.prefix.release(seq)
        for queue in (self.waiting, self.parked_waiting):
            if seq in queue:
                queue.remove(seq)

    def unpark(self, seq: SeqState) -> None:
        seq.parked = False
        if seq in self.parked_waiting:
            self.parked_waiting.remove(seq)
            self._requeue(seq)

    def preempt(self, seq: SeqState) -> None:
        """Free the sequence's slot and pages; its working memory is written again when it resumes."""
        self.slots[seq.slot] = None
        seq.slot = None
        if self.prefix is not None:
            self.prefix.release(seq)  # the cached prefix stays in the index; it may hit again on resume
        for row in seq.flights:  # a step in flight wrote for it: dropped (its sample is drawn again on resume)
            row.void = True
        seq.flights = []
        seq.pending = seq.cached + [t for t in seq.pending if t != SPEC]
        seq.cached = []
        seq.preemptions += 1
        if seq.parked:
            self.parked_waiting.append(seq)
        else:
            self._requeue(seq)

    def _requeue(self, seq: SeqState) -> None:
        # Older sequences resume first: the queue stays ordered by request index at its head.
        i = 0
        while i < len(self.waiting) and self.waiting[i].index < seq.index:
            i += 1
        self.waiting.insert(i, seq)

    def too_big(self, seq: SeqState) -> str | None:
        n = seq.working_tokens - seq.pending[-1:].count(SPEC)  # a sample in flight is judged after its sync
        need = cdiv(n, self.page_size)
        if need > self.num_pages:
            return (
                f"its working memory of {n} tokens needs {need} KV pages, more than the whole "
                f"pool of {self.num_pages} pages of {self.page_size} tokens (raise kv_tokens)"
            )
        return None

    # -- one step ---------------------------------------------------------------------------------
    def plan(self) -> Plan:
        failed = [(s, msg) for s in self.resident if (msg := self.too_big(s))]
        for s, _ in failed:
            self.remove(s)
        rows = self._budget()
        preempted, free = self._fit_pages(rows)
        self._admit(rows, failed, free)
        self._fill_bucket(rows)
        return Plan(rows, failed, preempted)

    def _want(self, s: SeqState) -> int:
        # A parked sequence writes all but its last pending token: the sample after the last one waits.
        return s.unfed - 1 if s.parked else s.unfed

    def _budget(self) -> list[Row]:
        """Decode rows first, then extend rows oldest first, within the step's token budget."""
        running = sorted((s for s in self.resident if self._want(s) > 0), key=lambda s: s.index)
        decode, extend = [], []
        for s in running:
            (decode if self._want(s) == 1 and not s.parked else extend).append(s)
        rows, budget = [], self.max_step_tokens
        for s in decode + extend:
            n = min(self._want(s), budget)
            if n > 0:
                rows.append(Row(s, n, samples=n == s.unfed))
                budget -= n
        return rows

    def _fit_pages(self, rows: list[Row]) -> tuple[list[SeqState], int]:
        """Oldest first, give each row its pages; short of pages, an extend chunk shrinks to what fits, else
        the newest resident sequence is preempted (possibly the row itself). Returns the preempted and the
        pages left free once the rows have theirs."""
        preempted: list[SeqState] = []
        free = self.free_pages()  # counted once (a sum over the resident): per row only what changes
        ps = self.page_size
        for row in sorted(rows, key=lambda r: r.seq.index):
            s = row.seq
            while s.slot is not None:
                d = s.device_len
                need = -(-(d + row.n) // ps) - -(-d // ps)  # its index pages cancel out
                if need <= free:
                    free -= need
                    break
                fits = (cdiv(s.device_len, self.page_size) + free) * self.page_size - s.device_len
                if row.n > 1 and fits >= 1:
                    row.n, row.samples = fits, False
                    continue
                if row.n == s.unfed and s.pending[-1] == SPEC:
                    row.n = 0  # a speculative row preempts nobody: it waits for its sample's sync instead
                    break
                victim = max(self.resident, key=lambda v: v.index)
                before = self.free_pages()
                self.preempt(victim)  # frees its own pages, and the cached ones only it mapped
                free += self.free_pages() - before
                preempted.append(victim)
        rows[:] = [r for r in rows if r.seq.slot is not None and r.n > 0]
        return preempted, free

    def _admit(self, rows: list[Row], failed: list, free: int) -> None:
        """Waiting sequences into free slots while the step's budget and ``free`` pages allow."""
        budget = self.max_step_tokens - sum(r.n for r in rows)
        while self.waiting and budget > 0 and len(self.resident) < self.max_batch:
            s = self.waiting[0]
            if msg := self.too_big(s):
                self.waiting.popleft()
                failed.append((s, msg))
                continue
            # The whole pending (a prompt, a resumed working memory) must fit beside the others, with a page
            # of headroom per running sequence, unless nothing else runs. Cached pages of its prefix are
            # mapped, not allocated; mapping evictable ones takes them out of the free count.
            hit = self.prefix.lookup(s) if self.prefix is not None else []
            lost = PrefixCache.reclaimable(hit)
            headroom = len(self.resident)
            if self.resident and cdiv(len(s.pending), self.page_size) - len(hit) + lost + headroom > free:
                break
            self.waiting.popleft()
            s.slot = self.slots.index(None)
            self.slots[s.slot] = s
            if hit:
                self.prefix.acquire(s, hit)
                free -= lost
            n = min(len(s.pending), budget, free * self.page_size)
            if n <= 0:
                break
            rows.append(Row(s, n, samples=n == len(s.pending)))
            budget -= n
            free -= self.pages(s, n)

    def _fill_bucket(self, rows: list[Row]) -> None:
        """Padding to the token bucket would be computed anyway: give it to chunked extend rows instead."""
        total = sum(r.n for r in rows)
        spare = min(bucket(total), self.max_step_tokens) - total
        if spare <= 0:
            return
        free = self.free_pages() - sum(self.pages(r.seq, r.n) - self.pages(r.seq) for r in rows)
        for r in sorted(rows, key=lambda r: r.seq.index):
            more = min(self._want(r.seq) - r.n, spare)
            if more <= 0:
                continue
            extra_pages = self.pages(r.seq, r.n + more) - self.pages(r.seq, r.n)
            if extra_pages > free:
                continue
            r.n += more
            r.samples = r.n == r.seq.unfed
            spare -= more
            free -= extra_pages
            if spare == 0:
                break
