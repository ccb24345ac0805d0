"""``timjax eval [MODEL]``: registered in ``timjax.cli.COMMANDS``."""

from __future__ import annotations

import argparse
import shlex
import sys


def _cmd_eval(args: argparse.Namespace) -> int:
    import platform

    import timjax
    from timjax.api import default_model_path
    from timjax.eval.run import (
        SETTINGS,
        doc_format,
        evaluate,
        family_problems,
        parse_groups,
        save_problems,
        settings_from_labels,
        write_report,
    )
    from timjax.train.corpus import load_problems_jsonl

    path = args.model or str(default_model_path())
    groups = None if args.problems else parse_groups(args.groups)  # a bad --groups fails before loading
    fmt = doc_format(args.format)
    variants = [v.strip() for v in args.tool_variants.split(",")] if args.tool_variants else []
    labels = args.settings.split(",") if args.settings else [s.label for s in SETTINGS]
    settings = settings_from_labels(labels, variants)
    model = timjax.load(path, dtype=args.dtype)
    context = args.context or model.config.max_position_embeddings
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.problems:
        probs = load_problems_jsonl(args.problems)
        if args.limit:
            probs = probs[: args.limit]
    else:
        probs = family_problems(groups, args.n, tokenizer_dir=path, context=context, seed=args.seed, fmt=fmt)
    if args.save_problems:
        save_problems(probs, args.save_problems)
        say(f"wrote {len(probs)} problems to {args.save_problems}")
    max_new = args.max_new_tokens
    if max_new is None:  # a long-K tree needs room for K x C written tokens and more
        max_new = max([1024] + [(p.depth + 2) * context for p in probs if p.kind == "long"])
    report = evaluate(
        model,
        probs,
        settings,
        max_new_tokens=max_new,
        max_batch=args.max_batch,
        context=context,
        progress=not args.no_progress,
        model_label=path,
        say=say,
        json_path=args.json,
        trace=fmt,
    )
    report.command = "timjax " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report.machine = f"{platform.machine()}, {platform.system()}, python {platform.python_version()}"
    print(report.table())
    if any(s.by_depth for s in report.settings):
        print("\naccuracy by expression depth (n):")
        print(report.depth_table())
    if any(s.divergence for s in report.settings):
        print("\nwrong arithmetic answers by where the tree first left the rewrite trace:")
        print(report.divergence_table())
    if args.json:
        write_report(report, args.json)
        say(f"wrote {args.json}")
    return 0


def add_eval_command(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy and pruning figures of a TIM over pruning settings",
        description='Solve held-out corpus problems (or a JSON-lines file of {"question", "answer"}) with '
        "pruning off and prune buffers 0/1/2 in both repositioning modes, tools on, greedy; print a "
        "table and optionally write JSON.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default=None,
        help="timjax or Hugging Face checkpoint directory (default: the shipped tiny TIM)",
    )
    p.add_argument("--problems", default=None, help='JSON-lines file of {"question", "answer"} (optional kind, depth)')
    p.add_argument("--n", type=int, default=20, help="problems per group")
    p.add_argument(
        "--groups",
        default="arith-1,arith-2,arith-3,lookup-2,lookup-3",
        help="comma-separated groups KIND-N: corpus held-out arith-1..arith-6 (depth) and lookup-1..lookup-4 "
        "(hops); notation-3..notation-8 (ordinary notation, N terms, a generator of its own); long-1..long-4 "
        "(reference trees >= N x the context C, whose pruned working memory fits C)",
    )
    p.add_argument("--seed", type=int, default=23, help="seed of the notation and long families")
    p.add_argument(
        "--format",
        default="restate",
        help="the format the model writes arithmetic in: restate (the shipped tiny TIM's), rewrite "
        "(data.rewrite_operations) or chunked-K (and data.chunk_terms=K). It sizes the long-K problems' "
        "reference trees; with rewrite or chunked-K every wrong arithmetic answer also says where it first "
        "left that format's reference tree",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="working-memory limit C in tokens (max_seq_len; default: the model's max_position_embeddings); "
        "a run that reaches it ends with finish 'length' (column 'ctx limit')",
    )
    p.add_argument(
        "--tool-variants",
        default=None,
        help="comma-separated calculator contract variants, each run under every --settings entry: shipped, "
        "own, order-a-b-op, order-a-op-b, desc-terse, desc-plain, result-value, result-bare, result-pretty",
    )
    p.add_argument("--save-problems", default=None, help="also write the drawn problems here as JSON lines")
    p.add_argument("--limit", type=int, default=None, help="use only the first N problems of --problems (default: all)")
    p.add_argument(
        "--settings",
        default=None,
        help="comma-separated subset of: off,buf0,buf1,buf2,buf0-shift,buf1-shift,buf2-shift (default: all of them)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="token budget per problem (default 1024, or (K + 2) x C with long-K problems)",
    )
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="compute dtype; default: the dtype the checkpoint is stored in",
    )
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)
