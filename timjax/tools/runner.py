"""MCP tool calls for the runtime: clients on an event loop of their own, so decoding never blocks.

``ToolRunner(servers, limits)`` connects to each server once (an in-process ``MCPServer``, a
``StdioServerParameters`` subprocess, or a streamable-HTTP URL), lists its tools once (name, description,
input schema; an allowlist may keep a subset), and runs calls on an anyio event loop in a background
thread (``anyio.from_thread.start_blocking_portal``). ``ToolSession`` is one inference's view: the host
loop ``submit``s a call and ``poll``s it without blocking; every call ends as a ``ToolCallRecord`` whose
``result`` is the exact text to force after ``"tool_result": `` (``encoding.py``).

Every fault becomes an error object the model reads, and the inference goes on: arguments that fail the
tool's input schema (checked here with ``jsonschema``, strictly: the SDK's server side coerces types and
drops unknown keys), a tool that is not declared, the per-inference call cap, a per-call timeout (enforced
on the host clock too, so a tool that ignores cancellation cannot stall the sequence), ``isError``, a
server that crashes, hangs or never starts (a crashed server is restarted at its next call), a result that
is not valid JSON/UTF-8, and a result over the per-call token cap (truncated with a visible marker).

Security: only the tools listed (and allowed) are callable; arguments are validated before any call;
nothing is run through a shell and no server is started but those the user configured; a stdio server gets
exactly the environment the user passes (nothing inherited: give ``PATH`` yourself if the server needs it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from timjax.errors import TimjaxError
from timjax.results import ToolCallRecord
from timjax.tim.schema import ToolSpec, strict_input_schema
from timjax.tools.encoding import classify_result, encode_error, truncate_encoded

__all__ = ["ToolConfigError", "ToolLimits", "ToolRunner", "ToolServer", "ToolSession", "open_runner", "stdio_server"]

log = logging.getLogger(__name__)


class ToolConfigError(TimjaxError):
    """A tool configuration timjax cannot use (a server that cannot be listed, an unknown allowed name...)."""


@dataclass(frozen=True)
class ToolLimits:
    timeout_s: float = 10.0  # per call, from submission
    connect_timeout_s: float = 20.0  # to start/connect a server and list its tools
    max_calls: int = 32  # per inference; later calls get an error object without running
    max_result_tokens: int = 256  # per call; longer results are truncated with a marker

    def __post_init__(self):
        for k in ("timeout_s", "connect_timeout_s", "max_calls", "max_result_tokens"):
            if getattr(self, k) <= 0:
                raise ValueError(f"ToolLimits.{k} must be > 0, got {getattr(self, k)}")


@dataclass
class ToolServer:
    """One MCP server the runtime may call.

    ``target``: an ``mcp.server.mcpserver.MCPServer`` (in-process), an ``mcp.StdioServerParameters``
    (a subprocess; its ``env`` is the whole environment it gets), or an ``http(s)://`` URL (streamable
    HTTP). ``tools``: None = every tool the server lists; names = an allowlist; ``ToolSpec``s = declared
    tools (used as given, so they stay in the grammar even if the server cannot be listed at start)."""

    target: Any
    tools: Sequence[str | ToolSpec] | None = None
    name: str | None = None

    def label(self) -> str:
        if self.name:
            return self.name
        t = self.target
        if isinstance(t, str):
            return t
        if hasattr(t, "command"):  # stdio: the module after -m, else the executable's name
            args = list(t.args)
            if "-m" in args[:-1]:
                return args[args.index("-m") + 1].rsplit(".", 1)[-1]
            return os.path.basename(t.command)
        return getattr(t, "name", None) or type(t).__name__


def stdio_server(command: str | Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None):
    """``StdioServerParameters`` for a command line (no shell: ``command`` is split with ``shlex``). The
    executable is resolved on the caller's PATH now, so the server itself can run with an empty env."""
    import shlex

    from mcp import StdioServerParameters

    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ToolConfigError("empty tool server command")
    exe = shutil.which(argv[0]) or argv[0]
    return StdioServerParameters(command=exe, args=argv[1:], env=dict(env or {}), cwd=cwd)


def as_tool_server(x: Any) -> ToolServer:
    if isinstance(x, ToolServer):
        return x
    from mcp import StdioServerParameters
    from mcp.server.mcpserver import MCPServer

    if isinstance(x, (MCPServer, StdioServerParameters)):
        return ToolServer(x)
    if isinstance(x, str) and x.startswith(("http://", "https://")):
        return ToolServer(x)
    raise ToolConfigError(f"not a tool server: {x!r} (give an MCPServer, StdioServerParameters or an http(s) URL)")


def open_runner(tools: Any, limits: ToolLimits | None = None) -> tuple[ToolRunner, bool]:
    """``(runner, whether the caller must close it)`` for what ``timjax.generate(tools=...)`` accepts."""
    if isinstance(tools, ToolRunner):
        return tools, False
    if not isinstance(tools, (list, tuple)):
        tools = [tools]
    return ToolRunner(tools, limits), True


# ------------------------------------------------------------------------------------------------ loop side
class _ServerDown(Exception):
    pass


class _Connection:
    """One server's client, living on the runner's event loop; (re)connected on demand."""

    def __init__(self, server: ToolServer, tg):
        self.server = server
        self.label = server.label()
        self._tg = tg
        self.client = None
        self.error: BaseException | None = None
        self._scope = None
        self._lock = None

    def _make_client(self):
        from mcp import Client, StdioServerParameters

        target = self.server.target
        if isinstance(target, StdioServerParameters):
            return Client(_exact_env_stdio(target), cache=None)
        return Client(target, cache=None)

    async def _host(self, ready) -> None:
        import anyio

        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                async with self._make_client() as client:
                    self.client = client
                    ready.set()
                    await anyio.sleep_forever()
            except Exception as e:  # noqa: BLE001 - the transport died (crash, garbage, closed pipe) or never came up
                self.error = e
            finally:
                self.client = None
                ready.set()

    async def ensure(self, timeout_s: float):
        import anyio

        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self.client is not None:
                return self.client
            self.error = None
            ready = anyio.Event()
            self._tg.start_soon(self._host, ready)
            with anyio.move_on_after(timeout_s):
                await ready.wait()
            if self.client is None:
                if self._scope is not None:
                    self._scope.cancel()
                why = _describe(self.error) if self.error else f"no answer within {timeout_s:g} s"
                raise _ServerDown(f"server {self.label!r} did not start: {why}")
            return self.client

    def reset(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        self.client = None


def _describe(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _exact_env_stdio(params):
    """A stdio transport that gives the server exactly ``params.env`` (the SDK merges a default set of
    the parent's variables into it; the model's tools must not see more than the user passed)."""
    import contextlib as _cl
    import types

    import mcp.client.stdio as stdio_mod

    fn = getattr(stdio_mod.stdio_client, "__wrapped__", None)
    if fn is None or "get_default_environment" not in fn.__code__.co_names:
        log.warning("mcp.client.stdio changed: the stdio server inherits the SDK's default environment")
        return stdio_mod.stdio_client(params)
    g = dict(fn.__globals__)
    g["get_default_environment"] = dict
    exact = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    return _cl.asynccontextmanager(exact)(params)


@dataclass
class _Outcome:
    status: str
    result: Any = None  # CallToolResult when status == "ok" (isError included)
    error: str | None = None
    latency_s: float = 0.0


# ------------------------------------------------------------------------------------------------ host side
def _strict_types(cls):
    """The validator class with JSON Schema's types as the grammar writes them: ``1.0`` is not an
    ``integer`` and ``true`` is not a number (the spec's looser reading would let a coercion through)."""
    checker = cls.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _, x: isinstance(x, int) and not isinstance(x, bool),
            "number": lambda _, x: isinstance(x, (int, float)) and not isinstance(x, bool),
        }
    )
    import jsonschema

    return jsonschema.validators.extend(cls, type_checker=checker)


@dataclass
class _Tool:
    spec: ToolSpec
    conn: _Connection
    validator: Any


class ToolRunner:
    """MCP clients for one run (see the module docstring). Use as a context manager, or ``close()``."""

    def __init__(
        self,
        servers: Sequence[Any],
        limits: ToolLimits | None = None,
        *,
        count_tokens: Callable[[str], int] | None = None,
        allow: Sequence[str] | None = None,
    ):
        """``count_tokens``: the default token counter of sessions (for the result cap; UTF-8 bytes if None).
        ``allow``: tool names to keep over all servers (each must exist), on top of per-server lists."""
        self.limits = limits or ToolLimits()
        self.count_tokens = count_tokens
        self.allow = list(allow) if allow else None
        self.servers = [as_tool_server(s) for s in servers]
        self.tools: dict[str, _Tool] = {}
        self.startup_errors: list[str] = []
        self._stack = contextlib.ExitStack()
        self._portal = None
        self._root = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- lifecycle
    def _start(self) -> None:
        import anyio
        from anyio.from_thread import start_blocking_portal

        self._portal = self._stack.enter_context(start_blocking_portal())

        async def root(*, task_status=anyio.TASK_STATUS_IGNORED):
            async with anyio.create_task_group() as tg:
                task_status.started(tg)
                await anyio.sleep_forever()

        self._root, tg = self._portal.start_task(root)
        for server in self.servers:
            conn = _Connection(server, tg)
            declared = server.tools is not None and all(isinstance(t, ToolSpec) for t in server.tools)
            self._add_tools(server, conn, None if declared else self._list(conn))  # declared: connect at first call
        if self.allow is not None:
            missing = [n for n in self.allow if n not in self.tools]
            if missing:
                raise ToolConfigError(
                    f"allowed tools not offered by any server: {', '.join(missing)} "
                    f"(offered: {', '.join(self.tools) or 'nothing'})"
                )
            self.tools = {n: t for n, t in self.tools.items() if n in self.allow}

    def _list(self, conn: _Connection) -> list[ToolSpec] | None:
        async def go():
            import anyio

            client = await conn.ensure(self.limits.connect_timeout_s)
            with anyio.fail_after(self.limits.connect_timeout_s):
                listed = await client.list_tools()
            return [
                ToolSpec(name=t.name, description=t.description or "", input_schema=t.input_schema)
                for t in listed.tools
            ]

        try:
            return self._portal.call(go)
        except Exception as e:  # noqa: BLE001 - any failure to list is reported by name
            msg = (
                str(e)
                if isinstance(e, _ServerDown)
                else f"server {conn.label!r} could not list its tools: {_describe(e)}"
            )
            self.startup_errors.append(msg)
            conn.reset()
            return None

    def _add_tools(self, server: ToolServer, conn: _Connection, listed: list[ToolSpec] | None) -> None:
        import jsonschema

        wanted = list(server.tools) if server.tools is not None else None
        declared = [t for t in wanted or () if isinstance(t, ToolSpec)]
        if listed is None and len(declared) < len(wanted or [None]):
            raise ToolConfigError(self.startup_errors[-1] + " (declare its tools as ToolSpecs to run without listing)")
        by_name = {t.name: t for t in listed or ()}
        if wanted is None:
            specs = list(by_name.values())
        else:
            specs = []
            for w in wanted:
                if isinstance(w, ToolSpec):
                    specs.append(w)
                elif w in by_name:
                    specs.append(by_name[w])
                else:
                    raise ToolConfigError(
                        f"tool {w!r} is not offered by server {conn.label!r} "
                        f"(it lists: {', '.join(by_name) or 'nothing'})"
                    )
        for spec in specs:
            if spec.name in self.tools:
                raise ToolConfigError(
                    f"tool {spec.name!r} is offered by two servers "
                    f"({self.tools[spec.name].conn.label!r} and {conn.label!r}); allow one"
                )
            schema = strict_input_schema(spec.input_schema)
            try:
                cls = _strict_types(jsonschema.validators.validator_for(schema))
                cls.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise ToolConfigError(
                    f"tool {spec.name!r} of {conn.label!r}: invalid input schema: {e.message}"
                ) from None
            self.tools[spec.name] = _Tool(spec.model_copy(update={"input_schema": schema}), conn, cls(schema))

    @property
    def specs(self) -> list[ToolSpec]:
        """The callable tools, in server order (what the schema and the system prompt offer)."""
        return [t.spec for t in self.tools.values()]

    def close(self) -> None:
        if self._root is not None:
            self._root.cancel()
            with contextlib.suppress(BaseException):
                self._root.result(timeout=10)
            self._root = None
        self._stack.close()
        self._portal = None

    def __enter__(self) -> ToolRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self, count_tokens: Callable[[str], int] | None = None) -> ToolSession:
        return ToolSession(self, count_tokens or self.count_tokens)

    # -- calls
    def validate(self, name: str, arguments_json: str) -> tuple[Any, tuple[str, str] | None]:
        """(parsed arguments, None) or (what could be parsed, (status, message))."""
        try:
            args = json.loads(arguments_json)
        except (json.JSONDecodeError, TypeError) as e:
            return arguments_json, ("invalid_arguments", f"parameters are not JSON: {e}")
        tool = self.tools.get(name)
        if tool is None:
            return args, ("unknown_tool", f"unknown tool {name!r}; tools: {', '.join(self.tools)}")
        import jsonschema

        err = jsonschema.exceptions.best_match(tool.validator.iter_errors(args))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path)
            at = f" at {where}" if where else ""
            return args, ("invalid_arguments", f"invalid parameters for {name}{at}: {err.message}")
        return args, None

    def submit(self, name: str, arguments: dict) -> concurrent.futures.Future:
        """Run a validated call on the loop; the future gives an ``_Outcome`` (never raises)."""
        tool = self.tools[name]
        timeout = self.limits.timeout_s
        connect = self.limits.connect_timeout_s

        async def go() -> _Outcome:
            import anyio

            t0 = time.perf_counter()
            try:
                with anyio.fail_after(timeout):
                    client = await tool.conn.ensure(min(connect, timeout))
                    res = await client.call_tool(name, arguments, read_timeout_seconds=timeout)
                return _Outcome("ok", res, latency_s=time.perf_counter() - t0)
            except TimeoutError:
                return _Outcome(
                    "timeout", error=f"{name}: no answer within {timeout:g} s", latency_s=time.perf_counter() - t0
                )
            except _ServerDown as e:
                return _Outcome("server_error", error=str(e), latency_s=time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - every fault becomes an answer for the model
                from mcp import MCPError
                from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

                code = getattr(getattr(e, "error", None), "code", None) if isinstance(e, MCPError) else None
                if code == REQUEST_TIMEOUT:
                    return _Outcome(
                        "timeout", error=f"{name}: no answer within {timeout:g} s", latency_s=time.perf_counter() - t0
                    )
                if code is None or code == CONNECTION_CLOSED:  # the transport broke: reconnect at the next call
                    tool.conn.reset()
                return _Outcome(
                    "server_error",
                    error=f"server {tool.conn.label!r} failed: {_describe(e)}",
                    latency_s=time.perf_counter() - t0,
                )

        return self._portal.start_task_soon(go)


class _Pending:
    __slots__ = ("arguments", "future", "index", "record", "t0", "task_path", "tool")

    def __init__(self, index, task_path, tool, arguments, future, t0, record=None):
        self.index, self.task_path, self.tool, self.arguments = index, task_path, tool, arguments
        self.future, self.t0, self.record = future, t0, record


class ToolSession:
    """One inference's tool calls: ``submit`` never blocks, ``poll`` returns the record once answered."""

    GRACE_S = 0.5  # the host-side deadline is the timeout plus this (the loop's own timeout comes first)

    def __init__(self, runner: ToolRunner, count_tokens: Callable[[str], int] | None = None):
        self.runner = runner
        self.limits = runner.limits
        self.count_tokens = count_tokens or (lambda s: len(s.encode("utf-8")))
        self.records: list[ToolCallRecord] = []
        self.n_submitted = 0

    def submit(self, name: str, arguments_json: str, task_path: tuple[int, ...] = ()) -> _Pending:
        index = self.n_submitted
        self.n_submitted += 1
        t0 = time.perf_counter()
        args, fault = self.runner.validate(name, arguments_json)
        if fault is None and index >= self.limits.max_calls:
            fault = ("call_cap", f"tool call limit reached: at most {self.limits.max_calls} calls per inference")
        p = _Pending(index, tuple(task_path), name, args, None, t0)
        if fault is not None:
            p.record = self._record(p, fault[0], encode_error(fault[1]), fault[1])
        else:
            p.future = self.runner.submit(name, args)
        return p

    def poll(self, p: _Pending) -> ToolCallRecord | None:
        if p.record is not None:
            return p.record
        if not p.future.done():
            if time.perf_counter() - p.t0 < self.limits.timeout_s + self.GRACE_S:
                return None
            p.future.cancel()  # the loop did not give up in time (a tool ignoring cancellation)
            msg = f"{p.tool}: no answer within {self.limits.timeout_s:g} s"
            p.record = self._record(p, "timeout", encode_error(msg), msg)
            return p.record
        try:
            out: _Outcome = p.future.result()
        except Exception as e:  # noqa: BLE001 - cancelled or an internal error: still an answer for the model
            out = _Outcome("server_error", error=f"{p.tool}: {_describe(e)}")
        if out.status != "ok":
            p.record = self._record(p, out.status, encode_error(out.error), out.error, out.latency_s or None)
            return p.record
        text, status = classify_result(out.result)
        p.record = self._record(p, status, text, json.loads(text)["error"] if status != "ok" else None, out.latency_s)
        return p.record

    def _record(
        self, p: _Pending, status: str, text: str, error: str | None, latency_s: float | None = None
    ) -> ToolCallRecord:
        """``latency_s``: measured on the loop (submission to answer); else the host's clock up to now."""
        cap = self.limits.max_result_tokens
        if error is not None and status != "ok":  # an error object: shorten its message, keep its status
            n = self.count_tokens(text)
            while n > cap and len(error) > 8:
                error = error[: len(error) * 3 // 4] + "…"
                text = encode_error(error)
                n = self.count_tokens(text)
        else:
            text, n = truncate_encoded(text, cap, self.count_tokens)
            if n > cap:
                status, error = "truncated", json.loads(text)["error"]
                n = self.count_tokens(text)
        rec = ToolCallRecord(
            index=p.index,
            task_path=p.task_path,
            tool=p.tool,
            arguments=p.arguments,
            result=text,
            status=status,
            error=error,
            latency_s=latency_s if latency_s is not None else time.perf_counter() - p.t0,
            result_tokens=n,
        )
        self.records.append(rec)
        return rec
