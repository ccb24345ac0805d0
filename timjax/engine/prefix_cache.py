"""Prefix caching: full KV pages of prompt tokens computed once and shared by every request that starts
with the same tokens (vLLM's automatic prefix caching, one node per full page). Host only, no JAX.

The index maps a chain key, ``(parent node id, the page's token ids)`` rooted at a salt (what changes the
KV beyond the tokens: the weights, the dtype, the page size, the position mode), to a physical page. Keys
compare the whole token tuple, so two different prefixes never collide; node ids are never reused, so a
child of an evicted page can never be reached through a new page that took its parent's place.

Ownership (``timjax.runtime.cache``): a page is free, owned by one slot, or held by the index. A slot maps
its index pages as its leading ``borrowed`` pages, read-only: it writes, prunes and compacts only past them
(the runner cuts a prune that reaches into them down to a page boundary and re-encodes from there: the
copy-on-write is a recompute into the slot's own pages). A slot's own full prompt pages enter the index
after the step that wrote them, while the slot still holds them; a partly filled page never does, nor does
any token past the prompt (generated reasoning, pruned subtasks). Each index page counts the slots that
map it; one that no slot maps is evictable and stays cached until the allocator needs it (LRU order).

The device learns of all this through the step's edits (``borrowed``: each slot's index pages, so a release
in that step leaves them cached; ``evict``: pages back to the free stack) and, on a step that admits a hit,
``timjax.runtime.cache.map_prefix`` dispatched just before it (mapping the cached pages into the new slots).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from typing import Any

import numpy as np

from timjax.base.buckets import pow2
from timjax.engine.protocol import SeqState


@dataclasses.dataclass(eq=False)
class Node:
    key: tuple
    page: int  # the physical page (the page table's value)
    id: int
    refs: int = 0  # slots that map it


class PrefixCache:
    """The content index of one KV pool. ``salt``: what besides token ids changes a page's K/V for this
    pool (the pool belongs to one engine, so one set of weights); ``mode``: the engine's position mode
    (a request's ``reposition`` overrides it in the key)."""

    def __init__(self, *, page_size: int, num_slots: int, max_pages_per_seq: int, salt: Any, mode: str):
        self.ps = page_size
        self.max_pages = max_pages_per_seq
        self.salt = salt
        self.mode = mode
        self.index: dict[tuple, Node] = {}
        self.by_page: dict[int, Node] = {}
        self.lru: OrderedDict[int, Node] = OrderedDict()  # unreferenced pages, least recently used first
        self._ids = itertools.count(1)
        self.dev_borrowed = np.zeros(num_slots, np.int32)  # the device's borrowed count per slot occupant
        self.maps: dict[int, tuple[SeqState, list[int]]] = {}  # slot -> (sequence, pages) for the next step
        self.evicted: list[int] = []  # pages to hand back to the free stack with the next step
        self.hit_tokens_total = 0
        self.evictions_total = 0

    # -- counts the scheduler reads -----------------------------------------------------------------
    @property
    def held(self) -> int:
        """Pages the index holds (out of the free stack until evicted)."""
        return len(self.by_page)

    @property
    def referenced(self) -> int:
        """Index pages some slot maps: not reclaimable."""
        return len(self.by_page) - len(self.lru)

    def _root(self, seq: SeqState) -> tuple:
        return ("root", self.salt, seq.request.reposition or self.mode)

    def _parent(self, seq: SeqState, k: int) -> Any:
        return seq.shared[k - 1].id if k else self._root(seq)

    # -- admission -----------------------------------------------------------------------------------
    def lookup(self, seq: SeqState) -> list[Node]:
        """The longest run of cached full pages ``seq.pending`` starts with, leaving at least its last token
        to compute (the step's sample needs a fed token; a partial last page is never shared anyway)."""
        toks, ps = seq.pending, self.ps
        parent: Any = self._root(seq)
        hit: list[Node] = []
        for k in range(min((len(toks) - 1) // ps, self.max_pages)):
            node = self.index.get((parent, tuple(toks[k * ps : (k + 1) * ps])))
            if node is None:
                break
            hit.append(node)
            parent = node.id
        return hit

    @staticmethod
    def reclaimable(nodes: list[Node]) -> int:
        """How many of ``nodes`` are evictable now (mapping them takes them out of the free count)."""
        return sum(n.refs == 0 for n in nodes)

    def acquire(self, seq: SeqState, nodes: list[Node]) -> None:
        """Map ``nodes`` as the first pages of ``seq``'s (new) slot: its pending tokens they hold become cached."""
        assert seq.slot is not None and not seq.cached and not seq.shared, "a hit is mapped only at admission"
        for n in nodes:
            n.refs += 1
            self.lru.pop(n.page, None)
        seq.shared = list(nodes)
        h = len(nodes) * self.ps
        seq.cached, seq.pending = seq.pending[:h], seq.pending[h:]
        if not seq.generated and not seq.preemptions:  # the first admission: these are prompt tokens
            seq.cached_prompt = h
        self.maps[seq.slot] = (seq, [n.page for n in nodes])
        self.hit_tokens_total += h

    # -- leaving -------------------------------------------------------------------------------------
    def truncate(self, seq: SeqState, pages: int) -> None:
        """Drop ``seq``'s references past its first ``pages`` index pages (a prune reached into them)."""
        for n in reversed(seq.shared[pages:]):  # the tail first: evicted before the pages it extends
            n.refs -= 1
            assert n.refs >= 0, "an index page lost more references than it had"
            if n.refs == 0:
                self.lru[n.page] = n
        del seq.shared[pages:]

    def release(self, seq: SeqState) -> None:
        """Preemption, cancel, finish: drop every reference; the content stays cached (evictable)."""
        self.truncate(seq, 0)
        seq.share_blocked = False

    def evict(self, n: int) -> None:
        """Reclaim ``n`` unreferenced pages, least recently used first."""
        assert n <= len(self.lru), f"asked to evict {n} pages, {len(self.lru)} are evictable"
        for _ in range(n):
            page, node = self.lru.popitem(last=False)
            del self.index[node.key], self.by_page[page]
            self.evicted.append(page)
        self.evictions_total += n

    # -- registering a slot's own prompt pages -------------------------------------------------------
    def may_register(self, seq: SeqState, n: int) -> bool:
        """Whether writing ``n`` more tokens completes a prompt page ``seq`` could enter in the index."""
        full = min(len(seq.cached) + n, len(seq.request.prompt)) // self.ps
        return not seq.share_blocked and full > len(seq.shared) and len(seq.shared) < self.max_pages

    def register(self, seq: SeqState, row: np.ndarray) -> None:
        """Enter ``seq``'s full prompt pages past its index pages (``row``: its slot's page table row, read
        after the step that wrote them). A page whose content another slot entered first stays private, and
        so do the pages after it (a slot's index pages are a leading run)."""
        ps, prompt = self.ps, seq.request.prompt
        full = min(len(seq.cached), len(prompt)) // ps
        while not seq.share_blocked and len(seq.shared) < full:
            k = len(seq.shared)
            toks = tuple(seq.cached[k * ps : (k + 1) * ps])
            key = (self._parent(seq, k), toks)
            if key in self.index or toks != tuple(prompt[k * ps : (k + 1) * ps]):
                seq.share_blocked = True
                break
            node = Node(key, int(row[k]), next(self._ids), refs=1)
            assert node.page not in self.by_page, f"page {node.page} entered the index twice"
            self.index[key] = self.by_page[node.page] = node
            seq.shared.append(node)
        if seq.slot is not None:
            self.dev_borrowed[seq.slot] = max(self.dev_borrowed[seq.slot], len(seq.shared))

    # -- the device edits ----------------------------------------------------------------------------
    def flush(self, slots: list[SeqState | None]) -> tuple | None:
        """Arguments for ``timjax.runtime.cache.map_prefix`` (None when nothing is to map): the maps of slots
        still held by the sequence admitted into them."""
        maps = [(slot, pages) for slot, (seq, pages) in self.maps.items() if slots[slot] is seq]
        self.maps.clear()
        if not maps:
            return None
        args = self.map_args(maps, len(slots), pow2(len(maps)))
        for slot, p in maps:
            self.dev_borrowed[slot] = len(p)
        return args

    def map_args(self, maps: list[tuple[int, list[int]]], num_slots: int, k: int) -> tuple:
        """``map_prefix``'s arguments for ``maps`` (slot, its pages), padded to ``k`` rows (padding: a slot id
        out of range, dropped). With no maps, a call that maps nothing (what warmup compiles)."""
        slot_ids = np.full(k, num_slots, np.int32)
        pages = np.zeros((k, self.max_pages), np.int32)
        n = np.zeros(k, np.int32)
        for i, (slot, p) in enumerate(maps):
            slot_ids[i], n[i] = slot, len(p)
            pages[i, : len(p)] = p
        return self.dev_borrowed.copy(), slot_ids, pages, n

    def take_evicted(self, capacity: int) -> np.ndarray:
        """The evicted pages for the next step's edits, padded with -1 to ``capacity``."""
        assert len(self.evicted) <= capacity, f"{len(self.evicted)} evictions, the step carries {capacity}"
        out = np.full(capacity, -1, np.int32)
        out[: len(self.evicted)] = self.evicted
        self.evicted = []
        return out

    def sync(self, slots: list[SeqState | None]) -> None:
        """After a release reached the device: each slot's count is its occupant's (0 when free)."""
        self.dev_borrowed[:] = [len(s.shared) if s is not None else 0 for s in slots]

    def pages(self) -> set[int]:
        """Every page the index holds (tests: ``timjax.runtime.cache.check_invariants``)."""
        return set(self.by_page)

    def check(self, live: list[SeqState]) -> None:
        """Host audit (tests): each index page's count is the number of live slots that map it."""
        counts: dict[int, int] = {}
        for s in live:
            assert s.slot is not None or not s.shared, "a sequence without a slot keeps index pages"
            for n in s.shared:
                counts[n.page] = counts.get(n.page, 0) + 1
        for page, node in self.by_page.items():
            assert node.refs == counts.get(page, 0), (
                f"page {page}: {node.refs} references, {counts.get(page, 0)} owners"
            )
            assert (node.refs == 0) == (page in self.lru), f"page {page}: refs {node.refs} but LRU membership wrong"
            assert self.index[node.key] is node
        assert set(self.lru) <= set(self.by_page)
