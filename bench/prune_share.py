"""How much KV subtask pruning can remove from the corpus's own (correct) trees, per problem group and
prune buffer: the ceiling a TIM trained on this corpus reaches when it writes the trees it was taught.

Each reference document is replayed token by token through the runtime's tokenizer, grammar and tree
tracker (``timjax.train.runtime_view``), and the runtime's ``PruneBuffer`` / ``WorkingMemory`` prune it as
``TimController`` would. The share is the runtime's ``pruned_share``: pruned KV entries over all entries
written for generated tokens. No model and no timing: the figures are exact for the corpus and tokenizer.

It explains which goals the tree shape allows: with buffer 2, a tree only loses KV once it has closed
three subtask lists, and a depth-3 arithmetic tree of this corpus has 2.5 on average.

    python bench/prune_share.py [--n 100] [--model timjax/tiny_tim] [--restate] [--json bench/out/prune_share.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/prune_share.py` from the repo root

from timjax.base.platform_env import prepare_process  # noqa: E402

prepare_process()  # before JAX starts: the CPU when CUDA cannot start (no plugin traceback), no torch notice

GROUPS = [("arith", 1), ("arith", 2), ("arith", 3), ("arith", 4), ("arith", 5), ("lookup", 2), ("lookup", 3)]
BUFFERS = [0, 1, 2]


def share_and_peak(doc, buffer: int) -> tuple[float, int]:
    """(pruned share of the generated KV, peak working tokens) of one replayed document, from the
    runtime's own ``WorkingMemory`` bookkeeping."""
    from timjax.train.runtime_view import memory_after

    st = memory_after(doc, buffer).stats()
    return st.pruned_tokens / len(doc.tokens), st.peak_working_len


def measure(n: int, model_dir: str, restate: bool = False) -> list[dict]:
    from timjax.train.corpus import CorpusSpec, document_text, problems
    from timjax.train.runtime_view import Replayer
    from timjax.train.tokenizer import load_tokenizer
    from timjax.train.tools_adapter import default_backend, training_schema

    tools = default_backend(0)
    replayer = Replayer(load_tokenizer(model_dir), training_schema(tools), None)
    spec = CorpusSpec(mix=tuple((k, d, 1.0) for k, d in GROUPS))
    rows = []
    for kind, depth in GROUPS:
        docs = [
            replayer.replay(p.question, document_text(p, tools, restate=restate))
            for p in problems(spec, "heldout", n, kind=kind, depth=depth, tools=tools)
        ]
        row = {
            "group": f"{kind}-{depth}",
            "n": len(docs),
            "generated_tokens": statistics.mean(len(d.tokens) for d in docs),
            "lists": statistics.mean(len(d.lists) for d in docs),
        }
        for b in BUFFERS:
            vals = [share_and_peak(d, b) for d in docs]
            row[f"pruned_buf{b}"] = statistics.mean(v[0] for v in vals)
            row[f"peak_buf{b}"] = statistics.mean(v[1] for v in vals)
        row["peak_off"] = statistics.mean(len(d.prompt) + len(d.tokens) for d in docs)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        ["group", "n", "tokens", "lists"]
        + [f"pruned buf{b}" for b in BUFFERS]
        + ["peak WM off"]
        + [f"peak WM buf{b}" for b in BUFFERS]
    )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["group"], str(r["n"]), f"{r['generated_tokens']:.0f}", f"{r['lists']:.1f}"]
        cells += [f"{r[f'pruned_buf{b}']:.0%}" for b in BUFFERS]
        cells += [f"{r['peak_off']:.0f}"] + [f"{r[f'peak_buf{b}']:.0f}" for b in BUFFERS]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    from bench.common import environment, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="held-out reference trees per group")
    ap.add_argument("--model", default=None, help="checkpoint whose tokenizer to use (default: the shipped tiny TIM)")
    ap.add_argument(
        "--restate",
        action="store_true",
        help="trees whose wide chains restate their solved operands (data.restate_operands)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.model is None:
        from timjax.api import default_model_path

        args.model = str(default_model_path())
    rows = measure(args.n, args.model, args.restate)
    print(table(rows))
    if args.json:
        write_json(args.json, {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
