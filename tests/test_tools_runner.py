"""The MCP tool runner: in-process, stdio and streamable-HTTP servers, strict argument validation, limits,
and every fault turned into an error object (the runner never raises at call time)."""

import json
import sys
import time

import pytest
from _loopback import Uvicorn, call

from timjax.tim.schema import ToolSpec
from timjax.tools.runner import (
    ToolConfigError,
    ToolLimits,
    ToolRunner,
    ToolServer,
    stdio_server,
)
from timjax.tools.servers import calculator, faulty, kb

PY = sys.executable


@pytest.fixture(scope="module")
def count(qwen3_tokenizer):
    return lambda text: len(qwen3_tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def inproc(count):
    with ToolRunner(
        [calculator.make_server(), kb.make_server(), faulty.make_server()],
        ToolLimits(timeout_s=1.0, max_calls=100, max_result_tokens=48),
        count_tokens=count,
    ) as r:
        yield r


def test_lists_tools_once_with_strict_schemas(inproc):
    names = [s.name for s in inproc.specs]
    assert names[:2] == ["calculator", "lookup"] and {"slow", "hang", "crash", "echo"} <= set(names)
    for s in inproc.specs:
        assert s.input_schema["additionalProperties"] is False


def test_calls_answer_like_the_pure_functions(inproc):
    s = inproc.session()
    rec = call(s, "calculator", {"op": "mul", "a": "2/3", "b": 9})
    assert rec.status == "ok" and rec.result == '{"result": 6}' and rec.error is None and rec.latency_s > 0
    k = kb.generate_kb(0)
    p = k.entities("person")[3]
    assert call(s, "lookup", {"entity": p, "relation": "employer"}).result == json.dumps(
        {"result": k.facts[p]["employer"]}
    )
    rec = call(s, "calculator", {"op": "div", "a": 1, "b": 0})
    assert (rec.status, rec.result) == ("tool_error", '{"error": "division by zero"}')
    assert [r.index for r in s.records] == [0, 1, 2]


@pytest.mark.parametrize(
    "args,where",
    [
        ({"text": "x", "n": "3"}, "at n: '3' is not of type 'integer'"),  # the SDK would coerce "3" to 3
        ({"text": "x", "n": 2.0}, "at n: 2.0 is not of type 'integer'"),
        ({"text": "x", "n": True}, "at n: True is not of type 'integer'"),
        ({"text": "x", "extra": 1}, "Additional properties are not allowed ('extra' was unexpected)"),  # SDK drops it
        ({"n": 1}, "'text' is a required property"),
        ([1, 2], "is not of type 'object'"),
    ],
)
def test_arguments_are_validated_strictly_before_the_call(inproc, args, where):
    rec = call(inproc.session(), "echo", args)
    assert rec.status == "invalid_arguments" and where in rec.error, rec.error
    assert json.loads(rec.result) == {"error": rec.error} and rec.latency_s < 0.1


def test_undeclared_tools_bad_json_and_the_call_cap(inproc):
    s = inproc.session()
    rec = call(s, "shell", {"cmd": "rm -rf /"})
    assert rec.status == "unknown_tool" and rec.error.startswith("unknown tool 'shell'; tools: calculator, lookup")
    assert call(s, "echo", '{"text": ').status == "invalid_arguments"
    with ToolRunner([calculator.make_server()], ToolLimits(max_calls=2)) as r:
        s = r.session()
        got = [call(s, "calculator", {"op": "add", "a": i, "b": 1}) for i in range(4)]
    assert [g.status for g in got] == ["ok", "ok", "call_cap", "call_cap"]
    assert got[3].result == '{"error": "tool call limit reached: at most 2 calls per inference"}'


def test_faults_in_process(inproc):
    s = inproc.session()
    t0 = time.perf_counter()
    rec = call(s, "hang", {})
    assert rec.status == "timeout" and rec.result == '{"error": "hang: no answer within 1 s"}'
    assert 1.0 <= rec.latency_s < 1.6 and time.perf_counter() - t0 < 2
    assert call(s, "slow", {"seconds": 0.05}).result == '"slept 0.05 s"'
    rec = call(s, "crash", {})  # an exception in the tool: the SDK reports isError without the details
    assert rec.status == "tool_error" and rec.error == "Error executing tool crash"
    rec = call(s, "garbage", {})  # a lone surrogate has no UTF-8 form: replaced by U+FFFD (encoding.py)
    assert rec.status == "ok" and rec.result == '"bad \ufffd surrogate"'
    assert call(s, "nan", {}).result == '{"x": null}'  # the in-process SDK path already wrote NaN as null
    rec = call(s, "huge", {"n": 5000})
    assert rec.status == "truncated" and rec.result_tokens <= 48
    obj = json.loads(rec.result)
    assert obj["error"] == "result truncated: over the cap of 48 tokens"
    assert obj["partial"].startswith('"word word') and obj["partial"].endswith("…")
    assert call(s, "echo", {"text": "still fine"}).status == "ok"  # nothing above broke the runner


def test_allowlist_and_declared_tools():
    with ToolRunner([ToolServer(faulty.make_server(), tools=["echo", "slow"])]) as r:
        assert [t.name for t in r.specs] == ["echo", "slow"]
        assert call(r.session(), "hang", {}).status == "unknown_tool"  # offered by the server, not allowed
    with pytest.raises(ToolConfigError, match="tool 'nope' is not offered by server 'faulty'"):
        ToolRunner([ToolServer(faulty.make_server(), tools=["nope"])])
    with pytest.raises(ToolConfigError, match="tool 'calculator' is offered by two servers"):
        ToolRunner([calculator.make_server(), calculator.make_server("other")])


# -- stdio ------------------------------------------------------------------------------------------
def test_stdio_servers_get_only_the_given_environment(monkeypatch):
    monkeypatch.setenv("TIMJAX_SECRET_TOKEN", "do-not-leak")
    servers = [
        stdio_server(f"{PY} -m timjax.tools.servers.calculator"),
        stdio_server(f"{PY} -m timjax.tools.servers.kb --seed 1"),
        ToolServer(
            stdio_server([PY, "-m", "timjax.tools.servers.faulty"], env={"ONLY_THIS": "1"}),
            tools=["env", "crash", "echo"],
        ),
    ]
    with ToolRunner(servers, ToolLimits(timeout_s=30, connect_timeout_s=60)) as r:
        s = r.session()
        assert call(s, "calculator", {"op": "sub", "a": "1/2", "b": "1/3"}).result == '{"result": "1/6"}'
        k = kb.generate_kb(1)
        p = k.entities("person")[0]
        assert json.loads(call(s, "lookup", {"entity": p, "relation": "age"}).result) == {"result": k.facts[p]["age"]}
        seen = set(json.loads(call(s, "env", {}).result).split(","))
        assert "ONLY_THIS" in seen and "TIMJAX_SECRET_TOKEN" not in seen and "PATH" not in seen and "HOME" not in seen
        rec = call(s, "crash", {})  # the process dies mid-call
        assert rec.status == "server_crashed" and rec.error.startswith("server 'faulty' crashed during the call"), rec
        assert rec.error.endswith("not retried: the tool is not annotated read-only or idempotent")
        rec = call(s, "echo", {"text": "back"})  # restarted at the next call
        assert rec.status == "ok" and json.loads(rec.result) == {"text": "back", "n": 1}


def test_stdio_garbage_on_stdout_and_a_server_that_never_starts():
    never = stdio_server(f"{PY} -m timjax.tools.servers.faulty --startup-delay 30")
    with pytest.raises(ToolConfigError, match=r"server 'faulty' did not start: no answer within 1 s"):
        ToolRunner([never], ToolLimits(connect_timeout_s=1))
    declared = ToolServer(
        never,
        tools=[
            ToolSpec(
                name="echo",
                input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            )
        ],
    )
    garbage = ToolServer(stdio_server(f"{PY} -m timjax.tools.servers.faulty"), tools=["garbage", "slow"])
    with ToolRunner([declared, garbage], ToolLimits(timeout_s=2, connect_timeout_s=30)) as r:
        assert [t.name for t in r.specs] == ["echo", "garbage", "slow"] and not r.startup_errors
        s = r.session()
        rec = call(s, "echo", {"text": "x"})  # declared, so listed without the server; it never comes up
        assert rec.status in ("server_error", "timeout") and "echo" in rec.result, rec
        assert rec.error in ("server 'faulty' did not start: no answer within 2 s", "echo: no answer within 2 s")
        rec = call(s, "garbage", {})  # non-UTF-8, non-JSON bytes on stdout, then silence
        assert rec.status in ("server_error", "timeout"), rec
        assert json.loads(rec.result)["error"]


# -- streamable HTTP --------------------------------------------------------------------------------
def test_streamable_http_server_on_localhost():
    srv = Uvicorn(calculator.make_server().streamable_http_app(), log_level="error")
    try:
        with ToolRunner([f"{srv.url}/mcp"], ToolLimits(timeout_s=10)) as r:
            assert [t.name for t in r.specs] == ["calculator"]
            s = r.session()
            assert call(s, "calculator", {"op": "div", "a": 10, "b": 4}).result == '{"result": "5/2"}'
            assert call(s, "calculator", {"op": "add", "a": 1, "b": "x"}).status == "invalid_arguments"
    finally:
        srv.stop()
    assert not srv.thread.is_alive()
