"""tim_schema: JSON schema layout (depth / breadth / title / answer type / tools) and parsing."""

from __future__ import annotations

import json

import llguidance
import pytest
from pydantic import BaseModel

from timjax.tim import Response, Task, ToolSpec, dumps, iter_tasks, tim_schema
from timjax.tim.schema import JSON_OPTIONS


class Inner(BaseModel):
    city: str
    year: int


class LookupArgs(BaseModel):
    where: Inner
    limit: int = 3


class Answer(BaseModel):
    value: float
    unit: str


TOOLS = [
    ToolSpec(
        name="search",
        description="web",
        input_schema={
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(name="lookup", description="db", input_schema=LookupArgs.model_json_schema()),
]


def _valid(schema: dict) -> None:
    err = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    assert err == "", err


def test_default_schema_layout():
    s = tim_schema().json_schema()
    _valid(s)
    assert (
        s["x-guidance"] == JSON_OPTIONS == {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    )
    assert list(s["properties"]) == ["reasoning", "answer"] and s["required"] == ["reasoning", "answer"]
    task = s["$defs"]["Task"]
    assert list(task["properties"]) == ["thought", "subtasks", "conclusion"]  # no tools -> no tooluse
    assert task["required"] == ["thought", "conclusion"] and task["additionalProperties"] is False
    assert task["properties"]["subtasks"] == {"type": "array", "items": {"$ref": "#/$defs/Task"}, "minItems": 1}
    assert s["properties"]["answer"] == {"type": "string"}


def test_depth_breadth_title():
    s = tim_schema(max_depth=3, max_subtasks=5, title=True).json_schema()
    _valid(s)
    d = s["$defs"]
    assert set(d) == {"Task1", "Task2", "Task3"}
    assert s["properties"]["reasoning"]["items"] == {"$ref": "#/$defs/Task1"}
    assert d["Task1"]["properties"]["subtasks"]["items"] == {"$ref": "#/$defs/Task2"}
    assert d["Task2"]["properties"]["subtasks"]["maxItems"] == 5
    assert "subtasks" not in d["Task3"]["properties"]
    for t in d.values():
        assert list(t["properties"])[:2] == ["title", "thought"] and t["required"][0] == "title"
    assert "subtasks" not in tim_schema(max_depth=1).json_schema()["$defs"]["Task1"]["properties"]
    with pytest.raises(ValueError):
        tim_schema(max_depth=0)
    with pytest.raises(ValueError):
        tim_schema(max_subtasks=0)


def test_tools_have_their_own_parameter_schemas():
    s = tim_schema(TOOLS, max_depth=2).json_schema()
    _valid(s)
    d = s["$defs"]
    assert d["ToolUse"] == {"anyOf": [{"$ref": "#/$defs/ToolUse_search"}, {"$ref": "#/$defs/ToolUse_lookup"}]}
    assert list(d["Task1"]["properties"]) == ["thought", "tooluse", "subtasks", "conclusion"]
    su, lu = d["ToolUse_search"], d["ToolUse_lookup"]
    assert list(su["properties"]) == ["tool_name", "parameters", "tool_result"]
    assert su["properties"]["tool_name"] == {"const": "search"} and lu["properties"]["tool_name"] == {"const": "lookup"}
    assert su["properties"]["parameters"]["required"] == ["query"]
    # the pydantic tool schema's $defs were hoisted and its refs rewritten
    ref = lu["properties"]["parameters"]["properties"]["where"]["$ref"]
    assert ref == "#/$defs/Params_lookup__Inner" and d["Params_lookup__Inner"]["required"] == ["city", "year"]
    assert "type" not in su["properties"]["tool_result"]  # any JSON value (timjax.tools.encoding)
    assert su["properties"]["parameters"]["additionalProperties"] is False  # unknown arguments refused
    with pytest.raises(ValueError):
        tim_schema([TOOLS[0], TOOLS[0]])
    one = tim_schema(TOOLS[:1]).json_schema()
    assert one["$defs"]["ToolUse"] == {"$ref": "#/$defs/ToolUse_search"}


def test_answer_type_and_parse():
    sch = tim_schema(answer_type=Answer, max_depth=2)
    s = sch.json_schema()
    _valid(s)
    assert s["properties"]["answer"]["properties"]["value"]["type"] == "number"
    doc = {
        "reasoning": [{"thought": "t", "subtasks": [{"thought": "a", "conclusion": "b"}], "conclusion": "c"}],
        "answer": {"value": 1.5, "unit": "m"},
    }
    r = sch.parse(dumps(doc))
    assert isinstance(r, Response) and r.answer == Answer(value=1.5, unit="m")
    assert [p for p, _ in iter_tasks(r)] == [(0,), (0, 0)]
    assert isinstance(r.reasoning[0].subtasks[0], Task)
    with pytest.raises(ValueError):  # answer must follow answer_type
        sch.parse(dumps({**doc, "answer": "x"}))
    deep = {
        "reasoning": [
            {
                "thought": "t",
                "subtasks": [{"thought": "a", "subtasks": [{"thought": "x", "conclusion": "y"}], "conclusion": "b"}],
                "conclusion": "c",
            }
        ],
        "answer": {"value": 1, "unit": "s"},
    }
    with pytest.raises(ValueError, match="deeper"):
        sch.parse(dumps(deep))
    with pytest.raises(ValueError):
        sch.parse('{"reasoning": []}')


def test_parse_tools_and_limits():
    sch = tim_schema(TOOLS, max_subtasks=1)
    doc = {
        "reasoning": [
            {
                "thought": "t",
                "tooluse": {"tool_name": "search", "parameters": {"query": "q"}, "tool_result": "r"},
                "conclusion": "c",
            }
        ],
        "answer": "42",
    }
    text = dumps(doc)
    assert text == json.dumps(doc, ensure_ascii=False)  # the grammar's layout is json.dumps' default
    r = sch.parse(text.encode())
    assert r.reasoning[0].tooluse.parameters == {"query": "q"} and r.answer == "42"
    bad = json.loads(text)
    bad["reasoning"][0]["tooluse"]["tool_name"] = "nope"
    with pytest.raises(ValueError, match="unknown tool"):
        sch.parse(dumps(bad))
    two = {
        "reasoning": [{"thought": "t", "subtasks": [{"thought": "a", "conclusion": "b"}] * 2, "conclusion": "c"}],
        "answer": "x",
    }
    with pytest.raises(ValueError, match="subtasks"):
        sch.parse(dumps(two))
