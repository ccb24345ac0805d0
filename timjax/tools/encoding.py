"""How a tool's answer is written into the TIM document: ONE function, used by the runtime and by the
training-data generator alike, so the model reads at inference exactly what it saw in training.

The TIM schema types ``tool_result`` as an arbitrary JSON value (``schema.py``). After the model has
written ``"tool_result"`` the runtime forces ``": "`` followed by ``encode_result(...)``:

* a result with MCP structured content -> that object, e.g. ``{"result": 7}``;
* a result with only text content -> the text as a JSON string (several text blocks joined by newlines);
* an error (``isError``, a timeout, a crash, a refused call, ...) -> ``{"error": "<message>"}``;
* a result longer than the per-call token cap -> ``{"error": "result truncated: ...", "partial": "<prefix>"}``.

The layout is the grammar's (``timjax.tim.schema.dumps``: ``", "`` and ``": "`` separators, UTF-8 kept,
no other whitespace); NaN and infinities are refused (not JSON). ``encode_result(x) ==
dumps(json.loads(encode_result(x)))`` always holds, so a training document may carry the decoded value
in its tree and serialise it with ``dumps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from timjax.tim.schema import dumps

__all__ = ["MAX_ERROR_CHARS", "classify_result", "encode_error", "encode_result", "encode_value", "truncate_encoded"]

MAX_ERROR_CHARS = 300  # an error message is cut here (a tiny model needs the gist, not a traceback)


def encode_value(value: Any) -> str:
    """A JSON value in the grammar's layout. Raises ``ValueError`` for what JSON cannot hold."""

    def check(v):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{v!r} is not a JSON number")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"object key {k!r} is not a string")
                check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x)
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise ValueError(f"{type(v).__name__} is not a JSON value")

    check(value)
    text = dumps(value)
    text.encode("utf-8")  # lone surrogates cannot be written: raises UnicodeEncodeError (a ValueError)
    return text


def encode_error(message: str) -> str:
    """``{"error": "<message>"}`` (the message cut to ``MAX_ERROR_CHARS``, lone surrogates replaced)."""
    message = str(message).encode("utf-8", errors="replace").decode("utf-8")
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    return dumps({"error": message})


def _field(result: Any, *names: str, default=None):
    for n in names:
        if isinstance(result, dict) and n in result:
            return result[n]
        if hasattr(result, n):
            return getattr(result, n)
    return default


def _texts(content) -> tuple[list[str], list[str]]:
    texts, other = [], []
    for block in content or ():
        kind = _field(block, "type", default="?")
        if kind == "text":
            texts.append(_field(block, "text", default=""))
        else:
            other.append(str(kind))
    return texts, other


def encode_result(result: Any, *, is_error: bool | None = None) -> str:
    """The text forced after ``"tool_result": `` for one tool answer.

    ``result``: an MCP ``CallToolResult`` (or its dict form with ``structuredContent``/``content``/
    ``isError``), or directly the structured content (a dict, as the servers' pure functions return it).
    A result the grammar cannot hold (NaN, non-UTF-8 text, non-text content only) becomes an error object.
    """
    return classify_result(result, is_error=is_error)[0]


def classify_result(result: Any, *, is_error: bool | None = None) -> tuple[str, str]:
    """``(encode_result(result), status)`` with status ``"ok"``, ``"tool_error"`` (the tool said isError)
    or ``"invalid_result"`` (the answer cannot be written as JSON)."""
    if isinstance(result, dict) and not (
        {"content", "structuredContent", "structured_content", "isError", "is_error"} & result.keys()
    ):
        structured, content, err = result, None, False
    else:
        structured = _field(result, "structured_content", "structuredContent")
        content = _field(result, "content")
        err = bool(_field(result, "is_error", "isError", default=False))
    if is_error is not None:
        err = is_error
    texts, other = _texts(content)
    if err:
        return encode_error("\n".join(texts) or "the tool reported an error"), "tool_error"
    try:
        if structured is not None:
            return encode_value(structured), "ok"
        if not texts and other:
            return encode_error(f"unsupported result content: {', '.join(other)}"), "invalid_result"
        return encode_value("\n".join(texts)), "ok"
    except ValueError as e:
        return encode_error(f"invalid result: {e}"), "invalid_result"


def truncate_encoded(encoded: str, max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[str, int]:
    """Cap an encoded result at ``max_tokens`` tokens. Returns ``(text, n_tokens_of_the_original)``; when
    over the cap, ``text`` is ``{"error": "result truncated: N tokens over the cap of M", "partial":
    "<the longest prefix of the original text that fits>"}`` (the visible marker)."""
    n = count_tokens(encoded)
    if n <= max_tokens:
        return encoded, n

    def wrap(k: int) -> str:
        return dumps(
            {"error": f"result truncated: {n} tokens over the cap of {max_tokens}", "partial": encoded[:k] + "…"}
        )

    lo, hi = 0, min(len(encoded), 32 * max_tokens)  # no token is longer than 32 characters in practice
    while lo < hi:  # the longest prefix whose wrapped form fits
        mid = (lo + hi + 1) // 2
        if count_tokens(wrap(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    out = wrap(lo)
    if count_tokens(out) > max_tokens:  # the cap is smaller than the marker itself
        out = encode_error(f"result truncated: {n} tokens over the cap of {max_tokens}")
    return out, n
