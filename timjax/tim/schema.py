"""TIM's output format: pydantic models and the JSON schema that constrains decoding.

The model writes one JSON document (paper, Figure 2)::

    Response = {"reasoning": [Task, ...], "answer": str | <answer_type>}
    Task     = {"title"?: str, "thought": str, "tooluse"?: ToolUse, "subtasks"?: [Task, ...], "conclusion": str}
    ToolUse  = {"tool_name": <one of the tools>, "parameters": <that tool's input schema>, "tool_result": str}

Decisions (the tracker in ``tree.py`` relies on them):

* Keys come in the declared order (``title, thought, tooluse, subtasks, conclusion``; llguidance emits
  ``properties`` in order) and the text has no free whitespace: ``x-guidance`` sets
  ``whitespace_flexible: false``, ``item_separator: ", "``, ``key_separator: ": "``, i.e. exactly
  ``json.dumps``' default layout. ``additionalProperties`` is false everywhere we control.
* Optional members (``tooluse``, ``subtasks``) are *omitted* rather than ``null`` in the grammar;
  ``subtasks`` has ``minItems: 1`` (an empty list would be a pruned list's skeleton, see ``tree.py``).
  ``title`` is part of the grammar (required, first) only when ``tim_schema(title=True)``.
* ``max_depth`` unrolls the recursion into ``Task1 .. TaskD`` definitions (depth 1 = no ``subtasks``);
  ``None`` keeps one recursive ``Task`` definition. ``max_subtasks`` sets ``maxItems`` on every
  subtask list (not on the top-level ``reasoning`` list, which needs at least one task).
* ``tooluse`` exists only when tools are given: ``anyOf`` over one object per tool,
  ``{"tool_name": {"const": name}, "parameters": <tool.input_schema>, "tool_result": <any JSON value>}``,
  so the tool name decides the parameters' schema (an object schema that does not say otherwise gets
  ``additionalProperties: false``: the model cannot invent arguments). ``tool_result`` is written by the
  runtime, never sampled: the tracker emits ``ToolCallReady`` when the ``"tool_result"`` key is complete
  (a token never straddles that key's closing quote, see ``tree.py``) and the runtime forces ``": "`` +
  ``timjax.tools.encoding.encode_result(...)``: the tool's structured content as JSON, else its text as a
  JSON string, or ``{"error": ...}``. An arbitrary JSON value (rather than a string holding JSON) costs
  fewer tokens and no escaping; llguidance accepts any value laid out as ``dumps`` writes it (tested).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "FIELD_ORDER",
    "JSON_OPTIONS",
    "Response",
    "Task",
    "TimSchema",
    "ToolSpec",
    "ToolUse",
    "dumps",
    "iter_dumps",
    "strict_input_schema",
    "tim_schema",
    "with_tools",
]

FIELD_ORDER = ("title", "thought", "tooluse", "subtasks", "conclusion")
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ITEM_SEPARATOR,
    "key_separator": KEY_SEPARATOR,
}


class ToolUse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool_name: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    tool_result: Any = None  # written by the runtime: any JSON value (see timjax.tools.encoding)


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: Optional[str] = None
    thought: str
    tooluse: Optional[ToolUse] = None
    subtasks: Optional[list["Task"]] = None
    conclusion: str


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reasoning: list[Task] = Field(min_length=1)
    answer: Any  # str, or an instance of the schema's answer_type


class ToolSpec(BaseModel):
    name: str
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


# What json.dumps(ensure_ascii=False) leaves raw but the grammar's canonical JSON strings refuse: DEL
# (llguidance wants it as \u007f, like the C0 controls json.dumps already escapes) and lone surrogates (no
# UTF-8 form at all: replaced by U+FFFD). Everything else stays raw: llguidance refuses an escaped C1
# control, non-character or surrogate pair (measured; tests/test_tools_encoding_property.py).
_UNSAFE = re.compile("[\x7f\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    return "\\u007f" if m.group() == "\x7f" else "\ufffd"


def iter_dumps(obj: Any, *, allow_nan: bool = True):
    """``dumps(obj)`` in pieces, so a caller can stop reading a huge value after a prefix."""
    enc = json.JSONEncoder(ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR), allow_nan=allow_nan)
    for chunk in enc.iterencode(obj):
        yield _UNSAFE.sub(_escape, chunk) if _UNSAFE.search(chunk) else chunk


def dumps(obj: Any) -> str:
    """Serialise exactly as the grammar lays text out (json.dumps defaults, UTF-8 kept, DEL escaped,
    lone surrogates replaced by U+FFFD): the grammar accepts whatever string the value holds."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", exclude_none=True)
    text = json.dumps(obj, ensure_ascii=False, separators=(ITEM_SEPARATOR, KEY_SEPARATOR))
    # outside strings json.dumps writes only ASCII structure and numbers, so this touches strings only
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


_DEF_NAME = re.compile(r"[^A-Za-z0-9_]")


def strict_input_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's input schema with ``additionalProperties: false`` added at the top level when it lists
    ``properties`` and says nothing about others (MCP servers usually omit it). The grammar and the
    runtime's argument validation both use this form, so unknown keys are refused, not dropped."""
    schema = copy.deepcopy(schema)
    if isinstance(schema, dict) and "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def _hoist_defs(schema: dict, prefix: str, defs: dict) -> dict:
    """Move a sub-schema's local ``$defs``/``definitions`` into ``defs`` under ``prefix`` and
    rewrite its ``#/$defs/X`` references, so it can be embedded in a larger document."""
    schema = copy.deepcopy(schema)
    local: dict = {}
    for key in ("$defs", "definitions"):
        local.update(schema.pop(key, {}) or {})
    renames = {name: f"{prefix}__{_DEF_NAME.sub('_', name)}" for name in local}

    def rewrite(node):
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    m = re.fullmatch(r"#/(?:\$defs|definitions)/(.+)", v)
                    if m and m.group(1) in renames:
                        v = f"#/$defs/{renames[m.group(1)]}"
                    elif v == "#":
                        raise ValueError(f"{prefix}: root self-references are not supported")
                out[k] = rewrite(v)
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, sub in local.items():
        defs[renames[name]] = rewrite(sub)
    schema.pop("$schema", None)
    return rewrite(schema)


@dataclass(frozen=True)
class TimSchema:
    """A built TIM schema: ``json_schema()`` for the grammar, ``parse()`` for the result."""

    schema: dict[str, Any]
    tools: tuple[ToolSpec, ...] = ()
    max_depth: Optional[int] = None
    max_subtasks: Optional[int] = None
    title: bool = False
    answer_type: Optional[type[BaseModel]] = None
    tool_names: frozenset[str] = field(default_factory=frozenset)

    def json_schema(self) -> dict[str, Any]:
        return copy.deepcopy(self.schema)

    def parse(self, text: str | bytes) -> Response:
        """Parse a complete generated document (pydantic-validated). Raises ``ValueError``."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        try:
            resp = Response.model_validate_json(text)
        except ValidationError as e:
            raise ValueError(f"not a TIM response: {e}") from e
        if self.answer_type is not None:
            resp.answer = self.answer_type.model_validate(resp.answer)
        elif not isinstance(resp.answer, str):
            raise ValueError("answer must be a string")
        for path, task in iter_tasks(resp):
            if self.max_depth is not None and len(path) > self.max_depth:
                raise ValueError(f"task {path} deeper than max_depth={self.max_depth}")
            if self.max_subtasks is not None and task.subtasks and len(task.subtasks) > self.max_subtasks:
                raise ValueError(f"task {path} has more than {self.max_subtasks} subtasks")
            if task.tooluse is not None and task.tooluse.tool_name not in self.tool_names:
                raise ValueError(f"task {path} calls unknown tool {task.tooluse.tool_name!r}")
        return resp


def iter_tasks(resp: Response):
    """(path, task) for every task, depth first in document order."""

    def walk(tasks, prefix):
        for i, t in enumerate(tasks):
            yield prefix + (i,), t
            if t.subtasks:
                yield from walk(t.subtasks, prefix + (i,))

    yield from walk(resp.reasoning, ())


def tim_schema(
    tools: Sequence[ToolSpec] = (),
    *,
    max_depth: Optional[int] = None,
    max_subtasks: Optional[int] = None,
    title: bool = False,
    answer_type: Optional[type[BaseModel]] = None,
) -> TimSchema:
    """Build the JSON schema of a TIM response (see the module docstring for the layout)."""
    if max_depth is not None and max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    if max_subtasks is not None and max_subtasks < 1:
        raise ValueError("max_subtasks must be >= 1")
    tools = tuple(ToolSpec.model_validate(t) if not isinstance(t, ToolSpec) else t for t in tools)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tool names: {names}")

    defs: dict[str, Any] = {}
    tool_refs = []
    for t in tools:
        params = _hoist_defs(strict_input_schema(t.input_schema), f"Params_{_DEF_NAME.sub('_', t.name)}", defs)
        dname = f"ToolUse_{_DEF_NAME.sub('_', t.name)}"
        defs[dname] = {
            "type": "object",
            "description": t.description,
            "properties": {
                "tool_name": {"const": t.name},
                "parameters": params,
                "tool_result": {"description": 'written by the runtime: the result as JSON, or {"error": ...}'},
            },
            "required": ["tool_name", "parameters", "tool_result"],
            "additionalProperties": False,
        }
        tool_refs.append({"$ref": f"#/$defs/{dname}"})
    if tool_refs:
        defs["ToolUse"] = tool_refs[0] if len(tool_refs) == 1 else {"anyOf": tool_refs}

    def task_def(child_ref: Optional[str]) -> dict:
        props: dict[str, Any] = {}
        required = []
        if title:
            props["title"] = {"type": "string"}
            required.append("title")
        props["thought"] = {"type": "string"}
        required.append("thought")
        if tool_refs:
            props["tooluse"] = {"$ref": "#/$defs/ToolUse"}
        if child_ref is not None:
            lst: dict[str, Any] = {"type": "array", "items": {"$ref": child_ref}, "minItems": 1}
            if max_subtasks is not None:
                lst["maxItems"] = max_subtasks
            props["subtasks"] = lst
        props["conclusion"] = {"type": "string"}
        required.append("conclusion")
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    if max_depth is None:
        defs["Task"] = task_def("#/$defs/Task")
        top = "#/$defs/Task"
    else:
        for d in range(1, max_depth + 1):
            defs[f"Task{d}"] = task_def(f"#/$defs/Task{d + 1}" if d < max_depth else None)
        top = "#/$defs/Task1"

    if answer_type is not None:
        answer = _hoist_defs(answer_type.model_json_schema(), "Answer", defs)
    else:
        answer = {"type": "string"}

    schema = {
        "type": "object",
        "properties": {"reasoning": {"type": "array", "items": {"$ref": top}, "minItems": 1}, "answer": answer},
        "required": ["reasoning", "answer"],
        "additionalProperties": False,
        "$defs": defs,
        "x-guidance": dict(JSON_OPTIONS),
    }
    return TimSchema(
        schema=schema,
        tools=tools,
        max_depth=max_depth,
        max_subtasks=max_subtasks,
        title=title,
        answer_type=answer_type,
        tool_names=frozenset(names),
    )


def with_tools(schema: Optional[TimSchema], tools: Sequence[ToolSpec]) -> TimSchema:
    """``schema`` (or a default TIM schema) rebuilt to offer exactly ``tools``; its other options stay."""
    if schema is None:
        return tim_schema(tools)
    if tuple(schema.tools) == tuple(tools):
        return schema
    return tim_schema(
        tools,
        max_depth=schema.max_depth,
        max_subtasks=schema.max_subtasks,
        title=schema.title,
        answer_type=schema.answer_type,
    )
