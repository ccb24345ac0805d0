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
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from timjax.train.corpus import DocFormat, Problem, document_text
from timjax.train.runtime_view import Replayer, Segment, pruned_segments
from timjax.train.tools_adapter import ToolBackend

PLAIN = DocFormat()  # the shipped stages' format


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


@dataclass(frozen=True)
class ReplaySetup:
    """What a worker process needs to rebuild the replayer and the tools: both hold native objects
    (llguidance, the tokenizer's Rust side) that do not pickle, so each worker makes its own."""

    tokenizer_dir: str
    vocab_size: int | None
    kb_seed: int

    def make(self) -> tuple[Replayer, ToolBackend]:
        from timjax.train.tokenizer import load_tokenizer
        from timjax.train.tools_adapter import default_backend, training_schema

        tools = default_backend(self.kb_seed)
        return Replayer(load_tokenizer(self.tokenizer_dir), training_schema(tools), self.vocab_size), tools


def _buffer_choices(n: int, buffers: Sequence[tuple[int | None, float]], seed: int) -> list[int | None | bool]:
    """Per problem, the buffer whose pruned views it also gets (False: none). One draw per problem, in
    order, so the data do not depend on how many workers build them."""
    rng = random.Random(f"segments:{seed}")
    out: list[int | None | bool] = []
    for _ in range(n):
        r, acc, pick = rng.random(), 0.0, False
        for buf, prob in buffers:
            acc += prob
            if r < acc:
                pick = buf
                break
        out.append(pick)
    return out


_CONTRACT_REPLAYERS: dict[tuple[int, tuple[str, ...]], Replayer] = {}


def _replayer_for(p: Problem, replayer: Replayer, tools: ToolBackend) -> Replayer:
    """The replayer whose grammar lists the calculator's parameters in the order of ``p``'s contract
    (``corpus.CorpusSpec.p_tool_contract``); the given one for the shipped order."""
    from timjax.train.corpus import CONTRACT_ORDERS, contract_specs

    order = tuple((p.data.get("contract") or {}).get("order", CONTRACT_ORDERS[0]))
    if order == CONTRACT_ORDERS[0]:
        return replayer
    key = (id(replayer), order)
    if key not in _CONTRACT_REPLAYERS:
        from timjax.tim.schema import tim_schema

        schema = tim_schema(tools=contract_specs(tools.specs(), order))
        _CONTRACT_REPLAYERS[key] = Replayer(replayer.tok, schema, replayer.vocab_size, eos=replayer.eos)
    return _CONTRACT_REPLAYERS[key]


def _problem_segments(
    p: Problem, buf: int | None | bool, replayer: Replayer, tools: ToolBackend, fmt: DocFormat = PLAIN
) -> list[Segment]:
    text = document_text(p, tools, **asdict(fmt))
    doc = _replayer_for(p, replayer, tools).replay(p.question, text)
    out = pruned_segments(doc, None)
    if fmt.rewrite and p.kind == "arith" and buf in (0, False):
        # a rewrite step writes its conclusion from the call its buffer-0 view has already forgotten (a
        # view teaching guesses), and a long rewrite may not fit a row unpruned: buffer 1's views instead
        buf = 1
    if buf is not False:
        segs = pruned_segments(doc, buf)
        if len(segs) > 1:  # a buffer that never prunes this document gives the same sequence again
            out.extend(segs)
    return out


_WORKER: tuple[Replayer, ToolBackend] | None = None


def _init_worker(setup: ReplaySetup) -> None:
    global _WORKER
    _WORKER = setup.make()


def _chunk_segments(job: tuple[DocFormat, list[tuple[Problem, int | None | bool]]]) -> list[Segment]:
    replayer, tools = _WORKER
    fmt, chunk = job
    return [s for p, buf in chunk for s in _problem_segments(p, buf, replayer, tools, fmt)]


def _pool_context():
    """fork while JAX has started no backend (no XLA threads to break, and a caller's script needs no
    ``if __name__ == "__main__":`` guard); spawn once it has (a fork could deadlock on their locks)."""
    import multiprocessing
    import sys

    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a jax without the check: assume started
        started = True
    return multiprocessing.get_context("fork" if sys.platform == "linux" and not started else "spawn")


def build_segments(
    probs: Sequence[Problem],
    replayer: Replayer,
    tools: ToolBackend,
    buffers: Sequence[tuple[int | None, float]],
    seed: int,
    *,
    progress: bool = True,
    workers: int = 1,
    setup: ReplaySetup | None = None,
    fmt: DocFormat = PLAIN,
) -> list[Segment]:
    """Training sequences for ``probs``: each document with pruning off, plus the pruned views of one
    buffer drawn from ``buffers`` ((buffer, probability) pairs; the rest of the mass: none).

    ``workers > 1`` (with ``setup``, which rebuilds ``replayer`` and ``tools`` in each process) replays
    the documents in that many processes; the sequences are the same, in the same order. ``fmt``:
    the documents' arithmetic format (``corpus.DocFormat``)."""
    choices = _buffer_choices(len(probs), buffers, seed)
    bar = tqdm(total=len(probs), desc="corpus", unit="doc", disable=not progress, mininterval=2.0)
    out: list[Segment] = []
    if workers <= 1 or setup is None or len(probs) < 2 * workers:
        for p, buf in zip(probs, choices):
            out.extend(_problem_segments(p, buf, replayer, tools, fmt))
            bar.update(1)
    else:
        from concurrent.futures import ProcessPoolExecutor

        size = max(1, min(64, len(probs) // (4 * workers)))  # several chunks a worker: an even load
        chunks = [(fmt, list(zip(probs[i : i + size], choices[i : i + size]))) for i in range(0, len(probs), size)]
        ctx = _pool_context()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(setup,)) as pool:
            for chunk, segs in zip(chunks, pool.map(_chunk_segments, chunks)):
                out.extend(segs)
                bar.update(len(chunk[1]))
    bar.close()
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
