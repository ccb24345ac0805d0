"""TreeTracker, PruneBuffer and WorkingMemory on real Qwen3 tokenizations of random TIM documents."""

from __future__ import annotations

import json
import random

import pytest

from timjax.base.vocab import QWEN3_MODEL_VOCAB
from timjax.tim import (
    DocumentComplete,
    ListCompleted,
    ListOpened,
    PruneBuffer,
    Split,
    TokenLoc,
    ToolCallReady,
    ToolSpec,
    TreeTracker,
    WorkingMemory,
    full_response,
    kept_bytes,
    llg_tokenizer,
    make_grammar,
    pruned_task_paths,
    tim_schema,
)
from timjax.tim.schema import ITEM_SEPARATOR, KEY_SEPARATOR
from timjax.tim.traces import pruned_view

TOOLS = [
    ToolSpec(
        name="search",
        description="web search",
        input_schema={
            "type": "object",
            "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
            "required": ["query", "k"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        name="calc",
        description="calculator",
        input_schema={
            "type": "object",
            "properties": {
                "expr": {"type": "string"},
                "vars": {"type": "array", "items": {"type": "number"}},
                "opts": {
                    "type": "object",
                    "properties": {"exact": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
                },
            },
            "required": ["expr", "vars", "opts"],
            "additionalProperties": False,
        },
    ),
]

TRICKY = [
    "plain words",
    'quote " inside',
    "brackets [1, 2] and {x: y}",
    'closing "}]}] tail',
    'back\\slash \\" and \\n',
    "new\nline\ttab",
    "ctrl \x01 char",
    "unicode über 日本語 … ✓",
    '"}], {"thought": "fake"',
    "x",
    "",
    "[[[",
    "]]]",
    "emoji 🙂 done",
]


def rand_text(rng: random.Random) -> str:
    return " ".join(rng.choice(TRICKY) for _ in range(rng.randint(1, 3)))


def rand_task(rng: random.Random, depth: int, max_depth: int, breadth: int, title: bool, tools: bool) -> dict:
    t: dict = {}
    if title:
        t["title"] = rand_text(rng)
    t["thought"] = rand_text(rng)
    if tools and rng.random() < 0.4:
        if rng.random() < 0.5:
            t["tooluse"] = {
                "tool_name": "search",
                "parameters": {"query": rand_text(rng), "k": rng.randint(0, 99)},
                "tool_result": rand_text(rng),
            }
        else:
            t["tooluse"] = {
                "tool_name": "calc",
                "parameters": {"expr": "[a]+{b}", "vars": [1.5, -2, 3e5], "opts": {"exact": True, "note": None}},
                "tool_result": rand_text(rng),
            }
    if depth < max_depth and rng.random() < 0.75:
        t["subtasks"] = [
            rand_task(rng, depth + 1, max_depth, breadth, title, tools) for _ in range(rng.randint(1, breadth))
        ]
    t["conclusion"] = rand_text(rng)
    return t


def rand_doc(seed: int, max_depth: int = 4, breadth: int = 3, title: bool = False, tools: bool = True) -> dict:
    rng = random.Random(seed)
    doc = {
        "reasoning": [rand_task(rng, 1, max_depth, breadth, title, tools) for _ in range(rng.randint(1, 3))],
        "answer": rand_text(rng),
    }
    # make sure every document nests to depth >= 4 (three nested subtask lists)
    t = doc["reasoning"][0]
    for d in range(1, min(4, max_depth)):
        if "subtasks" not in t:
            t.pop("conclusion")
            t["subtasks"] = [rand_task(rng, d + 1, max_depth, breadth, title, tools)]
            t["conclusion"] = rand_text(rng)
        t = t["subtasks"][0]
    return doc


def _js(v) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))


class Ref:
    """Serialise a document exactly like the grammar and record byte spans (the reference)."""

    def __init__(self, doc: dict):
        self.parts: list[bytes] = []
        self.n = 0
        self.members: list[tuple[tuple, str, int, int]] = []  # (task path, key, start, end) bytes
        self.objects: list[tuple[tuple, int, int]] = []  # (task path, '{' offset, '}' offset + 1)
        self.lists: list[tuple[tuple, int, int]] = []  # (task path, '[' offset, ']' offset), closing order
        self.tools: list[tuple[tuple, str, dict]] = []
        self._obj(doc, (), root=True)
        self.data = b"".join(self.parts)
        assert self.data == _js(doc).encode()

    def w(self, s: str) -> int:
        b = s.encode()
        start = self.n
        self.parts.append(b)
        self.n += len(b)
        return start

    def _obj(self, obj: dict, path: tuple, root: bool = False) -> None:
        o0 = self.w("{")
        for i, (k, v) in enumerate(obj.items()):
            if i:
                self.w(ITEM_SEPARATOR)
            m0 = self.w(_js(k))
            self.w(KEY_SEPARATOR)
            if k in ("subtasks", "reasoning"):
                lb = self.w("[")
                for j, child in enumerate(v):
                    if j:
                        self.w(ITEM_SEPARATOR)
                    self._obj(child, path + (j,))
                rb = self.w("]")
                if k == "subtasks":
                    self.lists.append((path, lb, rb))
            else:
                self.w(_js(v))
                if k == "tooluse":
                    self.tools.append((path, v["tool_name"], v["parameters"]))
            self.members.append((path, k, m0, self.n))
        self.objects.append((path, o0, self.w("}") + 1))

    def byte_locs(self) -> tuple[list, list]:
        """Per byte: (path, key) of the innermost member containing it or None; innermost object path."""
        obj = [()] * self.n
        for path, a, b in sorted(self.objects, key=lambda o: len(o[0])):
            for x in range(a, b):
                obj[x] = path
        member = [None] * self.n
        for path, key, a, b in self.members:
            for x in range(a, b):
                if obj[x] == path:  # only the innermost task's own members
                    member[x] = (path, key)
        return member, obj

    def token_locs(self, starts: list[int]) -> list[TokenLoc]:
        member, obj = self.byte_locs()
        ends = starts[1:] + [self.n]
        out = []
        for a, b in zip(starts, ends):
            hit = next((member[x] for x in range(a, b) if member[x] is not None), None)
            out.append(TokenLoc(*hit) if hit else TokenLoc(obj[a], None))
        return out


@pytest.fixture(scope="session")
def llt(qwen3_tokenizer):
    return llg_tokenizer(qwen3_tokenizer, QWEN3_MODEL_VOCAB)


def run_tracker(ids, tok_bytes, encode, buffer_size=None, prompt=(), check=None):
    """The engine loop without a model: feed, apply Splits, push completed lists, prune."""
    tr = TreeTracker(encode)
    buf = PruneBuffer(buffer_size)
    wm = WorkingMemory(prompt)
    queue = list(ids)
    events = []
    n_splits = 0
    while queue:
        t = queue.pop(0)
        ev = tr.feed(t, tok_bytes(t))
        if ev and isinstance(ev[0], Split):
            assert len(ev) == 1 and ev[0].token_ids, ev
            assert b"".join(ev[0].pieces) == tok_bytes(t)
            assert b"".join(tok_bytes(x) for x in ev[0].token_ids) == tok_bytes(t)
            queue[0:0] = list(ev[0].token_ids)
            n_splits += 1
            continue
        wm.append(t)
        events.extend(ev)
        for e in ev:
            if isinstance(e, ListCompleted):
                for lst in buf.push(e):
                    op = wm.prune(lst)
                    if check:
                        check(tr, wm, buf, op)
    return tr, buf, wm, events, n_splits


def check_against_ref(tr: TreeTracker, ref: Ref, events) -> None:
    assert bytes(tr.buf) == ref.data
    assert tr.done
    starts = tr.token_starts
    assert [tr.location(i) for i in range(tr.n_tokens)] == ref.token_locs(starts)
    completed = [e for e in events if isinstance(e, ListCompleted)]
    assert [(c.task_path) for c in completed] == [p for p, _, _ in ref.lists]
    pos = {s: i for i, s in enumerate(starts)}
    for c, (path, lb, rb) in zip(completed, ref.lists):
        i, j = c.token_span
        # '[' is the last byte of token i-1 and ']' the first byte of token j
        assert pos[lb + 1] == i and pos[rb] == j, (c, lb, rb)
        assert c.byte_span == (lb + 1, rb)
        assert tr.token_bytes(i - 1).endswith(b"[") and tr.token_bytes(j).startswith(b"]")
    opened = [e for e in events if isinstance(e, ListOpened)]
    assert sorted(e.list_id for e in opened) == sorted(c.list_id for c in completed)
    tools = [e for e in events if isinstance(e, ToolCallReady)]
    assert [(e.task_path, e.tool_name, json.loads(e.parameters_json)) for e in tools] == ref.tools
    for k, e in enumerate(tools):  # the event comes with the token that completes the "tool_result" key
        a = tr.token_starts[e.token_index]
        b = a + len(tr.token_bytes(e.token_index))
        assert tr.buf[:a].count(b'"tool_result"') == k and tr.buf[:b].count(b'"tool_result"') == k + 1
        assert bytes(tr.buf[:b]).endswith(b'"tool_result"')  # the key's quote ends its token: nothing of the value
    assert isinstance(events[-1], DocumentComplete) and events[-1].token_index == tr.n_tokens - 1


SEEDS = list(range(6))


@pytest.mark.parametrize("seed", SEEDS)
def test_tracker_qwen_tokens(seed, qwen3_tokenizer, llt):
    doc = rand_doc(seed, max_depth=4, breadth=3, title=seed % 2 == 0)
    ref = Ref(doc)
    text = ref.data.decode()
    ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    tb = lambda t: llt.decode_bytes([t])  # noqa: E731
    tr, buf, wm, events, n_splits = run_tracker(ids, tb, llt.tokenize_bytes)
    assert n_splits > 0  # Qwen3 merges '[{"' and '"}]' etc.: the rule is exercised
    check_against_ref(tr, ref, events)
    assert len(ref.lists) >= 3


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_tracker_single_chars(seed):
    doc = rand_doc(100 + seed, max_depth=5, breadth=3, title=True)
    ref = Ref(doc)
    text = ref.data.decode()
    tr = TreeTracker()
    events = []
    for ch in text:
        ev = tr.feed(ord(ch), ch)
        assert not any(isinstance(e, Split) for e in ev)
        events.extend(ev)
    check_against_ref(tr, ref, events)


def test_tracker_byte_at_a_time():
    """Bytes of one multi-byte character in separate tokens (BPE does that) are fine."""
    ref = Ref(rand_doc(7))
    tr = TreeTracker()
    events = []
    for k in range(len(ref.data)):
        events += tr.feed(ref.data[k], ref.data[k : k + 1])
    check_against_ref(tr, ref, events)


def test_split_pieces_and_no_consumption():
    tr = TreeTracker(lambda b: [len(b)])
    for tok in ['{"', "reasoning", '":', ' [{"', "thought", '":', ' "', "a", '",', ' "', "subtasks", '":']:
        assert not any(isinstance(e, Split) for e in tr.feed(0, tok))
    n = tr.n_tokens
    (ev,) = tr.feed(5, ' [{"')
    assert isinstance(ev, Split) and ev.pieces == (b" [", b'{"') and ev.token_index == n and ev.token_ids == (2, 2)
    assert tr.n_tokens == n  # not consumed
    assert tr.feed(1, " [") == [ListOpened(0, (0,), n)]
    tr.feed(2, '{"')
    for tok in ["thought", '":', ' "', "b", '",', ' "', "conclusion", '":', ' "', "c"]:
        tr.feed(0, tok)
    (ev,) = tr.feed(9, '"}]},')
    assert ev.pieces == (b'"}', b"]},")
    tr.feed(0, '"}')
    (ev,) = tr.feed(0, "]},")
    assert isinstance(ev, ListCompleted) and ev.task_path == (0,) and ev.token_span == (n + 1, tr.n_tokens - 1)
    # brackets inside strings never split
    tr2 = TreeTracker()
    for tok in ['{"', "reasoning", '":', " [", '{"', "thought", '":', ' "']:
        tr2.feed(0, tok)
    assert tr2.split_points(b'[{"}]') == []
    # a token holding both brackets of one list is cut twice
    tr3 = TreeTracker()
    for tok in ['{"reasoning": [', '{"thought": "a", "subtasks":']:
        tr3.feed(0, tok)
    tok = b' [{"thought": "x", "conclusion": "y"}], "'
    assert tr3.split_points(tok) == [2, tok.index(b"]")]


def test_pruning_keeps_valid_skeleton(qwen3_tokenizer, llt):
    for seed, size in [(11, 0), (12, 1), (13, 2), (14, 0), (15, 2)]:
        doc = rand_doc(seed, max_depth=4, breadth=3)
        ref = Ref(doc)
        ids = qwen3_tokenizer.encode(ref.data.decode(), add_special_tokens=False)
        tb = lambda t: llt.decode_bytes([t])  # noqa: E731
        prompt = [151644, 872, 198]
        ops = []

        def check(tr, wm, buf, op):
            ops.append(op)
            # the working memory is a prefix of the document with pruned lists emptied
            exp = _js(pruned_view(doc, pruned_task_paths(buf.pruned))).encode()
            kb = kept_bytes(tr, wm)
            assert exp.startswith(kb), (kb[-80:], exp[len(kb) - 80 : len(kb) + 10])
            assert wm.kept_tokens()[:3] == prompt
            slots = wm.slots()
            kept = [s for s in slots if s is not None]
            assert kept == list(range(3, len(wm)))  # monotone, dense after the prompt
            assert op.new_len == len(wm) and op.suffix[1] == op.old_len

        tr, buf, wm, events, _ = run_tracker(ids, tb, llt.tokenize_bytes, buffer_size=size, prompt=prompt, check=check)
        n_lists = len([e for e in events if isinstance(e, ListCompleted)])
        # every pushed list was either pruned or is still buffered / absorbed
        assert len(buf.pruned) + len(buf) + len(buf.absorbed) == n_lists
        assert len(buf) <= size
        final = kept_bytes(tr, wm)
        assert json.loads(final) == pruned_view(doc, pruned_task_paths(buf.pruned))
        for lst in buf.flush():
            wm.prune(lst)
        # everything pruned: the top-level tasks stay, all their subtask lists are empty
        assert json.loads(kept_bytes(tr, wm)) == pruned_view(doc, {p for p, _, _ in ref.lists})
        st = wm.stats()
        assert st.history_len == tr.n_tokens and st.working_len == len(wm) == 3 + tr.n_tokens - st.pruned_tokens
        assert st.peak_working_len <= 3 + tr.n_tokens and st.pruned_tokens > 0
        # the full tree survives in the history
        resp = full_response(tim_schema(TOOLS, max_depth=4, max_subtasks=3), tr)
        assert resp.model_dump(mode="json", exclude_none=True) == doc


def test_engine_loop_with_grammar(qwen3_tokenizer, llt):
    """sample -> grammar.consume -> tracker.feed; on Split: grammar.rollback(1) + replacement tokens."""
    sch = tim_schema(TOOLS, max_depth=4, max_subtasks=3)
    doc = rand_doc(21, max_depth=4, breadth=3)
    text = Ref(doc).data.decode()
    g = make_grammar(qwen3_tokenizer, sch.json_schema(), QWEN3_MODEL_VOCAB)
    tr = TreeTracker(llt.tokenize_bytes)
    queue = qwen3_tokenizer.encode(text, add_special_tokens=False)
    consumed = []
    splits = 0
    while queue:
        t = queue.pop(0)
        g.consume([t])
        ev = tr.feed(t, llt.decode_bytes([t]))
        if ev and isinstance(ev[0], Split):
            g.rollback(1)
            queue[0:0] = list(ev[0].token_ids)
            splits += 1
            continue
        consumed.append(t)
    assert splits > 0 and g.is_stopped() and g.is_accepting()
    assert tr.done and bytes(tr.buf) == text.encode()
    g.consume([qwen3_tokenizer.eos_token_id])


# ------------------------------------------------------------------ PruneBuffer


def L(i, a, b, path=(0,)):
    return ListCompleted(i, path, (a, b), (a, b))


def test_prune_buffer_fifo_sizes():
    lists = [L(0, 1, 5), L(1, 10, 15), L(2, 20, 25), L(3, 30, 35)]
    off = PruneBuffer(None)
    assert all(off.push(x) == [] for x in lists) and off.pruned == [] and len(off) == 0
    b0 = PruneBuffer(0)
    assert [b0.push(x) for x in lists] == [[x] for x in lists]
    b1 = PruneBuffer(1)
    assert [b1.push(x) for x in lists] == [[], [lists[0]], [lists[1]], [lists[2]]]
    assert b1.buffered == [lists[3]]
    b2 = PruneBuffer(2)
    assert [b2.push(x) for x in lists] == [[], [], [lists[0]], [lists[1]]]
    assert b2.buffered == lists[2:] and b2.flush() == lists[2:] and len(b2) == 0
    with pytest.raises(ValueError):
        PruneBuffer(-1)


def test_prune_buffer_nested():
    inner_a, inner_b, outer = L(0, 3, 6, (0, 0)), L(1, 8, 12, (0, 1)), L(2, 2, 14, (0,))
    later = L(3, 20, 30, (1,))
    # size 2: inner lists pop first (FIFO), then the outer one; WorkingMemory counts each token once
    b = PruneBuffer(2)
    wm = WorkingMemory([7, 7])
    wm.extend(range(100, 140))
    got = [b.push(x) for x in (inner_a, inner_b, outer, later)]
    assert got == [[], [], [inner_a], [inner_b]]
    for x in (inner_a, inner_b):
        wm.prune(x)
    op = wm.prune(b.flush()[0])  # outer: only what is left of [2, 14)
    assert op.n_pruned == 12 - 3 - 4 and op.start_slot == 2 + 2
    assert wm.stats().pruned_tokens == 12
    # an outer list popped while inner lists are still buffered drops them from the buffer
    b = PruneBuffer(1)
    assert b.push(outer) == []
    assert b.push(inner_a) == [outer]  # (out of order on purpose)
    assert b.buffered == [] and b.absorbed == [inner_a]
    assert b.push(inner_b) == [] and b.absorbed == [inner_a, inner_b]  # inside a pruned list: gone already
    assert b.push(later) == [] and b.buffered == [later]
    b = PruneBuffer(1)
    b.push(outer)
    b.push(later)
    assert pruned_task_paths(b.pruned) == {(0,)}


def test_working_memory_slots():
    wm = WorkingMemory([1, 2, 3])
    assert wm.append(50) == 3
    wm.extend(range(51, 70))  # history 0..19
    op = wm.prune((5, 9))
    assert (op.start_slot, op.end_slot, op.old_len, op.new_len, op.n_pruned) == (8, 12, 23, 19, 4)
    assert wm.slot(4) == 7 and wm.slot(5) is None and wm.slot(8) is None and wm.slot(9) == 8
    op2 = wm.prune((2, 12))  # overlaps the pruned span: only kept tokens count
    assert (op2.start_slot, op2.end_slot, op2.n_pruned) == (5, 11, 6)
    assert wm.kept_tokens() == [1, 2, 3, 50, 51] + list(range(62, 70))
    assert wm.kept_tokens(include_prompt=False) == [50, 51] + list(range(62, 70))
    assert wm.prune((3, 10)).n_pruned == 0
    assert wm.slots() == [3, 4] + [None] * 10 + list(range(5, 13))
    st = wm.stats()
    assert (st.history_len, st.working_len, st.peak_working_len, st.pruned_tokens, st.prune_ops) == (20, 13, 23, 10, 2)
    assert st.pruned_fraction == 0.5
    with pytest.raises(ValueError):
        wm.prune((5, 30))
    with pytest.raises(IndexError):
        wm.slot(20)
