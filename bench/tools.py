"""Tool calls inside one inference vs a client loop that re-submits the context after every call.

    nice -n 10 python bench/tools.py                       # CPU default: calls 0 10 20 40, 3 repeats
    python bench/tools.py --shape 0.6b --dtype bfloat16 --json bench/out/tools_0.6b_h100.json   # a GPU

Every run replays one scripted TIM document (``timjax.tools.traces.calculation_trace``: ``--steps`` steps of a
running total, the first N of which call the calculator or the knowledge-base lookup; the others do the step
in the thought) through the same engine and model, three ways:

  runtime+prune  the tool is called inside the inference: the sequence parks, the MCP answer is forced into
                 the live KV cache by one extend, decoding goes on; finished subtask lists are pruned
                 (``--buffer``, default 1);
  runtime        the same without pruning;
  client         the request ENDS at each call (as a serving engine returns a tool call to its client); the
                 client gets the answer from the same MCP server and submits prompt + everything so far +
                 the answer as a NEW request, which is prefilled from scratch (vLLM's / SGLang's server-side
                 tool loops without a prefix cache). No pruning (a client cannot prune the server's cache).

The servers are the shipped ``calculator`` and ``kb`` MCP servers, in-process, behind the real runner (its
own event loop thread), so the tool's own latency is small and the same in every mode. Replay replaces the
sampled token by the document's (``ReplayText``); every device step is the real one. Each run is checked
byte for byte against the document.

Figures (median of ``--repeats`` runs, with min-max): tok/s = document tokens / wall time of the whole
inference (all requests of the client loop included); ratios to the same mode's 0-call value and to
runtime+prune at the same N; "resume" = time from the tool's answer being available to the next sampled
token (in the runtime: one extend step; in the client loop: a new request's prefill of the whole context);
"prefill" = context tokens the client loop sent again. Compile time is excluded: a run during which XLA
compiled anything is discarded and repeated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/tools.py` from the repo root


from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

import timjax
from bench.common import environment, load_average, log, print_table, write_json
from bench.common import table as table_text
from bench.pruning import SHAPES, CompileWatch, qwen3_tokenizer
from timjax.engine import Action, Engine, Request
from timjax.engine.tim_controller import ReplayText, TimController
from timjax.tim.grammar import llg_tokenizer
from timjax.tim.schema import dumps, tim_schema
from timjax.tools.runner import ToolLimits, ToolRunner
from timjax.tools.servers import calculator, kb
from timjax.tools.traces import calculation_trace

IM_END_ID = 151_645
PROMPT = "Compute the running total. Use the calculator for each step and the lookup for ages."
MODES = ("runtime+prune", "runtime", "client")


class EndAtToolCall:
    """Client-loop controller: ends the request where the runtime would park on a tool call."""

    wants_mask = True

    def __init__(self, inner: TimController):
        self.inner = inner
        self.at_call = False
        self.seq = None
        self.answered_at: float | None = None
        self.resume: list[float] = []

    def fill_mask(self, out):
        self.inner.fill_mask(out)

    def on_token(self, token, seq):
        if self.answered_at is not None:  # the first sample of the re-submitted request
            self.resume.append(time.perf_counter() - self.answered_at)
            self.answered_at = None
        self.seq = seq
        action = self.inner.on_token(token, seq)
        self.at_call = action.park
        return Action(feed=[], finish="stop") if action.park else action

    def finish(self, seq, result):
        self.inner.finish(seq, result)


def run_once(mode, engine, model, schema, llt, runner, prompt, doc, buffer) -> dict[str, Any]:
    max_new = 100_000
    ctrl = TimController(
        model,
        schema,
        max_new_tokens=max_new,
        prompt_len=len(prompt),
        pruning_buffer=buffer if mode == "runtime+prune" else None,
        stop_ids=[IM_END_ID],
        tools=runner,
        override=ReplayText(doc, llt),
    )
    sampled = [0]
    on_token = ctrl.on_token

    def counting(token, seq):
        sampled[0] += 1
        return on_token(token, seq)

    ctrl.on_token = counting
    t0 = time.perf_counter()
    if mode != "client":
        res = engine.run([Request(prompt, max_new, controller=ctrl)])[0]
        wall = time.perf_counter() - t0
        resume = [r.resume_s for r in res.tool_calls if r.resume_s is not None]
        requests, prefill = 1, len(prompt)
    else:
        loop = EndAtToolCall(ctrl)
        context, requests, prefill = list(prompt), 0, 0
        while True:
            res = engine.run([Request(context, max_new, controller=loop)])[0]
            requests += 1
            prefill += len(context)
            if not loop.at_call:
                break
            while ctrl.poll(loop.seq) is None:  # the client waits for the tool's answer
                time.sleep(0.0002)
            loop.answered_at = time.perf_counter()
            context = list(prompt) + list(ctrl.tracker.token_ids)  # everything so far + the answer
        wall = time.perf_counter() - t0
        resume = loop.resume
    text = bytes(ctrl.tracker.buf).decode("utf-8", errors="replace")
    n_tokens = len(ctrl.tracker.token_ids)
    return {
        "ok": res.finish_reason == "stop" and text == doc,
        "error": res.error,
        "wall_s": wall,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / wall,
        "tool_calls": len(ctrl.tools.records),
        "tool_errors": sum(r.status != "ok" for r in ctrl.tools.records),
        "resume_s": resume,
        "requests": requests,
        "prefill_tokens": prefill,
        "sampled": sampled[0],
        "peak_kv": ctrl.memory.stats().peak_working_len,
    }


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokenizer", default=None, help="Qwen3 tokenizer dir (default: built offline)")
    ap.add_argument("--calls", type=int, nargs="+", default=[0, 10, 20, 40])
    ap.add_argument("--steps", type=int, default=40, help="steps per document (>= max --calls)")
    ap.add_argument("--buffer", type=int, default=1, help="prune buffer of runtime+prune")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--json", default="bench/out/tools.json")
    ap.add_argument("--plot", default="bench/tools.png")
    ap.add_argument("--from-json", default=None, help="rebuild the table and plot from a saved --json run")
    args = ap.parse_args(argv)
    if args.from_json:
        return rebuild(args)
    if max(args.calls) > args.steps:
        ap.error("--steps must be >= every --calls value")

    tok = qwen3_tokenizer(args.tokenizer)
    cfg = SHAPES[args.shape].model_copy(update={"max_position_embeddings": 8192})
    model = timjax.random_model(cfg, dtype=args.dtype, seed=0, tokenizer=tok)
    llt = llg_tokenizer(tok, cfg.vocab_size, [IM_END_ID])
    prompt = tok(PROMPT)["input_ids"]
    docs = {n: dumps(calculation_trace(n, n_steps=args.steps, words=1)) for n in args.calls}
    max_len = len(prompt) + max(len(llt.tokenize_bytes(d.encode())) for d in docs.values()) + 256
    engine = Engine(model, max_batch=1, page_size=args.page_size, max_seq_len=max_len)
    watch = CompileWatch()
    env = environment()
    log(
        f"shape {args.shape}, document tokens: "
        + ", ".join(f"{n} calls: {len(llt.tokenize_bytes(d.encode()))}" for n, d in docs.items())
    )

    rows: dict[tuple[str, int], list[dict]] = {}
    with ToolRunner([calculator.make_server(), kb.make_server()], ToolLimits(max_calls=max(args.calls) + 1)) as runner:
        schema = tim_schema(runner.specs)
        t_start = time.perf_counter()
        for rep in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every mode
            for n in args.calls:
                for mode in args.modes:
                    for attempt in range(4):
                        c0 = watch.n
                        r = run_once(mode, engine, model, schema, llt, runner, prompt, docs[n], args.buffer)
                        if watch.n == c0:
                            break
                        log(f"  {mode} n={n}: {watch.n - c0} compiles, discarded")
                    if not r["ok"]:
                        raise RuntimeError(f"{mode} with {n} calls did not reproduce its document: {r['error']}")
                    rows.setdefault((mode, n), []).append(r)
                    log(
                        f"rep {rep} {mode:14s} n={n:3d} {r['tokens_per_s']:8.1f} tok/s  wall {r['wall_s']:6.2f} s  "
                        f"requests {r['requests']}  load {load_average()}"
                    )
            report(rows, args, env, time.perf_counter() - t_start, rep + 1)  # partial results survive a stop
    return report(rows, args, env, time.perf_counter() - t_start, args.repeats, final=True)


def count_sampled(model, schema, llt, runner, prompt, doc) -> int:
    """Tokens the model samples for ``doc`` (the rest is forced: grammar runs and tool results), counted
    by driving the controller without a device (for runs recorded before ``run_once`` counted them)."""
    from types import SimpleNamespace

    ctrl = TimController(
        model,
        schema,
        max_new_tokens=10**6,
        prompt_len=len(prompt),
        pruning_buffer=None,
        stop_ids=[IM_END_ID],
        tools=runner,
        override=ReplayText(doc, llt),
    )
    seq, n = SimpleNamespace(generated=[]), 0
    while True:
        action = ctrl.on_token(0, seq)
        n += 1
        while action.park:
            while (polled := ctrl.poll(seq)) is None:
                time.sleep(0.0005)
            action = polled
        if action.finish is not None:
            return n


def _sampled_rate(rs) -> list[float]:
    return [x["sampled"] / x["wall_s"] for x in rs]


def report(rows, args, env, total_s, repeats_done, final=False) -> dict[str, Any]:
    summary = []
    sbase = {m: statistics.median(_sampled_rate(rows[(m, min(args.calls))])) for m in args.modes}
    base = {m: statistics.median(x["tokens_per_s"] for x in rows[(m, min(args.calls))]) for m in args.modes}
    for n in args.calls:
        ref = statistics.median(x["tokens_per_s"] for x in rows[(args.modes[0], n)])
        for mode in args.modes:
            rs = rows[(mode, n)]
            tps = [x["tokens_per_s"] for x in rs]
            resume = [s for x in rs for s in x["resume_s"]]
            summary.append(
                {
                    "mode": mode,
                    "calls": n,
                    "tokens": rs[0]["tokens"],
                    "tok_s": statistics.median(tps),
                    "tok_s_min": min(tps),
                    "tok_s_max": max(tps),
                    "vs_0_calls": statistics.median(tps) / base[mode],
                    "vs_runtime_prune": statistics.median(tps) / ref,
                    "wall_s": statistics.median(x["wall_s"] for x in rs),
                    "resume_ms": 1e3 * statistics.median(resume) if resume else None,
                    "resume_ms_max": 1e3 * max(resume) if resume else None,
                    "requests": rs[0]["requests"],
                    "prefill_tokens": rs[0]["prefill_tokens"],
                    "peak_kv": rs[0]["peak_kv"],
                    "tool_errors": max(x["tool_errors"] for x in rs),
                    "sampled": rs[0]["sampled"],
                    "sampled_tok_s": statistics.median(_sampled_rate(rs)),
                    "sampled_vs_0_calls": statistics.median(_sampled_rate(rs)) / sbase[mode],
                }
            )
    headers = [
        "mode",
        "calls",
        "tokens",
        "tok/s",
        "min-max",
        "vs 0 calls",
        "vs runtime+prune",
        "sampled",
        "sampled/s",
        "vs 0 calls",
        "resume ms (med/max)",
        "requests",
        "prefill tok",
        "peak KV",
    ]
    table_rows = [
        [
            s["mode"],
            s["calls"],
            s["tokens"],
            s["tok_s"],
            f"{s['tok_s_min']:.0f}-{s['tok_s_max']:.0f}",
            f"{s['vs_0_calls']:.2f}x",
            f"{s['vs_runtime_prune']:.2f}x",
            s["sampled"],
            s["sampled_tok_s"],
            f"{s['sampled_vs_0_calls']:.2f}x",
            "-" if s["resume_ms"] is None else f"{s['resume_ms']:.1f} / {s['resume_ms_max']:.1f}",
            s["requests"],
            s["prefill_tokens"],
            s["peak_kv"],
        ]
        for s in summary
    ]
    title = f"tools in one inference, shape {args.shape}, {repeats_done} repeats"
    text = print_table(headers, table_rows, title=title) if final else table_text(headers, table_rows, title=title)
    payload = {
        "env": env,
        "args": vars(args),
        "summary": summary,
        "table": text,
        "bench_s": total_s,
        "repeats_done": repeats_done,
        "loadavg_end": load_average(),
        "runs": {f"{m}/{n}": v for (m, n), v in rows.items()},
    }
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(summary, args, Path(args.plot))
    return payload


def rebuild(args) -> dict[str, Any]:
    """Recompute the summary of a saved run (adds sampled-token counts to runs recorded without them)."""
    import json
    from types import SimpleNamespace

    saved = json.loads(Path(args.from_json).read_text())
    for k in ("calls", "steps", "modes", "shape", "repeats", "buffer"):
        setattr(args, k, saved["args"][k])
    args.json, args.plot = args.from_json, args.plot
    tok = qwen3_tokenizer(args.tokenizer)
    cfg = SHAPES[args.shape]
    model = SimpleNamespace(tokenizer=tok, config=cfg)  # the controller needs no weights
    llt = llg_tokenizer(tok, cfg.vocab_size, [IM_END_ID])
    prompt = tok(PROMPT)["input_ids"]
    rows = {}
    with ToolRunner([calculator.make_server(), kb.make_server()], ToolLimits(max_calls=max(args.calls) + 1)) as runner:
        schema = tim_schema(runner.specs)
        for n in args.calls:
            doc = dumps(calculation_trace(n, n_steps=args.steps, words=1))
            k = count_sampled(model, schema, llt, runner, prompt, doc)
            for mode in args.modes:
                rs = saved["runs"][f"{mode}/{n}"]
                for r in rs:
                    r.setdefault("sampled", k)
                rows[(mode, n)] = rs
    return report(rows, args, saved["env"], saved["bench_s"], saved.get("repeats_done", args.repeats), final=True)


def plot(summary, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(15, 4))
    for mode in args.modes:
        s = [x for x in summary if x["mode"] == mode]
        n = [x["calls"] for x in s]
        med = [x["tok_s"] for x in s]
        err = [[m - x["tok_s_min"] for m, x in zip(med, s)], [x["tok_s_max"] - m for m, x in zip(med, s)]]
        a.errorbar(n, med, yerr=err, marker="o", capsize=3, label=mode)
        c.plot(n, [x["sampled_tok_s"] for x in s], marker="o", label=mode)
        r = [(x["calls"], x["resume_ms"]) for x in s if x["resume_ms"] is not None]
        if r:
            b.plot(*zip(*r), marker="o", label=mode)
    a.set(
        xlabel="tool calls in one inference",
        ylabel="tokens/s (median, min-max)",
        title=f"throughput ({args.shape}, CPU)",
    )
    a.set_ylim(bottom=0)
    c.set(
        xlabel="tool calls in one inference",
        ylabel="sampled tokens/s (median)",
        title="sampled tokens only (forced ones excluded)",
    )
    c.set_ylim(bottom=0)
    b.set(xlabel="tool calls in one inference", ylabel="ms (median)", title="tool answer -> next sampled token")
    b.set_yscale("log")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
