"""Output constrained to a JSON schema without the TIM tree: ``JsonController`` (an engine controller over
``timjax.tim.grammar``), and the schemas of OpenAI function calling.

Used by ``/v1/chat/completions`` for ``response_format`` on a model served without TIM (the schema
constrains the whole output) and for client-side function calling (``tools`` / ``tool_choice``, any
model): the output is one JSON object, either ``{"tool_calls": [{"name", "arguments"}, ...]}`` (the
arguments constrained by each function's ``parameters`` schema) or ``{"content": "..."}``; the route turns
it into ``message.tool_calls`` (``finish_reason: "tool_calls"``) or ``message.content``.
"""

from __future__ import annotations

import json
from typing import Any

from timjax.engine.protocol import Action


class JsonController:
    """Generation constrained to ``schema``: a grammar mask before each sample, forced tokens written
    without sampling, the end when the JSON is complete (or at an EOS the grammar allows)."""

    wants_mask = True

    def __init__(self, model, schema: dict, *, max_new_tokens: int, stop_ids: list[int]):
        from timjax.tim.grammar import make_grammar
        from timjax.tim.schema import JSON_OPTIONS

        # no free whitespace, the separators json.dumps writes (else a small model pads with newlines)
        schema = {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}
        self.grammar = make_grammar(model.tokenizer, schema, model.config.vocab_size, eos_token=list(stop_ids))
        self.stop_ids = set(stop_ids)
        self.max_new_tokens = max_new_tokens

    def fill_mask(self, out) -> None:
        self.grammar.fill_mask(out)

    def on_token(self, token: int, seq) -> Action:
        if token in self.stop_ids:  # allowed by the mask only once the document is complete
            return Action(feed=[], finish="stop")
        self.grammar.consume([token])
        seq.generated.append(token)
        if self.grammar.is_stopped():
            return Action(feed=[], finish="stop")
        forced = self.grammar.forced_tokens()[: max(0, self.max_new_tokens - len(seq.generated))]
        if forced:
            self.grammar.consume(forced)
            seq.generated.extend(forced)
            if self.grammar.is_stopped():
                return Action(feed=[], finish="stop")
        if len(seq.generated) >= self.max_new_tokens:
            return Action(feed=[], finish="length")
        return Action(feed=[token, *forced])

    def finish(self, seq, result) -> None:
        pass


def tool_call_schema(functions: list[dict], choice: str | dict, parallel: bool) -> dict:
    """The output schema of function calling. ``functions``: ``{"name", "parameters"}``; ``choice``:
    "auto" (a call or an answer), "required" (a call), or a function's name (a call of that one)."""
    named = [f for f in functions if not isinstance(choice, dict) or f["name"] == choice["name"]]
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in named
        ]
    }
    calls: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
    if not parallel or isinstance(choice, dict):
        calls["maxItems"] = 1
    call = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"], "additionalProperties": False}
    if choice != "auto":
        return call
    answer = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"],
              "additionalProperties": False}
    return {"anyOf": [call, answer]}


def tool_prompt(functions: list[dict], choice: str | dict) -> str:
    """The system prompt's part that states the functions and the reply format."""
    lines = ["You can call these functions (arguments as JSON objects matching their schemas):"]
    for f in functions:
        desc = f" - {f['description']}" if f.get("description") else ""
        lines.append(f"- {f['name']}({json.dumps(f['parameters'], separators=(',', ':'))}){desc}")
    call = '{"tool_calls": [{"name": NAME, "arguments": {...}}]}'
    if choice == "auto":
        lines.append(f'To call functions reply {call}; to answer reply {{"content": "..."}}. '
                     "Function results come back as tool messages.")
    else:
        lines.append(f"Reply {call}. Function results come back as tool messages.")
    return "\n".join(lines)
