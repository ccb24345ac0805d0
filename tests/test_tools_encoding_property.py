"""Property: whatever a tool answers (arbitrary strings with control characters, DEL, non-characters and
lone surrogates; bytes decoded with replacement; nested JSON values), its encoding is accepted by the TIM
grammar after ``"tool_result": `` and the parsed tree's ``tool_result`` is the same value, with the stated
replacement (a lone surrogate reads as U+FFFD)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timjax.tim.schema import ToolSpec, dumps, tim_schema
from timjax.tools.encoding import encode_error, encode_result, encode_value

TOOL = ToolSpec(name="t", input_schema={"type": "object", "properties": {}})
SCHEMA = tim_schema([TOOL])


@pytest.fixture(scope="module")
def accepts():
    from transformers import AutoTokenizer

    from timjax.api import default_model_path
    from timjax.tim.grammar import GrammarError, llg_tokenizer, make_grammar

    tok = AutoTokenizer.from_pretrained(default_model_path())  # 576 tokens with byte fallback: fast
    llt = llg_tokenizer(tok, len(tok), [tok.eos_token_id])
    js = SCHEMA.json_schema()

    def check(encoded: str):
        doc = (
            '{"reasoning": [{"thought": "x", "tooluse": {"tool_name": "t", "parameters": {}, "tool_result": '
            + encoded
            + '}, "conclusion": "c"}], "answer": "a"}'
        )
        g = make_grammar(tok, js, len(tok), eos_token=[tok.eos_token_id])
        try:
            g.consume(llt.tokenize_bytes(doc.encode("utf-8")))
        except GrammarError as e:
            raise AssertionError(f"the grammar refused {encoded!r}: {e}") from None
        assert g.is_accepting(), encoded
        return SCHEMA.parse(doc).reasoning[0].tooluse.tool_result

    return check


_SURROGATE = re.compile("[\ud800-\udfff]")


def replaced(v):
    """The stated replacement: lone surrogates (no UTF-8 form) read back as U+FFFD."""
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, list):
        return [replaced(x) for x in v]
    if isinstance(v, dict):
        return {replaced(k): replaced(x) for k, x in v.items()}
    return v


# every code point, surrogates included: st.text() leaves those out
any_char = st.integers(0, 0x10FFFF).map(chr)
edge_char = st.sampled_from(["\x7f", "\x00", "\x1f", "\x85", "\x9f", "\ufdd0", "\ufffe", "\uffff", "\U0010fffe",
                             "\u2028", "\ud800", "\udfff", '"', "\\", "/", "\n", "\t", "\ufeff", "\U0001f600"])
text = st.text(st.one_of(any_char, edge_char), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
    max_leaves=12,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(value=json_values.filter(lambda v: v is not None))  # structuredContent None means "none given"
def test_structured_values_round_trip(accepts, value):
    encoded = encode_result({"structuredContent": value, "content": []})
    assert accepts(encoded) == replaced(value)
    assert encoded == dumps(json.loads(encoded)) == encode_value(replaced(value))


@SETTINGS
@given(value=text)
def test_text_results_round_trip(accepts, value):
    got = accepts(encode_result({"content": [{"type": "text", "text": value}]}))
    want = replaced(value)
    try:  # a text holding JSON (finite numbers only) is that value, canonically; else the text itself
        want = json.loads(dumps(json.loads(want, parse_constant=float)).replace("Infinity", "x"))
    except ValueError:
        pass
    assert got == want


def test_text_that_is_almost_json_stays_text(accepts):
    for t in ["NaN", "1e999", "[1, Infinity]", '{"a": 1', "{\n  \"result\": 13\n}"]:
        want = {"result": 13} if "result" in t else t
        assert accepts(encode_result({"content": [{"type": "text", "text": t}]})) == want


@SETTINGS
@given(raw=st.binary(max_size=40))
def test_bytes_decoded_with_replacement_round_trip(accepts, raw):
    value = raw.decode("utf-8", errors="replace")
    assert accepts(encode_value(value)) == value


@SETTINGS
@given(message=text)
def test_errors_are_accepted(accepts, message):
    out = accepts(encode_error(message))
    assert set(out) == {"error"} and isinstance(out["error"], str)
