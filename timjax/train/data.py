"""Training data for SFT: corpus documents as the runtime writes them, pruned views, packed rows.

``build_segments`` turns problems into training sequences (``runtime_view``): each document is written
once with pruning off and, with the configured probabilities, with prune buffers 0/1/2 (each of those
gives one sequence per stretch between prune events, at compacted positions). ``pack`` puts sequences
into fixed-length rows: per-token segment ids (the attention never crosses a sequence) and positions that
restart at 0 for every sequence, as the runtime's positions do.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from timjax.train.corpus import Problem, document_text
from timjax.train.runtime_view import Replayer, Segment, pruned_segments
from timjax.train.tools_adapter import ToolBackend


@dataclass
class Packed:
    tokens: np.ndarray  # int32 [R, L]
    positions: np.ndarray  # int32 [R, L]
    segments: np.ndarray  # int32 [R, L] (0 = padding)
    loss: np.ndarray  # float32 [R, L]: weight of predicting tokens[:, j + 1] at j
    dropped: int = 0  # sequences longer than a row (reported, never cut)

    def save(self, path: str) -> None:
        import os

        tmp = f"{path}.tmp.npz"
        np.savez_compressed(
            tmp,
            tokens=self.tokens,
            positions=self.positions,
            segments=self.segments,
            loss=self.loss,
            dropped=np.int64(self.dropped),
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Packed:
        z = np.load(path)
        return cls(z["tokens"], z["positions"], z["segments"], z["loss"], int(z["dropped"]))

    @property
    def n_rows(self) -> int:
        return self.tokens.shape[0]


def build_segments(
    probs: Sequence[Problem],
    replayer: Replayer,
    tools: ToolBackend,
    buffers: Sequence[tuple[int | None, float]],
    seed: int,
    *,
    progress: bool = True,
) -> list[Segment]:
    """Training sequences for ``probs``: each document with pruning off, plus the pruned views of one
    buffer drawn from ``buffers`` ((buffer, probability) pairs; the rest of the mass: none)."""
    rng = random.Random(f"segments:{seed}")
    out: list[Segment] = []
    for p in tqdm(probs, desc="corpus", unit="doc", disable=not progress, mininterval=2.0):
        doc = replayer.replay(p.question, document_text(p, tools))
        out.extend(pruned_segments(doc, None))
        r, acc = rng.random(), 0.0
        for buf, prob in buffers:
            acc += prob
            if r < acc:
                segs = pruned_segments(doc, buf)
                if len(segs) > 1:  # a buffer that never prunes this document gives the same sequence again
                    out.extend(segs)
                break
    return out


def bucketed(segments: Iterable[Segment], seq_lens: Sequence[int], seed: int, *, pad_id: int = 0) -> list[Packed]:
    """Bucketing + packing: each sequence goes to the shortest bucket it fits, then is packed there (dense
    attention costs T^2 per row, so short sequences are not packed into long rows). Sequences longer
    than the longest bucket are counted in the last bucket's ``dropped``."""
    seq_lens = sorted(seq_lens)
    groups: list[list[Segment]] = [[] for _ in seq_lens]
    too_long = 0
    for s in segments:
        k = next((i for i, L in enumerate(seq_lens) if len(s.ids) <= L), None)
        if k is None:
            too_long += 1
        else:
            groups[k].append(s)
    out = [pack(g, L, seed + i, pad_id=pad_id) for i, (g, L) in enumerate(zip(groups, seq_lens))]
    out[-1].dropped += too_long
    return out


class Batches:
    """Micro-batch ``m`` of a run over bucketed rows: every epoch, each bucket's rows are permuted and cut
    into batches of ``rows_per_batch[bucket]``, and the batches of all buckets are shuffled together
    (all seeded: the batch of a step never depends on how the run got there)."""

    def __init__(self, buckets: Sequence[Packed], tokens_per_batch: int, seed: int):
        self.buckets = list(buckets)
        self.sizes = [max(1, tokens_per_batch // b.tokens.shape[1]) for b in self.buckets]
        self.seed = seed
        self._plan: tuple[int, list] | None = None
        if not any(b.n_rows >= s for b, s in zip(self.buckets, self.sizes)):
            raise ValueError(
                f"no bucket has enough rows for one batch (rows {[b.n_rows for b in self.buckets]}, "
                f"batch rows {self.sizes})"
            )

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if self._plan is None or self._plan[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for k, (b, size) in enumerate(zip(self.buckets, self.sizes)):
                perm = rng.permutation(b.n_rows)
                batches += [(k, np.sort(perm[i * size : (i + 1) * size])) for i in range(b.n_rows // size)]
            order = rng.permutation(len(batches))
            self._plan = (epoch, [batches[i] for i in order])
        return self._plan[1]

    @property
    def per_epoch(self) -> int:
        return len(self.plan(0))

    def get(self, micro: int):
        epoch, i = divmod(micro, self.per_epoch)
        k, idx = self.plan(epoch)[i]
        b = self.buckets[k]
        return (b.tokens[idx], b.positions[idx], b.segments[idx], b.loss[idx])


def save_buckets(buckets: Sequence[Packed], path: str) -> None:
    import os

    arrays = {}
    for i, b in enumerate(buckets):
        arrays.update(
            {
                f"tokens_{i}": b.tokens,
                f"positions_{i}": b.positions,
                f"segments_{i}": b.segments,
                f"loss_{i}": b.loss,
                f"dropped_{i}": np.int64(b.dropped),
            }
        )
    tmp = f"{path}.tmp.npz"
    np.savez_compressed(tmp, n=np.int64(len(buckets)), **arrays)
    os.replace(tmp, path)


def load_buckets(path: str) -> list[Packed]:
    z = np.load(path)
    return [
        Packed(z[f"tokens_{i}"], z[f"positions_{i}"], z[f"segments_{i}"], z[f"loss_{i}"], int(z[f"dropped_{i}"]))
        for i in range(int(z["n"]))
    ]


def pack(segments: Iterable[Segment], seq_len: int, seed: int, *, pad_id: int = 0, window: int = 16) -> Packed:
    """Pack sequences into rows of ``seq_len`` (shuffled, next-fit over a few open rows)."""
    segs = list(segments)
    random.Random(f"pack:{seed}").shuffle(segs)
    rows: list[list[Segment]] = []
    room: list[int] = []
    open_rows: list[int] = []
    dropped = 0
    for s in segs:
        n = len(s.ids)
        if n > seq_len:
            dropped += 1
            continue
        hit = next((r for r in open_rows if room[r] >= n), None)
        if hit is None:
            rows.append([])
            room.append(seq_len)
            hit = len(rows) - 1
            open_rows.append(hit)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[hit].append(s)
        room[hit] -= n
    R = len(rows)
    tokens = np.full((R, seq_len), pad_id, np.int32)
    positions = np.zeros((R, seq_len), np.int32)
    segments_ = np.zeros((R, seq_len), np.int32)
    loss = np.zeros((R, seq_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, s in enumerate(row, 1):
            n = len(s.ids)
            tokens[r, at : at + n] = s.ids
            positions[r, at : at + n] = np.arange(n)
            segments_[r, at : at + n] = k
            loss[r, at : at + n] = s.loss
            at += n
    return Packed(tokens, positions, segments_, loss, dropped)
