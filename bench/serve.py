"""timjax serve under load, and in-runtime tools vs client-side function calling, over real HTTP.

    nice -n 10 python bench/serve.py --json bench/serve_cpu2_shared.json --plot bench/serve_cpu2_shared.png
    python bench/serve.py --from-json bench/serve_conc_cpu_20m.json bench/serve_tools_cpu_k40.json \
        --plot bench/serve_cpu.png   # tables and plot from earlier runs, nothing run

The server is ``timjax.serve.create_app`` (the open engine behind FastAPI on uvicorn, on loopback), with
the shipped tiny TIM; the clients are the official ``openai`` client (async) and plain HTTP for the Runs API.

(a) concurrency: N clients (``--clients``, default 1 4 16 64) each stream one chat completion (plain
    generation, ``--max-tokens``, greedy) at once, over raw SSE (``--client openai``: the official client).
    The server warms up eagerly (every step shape compiled before the first wave). Throughput = completion tokens / wall time of the
    whole wave; TTFT = send -> first content chunk; ITL = gaps between content chunks (p50 / p99 over all
    requests of the wave). "offline" = the same N prompts (same token ids, same budget) added straight to
    the same running open engine (``engine.add_request``, no HTTP) and collected: the ratio is server
    throughput over offline throughput (goal >= 0.9 at saturation). The clients run in one process of
    their own (``--clients-in-process``: in the server's, sharing its GIL, a lower bound).
(b) k tool calls (``--calls``): one task answered (runtime) by ``POST /v1/runs`` with the tools called
    inside the inference (the tree parks, the result is forced into the live KV cache, finished subtask
    lists are pruned), vs (client) client-side function calling on ``/v1/chat/completions``: every call
    ends the request; the client runs the tool and re-sends the whole conversation, which the server
    prefills again: all of it on a server without a prefix cache (the paper's baseline, ``client_no_cache``),
    only the new tail past the cached full pages with one (``client``, the server's default). The tiny TIM
    cannot write k calls itself, so both
    replay a scripted document (``timjax.tools.traces.calculation_trace(k)``, the same running total over
    calculator and lookup calls): the runtime replays the TIM document through the server's real
    TimController (``ReplayText``: the sampled token is replaced by the document's; the tool results are
    the real MCP servers' and must match the document byte for byte); the client loop's server replays
    each turn's call JSON (``{"tool_calls": [...]}``) and finally the answer, through the server's own
    function-calling path, the client computing each result with the same pure functions. Tokens
    processed = prompt tokens computed (sent minus those read from the prefix cache, as the usage reports
    them) + tokens written, over all requests of the task; tokens sent counts the cached ones too.

Figures: median of ``--repeats`` with min-max. The machine is stated in the JSON (a shared 2-core CPU in
the committed run: other agents ran at the same time; read the ratios, not the absolute figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/serve.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()

import timjax  # noqa: E402
from bench.common import environment, load_average, log, print_table, write_json  # noqa: E402

MODEL = "timjax-tiny-tim"


class Server:
    http = "auto"  # uvicorn's HTTP parser (--http): httptools when installed, else pure-Python h11

    def __init__(self, app):
        import uvicorn

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", http=self.http))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.app = app

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def med(rows: list[dict], key: str) -> dict:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


# ------------------------------------------------------------------------------------ (a) concurrency
RANDOM_SHAPES = ("20m",)


def serving_model(shape: str):
    """The shipped tiny TIM, or random weights at a ``bench/decode.py`` shape that speaks its tokenizer."""
    from timjax.api import default_model_path

    tim = timjax.load(default_model_path(), dtype="float32")
    if shape == "tim":
        return tim
    from bench.decode import SHAPES

    cfg = SHAPES[shape].model_copy(update={"vocab_size": tim.config.vocab_size})
    return timjax.random_model(cfg, dtype="float32", seed=0, tokenizer=tim.tokenizer)


def questions(n: int) -> list[str]:
    return [f"Calculate {3 + i % 17} * ({i % 11} - {5 + i % 7})." for i in range(n)]


async def wave(url: str, qs: list[str], max_tokens: int, client_kind: str = "raw") -> dict:
    if client_kind == "raw":
        return await wave_raw(url, qs, max_tokens)
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

    async def one(q):
        t0 = time.perf_counter()
        stamps, usage = [], None
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True},
        )
        async for c in stream:
            if c.choices and c.choices[0].delta.content:
                stamps.append(time.perf_counter())
            if c.usage is not None:
                usage = c.usage
        return t0, stamps, usage.completion_tokens

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(one(q) for q in qs))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(o[2] for o in outs)
    ttft = [o[1][0] - o[0] for o in outs if o[1]]
    itl = [b - a for o in outs for a, b in zip(o[1], o[1][1:])]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


async def wave_raw(url: str, qs: list[str], max_tokens: int) -> dict:
    """``wave`` with a light client, as vLLM's benchmark_serving does (aiohttp, ``data:`` lines parsed by
    hand): on a 2-core machine the load generator's own CPU is taken from the server it measures, and the
    official client parses every chunk into pydantic objects."""
    import httpx2 as httpx  # the HTTP client the openai package itself depends on

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(qs) + 4)) as http:

        async def one(q):
            body = {"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0, stamps, tokens = time.perf_counter(), [], 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    if '"content":"' in line and '"content":""' not in line:
                        stamps.append(time.perf_counter())
                    elif '"usage":' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return t0, stamps, tokens

        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(q) for q in qs))
        wall = time.perf_counter() - t0
    tokens = sum(o[2] for o in outs)
    ttft = [o[1][0] - o[0] for o in outs if o[1]]
    itl = [b - a for o in outs for a, b in zip(o[1], o[1][1:])]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def wave_sync(url: str, qs: list[str], max_tokens: int, client_kind: str = "raw") -> dict:
    """``wave`` to completion: what a client process runs (its own interpreter, not the server's GIL), with
    the CPU the clients themselves took (cores busy over the wave)."""
    cpu = time.process_time()
    out = asyncio.run(wave(url, qs, max_tokens, client_kind))
    return {**out, "client_cores": (time.process_time() - cpu) / out["wall_s"]}


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


class Clients:
    """Where the clients run: in this process (``--clients-in-process``: they share the server's GIL, a lower
    bound), or in one separate process, as real clients are (the default)."""

    def __init__(self, separate: bool, cpus: set[int] | None = None):
        self.pool = None
        if separate:
            import concurrent.futures
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds JAX and threads
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=pin, initargs=(cpus,))

    def wave(self, url: str, qs: list[str], max_tokens: int, client_kind: str = "raw") -> dict:
        if self.pool is None:
            return wave_sync(url, qs, max_tokens, client_kind)
        return self.pool.submit(wave_sync, url, qs, max_tokens, client_kind).result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def offline(backend, qs: list[str], max_tokens: int) -> dict:
    from timjax.engine import RequestParams

    prompts = [backend.encode_chat([{"role": "user", "content": q}]) for q in qs]
    t0 = time.perf_counter()
    handles = [backend.engine.add_request(p, RequestParams(max_new_tokens=max_tokens)) for p in prompts]
    results = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    tokens = sum(r.stats.generated_tokens for r in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}


def thread_cpu_s(thread: threading.Thread | None) -> float:
    """CPU seconds one thread of this process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (AttributeError, OSError, IndexError, ValueError):
        return 0.0


def steps_of(backend, run, http_thread: threading.Thread | None = None) -> dict:
    """``run()``'s result with the engine steps it took (a wave whose requests arrive spread out would run
    more, smaller steps for the same tokens), and the cores the whole server process, its HTTP thread
    (uvicorn's event loop) and the engine's loop thread used over it."""
    before = backend.engine.stats().steps_total
    threads = {"http": http_thread, "engine": backend.engine._thread}
    cpu0, t0 = time.process_time(), time.perf_counter()
    per0 = {k: thread_cpu_s(t) for k, t in threads.items()}
    out = run()
    wall = time.perf_counter() - t0
    cores = {f"{k}_cores": (thread_cpu_s(t) - per0[k]) / wall for k, t in threads.items()}
    return {**out, "steps": backend.engine.stats().steps_total - before,
            "server_cores": (time.process_time() - cpu0) / wall, **cores}


def offline_steps(backend, qs: list[str], max_tokens: int) -> dict:
    return steps_of(backend, lambda: offline(backend, qs, max_tokens))


def plain_server(args, model) -> Server:
    """(a)'s server: plain generation, every step shape compiled before the first wave."""
    from timjax.serve.app import create_app
    from timjax.serve.config import ServeConfig

    cfg = ServeConfig(tim=False, max_batch=args.max_batch, max_seq_len=512, max_queue=1024, warmup="eager")
    return Server(create_app(cfg, model=model))


def bench_concurrency(args, model) -> list[dict]:
    srv = plain_server(args, model)
    backend = srv.app.state.backend
    rows = []
    clients = Clients(separate=not args.clients_in_process, cpus=set(args.client_cpus or ()))
    try:
        for n in args.clients:  # warm-up: every shape a wave of N compiles (compile time is not measured)
            clients.wave(srv.url, questions(n), args.max_tokens, args.client)
            offline(backend, questions(n), args.max_tokens)
        for rep in range(args.repeats):
            for n in args.clients:
                qs = questions(n)
                # odd repeats run the offline peer first: neither side always follows the other
                o = offline_steps(backend, qs, args.max_tokens) if rep % 2 else None
                s = steps_of(backend, lambda qs=qs: clients.wave(srv.url, qs, args.max_tokens, args.client), srv.thread)
                if o is None:
                    o = offline_steps(backend, qs, args.max_tokens)
                row = {"clients": n, "rep": rep, **s, "offline_tok_s": o["tok_s"], "offline_tokens": o["tokens"],
                       "offline_steps": o["steps"], "ratio": s["tok_s"] / o["tok_s"],
                       "offline_server_cores": o["server_cores"], "offline_engine_cores": o["engine_cores"],
                       "tokens_per_step": s["tokens"] / max(s["steps"], 1),
                       "offline_tokens_per_step": o["tokens"] / max(o["steps"], 1)}
                rows.append(row)
                log(f"rep {rep} N={n:3d} server {s['tok_s']:7.1f} tok/s  offline {o['tok_s']:7.1f} tok/s  "
                    f"ratio {row['ratio']:.2f}  tokens/step {row['tokens_per_step']:.2f} vs "
                    f"{row['offline_tokens_per_step']:.2f}  cores: process {s['server_cores']:.2f} vs "
                    f"{o['server_cores']:.2f}, http {s['http_cores']:.2f}, engine thread {s['engine_cores']:.2f} vs "
                    f"{o['engine_cores']:.2f}, clients {s['client_cores']:.2f}  ttft p50 {s['ttft_p50']:.3f}s")
    finally:
        clients.close()
        srv.stop()
    return rows


def spin(duty: float, stop) -> None:
    """Busy ``duty`` of each 10 ms on one core, until ``stop`` is set (a stand-in for a server's own CPU)."""
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < duty * 0.01:
            pass
        time.sleep(0.01 * (1 - duty))


def bench_interference(args, model) -> list[dict]:
    """The offline engine alone, then beside a process that only burns ``--interference`` of a core (what
    the HTTP thread and the clients use in (a), no serving at all), alternating: how much of (a)'s gap the
    same CPU taken by anything costs on this machine."""
    import multiprocessing

    srv = plain_server(args, model)  # the same engine as (a)'s offline peer
    backend, qs, ctx, rows = srv.app.state.backend, questions(max(args.clients)), multiprocessing.get_context("spawn"), []
    try:
        offline(backend, qs, args.max_tokens)
        for rep in range(args.repeats):
            for duty in (0.0, args.interference):
                stop = ctx.Event()
                p = ctx.Process(target=spin, args=(duty, stop), daemon=True) if duty else None
                if p is not None:
                    p.start()
                    time.sleep(0.5)
                o = offline(backend, qs, args.max_tokens)
                if p is not None:
                    stop.set()
                    p.join()
                rows.append({"rep": rep, "duty": duty, "clients": len(qs), "offline_tok_s": o["tok_s"]})
                log(f"rep {rep} background {duty:.2f} core: offline {o['tok_s']:7.1f} tok/s")
    finally:
        srv.stop()
    alone = statistics.median(r["offline_tok_s"] for r in rows if r["duty"] == 0)
    beside = statistics.median(r["offline_tok_s"] for r in rows if r["duty"] > 0)
    log(f"offline beside {args.interference:.2f} of a core of other work: {beside / alone:.2f} of alone (median)")
    return rows


# ------------------------------------------------------------------------------ (b) k tool calls
class Scripted:
    """A controller that writes ``ids`` (the sampled token replaced by the script's, one per step)."""

    wants_mask = False

    def __init__(self, ids: list[int]):
        self.ids = ids

    def fill_mask(self, out):  # pragma: no cover
        raise AssertionError

    def on_token(self, token, seq):
        from timjax.engine import Action

        seq.generated.append(self.ids[len(seq.generated)])
        if len(seq.generated) == len(self.ids):
            return Action(feed=[], finish="stop")
        return Action(feed=[seq.generated[-1]])

    def finish(self, seq, result):
        pass


def tools_server(model, k_max: int, prefix_cache: bool = True):
    """A TIM server whose requests replay a script: Runs requests the TIM document set in ``script["doc"]``
    (through the real TimController and tools), chat function-calling requests ``script["turn"]``."""
    from timjax.engine.controllers import default_stop_ids
    from timjax.engine.tim_controller import ReplayText, TimController
    from timjax.serve.app import create_app
    from timjax.serve.config import ServeConfig
    from timjax.tim.grammar import llg_tokenizer

    # warmup off: the warm-up pass compiles what these tasks meet (two servers warming every shape of a
    # 4096-token context exhausted the CPU backend's memory maps)
    cfg = ServeConfig(
        max_seq_len=4096, max_tool_calls=k_max + 2, max_batch=1, max_tokens_default=4000, prefix_cache=prefix_cache,
        warmup="off",
    )
    srv = Server(create_app(cfg, model=model))
    backend = srv.app.state.backend
    script: dict[str, Any] = {}
    stop_ids = default_stop_ids(model)
    llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, stop_ids)
    submit = backend.submit

    def replaying(req, request_id=None):
        if req.kind == "tim":
            doc = script["doc"]

            def make():
                return TimController(model, req.schema, max_new_tokens=req.max_new_tokens, prompt_len=len(req.prompt),
                                     pruning_buffer=req.pruning_buffer, stop_ids=stop_ids, tools=req.tools,
                                     override=ReplayText(doc, llt))
            req.make_controller, req.controller_param = make, "script"
        elif req.kind == "tools":
            ids = list(model.tokenizer(script["turn"], add_special_tokens=False)["input_ids"])
            req.make_controller, req.controller_param = (lambda: Scripted(ids)), "script"
        return submit(req, request_id)

    backend.submit = replaying
    return srv, script


def run_runtime(srv, script, doc_text: str) -> dict:
    import requests

    script["doc"] = doc_text
    t0 = time.perf_counter()
    r = requests.post(srv.url + "/v1/runs", json={"engine": MODEL, "input": {"instructions": "Compute the running total."}})
    rid = r.json()["runId"]
    while True:
        v = requests.get(srv.url + f"/v1/runs/{rid}").json()
        if v["status"] not in ("queued", "running"):
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if v["status"] != "succeeded":
        raise RuntimeError(f"run {v}")
    job = srv.app.state.runs[rid]
    text = job.result.text
    if json.loads(text) != json.loads(doc_text):
        raise RuntimeError("the runtime did not reproduce the document")
    u, cached = v["usage"], job.result.stats.cached_prompt_tokens
    return {"wall_s": wall, "requests": 1, "prompt_tokens": u["inputTokens"], "written_tokens": u["outputTokens"],
            "sent_tokens": u["inputTokens"] + u["outputTokens"],
            "processed_tokens": u["inputTokens"] - cached + u["outputTokens"], "tool_calls": len(job.result.tool_calls)}


def run_client(srv, script, doc: dict) -> dict:
    import openai

    from timjax.tools.traces import tool_call
    from timjax.train.corpus import iter_tasks_with_tools
    from timjax.train.tools_adapter import listed_specs

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600)

    tools = [{"type": "function", "function": {"name": s.name, "description": s.description,
                                               "parameters": s.input_schema}} for s in listed_specs()]
    messages: list[Any] = [{"role": "user", "content": "Compute the running total."}]
    calls = list(iter_tasks_with_tools(doc))
    prompt = cached = written = requests_n = 0
    t0 = time.perf_counter()
    for use in calls + [None]:
        if use is not None:
            script["turn"] = json.dumps({"tool_calls": [{"name": use["tool_name"], "arguments": use["parameters"]}]})
        else:
            script["turn"] = json.dumps({"content": doc["answer"]})
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="auto",
                                           max_tokens=2000)
        requests_n += 1
        prompt += r.usage.prompt_tokens
        cached += r.usage.prompt_tokens_details.cached_tokens
        written += r.usage.completion_tokens
        msg = r.choices[0].message
        if use is None:
            if msg.content != doc["answer"]:
                raise RuntimeError(f"client loop answer {msg.content!r} != {doc['answer']!r}")
            break
        (call,) = msg.tool_calls
        _, value = tool_call(call.function.name, json.loads(call.function.arguments))  # the client runs it
        if value != use["tool_result"]:
            raise RuntimeError("the client's tool result differs from the document's")
        messages += [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(value)}]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": requests_n, "prompt_tokens": prompt, "written_tokens": written,
            "sent_tokens": prompt + written, "processed_tokens": prompt - cached + written, "tool_calls": len(calls)}


def bench_tools(args, model) -> list[dict]:
    from timjax.tim.schema import dumps
    from timjax.tools.traces import calculation_trace

    # the client loop on a server with the prefix cache (the default: each re-sent conversation computes only
    # its new tail) and on one without (every round trip prefills the whole conversation again, as the paper's
    # baseline does)
    docs = {k: calculation_trace(k, words=1) for k in args.calls}
    servers = {"on": tools_server(model, max(args.calls)), "off": tools_server(model, max(args.calls), False)}
    modes = {
        "runtime": lambda k: run_runtime(*servers["on"], dumps(docs[k])),
        "client": lambda k: run_client(*servers["on"], docs[k]),
        "client_no_cache": lambda k: run_client(*servers["off"], docs[k]),
    }
    rows = []
    try:
        for k in args.calls:  # warm-up: every prompt / step shape the task compiles
            for run in modes.values():
                run(k)
        for rep in range(args.repeats):
            for k in args.calls:
                for mode, run in modes.items():
                    r = run(k)
                    rows.append({"mode": mode, "k": k, "rep": rep, **r})
                    log(f"rep {rep} k={k:3d} {mode:16s} wall {r['wall_s']:7.2f} s  requests {r['requests']:3d}  "
                        f"processed {r['processed_tokens']:6d} tokens  load {load_average()}")
    finally:
        for srv, _ in servers.values():
            srv.stop()
    return rows


# ------------------------------------------------------------------------------------------ report
TOOL_MODES = ("runtime", "client", "client_no_cache")


def summarize(conc: list[dict], tools: list[dict]) -> dict:
    out: dict[str, Any] = {"concurrency": [], "tools": []}
    for n in sorted({r["clients"] for r in conc}):
        rs = [r for r in conc if r["clients"] == n]
        out["concurrency"].append({"clients": n, **{k: med(rs, k) for k in (
            "tok_s", "offline_tok_s", "ratio", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "client_cores",
            "tokens_per_step", "offline_tokens_per_step", "server_cores", "offline_server_cores", "http_cores",
            "engine_cores", "offline_engine_cores")}})
    for k in sorted({r["k"] for r in tools}):
        row: dict[str, Any] = {"k": k}
        for mode in TOOL_MODES:
            rs = [r for r in tools if r["k"] == k and r["mode"] == mode]
            row[mode] = {key: med(rs, key) for key in ("wall_s", "processed_tokens", "sent_tokens", "requests")}
        out["tools"].append(row)
    return out


def joined_summary(paths: list[str]) -> dict:
    """The (a) rows and (b) rows of earlier runs' JSON, in one summary (a file may hold either or both)."""
    out: dict[str, list] = {"concurrency": [], "tools": []}
    for path in paths:
        summary = json.loads(Path(path).read_text())["summary"]
        for key in out:
            out[key] += summary.get(key, [])
    return out


def tables(summary: dict) -> None:
    def f(d, digits=3):
        return f"{d['median']:.{digits}g} ({d['min']:.{digits}g}-{d['max']:.{digits}g})" if d else "-"

    print_table(["clients", "server tok/s", "offline tok/s", "ratio", "TTFT p50 s", "TTFT p99 s", "ITL p50 s",
                 "ITL p99 s", "client cores"],
                [[r["clients"], f(r["tok_s"]), f(r["offline_tok_s"]), f(r["ratio"], 2), f(r["ttft_p50"]),
                  f(r["ttft_p99"]), f(r["itl_p50"]), f(r["itl_p99"]), f(r.get("client_cores", {}), 2)]
                 for r in summary["concurrency"]],
                title="(a) N concurrent streaming clients")

    def ratio(r, mode):
        return f"{r[mode]['wall_s']['median'] / r['runtime']['wall_s']['median']:.2f}"

    print_table(["k calls", "runtime wall s", "client wall s (cache)", "client wall s (no cache)",
                 "client/runtime (cache, no cache)", "runtime tokens computed", "client computed (cache)",
                 "client computed (no cache)", "client requests"],
                [[r["k"], f(r["runtime"]["wall_s"]), f(r["client"]["wall_s"]), f(r["client_no_cache"]["wall_s"]),
                  f"{ratio(r, 'client')}, {ratio(r, 'client_no_cache')}",
                  f(r["runtime"]["processed_tokens"], 5), f(r["client"]["processed_tokens"], 5),
                  f(r["client_no_cache"]["processed_tokens"], 5), r["client"]["requests"]["median"]]
                 for r in summary["tools"]],
                title="(b) k tool calls: /v1/runs (in-runtime) vs client-side function calling")


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    c = summary["concurrency"]
    if c:
        ax = axes[0]
        xs = [r["clients"] for r in c]
        for key, label in (("tok_s", "server (HTTP, streaming)"), ("offline_tok_s", "open engine offline")):
            ys = [r[key]["median"] for r in c]
            err = [[y - r[key]["min"] for y, r in zip(ys, c)], [r[key]["max"] - y for y, r in zip(ys, c)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens / s")
        ax.set_title("(a) throughput")
        ax.legend()
    t = summary["tools"]
    for ax, key, ylabel in ((axes[1], "wall_s", "wall time per task (s)"),
                            (axes[2], "processed_tokens", "tokens processed per task")):
        for mode, label in zip(TOOL_MODES, ("in-runtime tools (/v1/runs)", "client-side function calling, prefix cache",
                                            "client-side function calling, no prefix cache")):
            xs = [r["k"] for r in t]
            ys = [r[mode][key]["median"] for r in t]
            err = [[y - r[mode][key]["min"] for y, r in zip(ys, t)], [r[mode][key]["max"] - y for y, r in zip(ys, t)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xlabel("tool calls k")
        ax.set_ylabel(ylabel)
        ax.set_title("(b) " + ylabel)
        ax.legend()
    fig.suptitle(f"timjax serve, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2, 5, 10, 20, 40])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--clients-in-process",
        action="store_true",
        help="run the clients in the server's process (they then share its GIL: a lower bound)",
    )
    ap.add_argument("--client", choices=["raw", "openai"], default="raw",
                    help="(a)'s load generator: raw SSE lines over httpx (as vLLM's benchmark_serving), or the "
                    "official openai client (heavier: every chunk becomes pydantic objects)")
    ap.add_argument("--skip", choices=["concurrency", "tools"], default=None)
    ap.add_argument(
        "--split-cpus",
        action="store_true",
        help="the server (and the offline peer) on the first CPU, the client process on the others: as if the "
        "clients ran on another machine (on a 2-core box, the client process otherwise takes cores from the "
        "server's XLA threads, which the offline peer keeps)",
    )
    ap.add_argument(
        "--shape",
        choices=["tim", *RANDOM_SHAPES],
        default="tim",
        help="(a)'s model: the shipped tiny TIM (0.85M parameters: a step of about a millisecond, so the host "
        "path is all there is to measure), or random weights at a bench/decode.py shape with the tiny TIM's "
        "tokenizer (a step that takes device time, as a served model's does)",
    )
    ap.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn's HTTP parser")
    ap.add_argument(
        "--switch-interval", type=float, default=None, help="sys.setswitchinterval for this process (default 5e-3)"
    )
    ap.add_argument("--interference", type=float, default=None, metavar="CORES",
                    help="run only the offline engine (max --clients prompts), alone and beside a process busy "
                    "CORES of one core, alternating --repeats times (no server traffic)")
    ap.add_argument("--json", default="bench/out/serve.json")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-title", default="tiny TIM, 2-core CPU", help="the plot's machine and model, in words")
    ap.add_argument("--from-json", nargs="+", default=None, metavar="JSON",
                    help="run nothing: print the tables and draw --plot from earlier runs' JSON ((a) from one run "
                    "and (b) from another: their summaries are joined)")
    args = ap.parse_args(argv)
    if args.from_json:
        summary = joined_summary(args.from_json)
        tables(summary)
        if args.plot:
            plot(summary, Path(args.plot), args.plot_title)
        return {"summary": summary}
    if args.split_cpus:  # before the model loads: XLA sizes its thread pool by the CPUs this process may use
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--split-cpus needs at least 2 CPUs")
        pin({cpus[0]})
        args.client_cpus = cpus[1:]
    else:
        args.client_cpus = None
    Server.http = args.http
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    env = environment()
    model = serving_model(args.shape)
    if args.interference:
        rows = bench_interference(args, model)
        write_json(args.json, {"environment": env, "args": vars(args), "rows": {"interference": rows}})
        return {"interference": rows}
    conc = bench_concurrency(args, model) if args.skip != "concurrency" else []
    tools = bench_tools(args, model) if args.skip != "tools" else []
    summary = summarize(conc, tools)
    tables(summary)
    payload = {"environment": env, "args": vars(args), "summary": summary, "rows": {"concurrency": conc, "tools": tools}}
    write_json(args.json, payload)
    if args.plot:
        plot(summary, Path(args.plot), args.plot_title)
    return payload


if __name__ == "__main__":
    main()
