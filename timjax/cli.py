"""The ``timjax`` command line.

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and sets
``func`` (called with the parsed args, returns an exit code or None). To add a command, write such a
function and append it to :data:`COMMANDS`. Keep imports of jax & co. inside the ``func`` so that
``import timjax.cli`` and ``timjax --help`` stay fast.

User errors (:class:`timjax.errors.TimjaxError`, and ``OSError`` for file problems) are printed as
``timjax: error: <message>`` on stderr with exit code 2 (1 for OSError), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from timjax.errors import TimjaxError

DTYPES = ("bfloat16", "float16", "float32")


def _cmd_convert(args: argparse.Namespace) -> int:
    from timjax.convert import convert_hf_to_timjax

    out = convert_hf_to_timjax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                               progress=not args.no_progress)
    print(f"timjax: wrote {out}", file=sys.stderr)
    return 0


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face Qwen3 safetensors checkpoint to the timjax format",
        description="Convert a Hugging Face Qwen3 checkpoint directory (config.json + model.safetensors or a "
                    "sharded set with model.safetensors.index.json) into a timjax checkpoint directory.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="timjax checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the weights (norms stay float32); default bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


def _cmd_export(args: argparse.Namespace) -> int:
    from timjax.convert import export_timjax_to_hf

    kwargs = {}
    if args.max_shard_gb is not None:
        kwargs["max_shard_bytes"] = int(args.max_shard_gb * 2**30)
    out = export_timjax_to_hf(args.timjax_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                              progress=not args.no_progress, **kwargs)
    print(f"timjax: wrote {out}", file=sys.stderr)
    return 0


def add_export_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a timjax checkpoint to Hugging Face safetensors",
        description="Write a Hugging Face Qwen3 checkpoint (safetensors, config.json, tokenizer files) that "
                    "transformers' Qwen3ForCausalLM.from_pretrained loads.")
    p.add_argument("timjax_dir", metavar="TIMJAX_DIR", help="timjax checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the exported tensors; default: as stored")
    p.add_argument("--max-shard-gb", type=float, default=None, help="split files larger than this (GiB; default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


# Subcommand registrars, in --help order. Append new ones (generate, bench, ...) here.
COMMANDS: list[Callable] = [add_convert_command, add_export_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timjax", description="TIM / TIMRUN on JAX: Qwen3 checkpoints, inference, tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except TimjaxError as e:
        print(f"timjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"timjax: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("timjax: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
