"""MCP tool calls for the runtime: each server's client on an event loop of its own, so decoding never
waits on a tool.

``ToolRunner(servers, limits)`` checks each server against the ``ToolPolicy`` (``policy.py``), connects to
it once (an in-process ``MCPServer``, a ``StdioServerParameters`` subprocess, or a streamable-HTTP URL, with
optional headers), lists its tools once (name, description, input schema, annotations; an allowlist may
keep a subset) and runs calls on that server's loop thread (``connection.py``). ``ToolSession`` is one
inference's view: the engine thread ``submit``s a call (validated here, handed over without waiting) and
``poll``s it; every call ends as a ``ToolCallRecord`` whose ``result`` is the exact text to force after
``"tool_result": `` (``encoding.py``), encoded and cut to the character cap on the server's loop, so the
engine thread only ever tokenizes a few times the token cap. Before that, the transport reads at most
``ToolPolicy.result_bytes`` of one answer (``capped.py``: an HTTP body or a stdio line past it is cut
unparsed, and the call is ``truncated`` naming the tool and the cap).

Every fault becomes an error object the model reads, and the inference goes on: arguments that fail the
tool's input schema (checked here with ``jsonschema``, strictly: the SDK's server side coerces types and
drops unknown keys), a tool that is not declared, the per-inference call cap, a per-call deadline (kept on
the engine's clock: a call past it is a timeout even if its answer comes later, and that answer is
dropped), ``isError``, a server that crashes (``server_crashed``, naming it; the server is restarted and a
call to a tool annotated ``readOnlyHint`` or ``idempotentHint`` is retried once), hangs or never starts, a
result that is not valid JSON, and a result over the cap (truncated with a visible marker).

Security: only the tools listed (and allowed) are callable; arguments are validated before any call;
nothing is run through a shell and no server is started but those the user configured and the policy
allows; a stdio server gets exactly the environment the user passes (nothing inherited: give ``PATH``
yourself if the server needs it); URL credentials and header values never leave the runner (``redact.py``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from timjax.base.results import ToolCallRecord
from timjax.tim.schema import ToolSpec, strict_input_schema
from timjax.tools.capped import CappedLines, capped_http_client, error_message, over_cap_info
from timjax.tools.connection import Connection, LoopThread, ServerDown, describe
from timjax.tools.encoding import classify_result, encode_error, encode_value, fit_tokens
from timjax.tools.policy import ToolConfigError, ToolLimits, ToolPolicy, ToolPolicyError
from timjax.tools.redact import Redactor, header_secrets, redact_url, scrubbed_logs, url_secrets

__all__ = [
    "ToolConfigError",
    "ToolLimits",
    "ToolPolicy",
    "ToolPolicyError",
    "ToolRunner",
    "ToolServer",
    "ToolSession",
    "open_runner",
    "stdio_server",
]

log = logging.getLogger(__name__)


@dataclass
class ToolServer:
    """One MCP server the runtime may call.

    ``target``: an ``mcp.server.mcpserver.MCPServer`` (in-process), an ``mcp.StdioServerParameters``
    (a subprocess; its ``env`` is the whole environment it gets), or an ``http(s)://`` URL (streamable
    HTTP; ``headers`` are sent with every request, e.g. ``{"Authorization": "Bearer ..."}``). ``tools``:
    None = every tool the server lists; names = an allowlist; ``ToolSpec``s = declared tools (used as
    given, so they stay in the grammar even if the server cannot be listed at start)."""

    target: Any
    tools: Sequence[str | ToolSpec] | None = None
    name: str | None = None
    headers: Mapping[str, str] | None = field(default=None, repr=False)

    def label(self) -> str:
        """A name for messages: never holds the URL's credentials or query."""
        if self.name:
            return self.name
        t = self.target
        if isinstance(t, str):
            return redact_url(t)
        if hasattr(t, "command"):  # stdio: the module after -m, else the executable's name
            args = list(t.args)
            if "-m" in args[:-1]:
                return args[args.index("-m") + 1].rsplit(".", 1)[-1]
            return os.path.basename(t.command)
        return getattr(t, "name", None) or type(t).__name__

    def kind(self) -> str:
        t = self.target
        if isinstance(t, str):
            return "http"
        return "stdio" if hasattr(t, "command") else "in_process"

    def secrets(self) -> list[str]:
        out = header_secrets(self.headers)
        if isinstance(self.target, str):
            out += url_secrets(self.target)
        return out

    def __repr__(self) -> str:
        return f"ToolServer({self.label()!r}, tools={self.tools!r})"


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
    shown = redact_url(x) if isinstance(x, str) else type(x).__name__
    raise ToolConfigError(f"not a tool server: {shown} (give an MCPServer, StdioServerParameters or an http(s) URL)")


def open_runner(tools: Any, limits: ToolLimits | ToolPolicy | None = None) -> tuple[ToolRunner, bool]:
    """``(runner, whether the caller must close it)`` for what ``timjax.generate(tools=...)`` accepts."""
    if isinstance(tools, ToolRunner):
        return tools, False
    if not isinstance(tools, (list, tuple)):
        tools = [tools]
    return ToolRunner(tools, limits), True


def _make_client(server: ToolServer, cap_bytes: int | None = None, meter: Any = None) -> Callable[[], Any]:
    """``cap_bytes``: the transport's byte cap on one answer (``capped.py``; None: the SDK's transports
    as they are). ``meter``: a list the capped streams are appended to (tests count the bytes read)."""

    def make():
        from mcp import Client, StdioServerParameters

        target = server.target
        if isinstance(target, StdioServerParameters):
            return Client(_exact_env_stdio(target, cap_bytes, meter), cache=None)
        if isinstance(target, str) and (server.headers or cap_bytes):
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            headers = dict(server.headers or {})
            if cap_bytes:
                http = capped_http_client(cap_bytes, headers, meter)
            else:
                http = create_mcp_http_client(headers=headers)
            return Client(streamable_http_client(target, http_client=http), cache=None)
        return Client(target, cache=None)

    return make


def _exact_env_stdio(params, cap_bytes: int | None = None, meter: Any = None):
    """A stdio transport that gives the server exactly ``params.env`` (the SDK merges a default set of
    the parent's variables into it; the model's tools must not see more than the user passed), and whose
    stdout reader never assembles a line over ``cap_bytes`` (``capped.CappedLines``)."""
    import contextlib as _cl
    import types

    import mcp.client.stdio as stdio_mod

    fn = getattr(stdio_mod.stdio_client, "__wrapped__", None)
    if fn is None or "get_default_environment" not in fn.__code__.co_names:
        log.warning("mcp.client.stdio changed: the stdio server inherits the SDK's default environment")
        return stdio_mod.stdio_client(params)
    g = dict(fn.__globals__)
    g["get_default_environment"] = dict
    if cap_bytes and "TextReceiveStream" in g:
        text_stream = g["TextReceiveStream"]

        def capped_text(stream, *args, **kwargs):
            return text_stream(CappedLines(stream, cap_bytes, meter), *args, **kwargs)

        g["TextReceiveStream"] = capped_text
    elif cap_bytes:
        log.warning("mcp.client.stdio changed: stdio answers are not capped at the pipe")
    exact = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    return _cl.asynccontextmanager(exact)(params)


@dataclass
class _Outcome:
    """A call's end, built on the server's loop: ``text`` is encoded (an error object unless ``status`` is
    ok / over), redacted and at most ``result_chars`` (+1) characters; ``t_done`` on the perf counter."""

    status: str
    text: str
    error: str | None = None
    latency_s: float = 0.0
    t_done: float = 0.0


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
    conn: Connection
    validator: Any
    retry_safe: bool = False  # annotated read-only or idempotent: retried once after a crash


def _cut_description(spec: ToolSpec, cap: int) -> ToolSpec:
    if len(spec.description) <= cap:
        return spec
    log.warning("tool %r: description of %d characters cut to %d", spec.name, len(spec.description), cap)
    return spec.model_copy(update={"description": spec.description[: cap - 1] + "…"})


class ToolRunner:
    """MCP clients for one run (see the module docstring). Use as a context manager, or ``close()``."""

    def __init__(
        self,
        servers: Sequence[Any],
        limits: ToolLimits | ToolPolicy | None = None,
        *,
        count_tokens: Callable[[str], int] | None = None,
        allow: Sequence[str] | None = None,
        policy: ToolPolicy | None = None,
    ):
        """``limits``: a ``ToolLimits`` or a whole ``ToolPolicy`` (``policy=`` says the same; give one).
        ``count_tokens``: the default token counter of sessions (for the result cap; UTF-8 bytes if None).
        ``allow``: tool names to keep over all servers (each must exist), on top of per-server lists."""
        if policy is not None and limits is not None:
            raise ToolConfigError("give limits or policy, not both (a ToolPolicy holds the limits)")
        self.policy = ToolPolicy.from_limits(policy if policy is not None else limits)
        self.limits = self.policy  # the old name: the same fields (timeout_s, max_calls, max_result_tokens)
        self.count_tokens = count_tokens
        self.allow = list(allow) if allow else None
        self.servers = [as_tool_server(s) for s in servers]
        self.redactor = Redactor(s for server in self.servers for s in server.secrets())
        self.tools: dict[str, _Tool] = {}
        self.startup_errors: list[str] = []
        self._loops: list[LoopThread] = []
        self._conns: list[Connection] = []
        self._closed = False
        self._meter: collections.deque = collections.deque(maxlen=64)  # the latest capped answer streams
        self._logs = contextlib.ExitStack()
        self._logs.enter_context(scrubbed_logs(self.redactor))
        try:
            self._start()
        except ToolConfigError as e:
            self.close()
            raise type(e)(self.redactor.text(str(e))) from None
        except BaseException:
            self.close()
            raise

    # -- lifecycle
    def _start(self) -> None:
        for server in self.servers:
            self._check_policy(server)
        for server in self.servers:
            loop = LoopThread(server.label())
            self._loops.append(loop)
            conn = Connection(server.label(), _make_client(server, self.policy.result_bytes, self._meter), loop)
            self._conns.append(conn)
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
        self._check_tool_block()

    def _check_policy(self, server: ToolServer) -> None:
        kind = server.kind()
        if kind == "http":
            self.policy.check_url(server.target)
        else:
            self.policy.check_kind(kind, server.label())

    def _check_tool_block(self) -> None:
        """The tools' lines in the system prompt must fit ``max_tool_block_chars`` (the error names them)."""
        from timjax.tim.prompt import tool_signature

        lines = [f"- {tool_signature(t.spec.name, t.spec.input_schema)}: {t.spec.description}" for t in self.tools.values()]
        size = sum(len(line) + 1 for line in lines)
        cap = self.policy.max_tool_block_chars
        if size > cap:
            names = list(self.tools)
            shown = ", ".join(names[:8]) + (f", … ({len(names)} tools)" if len(names) > 8 else "")
            raise ToolConfigError(
                f"the tool list ({shown}) takes {size:,} characters in the system prompt, over "
                f"ToolPolicy.max_tool_block_chars={cap:,}: offer fewer tools (ToolServer(tools=[...]), "
                f"--tool-allow) or raise the cap (--max-tool-block-chars)"
            )

    def _list(self, conn: Connection) -> list[tuple[ToolSpec, bool]] | None:
        connect = self.policy.connect_timeout_s

        async def go():
            import anyio

            client, _ = await conn.ensure(connect)
            with anyio.fail_after(connect):
                listed = await client.list_tools()
            out = []
            for t in listed.tools:
                ann = t.annotations
                safe = bool(ann and (ann.read_only_hint or ann.idempotent_hint))
                spec = ToolSpec(name=t.name, description=t.description or "", input_schema=t.input_schema)
                out.append((spec, safe))
            return out

        try:
            return conn.loop.call(go(), timeout=connect + 1.0)
        except Exception as e:  # noqa: BLE001 - any failure to list is reported by name
            msg = str(e) if isinstance(e, ServerDown) else f"server {conn.label!r} could not list its tools: {describe(e)}"
            self.startup_errors.append(self.redactor.text(msg))
            conn.loop.submit(conn.aclose(1.0))
            return None

    def _add_tools(self, server: ToolServer, conn: Connection, listed: list[tuple[ToolSpec, bool]] | None) -> None:
        import jsonschema

        wanted = list(server.tools) if server.tools is not None else None
        declared = [t for t in wanted or () if isinstance(t, ToolSpec)]
        if listed is None and len(declared) < len(wanted or [None]):
            raise ToolConfigError(self.startup_errors[-1] + " (declare its tools as ToolSpecs to run without listing)")
        by_name = {t.name: (t, safe) for t, safe in listed or ()}
        if wanted is None:
            specs = list(by_name.values())
        else:
            specs = []
            for w in wanted:
                if isinstance(w, ToolSpec):
                    specs.append((w, False))
                elif w in by_name:
                    specs.append(by_name[w])
                else:
                    raise ToolConfigError(
                        f"tool {w!r} is not offered by server {conn.label!r} "
                        f"(it lists: {', '.join(by_name) or 'nothing'})"
                    )
        for spec, safe in specs:
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
            spec = _cut_description(spec.model_copy(update={"input_schema": schema}), self.policy.max_description_chars)
            self.tools[spec.name] = _Tool(spec, conn, cls(schema), safe)

    @property
    def specs(self) -> list[ToolSpec]:
        """The callable tools, in server order (what the schema and the system prompt offer)."""
        return [t.spec for t in self.tools.values()]

    def close(self) -> None:
        """Close every client (stdio servers are stopped) and the loop threads. A loop blocked by a tool
        is left behind as a daemon thread after a few seconds rather than hanging the caller."""
        if self._closed:
            return
        self._closed = True
        futs = [(c, c.loop.submit(c.aclose(5.0))) for c in self._conns]
        for c, f in futs:
            try:
                f.result(timeout=6.0)
            except Exception:  # noqa: BLE001 - a stuck loop: reported, not raised
                log.warning("tool server %r did not close in time", c.label)
        for loop in self._loops:
            if not loop.stop(timeout=5.0):
                log.warning("a tool server's event loop is blocked; its thread is left to exit with the process")
        self._logs.close()

    @property
    def closed(self) -> bool:
        return self._closed

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
        """Hand a validated call to its server's loop without waiting; the future gives an ``_Outcome``
        (never raises). Cancelling the future cancels the call on the loop."""
        tool = self.tools[name]
        return tool.conn.loop.submit(self._run_call(tool, name, arguments))

    async def _run_call(self, tool: _Tool, name: str, arguments: dict) -> _Outcome:
        import anyio

        timeout = self.policy.timeout_s
        t0 = time.perf_counter()

        def end(status: str, text: str | None = None, error: str | None = None) -> _Outcome:
            if error is not None:
                error = self.redactor.text(error)
                text = encode_error(error)
            t = time.perf_counter()
            return _Outcome(status, text, error, t - t0, t)

        try:
            with anyio.fail_after(timeout):
                res = await self._call_with_retry(tool, name, arguments, timeout)
        except TimeoutError:
            return end("timeout", error=f"{name}: no answer within {timeout:g} s")
        except ServerDown as e:
            return end("server_error", error=str(e))
        except _Crashed as e:
            return end("server_crashed", error=str(e))
        except Exception as e:  # noqa: BLE001 - every fault becomes an answer for the model
            if (cut := over_cap_info(e)) is not None:
                return self._over_cap(name, cut, t0)
            return end("server_error", error=f"server {tool.conn.label!r} failed: {describe(e)}")
        text, status = classify_result(res, max_chars=self.policy.result_chars)
        if status == "over":
            return end("over", self.redactor.text(text))
        if status != "ok":
            return end(status, error=json.loads(text)["error"])
        return end("ok", self.redactor.encoded(text) if self.redactor else text)

    def _over_cap(self, name: str, cut: dict, t0: float) -> _Outcome:
        """The answer passed the transport's byte cap (``capped.py``): a ``truncated`` call whose text is
        ``{"error": <names the tool and the cap>, "partial": <prefix>}`` when a prefix could be read, else
        the error alone (``"over"`` lets ``ToolSession._record`` cut the prefix to the token cap)."""
        message = error_message(name, int(cut.get("cap_bytes") or self.policy.result_bytes))
        if not str(cut.get("message", "")).startswith("result truncated"):  # refused outright (compressed)
            message = self.redactor.text(f"{name}: {cut.get('message')}")
        t = time.perf_counter()
        partial = cut.get("partial")
        if isinstance(partial, str) and partial:
            text = encode_value(partial[: self.policy.result_chars + 1])[: self.policy.result_chars + 1]
            return _Outcome("over", self.redactor.text(text), message, t - t0, t)
        return _Outcome("truncated", encode_error(message), message, t - t0, t)

    async def _call_with_retry(self, tool: _Tool, name: str, arguments: dict, timeout: float):
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        connect = min(self.policy.connect_timeout_s, timeout)
        for attempt in (0, 1):
            client, gen = await tool.conn.ensure(connect)
            try:
                return await client.call_tool(name, arguments, read_timeout_seconds=timeout)
            except Exception as e:
                code = getattr(getattr(e, "error", None), "code", None) if isinstance(e, MCPError) else None
                if code == REQUEST_TIMEOUT:
                    raise TimeoutError from None
                if code is not None and code != CONNECTION_CLOSED:
                    raise  # the server answered with a protocol error: it is up
                tool.conn.reset(gen)  # the transport broke: the server is restarted at the next call
                if tool.retry_safe and attempt == 0:
                    log.warning("%s", self.redactor.text(f"server {tool.conn.label!r} crashed; retrying {name}"))
                    continue
                why = "retried once after a restart, it crashed again" if attempt else (
                    "not retried: the tool is not annotated read-only or idempotent"
                )
                raise _Crashed(f"server {tool.conn.label!r} crashed during the call ({describe(e)}); {why}") from None
        raise AssertionError("unreachable")


class _Crashed(Exception):
    pass


class _Pending:
    __slots__ = ("arguments", "deadline", "future", "index", "record", "t0", "task_path", "tool")

    def __init__(self, index, task_path, tool, arguments, future, t0, deadline, record=None):
        self.index, self.task_path, self.tool, self.arguments = index, task_path, tool, arguments
        self.future, self.t0, self.deadline, self.record = future, t0, deadline, record


class ToolSession:
    """One inference's tool calls: ``submit`` never blocks, ``poll`` returns the record once answered or
    once the deadline has passed (the engine's clock decides: a late answer is a timeout, and dropped)."""

    def __init__(self, runner: ToolRunner, count_tokens: Callable[[str], int] | None = None):
        self.runner = runner
        self.limits = runner.policy
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
        p = _Pending(index, tuple(task_path), name, args, None, t0, t0 + self.limits.timeout_s)
        if fault is not None:
            msg = self.runner.redactor.text(fault[1])
            p.record = self._record(p, fault[0], encode_error(msg), msg)
        else:
            p.future = self.runner.submit(name, args)
        return p

    def poll(self, p: _Pending) -> ToolCallRecord | None:
        if p.record is not None:
            return p.record
        done = p.future.done()
        late = False
        if done:
            try:
                out: _Outcome = p.future.result()
                late = out.t_done > p.deadline
            except BaseException as e:  # noqa: BLE001 - cancelled or an internal error: still an answer
                msg = self.runner.redactor.text(f"{p.tool}: {describe(e)}")
                out = _Outcome("server_error", encode_error(msg), msg, time.perf_counter() - p.t0)
        elif time.perf_counter() < p.deadline:
            return None
        if not done or late:  # past the deadline: a timeout, whatever comes later
            p.future.cancel()
            msg = f"{p.tool}: no answer within {self.limits.timeout_s:g} s"
            p.record = self._record(p, "timeout", encode_error(msg), msg, self.limits.timeout_s)
            return p.record
        p.record = self._record(p, out.status, out.text, out.error, out.latency_s)
        return p.record

    def _record(
        self, p: _Pending, status: str, text: str, error: str | None, latency_s: float | None = None
    ) -> ToolCallRecord:
        """Cap ``text`` (at most a few times the cap in characters: cut on the loop) at the token cap.
        ``latency_s``: measured on the loop (submission to answer); else the host's clock up to now."""
        cap = self.limits.max_result_tokens
        if status in ("ok", "over"):
            text, n, cut = fit_tokens(text, cap, self.count_tokens, over=status == "over", message=error)
            if cut:
                status, error = "truncated", json.loads(text)["error"]
        else:  # an error object: shorten its message, keep its status
            n = self.count_tokens(text)
            while n > cap and len(error) > 8:
                error = error[: len(error) * 3 // 4] + "…"
                text = encode_error(error)
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
