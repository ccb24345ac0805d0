"""What a hostile tool server costs the rows beside it (issue 22): the control rows' wall time in a batch
with a faulty row, over the same batch without it, on the shipped tiny TIM.

    python bench/hostile_tools.py --repeats 7 --json bench/hostile_tools_cpu.json

Each batch replays fixed TIM documents (``ReplayText``), so every batch writes exactly the same control
tokens. Faults: ``big`` (a 5 MB result over streamable HTTP on loopback, cut at the transport's byte cap,
``ToolPolicy.result_bytes``, before any parsing) and ``block`` (an in-process tool that blocks its event
loop for longer than the call's deadline). Three batches take turns: the controls beside the benign call
of the same tool (a 40-byte answer; an answer at once), beside the faulty call, and alone. The figure is
the median over repeats of (mean control-row wall time beside the fault) / (beside the benign call), with
the spread: what the hostility costs the others, the fourth row's own ordinary work set aside (the ratio to
the controls alone is given too). RSS: growth of the runtime's process after warm-up. Goal (issue 22):
within 1.2x, and RSS within 100 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/hostile_tools.py` from the root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

from bench.common import environment, load_average, log, print_table, write_json  # noqa: E402

CONTROL = ("calculator", {"op": "add", "a": 3, "b": 4}, '{"result": 7}')


def doc(tool: str, params: dict, result: str) -> str:
    from timjax.tim.schema import dumps

    use = f'{{"tool_name": "{tool}", "parameters": {dumps(params)}, "tool_result": {result}}}'
    return f'{{"reasoning": [{{"thought": "call", "tooluse": {use}, "conclusion": "done"}}], "answer": "ok"}}'


@contextlib.contextmanager
def http_server_process(factory: str):
    """An MCP server over streamable HTTP on loopback in its own process, as a remote server is: its own
    work (building a 5 MB answer) must not count against the runtime's process."""
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        f"import uvicorn; from {factory.split(':')[0]} import {factory.split(':')[1]} as make; "
        f"uvicorn.run(make().streamable_http_app(), host='127.0.0.1', port={port}, log_level='error')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        t0 = time.perf_counter()
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.perf_counter() - t0 > 60 or proc.poll() is not None:
                raise RuntimeError("the MCP server process did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_batch(model, engine, runner, docs) -> list:
    from timjax.engine import Request
    from timjax.engine.tim_controller import ReplayText, TimController
    from timjax.tim.grammar import llg_tokenizer
    from timjax.tim.schema import tim_schema

    eos = [model.config.eos_token_id]
    llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, eos)
    prompt = model.tokenizer("Go.")["input_ids"]
    schema = tim_schema(runner.specs)
    ctrls = [
        TimController(
            model, schema, max_new_tokens=900, prompt_len=len(prompt), pruning_buffer=None, stop_ids=eos,
            tools=runner, override=ReplayText(d, llt),
        )
        for d in docs
    ]
    results = engine.run([Request(prompt, 900, controller=c) for c in ctrls])
    for r, d in zip(results, docs):
        assert r.finish_reason == "stop" and r.text == d, (r.finish_reason, r.error)
    return results


def measure(model, engine, runner, fault_doc: str, benign_doc: str, controls: int, repeats: int) -> dict:
    """Three batches in turn: the controls beside the benign call of the same tool (the peer: the same
    rows, the same tool, an ordinary answer), beside the faulty call, and alone."""
    import psutil

    base_docs = [doc(*CONTROL)] * controls
    batches = {"benign": [benign_doc, *base_docs], "fault": [fault_doc, *base_docs], "alone": base_docs}
    for docs in batches.values():  # warm: compiles every batch shape, connects
        run_batch(model, engine, runner, docs)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    times: dict[str, list[float]] = {k: [] for k in batches}
    for _ in range(repeats):
        for k, docs in batches.items():
            rows = run_batch(model, engine, runner, docs)[len(docs) - controls :]
            times[k].append(statistics.mean(r.stats.time_s for r in rows))
    gc.collect()
    vs_benign = [f / b for f, b in zip(times["fault"], times["benign"])]
    vs_alone = [f / a for f, a in zip(times["fault"], times["alone"])]
    return {
        "rss_growth_mb": (psutil.Process().memory_info().rss - rss0) / 2**20,
        "ratio_median": statistics.median(vs_benign),
        "ratio_min": min(vs_benign),
        "ratio_max": max(vs_benign),
        "ratio_vs_alone_median": statistics.median(vs_alone),
        "control_s": {k: statistics.median(v) for k, v in times.items()},
        "ratios": vs_benign,
        "ratios_vs_alone": vs_alone,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--controls", type=int, default=3, help="control rows beside the faulty one")
    ap.add_argument("--megabytes", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import timjax
    from timjax.api import default_model_path
    from timjax.engine import Engine
    from timjax.tim.grammar import llg_tokenizer
    from timjax.tools.runner import ToolPolicy, ToolRunner, ToolServer
    from timjax.tools.servers import calculator, faulty

    model = timjax.load(default_model_path())
    engine = Engine(model, max_batch=args.controls + 1, page_size=16, max_seq_len=1024)
    rows, out = [], {}
    with http_server_process("timjax.tools.servers.faulty:make_server") as port:
        # one runner per fault: the 5 MB answer must arrive (a long deadline), the blocked loop must not
        setups = {
            f"big ({args.megabytes:g} MB over HTTP)": (
                [calculator.make_server(), ToolServer(f"http://127.0.0.1:{port}/mcp", tools=["big"])],
                ToolPolicy(timeout_s=60, max_result_tokens=64),
                ("big", {"megabytes": args.megabytes}),
                {"megabytes": 0.00004},  # the benign peer: the same tool, a 40-byte answer
            ),
            "block (loop blocked 1.5 s, deadline 1 s)": (
                [calculator.make_server(), ToolServer(faulty.make_server(), tools=["block"])],
                ToolPolicy(timeout_s=1.0, max_result_tokens=64),
                ("block", {"seconds": 1.5}),
                {"seconds": 0.0},  # the benign peer: answers at once
            ),
        }
        for name, (servers, policy, (tool, params), benign) in setups.items():
            log(f"fault: {name}")
            with ToolRunner(servers, policy) as runner:
                # the answer the runtime writes: cut to the token cap with the model's own tokenizer
                llt = llg_tokenizer(model.tokenizer, model.config.vocab_size, [model.config.eos_token_id])
                s = runner.session(lambda text: len(llt.tokenize_bytes(text.encode())))

                def answer(args_):
                    pending = s.submit(tool, json.dumps(args_))
                    while (r := s.poll(pending)) is None:
                        time.sleep(0.01)
                    return r

                rec, ok = answer(params), answer(benign)
                assert ok.status == "ok", ok
                fault_doc, benign_doc = doc(tool, params, rec.result), doc(tool, benign, ok.result)
                m = measure(model, engine, runner, fault_doc, benign_doc, args.controls, args.repeats)
                m["fault_status"] = rec.status
                if tool == "big" and runner._meter:  # the byte cap: bytes taken off the wire for the answer
                    m["cap_bytes"] = runner.policy.result_bytes
                    m["fault_read_bytes"] = runner._meter[-1].read
            out[name] = m
            rows.append(
                [name, f"{m['ratio_median']:.2f}", f"{m['ratio_min']:.2f}-{m['ratio_max']:.2f}",
                 f"{m['ratio_vs_alone_median']:.2f}", f"{m['control_s']['benign']:.3f}",
                 f"{m['control_s']['fault']:.3f}", f"{m['rss_growth_mb']:.0f}"]
            )
    table = print_table(
        ["fault", "controls: fault / benign (median)", "spread", "fault / controls alone", "control s benign",
         "control s fault", "RSS growth MB"],
        rows,
        title=f"control rows beside a hostile tool ({args.controls} controls, {args.repeats} repeats, tiny TIM)",
    )
    payload = {"env": environment(), "load_average": load_average(), "args": vars(args), "faults": out, "table": table}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
