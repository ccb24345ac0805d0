"""timjax serve with the official clients (openai, anthropic, subconscious-sdk) against a real uvicorn
server on loopback, the shipped tiny TIM (reasoning trees, calculator over MCP), and per-request tools
from an MCP server and an HTTP function started here."""

from __future__ import annotations

import concurrent.futures
import json
import time

import jsonschema
import pytest

from tests._serve_helpers import Uvicorn, calculator_schema, tiny_tim, tools_app

KEY = "test-key-123"
MODEL = "timjax-tiny-tim"


@pytest.fixture(scope="module")
def tool_calls():
    return []


@pytest.fixture(scope="module")
def tools_server(tool_calls):
    srv = Uvicorn(tools_app(tool_calls))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_tools_server():
    srv = Uvicorn(tools_app([], delay_s=3.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(tools_server, slow_tools_server):
    from timjax.serve.app import create_app
    from timjax.serve.config import ServeConfig

    cfg = ServeConfig(
        api_key=KEY,
        max_seq_len=1024,
        warmup="off",  # the steps compile as the tests meet them (test_serve_errors and test_engine_open cover it)
        allow_tool_url=[f"127.0.0.1:{tools_server.port}", f"127.0.0.1:{slow_tools_server.port}"],
    )
    srv = Uvicorn(create_app(cfg, model=tiny_tim()))
    srv.app = srv.server.config.app
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oa(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def sub(server):
    from subconscious import Subconscious

    return Subconscious(api_key=KEY, base_url=server.url + "/v1")


def ask(oa, question, **kw):
    return oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kw)


def test_openai_chat_answers_with_a_tree_and_streams_the_same(oa):
    assert [m.id for m in oa.models.list().data] == [MODEL]
    r = ask(oa, "Calculate 3 * (4 - 9).")
    msg = r.choices[0].message
    assert msg.content == "-15" and r.choices[0].finish_reason == "stop"
    tree = msg.model_extra["reasoning"]
    assert tree[0]["subtasks"][0]["tooluse"]["tool_name"] == "calculator"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 20
    chunks = list(ask(oa, "Calculate 3 * (4 - 9).", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens  # include_usage: the last chunk
    # the same prompt again: every full page of it is read from the prefix cache (the last token computed)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (r.usage.prompt_tokens - 1) // 16 * 16


def test_openai_json_schema_constrains_the_answer(oa):
    schema = {
        "type": "object",
        "properties": {"value": {"type": "string", "pattern": "^-?[0-9]{1,3}$"}},
        "required": ["value"],
        "additionalProperties": False,
    }
    r = ask(
        oa,
        "Calculate 2 + 5.",
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
        max_tokens=300,
    )
    assert json.loads(r.choices[0].message.content) == {"value": "7"}  # the tree's answer, in the schema's shape
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


NUM = {"type": "integer", "minimum": -999, "maximum": 999}
CALC = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "exact arithmetic",
        "parameters": {
            "type": "object",
            "properties": {"op": {"enum": ["add", "sub", "mul", "div"]}, "a": NUM, "b": NUM},
            "required": ["op", "a", "b"],
            "additionalProperties": False,
        },
    },
}


def test_openai_client_side_function_calling_round_trip(oa):
    """The client offers a function; the output is a call matching its schema (finish_reason tool_calls,
    streamed the same); the client runs it and resends the conversation with a tool message, which the
    server prefills again (the prompt grows by the call and its result)."""
    from timjax.tools.servers.calculator import calculate

    messages = [{"role": "user", "content": "Calculate 2 + 5."}]
    named = {"type": "function", "function": {"name": "calculator"}}
    r = oa.chat.completions.create(model=MODEL, messages=messages, tools=[CALC], tool_choice=named, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, CALC["function"]["parameters"])
    chunks = list(oa.chat.completions.create(model=MODEL, messages=messages, tools=[CALC], tool_choice=named,
                                             max_tokens=200, stream=True))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # the call as it is written: its id, type and name first, then its arguments in several fragments
    assert streamed[0].id.startswith("call_") and streamed[0].type == "function"
    assert streamed[0].function.name == "calculator" and streamed[0].function.arguments == ""
    assert {t.index for t in streamed} == {0} and len(streamed) > 2
    assert "".join(t.function.arguments for t in streamed) == call.function.arguments  # the same call as unstreamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # the client runs the function and resends everything
    result = calculate(args["op"], args["a"], args["b"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    again = oa.chat.completions.create(model=MODEL, messages=messages, tools=[CALC], tool_choice="required",
                                       max_tokens=200)
    assert again.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(again.choices[0].message.tool_calls[0].function.arguments),
                        CALC["function"]["parameters"])
    assert again.usage.prompt_tokens > r.usage.prompt_tokens + r.usage.completion_tokens  # re-prefilled
    final = oa.chat.completions.create(model=MODEL, messages=messages, tools=[CALC], tool_choice="none")
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_response_format_without_tim_constrains_the_whole_output(server):
    """A server without TIM (the same model, plain generation): json_schema constrains the output itself."""
    import openai

    from timjax.serve.app import create_app
    from timjax.serve.config import ServeConfig

    model = server.app.state.backend.model
    plain = Uvicorn(create_app(ServeConfig(tim=False, max_seq_len=512, served_model_name="plain", warmup="off"), model=model))
    try:
        client = openai.OpenAI(base_url=plain.url + "/v1", api_key="x", max_retries=0)
        schema = {
            "type": "object",
            "properties": {"value": {"type": "string", "pattern": "^-?[0-9]{1,3}$"}, "ok": {"type": "boolean"}},
            "required": ["value", "ok"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
        msgs = [{"role": "user", "content": "Calculate 2 + 5."}]
        r = client.chat.completions.create(model="plain", messages=msgs, response_format=fmt, max_tokens=100)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop" and "reasoning" not in (r.choices[0].message.model_extra or {})
        chunks = client.chat.completions.create(model="plain", messages=msgs, response_format=fmt, max_tokens=100,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="response_format"):
            bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
            client.chat.completions.create(model="plain", messages=msgs, response_format=bad)
    finally:
        plain.stop()


def test_anthropic_messages_and_stream_events(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Calculate 3 * (4 - 9)."}]
    m = client.messages.create(model=MODEL, max_tokens=400, messages=msgs)
    assert m.content[0].text == "-15" and m.stop_reason == "end_turn" and m.usage.output_tokens > 20
    with client.messages.stream(model=MODEL, max_tokens=400, messages=msgs) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == "-15"
    # Anthropic's split of the prompt: computed + read from the cache (the second time, every full page)
    u = final.usage
    assert u.input_tokens + u.cache_read_input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens
    assert u.cache_read_input_tokens == (u.input_tokens + u.cache_read_input_tokens - 1) // 16 * 16 > 0
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    for k in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
        assert k in kinds


def test_runs_with_a_per_request_mcp_tool_and_function(sub, tools_server, tool_calls):
    url = tools_server.url
    run = sub.run(
        engine=MODEL,
        input={"instructions": "Calculate 2 + 5.", "tools": [{"type": "mcp", "url": url + "/mcp"}]},
        options={"await_completion": True},
    )
    assert run.status == "succeeded", run
    use = run.result.reasoning[0].tooluse
    assert use.tool_name == "calculator" and use.tool_call_id == "call_0"
    assert use.tool_result == {"result": 1007}  # the request's server answered, not the built-in calculator
    assert ("mcp", "add", 2, 5) in tool_calls
    assert run.usage.input_tokens > 0 and run.usage.output_tokens > 0 and run.usage.duration_ms > 0
    fn = {
        "type": "function",
        "name": "calculator",
        "description": "exact arithmetic",
        "parameters": calculator_schema(),
        "url": url + "/fn/calc",
    }
    run = sub.run(
        engine=MODEL,
        input={"instructions": "Calculate 2 + 5.", "tools": [fn]},
        options={"await_completion": True},
    )
    assert run.status == "succeeded", run
    assert "2007" in json.dumps(run.result.reasoning[0].tooluse.tool_result)
    assert ("fn", "add", 2, 5) in tool_calls


def test_runs_stream_sends_the_document(sub):
    events = list(sub.stream(engine=MODEL, input={"instructions": "Calculate 3 * (4 - 9)."}))
    assert events[-1].type == "done" and events[0].run_id
    doc = json.loads("".join(e.content for e in events if e.type == "delta"))
    assert doc["answer"] == "-15" and doc["reasoning"][0]["subtasks"]


def test_run_cancel_while_parked_on_a_slow_tool(sub, server, slow_tools_server):
    tools = [{"type": "mcp", "url": slow_tools_server.url + "/mcp"}]
    run = sub.run(engine=MODEL, input={"instructions": "Calculate 2 + 5.", "tools": tools})
    time.sleep(1.0)
    t0 = time.monotonic()
    out = sub.cancel(run.run_id)
    assert out.status == "canceled" and time.monotonic() - t0 < 2.5
    assert sub.get(run.run_id).status == "canceled"


def test_stream_disconnect_cancels_the_request(server, slow_tools_server):
    import requests

    body = {
        "engine": MODEL,
        "input": {"instructions": "Calculate 2 + 5.", "tools": [{"type": "mcp", "url": slow_tools_server.url + "/mcp"}]},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with requests.post(server.url + "/v1/runs/stream", json=body, headers=headers, stream=True) as resp:
        run_id = resp.headers["x-run-id"]
        next(resp.iter_lines())  # the stream is open; the run is (or will be) parked on the slow tool
    job = server.app.state.runs[run_id]
    t0 = time.monotonic()
    while not job.done and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert job.status == "canceled"


def test_concurrent_answers_equal_answers_alone(oa):
    questions = ["Calculate 2 + 5.", "Calculate 3 * (4 - 9).", "Calculate 12 - 30.", "Calculate -(7 * (7 - 12))."]
    alone = [ask(oa, q).choices[0].message for q in questions]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(lambda q: ask(oa, q).choices[0].message, questions))
    assert [m.content for m in together] == [m.content for m in alone]
    assert [m.model_extra["reasoning"] for m in together] == [m.model_extra["reasoning"] for m in alone]


def _stream_run(server, question, log, name):
    """Stream a run over raw SSE, appending (name, time, delta) per content chunk; returns the document."""
    import requests

    body = {"engine": MODEL, "input": {"instructions": question}}
    doc = ""
    with requests.post(server.url + "/v1/runs/stream", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       stream=True, timeout=120) as resp:
        for line in resp.iter_lines(decode_unicode=True):
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if "choices" in data:
                delta = data["choices"][0]["delta"]["content"]
                doc += delta
                log.append((name, time.monotonic(), delta))
    log.append((name, time.monotonic(), None))
    return doc


def test_a_request_joins_the_running_batch(server):
    """B arrives while A is mid-decode: B streams before A ends (it joined the running batch, it did not
    wait for it) and B's document equals B's alone."""
    a_q, b_q = "Calculate -(7 * (7 - 12)) + 3 * (4 - 9).", "Calculate 12 - 30."
    b_alone = _stream_run(server, b_q, [], "B")
    log: list = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        fa = pool.submit(_stream_run, server, a_q, log, "A")
        t0 = time.monotonic()
        while sum(1 for n, _, d in log if n == "A" and d) < 5:  # A is decoding
            assert time.monotonic() - t0 < 60 and not fa.done()
            time.sleep(0.01)
        fb = pool.submit(_stream_run, server, b_q, log, "B")
        b_doc, a_doc = fb.result(), fa.result()
    a_end = next(t for n, t, d in log if n == "A" and d is None)
    b_first = next(t for n, t, d in log if n == "B" and d)
    assert b_first < a_end, "B waited for A's batch to finish"
    assert b_doc == b_alone and json.loads(b_doc)["answer"] == "-18"
    assert json.loads(a_doc)["answer"]


def test_health_and_metrics(server):
    import requests

    assert requests.get(server.url + "/health").json()["status"] == "ok"
    text = requests.get(server.url + "/metrics").text
    assert 'timjax_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'timjax_tool_call_results_total{status="ok"}' in text
    engine = server.app.state.backend.engine.stats()  # the engine's own figures, not recomputed
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert values["timjax_tool_calls_total"] == engine.tool_calls_total > 0
    assert values["timjax_generated_tokens_total"] == engine.tokens_generated_total > 0
    assert values["timjax_pruned_tokens_total"] == engine.pruned_tokens_total
    assert values["timjax_kv_pages_free"] == engine.kv_pages_free == engine.kv_pages_total  # idle: all free
    assert values["timjax_kv_pages_used"] == 0 and values["timjax_queue_depth"] == 0 and values["timjax_running"] == 0
    assert "timjax_tool_call_seconds_bucket" in text
    # every request above sent the same system prompt and tool list: its pages were computed once
    assert values["timjax_prefix_cache_hit_tokens_total"] == engine.prefix_cache_hit_tokens_total > 0
    assert values["timjax_prefix_cache_pages"] == engine.prefix_cache_pages > 0
    assert values["timjax_prefix_cache_evictions_total"] == engine.prefix_cache_evictions_total


def test_readme_client_examples(server):
    """The README's Serve section: each client example runs unchanged but for the address and key."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"<!-- serve-example: (\w+) -->\n```python\n(.*?)```", readme, re.S)
    assert [name for name, _ in blocks] == ["openai", "anthropic", "subconscious"]
    for name, code in blocks:
        code = code.replace("http://127.0.0.1:8000", server.url).replace("sk-local", KEY)
        exec(compile(code, f"README serve-example {name}", "exec"), {})
