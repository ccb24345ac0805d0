"""Tool servers from command-line text (``timjax generate --tool SPEC``).

A SPEC is one of:

* ``package.module:attr``: a Python object: an ``MCPServer``, or a callable returning one
  (``timjax.tools.servers.calculator:make_server``), served in-process;
* ``http://host:port/mcp`` or ``https://...``: a streamable-HTTP MCP server;
* anything else: a command line that starts a stdio MCP server, split with ``shlex`` and run without a
  shell (``"python -m timjax.tools.servers.kb --seed 1"``). It gets exactly the ``--tool-env`` variables.

Imports stay inside the functions: ``timjax --help`` loads this module.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence

__all__ = ["add_tool_arguments", "parse_env", "parse_tool_spec", "runner_from_args"]

_OBJECT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def parse_env(items: Sequence[str]) -> dict[str, str]:
    from timjax.tools.runner import ToolConfigError

    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ToolConfigError(f"--tool-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def parse_tool_spec(spec: str, *, env: dict[str, str] | None = None, allow: Sequence[str] | None = None):
    """A ``ToolServer`` for one SPEC (see the module docstring); ``allow``: tool names to keep (None = all)."""
    from timjax.tools.runner import ToolConfigError, ToolServer, stdio_server

    spec = spec.strip()
    if not spec:
        raise ToolConfigError("--tool: empty spec")
    if spec.startswith(("http://", "https://")):
        return ToolServer(spec, tools=allow)
    if _OBJECT.match(spec):
        from mcp.server.mcpserver import MCPServer

        module, attr = spec.split(":")
        try:
            obj = importlib.import_module(module)
        except ImportError as e:
            raise ToolConfigError(f"--tool {spec}: cannot import {module!r}: {e}") from None
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ToolConfigError(f"--tool {spec}: {module!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, MCPServer) and callable(obj):
            obj = obj()
        if not isinstance(obj, MCPServer):
            raise ToolConfigError(f"--tool {spec}: expected an MCPServer, got {type(obj).__name__}")
        return ToolServer(obj, tools=allow)
    return ToolServer(stdio_server(spec, env=env), tools=allow)


def add_tool_arguments(p) -> None:
    """The ``--tool*`` options of ``timjax generate`` (argparse only: importing this module stays light)."""
    p.add_argument(
        "--tool",
        action="append",
        metavar="SPEC",
        help="an MCP server the model may call (implies --tim; repeatable): module:attr (an MCPServer "
        "or a factory, e.g. timjax.tools.servers.calculator:make_server), an http(s):// URL, or a "
        "stdio command line (run without a shell)",
    )
    p.add_argument(
        "--tool-env",
        action="append",
        metavar="KEY=VALUE",
        help="the environment of stdio tool servers (they get nothing else; repeatable)",
    )
    p.add_argument("--tool-allow", action="append", metavar="NAME", help="offer only these tools (repeatable)")
    p.add_argument("--tool-timeout", type=float, default=10.0, help="seconds per tool call (default 10)")
    p.add_argument("--max-tool-calls", type=int, default=32, help="tool calls per inference (default 32)")
    p.add_argument(
        "--max-tool-result-tokens",
        type=int,
        default=256,
        help="longer tool results are truncated with a marker (default 256)",
    )
    p.add_argument(
        "--max-tool-description-chars",
        type=int,
        default=1024,
        help="longer tool descriptions are cut in the system prompt (default 1024)",
    )
    p.add_argument(
        "--max-tool-block-chars",
        type=int,
        default=16_384,
        help="the most characters the tool list may take in the system prompt (default 16384)",
    )


def runner_from_args(args):
    """A started ``ToolRunner`` for the parsed ``--tool*`` options (the caller closes it)."""
    from pydantic import ValidationError

    from timjax.tools.runner import ToolConfigError, ToolPolicy, ToolRunner

    env = parse_env(args.tool_env or [])
    try:
        policy = ToolPolicy(
            timeout_s=args.tool_timeout,
            max_calls=args.max_tool_calls,
            max_result_tokens=args.max_tool_result_tokens,
            max_description_chars=getattr(args, "max_tool_description_chars", 1024),
            max_tool_block_chars=getattr(args, "max_tool_block_chars", 16_384),
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise ToolConfigError(f"tool option {err['loc'][0]}: {err['msg']}") from None
    return ToolRunner([parse_tool_spec(spec, env=env) for spec in args.tool], policy, allow=args.tool_allow)
