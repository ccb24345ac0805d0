"""A TIM document as the runtime writes it, and the working memory the model sees while writing it.

``replay_document`` drives the same pieces the TIM controller uses (the llguidance grammar, the tree
tracker) over a document's text, the way ``TimController`` with ``ReplayText`` does: at each step the
model "samples" the tokenizer's first token of the remaining text, the grammar's forced tokens follow
(llguidance fast-forward, so forced keys are tokenized exactly as the runtime forces them), and at each
``ToolCallReady`` the tool result is fed as the runtime feeds it. Every token is labelled:

* ``SAMPLED`` (0): the model wrote it: these carry the loss;
* ``FORCED`` (1): the grammar forced it (keys, separators): masked;
* ``TOOL`` (2): the runtime wrote the tool result: masked.

So the loss mask is derived from the grammar's forced tokens, not from the document structure.

``pruned_segments`` then replays the FIFO prune buffer and the working-memory map of
``timjax.tim.pruning`` (the runtime's own classes) over the token history: between two prune events the
model sees a fixed working memory (reencode mode: the kept tokens at compacted positions, i.e. a fresh
sequence), so each stretch becomes one training sequence ``working memory + new tokens`` with the loss on
the new sampled tokens only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from timjax.tim.grammar import llg_tokenizer, make_grammar, token_at, tokenizer_size
from timjax.tim.pruning import PruneBuffer, WorkingMemory
from timjax.tim.schema import TimSchema
from timjax.tim.tree import ListCompleted, Split, ToolCallReady, TreeTracker

SAMPLED, FORCED, TOOL = 0, 1, 2


@dataclass
class RuntimeDoc:
    prompt: list[int]
    tokens: list[int]  # every generated token in order (sampled, forced, tool result)
    kinds: list[int]  # SAMPLED / FORCED / TOOL per token
    lists: list[tuple[int, ListCompleted]] = field(default_factory=list)  # (token index of the ']', list)

    def text(self, tok) -> str:
        return tok.decode(self.tokens)


@dataclass
class Segment:
    """One training sequence: ``ids`` (working memory, then new tokens); ``loss[j]`` weights predicting
    ``ids[j + 1]`` from ``ids[:j + 1]`` (1 where that token is a sampled token of this stretch)."""

    ids: np.ndarray  # int32 [T]
    loss: np.ndarray  # float32 [T] (last entry 0)


class Replayer:
    """Replays documents for one tokenizer and schema (the llguidance tokenizer is built once)."""

    def __init__(self, hf_tokenizer, schema: TimSchema, vocab_size: int | None = None, *, eos: Sequence[int] = ()):
        self.tok = hf_tokenizer
        self.schema = schema
        self.schema_json = json.dumps(schema.json_schema())
        self.vocab_size = int(vocab_size or tokenizer_size(hf_tokenizer))
        eos = list(eos) or [hf_tokenizer.eos_token_id]
        self.eos = eos
        self.llt = llg_tokenizer(hf_tokenizer, self.vocab_size, eos)

    def prompt_ids(self, question: str) -> list[int]:
        """The question in the chat template, as ``timjax.generate`` renders it for a TIM request."""
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def tool_result_tokens(self, text: bytes) -> list[int]:
        """The tokens the runtime feeds after the ``"tool_result"`` key: ``": " + encode_result(...)``,
        tokenized as ``TimController.poll`` does."""
        return list(self.llt.tokenize_bytes(text))

    def replay(self, question: str, doc_text: str) -> RuntimeDoc:
        data = doc_text.encode("utf-8")
        grammar = make_grammar(self.tok, self.schema_json, self.vocab_size, eos_token=self.eos)
        tracker = TreeTracker(self.llt.tokenize_bytes)
        out = RuntimeDoc(self.prompt_ids(question), [], [])
        dec = json.JSONDecoder()

        def run(queue: list[tuple[int, int]]) -> None:
            while queue:
                t, kind = queue.pop(0)
                grammar.consume([t])
                events = tracker.feed(t, self.llt.decode_bytes([t]))
                if events and isinstance(events[0], Split):
                    grammar.rollback(1)
                    queue[0:0] = [(x, kind) for x in events[0].token_ids]
                    continue
                out.tokens.append(t)
                out.kinds.append(kind)
                for ev in events:
                    if isinstance(ev, ListCompleted):
                        out.lists.append((len(out.tokens) - 1, ev))
                    elif isinstance(ev, ToolCallReady):
                        # as TimController.poll: the rest of the queue is dropped and the runtime writes
                        # ': ' + encode_result(...) right after the key (the tokenizer never lets a token
                        # reach past the key's closing quote, see timjax.train.tokenizer)
                        written = len(tracker.buf)
                        if not data[:written].endswith(b'"tool_result"'):
                            raise ValueError(
                                f"a token reaches past the tool_result key: {data[written - 20 : written + 5]!r}"
                            )
                        _, end = dec.raw_decode(data.decode("utf-8"), written + 2)
                        queue[:] = [(x, TOOL) for x in self.tool_result_tokens(data[written:end])]
                if not queue and not tracker.done:
                    queue.extend((f, FORCED) for f in grammar.forced_tokens())

        while not tracker.done:
            written = len(tracker.buf)
            if not data.startswith(bytes(tracker.buf)):
                raise ValueError(f"replay diverged from the document at byte {written}: {doc_text[:80]!r}...")
            nxt = token_at(self.llt, data, written)
            run([(nxt, SAMPLED)])
        if bytes(tracker.buf) != data:
            raise ValueError("replay did not reproduce the document")
        return out


def replay_memory(doc: RuntimeDoc, buffer: int | None) -> Iterator[tuple[int, int, WorkingMemory]]:
    """Walk ``doc``'s tokens through the runtime's prune buffer (``buffer``; None = off) and working
    memory, as the TIM controller writes them: yields (token index, KV entries pruned right after that
    token, the working memory then)."""
    ends: dict[int, list[ListCompleted]] = {}
    for i, lst in doc.lists:
        ends.setdefault(i, []).append(lst)
    pbuf, wm = PruneBuffer(buffer), WorkingMemory(doc.prompt)
    for i, t in enumerate(doc.tokens):
        wm.append(t)
        pruned = sum(wm.prune(old).n_pruned for lst in ends.get(i, ()) for old in pbuf.push(lst))
        yield i, pruned, wm


def memory_after(doc: RuntimeDoc, buffer: int | None) -> WorkingMemory:
    """The working memory once all of ``doc`` is written under ``buffer`` (its ``stats()``: peak, pruned)."""
    wm = WorkingMemory(doc.prompt)
    for _, _, wm in replay_memory(doc, buffer):
        pass
    return wm


def pruned_segments(doc: RuntimeDoc, buffer: int | None) -> list[Segment]:
    """The training sequences for one document written with prune buffer ``buffer`` (None = pruning off:
    one sequence). Each is the working memory at the start of a stretch between prune events, then the
    stretch's tokens; the loss is on the stretch's sampled tokens."""
    segments: list[Segment] = []
    context = list(doc.prompt)
    start = 0
    n = len(doc.tokens)
    for i, pruned, wm in replay_memory(doc, buffer):
        if pruned or i == n - 1:
            segments.append(_segment(context, doc.tokens[start : i + 1], doc.kinds[start : i + 1]))
            context = wm.kept_tokens()
            start = i + 1
    return segments


def _segment(context: list[int], new: list[int], kinds: list[int]) -> Segment:
    ids = np.asarray(context + new, np.int32)
    loss = np.zeros(len(ids), np.float32)
    k = np.asarray(kinds)
    # position j predicts ids[j + 1]; the stretch's token m sits at len(context) + m
    loss[len(context) - 1 + np.nonzero(k == SAMPLED)[0]] = 1.0
    return Segment(ids, loss)


def runtime_doc_from_tokens(
    replayer: Replayer, prompt: Sequence[int], tokens: Sequence[int], tool_result_tokens: Sequence[int]
) -> RuntimeDoc:
    """Label the tokens a generation really wrote (``GenerationResult.tokens``): replays the grammar and
    the tracker over them, as the controller did. After each ``ToolCallReady`` the next
    ``tool_result_tokens[k]`` tokens are the runtime's (``ToolCallRecord.result_tokens``); a token equal
    to the next one the grammar forced is ``FORCED``; every other token was sampled. Works on unfinished
    generations too (a prefix)."""
    grammar = make_grammar(replayer.tok, replayer.schema_json, replayer.vocab_size, eos_token=replayer.eos)
    tracker = TreeTracker(replayer.llt.tokenize_bytes)
    out = RuntimeDoc(list(prompt), [], [])
    forced: list[int] = []
    tool_left = 0
    calls = list(tool_result_tokens)
    for t in tokens:
        t = int(t)
        if tool_left:
            kind, tool_left = TOOL, tool_left - 1
        elif forced and forced[0] == t:
            kind = FORCED
            forced.pop(0)
        else:
            kind, forced = SAMPLED, []
        grammar.consume([t])
        events = tracker.feed(t, replayer.llt.decode_bytes([t]))
        if events and isinstance(events[0], Split):
            raise ValueError("the generation holds a token straddling a list bracket (not a runtime output)")
        out.tokens.append(t)
        out.kinds.append(kind)
        for ev in events:
            if isinstance(ev, ListCompleted):
                out.lists.append((len(out.tokens) - 1, ev))
            elif isinstance(ev, ToolCallReady):
                tool_left = calls.pop(0) if calls else 0
                forced = []
        if tracker.done:
            break
        if not forced and not tool_left:
            forced = list(grammar.forced_tokens())
    return out
