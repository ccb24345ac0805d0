"""``timjax train CONFIG``: registered in ``timjax.cli.COMMANDS``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    from timjax.train.sft import load_config, train

    cfg = load_config(args.config)
    if args.out_dir:
        cfg = cfg.model_copy(update={"out_dir": args.out_dir})
    if args.steps is not None:
        cfg = cfg.model_copy(update={"steps": args.steps})
    if args.n_problems is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"n_problems": args.n_problems})})
    say = lambda *a: print(*a, file=sys.stderr, flush=True)
    summary = train(cfg, progress=not args.no_progress, say=say, until_step=args.until_step, data_only=args.data_only)
    keep = {
        k: v
        for k, v in summary.items()
        if k in ("step", "n_params", "tokens", "elapsed_s", "hf_dir", "tokenizer_dir", "data")
    }
    print(json.dumps(keep, indent=2))
    return 0


def add_train_command(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="supervised fine-tuning of a TIM on the synthetic corpus (optax, orbax checkpoints)",
        description="Train (or fine-tune, with init_from) a TIM as described by a JSON or YAML config "
        "(fields: timjax.train.sft.TrainConfig). Resumes from the latest checkpoint in out_dir.",
    )
    p.add_argument("config", metavar="CONFIG", help="training config (.json, .yaml)")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir (default: the config's)")
    p.add_argument(
        "--steps", type=int, default=None, help="override the number of optimizer steps (default: the config's)"
    )
    p.add_argument(
        "--n-problems",
        type=int,
        default=None,
        help="override data.n_problems, the size of the training corpus: a smaller one starts training sooner, "
        "e.g. 2000 for a first try (default: the config's)",
    )
    p.add_argument(
        "--until-step",
        type=int,
        default=None,
        help="stop at this step (checkpointed, exported to out_dir/hf); the schedule stays the one of --steps "
        "(default: run the whole schedule)",
    )
    p.add_argument(
        "--data-only", action="store_true", help="build the tokenizer and the data cache (out_dir/data.npz), then stop"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
