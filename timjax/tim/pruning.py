"""Subtask pruning policy (FIFO buffer) and the working-memory map (host side, no JAX).

Per sequence the engine does::

    for each new token t (sampled, forced, or a Split replacement):
        grammar.consume([t]); events = tracker.feed(t, bytes_of(t)); wm.append(t)
        for ev in events of type ListCompleted:
            for lst in buffer.push(ev):
                op = wm.prune(lst.token_span)   # -> PruneOp: remove cache slots [start, end)
                ... K/V: drop [start_slot, end_slot), move/re-encode the suffix [end_slot, old_len)
                    to start at start_slot (positions shift by -op.n_pruned)

History indices count every generated/forced token from 0 (the tracker's token indices); cache slots
count from 0 at the first prompt token, so slot = prompt_len + rank among kept history tokens.
Because pruning keeps order, the kept tokens of any history span are contiguous in cache space, so
a ``PruneOp`` is one slot range even when part of the span (an inner list) was pruned before.

``full_response`` rebuilds the complete tree (pruned subtasks included) from the tracker's history;
``pruned_task_paths`` says whose subtask lists were pruned (for display).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .schema import Response, TimSchema
from .tree import ListCompleted, TreeTracker

__all__ = [
    "PruneBuffer",
    "PruneOp",
    "WorkingMemory",
    "WorkingMemoryStats",
    "full_response",
    "kept_bytes",
    "pruned_task_paths",
]


class PruneBuffer:
    """FIFO of completed subtask lists.

    ``size=None``: pruning off (``push`` never returns anything). ``size=0``: prune each list as soon as
    it completes. Otherwise, when more than ``size`` lists are buffered, the oldest are popped and
    returned for pruning. When a popped list contains buffered lists (nested, by token span), those are
    dropped from the buffer without being returned (they are gone with it). Lists pruned earlier and
    lying inside a later one are not returned again (``WorkingMemory.prune`` only removes what is still
    there, so nothing is counted twice).
    """

    def __init__(self, size: Optional[int]):
        if size is not None and size < 0:
            raise ValueError("size must be None or >= 0")
        self.size = size
        self._buf: deque[ListCompleted] = deque()
        self.pruned: list[ListCompleted] = []  # in pruning order
        self.absorbed: list[ListCompleted] = []  # dropped from the buffer inside a pruned list
        self.completed: list[ListCompleted] = []

    @property
    def buffered(self) -> list[ListCompleted]:
        return list(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def push(self, lst: ListCompleted) -> list[ListCompleted]:
        self.completed.append(lst)
        if self.size is None:
            return []
        if any(p.contains(lst) for p in self.pruned):
            self.absorbed.append(lst)  # already gone with an enclosing list
            return []
        self._buf.append(lst)
        out: list[ListCompleted] = []
        while len(self._buf) > self.size:
            old = self._buf.popleft()
            inner = [b for b in self._buf if old.contains(b)]
            for b in inner:
                self._buf.remove(b)
                self.absorbed.append(b)
            self.pruned.append(old)
            out.append(old)
        return out

    def flush(self) -> list[ListCompleted]:
        """Pop everything still buffered (e.g. to measure the all-pruned working memory)."""
        out = []
        while self._buf:
            old = self._buf.popleft()
            for b in [b for b in self._buf if old.contains(b)]:
                self._buf.remove(b)
                self.absorbed.append(b)
            self.pruned.append(old)
            out.append(old)
        return out


@dataclass(frozen=True)
class PruneOp:
    """Remove cache slots ``[start_slot, end_slot)``; slots ``[end_slot, old_len)`` move down to
    ``start_slot`` (their positions decrease by ``n_pruned``). ``n_pruned == 0`` means nothing to do."""

    history_span: tuple[int, int]
    start_slot: int
    end_slot: int
    old_len: int

    @property
    def n_pruned(self) -> int:
        return self.end_slot - self.start_slot

    @property
    def new_len(self) -> int:
        return self.old_len - self.n_pruned

    @property
    def suffix(self) -> tuple[int, int]:
        """Old slot range of the tokens that move (re-encode or rotate them)."""
        return (self.end_slot, self.old_len)


@dataclass(frozen=True)
class WorkingMemoryStats:
    prompt_len: int
    history_len: int  # tokens ever appended (generated + forced)
    working_len: int  # cache slots in use now (prompt included)
    peak_working_len: int
    pruned_tokens: int
    prune_ops: int

    @property
    def pruned_fraction(self) -> float:
        return self.pruned_tokens / self.history_len if self.history_len else 0.0


class WorkingMemory:
    """History token index -> cache slot map for one sequence."""

    def __init__(self, prompt: Sequence[int] = ()):
        self.prompt = [int(t) for t in prompt]
        self.history: list[int] = []  # token ids, every token ever appended
        self._kept: list[int] = []  # history indices in cache order (sorted)
        self._peak = len(self.prompt)
        self._pruned = 0
        self._ops = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def __len__(self) -> int:
        return len(self.prompt) + len(self._kept)

    def append(self, token_id: int) -> int:
        """Add the next history token; returns its cache slot."""
        h = len(self.history)
        self.history.append(int(token_id))
        self._kept.append(h)
        self._peak = max(self._peak, len(self))
        return len(self) - 1

    def extend(self, token_ids: Iterable[int]) -> None:
        for t in token_ids:
            self.append(t)

    def slot(self, h: int) -> Optional[int]:
        """Cache slot of history token ``h``, or None if it was pruned."""
        if not 0 <= h < len(self.history):
            raise IndexError(h)
        i = bisect.bisect_left(self._kept, h)
        if i < len(self._kept) and self._kept[i] == h:
            return len(self.prompt) + i
        return None

    def slots(self) -> list[Optional[int]]:
        out: list[Optional[int]] = [None] * len(self.history)
        for i, h in enumerate(self._kept):
            out[h] = len(self.prompt) + i
        return out

    def prune(self, span: tuple[int, int] | ListCompleted) -> PruneOp:
        if isinstance(span, ListCompleted):
            span = span.token_span
        a, b = int(span[0]), int(span[1])
        if not 0 <= a <= b <= len(self.history):
            raise ValueError(f"span {span} outside history of {len(self.history)} tokens")
        lo = bisect.bisect_left(self._kept, a)
        hi = bisect.bisect_left(self._kept, b)
        old = len(self)
        op = PruneOp((a, b), len(self.prompt) + lo, len(self.prompt) + hi, old)
        if hi > lo:
            del self._kept[lo:hi]
            self._pruned += hi - lo
            self._ops += 1
        return op

    def kept_history(self) -> list[int]:
        return list(self._kept)

    def kept_tokens(self, include_prompt: bool = True) -> list[int]:
        gen = [self.history[h] for h in self._kept]
        return self.prompt + gen if include_prompt else gen

    def stats(self) -> WorkingMemoryStats:
        return WorkingMemoryStats(
            prompt_len=len(self.prompt),
            history_len=len(self.history),
            working_len=len(self),
            peak_working_len=self._peak,
            pruned_tokens=self._pruned,
            prune_ops=self._ops,
        )


def kept_bytes(tracker: TreeTracker, wm: WorkingMemory) -> bytes:
    """The generated text in working memory (cache order), from the tracker's token bytes."""
    return b"".join(tracker.token_bytes(h) for h in wm.kept_history())


def full_response(schema: TimSchema, tracker: TreeTracker) -> Response:
    """The full tree, pruned subtasks included (parses every byte ever generated)."""
    return schema.parse(bytes(tracker.buf))


def pruned_task_paths(pruned: Iterable[ListCompleted]) -> set[tuple[int, ...]]:
    """Paths of the tasks whose ``subtasks`` list was pruned (absorbed inner lists included if passed)."""
    return {p.task_path for p in pruned}
