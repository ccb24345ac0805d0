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
        text += ('\n\nToolUse is {"tool_name": str, "parameters": {...}, "tool_result": ...}. Write the tool name and '
                 'its parameters; the runtime calls the tool and fills tool_result. Tools:')
        for t in schema.tools:
            text += f"\n- {t.name}: {t.description}\n  parameters: {json.dumps(t.input_schema, ensure_ascii=False)}"
    if schema.answer_type is not None:
        text += f"\n\nThe answer follows this JSON schema: {json.dumps(schema.answer_type.model_json_schema())}"
    if extra:
        text += "\n\n" + extra
    return text
