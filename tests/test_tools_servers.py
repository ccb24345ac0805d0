"""The shipped MCP servers (pure functions and in-process MCP) and the tool-result encoding."""

import json
from fractions import Fraction

import anyio
import pytest

from timjax.tim.schema import ToolSpec, dumps, tim_schema
from timjax.tools.encoding import (
    encode_error,
    encode_result,
    encode_value,
    truncate_encoded,
)
from timjax.tools.servers import calculator, kb

VOCAB = 151_936


# -- calculator ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op,a,b,want",
    [
        ("add", 3, 4, 7),
        ("sub", 3, "10", -7),
        ("mul", "2/3", "3/4", "1/2"),
        ("div", 7, 2, "7/2"),
        ("div", "-6/4", "3", "-1/2"),
        ("mul", 10**40, 10**40, 10**80),
        ("add", "1/3", "2/3", 1),
    ],
)
def test_calculator_is_exact(op, a, b, want):
    assert calculator.calculate(op, a, b) == {"result": want}
    f = {"add": Fraction.__add__, "sub": Fraction.__sub__, "mul": Fraction.__mul__, "div": Fraction.__truediv__}[op]
    assert Fraction(want) == f(Fraction(a), Fraction(b))


@pytest.mark.parametrize(
    "op,a,b,msg",
    [
        ("div", 1, 0, "division by zero"),
        ("div", 1, "0/5", "division by zero"),
        ("add", "1/0", 1, "zero denominator"),
        ("add", "2+2", 1, "not an integer or a fraction"),
        ("add", "__import__('os')", 1, "not an integer"),
        ("add", True, 1, "expected an integer"),
        ("add", 1.5, 1, "expected an integer"),
        ("pow", 2, 3, "unknown op"),
        ("mul", "9" * 150, "9" * 150, "more than 200 digits"),
    ],
)
def test_calculator_refuses(op, a, b, msg):
    with pytest.raises(calculator.CalculatorError, match=msg):
        calculator.calculate(op, a, b)


# -- knowledge base --------------------------------------------------------------------------------
def test_kb_is_deterministic_and_consistent():
    a, b, c = kb.generate_kb(0), kb.generate_kb(0), kb.generate_kb(1)
    assert a.facts == b.facts and a.facts != c.facts
    assert len(a.entities("person")) == 60 and len(a.entities("country")) == 6
    names = [e.casefold() for e in a.facts]
    assert len(set(names)) == len(names)
    for p in a.entities("person"):  # every reference points at an entity of the right kind
        f = a.facts[p]
        assert a.kinds[f["born_in"]] == a.kinds[f["lives_in"]] == "city"
        assert a.kinds[f["friend"]] == "person" and f["friend"] != p and a.kinds[f["employer"]] == "company"
    for k in a.entities("country"):
        assert a.facts[a.facts[k]["capital"]]["country"] == k
    # a four-hop chain resolves
    p = a.entities("person")[5]
    city = kb.lookup(a, kb.lookup(a, p, "friend")["result"], "born_in")["result"]
    assert kb.lookup(a, kb.lookup(a, city, "country")["result"], "capital")["result"] in a.entities("city")
    assert kb.lookup(a, p.upper(), "age") == {"result": a.facts[p]["age"]}
    with pytest.raises(kb.LookupError_, match="unknown entity 'Nobody'"):
        kb.lookup(a, "Nobody", "age")
    with pytest.raises(kb.LookupError_, match="is a city; its relations are country, population"):
        kb.lookup(a, a.entities("city")[0], "age")


# -- the same answers through MCP, encoded --------------------------------------------------------
def _mcp_calls(server, calls):
    from mcp import Client

    async def main():
        async with Client(server) as c:
            tools = (await c.list_tools()).tools
            return tools, [await c.call_tool(n, a) for n, a in calls]

    return anyio.run(main)


def test_servers_over_mcp_encode_like_the_pure_functions():
    k = kb.generate_kb(0)
    p = k.entities("person")[0]
    tools, res = _mcp_calls(
        calculator.make_server(),
        [("calculator", {"op": "div", "a": 3, "b": "9/2"}), ("calculator", {"op": "div", "a": 3, "b": 0})],
    )
    assert [t.name for t in tools] == ["calculator"]
    assert tools[0].input_schema["properties"]["op"]["enum"] == list(calculator.OPS)
    assert encode_result(res[0]) == encode_result(calculator.calculate("div", 3, "9/2")) == '{"result": "2/3"}'
    assert (
        res[1].is_error and encode_result(res[1]) == encode_error("division by zero") == '{"error": "division by zero"}'
    )
    tools, res = _mcp_calls(
        kb.make_server(k),
        [("lookup", {"entity": p, "relation": "friend"}), ("lookup", {"entity": "Nobody", "relation": "age"})],
    )
    assert encode_result(res[0]) == encode_value(kb.lookup(k, p, "friend")) == dumps({"result": k.facts[p]["friend"]})
    assert encode_result(res[1]) == encode_error("unknown entity 'Nobody'")


# -- encoding --------------------------------------------------------------------------------------
VALUES = [
    {"result": 7},
    {"result": "7/3"},
    'text "quoted"\n\tünï 日本',
    [1, [2, {"a": None}], True],
    1e20,
    -0.5,
    12345678901234567890123,
    {"a": {"b": {"c": {"d": [[[[1]]]]}}}},
    {"subtasks": [{"x": "]"}]},
    "",
    {},
    [],
]


@pytest.mark.parametrize("value", VALUES)
def test_encoding_round_trips(value):
    text = encode_value(value)
    assert json.loads(text) == value and dumps(json.loads(text)) == text and "\n" not in text


def test_encoding_of_results_and_errors():
    text = {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert encode_result(text) == '["a", "b"]'  # several text blocks: a list of their values
    assert (
        encode_result({"content": [{"type": "image", "data": "..."}]})
        == '{"error": "unsupported result content: image"}'
    )
    assert encode_result({"structuredContent": {"x": float("nan")}}) == '{"error": "invalid result: NaN and infinities are not JSON numbers"}'
    assert encode_result({"content": [{"type": "text", "text": "bad \udcff"}]}) == '"bad \ufffd"'  # no UTF-8 form
    assert encode_result({"content": [], "isError": True}) == '{"error": "the tool reported an error"}'
    long = encode_error("x" * 1000)
    assert len(json.loads(long)["error"]) == 300 and json.loads(long)["error"].endswith("…")


def test_truncation_keeps_a_visible_marker_within_the_cap(qwen3_tokenizer):
    count = lambda s: len(qwen3_tokenizer.encode(s, add_special_tokens=False))
    big = encode_value({"result": "word " * 2000})
    out, n = truncate_encoded(big, 64, count)
    assert n == count(big) > 64 and count(out) <= 64
    obj = json.loads(out)
    assert obj["error"] == "result truncated: over the cap of 64 tokens"
    assert big.startswith(obj["partial"][:-1]) and len(obj["partial"]) > 20
    assert truncate_encoded('{"result": 7}', 64, count) == ('{"result": 7}', count('{"result": 7}'))
    tiny, _ = truncate_encoded(big, 12, count)
    assert json.loads(tiny) == {"error": "result truncated: over the cap of 12 tokens"}


def test_grammar_accepts_every_encoding_as_tool_result(qwen3_tokenizer):
    """The TIM schema types tool_result as any JSON value; llguidance accepts each encoding after the key."""
    from timjax.tim.grammar import GrammarError, llg_tokenizer, make_grammar

    spec = ToolSpec(
        name="calculator", description="d", input_schema=_mcp_calls(calculator.make_server(), [])[0][0].input_schema
    )
    schema = tim_schema([spec]).json_schema()
    llt = llg_tokenizer(qwen3_tokenizer, VOCAB, [151645])
    encodings = [encode_value(v) for v in VALUES] + [encode_error("boom"), encode_result({"content": []})]
    for enc in encodings:
        doc = (
            '{"reasoning": [{"thought": "t", "tooluse": {"tool_name": "calculator", "parameters": {"op": "add", '
            '"a": "2/3", "b": 1}, "tool_result": ' + enc + '}, "conclusion": "c"}], "answer": "a"}'
        )
        g = make_grammar(qwen3_tokenizer, schema, VOCAB, eos_token=[151645])
        g.consume(llt.tokenize_bytes(doc.encode()))
        assert g.is_accepting(), enc
    # ... but not another layout, nor invented or mistyped arguments
    for bad in [
        '"tool_result": {"result":7}',
        '"parameters": {"op": "add", "a": 1, "b": 2, "c": 3}',
        '"parameters": {"op": "pow", "a": 1, "b": 2}',
        '"parameters": {"op": "add", "a": "1.5", "b": 2}',
    ]:
        doc = (
            '{"reasoning": [{"thought": "t", "tooluse": {"tool_name": "calculator", "parameters": {"op": "add", '
            '"a": 1, "b": 1}, "tool_result": 1}, "conclusion": "c"}], "answer": "a"}'
        )
        key = bad.split(":")[0]
        start = doc.index(key)
        end = doc.index(', "tool_result"') if key == '"parameters"' else doc.index('}, "conclusion"')
        doc = doc[:start] + bad + doc[end:]
        g = make_grammar(qwen3_tokenizer, schema, VOCAB, eos_token=[151645])
        with pytest.raises(GrammarError):
            g.consume(llt.tokenize_bytes(doc.encode()))
