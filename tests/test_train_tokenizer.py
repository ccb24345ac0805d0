"""The small BPE: round trip, offline loading, chat template, llguidance acceptance, token boundaries."""

from __future__ import annotations

import numpy as np
from _train_helpers import small_problems, tokenizer, tokenizer_dir

from timjax.train.corpus import document_text


def test_round_trip_and_offline_loading():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    for p in small_problems()[:40]:
        text = document_text(p)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < len(text) / 1.5  # it compresses (a byte-level model would not)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_chat_template_renders_the_user_turn_only():
    tok = tokenizer()
    msgs = [{"role": "system", "content": "a long format description"}, {"role": "user", "content": "Calculate 1 + 2."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nCalculate 1 + 2.<|im_end|>\n<|im_start|>assistant\n"


def test_no_token_straddles_a_list_bracket_or_the_tool_result_key():
    tok = tokenizer()
    n = tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    for i in range(n):
        s = tok.decode([i])
        if "[" in s or "]" in s:
            assert len(s) == 1, s
        if '_result"' in s:
            assert s.endswith('_result"'), s
        assert not any(c.isdigit() for c in s) or len(s) == 1, s  # digits are single tokens


def test_llguidance_accepts_the_tokenizer_and_every_document():
    from timjax.tim.grammar import make_grammar
    from timjax.train.tools_adapter import default_backend, training_schema

    tok = tokenizer()
    schema = training_schema(default_backend())
    g = make_grammar(tok, schema.json_schema(), 704, eos_token=[tok.eos_token_id])
    allowed = g.allowed()
    assert 0 < len(allowed) < 704 and all(a < 704 for a in allowed)
    for p in small_problems()[:30]:
        text = document_text(p)
        g = make_grammar(tok, schema.json_schema(), 704, eos_token=[tok.eos_token_id])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        g.consume(ids)  # raises GrammarError on a rejected token
        assert g.is_accepting()
    assert np.all(np.diff(sorted(set(allowed))) > 0)


def test_a_copied_name_or_subexpression_is_the_same_tokens_wherever_it_appears():
    """The model copies names and sub-expressions between the question, tool calls and thoughts; copying
    is only learnable in general if the copied text is the same token ids in every context."""
    tok = tokenizer()

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def contains(hay, needle):
        return any(hay[i : i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))

    p = next(p for p in small_problems() if p.kind == "lookup")
    name = p.data["start"]
    core = ids(name)
    for context in (p.question, f'"entity": "{name}"', f"Find the country of {name}.", f"Start from {name}: x."):
        assert contains(ids(context), core), (context, core)
    sub = ids("(8 + 14)")
    for context in ("Calculate -((8 + 14) + 15).", '"Compute (8 + 14) + 15."', "(3 * (8 + 14))"):
        assert contains(ids(context), sub), context


def test_spelled_names_are_letters_and_template_words_stay_whole():
    from timjax.train.sft import name_words
    from timjax.train.tokenizer import train_tokenizer
    from timjax.train.tools_adapter import default_backend

    tools = default_backend()
    probs = small_problems()
    texts = [p.question for p in probs] + [document_text(p, tools) for p in probs]
    tok = train_tokenizer(texts, 700, spell=name_words(tools))
    p = next(p for p in probs if p.kind == "lookup")
    name = p.data["start"]
    pieces = [tok.decode([i]) for i in tok.encode(name).ids]
    assert pieces == [c for c in name], pieces  # letter by letter (the space between words included)
    for word in ("Compute", "thought", "subtasks", "birthplace", "friend", "Find"):
        if word in " ".join(texts):
            assert len(tok.encode(word).ids) == 1, word
    # the name is the same ids in the question, a tool call and a thought
    core = tok.encode(name).ids
    for context in (p.question, f'"entity": "{name}"', f"Find the country of {name}."):
        ids = tok.encode(context).ids
        assert any(ids[i : i + len(core)] == core for i in range(len(ids))), context
