"""The TIM system prompt: states the output format (the reasoning-tree schema) and the tools offered."""

from __future__ import annotations

import json

from timjax.tim.schema import TimSchema

_FORMAT = """You solve the user's problem by reasoning as a tree of tasks, written as one JSON object:
{"reasoning": [Task, ...], "answer": ...}
Each Task is {%(title)s"thought": str, %(tooluse)s"subtasks": [Task, ...] (optional), "conclusion": str}.
- thought: check the earlier steps, then plan this task.
- subtasks: split the task into smaller tasks when that helps; each list is solved in order.%(limits)s
- conclusion: process the tool result, aggregate the conclusions of the subtasks, and state the result.
Once a subtask list is finished, only its parent's thought and conclusion stay visible: put everything later
steps need into the conclusions.
Write the JSON with single spaces after ':' and ',' and nothing else around it."""


def tim_system_prompt(schema: TimSchema, *, extra: str | None = None) -> str:
    limits = []
    if schema.max_depth:
        limits.append(f"at most {schema.max_depth} levels deep")
    if schema.max_subtasks:
        limits.append(f"at most {schema.max_subtasks} subtasks per list")
    text = _FORMAT % {
        "title": '"title": str, ' if schema.title else "",
        "tooluse": '"tooluse": ToolUse (optional), ' if schema.tools else "",
        "limits": f" ({', '.join(limits)})" if limits else "",
    }
    if schema.tools:
        text += (
            '\n\nToolUse is {"tool_name": str, "parameters": {...}, "tool_result": ...}. Write the tool name and '
            "its parameters; the runtime calls the tool and writes tool_result: the result as JSON, or "
            '{"error": "..."}. Tools:'
        )
        for t in schema.tools:
            text += f"\n- {tool_signature(t.name, t.input_schema)}: {t.description}"
    if schema.answer_type is not None:
        text += f"\n\nThe answer follows this JSON schema: {json.dumps(schema.answer_type.model_json_schema())}"
    if extra:
        text += "\n\n" + extra
    return text


def _type_text(s: dict, defs: dict, depth: int = 0) -> str:
    """A short type for one parameter schema: ``"add"|"sub"``, ``integer|string``, ``[string]``, ``{...}``."""
    if not isinstance(s, dict) or depth > 3:
        return "any"
    if "$ref" in s:
        return _type_text(defs.get(s["$ref"].rsplit("/", 1)[-1], {}), defs, depth + 1)
    if "const" in s:
        return json.dumps(s["const"], ensure_ascii=False)
    if "enum" in s:
        return "|".join(json.dumps(v, ensure_ascii=False) for v in s["enum"])
    for key in ("anyOf", "oneOf"):
        if key in s:
            return "|".join(dict.fromkeys(_type_text(x, defs, depth + 1) for x in s[key]))
    t = s.get("type")
    if t == "array":
        return f"[{_type_text(s.get('items', {}), defs, depth + 1)}]"
    if t == "object" or "properties" in s:
        return (
            "{" + ", ".join(f"{k}: {_type_text(v, defs, depth + 1)}" for k, v in s.get("properties", {}).items()) + "}"
        )
    if isinstance(t, list):
        return "|".join(t)
    return t or "any"


def tool_signature(name: str, input_schema: dict) -> str:
    """``calculator(op: "add"|"sub", a: integer|string, b?: integer)``: a tool's parameters in one line
    (``?`` marks optional ones). Cheaper for a small model to read than the JSON schema."""
    defs = {**input_schema.get("definitions", {}), **input_schema.get("$defs", {})}
    required = set(input_schema.get("required", ()))
    params = [
        f"{k}{'' if k in required else '?'}: {_type_text(v, defs)}"
        for k, v in input_schema.get("properties", {}).items()
    ]
    return f"{name}({', '.join(params)})"
