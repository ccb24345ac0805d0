"""The ``timjax`` command line.

Each subcommand is one ``add_<name>_command(subparsers)`` function that registers its parser and sets
``func`` (called with the parsed args, returns an exit code or None). To add a command, write such a
function and append it to :data:`COMMANDS`. Keep imports of jax & co. inside the ``func`` so that
``import timjax.cli`` and ``timjax --help`` stay fast.

User errors (:class:`timjax.base.errors.TimjaxError`, and ``OSError`` for file problems) are printed as
``timjax: error: <message>`` on stderr with exit code 2 (1 for OSError), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from timjax.base.errors import TimjaxError

DTYPES = ("bfloat16", "float16", "float32")
# Default token budgets of `timjax generate`: a plain continuation is cut where the user looks at it; a TIM
# tree is only useful once its answer is written, and with pruning it may run past the context window.
PLAIN_BUDGET = 128
TIM_BUDGET = 8192


def _cmd_convert(args: argparse.Namespace) -> int:
    from timjax.convert import convert_hf_to_timjax

    out = convert_hf_to_timjax(
        args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress
    )
    print(f"timjax: wrote {out}", file=sys.stderr)
    return 0


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face Qwen3 safetensors checkpoint to the timjax format",
        description="Convert a Hugging Face Qwen3 checkpoint directory (config.json + model.safetensors or a "
        "sharded set with model.safetensors.index.json) into a timjax checkpoint directory.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="timjax checkpoint directory to create")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the weights (norms stay float32); default: the dtype the source tensors are stored in",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)


def _cmd_export(args: argparse.Namespace) -> int:
    from timjax.convert import export_timjax_to_hf

    kwargs = {}
    if args.max_shard_gb is not None:
        kwargs["max_shard_bytes"] = int(args.max_shard_gb * 2**30)
    out = export_timjax_to_hf(
        args.timjax_dir,
        args.out_dir,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        **kwargs,
    )
    print(f"timjax: wrote {out}", file=sys.stderr)
    return 0


def add_export_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a timjax checkpoint to Hugging Face safetensors",
        description="Write a Hugging Face Qwen3 checkpoint (safetensors, config.json, tokenizer files) that "
        "transformers' Qwen3ForCausalLM.from_pretrained loads.",
    )
    p.add_argument("timjax_dir", metavar="TIMJAX_DIR", help="timjax checkpoint directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="dtype of the exported tensors; default: as stored")
    p.add_argument("--max-shard-gb", type=float, default=None, help="split files larger than this (GiB; default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    import timjax
    from timjax.api import default_model_path
    from timjax.runtime.sharding import mesh_from_args

    model = timjax.load(args.model or default_model_path(), dtype=args.dtype, mesh=mesh_from_args(args))
    prompts = list(args.prompt or []) + ([args.tim] if isinstance(args.tim, str) else [])
    if not prompts:
        raise TimjaxError("generate needs a prompt: --prompt TEXT, or --tim TEXT")
    schema = None
    tools = None
    if args.tool:  # MCP tool servers (timjax.tools.spec): TIM with their tools
        from timjax.tools.spec import runner_from_args

        tools, args.tim = runner_from_args(args), True
    elif args.tim and args.model is None:  # the default tiny TIM is trained with these MCP tools
        from timjax.tools.runner import ToolRunner
        from timjax.train.tools_adapter import tool_servers

        tools = ToolRunner(tool_servers())
    if args.tim:
        from timjax.tim.schema import tim_schema

        schema = tim_schema(max_depth=args.max_depth, max_subtasks=args.max_subtasks)
    stream = None
    if args.stream and len(prompts) == 1 and not args.tim and model.tokenizer is not None:
        stream = lambda i, t: print(model.tokenizer.decode([t]), end="", flush=True)
    try:
        results = timjax.generate(
            model,
            prompts,
            max_new_tokens=args.max_new_tokens or (TIM_BUDGET if args.tim else PLAIN_BUDGET),
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop or (),
            max_batch=args.max_batch,
            page_size=args.page_size,
            impl=args.impl,
            chat=args.chat,
            on_token=stream,
            progress=len(prompts) > 1,
            schema=schema,
            pruning_buffer=None if args.pruning_buffer < 0 else args.pruning_buffer,
            reposition=args.reposition,
            tools=tools,
            engine_options=None if args.prefix_cache else {"prefix_cache": False},
        )
    finally:
        if tools is not None:
            tools.close()
    if stream:
        print()
    if args.json:
        print(json.dumps([r.model_dump(mode="json", exclude={"response"}) for r in results], indent=2))
        return _exit_code(results, args)
    for p, r in zip(prompts, results):
        if len(prompts) > 1:
            print(f"=== {p!r}")
        if args.tim:
            from timjax.tim.display import format_tree

            tree = r.response if r.response is not None else r.partial_response
            print(format_tree(tree, r.pruned_paths) if tree else r.text)
        elif not stream:
            print(r.text if r.text is not None else r.tokens)
        s = r.stats
        extra = f", peak working memory {s.peak_working_tokens}, KV pruned {s.pruned_share:.0%}" if args.tim else ""
        if tools is not None:
            extra += f", {s.tool_calls} tool calls ({s.tool_errors} failed)"
        print(
            f"[{r.finish_reason}{': ' + r.error if r.error else ''}] {s.generated_tokens} tokens, "
            f"{s.tokens_per_s:.1f} tok/s{extra}",
            file=sys.stderr,
        )
    return _exit_code(results, args)


def _exit_code(results, args: argparse.Namespace) -> int:
    """1 when a sequence failed, or when the budget cut a TIM tree before its answer (said on stderr); else 0."""
    cut = [i for i, r in enumerate(results) if args.tim and r.finish_reason == "length"]
    for i in cut:
        budget = args.max_new_tokens or TIM_BUDGET
        print(
            f"timjax: prompt {i}: the token budget (--max-new-tokens {budget}) ended the reasoning tree before "
            "its answer; raise --max-new-tokens",
            file=sys.stderr,
        )
    return 1 if cut or any(r.finish_reason == "error" for r in results) else 0


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text (or a TIM reasoning tree) from a checkpoint",
        description="Generate from a timjax or Hugging Face Qwen3 checkpoint directory.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default=None,
        help="timjax or Hugging Face checkpoint directory (default: the shipped tiny TIM, with its tools)",
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"token budget per prompt; default {PLAIN_BUDGET}, or {TIM_BUDGET} with --tim (a tree cut short exits 1)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument(
        "--dtype", choices=DTYPES, default=None, help="compute dtype; default: the dtype the checkpoint is stored in"
    )
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument(
        "--impl",
        choices=("auto", "xla", "pallas", "pallas_interpret"),
        default="auto",
        help="attention kernels: auto = Pallas on GPU, XLA on CPU",
    )
    p.add_argument(
        "--tim",
        nargs="?",
        const=True,
        default=False,
        metavar="PROMPT",
        help="TIM structured reasoning with subtask pruning (optionally the prompt itself)",
    )
    p.add_argument("--pruning-buffer", type=int, default=2, help="TIM prune buffer size; -1 turns pruning off")
    p.add_argument("--reposition", choices=("reencode", "shift"), default="reencode")
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the KV pages of common prompt prefixes (default on; --no-prefix-cache computes every prompt)",
    )
    p.add_argument("--max-depth", type=int, default=None, help="TIM schema: maximum nesting depth (default: unlimited)")
    p.add_argument(
        "--max-subtasks", type=int, default=None, help="TIM schema: maximum subtasks per list (default: unlimited)"
    )
    from timjax.tools.spec import add_tool_arguments

    add_tool_arguments(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they come (one plain prompt)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    from timjax.base.mesh_args import add_mesh_arguments

    add_mesh_arguments(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_demo(args: argparse.Namespace) -> int:
    from timjax.demo import DEMO_QUESTION, run_demo, run_long_demo, run_random_demo

    if args.long:
        kw = dict(context=args.context, k=args.times, pruning_buffer=args.buffer, impl=args.impl)
        return 0 if run_long_demo(model_dir=args.model, **kw)["ok"] else 1
    if args.random_qwen3:
        return 0 if run_random_demo(args.work_dir, page_size=args.page_size, impl=args.impl)["ok"] else 1
    return 0 if run_demo(args.question or DEMO_QUESTION, impl=args.impl)["ok"] else 1


def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the built-in end-to-end job: the shipped tiny TIM solves a problem (offline)",
        description="The shipped tiny TIM solves an arithmetic problem with calculator calls over "
        "MCP and subtask pruning; prints the tree, the stats and the checked answer. "
        "--random-qwen3: write, convert and load a random Qwen3 with the real Qwen3 "
        "vocabulary, generate, and replay a TIM reasoning tree with subtask pruning.",
    )
    p.add_argument("--question", default=None, help="an arithmetic question (default: the built-in one)")
    p.add_argument("--random-qwen3", action="store_true", help="the runtime job on a random Qwen3 instead")
    p.add_argument(
        "--long",
        action="store_true",
        help="one problem whose reasoning tree is >= --times x --context tokens, solved with the working memory "
        "capped at --context: pruning off (stops at the limit), then --buffer; tree length, peak working "
        "memory, share pruned, checked answer",
    )
    p.add_argument("--context", type=int, default=1024, help="--long: the working-memory limit C in tokens")
    p.add_argument("--times", type=int, default=2, help="--long: the reference tree is at least this many C")
    p.add_argument("--buffer", type=int, default=1, help="--long: the prune buffer of the pruned run")
    p.add_argument("--model", default=None, help="--long: a TIM checkpoint (default: the shipped tiny TIM)")
    p.add_argument("--work-dir", default=None, help="keep the checkpoints here (default: a temporary directory)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--impl", choices=("auto", "xla", "pallas", "pallas_interpret"), default="auto")
    p.set_defaults(func=_cmd_demo)


# Subcommand registrars, in --help order.
from timjax.eval.cli import add_eval_command  # noqa: E402
from timjax.serve.command import add_serve_command  # noqa: E402
from timjax.train.cli import add_train_command  # noqa: E402

COMMANDS: list[Callable] = [
    add_demo_command,
    add_convert_command,
    add_export_command,
    add_generate_command,
    add_train_command,
    add_eval_command,
    add_serve_command,
]


class OneLineParser(argparse.ArgumentParser):
    """argparse errors as one line (``timjax generate: error: argument --max-batch: invalid int value: 'x'``),
    like the library's errors, rather than a usage dump; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in ``--help``: appended as ``(default: X)`` unless its help already says what
    the default is (a default of None or False means "not given" and is explained in the help text)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
            continue
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.default is False or action.default is argparse.SUPPRESS or action.nargs == 0:
            continue  # flags: off unless given
        text = action.help or ""
        if "default" in text.lower():
            continue
        shown = "not set" if action.default is None else "%(default)s"
        action.help = (text + " " if text else "") + f"(default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="timjax", description="TIM / TIMRUN on JAX: Qwen3 checkpoints, inference, tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    show_defaults(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed): a code, for in-process callers
        return e.code if isinstance(e.code, int) else 2
    try:
        from timjax.base.platform_env import cli_compile_cache, prepare_process
        from timjax.base.validation import check_cli

        prepare_process()  # before JAX starts: no CUDA-plugin traceback without a GPU, no torch notice
        cli_compile_cache()  # compiled steps kept on disk: a second run does not compile them again
        check_cli(args)  # every flag, before a model is loaded (issue 10)
        rc = args.func(args)
    except TimjaxError as e:
        print(f"timjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"timjax: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad settings (sampling, dtype, prompts) reported by the library
        print(f"timjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("timjax: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
