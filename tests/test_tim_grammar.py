"""LLGuidanceGrammar over the real Qwen3 vocabulary and a tiny byte-level tokenizer."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from test_tim_tree import TOOLS, Ref, rand_doc
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from timjax.base.vocab import (  # noqa: F401 (fixtures)
    IM_END_ID,
    QWEN3_ADDED_TOKENS,
    QWEN3_MODEL_VOCAB,
    QWEN3_N_RANKS,
    qwen_tiktoken_path,
)
from timjax.tim import GrammarError, LLGuidanceGrammar, dumps, llg_tokenizer, make_grammar, mask_words, tim_schema

SCHEMA = tim_schema(TOOLS, max_depth=4, max_subtasks=3)


def bits(mask: np.ndarray) -> np.ndarray:
    return np.unpackbits(mask.view(np.uint8), bitorder="little")


@pytest.fixture(scope="module")
def doc_text():
    return Ref(rand_doc(3, max_depth=4, breadth=3)).data.decode()


def test_qwen_vocab_matches_tiktoken(qwen3_tokenizer):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from timjax.base.vocab import QWEN_PATTERN

    enc = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens={c: QWEN3_N_RANKS + i for i, (c, _) in enumerate(QWEN3_ADDED_TOKENS)},
    )
    text = Ref(rand_doc(5)).data.decode() + " Hello, world! 12345 über\n\n  x"
    assert qwen3_tokenizer.encode(text, add_special_tokens=False) == enc.encode(text)
    assert len(qwen3_tokenizer) == QWEN3_N_RANKS + 26 == 151_669
    assert qwen3_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>"]) == [IM_END_ID, 151667, 151668]
    assert qwen3_tokenizer.eos_token_id == IM_END_ID
    assert qwen3_tokenizer.encode("a<think>b", add_special_tokens=False)[1] == 151667


def test_accepts_valid_doc(qwen3_tokenizer, doc_text):
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    ids = qwen3_tokenizer.encode(doc_text, add_special_tokens=False)
    mask = np.zeros(mask_words(QWEN3_MODEL_VOCAB), np.int32)
    for t in ids:
        assert not g.is_stopped()
        g.fill_mask(mask)
        assert bits(mask)[t] == 1
        g.consume([t])
    assert g.is_stopped() and g.is_accepting()
    assert list(g.allowed()) == [IM_END_ID]  # only EOS once the JSON is complete
    g.consume([IM_END_ID])
    assert SCHEMA.parse(doc_text).model_dump(mode="json", exclude_none=True) == json.loads(doc_text)


def test_tokenizer_cached(qwen3_tokenizer):
    a = llg_tokenizer(qwen3_tokenizer, QWEN3_MODEL_VOCAB)
    t = time.perf_counter()
    b = llg_tokenizer(qwen3_tokenizer, QWEN3_MODEL_VOCAB)
    assert a is b and time.perf_counter() - t < 0.05
    assert a.vocab_size == QWEN3_MODEL_VOCAB and a.eos_token == IM_END_ID


@pytest.mark.parametrize(
    "bad, where",
    [
        ('{"reasoning": [{"conclusion": "c", "thought": "t"}], "answer": "a"}', "conclusion"),  # key order
        ('{"reasoning": [{"thought":"t", "conclusion": "c"}], "answer": "a"}', '":"'),  # no free whitespace
        ('{"reasoning": [{"thought": "t", "subtasks": [], "conclusion": "c"}], "answer": "a"}', "]"),  # empty list
        ('{"reasoning": [{"thought": "t", "tooluse": {"tool_name": "search", "parameters": {"expr": "1"}', "expr"),
        ('{"reasoning": [{"thought": "t", "extra": 1, "conclusion": "c"}], "answer": "a"}', "extra"),
    ],
)
def test_rejects_invalid(qwen3_tokenizer, bad, where):
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    ids = qwen3_tokenizer.encode(bad, add_special_tokens=False)
    with pytest.raises(GrammarError) as ei:
        g.consume(ids)
    assert ei.value.token in ids and f"token {ei.value.token}" in str(ei.value)
    with pytest.raises(GrammarError):  # errors are sticky
        g.forced_tokens()


def test_depth_and_breadth_limits_enforced(qwen3_tokenizer):
    leaf = {"thought": "x", "conclusion": "y"}
    node = leaf
    for _ in range(4):
        node = {"thought": "t", "subtasks": [node], "conclusion": "c"}
    too_deep = dumps({"reasoning": [node], "answer": "a"})  # 5 levels
    too_wide = dumps({"reasoning": [{"thought": "t", "subtasks": [leaf] * 4, "conclusion": "c"}], "answer": "a"})
    for text in (too_deep, too_wide):
        g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
        with pytest.raises(GrammarError):
            g.consume(qwen3_tokenizer.encode(text, add_special_tokens=False))
    ok = dumps({"reasoning": [{"thought": "t", "subtasks": [leaf] * 3, "conclusion": "c"}], "answer": "a"})
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    g.consume(qwen3_tokenizer.encode(ok, add_special_tokens=False))
    assert g.is_accepting()


def test_no_special_tokens_inside_strings_and_padding_bits(qwen3_tokenizer):
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    g.consume(qwen3_tokenizer.encode('{"reasoning": [{"thought": "abc', add_special_tokens=False))
    mask = np.full(mask_words(QWEN3_MODEL_VOCAB), -1, np.int32)  # garbage in: every bit set
    g.fill_mask(mask)
    b = bits(mask)
    assert b.shape[0] == 32 * mask_words(QWEN3_MODEL_VOCAB) and b.sum() > 100_000  # ordinary text allowed
    assert b[QWEN3_N_RANKS:].sum() == 0  # no added token (<think>, <|im_end|>, ...) and no padding id
    with pytest.raises(ValueError):
        g.fill_mask(np.zeros(10, np.int32))
    with pytest.raises(GrammarError, match="151667"):
        g.consume([151667])  # <think> inside a string
    g2 = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    with pytest.raises(GrammarError, match="outside"):
        g2.consume([QWEN3_MODEL_VOCAB - 1])  # a padding row of the model


def test_forced_tokens_consistent(qwen3_tokenizer, doc_text):
    llt = llg_tokenizer(qwen3_tokenizer, QWEN3_MODEL_VOCAB)
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    data = doc_text.encode()
    ff0 = g.forced_tokens()
    # reasoning needs at least one task, so the grammar forces the document's opening through the first key
    assert data.startswith(llt.decode_bytes(ff0)) and llt.decode_bytes(ff0).startswith(b'{"reasoning": [{"')
    pos = 0
    n_forced = 0
    for t in qwen3_tokenizer.encode(doc_text, add_special_tokens=False):
        ff = g.forced_tokens()
        if ff:
            fb = llt.decode_bytes(ff)
            assert data[pos:].startswith(fb), (fb, data[pos : pos + 40])
            assert g.allowed().tolist().count(ff[0]) == 1
            n_forced += 1
        g.consume([t])
        pos += len(llt.decode_bytes([t]))
    assert n_forced > 5
    # consuming the forced tokens themselves works (fast-forward)
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    g.consume(g.forced_tokens())
    assert g.n_consumed == len(ff0)


def test_any_tokenization_and_rollback(qwen3_tokenizer):
    llt = llg_tokenizer(qwen3_tokenizer, QWEN3_MODEL_VOCAB)
    head = '{"reasoning": [{"thought": "t", "subtasks": [{"thought": "a", "conclusion": "b"}], "conclusion": "c"}], "answer": "z"}'
    canon = qwen3_tokenizer.encode(head, add_special_tokens=False)
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    g.consume(canon)
    assert g.is_accepting()
    # byte-by-byte greedy pieces: every token is the tokenization of a 1-3 byte piece
    data = head.encode()
    alt = [t for k in range(0, len(data), 3) for t in llt.tokenize_bytes(data[k : k + 3])]
    assert alt != canon
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    g.consume(alt)
    assert g.is_accepting()
    # rollback then a different tokenization of the same bytes (what a tracker Split does)
    g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    pre = qwen3_tokenizer.encode('{"reasoning": [{"thought": "t", "subtasks":', add_special_tokens=False)
    g.consume(pre)
    (tok,) = qwen3_tokenizer.encode(' [{"', add_special_tokens=False)
    g.consume([tok])
    g.rollback(1)
    assert g.n_consumed == len(pre)
    g.consume(llt.tokenize_bytes(b" [") + llt.tokenize_bytes(b'{"'))
    with pytest.raises(ValueError):
        g.rollback(g.n_consumed + 1)
    f = g.fork()
    f.consume(qwen3_tokenizer.encode("thought", add_special_tokens=False))
    assert f.n_consumed == g.n_consumed + 1 and not g.is_error()


def _tiny_tokenizer():
    """Byte-level BPE with 256 single-byte tokens, a few merges and an EOS: vocab 259, model pads to 320."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    q, lb = b2u[ord('"')], b2u[ord("[")]
    vocab[q + b2u[ord(":")]] = 256
    vocab[b2u[ord(" ")] + lb] = 257
    merges = [(q, b2u[ord(":")]), (b2u[ord(" ")], lb)]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True, normalized=False)])
    assert tok.token_to_id("<eos>") == 258
    return tok


def test_tiny_tokenizer():
    tok = _tiny_tokenizer()
    sch = tim_schema(max_depth=2)
    g = make_grammar(tok, sch.json_schema(), 320, eos_token=258)
    text = dumps(
        {
            "reasoning": [{"thought": "ü[x]", "subtasks": [{"thought": "a", "conclusion": "b"}], "conclusion": "c"}],
            "answer": "done",
        }
    )
    ids = tok.encode(text).ids
    assert 256 in ids and 257 in ids
    mask = np.full(mask_words(320), -1, np.int32)
    g.fill_mask(mask)
    assert bits(mask)[259:].sum() == 0 and bits(mask)[ord("{")] == 1 and bits(mask).sum() == 1
    g.consume(ids[:-1])
    g.fill_mask(mask)
    assert bits(mask)[258] == 0 and bits(mask)[ids[-1]] == 1
    g.consume(ids[-1:])
    assert g.is_stopped() and g.allowed().tolist() == [258]
    g.consume([258])
    g2 = make_grammar(tok, sch.json_schema(), 320, eos_token=258)
    with pytest.raises(GrammarError, match="token 258"):
        g2.consume(tok.encode('{"reasoning": [{"thought": "').ids + [258])
    with pytest.raises(ValueError):
        LLGuidanceGrammar.from_json_schema(llg_tokenizer(tok, 320, 258), sch.json_schema(), 320).fill_mask(
            np.zeros(mask_words(320), np.int64)
        )


def test_bits_past_tokenizer_cleared():
    """The grammar clears mask bits from ``n_tokens`` on, whatever llguidance wrote (partial word too)."""
    tok = _tiny_tokenizer()
    llt = llg_tokenizer(tok, 320, 258)
    sch = tim_schema(max_depth=1).json_schema()
    full = LLGuidanceGrammar.from_json_schema(llt, sch, 320)
    cut = LLGuidanceGrammar.from_json_schema(llt, sch, 320, n_tokens=200)
    prefix = list(b'{"reasoning": [{"thought": "')  # id i is byte i
    full.consume(prefix)
    cut.consume(prefix)
    a, b = full.allowed(), cut.allowed()
    assert a.max() >= 200 and 244 in a  # UTF-8 lead bytes (and " [") are allowed inside a string
    assert b.tolist() == [t for t in a.tolist() if t < 200]
    with pytest.raises(GrammarError, match="outside"):
        cut.consume([201])


def test_batched_mask_fill_equals_one_at_a_time(qwen3_tokenizer, doc_text):
    """``fill_masks`` (every row on llguidance's threads) writes each grammar's own mask into its row, the
    padding ids cleared, and leaves other rows alone; a grammar in an error state gets an error and an
    all-allowed row while the others are filled."""
    from timjax.tim.grammar import fill_masks

    ids = qwen3_tokenizer.encode(doc_text, add_special_tokens=False)
    W = mask_words(QWEN3_MODEL_VOCAB)
    grammars, states = [], [0, 1, 7, len(ids) // 2, len(ids) - 1]  # different places in the document
    for n in states:
        g = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
        g.consume(ids[:n])
        grammars.append(g)
    rows = [4, 0, 6, 2, 5]  # slots out of order; rows 1, 3 and 7 belong to nobody
    out = np.full((8, W), 0x5A5A5A5A, np.int32)
    assert fill_masks(grammars, out, rows) == {}
    for g, r in zip(grammars, rows):
        one = np.zeros(W, np.int32)
        g.fill_mask(one)
        np.testing.assert_array_equal(out[r], one)
    for r in (1, 3, 7):
        assert (out[r] == 0x5A5A5A5A).all()

    broken = make_grammar(qwen3_tokenizer, SCHEMA.json_schema(), QWEN3_MODEL_VOCAB)
    broken._m.consume_token(ids[1])  # the wrong first token (the raw matcher: no check) puts it in error
    assert broken._m.is_error()
    out[:] = 0
    errors = fill_masks([grammars[0], broken], out, [0, 1])
    assert list(errors) == [1] and "error state" in errors[1]
    assert (out[1] == -1).all() and bits(out[0]).sum() > 0
