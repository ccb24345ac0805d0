"""``timjax serve [MODEL]``: the argparse side (imports stay light) and the uvicorn run."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal


def add_serve_command(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: OpenAI chat completions, Anthropic messages, the Runs API",
        description="Serve MODEL (default: the shipped tiny TIM with its calculator and lookup tools) with "
        "OpenAI-compatible /v1/chat/completions, Anthropic /v1/messages and the Runs API (/v1/runs, used by "
        "subconscious-sdk) where a request may bring its own MCP tools; SSE streams, /health, /metrics. "
        "SIGTERM stops taking requests and finishes the running ones within --grace seconds.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: from MODEL)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TIMJAX_API_KEY"),
        help="required as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (default: $TIMJAX_API_KEY; none = open)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests; more get 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default 1 MiB)")
    p.add_argument("--tool", action="append", metavar="SPEC", help="a server-level MCP server (as timjax generate)")
    p.add_argument(
        "--allow-tool-url",
        action="append",
        metavar="PATTERN",
        help="hosts that per-request tool URLs may reach: a glob on host or host:port ('127.0.0.1:*', "
        "'*.example.com') or a URL prefix; repeatable. Default: none (per-request tool URLs are refused)",
    )
    p.add_argument("--tool-timeout", type=float, default=10.0, help="seconds per tool call (default 10)")
    p.add_argument("--max-tool-calls", type=int, default=32)
    p.add_argument("--max-tool-result-tokens", type=int, default=256)
    p.add_argument("--tim", action=argparse.BooleanOptionalAction, default=None,
                   help="TIM requests (reasoning tree, pruning, tools); default: on for the shipped tiny TIM")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-step-tokens", type=int, default=512, help="tokens one engine step computes (default 512)")
    p.add_argument("--warmup", choices=("background", "eager", "off"), default="background",
                   help="compile every engine step shape ahead of requests: while idle (background), before "
                   "accepting requests (eager), or each when first met (off)")
    p.add_argument("--impl", choices=("auto", "xla", "pallas", "pallas_interpret"), default="auto")
    p.add_argument("--reposition", choices=("reencode", "shift"), default="reencode")
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the KV pages of common prompt prefixes, e.g. a repeated system prompt and tool list "
        "(default on; --no-prefix-cache computes every prompt)",
    )
    p.add_argument("--pruning-buffer", type=int, default=2, help="TIM prune buffer; -1 turns pruning off")
    p.add_argument("--max-tokens-default", type=int, default=1024, help="when a request sets no max_tokens")
    p.add_argument("--grace", type=float, default=30.0, help="SIGTERM: seconds running requests get to finish")
    p.set_defaults(func=run_serve)


def config_from_args(args):
    from timjax.serve.config import ServeConfig

    return ServeConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        tim=args.tim,
        dtype=args.dtype,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        tools=args.tool or [],
        allow_tool_url=args.allow_tool_url or [],
        tool_timeout_s=args.tool_timeout,
        max_tool_calls=args.max_tool_calls,
        max_tool_result_tokens=args.max_tool_result_tokens,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        page_size=args.page_size,
        max_step_tokens=args.max_step_tokens,
        warmup=args.warmup,
        impl=args.impl,
        reposition=args.reposition,
        prefix_cache=args.prefix_cache,
        pruning_buffer=None if args.pruning_buffer < 0 else args.pruning_buffer,
        max_tokens_default=args.max_tokens_default,
        grace_s=args.grace,
    )


def run_serve(args) -> int:
    import uvicorn

    from timjax.serve.app import create_app

    cfg = config_from_args(args)
    app = create_app(cfg)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """SIGTERM / SIGINT: graceful shutdown, then a plain exit 0 (uvicorn would re-raise the signal)."""
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=int(cfg.grace_s) or None
    )
    print(f"timjax serve: {cfg.model_id()} on http://{args.host}:{args.port}", flush=True)
    Server(config).run()
    return 0
