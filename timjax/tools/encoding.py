"""How a tool's answer is written into the TIM document: ONE canonical function, used by the runtime and
by the training-data generator alike, so the model reads at inference exactly what it saw in training,
whatever the server's formatting.

The TIM schema types ``tool_result`` as an arbitrary JSON value (``schema.py``). After the model has
written ``"tool_result"`` the runtime forces ``": "`` followed by ``encode_result(...)``, canonically:

* a result with MCP structured content -> that object, e.g. ``{"result": 7}``;
* else its text: a text that parses as JSON is that JSON value re-serialised compactly (a server that
  pretty-prints ``{\\n  "result": 7\\n}`` reads as ``{"result": 7}``; ``"13"`` as ``13``), any other text is a
  JSON string; several text blocks are a list of such values;
* an error (``isError``, a timeout, a crash, a refused call, ...) -> ``{"error": "<message>"}``, the message
  compacted the same way when it is a JSON object or list;
* a result longer than the per-call cap -> ``{"error": "result truncated: over the cap of M tokens",
  "partial": "<prefix of the encoded result>…"}``.

The layout is the grammar's (``timjax.tim.schema.dumps``: ``", "`` and ``": "`` separators, UTF-8 kept, DEL
escaped, lone surrogates replaced by U+FFFD); NaN and infinities are refused (not JSON). ``encode_result(x)
== dumps(json.loads(encode_result(x)))`` always holds, so a training document may carry the decoded value in
its tree and serialise it with ``dumps``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from timjax.tim.schema import dumps, iter_dumps

__all__ = [
    "MAX_ERROR_CHARS",
    "canonical_text",
    "classify_result",
    "encode_error",
    "encode_result",
    "encode_value",
    "fit_tokens",
    "truncate_encoded",
    "truncation_message",
]

MAX_ERROR_CHARS = 300  # an error message is cut here (a tiny model needs the gist, not a traceback)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check(value: Any) -> None:
    """Raise ``ValueError`` for what the grammar's JSON cannot hold (dict keys must be strings: json would
    silently turn ``1`` into ``"1"``, and the decoded value would differ)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ValueError(f"object key {k!r} is not a string")
                stack.append(x)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise ValueError(f"{type(v).__name__} is not a JSON value")


def encode_value(value: Any, *, max_chars: int | None = None) -> str:
    """A JSON value in the grammar's layout. Raises ``ValueError`` for what JSON cannot hold (NaN,
    infinities, non-string keys, other types). ``max_chars``: stop encoding once the text is longer than
    this (the result then has between ``max_chars + 1`` and a chunk more characters: a cut is coming)."""
    _check(value)
    if max_chars is None:
        if not _finite(value):
            raise ValueError("NaN and infinities are not JSON numbers")
        return dumps(value)
    out, n = [], 0
    for chunk in iter_dumps(value, allow_nan=False):  # a 5 MB result is not written out in full
        out.append(chunk)
        n += len(chunk)
        if n > max_chars:
            break
    return "".join(out)


def canonical_text(text: str) -> Any:
    """A text block's value: the JSON it holds when it parses as JSON (strictly: no NaN / Infinity, no
    number that overflows a float), else the text itself."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return text
    if not _finite(value):
        return text
    return value


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            return False
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _compact_message(message: str) -> str:
    """An error message that is a JSON object or list, re-serialised compactly; other text as is."""
    s = message.strip()
    if s[:1] in "{[" and s:
        v = canonical_text(s)
        if not isinstance(v, str):
            try:
                return encode_value(v)
            except ValueError:
                pass
    return message


def encode_error(message: str) -> str:
    """``{"error": "<message>"}`` (JSON messages compacted, cut to ``MAX_ERROR_CHARS``)."""
    message = _compact_message(str(message))
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    return dumps({"error": message})


def truncation_message(max_tokens: int) -> str:
    return f"result truncated: over the cap of {max_tokens} tokens"


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
    """The text forced after ``"tool_result": `` for one tool answer (see the module docstring).

    ``result``: an MCP ``CallToolResult`` (or its dict form with ``structuredContent``/``content``/
    ``isError``), or directly the structured content (a dict, as the servers' pure functions return it).
    A result the grammar cannot hold (NaN, non-text content only) becomes an error object.
    """
    return classify_result(result, is_error=is_error)[0]


def classify_result(result: Any, *, is_error: bool | None = None, max_chars: int | None = None) -> tuple[str, str]:
    """``(encoded, status)`` with status ``"ok"``, ``"tool_error"`` (the tool said isError),
    ``"invalid_result"`` (the answer cannot be written as JSON) or, with ``max_chars``, ``"over"``: the
    encoded result is longer than ``max_chars`` and ``encoded`` is only a prefix of it (at most a chunk
    past the cap; a text longer than the cap is not parsed as JSON at all), for ``fit_tokens`` to cut."""
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
        message = "\n".join(t[: 4 * MAX_ERROR_CHARS] for t in texts) or "the tool reported an error"
        return encode_error(message), "tool_error"
    try:
        if structured is not None:
            text = encode_value(structured, max_chars=max_chars)
        elif not texts and other:
            return encode_error(f"unsupported result content: {', '.join(other)}"), "invalid_result"
        elif max_chars is not None and sum(map(len, texts)) > max_chars:  # too long to parse: cut as text
            text = encode_value("\n".join(texts)[: max_chars + 1])
        else:
            values = [canonical_text(t) for t in texts]
            text = encode_value(values[0] if len(values) == 1 else values, max_chars=max_chars)
    except ValueError as e:
        return encode_error(f"invalid result: {e}"), "invalid_result"
    if max_chars is not None and len(text) > max_chars:
        return text[: max_chars + 1], "over"
    return text, "ok"


def fit_tokens(
    encoded: str,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    *,
    over: bool = False,
    message: str | None = None,
) -> tuple[str, int, bool]:
    """Cap an encoded result at ``max_tokens`` tokens: ``(text, n_tokens of text, truncated)``. ``over``:
    ``encoded`` is already a prefix of a longer result (``classify_result(max_chars=...)``). The text is only ever
    tokenized in prefixes of ``encoded`` (the caller keeps it to a few times the cap in characters). When
    cut, ``text`` is ``{"error": truncation_message(...), "partial": "<the longest prefix that fits>…"}``
    (``message`` in place of ``truncation_message``: a cut at the transport's byte cap names it)."""
    if not over:
        n = count_tokens(encoded)
        if n <= max_tokens:
            return encoded, n, False
    message = message or truncation_message(max_tokens)

    def wrap(k: int) -> str:
        return dumps({"error": message, "partial": encoded[:k] + "…"})

    lo, hi = 0, len(encoded)
    while lo < hi:  # the longest prefix whose wrapped form fits
        mid = (lo + hi + 1) // 2
        if count_tokens(wrap(mid)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    out = wrap(lo)
    if count_tokens(out) > max_tokens:  # the cap is smaller than the marker itself
        out = encode_error(message)
    return out, count_tokens(out), True


def truncate_encoded(encoded: str, max_tokens: int, count_tokens: Callable[[str], int]) -> tuple[str, int]:
    """``fit_tokens`` for a whole encoded result: ``(text, n_tokens of the original)`` (kept for callers;
    tokenizes the whole text: the runner cuts by characters first)."""
    n = count_tokens(encoded)
    text, _, _ = fit_tokens(encoded, max_tokens, count_tokens)
    return text, n
