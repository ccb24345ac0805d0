"""Tool calls inside one inference: the TIM controller parks on a call, the engine keeps the other
sequences decoding, and the encoded MCP answer is forced into the document (replayed traces whose tool
results come from the real servers)."""

import json

import pytest
from conftest import random_tim_model

import timjax
import timjax.api as timjax_api
from timjax.engine import Engine, Request
from timjax.engine.tim_controller import ReplayText, TimController
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import dumps, tim_schema
from timjax.tools.runner import ToolLimits, ToolRunner
from timjax.tools.servers import calculator, faulty, kb
from timjax.tools.traces import calculation_trace
from timjax.train.corpus import iter_tasks_with_tools

VOCAB = 151_936
EOS = 151645


@pytest.fixture(scope="module")
def model(qwen3_tokenizer):
    return random_tim_model(qwen3_tokenizer, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def llt(model):
    return llg_tokenizer(model.tokenizer, VOCAB, [EOS])


@pytest.fixture(scope="module")
def runner():
    with ToolRunner(
        [calculator.make_server(), kb.make_server(), faulty.make_server()], ToolLimits(timeout_s=4.0, max_calls=40)
    ) as r:
        yield r


def _controller(model, llt, runner, doc: str, *, buffer, prompt):
    return TimController(
        model,
        tim_schema(runner.specs),
        max_new_tokens=20_000,
        prompt_len=len(prompt),
        pruning_buffer=buffer,
        stop_ids=[EOS],
        tools=runner,
        override=ReplayText(doc, llt),
    )


def test_thirty_tool_calls_in_one_inference_with_pruning(model, llt, runner):
    doc = calculation_trace(30, words=1)
    text = dumps(doc)
    prompt = model.tokenizer("Compute the total.")["input_ids"]
    ctrl = _controller(model, llt, runner, text, buffer=0, prompt=prompt)
    engine = Engine(model, max_batch=1, page_size=16, max_seq_len=1024)
    r = engine.run([Request(prompt, 20_000, controller=ctrl)])[0]
    assert r.finish_reason == "stop", r.error
    # the runtime wrote every result, byte for byte what the pure functions + encode_result give
    assert r.text == text
    uses = list(iter_tasks_with_tools(doc))
    assert len(uses) == len(r.tool_calls) == r.stats.tool_calls == 30 and r.stats.tool_errors == 0
    for rec, use in zip(r.tool_calls, uses):
        assert (rec.tool, rec.arguments, rec.status) == (use["tool_name"], use["parameters"], "ok")
        assert rec.result == dumps(use["tool_result"]) and rec.result_tokens > 0
        assert rec.resume_s is not None and rec.resume_s > 0 and rec.latency_s > 0  # status ok: no timeout
    assert [rec.task_path for rec in r.tool_calls][:4] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)]
    # the results sat inside subtask lists and were pruned with them
    s = r.stats
    assert s.prune_events >= 9 and s.pruned_share > 0.8 and s.peak_working_tokens < s.generated_tokens // 3
    assert r.working_memory_text.count('"tool_result"') < 3 < r.text.count('"tool_result"') == 30
    assert [t.tooluse.tool_result for t in _all_tasks(r.response) if t.tooluse] == [u["tool_result"] for u in uses]


def test_tool_calls_with_the_prefix_cache_equal_it_off(model, llt, runner):
    """Three replays with real MCP tool calls (parked sequences, forced results, pruning) over one shared
    prompt (two slots: the third request joins when the first two have cached it): with the prefix cache on, the texts, the tool calls and the
    working memories equal the cache-off run's, and the shared prompt pages were mapped."""
    prompt = model.tokenizer("Compute the total of these numbers, step by step, with the tools. " * 4)["input_ids"]
    docs = [dumps(calculation_trace(k, words=1)) for k in (3, 4, 5)]

    def run(prefix_cache):
        eng = Engine(model, max_batch=2, page_size=8, max_seq_len=1024, kv_tokens=640, check_cache=True,
                     prefix_cache=prefix_cache)
        reqs = [Request(prompt, 20_000, controller=_controller(model, llt, runner, d, buffer=1, prompt=prompt))
                for d in docs]
        return eng.run(reqs), eng.stats()

    on, on_stats = run(True)
    off, _ = run(False)
    for a, b, doc in zip(on, off, docs):
        assert a.finish_reason == b.finish_reason == "stop", (a.error, b.error)
        assert a.text == b.text == doc
        assert [(c.tool, c.arguments, c.result) for c in a.tool_calls] == [
            (c.tool, c.arguments, c.result) for c in b.tool_calls
        ]
        assert a.working_memory_text == b.working_memory_text
    assert on_stats.prefix_cache_hit_tokens_total >= (len(prompt) - 1) // 8 * 8  # the full prompt pages


def _all_tasks(resp):
    out = []

    def walk(tasks):
        for t in tasks:
            out.append(t)
            walk(t.subtasks or [])

    walk(resp.reasoning)
    return out


def test_a_hanging_tool_parks_one_sequence_while_the_others_finish(model, llt):
    hang = {
        "reasoning": [
            {
                "thought": "ask",
                "tooluse": {
                    "tool_name": "hang",
                    "parameters": {},
                    "tool_result": {"error": "hang: no answer within 6 s"},
                },
                "conclusion": "it timed out",
            }
        ],
        "answer": "none",
    }
    docs = [dumps(hang), dumps(calculation_trace(2, seed=1, words=1)), dumps(calculation_trace(2, seed=2, words=1))]
    prompt = model.tokenizer("Go.")["input_ids"]

    def run(runner):
        ctrls = [_controller(model, llt, runner, d, buffer=1, prompt=prompt) for d in docs]
        trace = []  # per iteration: (live request indices, whether request 0 is parked)

        def on_step(engine, running):
            trace.append(({s.index for s in running}, any(s.index == 0 and s.parked for s in running)))

        engine = Engine(model, max_batch=3, page_size=64, max_seq_len=512)
        return engine.run([Request(prompt, 20_000, controller=c) for c in ctrls], on_step=on_step), trace

    with ToolRunner(
        [calculator.make_server(), kb.make_server(), faulty.make_server()], ToolLimits(timeout_s=6.0)
    ) as runner:
        run(runner)  # compiles this batch's step shapes, so the run below measures the scheduling only
        results, trace = run(runner)
    assert [r.finish_reason for r in results] == ["stop"] * 3, [r.error for r in results]
    assert [r.text for r in results] == docs
    rec = results[0].tool_calls[0]
    assert rec.status == "timeout" and rec.result == '{"error": "hang: no answer within 6 s"}' and rec.latency_s > 5.9
    assert [c.status for r in results[1:] for c in r.tool_calls] == ["ok", "ok"] * 2
    # the other two finished while request 0 was parked on its call
    started = next(i for i, (live, _) in enumerate(trace) if {1, 2} <= live)
    done = next(i for i in range(started, len(trace)) if not trace[i][0] & {1, 2})
    assert trace[done] == ({0}, True)
    # (the trace above shows it by iterations, not by wall time, which a loaded machine stretches)
    assert results[0].stats.time_s > rec.latency_s


def test_generate_with_tools_starts_offers_and_closes_the_servers(model, llt, monkeypatch):
    """timjax.generate(tools=[...]): the schema offers the listed tools, the system prompt names them, calls
    run inside the inference, and the runner is closed afterwards (replay via the controller's override)."""
    import timjax.engine.tim_controller as tc

    use = {
        "tool_name": "calculator",
        "parameters": {"op": "div", "a": 1, "b": 0},
        "tool_result": {"error": "division by zero"},
    }
    doc = dumps({"reasoning": [{"thought": "divide", "tooluse": use, "conclusion": "undefined"}], "answer": "none"})
    seen = {}
    init = tc.TimController.__init__

    def patched(self, model_, schema, **kw):
        seen["tools"] = [t.name for t in schema.tools]
        seen["runner"] = kw.get("tools")
        init(self, model_, schema, **kw, override=ReplayText(doc, llt))

    monkeypatch.setattr(tc.TimController, "__init__", patched)
    prompts = []
    monkeypatch.setattr(
        timjax_api, "encode_prompt", lambda m, p, **kw: prompts.append(kw.get("system")) or m.tokenizer(p)["input_ids"]
    )
    r = timjax.generate(
        model,
        "What is 1/0?",
        tools=[calculator.make_server()],
        max_new_tokens=500,
        tool_limits=ToolLimits(timeout_s=5),
        stop_ids=[EOS],
        max_seq_len=1024,
    )
    assert seen["tools"] == ["calculator"] and 'calculator(op: "add"|"sub"|"mul"|"div"' in prompts[0]
    assert r.finish_reason == "stop" and r.text == doc
    assert [(c.tool, c.status, c.result) for c in r.tool_calls] == [
        ("calculator", "tool_error", '{"error": "division by zero"}')
    ]
    assert r.response.reasoning[0].tooluse.tool_result == {"error": "division by zero"}
    assert seen["runner"].closed  # closed by generate


def test_without_a_runner_the_model_writes_tool_result_itself(model, llt):
    """No tools given: tool_result is an ordinary JSON value of the grammar (nothing parks)."""
    with ToolRunner([calculator.make_server()]) as r:
        schema = tim_schema(r.specs)
    doc = dumps(
        {
            "reasoning": [
                {
                    "thought": "t",
                    "tooluse": {
                        "tool_name": "calculator",
                        "parameters": {"op": "add", "a": 1, "b": 2},
                        "tool_result": {"made": ["up", 1]},
                    },
                    "conclusion": "c",
                }
            ],
            "answer": "a",
        }
    )
    prompt = model.tokenizer("Go.")["input_ids"]
    ctrl = TimController(
        model,
        schema,
        max_new_tokens=2000,
        prompt_len=len(prompt),
        pruning_buffer=None,
        stop_ids=[EOS],
        override=ReplayText(doc, llt),
    )
    res = Engine(model, max_batch=1, page_size=16, max_seq_len=1024).run([Request(prompt, 2000, controller=ctrl)])[0]
    assert res.finish_reason == "stop" and res.text == doc and res.tool_calls == []
    assert json.loads(res.text)["reasoning"][0]["tooluse"]["tool_result"] == {"made": ["up", 1]}


def test_cli_tool_specs(tmp_path, model, qwen3_tokenizer_dir, capsys):
    """`timjax generate --tool SPEC`: an in-process factory, a stdio command and a URL parse into servers;
    bad specs fail in one line; a run offers the tools and reports the calls."""
    from timjax.convert import export_timjax_to_hf

    from timjax.cli import main
    from timjax.tools.runner import ToolConfigError
    from timjax.tools.spec import parse_env, parse_tool_spec

    s = parse_tool_spec("timjax.tools.servers.calculator:make_server")
    assert type(s.target).__name__ == "MCPServer" and s.label() == "calculator"
    s = parse_tool_spec("python -m timjax.tools.servers.kb --seed 2", env=parse_env(["A=1", "B=x=y"]))
    assert s.target.args == ["-m", "timjax.tools.servers.kb", "--seed", "2"] and s.target.env == {"A": "1", "B": "x=y"}
    assert s.target.command.endswith("python") and s.label() == "kb"
    assert parse_tool_spec("http://127.0.0.1:9/mcp").target == "http://127.0.0.1:9/mcp"
    for bad, msg in [
        ("timjax.tools.servers.calculator:nope", "has no attribute 'nope'"),
        ("timjax.nope:make_server", "cannot import 'timjax.nope'"),
        ("timjax.tools.servers.calculator:OPS", "expected an MCPServer, got tuple"),
    ]:
        with pytest.raises(ToolConfigError, match=msg):
            parse_tool_spec(bad)
    with pytest.raises(ToolConfigError, match="expected KEY=VALUE"):
        parse_env(["NOEQUALS"])

    ckpt = export_timjax_to_hf(
        (model.config, model.params()),
        tmp_path / "ckpt",
        dtype="float32",
        tokenizer_dir=qwen3_tokenizer_dir,
        progress=False,
    )
    rc = main(
        [
            "generate",
            str(ckpt),
            "--prompt",
            "2+2?",
            "--dtype",
            "float32",
            "--max-new-tokens",
            "6",
            "--tool",
            "timjax.tools.servers.calculator:make_server",
            "--tool",
            "timjax.tools.servers.kb:make_server",
            "--tool-allow",
            "calculator",
        ]
    )
    err = capsys.readouterr().err
    # a random model's tree cut by a 6-token budget: reported, and exit 1 (issue 19)
    assert rc == 1 and "[length] " in err and "0 tool calls (0 failed)" in err and "before its answer" in err, err
    rc = main(
        [
            "generate",
            str(ckpt),
            "--prompt",
            "x",
            "--tool",
            "timjax.tools.servers.kb:make_server",
            "--tool-allow",
            "calculator",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        "timjax: error: allowed tools not offered by any server: calculator (offered: lookup)"
    )
