"""Per-request tools (Runs API ``input.tools``): MCP servers and HTTP functions a caller passes with one
request, checked against the server's URL policy, joined with the server-level tools.

``{"type": "mcp", "url", "allowedTools", "auth"}`` is a streamable-HTTP MCP server;
``{"type": "function", "name", "description", "parameters", "url", "method", "headers", "timeout"}`` is an
HTTP endpoint that gets the arguments as JSON; it is served to the runtime as a one-tool in-process MCP
server, so the runtime's own limits, validation and fault handling apply to it unchanged.

Security: every URL here is an outbound call from the server. ``request_policy`` (a
``timjax.tools.policy.ToolPolicy``) refuses any host the operator did not list with ``--allow-tool-url``
(host globs, ``host:port``, URL prefixes; loopback only when listed) and any stdio server; function responses are read up to
``MAX_FUNCTION_BYTES``; every call has the server's timeout (a function's own ``timeout`` can only be
shorter). Nothing here reads files or the environment.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_FUNCTION_BYTES = 1 << 20  # a function tool's response is cut here (then the runtime's token cap applies)


class McpAuth(BaseModel):
    type: Literal["bearer", "api_key"]
    token: str
    header: str | None = None

    def headers(self) -> dict[str, str]:
        if self.type == "bearer":
            return {"Authorization": f"Bearer {self.token}"}
        return {self.header or "X-Api-Key": self.token}


class McpToolParam(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    type: Literal["mcp"]
    url: str
    allowed_tools: list[str] | None = Field(default=None, alias="allowedTools")
    auth: McpAuth | None = None


class FunctionToolParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    url: str
    method: Literal["GET", "POST", "get", "post"] = "POST"
    headers: dict[str, str] | None = None
    timeout: float | None = Field(default=None, gt=0)
    defaults: dict[str, Any] | None = None


class PlatformToolParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["platform"]
    id: str


class ToolRefused(ValueError):
    """A per-request tool the server will not use (the route answers 400 naming it)."""


def request_policy(allow_patterns: list[str], limits=None):
    """The ``ToolPolicy`` of per-request tools: URL hosts from ``--allow-tool-url`` (none listed: every URL
    is refused; loopback only when a pattern names it), no stdio server. In-process servers stay allowed:
    a request cannot name one; the only ones are the server's own wrappers of HTTP function tools, whose
    URL this policy checked before wrapping. Timeouts and caps are the server's ``limits``."""
    from timjax.tools.policy import ToolPolicy

    base = ToolPolicy.from_limits(limits)
    return base.model_copy(update={"hosts": tuple(allow_patterns), "allow_stdio": False, "allow_in_process": True})


def url_allowed(url: str, patterns: list[str]) -> bool:
    """Whether ``request_policy(patterns)`` lets a per-request tool call ``url`` (``ToolPolicy.check_url``)."""
    from timjax.tools.policy import ToolPolicyError

    try:
        request_policy(patterns).check_url(url)
    except ToolPolicyError:
        return False
    return True


def redacted(url: str) -> str:
    """A URL without user info or query (it may hold credentials): for labels and error messages."""
    from timjax.tools.redact import redact_url

    return redact_url(url)


def _function_server(fn: FunctionToolParam, timeout_s: float):
    """A one-tool in-process MCP server that calls ``fn.url`` with the arguments as JSON."""
    import httpx2
    import mcp_types as types
    from mcp.server.lowlevel import Server

    tool = types.Tool(name=fn.name, description=fn.description, input_schema=fn.parameters)
    timeout = min(timeout_s, fn.timeout or timeout_s)

    async def list_tools(ctx, params):
        return types.ListToolsResult(tools=[tool])

    async def call_tool(ctx, params):
        args = {**(fn.defaults or {}), **(params.arguments or {})}
        method = fn.method.upper()
        async with httpx2.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            kw = {"params": {k: json.dumps(v) if not isinstance(v, str) else v for k, v in args.items()}}
            if method == "POST":
                kw = {"json": args}
            async with client.stream(method, fn.url, headers=fn.headers or {}, **kw) as resp:
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_FUNCTION_BYTES:
                        break
        text = bytes(body[:MAX_FUNCTION_BYTES]).decode("utf-8", errors="replace")
        if resp.status_code >= 400:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=f"HTTP {resp.status_code}: {text[:500]}")], is_error=True
            )
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])

    return Server(f"function:{fn.name}", on_list_tools=list_tools, on_call_tool=call_tool)


def parse_tools(items: list[dict], policy, server_tool_names: set[str]) -> list:
    """``ToolServer``s for a request's ``tools`` list, every URL checked against ``policy`` (a
    ``ToolPolicy``, see ``request_policy``); raises ``ToolRefused`` naming the entry at fault."""
    from pydantic import ValidationError

    from timjax.tools.policy import ToolPolicyError
    from timjax.tools.runner import ToolServer

    servers = []
    kinds = {"mcp": McpToolParam, "function": FunctionToolParam, "platform": PlatformToolParam}
    for i, raw in enumerate(items):
        where = f"input.tools[{i}]"
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in kinds:
            raise ToolRefused(f"{where}: unknown tool type {kind!r} (use mcp, function or platform)")
        try:
            t = kinds[kind].model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            raise ToolRefused(f"{where}.{field}: {err['msg']}") from None
        if isinstance(t, PlatformToolParam):
            if t.id not in server_tool_names:
                raise ToolRefused(
                    f"{where}: unknown tool {t.id!r}; this server's tools: {', '.join(sorted(server_tool_names)) or 'none'}"
                )
            continue  # a server-level tool: offered already
        try:
            policy.check_url(t.url)
        except ToolPolicyError as e:
            raise ToolRefused(
                f"{where}.url: tool URL {redacted(t.url)} is not allowed by this server ({e}; start it with "
                f"--allow-tool-url matching that host)"
            ) from None
        if isinstance(t, McpToolParam):
            allowed = t.allowed_tools
            if allowed is not None and "*" in allowed:
                allowed = None
            headers = t.auth.headers() if t.auth else None
            servers.append((ToolServer(t.url, tools=allowed, name=redacted(t.url), headers=headers), where))
        else:
            servers.append((ToolServer(_function_server(t, policy.timeout_s), name=f"function {t.name}"), where))
    return servers


class ToolSet:
    """Server-level and per-request tools as one runner for the TIM controller (the duck type of
    ``timjax.tools.runner.ToolRunner`` that ``ToolSession`` uses); a per-request tool wins on a name clash."""

    def __init__(self, base, extra=None):
        self.base, self.extra = base, extra
        self.owner = {}
        for runner in (base, extra):
            if runner is not None:
                self.owner.update({name: runner for name in runner.tools})
        self.tools = {name: r.tools[name] for name, r in self.owner.items()}

    def __getattr__(self, name):
        """Anything else a session reads (limits, policy, redaction) is the per-request runner's, which
        the server built with the server's limits; else the server-level runner's."""
        if name in ("base", "extra"):
            raise AttributeError(name)
        return getattr(self.extra if self.extra is not None else self.base, name)

    @property
    def specs(self):
        return [t.spec for t in self.tools.values()]

    def validate(self, name: str, arguments_json: str):
        runner = self.owner.get(name)
        if runner is None:
            try:
                args = json.loads(arguments_json)
            except (ValueError, TypeError):
                args = arguments_json
            return args, ("unknown_tool", f"unknown tool {name!r}; tools: {', '.join(self.owner)}")
        return runner.validate(name, arguments_json)

    def submit(self, name: str, arguments: dict):
        return self.owner[name].submit(name, arguments)

    def session(self, count_tokens=None):
        from timjax.tools.runner import ToolSession

        return ToolSession(self, count_tokens)

    def close(self) -> None:
        if self.extra is not None:
            self.extra.close()


def open_request_tools(items: list[dict], *, base, limits, allow_patterns: list[str]) -> ToolSet:
    """Connect to a request's tools (lists them; blocking: run off the event loop) and join them with
    the server-level runner ``base``. Raises ``ToolRefused``."""
    from timjax.tools.runner import ToolConfigError, ToolRunner

    names = set(base.tools) if base is not None else set()
    policy = request_policy(allow_patterns, limits)
    servers = parse_tools(items, policy, names)
    if not servers:
        return ToolSet(base)
    try:  # the runner applies the same policy again (URLs, server kinds) and its timeouts and caps
        extra = ToolRunner([s for s, _ in servers], policy=policy)
    except ToolConfigError as e:
        raise ToolRefused(f"input.tools: {e}") from None
    if extra.startup_errors:
        extra.close()
        raise ToolRefused(f"input.tools: {'; '.join(extra.startup_errors)}")
    return ToolSet(base, extra)
