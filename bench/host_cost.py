"""Host cost of the engine loop at GPU step times, measured on any machine (issue 25).

    python bench/host_cost.py                                   # batch 1 16 64 256, T 2 5 10 ms, off / buffer 2
    python bench/host_cost.py --batch 64 --step-ms 5 --repeats 5 --json bench/host_cost_cpu.json

The real engine and host loop run (scheduler, grammar masks, TIM tree tracking, FIFO pruning decisions and
re-encode cuts, output streaming, the stats), against a stand-in device: every step takes exactly ``T`` from
the moment the device is free (steps queue as on a CUDA stream; the host blocks only where the engine syncs).
The stand-in's sample for a row is the token a replay of that request's synthetic TIM document
(``bench/pruning.py``'s traces) would give at that draw index (``SamplingParams.counter``), recorded once
by a replay with ``TimController(override=ReplayText)``; the measured run has no override, so every token
goes through the real grammar and tree tracker. A run is correct when every request writes its document
back byte for byte ("ok").

Figures per configuration (batch x pruning x T x overlap), median of ``--repeats`` runs, spread min-max:
  host/it p50, p99  host time of one ``Engine.step``, the wait for the device excluded (ms)
  host share        1 - device busy / wall: the share of the run the device waits for the host
  full share        the same over the full-batch window (every request admitted, none finished yet)
  tok/s             generated tokens / wall;  ceiling: generated tokens / host time (the host's limit)
No XLA runs in the timed loop (the stand-in replaces the jitted step, sample and page-table read), so the
figures hold for any device whose step takes ``T``: they are the host's part at that step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/host_cost.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()

import numpy as np  # noqa: E402

from bench.common import environment, load_average, log, print_table, write_json  # noqa: E402
from bench.pruning import PROMPT, _setup  # noqa: E402
from timjax.engine import Engine, Request  # noqa: E402
from timjax.engine.tim_controller import ReplayText, TimController  # noqa: E402
from timjax.runtime import steps  # noqa: E402


# ---------------------------------------------------------------------------------------------- the stand-in
class Ready:
    """A device result: its host value and the stand-in clock time it is ready at."""

    def __init__(self, value: np.ndarray, ready: float):
        self.value, self.ready = value, ready


class StandIn:
    """A device whose every step takes ``T`` seconds once the device is free; samples come from scripts."""

    def __init__(self, step_s: float, eos: int):
        self.T, self.eos = step_s, eos
        self.free_at = 0.0
        self.steps = 0
        self.wait_s = 0.0
        self.scripts: dict[int, list[int]] = {}  # id(Request) -> its token at each draw index
        self.batch: tuple = ([], None)  # (rows, counters) of the step being dispatched

    def _step(self, slots: int) -> tuple[Ready, Ready]:
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + self.T
        self.steps += 1
        rows, counter = self.batch
        tokens = np.full(slots, self.eos, np.int32)
        for r in rows:
            if r.samples:
                script = self.scripts.get(id(r.seq.request), [])
                k = int(counter[r.seq.slot])
                tokens[r.seq.slot] = script[k] if k < len(script) else self.eos
        return Ready(tokens, self.free_at), Ready(np.zeros(slots, np.int32), self.free_at)

    def wait(self, *outs: Ready) -> None:
        t0 = time.perf_counter()
        until = max(o.ready for o in outs)
        while time.perf_counter() < until:  # a sync spins on CUDA too; sleep would overshoot by ~0.1 ms
            pass
        self.wait_s += time.perf_counter() - t0

    # the jitted functions the runner calls, replaced
    def generate(self, params, cache, ints, floats, prev=None, **kw):
        tokens, flags = self._step(cache.max_seqs)
        return tokens, flags, cache

    def logits(self, params, cache, ints, floats, prev=None, **kw):
        tokens, flags = self._step(cache.max_seqs)
        return tokens, flags, None, cache

    @staticmethod
    def sample(logits, sampling, mask):
        return logits  # the stand-in drew the tokens with the step (the mask filled by the host is not read)


def attach(engine: Engine, stand: StandIn) -> list[tuple[float, int]]:
    """Route ``engine``'s device work to ``stand``; returns the per-step log (host s, running sequences)."""
    runner = engine.runner
    sampling = runner._sampling

    def stash(rows):
        sp = sampling(rows)
        stand.batch = (rows, sp.counter)
        return sp

    def collect(step):
        stand.wait(step.sampled, step.out[1])
        n = len(step.sampled.value)
        return step.sampled.value, np.zeros(n, bool), np.zeros(n, bool), None

    runner._sampling, runner.collect = stash, collect
    log_: list[tuple[float, int]] = []
    step = engine.step

    def timed():
        w0, t0 = stand.wait_s, time.perf_counter()
        ran = step()
        log_.append((time.perf_counter() - t0 - (stand.wait_s - w0), len(engine.loop.sched.resident)))
        return ran

    engine.step = timed
    return log_


class Patched:
    """Swap the runner's jitted step, logits step and sample for the stand-in's while the run lasts."""

    def __init__(self, stand: StandIn):
        self.stand = stand

    def __enter__(self):
        self.saved = steps.flat_generate_step, steps.flat_logits_step, steps.sample_step
        steps.flat_generate_step, steps.flat_logits_step = self.stand.generate, self.stand.logits
        steps.sample_step = self.stand.sample

    def __exit__(self, *exc):
        steps.flat_generate_step, steps.flat_logits_step, steps.sample_step = self.saved


# ---------------------------------------------------------------------------------------------- runs
class Recorder(ReplayText):
    """A replay that keeps the token it gives at each draw."""

    def __init__(self, text, llt):
        super().__init__(text, llt)
        self.tokens: list[int] = []

    def __call__(self, written: bytes) -> int:
        t = super().__call__(written)
        self.tokens.append(t)
        return t


def make_requests(ctx, texts, *, buffer, max_new, override=None) -> list[Request]:
    prompt = ctx["prompt"]
    return [
        Request(
            prompt,
            max_new,
            controller=TimController(
                ctx["model"],
                ctx["schema"],
                max_new_tokens=max_new,
                prompt_len=len(prompt),
                pruning_buffer=buffer,
                override=override(t) if override else None,
            ),
        )
        for t in texts
    ]


def record_scripts(ctx, texts, *, buffer, max_new, engine_kw) -> list[list[int]]:
    """Each document's draws, from a replay through the same engine shape (stand-in device, T = 0)."""
    recs = [Recorder(t, ctx["llt"]) for t in texts]
    it = iter(recs)
    reqs = make_requests(ctx, texts, buffer=buffer, max_new=max_new, override=lambda t: next(it))
    stand = StandIn(0.0, ctx["cfg"].eos_token_id)
    with Patched(stand):
        eng = Engine(ctx["model"], **engine_kw, overlap=False)
        attach(eng, stand)
        res = eng.run(reqs)
    bad = [r.finish_reason for r, t in zip(res, texts) if r.text != t]
    if bad:
        raise RuntimeError(f"the recording replay did not write its documents: {bad[:3]}")
    return [r.tokens for r in recs]


def full_window(log_: list[tuple[float, int]], batch: int) -> slice:
    """Steps from the first with every request resident to the last before one left."""
    idx = [i for i, (_, n) in enumerate(log_) if n == batch]
    return slice(idx[0], idx[-1] + 1) if idx else slice(0, 0)


def run_once(ctx, texts, scripts, *, buffer, max_new, step_s, overlap, engine_kw) -> dict[str, Any]:
    stand = StandIn(step_s, ctx["cfg"].eos_token_id)
    reqs = make_requests(ctx, texts, buffer=buffer, max_new=max_new)
    stand.scripts = {id(q): s for q, s in zip(reqs, scripts, strict=True)}
    with Patched(stand):
        eng = Engine(ctx["model"], **engine_kw, overlap=overlap)
        log_ = attach(eng, stand)
        # the window's wall and device time: steps launched between its first and last step
        marks: list[tuple[float, int]] = []
        step = eng.step

        def marked():
            marks.append((time.perf_counter(), stand.steps))
            return step()

        eng.step = marked
        t0 = time.perf_counter()
        res = eng.run(reqs)
        wall = time.perf_counter() - t0
    marks.append((time.perf_counter(), stand.steps))
    ok = all(r.text == t for r, t in zip(res, texts))
    host = [h for h, _ in log_]
    w = full_window(log_, len(texts))
    if w.stop > w.start:
        (t_a, s_a), (t_b, s_b) = marks[w.start], marks[w.stop]
        full_share = 1 - (s_b - s_a) * step_s / (t_b - t_a) if step_s else float("nan")
        full_host = host[w]
    else:
        full_share, full_host = float("nan"), host
    gen = sum(len(r.tokens) for r in res)
    return {
        "ok": ok,
        "wall_s": wall,
        "steps": stand.steps,
        "generated_tokens": gen,
        "host_share": 1 - stand.steps * step_s / wall,
        "full_share": full_share,
        "full_steps": w.stop - w.start,
        "host_p50_ms": 1e3 * float(np.percentile(full_host, 50)),
        "host_p99_ms": 1e3 * float(np.percentile(full_host, 99)),
        "host_total_s": sum(host),
        "tokens_per_s": gen / wall,
        "ceiling_tokens_per_s": gen / sum(host),
        "spec_kept": eng.counters["spec_kept"],
        "spec_voided": eng.counters["spec_voided"],
        "prune_events": sum(r.stats.prune_events for r in res),
    }


def run_config(ctx, texts, scripts, *, repeats, **kw) -> dict[str, Any]:
    runs = [run_once(ctx, texts, scripts, **kw) for _ in range(repeats)]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    out = {k: med(k) for k in runs[0] if k != "ok"}
    out["ok"] = all(r["ok"] for r in runs)
    for k in ("host_share", "full_share", "host_p50_ms", "host_p99_ms", "tokens_per_s"):
        out[k + "_spread"] = [min(r[k] for r in runs), max(r[k] for r in runs)]
    return out


# ---------------------------------------------------------------------------------------------- main
MODES = {"on": True, "off": False, "auto": "auto"}  # Engine(overlap=...)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--step-ms", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="the stand-in's step time T")
    ap.add_argument("--buffers", nargs="+", default=["off", "2"], help="'off' and FIFO pruning buffer sizes")
    ap.add_argument("--overlap", nargs="+", default=["on", "off", "auto"], choices=["on", "off", "auto"])
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--breadth", type=int, default=3)
    ap.add_argument("--words", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write a PNG of the host share here")
    ap.add_argument("--plot-from", default=None, help="only plot this JSON of an earlier run (no run)")
    return ap.parse_args(argv)


def plot(results: list[dict[str, Any]], path: str, *, title: str) -> None:
    """Host share (the device waiting for the host) against batch, one panel per step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ts = sorted({r["step_ms"] for r in results})
    fig, axes = plt.subplots(1, len(Ts), figsize=(4.2 * len(Ts), 3.6), sharey=True, squeeze=False)
    for ax, T in zip(axes[0], Ts, strict=True):
        styles = {("on", 2): "o-", ("off", 2): "o--", ("auto", 2): "o:", ("on", None): "s-", ("off", None): "s--"}
        for (ov, buf), style in styles.items():
            rs = sorted((r for r in results if r["step_ms"] == T and r["overlap"] == ov and r["buffer"] == buf),
                        key=lambda r: r["batch"])  # fmt: skip
            if rs:
                label = f"overlap {ov}, pruning {'off' if buf is None else f'buffer {buf}'}"
                ax.plot([r["batch"] for r in rs], [max(r["host_share"], 0) for r in rs], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"T = {T:g} ms")
        ax.set_xlabel("batch")
        ax.axhline(0.10, color="gray", lw=0.6, ls=":")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("host share (device idle)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot_from:
        import json

        payload = json.loads(Path(args.plot_from).read_text())
        plot(payload["results"], args.plot, title=f"{payload['env']['cpu_model']}, {payload['env']['date']}")
        return payload
    env = environment()
    B_max = max(args.batch)
    setup = SimpleNamespace(
        depth=args.depth, breadth=args.breadth, roots=1, words=args.words, seed=args.seed, batch=args.batch,
        kv_requests=0, shape="kv", dtype="float32", tokenizer=None, max_seq_len=None,
    )  # fmt: skip
    ctx = _setup(setup)
    max_seq_len = ctx["max_seq_len"]
    lengths = ctx["trace_tokens"]
    log(f"traces {min(lengths)}-{max(lengths)} tokens, prompt {len(ctx['prompt'])} ({PROMPT!r}), load {load_average()}")
    results = []
    for B in args.batch:
        texts = ctx["texts_all"][:B]
        engine_kw = dict(max_batch=B, page_size=args.page_size, max_seq_len=max_seq_len, prefix_cache=False)
        for buf in [None if b == "off" else int(b) for b in args.buffers]:
            kw = dict(buffer=buf, max_new=4 * max_seq_len, engine_kw=engine_kw)
            scripts = record_scripts(ctx, texts, **kw)
            for T in args.step_ms:
                for ov in args.overlap:
                    r = run_config(ctx, texts, scripts, repeats=args.repeats, step_s=T / 1e3, overlap=MODES[ov], **kw)
                    r.update(batch=B, buffer=buf, step_ms=T, overlap=ov)
                    results.append(r)
                    log(
                        f"B={B:<3} buf={buf!s:<4} T={T:>4}ms overlap={ov:<3} share {r['host_share']:.3f} "
                        f"full {r['full_share']:.3f} host/it p50 {r['host_p50_ms']:.2f}ms p99 {r['host_p99_ms']:.2f}ms "
                        f"ceiling {r['ceiling_tokens_per_s']:.0f} tok/s ok={r['ok']}"
                    )
    headers = ["batch", "pruning", "T ms", "overlap", "host/it p50 ms", "p99 ms", "host share", "full-batch share",
               "tok/s", "ceiling tok/s", "ok"]  # fmt: skip
    rows = [
        [r["batch"], "off" if r["buffer"] is None else f"buf {r['buffer']}", r["step_ms"], r["overlap"],
         f"{r['host_p50_ms']:.2f}", f"{r['host_p99_ms']:.2f}",
         f"{r['host_share']:.3f} ({r['host_share_spread'][0]:.3f}-{r['host_share_spread'][1]:.3f})",
         f"{r['full_share']:.3f} ({r['full_share_spread'][0]:.3f}-{r['full_share_spread'][1]:.3f})",
         f"{r['tokens_per_s']:.0f}", f"{r['ceiling_tokens_per_s']:.0f}", r["ok"]]
        for r in results
    ]  # fmt: skip
    table = print_table(headers, rows, title=f"host cost at stand-in step times ({env['cpu_model']}, B max {B_max})")
    env["loadavg_end"] = load_average()
    payload = {"env": env, "args": vars(args), "trace_tokens": lengths, "max_seq_len": max_seq_len,
               "results": results, "table": table}  # fmt: skip
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        plot(results, args.plot, title=f"{env['cpu_model']}, {env['date']}")
    return payload


if __name__ == "__main__":
    main()
