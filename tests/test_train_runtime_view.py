"""Training sequences match what the runtime writes and shows: the TIM controller replays the same
tokens (tool results included) and ends with the same working memory; the loss mask covers exactly the
tokens the model writes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from _train_helpers import replayer, small_problems, tokenizer

from timjax.tim.traces import pruned_view
from timjax.train.corpus import DocFormat, document, document_text, dumps_doc
from timjax.train.runtime_view import FORCED, SAMPLED, TOOL, pruned_segments
from timjax.train.tools_adapter import default_backend


class _FakeToolSession:
    """Answers as the MCP servers do, from their pure functions, encoded by ``encode_result``."""

    def __init__(self):
        self.records = []
        self.tools = default_backend()

    def submit(self, name, parameters_json, task_path=()):
        from timjax.tools.encoding import encode_result
        from timjax.tools.servers.calculator import calculate
        from timjax.tools.servers.kb import lookup

        args = json.loads(parameters_json)
        return encode_result(calculate(**args) if name == "calculator" else lookup(self.tools.kb, **args))

    def poll(self, call):
        # the fields of a ToolCallRecord the controller reads (tree events name the task and the call)
        rec = SimpleNamespace(
            result=call, result_tokens=0, resume_s=None, task_path=(), tool="tool", index=len(self.records), status="ok"
        )
        self.records.append(rec)
        return rec


def _run_controller(question, text, buffer):
    """The runtime's TimController, host side only, replaying ``text`` (no device steps needed)."""
    from timjax.engine.tim_controller import ReplayText, TimController

    rp = replayer()
    tok = tokenizer()
    model = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(vocab_size=rp.vocab_size))
    prompt = rp.prompt_ids(question)
    ctrl = TimController(
        model,
        rp.schema,
        max_new_tokens=10_000,
        prompt_len=len(prompt),
        pruning_buffer=buffer,
        stop_ids=[tok.eos_token_id],
        override=ReplayText(text, rp.llt),
        tools=_FakeToolSession(),
    )
    seq = SimpleNamespace(generated=[])
    action = ctrl.on_token(0, seq)
    while action.finish is None:
        action = ctrl.poll(seq) if action.park else ctrl.on_token(0, seq)
    assert action.finish == "stop", action.error
    return ctrl


@pytest.mark.parametrize("buffer", [None, 0, 1, 2])
def test_controller_writes_the_same_tokens_and_keeps_the_same_working_memory(buffer):
    probs = [p for p in small_problems() if p.kind == "arith" and p.depth == 3][:3] + [
        p for p in small_problems() if p.kind == "lookup"
    ][:1]
    for p in probs:
        text = document_text(p)
        doc = replayer().replay(p.question, text)
        ctrl = _run_controller(p.question, text, buffer)
        assert ctrl.tracker.token_ids == doc.tokens
        segs = pruned_segments(doc, buffer)
        final = segs[-1].ids.tolist()
        assert final[len(doc.prompt) :] == ctrl.memory.kept_tokens(include_prompt=False)
        ops = ctrl.memory.stats().prune_ops  # one sequence per stretch between prune events
        assert 1 <= len(segs) <= 1 + ops and (buffer is not None or len(segs) == 1)
        assert final[: len(doc.prompt)] == doc.prompt


def test_buffer_zero_working_memory_is_the_document_with_every_list_emptied():
    p = next(p for p in small_problems() if p.kind == "arith" and p.depth == 3)
    text = document_text(p)
    doc = replayer().replay(p.question, text)
    final = pruned_segments(doc, 0)[-1].ids[len(doc.prompt) :]
    full = document(p)
    paths = []

    def walk(t, path):
        if "subtasks" in t:
            paths.append(path)
            for i, c in enumerate(t["subtasks"]):
                walk(c, path + (i,))

    for i, t in enumerate(full["reasoning"]):
        walk(t, (i,))
    assert tokenizer().decode(final.tolist()) == dumps_doc(pruned_view(full, paths))


def test_loss_mask_is_the_written_tokens_only():
    tok = tokenizer()
    for p in small_problems()[:20]:
        text = document_text(p)
        doc = replayer().replay(p.question, text)
        pieces = [tok.decode([t]) for t in doc.tokens]
        assert "".join(pieces) == text
        starts = [0]
        for s in pieces:
            starts.append(starts[-1] + len(s))
        kind_at = [None] * len(text)
        for i, k in enumerate(doc.kinds):
            for c in range(starts[i], starts[i + 1]):
                kind_at[c] = k
        # forced keys are never trained on; tool results are never trained on
        for key in ('"thought"', '"tool_name"', '"parameters"', '"reasoning"'):
            at = text.find(key)
            while at >= 0:
                assert all(kind_at[c] != SAMPLED for c in range(at + 1, at + len(key) - 1)), (key, text[at : at + 20])
                at = text.find(key, at + 1)
        at = text.find('"tool_result": ')
        while at >= 0:
            start = at + len('"tool_result": ')
            _, end = json.JSONDecoder().raw_decode(text, start)
            assert all(kind_at[c] == TOOL for c in range(start, end))
            at = text.find('"tool_result": ', end)
        # the contents of thoughts and conclusions are the model's
        for t in json.loads(text)["reasoning"]:
            at = text.find('"conclusion": ' + json.dumps(t["conclusion"])) + len('"conclusion": "')
            assert all(kind_at[c] == SAMPLED for c in range(at, at + len(t["conclusion"])))
        # each segment's loss weights exactly its sampled tokens
        for buf in (None, 0):
            segs = pruned_segments(doc, buf)
            assert sum(int(s.loss.sum()) for s in segs) == sum(k == SAMPLED for k in doc.kinds)
            for s in segs:
                assert s.loss[-1] == 0
    assert FORCED != SAMPLED != TOOL


def test_replay_writes_a_spelled_name_letter_by_letter_wherever_it_sits(tmp_path):
    """The replay takes the next token from the document with its left context: a spelled name's inner
    letters that happen to form a whole word (``in`` inside ``Bopin``) are still letters, as they are in
    the question and the tool results (a window starting mid-name lost the letter to the left, so the
    whole-word piece matched and the model was taught two spellings of one name)."""
    from timjax.tim.grammar import llg_tokenizer, token_at, tokenizer_size
    from timjax.train.runtime_view import Replayer
    from timjax.train.sft import name_words
    from timjax.train.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from timjax.train.tools_adapter import training_schema

    tools = default_backend()
    probs = small_problems()
    texts = [p.question for p in probs] + [document_text(p, tools) for p in probs]
    tok = load_tokenizer(save_tokenizer(train_tokenizer(texts, 700, spell=name_words(tools)), tmp_path))
    llt = llg_tokenizer(tok, tokenizer_size(tok), [tok.eos_token_id])
    whole = {
        tok.decode([i]) for i in range(tokenizer_size(tok)) if tok.decode([i]).isalpha() and len(tok.decode([i])) > 1
    }
    # names with a whole-word piece inside: the case a window without left context got wrong
    inner = [n for n in sorted(name_words(tools)) if any(w in n[1:] for w in whole)]
    assert inner, "no name holds a whole word: the test would not exercise the lookbehind"
    for name in inner:
        data = f'"entity": "{name}"'.encode()
        at, got = 0, []
        while at < len(data):
            got.append(token_at(llt, data, at))
            at += len(llt.decode_bytes([got[-1]]))
        assert got == tok(data.decode(), add_special_tokens=False)["input_ids"], name
    rp = Replayer(tok, training_schema(tools))
    checked = 0
    for p in [p for p in probs if p.kind == "lookup"][:30]:
        doc = rp.replay(p.question, document_text(p, tools))
        pieces = [tok.decode([t]) for t in doc.tokens]
        starts = np.cumsum([0] + [len(s) for s in pieces]).tolist()
        text = "".join(pieces)
        for n in (n for n in inner if n in text):
            at = text.find(n)
            while at >= 0:  # every occurrence (question copies, calls, thoughts) is one token per letter
                k = starts.index(at)
                assert pieces[k : k + len(n)] == list(n), (n, pieces[k : k + len(n)])
                checked += 1
                at = text.find(n, at + 1)
    assert checked


def test_corpus_built_in_worker_processes_equals_the_sequential_build():
    from _train_helpers import tokenizer_dir

    from timjax.train.data import ReplaySetup, build_segments

    probs = small_problems()[:24]
    buffers = [(0, 0.3), (1, 0.3), (2, 0.3)]
    args = (probs, replayer(), default_backend(), buffers, 7)
    one = build_segments(*args, progress=False)
    setup = ReplaySetup(str(tokenizer_dir()), None, 0)
    two = build_segments(*args, progress=False, workers=2, setup=setup)
    assert len(one) > len(probs)  # pruned views are in it
    assert len(one) == len(two)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.loss, b.loss)
    # the workers write the format they are asked for (restated chains are longer documents)
    for fmt in (DocFormat(restate=True), DocFormat(rewrite=True)):
        three = build_segments(*args, progress=False, workers=2, setup=setup, fmt=fmt)
        assert [s.ids.tolist() for s in three] == [
            s.ids.tolist() for s in build_segments(*args, progress=False, fmt=fmt)
        ]
        assert [s.ids.tolist() for s in three] != [s.ids.tolist() for s in one]
    assert sum(len(s.ids) for s in three) > sum(len(s.ids) for s in one)


def test_a_script_without_a_main_guard_can_build_the_corpus_in_workers(tmp_path):
    # a spawned worker re-imports the caller's script; before JAX starts a backend the pool forks instead,
    # so a plain top-level script works (it used to die with "bootstrapping phase" errors)
    import subprocess
    import sys

    from _train_helpers import tokenizer_dir

    script = tmp_path / "build.py"
    script.write_text(
        "from timjax.train.corpus import CorpusSpec, problems\n"
        "from timjax.train.data import ReplaySetup, build_segments\n"
        f"setup = ReplaySetup({str(tokenizer_dir())!r}, None, 0)\n"
        "replayer, tools = setup.make()\n"
        "probs = problems(CorpusSpec(seed=0), 'train', 12)\n"
        "args = (probs, replayer, tools, [(1, 0.5)], 3)\n"
        "one = build_segments(*args, progress=False)\n"
        "two = build_segments(*args, progress=False, workers=2, setup=setup)\n"
        "assert [s.ids.tolist() for s in one] == [s.ids.tolist() for s in two]\n"
        "print('segments', len(two))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "segments" in out.stdout and "bootstrapping" not in out.stderr
