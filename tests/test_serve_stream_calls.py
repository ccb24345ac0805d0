"""Streamed function calls (``timjax.serve.generation.StreamCalls``): whatever the cut points of a
function-calling document, the ``delta.tool_calls`` entries accumulate (as the openai client does) to the
document's calls, names first, with arguments that parse to the written ones."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from timjax.serve.generation import StreamCalls, calls_so_far

names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.none(), st.text(max_size=12),
                    st.sampled_from(['"arguments": ', '{"a": 1}', "\\", '"', "]}"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
calls = st.lists(st.tuples(names, st.dictionaries(st.text(max_size=8), values, max_size=4)), min_size=1, max_size=3)


def document(cs) -> str:
    return json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in cs]}, ensure_ascii=False)


@settings(max_examples=200, deadline=None)
@given(calls, st.lists(st.integers(1, 9), min_size=1, max_size=50))
def test_streamed_calls_accumulate_to_the_document_calls(cs, cuts):
    doc = document(cs)
    stream, entries, i, k = StreamCalls(), [], 0, 0
    while i < len(doc):
        n = cuts[k % len(cuts)]
        entries += stream.feed(doc[i : i + n])
        i, k = i + n, k + 1
    got: dict[int, dict] = {}
    for e in entries:
        if "id" in e:  # a call's first entry: complete name, empty arguments, before any fragment
            assert e["index"] not in got and e["function"]["arguments"] == "" and e["type"] == "function"
            got[e["index"]] = {"name": e["function"]["name"], "arguments": ""}
        else:
            got[e["index"]]["arguments"] += e["function"]["arguments"]
    assert sorted(got) == list(range(len(cs)))
    assert [(got[j]["name"], json.loads(got[j]["arguments"])) for j in range(len(cs))] == cs
    assert [(got[j]["name"], got[j]["arguments"]) for j in range(len(cs))] == calls_so_far(doc)


def test_a_cut_document_gives_the_calls_begun():
    doc = document([("add", {"a": 1, "b": [2, 3]}), ("mul", {"x": "y"})])
    cut = doc[: doc.index('"mul"') + 30]
    (first, second) = calls_so_far(cut)
    assert first == ("add", '{"a": 1, "b": [2, 3]}')
    assert second[0] == "mul" and '{"x": "y"}'.startswith(second[1])
    assert calls_so_far('{"tool_calls": [{"name": "ad') == []
