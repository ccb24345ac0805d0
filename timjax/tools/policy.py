"""What tools a run may use and how much they may cost: ``ToolPolicy`` (pydantic), applied by the runner to
every tool server it starts, and by ``timjax serve`` to per-request tools.

* URLs: ``schemes`` (default http, https) and ``hosts`` (``fnmatch`` patterns over the host name, each
  optionally with a port glob, ``host:port`` / ``[v6]:port``, or a URL prefix ``http://host:port/path``;
  see ``_split_pattern``; None = no host rule, the library default for servers you configure yourself;
  ``()`` = no URL at all). A loopback host (``localhost``,
  ``127.0.0.0/8``, ``::1``, ``0.0.0.0``) passes only when a pattern names it without a wildcard-only
  pattern (``"*"`` never matches loopback): ``hosts=["*", "127.0.0.1"]``. The check reads the URL text; it
  does not resolve names (a public name that resolves to loopback passes: put such servers behind a
  resolver you trust).
* Server kinds: ``allow_stdio`` and ``allow_in_process`` (a server taking requests from others sets both
  False: a request must not start processes or import code).
* Limits: per-call timeout, connect timeout, calls per inference, result cap (tokens; characters encoded
  before any tokenization; bytes read off the transport before any parsing), description and whole tool-block caps in the system prompt.

``ToolLimits`` (a dataclass, kept for callers) holds the four original limits; ``ToolPolicy.from_limits``
turns it into a policy.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from timjax.base.errors import TimjaxError
from timjax.tools.redact import redact_url

__all__ = ["ToolConfigError", "ToolLimits", "ToolPolicy", "ToolPolicyError", "is_loopback"]


class ToolConfigError(TimjaxError):
    """A tool configuration timjax cannot use (a server that cannot be listed, an unknown allowed name...)."""


class ToolPolicyError(ToolConfigError):
    """A tool the policy refuses; the message names the (redacted) URL or server and the rule."""


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


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_pattern(pattern: str) -> tuple[str, str | None, tuple[str, str] | None]:
    """A ``hosts`` pattern as (host glob, port glob or None, (scheme, path prefix) or None). Forms:
    ``host`` (any port), ``host:port`` (``port`` a glob: ``127.0.0.1:*``, ``api.example.com:8443``),
    ``[v6]`` / ``[v6]:port``, a bare IPv6 address (any port), and a URL prefix ``scheme://host[:port]/path``
    (same scheme, host and port - the scheme's default when omitted - and a path under ``/path``)."""
    p = pattern.strip()
    if "://" in p:
        u = urlsplit(p)
        try:
            port = u.port or _DEFAULT_PORTS.get(u.scheme.lower())
        except ValueError:
            port = None
        return (u.hostname or "", str(port) if port else None, (u.scheme.lower(), u.path or "/"))
    if p.startswith("["):
        host, _, rest = p[1:].partition("]")
        return host, (rest[1:] if rest.startswith(":") else None), None
    if p.count(":") == 1:
        host, port = p.split(":")
        return host, port or None, None
    return p, None, None


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


class ToolPolicy(BaseModel):
    """Allowed tool servers and the limits of their calls (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schemes: tuple[str, ...] = ("http", "https")
    hosts: tuple[str, ...] | None = None
    allow_stdio: bool = True
    allow_in_process: bool = True
    timeout_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(20.0, gt=0)
    max_calls: int = Field(32, gt=0)
    max_result_tokens: int = Field(256, gt=0)
    # characters of a result read and encoded before any tokenization (None: 8 x max_result_tokens)
    max_result_chars: int | None = Field(None, gt=0)
    # bytes of one answer read off the transport (HTTP body, stdio line) before it is cut unparsed
    # (None: 8 x result_chars + 4096, room for the JSON-RPC envelope, escapes, UTF-8 and structuredContent)
    max_result_bytes: int | None = Field(None, gt=0)
    max_description_chars: int = Field(1024, gt=0)  # a longer description is cut with "…"
    max_tool_block_chars: int = Field(16_384, gt=0)  # the tool list in the system prompt, all tools

    @classmethod
    def from_limits(cls, limits: ToolLimits | ToolPolicy | None) -> ToolPolicy:
        if limits is None:
            return cls()
        if isinstance(limits, ToolPolicy):
            return limits
        return cls(
            timeout_s=limits.timeout_s,
            connect_timeout_s=limits.connect_timeout_s,
            max_calls=limits.max_calls,
            max_result_tokens=limits.max_result_tokens,
        )

    @property
    def result_chars(self) -> int:
        return self.max_result_chars or 8 * self.max_result_tokens

    @property
    def result_bytes(self) -> int:
        return self.max_result_bytes or 8 * self.result_chars + 4096

    def check_url(self, url: str) -> None:
        """None, or ``ToolPolicyError`` naming the URL (credentials redacted) and the rule it breaks."""
        shown = redact_url(url)
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
        except ValueError as e:
            raise ToolPolicyError(f"tool URL {shown}: not a URL ({e})") from None
        scheme = parts.scheme.lower()
        if scheme not in {s.lower() for s in self.schemes}:
            raise ToolPolicyError(
                f"tool URL {shown}: scheme {scheme or '(none)'!r} is not in ToolPolicy.schemes {list(self.schemes)}"
            )
        if not host:
            raise ToolPolicyError(f"tool URL {shown}: no host")
        if self.hosts is None:
            return
        loop = is_loopback(host)
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme)
        except ValueError as e:
            raise ToolPolicyError(f"tool URL {shown}: bad port ({e})") from None
        for pattern in self.hosts:
            host_pat, port_pat, prefix = _split_pattern(pattern)
            if loop and host_pat.strip("*?.[]") == "":  # wildcard-only host patterns never admit loopback
                continue
            if not fnmatch.fnmatchcase(host.lower(), host_pat.lower()):
                continue
            if port_pat is not None and not fnmatch.fnmatchcase(str(port), port_pat):
                continue
            if prefix is not None and (scheme != prefix[0] or not (parts.path or "/").startswith(prefix[1])):
                continue
            return
        why = "is loopback and not listed" if loop else "matches no pattern"
        raise ToolPolicyError(f"tool URL {shown}: host {host!r} {why} in ToolPolicy.hosts {list(self.hosts)}")

    def check_kind(self, kind: str, label: str) -> None:
        """``kind``: "stdio" or "in_process"; ``ToolPolicyError`` when the policy refuses that kind."""
        if kind == "stdio" and not self.allow_stdio:
            raise ToolPolicyError(f"tool server {label!r}: stdio servers are refused (ToolPolicy.allow_stdio=False)")
        if kind == "in_process" and not self.allow_in_process:
            raise ToolPolicyError(
                f"tool server {label!r}: in-process servers are refused (ToolPolicy.allow_in_process=False)"
            )
