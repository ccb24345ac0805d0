"""From a route's request to a ``GenRequest`` (TIM or plain), and from a result to the answer and the
reasoning tree: what the three APIs share."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

from pydantic import RootModel

from timjax.serve.backend import GenRequest, RequestRejected
from timjax.serve.errors import ApiError


def answer_model(schema: dict, param: str) -> type:
    """A pydantic type whose JSON schema is ``schema`` (a caller's raw JSON schema): what
    ``timjax.tim.schema.tim_schema(answer_type=...)`` embeds as the answer's grammar."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ApiError(400, f"invalid {param}: a JSON schema must be an object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ApiError(400, f"invalid {param}: not a valid JSON schema: {e.message}", param=param) from None
    frozen = copy.deepcopy(schema)

    class Answer(RootModel[Any]):
        @classmethod
        def model_json_schema(cls, *args, **kwargs):
            return copy.deepcopy(frozen)

    return Answer


def tim_request(
    state,
    messages: list[dict],
    *,
    system: str | None,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int,
    answer_schema: dict | None = None,
    schema_param: str = "response_format",
    tools=None,
    timeout_s: float | None = None,
) -> GenRequest:
    """A TIM request: the reasoning-tree schema with the tools offered, the answer's schema, the system
    prompt that states both, the prompt through the chat template."""
    from timjax.tim.prompt import tim_system_prompt
    from timjax.tim.schema import tim_schema

    toolset = tools if tools is not None else state.tools
    specs = toolset.specs if toolset is not None else []
    answer_type = answer_model(answer_schema, schema_param) if answer_schema is not None else None
    try:
        schema = tim_schema(specs, answer_type=answer_type)
    except ValueError as e:
        raise ApiError(400, f"invalid {schema_param}: {e}", param=schema_param) from None
    sys_text = tim_system_prompt(schema, extra=system)
    prompt = state.backend.encode_chat(messages, system=sys_text)
    return GenRequest(
        prompt=prompt,
        max_new_tokens=_budget(state, prompt, max_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        schema=schema,
        pruning_buffer=state.config.pruning_buffer,
        tools=toolset,
        timeout_s=timeout_s,
        kind="tim",
    )


def plain_request(state, messages, *, system, max_tokens, temperature, top_p, seed, stop) -> GenRequest:
    prompt = state.backend.encode_chat(messages, system=system)
    return GenRequest(
        prompt=prompt,
        max_new_tokens=_budget(state, prompt, max_tokens),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=list(stop or []),
    )


def json_request(state, messages, *, system, max_tokens, temperature, top_p, seed, schema: dict, param: str,
                 kind: str = "json") -> GenRequest:
    """Output constrained to the JSON ``schema`` (no reasoning tree): ``response_format`` on a model served
    without TIM, and client-side function calling. A schema the grammar refuses is a 400 naming ``param``."""
    from timjax.engine.controllers import default_stop_ids
    from timjax.serve.constrained import JsonController

    prompt = state.backend.encode_chat(messages, system=system)
    budget = _budget(state, prompt, max_tokens)
    model = state.backend.model

    def make():
        return JsonController(model, schema, max_new_tokens=budget, stop_ids=default_stop_ids(model))

    return GenRequest(prompt=prompt, max_new_tokens=budget, temperature=temperature, top_p=top_p, seed=seed,
                      kind=kind, make_controller=make, controller_param=param)


def _budget(state, prompt: list[int], max_tokens: int | None) -> int:
    room = state.backend.max_seq_len - len(prompt)
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens; this server's context is {state.backend.max_seq_len} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    return min(max_tokens or state.config.max_tokens_default, room)


def answer_text(result, tim: bool) -> str:
    """The content a client sees: the TIM answer (JSON text for a schema'd answer), else the text."""
    if not tim:
        return result.text or ""
    if result.response is None:  # an unfinished tree: the answer as far as it was written, if any
        partial = result.partial_response
        ans = partial.get("answer") if isinstance(partial, dict) else None
        return ans if isinstance(ans, str) else (json.dumps(ans) if ans is not None else "")
    ans = result.response.answer
    if isinstance(ans, str):
        return ans
    if isinstance(ans, RootModel):
        return json.dumps(ans.root, ensure_ascii=False)
    return ans.model_dump_json()


def reasoning_tree(result) -> list[dict] | None:
    """The Runs API's ``reasoning``: tasks with title, thought, tooluse {tool_name, tool_call_id, parameters,
    tool_result}, subtasks, conclusion; tool_call_id is the call's index in the inference."""
    if result.response is not None:
        tasks = [t.model_dump(mode="json", exclude_none=True) for t in result.response.reasoning]
    elif isinstance(result.partial_response, dict) and isinstance(result.partial_response.get("reasoning"), list):
        tasks = [t for t in result.partial_response["reasoning"] if isinstance(t, dict)]
    else:
        return None
    calls = {tuple(c.task_path): c for c in result.tool_calls}

    def walk(items, prefix):
        for i, t in enumerate(items):
            path = prefix + (i,)
            tu = t.get("tooluse")
            if isinstance(tu, dict):
                c = calls.get(path)
                tu["tool_call_id"] = f"call_{c.index}" if c is not None else None
                tu.setdefault("parameters", {})
            if isinstance(t.get("subtasks"), list):
                walk(t["subtasks"], path)

    walk(tasks, ())
    return tasks


class StreamAnswer:
    """Text deltas of a string field (the TIM ``answer``; ``content`` of a function-calling reply) as the
    document grows: the field's string in the partial document, sent once it can only grow (a prefix of
    what was sent is never taken back)."""

    def __init__(self, key: str = "answer"):
        self.key = key
        self.doc = ""
        self.sent = ""

    def feed(self, text: str) -> str:
        from timjax.tim.partial_json import close_partial_json

        self.doc += text
        if f'"{self.key}": "' not in self.doc:
            return ""
        try:
            value = close_partial_json(self.doc)
        except Exception:  # noqa: BLE001 - an unparseable prefix: wait for more
            return ""
        ans = value.get(self.key) if isinstance(value, dict) else None
        if not isinstance(ans, str) or not ans.startswith(self.sent):
            return ""
        # the last character may be half an escape: keep it back until the string closes
        safe = ans if self.doc.rstrip().endswith("}") else ans[:-1]
        out = safe[len(self.sent) :] if safe.startswith(self.sent) else ""
        self.sent += out
        return out

    def rest(self, final: str) -> str:
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


class StreamCalls:
    """OpenAI ``delta.tool_calls`` entries as a function-calling document (``{"tool_calls": [{"name": ...,
    "arguments": {...}}, ...]}``) grows: a call's first entry once its name is complete (id, type, name, empty
    arguments), then its arguments' JSON text as the model writes it, in fragments that concatenate to it.
    The grammar writes ``name`` before ``arguments``, so a call's name is final once its arguments start."""

    def __init__(self):
        self.doc = ""
        self.calls: list[dict] = []  # per call begun: {"id", "name", "sent"} (arguments text sent so far)

    def feed(self, text: str) -> list[dict]:
        self.doc += text
        out = []
        for k, (name, args) in enumerate(calls_so_far(self.doc)):
            if k == len(self.calls):
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "sent": ""})
                out.append({"index": k, "id": self.calls[k]["id"], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            call = self.calls[k]
            if len(args) > len(call["sent"]):
                out.append({"index": k, "function": {"arguments": args[len(call["sent"]):]}})
                call["sent"] = args
        return out


def calls_so_far(doc: str) -> list[tuple[str, str]]:
    """(name, the arguments' JSON text written so far) of each call whose arguments have begun."""
    from timjax.tim.partial_json import close_partial_json

    marker = '"arguments": '
    if '"tool_calls"' not in doc or marker not in doc:
        return []
    try:
        calls = close_partial_json(doc).get("tool_calls") or []
    except Exception:  # noqa: BLE001 - an unparseable prefix: wait for more
        return []
    out, pos = [], 0
    for call in calls:
        start = doc.find(marker, pos)
        if not isinstance(call, dict) or "arguments" not in call or start < 0:
            break
        start += len(marker)
        end = _json_value_end(doc, start)
        out.append((call["name"], doc[start:end]))
        if end == len(doc):
            break
        pos = end
    return out


def _json_value_end(text: str, start: int) -> int:
    """The index just past the JSON object or array starting at ``start`` (``len(text)`` while it is open)."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            esc, in_str = (False, in_str) if esc else (c == "\\", c != '"')
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


async def submit(request, greq: GenRequest, request_id: str | None = None):
    """Add ``greq`` to the engine (it joins the running batch at the next step) and start reading its
    events; a full queue is 429 with Retry-After, a stopping server 503, a request the engine cannot take
    400 naming the field."""
    from starlette.concurrency import run_in_threadpool

    from timjax.serve.backend import QueueFull, ShuttingDown

    state = request.app.state
    try:
        job = await run_in_threadpool(state.backend.submit, greq, request_id)
    except BaseException as e:
        if greq.on_close is not None:
            greq.on_close()
        if isinstance(e, QueueFull):
            retry = str(state.config.retry_after_s)
            raise ApiError(429, f"the server is busy: {e}; retry later", headers={"Retry-After": retry}) from None
        if isinstance(e, ShuttingDown):
            raise ApiError(503, f"the server is shutting down: {e}") from None
        if isinstance(e, RequestRejected):
            raise ApiError(400, str(e), param=e.param) from None
        raise
    job.attach()
    return job


def check_model(request, name: str | None, param: str = "model", status: int = 404) -> None:
    served = request.app.state.config.model_id()
    if name != served:
        code = "model_not_found" if status == 404 else None  # OpenAI's code; the Runs API has its own
        raise ApiError(status, f"unknown {param} {name!r}: this server serves {served!r}", param=param, code=code)
