"""The value of an unfinished JSON document, for a reasoning tree cut short by a budget.

``close_partial_json(prefix)`` parses a prefix of a JSON document and returns a *prefix-consistent view*
of the value the whole document will have:

- an object holds the members completed so far plus the member being written (if its value has started);
  a member whose key or ``:`` is cut is left out;
- an array holds the items completed so far plus the item being written;
- a string being written is the prefix decoded so far (a cut escape such as ``\\u12`` or a lone
  high surrogate is left out);
- a number or ``true``/``false``/``null`` appears only once it is certainly complete (a number needs a
  character after it, since ``1`` may become ``12``); one cut mid-way (``-``, ``1.``, ``1e``, ``tru``) is
  left out, with its key.

So every string in the result is a prefix of the final string, every other scalar is final, and every
container holds a prefix of the final members with only the last one incomplete. A complete document
gives exactly ``json.loads``. A syntax error is treated like the end of the text (the view up to it).
``None`` only when no container and no complete scalar has started (empty text, ``"tr"``, ``"-"``).
Bytes are accepted: an incomplete UTF-8 sequence at the end is dropped rather than replaced.

No JAX here (the ``timjax/tim`` wall).
"""

from __future__ import annotations

import json
import re

__all__ = ["close_partial_json"]

_NOTHING = object()  # "no usable value": the cut fell before this value was certain
_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = (
    ("true", True),
    ("false", False),
    ("null", None),
    ("NaN", float("nan")),
    ("Infinity", float("inf")),
    ("-Infinity", float("-inf")),
)
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_PLAIN = re.compile(r'[^"\\]*')
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_CUT_U_ESCAPE = re.compile(r"(?:\\(?:u[0-9a-fA-F]{0,3})?)?")  # what is left of a \uXXXX the text cut


class _Cut(Exception):
    """The text ended (or broke) inside a value; ``partial`` is that value's prefix-consistent view."""

    def __init__(self, partial=_NOTHING):
        self.partial = partial


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def _ws(self) -> None:
        s, i = self.s, self.i
        while i < len(s) and s[i] in _WS:
            i += 1
        self.i = i

    def _peek(self) -> str:
        self._ws()
        if self.i >= len(self.s):
            raise _Cut()
        return self.s[self.i]

    def value(self):
        c = self._peek()
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c == '"':
            return self._string()
        return self._scalar()

    def _object(self) -> dict:
        out: dict = {}
        self.i += 1
        if self._peek_or_cut(out) == "}":
            self.i += 1
            return out
        while True:
            if self._peek_or_cut(out) != '"':
                raise _Cut(out)
            try:
                key = self._string()
            except _Cut:
                raise _Cut(out) from None  # a cut key: the member is left out
            if self._peek_or_cut(out) != ":":
                raise _Cut(out)
            self.i += 1
            try:
                out[key] = self.value()
            except _Cut as cut:
                if cut.partial is not _NOTHING:
                    out[key] = cut.partial
                raise _Cut(out) from None
            c = self._peek_or_cut(out)
            self.i += 1
            if c == "}":
                return out
            if c != ",":
                raise _Cut(out)

    def _array(self) -> list:
        out: list = []
        self.i += 1
        if self._peek_or_cut(out) == "]":
            self.i += 1
            return out
        while True:
            try:
                out.append(self.value())
            except _Cut as cut:
                if cut.partial is not _NOTHING:
                    out.append(cut.partial)
                raise _Cut(out) from None
            c = self._peek_or_cut(out)
            self.i += 1
            if c == "]":
                return out
            if c != ",":
                raise _Cut(out)

    def _peek_or_cut(self, partial) -> str:
        try:
            return self._peek()
        except _Cut:
            raise _Cut(partial) from None

    def _string(self) -> str:
        s = self.s
        self.i += 1  # the opening quote
        parts: list[str] = []
        while True:
            m = _PLAIN.match(s, self.i)
            parts.append(m.group())
            self.i = m.end()
            if self.i >= len(s):
                raise _Cut("".join(parts))
            if s[self.i] == '"':
                self.i += 1
                return "".join(parts)
            ch = self._escape()  # s[self.i] is a backslash
            if ch is None:
                raise _Cut("".join(parts))
            parts.append(ch)

    def _escape(self) -> str | None:
        """The character of the escape at ``self.i``; None when the text ends (or breaks) inside it."""
        s, i = self.s, self.i
        if i + 1 >= len(s):
            return None
        c = s[i + 1]
        if c in _ESCAPES:
            self.i = i + 2
            return _ESCAPES[c]
        if c != "u" or not _HEX4.fullmatch(s, i + 2, i + 6):
            return None
        code = int(s[i + 2 : i + 6], 16)
        self.i = i + 6
        if 0xD800 <= code < 0xDC00:  # a high surrogate: json pairs it with a following low one
            j = self.i
            if _CUT_U_ESCAPE.fullmatch(s, j):
                return None  # the text ends where the low half may follow: wait for it
            if s.startswith("\\u", j) and _HEX4.fullmatch(s, j + 2, j + 6):
                low = int(s[j + 2 : j + 6], 16)
                if 0xDC00 <= low < 0xE000:
                    self.i = j + 6
                    return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00))
        return chr(code)

    def _scalar(self):
        s, i = self.s, self.i
        for word, val in _LITERALS:
            if s.startswith(word, i):
                self.i = i + len(word)  # literals have a fixed length: complete once all there
                return val
        m = _NUMBER.match(s, i)
        if m and m.end() < len(s) and s[m.end()] not in ".eE+-0123456789":
            self.i = m.end()
            text = m.group()
            return float(text) if any(c in text for c in ".eE") else int(text)
        raise _Cut()  # cut mid-way (or not JSON from here on)


def _decode(data: bytes) -> str:
    """UTF-8 text of ``data`` without a trailing incomplete character (a cut, not an error)."""
    for cut in range(4):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


def close_partial_json(text: str | bytes):
    """Prefix-consistent value of a (possibly unfinished) JSON document; see the module docstring."""
    if isinstance(text, (bytes, bytearray)):
        text = _decode(bytes(text))
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return _Parser(text).value()
    except _Cut as cut:
        return None if cut.partial is _NOTHING else cut.partial
    except RecursionError:
        return None
