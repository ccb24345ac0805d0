"""Tools against hostile servers (issue 22): each fault with its own misbehaving MCP server (in-process,
stdio, streamable HTTP on loopback), beside a control prompt in the same batch that must get the answer it
gets alone. The documents are replayed through the runtime (``ReplayText``) on the shipped tiny TIM, so
the runtime writes every tool result itself and a control row diverging from its document fails the test.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time

import pytest
from _loopback import call, serve_on_loopback

import timjax
from timjax.api import default_model_path
from timjax.engine import Engine, Request
from timjax.engine.tim_controller import ReplayText, TimController
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import ToolSpec, dumps, tim_schema
from timjax.tools.runner import ToolConfigError, ToolPolicy, ToolPolicyError, ToolRunner, ToolServer, stdio_server
from timjax.tools.servers import calculator, faulty

PY = sys.executable
CONTROL = ("calculator", {"op": "add", "a": 3, "b": 4}, '{"result": 7}')


@pytest.fixture(scope="module")
def model():
    return timjax.load(default_model_path(), dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, max_batch=2, page_size=16, max_seq_len=1024)


def doc(tool: str, params: dict, result: str, conclusion: str = "done") -> str:
    use = f'{{"tool_name": "{tool}", "parameters": {dumps(params)}, "tool_result": {result}}}'
    return f'{{"reasoning": [{{"thought": "call", "tooluse": {use}, "conclusion": "{conclusion}"}}], "answer": "ok"}}'


def run_batch(model, engine, runner, docs, on_token=None):
    eos = [model.config.eos_token_id]
    llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, eos)
    prompt = model.tokenizer("Go.")["input_ids"]
    schema = tim_schema(runner.specs)
    ctrls = [
        TimController(
            model,
            schema,
            max_new_tokens=900,
            prompt_len=len(prompt),
            pruning_buffer=None,
            stop_ids=eos,
            tools=runner,
            override=ReplayText(d, llt),
        )
        for d in docs
    ]
    results = engine.run([Request(prompt, 900, controller=c) for c in ctrls], on_token=on_token)
    return results, ctrls


def assert_control(result):
    assert result.finish_reason == "stop", result.error
    assert result.text == doc(*CONTROL) and [c.status for c in result.tool_calls] == ["ok"]


# -- 1. a huge result --------------------------------------------------------------------------------
def test_a_5mb_result_is_cut_at_the_transport_off_the_engine_thread(model, engine):
    import psutil

    proc = psutil.Process()
    with serve_on_loopback(faulty.make_server().streamable_http_app()) as port:
        servers = [calculator.make_server(), ToolServer(f"http://127.0.0.1:{port}/mcp", tools=["big"])]
        with ToolRunner(servers, ToolPolicy(timeout_s=30, max_result_tokens=64)) as runner:
            run_batch(model, engine, runner, [doc(*CONTROL)] * 2)  # compiles the steps before RSS is read
            gc.collect()
            rss0 = proc.memory_info().rss
            counted = []
            llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, [model.config.eos_token_id])

            def count(text):
                counted.append(len(text))
                return len(llt.tokenize_bytes(text.encode()))

            alone = call(runner.session(count), "big", {"megabytes": 5})
            assert alone.status == "truncated" and alone.result_tokens <= 64
            cap = runner.policy.result_bytes  # read off the wire: the cap and at most one socket read more
            assert runner._meter[-1].cut and runner._meter[-1].read <= cap + 65536
            assert json.loads(alone.result)["error"] == f"result truncated: 'big' answered more than the cap of {cap:,} bytes"
            assert max(counted) <= 8 * 64 + 200  # never more than the character cap (plus the marker)
            docs = [doc("big", {"megabytes": 5}, alone.result), doc(*CONTROL)]
            results, ctrls = run_batch(model, engine, runner, docs)
            assert results[0].finish_reason == "stop" and results[0].text == docs[0], results[0].error
            assert results[0].tool_calls[0].status == "truncated"
            assert_control(results[1])
            # the engine thread spent no more on the 5 MB answer than on any small one
            assert ctrls[0].host_time < 1.0, ctrls[0].host_time
            gc.collect()
            assert proc.memory_info().rss - rss0 < 100 * 2**20


# -- 2. control characters, DEL, non-characters ---------------------------------------------------------
def test_del_and_other_control_characters_are_written_so_the_grammar_accepts_them(model, engine):
    text = "a\x7fb\x00c\x1f\x85\ufdd0\ufffe\U0010ffff\u2028 \udcff"
    with ToolRunner([calculator.make_server(), ToolServer(faulty.make_server(), tools=["raw"])]) as runner:
        want = dumps(text.replace("\udcff", "\ufffd"))
        assert "\\u007f" in want and "\x7f" not in want
        docs = [doc("raw", {"text": text.replace("\udcff", "")}, dumps(text.replace("\udcff", ""))), doc(*CONTROL)]
        results, _ = run_batch(model, engine, runner, docs)
    assert results[0].finish_reason == "stop", results[0].error
    assert results[0].response.reasoning[0].tooluse.tool_result == text.replace("\udcff", "")
    assert results[0].tool_calls[0].status == "ok"
    assert_control(results[1])


# -- 3. a tool that blocks its event loop ----------------------------------------------------------------
def test_a_tool_blocking_its_loop_times_out_and_stalls_nothing_else(model, engine):
    policy = ToolPolicy(timeout_s=1.0)
    with ToolRunner([calculator.make_server(), ToolServer(faulty.make_server(), tools=["block"])], policy) as runner:
        s = runner.session()
        p = s.submit("block", json.dumps({"seconds": 2.5}))
        time.sleep(0.2)  # the server's loop is blocked now
        t0 = time.perf_counter()
        q = s.submit("block", json.dumps({"seconds": 0.0}))
        assert time.perf_counter() - t0 < 0.05  # submission never waits for a loop
        assert call(s, "calculator", {"op": "mul", "a": 6, "b": 7}).result == '{"result": 42}'  # other server: fine
        while (rec := s.poll(p)) is None:
            time.sleep(0.01)
        assert rec.status == "timeout" and rec.result == '{"error": "block: no answer within 1 s"}'
        time.sleep(1.5)  # the tool has answered by now: the answer came too late, it stays a timeout
        assert s.poll(p) is rec and s.poll(q).status == "timeout"

        timeout = '{"error": "block: no answer within 1 s"}'
        # the control row writes a long conclusion after its own call: free text, sampled token by token
        control = doc(*CONTROL, conclusion="the calculator says that three and four make seven, so seven it is")
        docs = [doc("block", {"seconds": 2.5}, timeout), control]
        run_batch(model, engine, runner, docs)  # compiles this batch's step shapes: no compile inside the wait
        stamps: list[tuple[int, float]] = []  # (row, time) of each sampled token, in the engine's order
        results, _ = run_batch(model, engine, runner, docs, on_token=lambda i, t: stamps.append((i, time.perf_counter())))
        assert results[0].finish_reason == "stop" and results[0].text == docs[0], results[0].error
        assert results[0].tool_calls[0].status == "timeout"
        assert results[1].finish_reason == "stop" and results[1].text == control, results[1].error
        # The blocked row's widest gap between two of its tokens is its 1 s wait. An engine that waited with it
        # would sample nothing for anyone inside that gap; a free one goes on decoding the control row there.
        # (Counted in the engine's own token order, not against a wall-clock bound a loaded CI can break.)
        row0 = [k for k, (i, _) in enumerate(stamps) if i == 0]
        a, b = max(zip(row0, row0[1:]), key=lambda ab: stamps[ab[1]][1] - stamps[ab[0]][1])
        assert stamps[b][1] - stamps[a][1] >= 0.9, "the blocked row never waited for its tool"
        assert sum(i == 1 for i, _ in stamps[a + 1 : b]) >= 8  # the control row decoded during the wait


# -- 4. a stdio server that crashes with calls in flight --------------------------------------------------
def test_a_crashing_stdio_server_retries_read_only_calls_only():
    server = ToolServer(stdio_server([PY, "-m", "timjax.tools.servers.faulty"]), tools=["slow", "slow_write", "crash"])
    with ToolRunner([server], ToolPolicy(timeout_s=30, connect_timeout_s=60)) as runner:
        s = runner.session()
        read_only = s.submit("slow", json.dumps({"seconds": 1.0}))
        writes = s.submit("slow_write", json.dumps({"seconds": 1.0}))
        time.sleep(0.3)
        crash = call(s, "crash", {})
        assert crash.status == "server_crashed" and crash.error.startswith("server 'faulty' crashed during the call")
        for p, want in [(read_only, "ok"), (writes, "server_crashed")]:
            while (rec := s.poll(p)) is None:
                time.sleep(0.01)
            assert rec.status == want, rec
        assert s.poll(read_only).result == '"slept 1 s"'  # retried once on the restarted server
        assert "not retried: the tool is not annotated read-only or idempotent" in s.poll(writes).error
        assert call(s, "slow", {"seconds": 0.0}).status == "ok"


# -- 5. secrets in tool URLs and headers ------------------------------------------------------------------
SECRETS = ("hunter2", "SECRET123", "TOKEN-abc987")


def test_credentials_never_reach_the_model_the_output_or_the_logs(model, engine, caplog):
    caplog.set_level(logging.DEBUG)
    echo = ToolSpec(
        name="echo",
        input_schema={"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    )
    dead = ToolServer("http://admin:hunter2@127.0.0.1:9/mcp?api_key=SECRET123", tools=[echo])
    with serve_on_loopback(faulty.make_server().streamable_http_app()) as port:
        live = ToolServer(
            f"http://admin:hunter2@127.0.0.1:{port}/mcp?api_key=SECRET123",
            tools=["raw"],
            headers={"Authorization": "Bearer TOKEN-abc987"},
        )
        with ToolRunner([calculator.make_server(), dead, live], ToolPolicy(timeout_s=10)) as runner:
            assert "hunter2" not in repr(runner.servers) and live.label() == f"http://***@127.0.0.1:{port}/mcp?***"
            s = runner.session()
            leaked = call(s, "raw", {"text": "the key is SECRET123, the token TOKEN-abc987"})  # a server leaking
            assert leaked.status == "ok" and leaked.result == '"the key is ***, the token ***"'
            down = call(s, "echo", {"text": "x"})
            assert down.status in ("server_error", "server_crashed") and "127.0.0.1:9/mcp?***" in down.error, down
            docs = [doc("echo", {"text": "x"}, down.result), doc(*CONTROL)]
            results, _ = run_batch(model, engine, runner, docs)
    assert results[0].finish_reason == "stop", results[0].error
    assert_control(results[1])
    written = model.tokenizer.decode(results[0].tokens)
    outputs = [written, results[0].text, caplog.text, str(runner.startup_errors)]
    outputs += [r.model_dump_json() for r in results] + [leaked.result, down.model_dump_json()]
    for secret in SECRETS:
        assert not any(secret in out for out in outputs), secret


# -- 6. tool lists too big for the prompt ------------------------------------------------------------------
def test_tool_descriptions_and_the_tool_block_are_capped():
    from mcp.server.mcpserver import MCPServer

    many = MCPServer("many", log_level="CRITICAL")
    for i in range(200):
        many.add_tool(lambda x: x, name=f"tool_{i}", description="does a thing with x " * 10)
    with pytest.raises(ToolConfigError) as e:
        ToolRunner([many])
    msg = str(e.value)
    assert msg.startswith("the tool list (tool_0, tool_1,") and "(200 tools)" in msg
    assert "over ToolPolicy.max_tool_block_chars=16,384" in msg and "--tool-allow" in msg
    with ToolRunner([many], ToolPolicy(max_tool_block_chars=100_000)) as r:
        assert len(r.specs) == 200

    wordy = MCPServer("wordy", log_level="CRITICAL")
    wordy.add_tool(lambda x: x, name="wordy", description="blah " * 124_000)  # 620 KB
    with ToolRunner([wordy], ToolPolicy(max_description_chars=500)) as r:
        (spec,) = r.specs
        assert len(spec.description) == 500 and spec.description.endswith("…")


# -- ToolPolicy ------------------------------------------------------------------------------------------
def test_tool_policy_checks_urls_and_server_kinds():
    strict = ToolPolicy(hosts=("*.example.com", "*"), schemes=("https",))
    strict.check_url("https://tools.example.com/mcp")
    for url, rule in [
        ("http://tools.example.com/mcp", "scheme 'http' is not in ToolPolicy.schemes"),
        ("https://127.0.0.1:8000/mcp", "host '127.0.0.1' is loopback and not listed"),
        ("https://localhost/mcp", "host 'localhost' is loopback and not listed"),
        ("https://[::1]/mcp", "host '::1' is loopback and not listed"),
    ]:
        with pytest.raises(ToolPolicyError, match=rule):
            strict.check_url(url)
    ToolPolicy(hosts=("127.0.0.1",)).check_url("http://127.0.0.1:8000/mcp")  # listed: allowed
    with pytest.raises(ToolPolicyError) as e:
        ToolPolicy(hosts=("tools.example.com",)).check_url("http://u:hunter2@evil.test/mcp?k=SECRET123")
    assert str(e.value) == (
        "tool URL http://***@evil.test/mcp?***: host 'evil.test' matches no pattern in "
        "ToolPolicy.hosts ['tools.example.com']"
    )
    closed = ToolPolicy(allow_stdio=False, allow_in_process=False, hosts=("tools.example.com",))
    with pytest.raises(ToolPolicyError, match=r"stdio servers are refused \(ToolPolicy.allow_stdio=False\)"):
        ToolRunner([stdio_server(f"{PY} -m timjax.tools.servers.calculator")], closed)
    with pytest.raises(ToolPolicyError, match="in-process servers are refused"):
        ToolRunner([calculator.make_server()], closed)
    with pytest.raises(ToolPolicyError, match="host '127.0.0.1' is loopback"):
        ToolRunner(["http://127.0.0.1:9/mcp"], closed)
