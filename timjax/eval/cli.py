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
        evaluate,
        heldout_problems,
        parse_groups,
        settings_from_labels,
        write_report,
    )
    from timjax.train.corpus import load_problems_jsonl

    path = args.model or str(default_model_path())
    model = timjax.load(path, dtype=args.dtype)
    if args.problems:
        probs = load_problems_jsonl(args.problems)
        if args.limit:
            probs = probs[: args.limit]
    else:
        probs = heldout_problems(args.n, groups=parse_groups(args.groups))
    settings = settings_from_labels(args.settings.split(",")) if args.settings else None
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    kw = {"settings": settings} if settings else {}
    report = evaluate(
        model,
        probs,
        max_new_tokens=args.max_new_tokens,
        max_batch=args.max_batch,
        progress=not args.no_progress,
        model_label=path,
        say=say,
        json_path=args.json,
        **kw,
    )
    report.command = "timjax " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report.machine = f"{platform.machine()}, {platform.system()}, python {platform.python_version()}"
    print(report.table())
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
    p.add_argument("--n", type=int, default=20, help="held-out problems per group (arith-1/2/3, lookup-2/3)")
    p.add_argument(
        "--groups",
        default="arith-1,arith-2,arith-3,lookup-2,lookup-3",
        help="comma-separated held-out groups KIND-DEPTH (arith-1..arith-6, lookup-1..lookup-4); deeper "
        "arithmetic (arith-4, arith-5) is where prune buffers 1 and 2 remove most KV",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N problems of --problems (default: all)"
    )
    p.add_argument(
        "--settings",
        default=None,
        help="comma-separated subset of: off,buf0,buf1,buf2,buf0-shift,buf1-shift,buf2-shift (default: all of them)",
    )
    p.add_argument("--max-new-tokens", type=int, default=1024)
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
